//! Hedged calls (opt-in): when an idempotent call has not answered after the fleet's recent p95 latency,
//! send the same call again (the balancer will most likely pick another endpoint: the first one
//! now has a call in flight, which raises its peak-EWMA cost) and take whichever answers first,
//! cancelling the other. Hedges draw on the same budget as retries, so an overloaded fleet is not
//! made worse.
//!
//! This module owns the settings and the latency window that sets the delay; `call` runs the race.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// When to hedge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// Never.
    Off,
    /// After this long.
    Fixed(Duration),
    /// After this quantile of the fleet's recent latency (measured over about a second), but not
    /// sooner than `min`. No hedging until the first window is measured.
    Quantile {
        /// E.g. 0.95.
        quantile: f64,
        /// The shortest delay.
        min: Duration,
    },
}

/// Hedging settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeConfig {
    /// Path prefixes of the methods that may be hedged (they must be idempotent).
    pub methods: Vec<String>,
    /// When.
    pub delay: HedgeDelay,
}

impl Default for HedgeConfig {
    /// Off. Measured on a 2-core machine (BENCHMARKS.md), hedging at the p95 made p99 worse than
    /// outlier ejection alone (the extra calls cost more than the slow ones they saved), so it is
    /// opt-in: see [`HedgeConfig::p95`].
    fn default() -> Self {
        Self {
            methods: vec![format!("/{}/GetPoint", crate::proto::USERGUIDE_SERVICE)],
            delay: HedgeDelay::Off,
        }
    }
}

impl HedgeConfig {
    /// GetPoint hedged after the fleet's recent p95 latency (at least 1 ms).
    pub fn p95() -> Self {
        Self {
            delay: HedgeDelay::Quantile {
                quantile: 0.95,
                min: Duration::from_millis(1),
            },
            ..Self::default()
        }
    }
}

impl HedgeConfig {
    /// Whether calls to `path` may be hedged.
    pub fn applies_to(&self, path: &str) -> bool {
        self.delay != HedgeDelay::Off && self.methods.iter().any(|m| path.starts_with(m))
    }
}

/// The fleet's recent latency, condensed into one quantile per window.
#[derive(Debug)]
pub struct LatencyWindow {
    window: Mutex<(Histogram<u64>, Instant)>,
    quantile_us: AtomicU64,
}

const WINDOW: Duration = Duration::from_secs(1);
const MIN_SAMPLES: u64 = 20;

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            // 1 µs to 1 min at 2 significant figures: constant bounds, so this cannot fail.
            window: Mutex::new((
                Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid"),
                Instant::now(),
            )),
            quantile_us: AtomicU64::new(0),
        }
    }
}

impl LatencyWindow {
    /// Records one successful attempt's latency; closes the window when it is old enough.
    pub fn record(&self, latency: Duration, quantile: f64) {
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (hist, since) = &mut *guard;
        hist.saturating_record(
            u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        if since.elapsed() >= WINDOW && hist.len() >= MIN_SAMPLES {
            self.quantile_us
                .store(hist.value_at_quantile(quantile), Ordering::Relaxed);
            hist.reset();
            *since = Instant::now();
        }
    }

    /// The hedge delay under `delay`, or `None` for no hedge.
    pub fn delay(&self, delay: HedgeDelay) -> Option<Duration> {
        match delay {
            HedgeDelay::Off => None,
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Quantile { min, .. } => {
                let us = self.quantile_us.load(Ordering::Relaxed);
                (us > 0).then(|| Duration::from_micros(us).max(min))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_delay_follows_the_windowed_quantile() {
        let w = LatencyWindow::default();
        let q = HedgeDelay::Quantile {
            quantile: 0.95,
            min: Duration::from_millis(1),
        };
        assert_eq!(w.delay(q), None, "no hedging before a window is measured");
        for i in 0..100 {
            w.record(Duration::from_millis(if i < 90 { 2 } else { 40 }), 0.95);
        }
        assert_eq!(w.delay(q), None, "the window is not a second old yet");
        tokio::time::advance(WINDOW).await;
        w.record(Duration::from_millis(2), 0.95);
        let d = w.delay(q).unwrap();
        assert!(
            d >= Duration::from_millis(39) && d <= Duration::from_millis(41),
            "{d:?}"
        );
        assert_eq!(
            w.delay(HedgeDelay::Fixed(Duration::from_millis(7))),
            Some(Duration::from_millis(7))
        );
        assert_eq!(w.delay(HedgeDelay::Off), None);
    }

    #[test]
    fn only_listed_methods_are_hedged() {
        assert!(!HedgeConfig::default().applies_to("/userguide.v1.UserGuideService/GetPoint"));
        let c = HedgeConfig::p95();
        assert!(c.applies_to("/userguide.v1.UserGuideService/GetPoint"));
        assert!(!c.applies_to("/userguide.v1.UserGuideService/ListUsers"));
    }
}
