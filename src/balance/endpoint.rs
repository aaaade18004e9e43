//! One endpoint as the balancer sees it: a connection, the gate in front of it ([`super::gate`]:
//! health, and ejections by its failure-accrual task, [`super::accrual`]), its latency estimate
//! ([`super::latency`]: the cost p2c compares, and what outlier ejection judges), and the counters
//! behind `endpoints()`. Each call's end is told to all three.
//!
//! Its `poll_ready` never fails: a shut gate is `Pending`, with a wake-up registered, so tower's
//! ready cache keeps the endpoint instead of evicting it for good.

use super::accrual::{Accrual, AccrualConfig, Event, Reason};
use super::completion::{Completion, Outcome, TrackedBody};
use super::failure::{self, Blame};
use super::gate::{Admit, Ejection, Gate};
use super::latency::{Cost, EwmaConfig, Judged, Latency};
use super::probe::{OwnProbe, Probe};
use super::silence::Progress;
use crate::connection::Connection;
use crate::discovery::Refresh;
use crate::grpc::Pushback;
use crate::health::{self, Health};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::body::Body;
use tower::load::Load;
use tower::Service;

/// The error type of the balancer's inner services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call that failed on an endpoint's connection, naming the endpoint.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {source}")]
pub struct EndpointError {
    /// The endpoint.
    pub addr: SocketAddr,
    /// What failed.
    pub source: BoxError,
}

/// Added to each response: the address of the endpoint that served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy(pub SocketAddr);

/// An endpoint's state as `endpoints()` reports it. More states may come: a `match` needs a
/// wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// Healthy and offered to the balancer.
    Ready,
    /// Not answered its health watch yet, or reconnecting.
    Connecting,
    /// Says it is not serving.
    Unhealthy,
    /// Taken out by failure accrual until its backoff ends.
    Ejected,
    /// Taken out as a latency outlier until its backoff ends.
    EjectedLatency,
    /// Ejected, its backoff over: on probation. Callers' calls still go elsewhere; its next call
    /// is a probe (a copy of a call that may be duplicated, or a call of the balancer's own,
    /// sent as calls come), and it rejoins when a probe answers in time.
    Probing,
}

impl std::fmt::Display for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndpointState::Ready => "ready",
            EndpointState::Connecting => "connecting",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Ejected => "ejected",
            EndpointState::EjectedLatency => "ejected (latency)",
            EndpointState::Probing => "probing",
        })
    }
}

/// A point-in-time view of one endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointSnapshot {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state.
    pub state: EndpointState,
    /// Calls started and not yet ended.
    pub in_flight: u64,
    /// Calls that got an answer (OK or a gRPC status).
    pub served: u64,
    /// Calls that ended with a non-OK status or a broken connection.
    pub errors: u64,
    /// Exponentially weighted moving average of call latency.
    pub ewma_rtt: Duration,
    /// Why its connection or health watch last failed, while it is not ready.
    pub last_error: Option<String>,
    /// Calls it shed (`RESOURCE_EXHAUSTED` with a `grpc-retry-pushback-ms`).
    pub shed: u64,
}

// === impl Shared ===

/// What the endpoint service, its calls and the registry share.
#[derive(Debug)]
pub struct Shared {
    addr: SocketAddr,
    gate: Arc<Gate>,
    in_flight: AtomicU64,
    served: AtomicU64,
    errors: AtomicU64,
    latency: Latency,
    accrual: mpsc::UnboundedSender<Event>,
    /// The last outcome told to accrual was a failure: the next success must be told too.
    failing: AtomicBool,
    /// Back on a probe of the balancer's own: the next call's answer must be told too, as the
    /// first proof of its speed.
    on_trial: AtomicBool,
    shed: AtomicU64,
    progress: Progress,
    /// Calls ended, by the gRPC code the caller saw (a broken connection counts as
    /// `UNAVAILABLE`, a call the caller dropped as `CANCELLED`).
    by_code: [AtomicU64; crate::grpc::CODE_COUNT],
    probes: AtomicU64,
}

/// Counters of one endpoint for metrics, read when scraped.
#[derive(Debug, Clone, Default)]
pub struct EndpointCounters {
    /// Calls ended, indexed by gRPC code.
    pub by_code: [u64; crate::grpc::CODE_COUNT],
    /// Probe calls sent while it was ejected.
    pub probes: u64,
    /// Ejections for consecutive failures.
    pub ejections_failures: u64,
    /// Ejections as a latency outlier.
    pub ejections_latency: u64,
}

impl Shared {
    /// What p2c compares: the peak-EWMA cost; nothing while the gate offers a probe, so that the
    /// probe is sent at the next comparison (a copy of a call where it can be, costing no
    /// caller) rather than starved behind the old peak. Read from the gate itself, not from the
    /// endpoint's last `poll_ready`: an endpoint ejected while in the ready set is not polled
    /// again until it is chosen.
    pub(crate) fn cost(&self, now: Instant) -> Cost {
        if self.gate.offers_probe() {
            return Cost::NONE;
        }
        self.latency.cost(now)
    }

    /// New shared state for an endpoint whose health `health` signals; starts its accrual task,
    /// which ends with it. Must run inside a tokio runtime.
    pub fn new(
        addr: SocketAddr,
        health: Arc<health::Gate>,
        accrual: AccrualConfig,
        ewma: EwmaConfig,
    ) -> Arc<Self> {
        let gate = Arc::new(Gate::new(health));
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(super::accrual::run(
            gate.clone(),
            Accrual::new(accrual),
            rx,
            addr,
        ));
        Arc::new(Self {
            addr,
            gate,
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Latency::new(ewma),
            accrual: events,
            failing: AtomicBool::new(false),
            on_trial: AtomicBool::new(false),
            shed: AtomicU64::new(0),
            progress: Progress::default(),
            by_code: Default::default(),
            probes: AtomicU64::new(0),
        })
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its latency estimate and how many successful calls that holds: what outlier detection
    /// reads.
    pub fn latency(&self) -> (Duration, u64) {
        self.latency.judged()
    }

    /// Whether it is offered to the balancer now (serving and not ejected, probing or not).
    pub fn in_rotation(&self) -> bool {
        self.gate.in_rotation()
    }

    /// Whether it has had its first word: it answered its health watch (serving or not), or
    /// failed to connect or to answer at least once.
    pub fn settled(&self) -> bool {
        let health = self.gate.health();
        health.health() != Health::Connecting || health.last_error().is_some()
    }

    /// Asks accrual to eject the endpoint as a latency outlier (unless it is already out or being
    /// probed); its probe is to answer within `threshold`, the fleet's.
    pub fn eject_for_latency(&self, threshold: Duration) {
        let _ = self.accrual.send(Event::LatencyOutlier { threshold });
    }

    /// Tells accrual the fleet's threshold now, if it is judging this endpoint for latency: a
    /// threshold frozen at the ejection would keep the endpoint out if the whole fleet slowed.
    pub fn update_latency_threshold(&self, threshold: Duration) {
        if let Ejection::Out(Reason::Latency) | Ejection::Probe(Reason::Latency) =
            self.gate.ejection()
        {
            let _ = self.accrual.send(Event::Threshold(threshold));
        }
    }

    /// The endpoint's gate.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// A snapshot for `endpoints()`.
    pub fn snapshot(&self) -> EndpointSnapshot {
        let health = self.gate.health();
        let state = match (self.gate.ejection(), health.health()) {
            (Ejection::Out(Reason::Latency), _) => EndpointState::EjectedLatency,
            (Ejection::Out(Reason::Failures), _) => EndpointState::Ejected,
            (_, Health::Connecting) => EndpointState::Connecting,
            (_, Health::NotServing) => EndpointState::Unhealthy,
            // On probation its probe is on offer to the balancer; a caller's calls go elsewhere.
            (Ejection::Probe(_), Health::Serving) => EndpointState::Probing,
            (Ejection::None, Health::Serving) => EndpointState::Ready,
        };
        EndpointSnapshot {
            addr: self.addr,
            state,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            ewma_rtt: self.latency.smoothed(),
            last_error: if state == EndpointState::Ready {
                None
            } else {
                health.last_error()
            },
            shed: self.shed.load(Ordering::Relaxed),
        }
    }

    /// Its counters, for metrics.
    pub fn counters(&self) -> EndpointCounters {
        let ejections = self.gate.ejections();
        EndpointCounters {
            by_code: std::array::from_fn(|i| self.by_code[i].load(Ordering::Relaxed)),
            probes: self.probes.load(Ordering::Relaxed),
            ejections_failures: ejections[Reason::Failures as usize],
            ejections_latency: ejections[Reason::Latency as usize],
        }
    }

    /// Its progress, for silent-failure detection.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Calls started and not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes a silent endpoint out of rotation until its health watch hears `SERVING` again.
    pub fn declare_silent(&self, reason: String) {
        self.gate.health().shut(reason);
    }

    /// A call ended after `elapsed`; its answer's headers came `answered` after it started.
    /// Counts it and tells accrual; returns what the latency estimate is to be told.
    pub(super) fn finish(
        &self,
        outcome: Outcome,
        elapsed: Duration,
        answered: Option<Duration>,
        probe: Option<Probe>,
    ) -> (Duration, Judged) {
        let was_probe = probe.is_some();
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.progress.call_ended();
        let trial = !was_probe
            && outcome == Outcome::Ok
            && self.on_trial.load(Ordering::Relaxed)
            && self.on_trial.swap(false, Ordering::Relaxed);
        // A probe (or a trial) is judged by how soon the endpoint answered, not by how long its
        // answer ran: a stream's length says nothing of the endpoint's speed, and would keep it
        // ejected.
        let judged = if was_probe || trial {
            answered.unwrap_or(elapsed)
        } else {
            elapsed
        };
        let code = match outcome {
            Outcome::Ok => tonic::Code::Ok,
            Outcome::Status(code) | Outcome::StreamError(code) => code,
            Outcome::Broken => tonic::Code::Unavailable,
            Outcome::Cancelled => tonic::Code::Cancelled,
        };
        if let Some(counter) = self.by_code.get(code as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let mut judgement = Judged::Skip;
        match outcome {
            Outcome::Ok => {
                self.served.fetch_add(1, Ordering::Relaxed);
                judgement = match probe {
                    None => Judged::Add,
                    Some(Probe::Copy) => Judged::Restart,
                    // Another method's time: the judging view starts over empty, the peak stays.
                    Some(Probe::Own { .. }) => Judged::Forget,
                };
            }
            Outcome::Status(_) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Broken => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::StreamError(_) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Cancelled => {}
        }
        // Only what can change accrual's decision crosses to its task: a failure, a probe, the
        // first call after a failure that resets its count, and the first answer after a return
        // on trust.
        let failure = outcome.is_endpoint_failure();
        let resets = matches!(outcome, Outcome::Ok | Outcome::Status(_)) && !failure;
        let told = probe.map_or(outcome, |p| p.verdict(outcome));
        if matches!(probe, Some(Probe::Own { .. })) && told == Outcome::Ok {
            self.on_trial.store(true, Ordering::Relaxed);
        }
        let tell = if failure {
            self.failing.store(true, Ordering::Relaxed);
            true
        } else {
            // A read first: most calls succeed with nothing to reset, and a write on every call
            // would bounce the flag's cache line between the cores.
            was_probe
                || trial
                || (resets
                    && self.failing.load(Ordering::Relaxed)
                    && self.failing.swap(false, Ordering::Relaxed))
        };
        if tell {
            let _ = self.accrual.send(Event::Ended {
                outcome: told,
                probe,
                latency: judged,
                trial,
            });
        }
        (judged, judgement)
    }
}

#[cfg(test)]
impl Shared {
    /// Ends one call as a passed probe of the balancer's own would.
    pub(crate) fn test_forget(&self) {
        self.latency.start();
        self.latency
            .end(Duration::from_micros(300), Judged::Forget, Instant::now());
    }

    /// Records one successful call of `latency`, as a finished call would.
    pub(crate) fn test_finish_ok(&self, latency: Duration) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.latency.start();
        let (rtt, judged) = self.finish(Outcome::Ok, latency, Some(latency), None);
        self.latency.end(rtt, judged, Instant::now());
    }
}

// === impl CallGuard ===

/// Held by a call until it ends; records the outcome into the endpoint's counters and accrual.
#[derive(Debug)]
pub struct CallGuard {
    shared: Arc<Shared>,
    started: Instant,
    /// When the answer's headers came, after `started` (probes only).
    answered: Option<Duration>,
    outcome: Outcome,
    probe: Option<Probe>,
    /// The endpoint shed the call, asking for this pause (see `Drop`).
    shed: Option<Duration>,
}

impl Completion for CallGuard {
    fn record(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        let (rtt, judged) = self
            .shared
            .finish(self.outcome, elapsed, self.answered, self.probe);
        // Only a shed call looks for the runtime (a thread-local read and a handle clone).
        let runtime = self
            .shed
            .and_then(|pause| Some((pause, tokio::runtime::Handle::try_current().ok()?)));
        match runtime {
            Some((pause, runtime)) => {
                // A shed call is answered at once, which would make the shedding endpoint look
                // like the cheapest one. It costs what its caller loses instead: the pushback,
                // then a try elsewhere (about as long again), and stays pending that long. So p2c
                // prefers endpoints that are not shedding, yet still uses this one when every
                // endpoint sheds (stepping aside would leave it idle).
                let shared = self.shared.clone();
                let held = pause.saturating_mul(4);
                runtime.spawn(async move {
                    tokio::time::sleep(held).await;
                    shared
                        .latency
                        .end(rtt.saturating_add(held), judged, Instant::now());
                });
            }
            None => self.shared.latency.end(rtt, judged, now),
        }
    }
}

// === impl Endpoint ===

/// The per-endpoint service the balancer picks from.
pub struct Endpoint {
    shared: Arc<Shared>,
    channel: Connection,
    refresh: Refresh,
    next_is_probe: bool,
    own_probe: OwnProbe,
}

impl Endpoint {
    /// An endpoint over `channel`, gated by `shared`'s gate. `refresh` asks discovery to look again
    /// when the connection fails; `own_probe` judges it, while it is ejected, when the call it is
    /// handed may not be duplicated.
    pub(crate) fn new(
        shared: Arc<Shared>,
        channel: Connection,
        refresh: Refresh,
        own_probe: OwnProbe,
    ) -> Self {
        Self {
            shared,
            channel,
            refresh,
            next_is_probe: false,
            own_probe,
        }
    }
}

impl Load for Endpoint {
    type Metric = Cost;

    fn load(&self) -> Cost {
        self.shared.cost(Instant::now())
    }
}

impl Service<http::Request<Body>> for Endpoint {
    type Response = http::Response<TrackedBody<Body, CallGuard>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Shut gate: not serving, the connection is down, or ejected. Pending, never an error.
        self.next_is_probe = ready!(self.shared.gate.poll_admit(cx)) == Admit::Probe;
        match self.channel.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => {
                tracing::debug!(addr = %self.shared.addr, %error, "connection not ready");
                self.shared.gate.health().recheck();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Only this endpoint takes its gate's probe, so the one poll_ready offered is still there.
        if std::mem::take(&mut self.next_is_probe) && self.shared.gate.take_probe() {
            // No caller waits for an endpoint under judgement: a copy of the call is the probe
            // where it may be duplicated, a call of the balancer's own where it may not.
            let (probe, role) = match super::probe::copy_of(&request) {
                Some(copy) => (copy, Probe::Copy),
                None => (self.own_probe.request(), self.own_probe.role()),
            };
            super::probe::run_detached(self.dispatch(probe, Some(role)));
            return Box::pin(std::future::ready(Err(super::probe::Detached::boxed(
                request,
            ))));
        }
        self.dispatch(request, None)
    }
}

impl Endpoint {
    /// Sends `request` on the connection (the readiness `poll_ready` reserved), tracking it.
    /// `probe`: it is the probe, a copy of a caller's call or the balancer's own.
    fn dispatch(
        &mut self,
        request: http::Request<Body>,
        probe: Option<Probe>,
    ) -> <Self as Service<http::Request<Body>>>::Future {
        if probe.is_some() {
            self.shared.probes.fetch_add(1, Ordering::Relaxed);
        }
        let before = self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        self.shared.latency.start();
        self.shared.progress.call_started(before == 0);
        let failed_over = self.shared.progress.failed_over();
        let mut guard = CallGuard {
            shared: self.shared.clone(),
            started: Instant::now(),
            answered: None,
            outcome: Outcome::Cancelled,
            probe,
            shed: None,
        };
        let addr = self.shared.addr;
        let refresh = self.refresh.clone();
        let call = self.channel.send(request);
        Box::pin(async move {
            let result = tokio::select! {
                result = call => result,
                () = failed_over => Err(BoxError::from(
                    "the connection went silent (see the endpoint's last error); failed over",
                )),
            };
            match result {
                Ok(response) => {
                    if guard.probe.is_some() || guard.shared.on_trial.load(Ordering::Relaxed) {
                        // Only a probe or a trial is judged by it: no clock read for the others.
                        guard.answered = Some(guard.started.elapsed());
                    }
                    let (mut parts, body) = response.into_parts();
                    match Pushback::of(&parts.headers) {
                        Some(Pushback::Wait(pause)) => {
                            guard.shared.shed.fetch_add(1, Ordering::Relaxed);
                            guard.shed = Some(pause);
                        }
                        Some(Pushback::DoNotRetry) => {
                            guard.shared.shed.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    parts.extensions.insert(ServedBy(addr));
                    let body = TrackedBody::new(Body::new(body), guard, &parts.headers);
                    Ok(http::Response::from_parts(parts, body))
                }
                Err(error) => {
                    if let Blame::Call(code, message) = failure::blame(&*error) {
                        // One stream failed; the connection is fine. The call gets a status (and a
                        // refused stream, UNAVAILABLE, is retried elsewhere); the endpoint stays.
                        tracing::debug!(%addr, %error, "stream error");
                        guard.record(Outcome::StreamError(code));
                        drop(guard);
                        let status = tonic::Status::new(code, format!("{addr}: {message}"));
                        let (mut parts, body) = status.into_http::<Body>().into_parts();
                        parts.extensions.insert(ServedBy(addr));
                        return Ok(http::Response::from_parts(
                            parts,
                            TrackedBody::recorded(body),
                        ));
                    }
                    tracing::debug!(%addr, %error, "call failed on the connection");
                    guard.record(Outcome::Broken);
                    // The connection is suspect: shut the gate until health says SERVING again,
                    // and ask discovery whether the address is still current.
                    guard.shared.gate.health().recheck();
                    refresh.request();
                    Err(Box::new(EndpointError {
                        addr,
                        source: error,
                    }) as BoxError)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::settle;
    use futures::task::noop_waker_ref;

    /// Successes mostly stay on the call path, but the first one after a failure must reach the
    /// accrual task, or failures spread over many good calls would add up to an ejection.
    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_resets_their_count() {
        let health = health::Gate::new();
        health.set(Health::Serving);
        let accrual = AccrualConfig {
            threshold: 3,
            ..Default::default()
        };
        let shared = Shared::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            health,
            accrual,
            EwmaConfig::default(),
        );
        let end = |outcome| {
            shared.in_flight.fetch_add(1, Ordering::Relaxed);
            shared.finish(outcome, Duration::from_millis(1), None, None);
        };
        for _ in 0..4 {
            end(Outcome::Broken);
            end(Outcome::Status(tonic::Code::Unavailable));
            end(Outcome::Ok);
            end(Outcome::Ok);
        }
        settle().await;
        assert_eq!(shared.snapshot().state, EndpointState::Ready);
        end(Outcome::Broken);
        end(Outcome::Broken);
        end(Outcome::Broken);
        settle().await;
        assert_eq!(shared.snapshot().state, EndpointState::Ejected);
    }

    fn serving() -> Arc<Shared> {
        let health = health::Gate::new();
        health.set(Health::Serving);
        Shared::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            health,
            AccrualConfig::default(),
            EwmaConfig::default(),
        )
    }

    /// An endpoint ejected while it sat in the balancer's ready set is not polled again until it
    /// is chosen; its cost alone must say that a probe is on offer, or the probe waits until
    /// its old peak decays (seconds to a minute).
    #[tokio::test(start_paused = true)]
    async fn an_offered_probe_costs_nothing_before_the_endpoint_is_polled_again() {
        let shared = serving();
        shared.latency.start();
        shared
            .latency
            .end(Duration::from_millis(200), Judged::Add, Instant::now());
        let slow = shared.cost(Instant::now());
        assert_ne!(slow, Cost::NONE);
        shared.eject_for_latency(Duration::from_millis(10));
        settle().await;
        assert_eq!(shared.snapshot().state, EndpointState::EjectedLatency);
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(shared.cost(Instant::now()), Cost::NONE, "its probe's turn");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_is_judged_by_when_it_was_answered_not_by_how_long_its_stream_ran() {
        let shared = serving();
        shared.eject_for_latency(Duration::from_millis(10));
        settle().await;
        assert_eq!(shared.snapshot().state, EndpointState::EjectedLatency);
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        // On probation: offered to the balancer for its probe, not ready for a caller.
        assert_eq!(shared.snapshot().state, EndpointState::Probing);
        assert_eq!(shared.snapshot().state.to_string(), "probing");
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(shared.gate.poll_admit(&mut cx), Poll::Ready(Admit::Probe));
        assert!(shared.gate.take_probe());
        assert_eq!(shared.snapshot().state, EndpointState::Probing);
        assert_ne!(
            shared.cost(Instant::now()),
            Cost::NONE,
            "the probe is taken"
        );
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        // A stream that ran 5 s, answered after 2 ms.
        let (ran, answered) = (Duration::from_secs(5), Duration::from_millis(2));
        let (rtt, judged) = shared.finish(Outcome::Ok, ran, Some(answered), Some(Probe::Copy));
        shared.latency.end(rtt, judged, Instant::now());
        settle().await;
        assert_eq!(shared.gate.ejection(), Ejection::None);
        assert_eq!(shared.snapshot().state, EndpointState::Ready);
        assert_eq!(
            shared.latency().0,
            answered,
            "the estimate starts over from it"
        );
    }

    /// The balancer's own probe: an error answer is no proof (out again, for latency still); an
    /// OK one lets the endpoint back, but its estimate is not the probe's speed.
    #[tokio::test(start_paused = true)]
    async fn the_balancers_own_probe_must_succeed_and_leaves_the_peak_alone() {
        let shared = serving();
        shared.latency.start();
        shared
            .latency
            .end(Duration::from_millis(200), Judged::Add, Instant::now());
        let own = Some(Probe::Own { health: true });
        let probe_ended = |outcome| {
            let shared = shared.clone();
            async move {
                // Past the first ejection's bound (1 s) and the second's (2 s).
                tokio::time::advance(Duration::from_secs(3)).await;
                settle().await;
                let mut cx = Context::from_waker(noop_waker_ref());
                assert_eq!(shared.gate.poll_admit(&mut cx), Poll::Ready(Admit::Probe));
                assert!(shared.gate.take_probe());
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                shared.latency.start();
                let fast = Duration::from_micros(300);
                let (rtt, judged) = shared.finish(outcome, fast, Some(fast), own);
                shared.latency.end(rtt, judged, Instant::now());
                settle().await;
            }
        };
        shared.eject_for_latency(Duration::from_millis(10));
        settle().await;
        probe_ended(Outcome::Status(tonic::Code::NotFound)).await;
        assert_eq!(shared.gate.ejection(), Ejection::Out(Reason::Latency));
        probe_ended(Outcome::Ok).await;
        assert_eq!(shared.gate.ejection(), Ejection::None);
        assert_eq!(shared.latency().0, Duration::ZERO, "nothing judged yet");
        // 200 ms decayed over 6 s (to about 110 ms), not restarted at the probe's 0.3 ms.
        let cost = format!("{:?}", shared.cost(Instant::now()));
        let ns: f64 = cost.trim_end_matches("ns").parse().unwrap();
        assert!((100e6..120e6).contains(&ns), "{cost}");
        // Its first caller's answer is its trial: still slow, out at once.
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        shared.latency.start();
        let slow = Duration::from_millis(200);
        let (rtt, judged) = shared.finish(Outcome::Ok, slow, None, None);
        shared.latency.end(rtt, judged, Instant::now());
        settle().await;
        assert_eq!(shared.gate.ejection(), Ejection::Out(Reason::Latency));
    }
}
