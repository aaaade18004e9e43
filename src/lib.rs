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
//! - [`connection`]: one HTTP/2 connection per endpoint, driven with h2 and remade after a
//!   [`backoff`] when it ends.
//! - [`health`]: watches each endpoint's grpc.health.v1 status and opens or shuts its gate.
//! - [`balance`]: the balanced, cloneable service a tonic client runs over (p2c over peak-EWMA,
//!   failure accrual, latency-outlier ejection, fail-fast, deadlines, retries, hedging).
//! - [`telemetry`]: logs, OpenTelemetry export (over meshlb's own OTLP/gRPC exporter, which
//!   writes spans straight into the request) and W3C trace-context propagation.
//! - [`tls`]: certificates and TLS configs for replicas and clients.
//!
//! The server and the tools built on it:
//! - [`replica`]: the server every replica runs (gRPC + REST, health, reflection, drain, faults,
//!   metrics); [`metrics`]: `GET /metrics` for Prometheus, for the replica and the CLI.
//! - [`fleet`]: a local fleet of replica processes; [`admin_client`]: a replica's admin service;
//!   [`netns`]: network namespaces to blackhole a replica in.
//! - [`load`]: load generation through any tonic transport; [`report`]: its tables and JSON;
//!   [`dynamic`]: calls to any method, its schema from reflection or `.proto` files, JSON messages.
//! - [`bench`](mod@bench): contenders compared scenario by scenario; [`chaos`]: faults for a
//!   local fleet.
//! - [`cli`]: the `meshlb` commands; the binary is a thin shell over it.
//! - [`proto`]: generated code; [`grpc`]: wire conventions both sides share.

//! # Features
//! - default (`tools`): everything, the `meshlb` binary included.
//! - `server`: the replica ([`replica`]); pulls in axum and the server side of hyper.
//! - `tools`: the CLI, local fleets, load generation, benchmarks, chaos (implies `server`); pulls in
//!   clap, indicatif, rcgen, toml.
//! - no default features: the client library only (target, discovery, health, balance, grpc, tls
//!   for clients, telemetry), for `meshlb = { version = "...", default-features = false }`.

#![warn(missing_docs)]

// The client library: always built.
pub(crate) mod answer;
pub mod backoff;
pub mod balance;
pub mod connection;
pub mod discovery;
pub mod grpc;
pub mod health;
mod otlp;
pub mod proto;
pub mod target;
pub mod telemetry;
pub mod tls;

// The server side (feature `server`).
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod replica;

// The tools the binary is made of (feature `tools`, on by default).
#[cfg(feature = "tools")]
pub mod admin_client;
#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod chaos;
#[cfg(feature = "tools")]
pub mod cli;
#[cfg(feature = "tools")]
pub mod dynamic;
#[cfg(feature = "tools")]
pub mod fleet;
#[cfg(feature = "tools")]
pub mod heap;
#[cfg(feature = "tools")]
pub mod load;
#[cfg(feature = "tools")]
pub mod netns;
#[cfg(feature = "tools")]
pub mod report;

pub use balance::{Balancer, Policy};
pub use target::Target;
