//! The gate in front of one endpoint: open, limited to one probe, or shut.
//!
//! It is the one place that says whether an endpoint may get a call. Two deciders write to it and
//! know nothing of each other:
//! - the health watch ([`crate::health`]), through the health signal the gate holds: shut while the
//!   endpoint is not `SERVING` or its connection is down;
//! - the accrual task ([`super::accrual::run`]), which ejects for consecutive failures and, when
//!   the outlier detector asks, for latency: shut for a backoff, then limited to one probe, then
//!   open again or shut for longer.
//!
//! The endpoint's `poll_ready` asks [`Gate::poll_admit`] and nothing else; `endpoints()`, the
//! registry's "is anything ready" and the detectors read [`Gate::in_rotation`]. Reading takes no
//! lock, and only a change wakes the endpoint.
//!
//! Knows health and ejection states; nothing of calls, latency or balancing.

use crate::health::{self, Health};
use futures::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// Why an endpoint is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Consecutive failures.
    Failures = 0,
    /// A latency outlier.
    Latency = 1,
}

/// What the accrual task decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Not ejected: any call may go.
    None,
    /// Ejected: no call may go.
    Out(Reason),
    /// The ejection's time is up: one call may go, as the probe.
    Probe(Reason),
}

impl Ejection {
    fn to_u8(self) -> u8 {
        match self {
            Ejection::None => 0,
            Ejection::Out(r) => 1 + r as u8,
            Ejection::Probe(r) => 3 + r as u8,
        }
    }

    fn from_u8(v: u8) -> Self {
        let reason = |v| {
            if v == 0 {
                Reason::Failures
            } else {
                Reason::Latency
            }
        };
        match v {
            1 | 2 => Ejection::Out(reason(v - 1)),
            3 | 4 => Ejection::Probe(reason(v - 3)),
            _ => Ejection::None,
        }
    }
}

/// What the gate lets through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Any call.
    Any,
    /// One call, as the probe: take it with [`Gate::take_probe`].
    Probe,
}

/// One endpoint's gate.
#[derive(Debug)]
pub struct Gate {
    health: Arc<health::Gate>,
    ejection: AtomicU8,
    /// The one probe of a `Probe` state has been sent.
    probe_taken: AtomicBool,
    waker: AtomicWaker,
    /// Ejections so far, by [`Reason`].
    ejections: [AtomicU64; 2],
}

impl Gate {
    /// A gate that follows `health` and is not ejected.
    pub fn new(health: Arc<health::Gate>) -> Self {
        Self {
            health,
            ejection: AtomicU8::new(0),
            probe_taken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            ejections: Default::default(),
        }
    }

    /// The health signal it follows.
    pub fn health(&self) -> &Arc<health::Gate> {
        &self.health
    }

    /// The accrual task's current decision.
    pub fn ejection(&self) -> Ejection {
        Ejection::from_u8(self.ejection.load(Ordering::Acquire))
    }

    /// Ready with what may be sent; otherwise registers `cx` to be woken by a change.
    pub fn poll_admit(&self, cx: &mut Context<'_>) -> Poll<Admit> {
        ready!(self.health.poll_open(cx));
        self.waker.register(cx.waker());
        match self.ejection() {
            Ejection::None => Poll::Ready(Admit::Any),
            Ejection::Out(_) => Poll::Pending,
            Ejection::Probe(_) if self.probe_taken.load(Ordering::Acquire) => Poll::Pending,
            Ejection::Probe(_) => Poll::Ready(Admit::Probe),
        }
    }

    /// Takes the probe [`Admit::Probe`] offered; `false` if it was taken already (the offer is
    /// then void, and the call waits like any other).
    pub fn take_probe(&self) -> bool {
        !self.probe_taken.swap(true, Ordering::AcqRel)
    }

    /// Whether a probe is on offer and not yet taken. The balancer asks this of an endpoint that
    /// sits in its ready set: tower's ready cache polls a ready endpoint again only once it is
    /// chosen, so an endpoint ejected while it was ready (and too costly to be chosen) would
    /// otherwise never see its probe's turn come, until its old cost decayed.
    pub fn offers_probe(&self) -> bool {
        matches!(self.ejection(), Ejection::Probe(_)) && !self.probe_taken.load(Ordering::Acquire)
    }

    /// Whether it is offered to the balancer (serving and not ejected, probing or not).
    pub fn in_rotation(&self) -> bool {
        self.health.health() == Health::Serving && !matches!(self.ejection(), Ejection::Out(_))
    }

    /// Whether a caller's call may go there: serving, and neither ejected nor on probation
    /// (where only its probe goes).
    pub fn open_to_callers(&self) -> bool {
        self.health.health() == Health::Serving && self.ejection() == Ejection::None
    }

    /// Ejections so far: for failures, for latency.
    pub fn ejections(&self) -> [u64; 2] {
        [0, 1].map(|i| self.ejections[i].load(Ordering::Relaxed))
    }

    /// Publishes the accrual task's decision. `probe_ended`: the probe sent under the last
    /// `Probe` has answered, so a `Probe` now offers a new one.
    pub(super) fn set_ejection(&self, ejection: Ejection, probe_ended: bool) {
        let before = Ejection::from_u8(self.ejection.swap(ejection.to_u8(), Ordering::AcqRel));
        let entered_probe = matches!(ejection, Ejection::Probe(_))
            && (probe_ended || !matches!(before, Ejection::Probe(_)));
        if entered_probe {
            self.probe_taken.store(false, Ordering::Release);
        }
        if let Ejection::Out(reason) = ejection {
            if !matches!(before, Ejection::Out(_)) {
                self.ejections[reason as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        if before != ejection || entered_probe {
            self.waker.wake();
        }
        if matches!(before, Ejection::Out(_)) && !matches!(ejection, Ejection::Out(_)) {
            self.health.tell_observer();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn serving() -> Gate {
        let health = health::Gate::new();
        health.set(Health::Serving);
        Gate::new(health)
    }

    fn admit(gate: &Gate) -> Poll<Admit> {
        gate.poll_admit(&mut Context::from_waker(noop_waker_ref()))
    }

    #[test]
    fn every_state_survives_its_encoding() {
        for e in [
            Ejection::None,
            Ejection::Out(Reason::Failures),
            Ejection::Out(Reason::Latency),
            Ejection::Probe(Reason::Failures),
            Ejection::Probe(Reason::Latency),
        ] {
            assert_eq!(Ejection::from_u8(e.to_u8()), e);
        }
    }

    #[test]
    fn health_shuts_it_whatever_accrual_says() {
        let health = health::Gate::new();
        let gate = Gate::new(health.clone());
        assert_eq!(admit(&gate), Poll::Pending, "shut until SERVING");
        health.set(Health::Serving);
        assert_eq!(admit(&gate), Poll::Ready(Admit::Any));
        health.set(Health::NotServing);
        assert_eq!(admit(&gate), Poll::Pending);
        assert!(!gate.in_rotation());
    }

    #[test]
    fn an_ejection_shuts_it_then_lets_exactly_one_probe_through() {
        let gate = serving();
        gate.set_ejection(Ejection::Out(Reason::Latency), false);
        assert_eq!(admit(&gate), Poll::Pending);
        assert!(!gate.in_rotation());
        gate.set_ejection(Ejection::Probe(Reason::Latency), false);
        assert!(gate.in_rotation(), "a probing endpoint is in rotation");
        assert_eq!(admit(&gate), Poll::Ready(Admit::Probe));
        assert!(gate.take_probe());
        assert!(!gate.take_probe(), "one probe only");
        assert_eq!(admit(&gate), Poll::Pending, "while the probe is out");
        // Another call's end changes nothing: the probe is still out.
        gate.set_ejection(Ejection::Probe(Reason::Latency), false);
        assert_eq!(admit(&gate), Poll::Pending);
        // An inconclusive probe answered: a new one may go.
        gate.set_ejection(Ejection::Probe(Reason::Latency), true);
        assert_eq!(admit(&gate), Poll::Ready(Admit::Probe));
        gate.set_ejection(Ejection::None, true);
        assert_eq!(admit(&gate), Poll::Ready(Admit::Any));
        assert_eq!(gate.ejections(), [0, 1]);
    }

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_change_wakes_the_endpoint() {
        let gate = serving();
        let count = Arc::new(Count::default());
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        gate.set_ejection(Ejection::Out(Reason::Failures), false);
        assert!(gate.poll_admit(&mut cx).is_pending());
        gate.set_ejection(Ejection::Out(Reason::Failures), false);
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "no change, no wake-up");
        gate.set_ejection(Ejection::Probe(Reason::Failures), false);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }
}
