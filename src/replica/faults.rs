//! Fault knobs: injected latency, jitter and a failure rate, changeable at run time (through the
//! admin service) so a benchmark can degrade a replica in the middle of a run. Knows nothing of
//! the service it slows down.

use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest injected latency or jitter: enough for any demo, and a mistyped value cannot
/// hang calls for days.
pub const MAX_FAULT_DELAY: Duration = Duration::from_secs(600);

/// A snapshot of the knobs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultConfig {
    /// Added to every call.
    pub latency: Duration,
    /// Up to this much more, uniformly at random.
    pub jitter: Duration,
    /// The share of calls answered with `UNAVAILABLE`, in `[0, 1]`.
    pub fail_rate: f64,
}

impl FaultConfig {
    /// Checks that the failure rate is a share and the delays at most [`MAX_FAULT_DELAY`].
    pub fn validate(&self) -> Result<(), String> {
        for (knob, value) in [("latency", self.latency), ("jitter", self.jitter)] {
            if value > MAX_FAULT_DELAY {
                return Err(format!(
                    "{knob} must be at most {}, got {}",
                    humantime::format_duration(MAX_FAULT_DELAY),
                    humantime::format_duration(value)
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.fail_rate) || self.fail_rate.is_nan() {
            return Err(format!(
                "fail rate must be between 0 and 1, got {}",
                self.fail_rate
            ));
        }
        Ok(())
    }
}

/// The live knobs, shared by every handler. Atomics, so reading them costs nothing on the hot path.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<Knobs>,
}

#[derive(Debug, Default)]
struct Knobs {
    latency_us: AtomicU64,
    jitter_us: AtomicU64,
    fail_rate_bits: AtomicU64,
}

impl Faults {
    /// Knobs set to `config`.
    pub fn new(config: FaultConfig) -> Self {
        let faults = Self::default();
        faults.set(config);
        faults
    }

    /// The current knobs.
    pub fn get(&self) -> FaultConfig {
        FaultConfig {
            latency: Duration::from_micros(self.inner.latency_us.load(Ordering::Relaxed)),
            jitter: Duration::from_micros(self.inner.jitter_us.load(Ordering::Relaxed)),
            fail_rate: f64::from_bits(self.inner.fail_rate_bits.load(Ordering::Relaxed)),
        }
    }

    /// Replaces the knobs; returns the previous ones.
    pub fn set(&self, config: FaultConfig) -> FaultConfig {
        let previous = self.get();
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.inner
            .latency_us
            .store(micros(config.latency), Ordering::Relaxed);
        self.inner
            .jitter_us
            .store(micros(config.jitter), Ordering::Relaxed);
        self.inner
            .fail_rate_bits
            .store(config.fail_rate.to_bits(), Ordering::Relaxed);
        previous
    }

    /// Sleeps for the injected latency, then says whether this call is one of the failed share.
    pub async fn apply(&self) -> Injected {
        let config = self.get();
        let delay = if config.jitter.is_zero() {
            config.latency
        } else {
            config.latency + rand::rng().random_range(Duration::ZERO..=config.jitter)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if config.fail_rate > 0.0 && rand::rng().random_bool(config.fail_rate.min(1.0)) {
            Injected::Fail
        } else {
            Injected::Pass
        }
    }
}

/// What the knobs decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Serve the call.
    Pass,
    /// Answer `UNAVAILABLE`.
    Fail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn latency_is_applied_and_changeable() {
        let faults = Faults::new(FaultConfig {
            latency: Duration::from_millis(20),
            ..Default::default()
        });
        let start = tokio::time::Instant::now();
        assert_eq!(faults.apply().await, Injected::Pass);
        assert_eq!(start.elapsed(), Duration::from_millis(20));

        let previous = faults.set(FaultConfig::default());
        assert_eq!(previous.latency, Duration::from_millis(20));
        let start = tokio::time::Instant::now();
        faults.apply().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn fail_rate_one_always_fails_and_zero_never() {
        let faults = Faults::new(FaultConfig {
            fail_rate: 1.0,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(faults.apply().await, Injected::Fail);
        }
        faults.set(FaultConfig::default());
        for _ in 0..20 {
            assert_eq!(faults.apply().await, Injected::Pass);
        }
    }

    #[test]
    fn rejects_fail_rate_outside_zero_one() {
        let bad = FaultConfig {
            fail_rate: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(FaultConfig::default().validate().is_ok());
    }

    #[test]
    fn rejects_delays_beyond_the_bound() {
        let huge = FaultConfig {
            latency: Duration::from_micros(1_000_000_000_000_000),
            ..Default::default()
        };
        let err = huge.validate().unwrap_err();
        assert!(err.contains("latency must be at most 10m"), "{err}");
        let jitter = FaultConfig {
            jitter: MAX_FAULT_DELAY + Duration::from_secs(1),
            ..Default::default()
        };
        assert!(jitter.validate().unwrap_err().contains("jitter"));
        let edge = FaultConfig {
            latency: MAX_FAULT_DELAY,
            ..Default::default()
        };
        assert!(edge.validate().is_ok());
    }
}
