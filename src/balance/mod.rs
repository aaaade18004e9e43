//! The balanced client: a cloneable gRPC service over every healthy endpoint of a target.
//!
//! # The problem
//! A client-side balancer must pick, for each call, an endpoint that will answer quickly. tonic's
//! `Channel::balance_list` feeds tower's p2c a load of 0 for every endpoint, so its choice is
//! random; it also offers endpoints whose connection failed, never asks grpc.health.v1, and only
//! sees discovery changes when a call happens to poll it.
//!
//! # What this does
//! ```text
//!  discovery task ──Change<addr>──> registry task ──Change<addr, Endpoint>──> Balance (p2c)
//!                                   (connect at once,                                   or RoundRobin
//!                                    start health watch)                                   │
//!  caller ──> Balancer (in-flight bound) ──> call path ──> Buffer ──> FailFast ──────────┘
//!             Deadline ─> Replay ─> Retry ─> Hedge ─> Attempt     (bounded wait)
//! ```
//! The call path is a stack of tower layers, one module each ([`call`] draws it).
//! - **p2c over peak-EWMA** (tower's `p2c::Balance`): pick two ready endpoints at random, send to
//!   the one with the lower cost, where cost is the peak-sensitive EWMA of latency times (in-flight
//!   calls + 1), computed as tower's `PeakEwma` does. Each endpoint has one latency estimate
//!   ([`latency`]) that balancing and outlier ejection both read. Latency is measured to the end
//!   of the response body ([`completion`]), so a streaming call counts in full. Defaults follow
//!   linkerd2-proxy: default RTT 30 ms, decay 10 s.
//! - **Health gate**: an endpoint is offered only while its grpc.health.v1 watch says `SERVING`
//!   ([`crate::health`]); its readiness is `Pending` otherwise, so the balancer never evicts it for
//!   good and takes it back as soon as it recovers.
//! - **Failure accrual**: N consecutive transport failures or `UNAVAILABLE`s eject an endpoint for a
//!   doubling backoff, then one probe call decides ([`accrual`]); a probe is a copy of a call
//!   that may be duplicated, so its caller does not wait for the judged endpoint ([`probe`]).
//! - **Latency-outlier ejection**: an endpoint far slower than the rest of the fleet for a while is
//!   taken out the same way, never below half of the fleet ([`outlier`]).
//! - **Silent-failure detection**: an endpoint whose calls are long overdue while some other
//!   endpoint's are not gets one health check; if that goes unanswered too, its gate shuts and its waiting
//!   calls fail over to other endpoints ([`silence`]).
//! - **Stream errors stay with their call** ([`failure`]): a reset stream is that call's status,
//!   never a reason to shut or eject the endpoint.
//! - **Fail fast**: no ready endpoint within `ready_wait` → `UNAVAILABLE` saying why
//!   ([`failfast`]); every call has a deadline; idempotent calls are retried within a budget
//!   ([`call`]), and can be hedged ([`hedge`], opt-in: it measured worse than ejection alone);
//!   what a retry sends again is the request as already written, up to a limit ([`replay`]).
//! - Discovery, connection and health checks run on their own tasks, so the endpoint set is warm
//!   before the first call.
//!
//! # Example
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
//! let lb = meshlb::Balancer::builder("dns:///users.mesh.svc.cluster.local:50051")
//!     .health_service("userguide.v1.UserGuideService")
//!     .build()
//!     .await?;
//! let mut client = UserGuideServiceClient::new(lb.clone());
//! for endpoint in lb.endpoints() {
//!     println!("{} {} served={}", endpoint.addr, endpoint.state, endpoint.served);
//! }
//! # Ok(()) }
//! ```

pub mod accrual;
pub mod aperture;
pub mod attempt;
pub mod call;
pub mod completion;
pub mod deadline;
pub mod dns_config;
pub mod endpoint;
pub mod failfast;
pub mod failure;
pub mod gate;
pub mod hedge;
pub mod latency;
pub mod limit;
pub mod live_config;
pub mod metrics;
pub mod outlier;
pub mod probe;
pub mod registry;
pub mod replay;
pub mod retry;
pub mod round_robin;
pub mod service_config;
pub mod silence;
pub(crate) mod span;
#[cfg(test)]
mod testing;
pub mod throttle;
pub mod unavailable;

pub use crate::discovery::subset::{Coordinate, CoordinateError};
pub use accrual::AccrualConfig;
pub use aperture::ApertureConfig;
pub use call::CallConfig;
pub use endpoint::{BoxError, EndpointSnapshot, EndpointState, ServedBy};
pub use hedge::{HedgeConfig, HedgeDelay};
pub use latency::EwmaConfig;
pub use metrics::Metrics;
pub use outlier::OutlierConfig;
pub use probe::ProbeCall;
pub use registry::ConnectConfig;
pub use retry::Attempts;
pub use service_config::{ServiceConfig, ServiceConfigError};
pub use silence::SilenceConfig;
pub use unavailable::Unavailable;

use crate::discovery::{self, DiscoveryError, DnsConfig};
use crate::health::HealthConfig;
use crate::target::{Target, TargetError};
use failfast::{FailFast, FailFastLayer};
use futures::StreamExt;
use registry::{EndpointSettings, Membership, Registry};
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::util::BoxService;
use tower::{Layer, Service, ServiceExt};

/// How the balancer chooses among ready endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency (the default).
    #[default]
    P2c,
    /// Each ready endpoint in turn: the baseline for comparisons.
    RoundRobin,
    /// The first ready endpoint, in address order, for every call (gRPC's `pick_first`).
    PickFirst,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "p2c" | "p2c-ewma" | "peak-ewma" => Ok(Policy::P2c),
            "round-robin" | "rr" => Ok(Policy::RoundRobin),
            "pick-first" => Ok(Policy::PickFirst),
            other => Err(format!(
                "unknown policy {other:?}: expected p2c, round-robin or pick-first"
            )),
        }
    }
}

impl Policy {
    /// Its name, as `--policy` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::P2c => "p2c",
            Policy::RoundRobin => "round-robin",
            Policy::PickFirst => "pick-first",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a balancer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The target string is malformed.
    #[error("bad target {target:?}: {source}")]
    Target {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        source: TargetError,
    },
    /// Discovery could not start.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The TLS files are missing or wrong.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A coordinate was given, but the balancer uses every endpoint: there is no subset or
    /// aperture to place (none was set, or pick-first, which uses no aperture).
    #[error("coordinate {0} places a subset or an aperture, and this balancer has neither (it uses every endpoint; pick-first uses no aperture): set a subset or an aperture with p2c or round-robin, or leave the coordinate out")]
    Coordinate(Coordinate),
}

type Inner = BoxService<http::Request<Body>, http::Response<Body>, BoxError>;
type Stack = FailFast<Inner>;
pub(crate) type Buffered =
    Buffer<http::Request<Body>, <Stack as Service<http::Request<Body>>>::Future>;

// === impl Builder ===

/// Configures a [`Balancer`].
#[derive(Debug, Clone)]
pub struct Builder {
    target: String,
    policy: Policy,
    policy_set: bool,
    health: HealthConfig,
    dns: DnsConfig,
    ewma: EwmaConfig,
    accrual: AccrualConfig,
    connect: ConnectConfig,
    call: CallConfig,
    outlier: Option<OutlierConfig>,
    silence: SilenceConfig,
    tls: Option<crate::tls::ClientTls>,
    buffer: usize,
    max_in_flight: usize,
    metrics: Option<Metrics>,
    discovery: Option<CustomDiscovery>,
    subset: Option<usize>,
    aperture: Option<ApertureConfig>,
    coordinate: Option<Coordinate>,
    probe: ProbeCall,
}

/// A discovery stream handed to the builder, taken by the first balancer built from it.
#[derive(Clone)]
struct CustomDiscovery(
    Arc<std::sync::Mutex<Option<futures::stream::BoxStream<'static, discovery::Update>>>>,
);

impl fmt::Debug for CustomDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CustomDiscovery")
    }
}

impl Builder {
    /// Endpoints from your own discovery (a service registry, a file watch) instead of the
    /// target's: a stream of `Change::Insert(addr, ())` and `Change::Remove(addr)`. The target
    /// string then only names the balancer, in messages and metrics. The stream is taken by the
    /// first balancer built; a second build from a clone of this builder discovers nothing.
    pub fn discovery<S>(mut self, changes: S) -> Self
    where
        S: futures::Stream<Item = discovery::Update> + Send + 'static,
    {
        self.discovery = Some(CustomDiscovery(Arc::new(std::sync::Mutex::new(Some(
            Box::pin(changes),
        )))));
        self
    }

    /// Connect to at most `size` of the discovered endpoints (with a [`Builder::coordinate`],
    /// at least the client's slice), a subset of its own chosen by
    /// rendezvous hashing (gRPC's `random_subsetting_experimental`; see [`crate::discovery::subset`]): a
    /// client's connections and per-call cost then stay bounded however large the fleet grows,
    /// and across many clients every endpoint gets about the same share. Set here, it wins over
    /// the service config's `subsetSize`. Off by default: every endpoint is used.
    pub fn subset(mut self, size: usize) -> Self {
        self.subset = Some(size.max(1));
        self
    }

    /// An aperture ([`aperture`]): of a fleet larger than `min` endpoints, connect to the
    /// smallest part this client's load needs (about one call in flight per endpoint, at least
    /// `min` in rotation while that many are alive), for p2c and round-robin (pick-first uses
    /// one endpoint anyway). Off by default: every endpoint is used. For many
    /// clients over a large fleet; a few clients leave some replicas idle (see the module)
    /// unless they know their places ([`Builder::coordinate`]). A
    /// subset ([`Builder::subset`], or the service config's `subsetSize`) wins over it. Only the
    /// aperture's members are connected, so they are all [`Balancer::endpoints`] shows, and
    /// all that outlier ejection and fail-fast's messages count.
    pub fn aperture(mut self, aperture: ApertureConfig) -> Self {
        self.aperture = Some(aperture);
        self
    }

    /// This client's place among the clients of the same service (client `index` of `count`,
    /// from a StatefulSet's ordinal, say): its subset or aperture is then its slice of a ring
    /// they all share, so that between them every endpoint has a client (and, with subsets of
    /// one size, none has more than one client more than another; Finagle's deterministic
    /// aperture; see
    /// [`crate::discovery::subset`]). It never takes fewer endpoints than its slice,
    /// `ceil(endpoints / count)`: a lone client (`0/1`) uses every endpoint. Without a subset
    /// or an aperture (pick-first has none) it has nothing to place, and [`Builder::build`]
    /// says so.
    pub fn coordinate(mut self, coordinate: Coordinate) -> Self {
        self.coordinate = Some(coordinate);
        self
    }

    /// Report into these metrics (see [`metrics`]); off by default.
    pub fn metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Connect to the endpoints over TLS (and mTLS, with a client identity).
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Latency-outlier ejection settings. Unset, it is on for p2c and off for round-robin, so the
    /// baseline stays a plain baseline; `enabled: false` turns it off.
    pub fn outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// Silent-failure detection settings (`enabled: false` turns it off).
    pub fn silence(mut self, silence: SilenceConfig) -> Self {
        self.silence = silence;
        self
    }

    /// What probes an ejected endpoint when the call it is handed may not be duplicated (no
    /// retry or hedging policy for its method): default, a grpc.health.v1 `Check`. A call that may
    /// be duplicated is copied as the probe instead; either way no caller waits for the probe.
    pub fn probe(mut self, probe: ProbeCall) -> Self {
        self.probe = probe;
        self
    }

    /// The grpc.health.v1 service name each endpoint is watched for (default `""`: the server).
    pub fn health_service(mut self, service: impl Into<String>) -> Self {
        self.health.service = service.into();
        self
    }

    /// The balancing policy (default p2c over peak-EWMA, or what the service config chooses);
    /// set here, it wins over the service config's.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self.policy_set = true;
        self
    }

    /// Every call's deadline, unless the caller's `grpc-timeout` is shorter (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.call.timeout = timeout;
        self
    }

    /// At most this many calls in flight through the balancer, all clones together (default
    /// 10,000; at least 1). A full balancer is not ready: tonic's clients wait in `ready()` until
    /// an answer ends (a stream counts until its last message), so a runaway caller meets
    /// backpressure instead of piling up requests. That wait is the caller's, as with any tower
    /// service, and a call's deadline starts once it has its slot (a caller that skips
    /// `poll_ready` waits inside the call, at most its deadline, then gets
    /// `RESOURCE_EXHAUSTED`). A clone that polled while full keeps its turn until it is dropped
    /// or polled again.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// How long a call waits for a ready endpoint before `UNAVAILABLE` (default 3 s).
    pub fn ready_wait(mut self, wait: Duration) -> Self {
        self.call.ready_wait = wait;
        self
    }

    /// The gRPC service config (JSON, as every gRPC implementation reads it): per-method
    /// timeouts, retry and hedging policies, retry throttling, and the balancing policy. Without
    /// one, no call is retried or hedged. An invalid config is an error naming the field.
    pub fn service_config(mut self, json: &str) -> Result<Self, ServiceConfigError> {
        self.call.service_config = Arc::new(ServiceConfig::from_json(json)?);
        Ok(self)
    }

    /// The largest request body kept so that a retry or a hedge can send it again (256 KiB by
    /// default, as grpc-go's). A larger request, or one whose caller is still writing it (a live
    /// client or bidirectional stream), is sent once and never tried again.
    pub fn retry_buffer_limit(mut self, bytes: usize) -> Self {
        self.call.retry_buffer_limit = bytes;
        self
    }

    /// Which calls are hedged, and when (`HedgeDelay::Off` turns hedging off).
    pub fn hedge(mut self, hedge: HedgeConfig) -> Self {
        self.call.hedge = hedge;
        self
    }

    /// All call settings at once.
    pub fn call_config(mut self, call: CallConfig) -> Self {
        self.call = call;
        self
    }

    /// DNS pacing (TTL floor and ceiling, backoff).
    pub fn dns(mut self, dns: DnsConfig) -> Self {
        self.dns = dns;
        self
    }

    /// Peak-EWMA settings.
    pub fn ewma(mut self, ewma: EwmaConfig) -> Self {
        self.ewma = ewma;
        self
    }

    /// Failure accrual settings.
    pub fn accrual(mut self, accrual: AccrualConfig) -> Self {
        self.accrual = accrual;
        self
    }

    /// Connection settings (connect timeout, HTTP/2 keepalive).
    pub fn connect(mut self, connect: ConnectConfig) -> Self {
        self.connect = connect;
        self
    }

    /// Health watch settings (service name, backoff).
    pub fn health(mut self, health: HealthConfig) -> Self {
        self.health = health;
        self
    }

    /// Builds the balancer and waits (up to the ready wait) until an endpoint is ready.
    pub async fn build(self) -> Result<Balancer, BuildError> {
        let wait = self.call.ready_wait;
        let balancer = self.build_lazy()?;
        balancer.wait_ready(wait).await;
        Ok(balancer)
    }

    /// Builds the balancer without waiting; discovery and health checks start in the background.
    /// Must be called inside a tokio runtime.
    pub fn build_lazy(self) -> Result<Balancer, BuildError> {
        let custom = self.discovery.as_ref().map(|d| {
            d.0.lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| Box::pin(futures::stream::pending()))
        });
        // With discovery of your own, the target only names the balancer.
        let parsed = match custom {
            Some(changes) => Err(changes),
            None => Ok(self
                .target
                .parse::<Target>()
                .map_err(|source| BuildError::Target {
                    target: self.target.clone(),
                    source,
                })?),
        };
        let mut connect = self.connect;
        if let Some(tls) = &self.tls {
            connect.tls = Some(tls.connector()?);
        }
        // The config's balancing policy, unless the builder chose one itself; its p2c outlier
        // settings whenever the policy is p2c, unless the builder set its own.
        let config_lb = &self.call.service_config.load_balancing;
        let policy = match (config_lb, self.policy_set) {
            (Some(service_config::LoadBalancing::RoundRobin), false) => Policy::RoundRobin,
            (Some(service_config::LoadBalancing::PickFirst), false) => Policy::PickFirst,
            (Some(service_config::LoadBalancing::P2c(_)), false) => Policy::P2c,
            _ => self.policy,
        };
        let outlier = match (config_lb, policy) {
            (Some(service_config::LoadBalancing::P2c(o)), Policy::P2c) => self.outlier.or(Some(*o)),
            _ => self.outlier,
        };
        let mut health = self.health.clone();
        if let (true, Some(service)) = (
            health.service.is_empty(),
            &self.call.service_config.health_check_service,
        ) {
            health.service = service.clone();
        }
        let connect_timeout = connect.connect_timeout;
        let membership = match (
            self.subset.or(self.call.service_config.subset_size),
            self.aperture,
        ) {
            (Some(size), _) => Membership::Subset(size),
            // Pick-first sends every call to one endpoint: an aperture sized by its calls in
            // flight would only open connections it never uses.
            (None, Some(aperture)) if aperture.enabled && policy != Policy::PickFirst => {
                Membership::Aperture(ApertureConfig {
                    // A member may take a connect timeout, and a TLS handshake and its first
                    // health answer after that, before it is in rotation: not yet missing.
                    settle: aperture.settle.max(connect_timeout * 2),
                    ..aperture
                })
            }
            _ => Membership::All,
        };
        if let (Membership::All, Some(coordinate)) = (membership, self.coordinate) {
            return Err(BuildError::Coordinate(coordinate));
        }
        let mut discovery = match parsed {
            Ok(target) => discovery::spawn(&target, &self.dns)?,
            Err(changes) => discovery::from_stream(changes),
        };
        let live_config = live_config::LiveConfig::new(self.call.service_config.clone());
        if let Some(records) = discovery.config_records.take() {
            tokio::spawn(dns_config::follow(
                records,
                live_config.clone(),
                self.call.service_config.clone(),
                self.target.clone(),
            ));
        }
        let registry = Registry::new(self.target.clone());
        if let Some(metrics) = &self.metrics {
            metrics.attach(&registry);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let discover =
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>);

        let probe = probe::OwnProbe::new(&self.probe, &health.service);
        let settings = EndpointSettings {
            connect,
            health,
            accrual: self.accrual,
            ewma: self.ewma,
            membership,
            coordinate: self.coordinate,
            probe,
        };
        let manager = tokio::spawn(registry::manage(discovery, registry.clone(), settings, tx));

        let outlier = outlier.unwrap_or(OutlierConfig {
            enabled: policy == Policy::P2c,
            ..OutlierConfig::default()
        });
        let detector = outlier
            .enabled
            .then(|| tokio::spawn(outlier::detect(Arc::downgrade(&registry), outlier)));
        let silence = self.silence;
        let silence_detector = silence
            .enabled
            .then(|| tokio::spawn(silence::detect(Arc::downgrade(&registry), silence)));

        let inner: Inner = match policy {
            Policy::P2c => BoxService::new(
                Balance::new(discover).map_response(|r: http::Response<_>| r.map(Body::new)),
            ),
            Policy::RoundRobin => BoxService::new(
                round_robin::RoundRobin::new(discover)
                    .map_response(|r: http::Response<_>| r.map(Body::new)),
            ),
            Policy::PickFirst => BoxService::new(
                round_robin::RoundRobin::pick_first(discover)
                    .map_response(|r: http::Response<_>| r.map(Body::new)),
            ),
        };
        // The wait for a ready endpoint is never longer than a call's deadline.
        let ready_wait = self.call.ready_wait.min(self.call.timeout);
        let stack = FailFastLayer::new(ready_wait, registry.clone()).layer(inner);
        let buffer = Buffer::new(stack, self.buffer);
        Ok(Balancer {
            stack: call::stack(&self.call, &live_config, &registry, buffer),
            limit: limit::InFlight::new(self.max_in_flight),
            shared: Arc::new(Shared {
                registry,
                policy,
                config: self.call,
                live_config,
                manager,
                detector,
                silence_detector,
                metrics: self.metrics,
            }),
        })
    }
}

// === impl Balancer ===

/// A balanced, health-aware gRPC service: hand it to any generated tonic client. Cheap to clone;
/// every clone shares the same endpoints. Background tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Balancer {
    stack: call::Stack,
    shared: Arc<Shared>,
    limit: limit::InFlight,
}

pub(crate) struct Shared {
    registry: Arc<Registry>,
    policy: Policy,
    config: CallConfig,
    live_config: live_config::LiveConfig,
    manager: tokio::task::JoinHandle<()>,
    detector: Option<tokio::task::JoinHandle<()>>,
    silence_detector: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<Metrics>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.manager.abort();
        for task in [&self.detector, &self.silence_detector]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        self.registry.shutdown();
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("target", &self.target())
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl Balancer {
    /// Starts configuring a balancer for `target` (see [`crate::target`] for the syntax).
    pub fn builder(target: impl Into<String>) -> Builder {
        Builder {
            target: target.into(),
            policy: Policy::default(),
            policy_set: false,
            health: HealthConfig::default(),
            dns: DnsConfig::default(),
            ewma: EwmaConfig::default(),
            accrual: AccrualConfig::default(),
            connect: ConnectConfig::default(),
            call: CallConfig::default(),
            outlier: None,
            silence: SilenceConfig::default(),
            tls: None,
            buffer: 1024,
            max_in_flight: limit::DEFAULT_MAX_IN_FLIGHT,
            metrics: None,
            discovery: None,
            subset: None,
            aperture: None,
            coordinate: None,
            probe: ProbeCall::default(),
        }
    }

    /// The service config whose method policies are in force: the one it was built with, or the
    /// one DNS publishes ([`DnsConfig::service_config`]). Its balancing policy, throttling and
    /// health check name are the built config's, whatever DNS says.
    pub fn service_config(&self) -> Arc<ServiceConfig> {
        self.shared.live_config.current()
    }

    /// A snapshot of every discovered endpoint, ordered by address.
    pub fn endpoints(&self) -> Vec<EndpointSnapshot> {
        self.shared.registry.snapshot()
    }

    /// How many of the discovered endpoints the aperture uses now (`None` without an aperture,
    /// or before any address is known).
    pub fn aperture(&self) -> Option<usize> {
        self.shared.registry.aperture()
    }

    /// Hedges sent and hedges that answered first, across all clones.
    pub fn hedges(&self) -> (u64, u64) {
        self.shared.registry.hedges()
    }

    /// Hedging settings (GetPoint after the fleet's recent p95 by default).
    pub fn hedge_config(&self) -> &HedgeConfig {
        &self.shared.config.hedge
    }

    /// Retries made so far, across all clones.
    pub fn retries(&self) -> u64 {
        self.shared.registry.retries()
    }

    /// The target, as given.
    pub fn target(&self) -> &str {
        self.shared.registry.target()
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.shared.policy
    }

    /// Waits until at least one endpoint is in rotation, or `timeout` passes; says which. An
    /// endpoint on probation (`probing`) counts: its probe goes out with the next call, so
    /// waiting for it to be open to callers without sending one could wait forever. A caller
    /// left with probing endpoints only is failed fast (`UNAVAILABLE`, "… are ejected"), which a
    /// fresh balancer never is: none of its endpoints has been ejected yet.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        // `timeout` copes with any length, `Duration::MAX` included.
        tokio::time::timeout(timeout, self.shared.registry.until_ready())
            .await
            .is_ok()
    }

    /// Waits until every discovered endpoint has had its first word (it came into rotation, said
    /// it is not serving, or failed to connect or to answer at least once), or `timeout` passes;
    /// says which. A load that starts when the first endpoint is ready sends its first calls to
    /// the few that connected first, and pays for connecting the rest while it is measured.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.shared.registry.until_settled())
            .await
            .is_ok()
    }
}

impl Service<http::Request<Body>> for Balancer {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Backpressure is the in-flight bound only. An endpoint's readiness is awaited inside
        // the call, under its deadline, so that it can end in a status instead of a hang.
        std::task::ready!(self.limit.poll_acquire(cx));
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (stack, shared) = (self.stack.clone(), self.shared.clone());
        // The usual case, reserved by `poll_ready`, costs no wait and no timer.
        let reserved = self.limit.take();
        let later = reserved.is_none().then(|| self.limit.acquire());
        Box::pin(async move {
            let permit = match later {
                None => reserved,
                // A caller that skipped `poll_ready` waits here, at most a call's deadline.
                Some(wait) => match tokio::time::timeout(shared.config.timeout, wait).await {
                    Ok(permit) => permit,
                    Err(_) => return Ok(tonic::Status::resource_exhausted(
                        "the balancer's in-flight bound stayed full for the call's whole deadline",
                    )
                    .into_http()),
                },
            };
            call::run(stack, shared, request, permit).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiting_for_readiness_takes_any_timeout_and_ends_with_it() {
        let lb = Balancer::builder("mine")
            .discovery(futures::stream::pending::<discovery::Update>())
            .build_lazy()
            .unwrap();
        let started = tokio::time::Instant::now();
        assert!(!lb.wait_ready(Duration::from_millis(300)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        // No endpoint ever: a forever wait is still a wait, not an overflow.
        let forever = lb.wait_ready(Duration::MAX);
        assert!(tokio::time::timeout(Duration::from_secs(60), forever)
            .await
            .is_err());
    }
}
