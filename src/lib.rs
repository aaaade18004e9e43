//! meshlb: client-side load balancing for gRPC, shown as a small service mesh.
//!
//! ```text
//!  target ──> discovery ──Change<addr>──> health gate ──> peak-EWMA p2c ──> call
//!  (target)   (discovery)                 (health)        (balance)
//!  every call: client span ──traceparent──> replica span ──> next hop   (telemetry)
//! ```
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
//! let lb = meshlb::Balancer::builder("dns:///users.meshlb.svc.cluster.local:50051")
//!     .health_service(meshlb::proto::USERGUIDE_SERVICE)
//!     .build()
//!     .await?;
//! let mut client = UserGuideServiceClient::new(lb.clone());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! The library, stage by stage:
//! - [`target`]: parses gRPC-style target strings (`dns:///host:port`, `ipv4:a:p,b:p`).
//! - [`discovery`]: turns a target into a stream of endpoint insertions and removals, on its own task.
//! - [`health`]: watches each endpoint's grpc.health.v1 status and opens or shuts its gate.
//! - [`balance`]: the balanced, cloneable service a tonic client runs over (p2c over peak-EWMA,
//!   failure accrual, latency-outlier ejection, fail-fast, deadlines, retries, hedging).
//! - [`telemetry`]: logs, OpenTelemetry export and W3C trace-context propagation.
//! - [`tls`]: certificates and TLS configs for replicas and clients.
//!
//! The server and the tools built on it:
//! - [`replica`]: the server every replica runs (gRPC + REST, health, reflection, drain, faults).
//! - [`fleet`]: a local fleet of replica processes; [`admin_client`]: a replica's admin service;
//!   [`netns`]: network namespaces to blackhole a replica in.
//! - [`load`]: load generation through any tonic transport; [`report`]: its tables and JSON.
//! - [`bench`](mod@bench): contenders compared scenario by scenario; [`chaos`]: faults for a
//!   local fleet.
//! - [`cli`]: the `meshlb` commands; the binary is a thin shell over it.
//! - [`proto`]: generated code; [`grpc`]: wire conventions both sides share.

#![warn(missing_docs)]

pub mod admin_client;
pub mod balance;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod discovery;
pub mod fleet;
pub mod grpc;
pub mod health;
pub mod load;
pub mod netns;
pub mod proto;
pub mod replica;
pub mod report;
pub mod target;
pub mod telemetry;
pub mod tls;

pub use balance::{Balancer, Policy};
pub use target::Target;
