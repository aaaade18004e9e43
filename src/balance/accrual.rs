//! Failure accrual: when to take an endpoint out of rotation, and when to try it again.
//!
//! `threshold` consecutive endpoint failures (a broken connection, `UNAVAILABLE`) eject it for a
//! backoff; then one call probes it: a good answer puts it back (and the backoff starts over), a
//! failure ejects it again for a longer backoff. The outlier detector ejects for latency the same
//! way; its probe must also be faster than the fleet's threshold. Ejections are jittered
//! ([`crate::backoff`], the same type as the health watch's and DNS's), so that the clients of
//! one fleet, which saw the same failures, do not all probe the endpoint at the same instant.
//! A stream error or a cancelled call says nothing about the endpoint: it neither counts nor
//! forgives.
//!
//! Knows call outcomes and time; nothing of connections, health or balancing.

use super::completion::Outcome;
use crate::backoff::Backoff;
use std::time::Duration;
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

/// Why an endpoint is out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Consecutive failures.
    Failures,
    /// A latency outlier.
    Latency,
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
    /// None until the probe in flight has answered.
    ProbeInFlight,
}

/// One endpoint's accrual state.
#[derive(Debug)]
pub struct Accrual {
    threshold: u32,
    consecutive: u32,
    ejected_until: Option<Instant>,
    backoff: Backoff,
    probing: bool,
    probe_in_flight: bool,
    reason: Option<Reason>,
    /// Ejections so far, for failures and for latency.
    ejections: [u64; 2],
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
            probe_in_flight: false,
            reason: None,
            ejections: [0; 2],
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
        match (self.probing, self.probe_in_flight) {
            (false, _) => Admit::Yes,
            (true, false) => Admit::Probe,
            (true, true) => Admit::ProbeInFlight,
        }
    }

    /// The probe `admit` allowed is on its way.
    pub fn probe_sent(&mut self) {
        self.probe_in_flight = true;
    }

    /// Takes the endpoint out as a latency outlier, unless it is out already or being probed.
    pub fn eject_for_latency(&mut self, now: Instant) -> bool {
        if self.is_out(now) || self.probing {
            return false;
        }
        self.eject(now, Reason::Latency, false);
        true
    }

    /// Takes the endpoint out: from the base backoff, or for about twice the last one after a
    /// failed probe.
    fn eject(&mut self, now: Instant, reason: Reason, again: bool) {
        if !again {
            self.backoff.reset();
        }
        self.ejected_until = Some(now + self.backoff.next_delay());
        self.probing = false;
        self.reason = Some(reason);
        self.ejections[reason as usize] += 1;
    }

    /// A call ended with `outcome`; `probe_too_slow`: the call was slower than the fleet's
    /// outlier threshold.
    pub fn record(
        &mut self,
        outcome: Outcome,
        was_probe: bool,
        probe_too_slow: bool,
        now: Instant,
    ) {
        if was_probe {
            self.probe_in_flight = false;
        }
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
                        self.backoff.reset();
                        self.reason = None;
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

    /// Ejections so far: for failures, for latency.
    pub fn ejections(&self) -> [u64; 2] {
        self.ejections
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            self.record(outcome, was_probe, false, now);
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
        a.probe_sent();
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
        a.probe_sent();
        a.record(Outcome::Ok, true, true, t1);
        let second = ejected_for(&mut a, t1);
        assert!(
            jittered(second, Duration::from_secs(2)),
            "a slow probe doubles the ejection: {second:?}"
        );
        let t2 = t1 + second;
        assert_eq!(a.admit(t2), Admit::Probe);
        a.probe_sent();
        a.record(Outcome::Ok, true, false, t2);
        assert_eq!(a.admit(t2), Admit::Yes);
        assert_eq!(a.reason(), None);
        assert_eq!(a.ejections(), [0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_timed_out_ejects_again_for_its_reason() {
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            let mut a = accrual();
            let t0 = Instant::now();
            assert!(a.eject_for_latency(t0));
            let t1 = t0 + ejected_for(&mut a, t0);
            assert_eq!(a.admit(t1), Admit::Probe);
            a.probe_sent();
            // Quick, because the server gave up at once: still no verdict of "fast".
            a.record(Outcome::Status(code), true, false, t1);
            let second = ejected_for(&mut a, t1);
            assert!(jittered(second, Duration::from_secs(2)), "{second:?}");
            assert_eq!(a.reason(), Some(Reason::Latency));
            // Not a probe: a deadline is the caller's business, and forgives nothing either way.
            let t2 = t1 + second;
            assert_eq!(a.admit(t2), Admit::Probe);
            a.probe_sent();
            a.record(Outcome::Ok, true, false, t2);
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
        a.probe_sent();
        assert_eq!(a.admit(t1), Admit::ProbeInFlight);
        a.record_plain(Outcome::Broken, true, t1);
        let second = ejected_for(&mut a, t1);
        assert!(jittered(second, Duration::from_secs(2)), "{second:?}");

        let t2 = t1 + second;
        assert_eq!(a.admit(t2), Admit::Probe);
        a.probe_sent();
        a.record_plain(Outcome::Ok, true, t2);
        assert_eq!(a.admit(t2), Admit::Yes);
        // The backoff starts over after a good probe.
        for _ in 0..3 {
            a.record_plain(Outcome::Broken, false, t2);
        }
        let again = ejected_for(&mut a, t2);
        assert!(jittered(again, Duration::from_secs(1)), "{again:?}");
        assert_eq!(a.ejections(), [3, 0]);
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
            a.probe_sent();
            a.record_plain(Outcome::Broken, true, now);
        }
        assert!(jittered(last, Duration::from_secs(8)), "{last:?}");
    }
}
