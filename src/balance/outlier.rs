//! Latency-outlier ejection: takes an endpoint out of rotation while its latency stays far above
//! the rest of the fleet's.
//!
//! Peak-EWMA alone keeps sending a slow replica a small share (its cost decays back while it gets
//! no calls, and the fast replicas' own latency peaks make them look costly now and then); at a
//! 55 ms replica among 5 ms ones, that share alone sets the p99. This detector runs on its own task
//! every `interval`: an endpoint whose latency estimate has stayed above
//! `max(k × median of the others, median of the others + floor)` for `window` is ejected for a
//! backoff (the same doubling backoff as failure accrual), then gets one probe call: a probe faster
//! than the fleet's threshold puts it back, a slow one doubles the ejection. It never ejects below
//! half of the endpoints in rotation, so a fleet that is uniformly slow keeps all of them.
//!
//! The ejection and the probe's verdict belong to the endpoint's accrual task
//! ([`super::accrual`]): the detector asks it to eject, with the threshold the probe is to answer
//! within, and tells it the threshold again at every look while it judges the endpoint (a threshold
//! frozen at the ejection would keep the endpoint out if the whole fleet slowed). It writes
//! nothing into the endpoints.
//!
//! Knows endpoints' latency estimates and rotation state; nothing of discovery or the balancer.

use super::endpoint::Shared;
use super::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Outlier-detection settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    /// Off turns detection off entirely.
    pub enabled: bool,
    /// How many times the others' median latency counts as an outlier.
    pub factor: f64,
    /// And at least this much above it, so sub-millisecond noise never ejects anyone.
    pub floor: Duration,
    /// How long an endpoint must stay above the threshold before it is ejected.
    pub window: Duration,
    /// How often the detector looks.
    pub interval: Duration,
    /// Successful calls an endpoint's estimate must hold (since it last started over, at a
    /// probe) before it is trusted.
    pub min_samples: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: 3.0,
            floor: Duration::from_millis(2),
            window: Duration::from_millis(200),
            interval: Duration::from_millis(50),
            min_samples: 5,
        }
    }
}

impl OutlierConfig {
    fn threshold(&self, median: Duration) -> Duration {
        median.mul_f64(self.factor).max(median + self.floor)
    }
}

/// Runs until the registry is gone.
pub async fn detect(registry: Weak<Registry>, config: OutlierConfig) {
    let mut above_since: HashMap<SocketAddr, Instant> = HashMap::new();
    super::registry::every(registry, config.interval, |registry| {
        let endpoints = registry.shared_endpoints();
        for (endpoint, threshold) in judge(&endpoints, &config, &mut above_since, Instant::now()) {
            endpoint.eject_for_latency(threshold);
        }
    })
    .await;
}

/// Decides which endpoints to eject now, each with the fleet's threshold its probe is to answer
/// within; also tells the endpoints already judged for latency the threshold as it is now.
fn judge(
    endpoints: &[Arc<Shared>],
    config: &OutlierConfig,
    above_since: &mut HashMap<SocketAddr, Instant>,
    now: Instant,
) -> Vec<(Arc<Shared>, Duration)> {
    let in_rotation: Vec<(Arc<Shared>, Duration)> = endpoints
        .iter()
        .filter(|e| e.in_rotation())
        .filter_map(|e| {
            let (ewma, samples) = e.latency();
            (samples >= config.min_samples).then(|| (e.clone(), ewma))
        })
        .collect();
    // Usually no endpoint is above the threshold: then a tick hashes nothing.
    if !above_since.is_empty() {
        let judged: HashSet<SocketAddr> = in_rotation.iter().map(|(e, _)| e.addr()).collect();
        above_since.retain(|addr, _| judged.contains(addr));
    }
    if in_rotation.len() < 2 {
        return Vec::new();
    }
    // Sorted once: each endpoint's "median of the others" is then read off by index, so a tick
    // costs O(n log n) over the fleet, not a sort per endpoint.
    let mut sorted: Vec<Duration> = in_rotation.iter().map(|(_, l)| *l).collect();
    sorted.sort_unstable();
    let fleet = config.threshold(median_of(&sorted, None));
    for e in endpoints {
        e.update_latency_threshold(fleet);
    }
    // Keep at least half of the endpoints in rotation, whatever the latencies say.
    let rotation = endpoints.iter().filter(|e| e.in_rotation()).count();
    let mut may_eject = rotation.saturating_sub(rotation.div_ceil(2));
    let mut verdicts = Vec::new();
    // Worst first, so the budget of ejections goes to the slowest.
    let mut order: Vec<usize> = (0..in_rotation.len()).collect();
    order.sort_by(|a, b| in_rotation[*b].1.cmp(&in_rotation[*a].1));
    for i in order {
        let (endpoint, latency) = &in_rotation[i];
        // Any one of equal values may stand for this endpoint: the others are the same multiset.
        let own = sorted.partition_point(|l| l < latency);
        let threshold = config.threshold(median_of(&sorted, Some(own)));
        if *latency <= threshold {
            if !above_since.is_empty() {
                above_since.remove(&endpoint.addr());
            }
            continue;
        }
        let since = *above_since.entry(endpoint.addr()).or_insert(now);
        if now.duration_since(since) >= config.window && may_eject > 0 {
            may_eject -= 1;
            above_since.remove(&endpoint.addr());
            verdicts.push((endpoint.clone(), fleet));
        }
    }
    verdicts
}

/// The median of `sorted` (ascending), leaving out the value at index `without` if given.
fn median_of(sorted: &[Duration], without: Option<usize>) -> Duration {
    let n = sorted.len() - usize::from(without.is_some_and(|k| k < sorted.len()));
    // The i-th value once `without` is left out.
    let at = |i: usize| match without {
        Some(k) if i >= k => sorted[i + 1],
        _ => sorted[i],
    };
    match n {
        0 => Duration::ZERO,
        n if n % 2 == 1 => at(n / 2),
        n => (at(n / 2 - 1) + at(n / 2)) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::accrual::AccrualConfig;
    use crate::balance::endpoint::EndpointState;
    use crate::health::{Gate, Health};

    fn endpoint(port: u16) -> Arc<Shared> {
        let gate = Gate::new();
        gate.set(Health::Serving);
        Shared::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            gate,
            AccrualConfig::default(),
            Default::default(),
        )
    }

    fn feed(e: &Shared, ms: u64, n: usize) {
        for _ in 0..n {
            e.test_finish_ok(Duration::from_millis(ms));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_a_slow_endpoint_only_after_the_window() {
        let config = OutlierConfig::default();
        let fleet: Vec<_> = (1..=3).map(endpoint).collect();
        feed(&fleet[0], 5, 10);
        feed(&fleet[1], 5, 10);
        feed(&fleet[2], 55, 10);
        let mut above = HashMap::new();
        let t0 = Instant::now();
        assert!(
            judge(&fleet, &config, &mut above, t0).is_empty(),
            "not before the window"
        );
        let later = t0 + config.window;
        let verdicts = judge(&fleet, &config, &mut above, later);
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].0.addr(), fleet[2].addr());
        verdicts[0].0.eject_for_latency(verdicts[0].1);
        crate::balance::testing::settle().await;
        assert_eq!(fleet[2].snapshot().state, EndpointState::EjectedLatency);
        assert_eq!(fleet[0].snapshot().state, EndpointState::Ready);
    }

    /// An endpoint back on a probe of the balancer's own holds no judged calls: it is left out
    /// of the fleet's median rather than counted as infinitely fast (which had made the healthy
    /// endpoint beside it look like an outlier).
    #[tokio::test(start_paused = true)]
    async fn an_estimate_that_started_over_empty_is_not_judged() {
        let config = OutlierConfig::default();
        let fleet: Vec<_> = (1..=2).map(endpoint).collect();
        feed(&fleet[0], 6, 10);
        feed(&fleet[1], 200, 10);
        fleet[1].test_forget();
        assert_eq!(fleet[1].latency(), (Duration::ZERO, 0));
        let mut above = HashMap::new();
        let t0 = Instant::now();
        judge(&fleet, &config, &mut above, t0);
        assert!(judge(&fleet, &config, &mut above, t0 + config.window * 10).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_uniformly_slow_fleet_keeps_everyone() {
        let config = OutlierConfig::default();
        let fleet: Vec<_> = (1..=3).map(endpoint).collect();
        for e in &fleet {
            feed(e, 80, 10);
        }
        let mut above = HashMap::new();
        let t0 = Instant::now();
        judge(&fleet, &config, &mut above, t0);
        assert!(judge(&fleet, &config, &mut above, t0 + config.window * 10).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_below_half_of_the_rotation() {
        let config = OutlierConfig::default();
        let fleet: Vec<_> = (1..=2).map(endpoint).collect();
        feed(&fleet[0], 1, 10);
        feed(&fleet[1], 50, 10);
        let mut above = HashMap::new();
        let t0 = Instant::now();
        judge(&fleet, &config, &mut above, t0);
        let verdicts = judge(&fleet, &config, &mut above, t0 + config.window);
        assert_eq!(verdicts.len(), 1, "one of two may go");
        verdicts[0].0.eject_for_latency(verdicts[0].1);
        crate::balance::testing::settle().await;
        // The fast one turns slow too: it is the last in rotation and stays.
        feed(&fleet[0], 500, 30);
        let t1 = t0 + config.window * 2;
        judge(&fleet, &config, &mut above, t1);
        assert!(judge(&fleet, &config, &mut above, t1 + config.window).is_empty());
        assert_eq!(fleet[0].snapshot().state, EndpointState::Ready);
    }

    #[test]
    fn the_median_of_the_others_is_read_off_one_sort() {
        fn naive(mut v: Vec<Duration>) -> Duration {
            v.sort();
            match v.len() {
                0 => Duration::ZERO,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2,
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for n in 1..40 {
            let values: Vec<Duration> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Few distinct values, so that ties are common.
                    Duration::from_millis(seed % 7)
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable();
            assert_eq!(
                median_of(&sorted, None),
                naive(values.clone()),
                "{values:?}"
            );
            for (i, v) in values.iter().enumerate() {
                let mut others = values.clone();
                others.remove(i);
                let own = sorted.partition_point(|l| l < v);
                assert_eq!(
                    median_of(&sorted, Some(own)),
                    naive(others),
                    "{values:?} without {i}"
                );
            }
        }
    }

    #[test]
    fn sub_millisecond_noise_is_not_an_outlier() {
        let config = OutlierConfig::default();
        let t = config.threshold(Duration::from_micros(300));
        assert!(t >= Duration::from_micros(2300));
    }
}
