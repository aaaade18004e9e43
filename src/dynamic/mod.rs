//! Calls to any gRPC method, known only at run time: what grpcurl and ghz do, through the
//! balancer. The method and its messages come from the service itself ([`schema`]: server
//! reflection, v1 then v1alpha) or from a `.proto` file or a descriptor set; messages are read and
//! written as JSON by the protobuf JSON mapping ([`json`]); [`codec`] puts them on the wire and
//! [`invoke`] makes the call, of any of the four kinds.
//!
//! Knows nothing of balancing: any tonic transport will do (the [`crate::Balancer`], a channel).

pub mod codec;
pub mod invoke;
pub mod json;
pub mod schema;

pub use invoke::{Answer, Invocation};
pub use schema::{Schema, SchemaError, Source};
