//! Load generation: drives `UserGuideService` calls, or any unary or server-streaming method
//! ([`Workload`]), through a [`crate::Balancer`] (closed loop at a fixed
//! concurrency, or open loop at a fixed rate) and records what came back: latency histograms
//! (HDR) overall and per replica, errors by status code and why calls were `UNAVAILABLE`. A closed
//! loop whose calls come back `UNAVAILABLE` backs off instead of spinning. Knows nothing of how
//! results are shown.

use crate::balance::{Attempts, ServedBy};
use crate::proto::userguide::v1::{
    user_guide_service_client::UserGuideServiceClient, GetPointRequest, ListUsersRequest, Point,
    Profile,
};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Status};

/// Which call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallKind {
    /// Unary `GetPoint`.
    #[default]
    GetPoint,
    /// Server-streaming `ListUsers`, read to its end.
    ListUsers,
    /// Alternating between the two.
    Mix,
}

impl std::str::FromStr for CallKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "get-point" => Ok(CallKind::GetPoint),
            "list-users" => Ok(CallKind::ListUsers),
            "mix" => Ok(CallKind::Mix),
            other => Err(format!(
                "unknown call {other:?}: expected get-point, list-users or mix"
            )),
        }
    }
}

/// What each call of a load is.
#[derive(Debug, Clone)]
pub enum Workload {
    /// One of the UserGuide service's calls (typed, generated code).
    UserGuide(CallKind),
    /// Any unary or server-streaming method, known at run time (`--call package.Service/Method`).
    Method(Arc<crate::dynamic::Invocation>),
}

impl From<CallKind> for Workload {
    fn from(kind: CallKind) -> Self {
        Workload::UserGuide(kind)
    }
}

/// A worker's client for its workload.
enum Caller<T> {
    UserGuide(UserGuideServiceClient<T>, CallKind),
    Method(tonic::client::Grpc<T>, Arc<crate::dynamic::Invocation>),
}

impl<T: Transport> Caller<T> {
    fn new(lb: &T, workload: &Workload) -> Self {
        match workload {
            Workload::UserGuide(kind) => {
                Caller::UserGuide(UserGuideServiceClient::new(lb.clone()), *kind)
            }
            Workload::Method(inv) => {
                Caller::Method(tonic::client::Grpc::new(lb.clone()), inv.clone())
            }
        }
    }

    async fn call(&mut self, n: u64) -> CallOutcome {
        match self {
            Caller::UserGuide(client, kind) => one_call(client, *kind, n).await,
            Caller::Method(grpc, inv) => {
                let outcome = |served: Option<crate::dynamic::invoke::Served>| {
                    let (metadata, addr, attempts) = match served {
                        Some(s) => (Some(s.metadata), s.addr, s.attempts),
                        None => (None, None, 1),
                    };
                    CallOutcome {
                        replica: metadata
                            .as_ref()
                            .and_then(|m| crate::dynamic::invoke::server_of(m, addr)),
                        addr,
                        code: None,
                        reason: None,
                        attempts,
                    }
                };
                match inv.once(grpc, n).await {
                    Ok(served) => outcome(Some(served)),
                    Err((status, served)) => {
                        let mut o = outcome(served);
                        if o.replica.is_none() {
                            o.replica = replica_of(status.metadata());
                        }
                        o.code = Some(status.code());
                        o.reason = reason_of(&status);
                        o
                    }
                }
            }
        }
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many calls.
    Requests(u64),
    /// After this long.
    Duration(Duration),
}

/// What load to make.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// When to stop.
    pub stop: Stop,
    /// Calls in flight at once (closed loop), or at most in flight (open loop).
    pub concurrency: usize,
    /// Calls per second for an open loop; `None` for a closed loop.
    pub rate: Option<f64>,
    /// Which call.
    pub call: Workload,
}

/// Latency and error counts for one set of calls.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of successful calls, in microseconds.
    pub latency: Histogram<u64>,
    /// Calls that ended with a status, by code name.
    pub errors: BTreeMap<&'static str, u64>,
    /// `UNAVAILABLE` calls by message (why nothing could serve them), at most
    /// [`MAX_REASONS`] distinct ones; the rest are counted under [`OTHER_REASONS`].
    pub unavailable: BTreeMap<String, u64>,
}

/// How many distinct `UNAVAILABLE` reasons a run keeps.
pub const MAX_REASONS: usize = 8;
/// Where reasons beyond [`MAX_REASONS`] are counted.
pub const OTHER_REASONS: &str = "(other reasons)";

impl Default for Stats {
    /// 1 µs to 1 h at 3 significant figures: the whole run's latency.
    fn default() -> Self {
        Self::with_figures(3)
    }
}

impl Stats {
    /// 1 µs to 1 h at `figures` significant figures (at most 5, else this panics: the bounds
    /// are constants, so only a bad constant can).
    fn with_figures(figures: u8) -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, figures)
                .expect("constant histogram bounds are valid"),
            errors: BTreeMap::new(),
            unavailable: BTreeMap::new(),
        }
    }

    fn ok(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency.saturating_record(us);
    }

    fn error(&mut self, code: Code, reason: Option<&str>) {
        *self.errors.entry(crate::grpc::code_name(code)).or_default() += 1;
        if let Some(reason) = reason {
            self.count_reason(reason, 1);
        }
    }

    fn count_reason(&mut self, reason: &str, n: u64) {
        let key = if self.unavailable.contains_key(reason) || self.unavailable.len() < MAX_REASONS {
            reason
        } else {
            OTHER_REASONS
        };
        *self.unavailable.entry(key.to_owned()).or_default() += n;
    }

    fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        for (code, n) in &other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (reason, n) in &other.unavailable {
            self.count_reason(reason, *n);
        }
    }

    /// Successful calls.
    pub fn ok_count(&self) -> u64 {
        self.latency.len()
    }

    /// Failed calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Everything recorded for one replica.
#[derive(Debug, Clone)]
pub struct ReplicaStats {
    /// The address it was reached at, when known.
    pub addr: Option<SocketAddr>,
    /// Its calls; latency at 2 significant figures (percentiles within 1 %).
    pub stats: Stats,
}

impl Default for ReplicaStats {
    /// At 3 figures, a histogram is 184 KiB of counters; at 2, 26 KiB. A client over 300
    /// replicas kept 600 of the larger (the run's, and a window's that nothing read): 108 MiB
    /// of fresh pages that its calls zeroed, and counters spread too thin for the cache; its
    /// CPU per call doubled.
    fn default() -> Self {
        Self {
            addr: None,
            stats: Stats::with_figures(2),
        }
    }
}

/// What a run recorded: totals and per replica (keyed by `x-replica-id`, or by the endpoint's
/// address for servers that do not send one).
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// All calls.
    pub total: Stats,
    /// Calls per replica id.
    pub replicas: BTreeMap<String, ReplicaStats>,
    /// Calls that took more than one try.
    pub retried_calls: u64,
}

impl Recording {
    fn record(&mut self, outcome: &CallOutcome, latency: Duration) {
        let replica = outcome.replica.as_ref().and_then(|id| {
            // The id is known after a replica's first call: no copy of it per call.
            if !self.replicas.contains_key(id) {
                self.replicas.insert(id.clone(), ReplicaStats::default());
            }
            let entry = self.replicas.get_mut(id)?;
            if entry.addr.is_none() {
                entry.addr = outcome.addr;
            }
            Some(entry)
        });
        match outcome.code {
            None => {
                self.total.ok(latency);
                if let Some(r) = replica {
                    r.stats.ok(latency);
                }
            }
            Some(code) => {
                let reason = outcome.reason.as_deref();
                self.total.error(code, reason);
                if let Some(r) = replica {
                    r.stats.error(code, reason);
                }
            }
        }
        if outcome.attempts > 1 {
            self.retried_calls += 1;
        }
    }

    /// Adds another recording into this one.
    pub fn merge(&mut self, other: &Recording) {
        self.total.merge(&other.total);
        for (id, r) in &other.replicas {
            let entry = self.replicas.entry(id.clone()).or_default();
            entry.addr = entry.addr.or(r.addr);
            entry.stats.merge(&r.stats);
        }
        self.retried_calls += other.retried_calls;
    }
}

/// The shared recorder: the whole run, and, for a recorder made [`Recorder::with_window`], the
/// calls since its [`Window`] was last taken.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<(Recording, Option<Recording>)>>,
    started: Arc<AtomicU64>,
}

/// The calls since the last [`Window::take`], of the [`Recorder`] it was made with (a live
/// view's last second). Only such a recorder records each call twice.
#[derive(Debug, Clone)]
pub struct Window(Recorder);

impl Window {
    /// The calls since the previous take (or since the recorder was made), starting a new
    /// window.
    pub fn take(&self) -> Recording {
        let mut guard = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

impl Recorder {
    /// A recorder that also keeps the calls since its window was last taken.
    pub fn with_window() -> (Self, Window) {
        let recorder = Self::default();
        recorder.inner.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(Recording::default());
        (recorder.clone(), Window(recorder))
    }

    /// [`Recorder::with_window`] if `keep`, else a recorder without one.
    pub fn with_window_if(keep: bool) -> (Self, Option<Window>) {
        if keep {
            let (recorder, window) = Self::with_window();
            (recorder, Some(window))
        } else {
            (Self::default(), None)
        }
    }

    fn record(&self, outcome: &CallOutcome, latency: Duration) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.record(outcome, latency);
        if let Some(window) = &mut guard.1 {
            window.record(outcome, latency);
        }
    }

    /// The whole run so far.
    pub fn total(&self) -> Recording {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Calls started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The trace id of one sampled call, when spans are exported: the first this process made
    /// (learnt by the balancer from its call spans; the load generator opens no span itself).
    pub fn trace_id(&self) -> Option<String> {
        crate::telemetry::first_sampled_trace_id()
    }
}

struct CallOutcome {
    replica: Option<String>,
    addr: Option<SocketAddr>,
    code: Option<Code>,
    /// Why, for `UNAVAILABLE`.
    reason: Option<String>,
    attempts: u32,
}

/// An `UNAVAILABLE` message as a reason: cut, so distinct details do not make distinct reasons
/// without end.
fn reason_of(status: &Status) -> Option<String> {
    (status.code() == Code::Unavailable).then(|| crate::grpc::bounded(status.message(), 300))
}

/// The users the UserGuide calls of a load ask about, in turn (all in the replicas' data).
pub const USERS: [(&str, i32); 5] = [
    ("james", 26),
    ("jake", 27),
    ("molly", 26),
    ("amy", 24),
    ("robert", 24),
];

/// A probe of the UserGuide service that judges what its callers meet: GetPoint of the first
/// of [`USERS`] (`--probe get-point`).
pub fn get_point_probe() -> crate::balance::ProbeCall {
    let (name, age) = USERS[0];
    let request = GetPointRequest {
        profile: Some(Profile {
            age,
            name: name.into(),
        }),
    };
    let method = format!("{}/GetPoint", crate::proto::USERGUIDE_SERVICE);
    crate::balance::ProbeCall::method(&method, prost::Message::encode_to_vec(&request))
        .unwrap_or_default()
}

fn replica_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("x-replica-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Any gRPC transport the generated client runs over: the [`crate::Balancer`], or (for comparisons) a
/// plain tonic `Channel`.
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                          + Send
                          + 'static,
        Error: Into<StdError>,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                              + Send
                              + 'static,
            Error: Into<StdError>,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

type StdError = Box<dyn std::error::Error + Send + Sync>;

/// Makes call number `n` of the run.
async fn one_call<T: Transport>(
    client: &mut UserGuideServiceClient<T>,
    kind: CallKind,
    n: u64,
) -> CallOutcome {
    let list = match kind {
        CallKind::GetPoint => false,
        CallKind::ListUsers => true,
        CallKind::Mix => n % 2 == 1,
    };
    let failed = |status: Status| CallOutcome {
        replica: replica_of(status.metadata()),
        addr: None,
        code: Some(status.code()),
        reason: reason_of(&status),
        attempts: 1,
    };
    let served = |metadata: &tonic::metadata::MetadataMap, ext: &http::Extensions| CallOutcome {
        replica: crate::dynamic::invoke::server_of(metadata, ext.get::<ServedBy>().map(|s| s.0)),
        addr: ext.get::<ServedBy>().map(|s| s.0),
        code: None,
        reason: None,
        attempts: ext.get::<Attempts>().map_or(1, |a| a.0),
    };
    if list {
        let points = if n % 4 < 2 { 1000 } else { 800 };
        let request = ListUsersRequest {
            point: Some(Point { value: points }),
        };
        let response = match client.list_users(request).await {
            Ok(r) => r,
            Err(status) => return failed(status),
        };
        let mut outcome = served(response.metadata(), response.extensions());
        let mut stream = response.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return outcome,
                Err(status) => {
                    outcome.code = Some(status.code());
                    outcome.reason = reason_of(&status);
                    return outcome;
                }
            }
        }
    } else {
        let (name, age) = USERS[(n % USERS.len() as u64) as usize];
        let request = GetPointRequest {
            profile: Some(Profile {
                age,
                name: name.into(),
            }),
        };
        match client.get_point(request).await {
            Ok(r) => served(r.metadata(), r.extensions()),
            Err(status) => failed(status),
        }
    }
}

/// Runs `spec` through `lb` until it is done or `cancel` turns true; returns the recorder.
pub async fn run<T: Transport>(
    lb: &T,
    spec: &LoadSpec,
    recorder: Recorder,
    mut cancel: watch::Receiver<bool>,
) -> Recorder {
    let start = Instant::now();
    let deadline = match spec.stop {
        Stop::Duration(d) => Some(start + d),
        Stop::Requests(_) => None,
    };
    let limit = match spec.stop {
        Stop::Requests(n) => n,
        Stop::Duration(_) => u64::MAX,
    };
    let tickets = Arc::new(AtomicU64::new(0));
    let take_ticket = {
        let tickets = tickets.clone();
        move || {
            let n = tickets.fetch_add(1, Ordering::Relaxed);
            let in_time = deadline.is_none_or(|d| Instant::now() < d);
            (n < limit && in_time).then_some(n)
        }
    };
    let work = async {
        match spec.rate {
            None => closed_loop(lb, spec, &recorder, take_ticket, deadline).await,
            Some(rate) => open_loop(lb, spec, rate, &recorder, take_ticket).await,
        }
    };
    tokio::select! {
        () = work => {}
        _ = cancel.wait_for(|stop| *stop) => {}
    }
    recorder
}

async fn closed_loop<T: Transport>(
    lb: &T,
    spec: &LoadSpec,
    recorder: &Recorder,
    take_ticket: impl Fn() -> Option<u64> + Clone,
    deadline: Option<Instant>,
) {
    let workers = (0..spec.concurrency.max(1)).map(|_| {
        let mut caller = Caller::new(lb, &spec.call);
        let take_ticket = take_ticket.clone();
        let recorder = recorder.clone();
        async move {
            let mut backoff = Backoff::default();
            while let Some(n) = take_ticket() {
                recorder.started.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let outcome = caller.call(n).await;
                recorder.record(&outcome, sent.elapsed());
                // UNAVAILABLE: nothing could serve the call (the balancer failed fast, or every
                // try failed on the connection). Calling again at once would only spin; wait as
                // gRPC's wait-for-ready does, longer each time, until a call goes through.
                match outcome.code {
                    Some(Code::Unavailable) => {
                        let pause = Instant::now() + backoff.next();
                        tokio::time::sleep_until(deadline.map_or(pause, |d| d.min(pause))).await
                    }
                    _ => backoff.reset(),
                }
            }
        }
    });
    futures::future::join_all(workers).await;
}

/// The closed loop's pause after an `UNAVAILABLE`: 10 ms doubling to 1 s, with jitter so that the
/// workers do not return in lockstep.
#[derive(Debug, Default)]
struct Backoff {
    next: Option<Duration>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Backoff {
    fn next(&mut self) -> Duration {
        use rand::Rng;
        let base = self.next.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
        self.next = Some(base);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

async fn open_loop<T: Transport>(
    lb: &T,
    spec: &LoadSpec,
    rate: f64,
    recorder: &Recorder,
    take_ticket: impl Fn() -> Option<u64>,
) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001)).max(Duration::from_nanos(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let limit = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
    let mut calls = tokio::task::JoinSet::new();
    while let Some(n) = take_ticket() {
        // Latency counts from when the call was due, not when a slot freed up, so a slow system
        // is not hidden by waiting to send (coordinated omission).
        let due = ticker.tick().await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        recorder.started.fetch_add(1, Ordering::Relaxed);
        let mut caller = Caller::new(lb, &spec.call);
        let recorder = recorder.clone();
        calls.spawn(async move {
            let outcome = caller.call(n).await;
            recorder.record(&outcome, due.elapsed());
            drop(permit);
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(replica: &str) -> CallOutcome {
        CallOutcome {
            replica: Some(replica.to_owned()),
            addr: None,
            code: None,
            reason: None,
            attempts: 1,
        }
    }

    #[test]
    fn a_recorder_keeps_a_window_only_when_asked() {
        let plain = Recorder::default();
        plain.record(&served("a"), Duration::from_millis(1));
        assert_eq!(plain.total().total.ok_count(), 1);
        assert!(plain.inner.lock().unwrap().1.is_none());

        let (recorder, window) = Recorder::with_window();
        recorder.record(&served("a"), Duration::from_millis(1));
        recorder.record(&served("b"), Duration::from_millis(2));
        let taken = window.take();
        assert_eq!(taken.total.ok_count(), 2);
        assert_eq!(taken.replicas.len(), 2);
        recorder.record(&served("a"), Duration::from_millis(1));
        assert_eq!(window.take().total.ok_count(), 1);
        assert_eq!(recorder.total().total.ok_count(), 3);
    }

    #[test]
    fn a_replica_is_recorded_coarser_than_the_run_but_within_one_percent() {
        let mut recording = Recording::default();
        for us in 1..=10_000u64 {
            recording.record(&served("only"), Duration::from_micros(us * 7));
        }
        let replica = &recording.replicas["only"].stats.latency;
        let total = &recording.total.latency;
        // Counters, 8 bytes each: a replica's must stay small, however many replicas a run meets.
        assert!(
            replica.distinct_values() * 8 <= 32 * 1024,
            "{}",
            replica.distinct_values()
        );
        assert!(total.distinct_values() > 4 * replica.distinct_values());
        for q in [0.5, 0.99, 0.999] {
            let (r, t) = (replica.value_at_quantile(q), total.value_at_quantile(q));
            let off = r.abs_diff(t) as f64 / t as f64;
            assert!(off <= 0.01, "q {q}: replica {r} µs, run {t} µs");
        }
        assert_eq!(replica.len(), 10_000);
    }
}
