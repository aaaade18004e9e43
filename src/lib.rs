//! meshlb: client-side load balancing for gRPC, shown as a small service mesh.
//!
//! ```text
//!  target ──> discovery ──Change<addr>──> health gate ──> peak-EWMA p2c ──> call
//!  (target)   (discovery)                 (health)        (balance)
//! ```
//!
//! # Layout
//! - [`target`]: parses gRPC-style target strings (`dns:///host:port`, `ipv4:a:p,b:p`).
//! - [`discovery`]: turns a target into a stream of endpoint insertions and removals.
//! - [`health`]: watches each endpoint's grpc.health.v1 status and opens or shuts its gate.
//! - [`balance`]: the balanced, cloneable service a tonic client runs over.
//! - [`replica`]: the server every replica runs.
//! - [`telemetry`]: logging setup.
//! - [`cli`]: the `meshlb` commands; the binary is a thin shell over it.
//! - [`proto`]: generated code.

#![warn(missing_docs)]

pub mod balance;
pub mod bench;
pub mod cli;
pub mod discovery;
pub mod fleet;
pub mod health;
pub mod load;
pub mod proto;
pub mod replica;
pub mod report;
pub mod target;
pub mod telemetry;
pub mod tls;

pub use balance::{Balancer, Policy};
pub use target::Target;
