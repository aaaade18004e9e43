//! Failure accrual: when to take an endpoint out of rotation, and when to try it again.
//!
//! `threshold` consecutive endpoint failures (a broken connection, `UNAVAILABLE`) eject it for a
//! backoff; then one call probes it: a good answer puts it back (and the backoff starts over), a
//! failure ejects it again for a longer backoff. The outlier detector ejects for latency the same
//! way; its probe must also be faster than the fleet's threshold. Ejections are jittered
//! ([`crate::backoff`], the same type as the health watch's and DNS's), so that the clients of
//! one fleet, which saw the same failures, do not all probe the endpoint at the same instant.
//! A stream error or a cancelled call says nothing about the endpoint: it neither counts nor
//! forgives. A probe of the balancer's own (a health check, where no call could be copied) puts
//! the endpoint back on trust: it answered, but not the callers' calls, so the backoff does not
//! start over, and the first call it answers is its trial: slower than the fleet's outlier
//! threshold, it is out again at once (not after the detector's window). Ejected again within the
//! longest backoff, it stays out twice as long as the last time, so an endpoint that is still
//! slow costs one caller now and then (every 15 to 30 s once the backoff is at its longest). A
//! return on trust from an ejection for failures has no trial: its failures will tell.
//!
//! [`Accrual`] is the decision, a plain state machine over outcomes and time. [`run`] is the task
//! that owns it, one per endpoint: it is told how calls ended ([`Event`], over a channel), keeps
//! the ejection's timer, and publishes what it decided to the endpoint's [`Gate`]. The call path
//! takes no lock for it, and sends only what can change a decision: every failure and probe, and
//! the first success after a failure.
//!
//! Knows call outcomes and time; nothing of connections, health or balancing.

use super::completion::Outcome;
pub use super::gate::Reason;
use super::gate::{Ejection, Gate};
use super::probe::Probe;
use crate::backoff::Backoff;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Failure accrual settings.
#[derive(Debug, Clone, Copy)]
pub struct AccrualConfig {
    /// Consecutive failures (transport errors or `UNAVAILABLE`) that eject an endpoint.
    pub threshold: u32,
    /// The first ejection's length (at most; each is drawn from the upper half of its bound);
    /// doubles while the endpoint keeps failing its probes.
    pub backoff_base: Duration,
    /// The longest ejection.
    pub backoff_max: Duration,
}

/// Consecutive endpoint failures that eject it, by default (Finagle's and Linkerd's 5).
pub const DEFAULT_THRESHOLD: u32 = 5;
/// The first ejection's bound, by default.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest ejection, by default.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for AccrualConfig {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// What accrual allows right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Any call.
    Yes,
    /// One call, as the probe.
    Probe,
    /// None until then.
    EjectedUntil(Instant),
}

/// One endpoint's accrual state.
#[derive(Debug)]
pub struct Accrual {
    threshold: u32,
    consecutive: u32,
    ejected_until: Option<Instant>,
    backoff: Backoff,
    probing: bool,
    reason: Option<Reason>,
    /// When a probe of the balancer's own last put it back (see the module's doc), and why it
    /// had been out.
    on_trust_since: Option<(Instant, Reason)>,
    /// How long a return on trust is remembered: the longest backoff.
    trust_window: Duration,
}

impl Accrual {
    /// In rotation, with no failures.
    pub fn new(config: AccrualConfig) -> Self {
        Self {
            threshold: config.threshold,
            consecutive: 0,
            ejected_until: None,
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            probing: false,
            reason: None,
            on_trust_since: None,
            trust_window: config.backoff_max,
        }
    }

    /// What may be sent now (ending an ejection whose time is up).
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let Some(until) = self.ejected_until {
            if now < until {
                return Admit::EjectedUntil(until);
            }
            self.ejected_until = None;
            self.probing = true;
        }
        if self.probing {
            Admit::Probe
        } else {
            Admit::Yes
        }
    }

    /// Takes the endpoint out as a latency outlier, unless it is out already or being probed.
    pub fn eject_for_latency(&mut self, now: Instant) -> bool {
        if self.is_out(now) || self.probing {
            return false;
        }
        self.eject(now, Reason::Latency, false);
        true
    }

    /// The first call after a return on trust was slower than the fleet's threshold: out again
    /// at once (not after the outlier detector's window), for twice the last backoff. False if
    /// it was not on trust, or is out already.
    pub fn fail_trial(&mut self, now: Instant) -> bool {
        let for_latency = matches!(self.on_trust_since, Some((_, Reason::Latency)));
        if !for_latency || self.is_out(now) || self.probing {
            return false;
        }
        self.eject(now, Reason::Latency, false);
        true
    }

    /// Takes the endpoint out: from the base backoff, or for about twice the last one after a
    /// failed probe.
    fn eject(&mut self, now: Instant, reason: Reason, again: bool) {
        let on_trust = self
            .on_trust_since
            .take()
            .is_some_and(|(since, _)| now.saturating_duration_since(since) < self.trust_window);
        if !again && !on_trust {
            self.backoff.reset();
        }
        self.ejected_until = Some(now + self.backoff.next_delay());
        self.probing = false;
        self.reason = Some(reason);
    }

    /// A call ended with `outcome`; `probe_too_slow`: the call was slower than the fleet's
    /// outlier threshold.
    pub fn record(
        &mut self,
        outcome: Outcome,
        probe: Option<Probe>,
        probe_too_slow: bool,
        now: Instant,
    ) {
        let was_probe = probe.is_some();
        match outcome {
            // Says nothing about the endpoint: no reset of the count, no verdict on a probe (the
            // next call probes again). A reset stream is one call's problem (see `failure`).
            Outcome::Cancelled | Outcome::StreamError(_) => {}
            o if o.is_endpoint_failure() => {
                self.consecutive = self.consecutive.saturating_add(1);
                if was_probe {
                    self.eject(now, Reason::Failures, true);
                } else if !self.probing
                    && self.ejected_until.is_none()
                    && self.consecutive >= self.threshold
                {
                    self.eject(now, Reason::Failures, false);
                }
            }
            _ => {
                self.consecutive = 0;
                // A probe the server gave up on (its deadline, or the copy's own) did not show
                // the endpoint able to answer: out again, for the same reason.
                let timed_out = matches!(
                    outcome,
                    Outcome::Status(tonic::Code::Cancelled | tonic::Code::DeadlineExceeded)
                );
                if was_probe {
                    if timed_out {
                        let reason = self.reason.unwrap_or(Reason::Failures);
                        self.eject(now, reason, true);
                    } else if probe_too_slow && self.reason == Some(Reason::Latency) {
                        self.eject(now, Reason::Latency, true);
                    } else {
                        self.probing = false;
                        let reason = self.reason.take().unwrap_or(Reason::Failures);
                        if matches!(probe, Some(Probe::Own { .. })) {
                            self.on_trust_since = Some((now, reason));
                        } else {
                            self.backoff.reset();
                        }
                    }
                }
            }
        }
    }

    /// Whether it is ejected at `now`.
    pub fn is_out(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Why it is (or was last) out.
    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }
}

/// What an endpoint tells its accrual task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A call ended.
    Ended {
        /// How it ended.
        outcome: Outcome,
        /// Whether it was the probe, and whose.
        probe: Option<Probe>,
        /// How soon it was answered (what judges a probe of a latency ejection).
        latency: Duration,
        /// The first call answered since a probe of the balancer's own let the endpoint back.
        trial: bool,
    },
    /// The outlier detector found the endpoint too slow: a probe must answer within `threshold`.
    LatencyOutlier {
        /// The fleet's outlier threshold.
        threshold: Duration,
    },
    /// The fleet's outlier threshold now, while the endpoint is judged for latency.
    Threshold(Duration),
}

/// One endpoint's failure accrual, until every sender of `events` is gone.
pub async fn run(
    gate: Arc<Gate>,
    mut accrual: Accrual,
    mut events: mpsc::UnboundedReceiver<Event>,
    addr: SocketAddr,
) {
    let mut until: Option<Instant> = None;
    // What a probe of a latency ejection must answer within.
    let mut threshold: Option<Duration> = None;
    loop {
        let event = match until {
            Some(at) => tokio::select! {
                event = events.recv() => event,
                () = tokio::time::sleep_until(at) => {
                    until = publish(&gate, &mut accrual, false);
                    continue;
                }
            },
            None => events.recv().await,
        };
        let Some(event) = event else { return };
        let now = Instant::now();
        let probe_ended = match event {
            Event::Ended {
                outcome,
                probe,
                latency,
                trial,
            } => {
                let was_out = accrual.is_out(now);
                let too_slow = threshold.is_some_and(|t| latency > t);
                accrual.record(outcome, probe, too_slow, now);
                if trial && too_slow && accrual.fail_trial(now) {
                    tracing::info!(%addr, ?latency, "still slow after a return on trust: ejected");
                } else if !was_out && accrual.is_out(now) && probe.is_none() {
                    tracing::info!(%addr, "ejected after consecutive failures");
                }
                probe.is_some()
            }
            Event::LatencyOutlier { threshold: fleet } => {
                if accrual.eject_for_latency(now) {
                    threshold = Some(fleet);
                    tracing::info!(%addr, ?fleet, "ejected as a latency outlier");
                }
                false
            }
            Event::Threshold(fleet) => {
                threshold = Some(fleet);
                continue;
            }
        };
        until = publish(&gate, &mut accrual, probe_ended);
    }
}

/// Tells the gate what `accrual` decides now; returns when the ejection, if any, ends.
fn publish(gate: &Gate, accrual: &mut Accrual, probe_ended: bool) -> Option<Instant> {
    let reason = accrual.reason().unwrap_or(Reason::Failures);
    let (ejection, until) = match accrual.admit(Instant::now()) {
        Admit::Yes => (Ejection::None, None),
        Admit::Probe => (Ejection::Probe(reason), None),
        Admit::EjectedUntil(at) => (Ejection::Out(reason), Some(at)),
    };
    gate.set_ejection(ejection, probe_ended);
    until
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::settle;
    use tonic::Code;

    fn accrual() -> Accrual {
        Accrual::new(AccrualConfig {
            threshold: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        })
    }

    impl Accrual {
        fn record_plain(&mut self, outcome: Outcome, was_probe: bool, now: Instant) {
            self.record(outcome, was_probe.then_some(Probe::Copy), false, now);
        }
    }

    /// The end of the ejection `admit` reports, as a length from `now`.
    fn ejected_for(a: &mut Accrual, now: Instant) -> Duration {
        match a.admit(now) {
            Admit::EjectedUntil(until) => until - now,
            other => panic!("expected an ejection, got {other:?}"),
        }
    }

    /// Within the upper half of `bound`, as the jittered backoff draws it.
    fn jittered(length: Duration, bound: Duration) -> bool {
        length >= bound / 2 && length <= bound
    }

    #[tokio::test(start_paused = true)]
    async fn stream_errors_neither_eject_nor_forgive() {
        let mut a = accrual();
        let now = Instant::now();
        for _ in 0..10 {
            a.record_plain(Outcome::StreamError(Code::Internal), false, now);
        }
        assert!(!a.is_out(now), "resets alone never eject");
        a.record_plain(Outcome::Broken, false, now);
        a.record_plain(Outcome::Broken, false, now);
        // A reset in between does not wipe the count of real failures.
        a.record_plain(Outcome::StreamError(Code::Internal), false, now);
        a.record_plain(Outcome::Broken, false, now);
        assert!(a.is_out(now), "three connection failures eject");
        // Nor does a reset on the probe end the ejection's verdict.
        let later = now + Duration::from_secs(2);
        assert_eq!(a.admit(later), Admit::Probe);
        a.record_plain(Outcome::StreamError(Code::Internal), true, later);
        assert_eq!(
            a.admit(later),
            Admit::Probe,
            "still probing after an inconclusive probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_keeps_a_latency_ejection_and_a_fast_one_ends_it() {
        let mut a = accrual();
        let t0 = Instant::now();
        assert!(a.eject_for_latency(t0));
        assert!(!a.eject_for_latency(t0), "out already");
        let first = ejected_for(&mut a, t0);
        assert!(jittered(first, Duration::from_secs(1)), "{first:?}");
        let t1 = t0 + first;
        assert_eq!(a.admit(t1), Admit::Probe);
        a.record(Outcome::Ok, Some(Probe::Copy), true, t1);
        let second = ejected_for(&mut a, t1);
        assert!(
            jittered(second, Duration::from_secs(2)),
            "a slow probe doubles the ejection: {second:?}"
        );
        let t2 = t1 + second;
        assert_eq!(a.admit(t2), Admit::Probe);
        a.record(Outcome::Ok, Some(Probe::Copy), false, t2);
        assert_eq!(a.admit(t2), Admit::Yes);
        assert_eq!(a.reason(), None);
    }

    /// Back on the balancer's own probe, an endpoint ejected again soon after stays out twice as
    /// long; past the longest backoff, or after a copy's pass, the backoff starts over.
    #[tokio::test(start_paused = true)]
    async fn a_return_on_trust_keeps_the_backoff_growing() {
        let own = Some(Probe::Own { health: true });
        let mut a = accrual();
        let t0 = Instant::now();
        assert!(a.eject_for_latency(t0));
        let t1 = t0 + ejected_for(&mut a, t0);
        assert_eq!(a.admit(t1), Admit::Probe);
        a.record(Outcome::Ok, own, false, t1);
        assert_eq!(a.admit(t1), Admit::Yes, "back");
        // Slow again at once: out for the second bound, not the first.
        let t2 = t1 + Duration::from_millis(300);
        assert!(a.eject_for_latency(t2));
        let second = ejected_for(&mut a, t2);
        assert!(jittered(second, Duration::from_secs(2)), "{second:?}");
        let t3 = t2 + second;
        assert_eq!(a.admit(t3), Admit::Probe);
        a.record(Outcome::Ok, own, false, t3);
        // Its first call's answer is its trial; failed, it is out for the third bound.
        assert!(a.fail_trial(t3 + Duration::from_millis(60)));
        let t3b = t3 + Duration::from_millis(60);
        let trial_failed = ejected_for(&mut a, t3b);
        assert!(
            jittered(trial_failed, Duration::from_secs(4)),
            "{trial_failed:?}"
        );
        assert!(!a.fail_trial(t3b), "out already");
        let t3 = t3b + trial_failed;
        assert_eq!(a.admit(t3), Admit::Probe);
        a.record(Outcome::Ok, own, false, t3);
        // In rotation longer than the longest backoff (8 s here): forgiven.
        let t4 = t3 + Duration::from_secs(9);
        assert!(a.eject_for_latency(t4));
        let third = ejected_for(&mut a, t4);
        assert!(jittered(third, Duration::from_secs(1)), "{third:?}");
        // A copy's pass is proof: the backoff starts over even when ejected again at once.
        let t5 = t4 + third;
        assert_eq!(a.admit(t5), Admit::Probe);
        a.record(Outcome::Ok, own, true, t5);
        let doubled = ejected_for(&mut a, t5);
        assert!(jittered(doubled, Duration::from_secs(2)), "{doubled:?}");
        let t6 = t5 + doubled;
        assert_eq!(a.admit(t6), Admit::Probe);
        a.record(Outcome::Ok, Some(Probe::Copy), false, t6);
        assert!(!a.fail_trial(t6), "a copy's pass puts it back for good");
        assert!(a.eject_for_latency(t6));
        let fresh = ejected_for(&mut a, t6);
        assert!(jittered(fresh, Duration::from_secs(1)), "{fresh:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_timed_out_ejects_again_for_its_reason() {
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            let mut a = accrual();
            let t0 = Instant::now();
            assert!(a.eject_for_latency(t0));
            let t1 = t0 + ejected_for(&mut a, t0);
            assert_eq!(a.admit(t1), Admit::Probe);
            // Quick, because the server gave up at once: still no verdict of "fast".
            a.record(Outcome::Status(code), Some(Probe::Copy), false, t1);
            let second = ejected_for(&mut a, t1);
            assert!(jittered(second, Duration::from_secs(2)), "{second:?}");
            assert_eq!(a.reason(), Some(Reason::Latency));
            // Not a probe: a deadline is the caller's business, and forgives nothing either way.
            let t2 = t1 + second;
            assert_eq!(a.admit(t2), Admit::Probe);
            a.record(Outcome::Ok, Some(Probe::Copy), false, t2);
            a.record_plain(Outcome::Status(code), false, t2);
            assert_eq!(a.admit(t2), Admit::Yes);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_threshold_then_probes_and_doubles() {
        let mut a = accrual();
        let t0 = Instant::now();
        let fail = Outcome::Status(Code::Unavailable);
        a.record_plain(fail, false, t0);
        a.record_plain(Outcome::Status(Code::NotFound), false, t0);
        a.record_plain(fail, false, t0);
        assert_eq!(a.admit(t0), Admit::Yes, "NOT_FOUND reset the run");
        a.record_plain(fail, false, t0);
        a.record_plain(fail, false, t0);
        let first = ejected_for(&mut a, t0);
        assert!(jittered(first, Duration::from_secs(1)), "{first:?}");

        let t1 = t0 + first;
        assert_eq!(a.admit(t1), Admit::Probe);
        a.record_plain(Outcome::Broken, true, t1);
        let second = ejected_for(&mut a, t1);
        assert!(jittered(second, Duration::from_secs(2)), "{second:?}");

        let t2 = t1 + second;
        assert_eq!(a.admit(t2), Admit::Probe);
        a.record_plain(Outcome::Ok, true, t2);
        assert_eq!(a.admit(t2), Admit::Yes);
        // The backoff starts over after a good probe.
        for _ in 0..3 {
            a.record_plain(Outcome::Broken, false, t2);
        }
        let again = ejected_for(&mut a, t2);
        assert!(jittered(again, Duration::from_secs(1)), "{again:?}");
        assert_eq!(a.reason(), Some(Reason::Failures));
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_shuts_the_gate_then_offers_one_probe_when_the_backoff_ends() {
        let health = crate::health::Gate::new();
        health.set(crate::health::Health::Serving);
        let gate = Arc::new(Gate::new(health));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            gate.clone(),
            accrual(),
            rx,
            SocketAddr::from(([127, 0, 0, 1], 1)),
        ));
        let ended = |outcome, probe: bool| Event::Ended {
            outcome,
            probe: probe.then_some(Probe::Copy),
            latency: Duration::from_millis(1),
            trial: false,
        };
        for _ in 0..3 {
            tx.send(ended(Outcome::Broken, false)).unwrap();
        }
        settle().await;
        assert_eq!(gate.ejection(), Ejection::Out(Reason::Failures));
        assert!(!gate.in_rotation());
        // The backoff is at most its 1 s bound: then one probe.
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(gate.ejection(), Ejection::Probe(Reason::Failures));
        assert!(gate.take_probe());
        tx.send(ended(Outcome::Ok, true)).unwrap();
        settle().await;
        assert_eq!(gate.ejection(), Ejection::None);
        assert_eq!(gate.ejections(), [1, 0]);

        tx.send(Event::LatencyOutlier {
            threshold: Duration::from_millis(10),
        })
        .unwrap();
        settle().await;
        assert_eq!(gate.ejection(), Ejection::Out(Reason::Latency));
        assert_eq!(gate.ejections(), [1, 1]);
        // Its probe is judged against the threshold, the latest the detector sent.
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(gate.take_probe());
        let probe = |ms| Event::Ended {
            outcome: Outcome::Ok,
            probe: Some(Probe::Copy),
            latency: Duration::from_millis(ms),
            trial: false,
        };
        tx.send(probe(15)).unwrap();
        settle().await;
        assert_eq!(gate.ejection(), Ejection::Out(Reason::Latency), "too slow");
        // The whole fleet slowed: 15 ms is within its threshold now.
        tx.send(Event::Threshold(Duration::from_millis(20)))
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert!(gate.take_probe());
        tx.send(probe(15)).unwrap();
        settle().await;
        assert_eq!(gate.ejection(), Ejection::None);
        drop(tx);
        settle().await;
        assert!(task.is_finished(), "the task ends with its endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let mut a = accrual();
        let mut now = Instant::now();
        for _ in 0..3 {
            a.record_plain(Outcome::Broken, false, now);
        }
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = ejected_for(&mut a, now);
            assert!(last <= Duration::from_secs(8), "{last:?}");
            now += last;
            assert_eq!(a.admit(now), Admit::Probe);
            a.record_plain(Outcome::Broken, true, now);
        }
        assert!(jittered(last, Duration::from_secs(8)), "{last:?}");
    }
}
