//! The replica: one server process of the mesh. It serves `UserGuideService` over gRPC and
//! REST/JSON on one port, reports its health over grpc.health.v1, answers server reflection, and
//! drains gracefully. It knows nothing of the client side: no discovery, no balancing.
//!
//! ```text
//!  serving port ──> conn (limits, timeouts) ──> route by content-type ──┬─ application/grpc ─> shed, call limits ─> tonic routes
//!                                                                       │    UserGuide, Health, Reflection
//!                                                                       └─ anything else ───> REST routes
//!  admin port (loopback; mTLS allow list) ──> conn ──> AdminService, Reflection
//!  metrics port (plaintext, for Prometheus) ──> GET /metrics
//!  every response: x-replica-id: <id>
//! ```
//!
//! Drain (on the `shutdown` future): health goes `NOT_SERVING` at once, the replica keeps serving
//! for `drain_grace` so clients move away, then stops accepting and finishes in-flight calls for
//! at most `drain_timeout`.

pub mod admin;
pub mod call_limits;
pub mod conn;
pub mod data;
pub mod faults;
pub mod metrics;
pub mod rest;
mod server;
pub mod service;
pub mod shed;

pub use admin::Allow;
pub use conn::ConnLimits;
pub use data::{DataError, UserRecord, Users};
pub use faults::{FaultConfig, Faults};
pub use server::{run, Listeners};
pub use service::UserGuide;

/// How many characters of caller input an error message repeats: a name of 17 KB must not
/// become a `grpc-message` that clients refuse.
pub const ECHO_LIMIT: usize = 128;

use std::time::Duration;

/// The default limit on concurrent gRPC calls: with 64 KiB messages, callers can make a replica
/// hold at most about 64 MiB of request data.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 1000;

/// The default bound on a call's duration.
pub const DEFAULT_MAX_CALL_DURATION: Duration = Duration::from_secs(300);

/// Everything a replica needs besides its listeners.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// Sent as `x-replica-id` on every response.
    pub id: String,
    /// The data it serves.
    pub users: Users,
    /// The fault knobs it starts with.
    pub faults: FaultConfig,
    /// How long to keep serving after going `NOT_SERVING`, so clients can move away.
    pub drain_grace: Duration,
    /// How long to wait for in-flight calls once accepting has stopped.
    pub drain_timeout: Duration,
    /// The largest request message accepted; larger ones get `RESOURCE_EXHAUSTED`.
    pub max_message_size: usize,
    /// Where GetPoint asks instead of the local data (a front tier over a back tier).
    pub upstream: Option<Upstream>,
    /// Serve TLS (and mTLS, if the config verifies clients) instead of plaintext.
    pub tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Also answer grpc.health.v1 in plaintext here (for Kubernetes probes when serving TLS).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Who may call the admin listener.
    pub admin_allow: Allow,
    /// Connection limits and timeouts, for every listener.
    pub limits: ConnLimits,
    /// The longest a call may run when its caller sets no shorter `grpc-timeout` (health
    /// watches excepted); `None`: unbounded.
    pub max_call_duration: Option<Duration>,
    /// gRPC calls beyond this many at once are shed with `RESOURCE_EXHAUSTED` and a pushback
    /// (health calls never are); 0: no limit.
    pub max_concurrent_calls: usize,
    /// Serve gRPC server reflection (v1 and v1alpha) on the serving port and the admin listener.
    pub reflection: bool,
}

/// A GetPoint answered elsewhere: `(name, age) -> points`. The replica only calls it; whoever
/// builds the replica decides how (the CLI uses a balanced client).
pub type Upstream = std::sync::Arc<
    dyn Fn(String, i32) -> futures::future::BoxFuture<'static, Result<i64, tonic::Status>>
        + Send
        + Sync,
>;

impl ReplicaConfig {
    /// A config with the defaults: no faults, 1 s grace, 10 s drain, 64 KiB messages, the default
    /// connection limits, calls of at most 5 minutes.
    pub fn new(id: impl Into<String>, users: Users) -> Self {
        Self {
            id: id.into(),
            users,
            faults: FaultConfig::default(),
            drain_grace: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024,
            upstream: None,
            tls: None,
            health_listen: None,
            admin_allow: Allow::default(),
            limits: ConnLimits::default(),
            max_call_duration: Some(DEFAULT_MAX_CALL_DURATION),
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            reflection: true,
        }
    }
}

impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("id", &self.id)
            .field("users", &self.users.len())
            .field("faults", &self.faults)
            .field("upstream", &self.upstream.is_some())
            .field("tls", &self.tls.is_some())
            .field("health_listen", &self.health_listen)
            .field("admin_allow", &self.admin_allow)
            .field("limits", &self.limits)
            .field("max_call_duration", &self.max_call_duration)
            .field("max_concurrent_calls", &self.max_concurrent_calls)
            .field("reflection", &self.reflection)
            .finish()
    }
}

/// Why a replica could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The replica id cannot be sent as a header value.
    #[error("replica id {0:?} is not a valid header value")]
    BadId(String),
    /// The fault knobs are out of range.
    #[error("{0}")]
    BadFaults(String),
    /// The listener failed.
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
}
