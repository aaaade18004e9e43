//! Jittered exponential backoff: how long to wait before trying again after `n` failures in a row.
//!
//! The delay doubles from `base` up to `max`, and each one is drawn from its upper half
//! ("equal jitter"), so that many clients that failed together do not all come back at the same
//! instant, and a delay never collapses to zero. Knows nothing of what is being retried.

use rand::Rng;
use std::time::Duration;

/// The longest any delay is, whatever the settings: a day. Longer ones would only be a
/// mistake, and a deadline computed from an absurd one could overflow the clock.
pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// The delays of one thing being retried.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays doubling from `base` to at most `max` (and never more than [`LONGEST`]).
    pub fn new(base: Duration, max: Duration) -> Self {
        let max = max.min(LONGEST);
        Self {
            base: base.min(max),
            max,
            failures: 0,
        }
    }

    /// Counts a failure and says how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling(self.failures);
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// A success: the next failure starts again from `base`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures counted since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn ceiling(&self, failures: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << failures.min(16))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_settings_are_capped_at_a_day() {
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            let d = b.next_delay();
            assert!(d <= LONGEST && d >= LONGEST / 2, "{d:?}");
        }
    }

    #[test]
    fn doubles_within_its_upper_half_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for ceiling_ms in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            let ceiling = Duration::from_millis(ceiling_ms);
            assert!(d <= ceiling && d >= ceiling / 2, "{d:?} for {ceiling:?}");
        }
        assert_eq!(b.failures(), 6);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn many_failures_neither_overflow_nor_pass_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(7200));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(7200));
        }
    }
}
