//! One latency estimate per endpoint: where every call's round-trip time lands, read two ways.
//!
//! - **For choosing** ([`Latency::cost`], what p2c compares): peak-EWMA, computed as tower's
//!   `PeakEwma` and linkerd2-proxy compute it. A sample above the estimate replaces it at once, so
//!   an endpoint that slows down is avoided from its first slow answer; a sample below moves the
//!   estimate toward it by how much time passed since the last update, relative to `decay`.
//!   Reading the estimate decays it toward zero the same way, so an endpoint nobody chose for a
//!   while gets tried again. The cost is the estimate times (calls in flight + 1).
//! - **For judging** ([`Latency::smoothed`], what outlier ejection compares and `endpoints()`
//!   shows): a moving average of successful calls, one fifth per sample. Judging by the peak
//!   would eject on one scheduling hiccup: at a 10 s decay a single 50 ms answer among 2 ms ones
//!   holds the peak above a 6 ms outlier threshold for about 20 s.
//!
//! A probe's answer restarts both (the estimate from before an ejection says nothing about now):
//! a recovered endpoint is chosen again at once, instead of waiting for an old peak to decay. A
//! probe of the balancer's own is another method's time: it restarts only the judging view, and
//! the peak from before the ejection decays as usual (restarting it from a health check's
//! sub-millisecond answer had p2c send a still-slow endpoint most calls until its first answer).
//!
//! Both views are fed by one call to [`Latency::end`] per call: one lock, one clock reading.
//! (tower's `PeakEwma` kept its estimate beside the endpoint's own average: two locks, two clock
//! readings, and two answers to "how fast is this endpoint".)
//!
//! Knows durations and time; nothing of calls, connections or ejection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The peak-EWMA settings.
#[derive(Debug, Clone, Copy)]
pub struct EwmaConfig {
    /// The latency assumed for an endpoint before it has answered.
    pub default_rtt: Duration,
    /// How fast a latency peak decays back toward the average.
    pub decay: Duration,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        // linkerd2-proxy's defaults.
        Self {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// How much of a new sample the smoothed view takes.
const SMOOTHING: f64 = 0.2;

/// What p2c compares: lower is better.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
pub struct Cost(f64);

/// Whole nanoseconds (times the calls in flight, plus one): tower's p2c formats two costs into
/// every sampled call's trace, and a float's shortest form costs several times an integer's.
impl std::fmt::Debug for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ns", self.0 as u64)
    }
}

impl Cost {
    /// Below any endpoint's: what an endpoint offering a probe costs, so that p2c sends the probe
    /// at its next comparison instead of starving it behind the estimate from before the ejection.
    pub const NONE: Cost = Cost(0.0);
}

/// What a call's end tells the smoothed view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Nothing: the call failed or was cancelled, so its time says nothing of the endpoint's speed.
    Skip,
    /// A successful call's time.
    Add,
    /// A probe's time: both views start over from it (what they held is from before the
    /// ejection, and says nothing about now).
    Restart,
    /// A probe of the balancer's own answered: its time is another method's, so it says the
    /// endpoint is back but not how fast its calls are. The judging view starts over with
    /// nothing (the outlier detector waits for a call of the endpoint's own); the peak stays
    /// what its calls last made it, so p2c tries it again as that decays, one call at a time.
    Forget,
}

/// One endpoint's latency estimate.
#[derive(Debug)]
pub struct Latency {
    pending: AtomicU32,
    state: Mutex<State>,
    decay_ns: f64,
}

#[derive(Debug)]
struct State {
    peak_ns: f64,
    updated: Instant,
    /// Microseconds; zero until the first judged call.
    smoothed_us: f64,
    /// Successful calls in the smoothed view since it last started over.
    judged: u64,
}

impl State {
    /// tower's peak-EWMA update, for a sample of `rtt_ns` taken at `at`.
    fn update(&mut self, rtt_ns: f64, at: Instant, decay_ns: f64) {
        if self.peak_ns < rtt_ns {
            self.peak_ns = rtt_ns;
        } else {
            let elapsed = at.saturating_duration_since(self.updated).as_nanos() as f64;
            let decay = (-elapsed / decay_ns).exp();
            self.peak_ns = self.peak_ns * decay + rtt_ns * (1.0 - decay);
        }
        self.updated = at;
    }
}

impl Latency {
    /// An endpoint assumed to answer in `config.default_rtt` until it has.
    pub fn new(config: EwmaConfig) -> Self {
        Self {
            pending: AtomicU32::new(0),
            state: Mutex::new(State {
                peak_ns: config.default_rtt.as_nanos() as f64,
                updated: Instant::now(),
                smoothed_us: 0.0,
                judged: 0,
            }),
            // A zero decay would divide zero by zero; a nanosecond already forgets at once.
            decay_ns: (config.decay.as_nanos() as f64).max(1.0),
        }
    }

    /// A call started: it counts in the cost until [`Latency::end`].
    pub fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// A call [`Latency::start`] counted ended at `now`, after `rtt`.
    pub fn end(&self, rtt: Duration, judged: Judged, now: Instant) {
        // Saturating: an `end` without its `start` must not wrap the count to 4 billion.
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let mut state = lock(&self.state);
        if judged == Judged::Forget {
            state.smoothed_us = 0.0;
            state.judged = 0;
            return;
        }
        if judged == Judged::Restart {
            state.peak_ns = 0.0;
        }
        state.update(rtt.as_nanos() as f64, now, self.decay_ns);
        let us = rtt.as_micros() as f64;
        state.judged = match judged {
            Judged::Skip | Judged::Forget => state.judged,
            Judged::Restart => 1,
            Judged::Add => state.judged.saturating_add(1),
        };
        state.smoothed_us = match judged {
            Judged::Skip | Judged::Forget => state.smoothed_us,
            Judged::Restart => us,
            Judged::Add if state.smoothed_us == 0.0 => us,
            Judged::Add => state.smoothed_us * (1.0 - SMOOTHING) + us * SMOOTHING,
        };
    }

    /// The cost of sending this endpoint one more call at `now`.
    pub fn cost(&self, now: Instant) -> Cost {
        let pending = self.pending.load(Ordering::Relaxed);
        let mut state = lock(&self.state);
        // Time passing without answers pulls the peak toward zero, as if zero-length samples came.
        state.update(0.0, now, self.decay_ns);
        Cost(state.peak_ns * f64::from(pending.saturating_add(1)))
    }

    /// The smoothed latency of its successful calls; zero before the first.
    pub fn smoothed(&self) -> Duration {
        Duration::from_micros(lock(&self.state).smoothed_us as u64)
    }

    /// The smoothed latency, and how many successful calls it holds since it last started
    /// over (an endpoint back on a probe of the balancer's own holds none: it is not judged
    /// until its callers' calls say how fast it is).
    pub fn judged(&self) -> (Duration, u64) {
        let state = lock(&self.state);
        (
            Duration::from_micros(state.smoothed_us as u64),
            state.judged,
        )
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain numbers; they are still
/// usable, and the request path must not panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cost_reads_as_whole_nanoseconds() {
        assert_eq!(format!("{:?}", Cost(1_234_567.89)), "1234567ns");
        assert_eq!(format!("{:?}", Cost::NONE), "0ns");
    }

    const MS: Duration = Duration::from_millis(1);

    fn latency() -> Latency {
        Latency::new(EwmaConfig::default())
    }

    fn ms(cost: Cost) -> f64 {
        cost.0 / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_costs_the_default_rtt() {
        let l = latency();
        assert_eq!(ms(l.cost(Instant::now())), 30.0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_answer_raises_the_cost_at_once_and_time_brings_it_back() {
        let l = latency();
        l.start();
        l.end(2 * MS, Judged::Add, Instant::now());
        // Long after the default: fast answers have replaced it.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            l.start();
            l.end(2 * MS, Judged::Add, Instant::now());
        }
        assert!(
            ms(l.cost(Instant::now())) < 2.5,
            "{:?}",
            l.cost(Instant::now())
        );

        l.start();
        l.end(50 * MS, Judged::Add, Instant::now());
        assert_eq!(ms(l.cost(Instant::now())), 50.0, "a peak counts in full");

        // Fast answers after it bring the cost down with time, not with their number.
        for _ in 0..100 {
            tokio::time::advance(10 * MS).await;
            l.start();
            l.end(2 * MS, Judged::Add, Instant::now());
        }
        let after_one_second = ms(l.cost(Instant::now()));
        assert!(
            (40.0..50.0).contains(&after_one_second),
            "{after_one_second}"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(ms(l.cost(Instant::now())) < 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn another_methods_time_forgets_the_judgement_but_not_the_peak() {
        let l = latency();
        for _ in 0..5 {
            l.start();
            l.end(50 * MS, Judged::Add, Instant::now());
        }
        l.start();
        l.end(MS, Judged::Forget, Instant::now());
        assert_eq!(
            ms(l.cost(Instant::now())),
            50.0,
            "the peak, not the probe's 1 ms"
        );
        assert_eq!(l.judged(), (Duration::ZERO, 0), "nothing to judge it by");
        l.start();
        l.end(2 * MS, Judged::Add, Instant::now());
        assert_eq!(
            l.judged(),
            (2 * MS, 1),
            "the first call after is the average"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_multiply_the_cost() {
        let l = latency();
        let idle = ms(l.cost(Instant::now()));
        l.start();
        l.start();
        let busy = ms(l.cost(Instant::now()));
        assert!((busy / idle - 3.0).abs() < 1e-6, "{idle} {busy}");
        l.end(30 * MS, Judged::Skip, Instant::now());
        l.end(30 * MS, Judged::Skip, Instant::now());
        l.end(30 * MS, Judged::Skip, Instant::now());
        assert!(
            (ms(l.cost(Instant::now())) - idle).abs() < 1e-6,
            "an unmatched end does not wrap the count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_smoothed_view_takes_a_fifth_of_each_success_and_starts_over_at_a_probe() {
        let l = latency();
        assert_eq!(l.smoothed(), Duration::ZERO);
        l.start();
        l.end(10 * MS, Judged::Add, Instant::now());
        assert_eq!(l.smoothed(), 10 * MS, "the first sample is the average");
        l.start();
        l.end(60 * MS, Judged::Add, Instant::now());
        assert_eq!(l.smoothed(), 20 * MS);
        l.start();
        l.end(500 * MS, Judged::Skip, Instant::now());
        assert_eq!(l.smoothed(), 20 * MS, "a failed call's time is not judged");
        l.start();
        l.end(3 * MS, Judged::Restart, Instant::now());
        assert_eq!(l.smoothed(), 3 * MS);
        assert_eq!(ms(l.cost(Instant::now())), 3.0, "the peak starts over too");
    }
}
