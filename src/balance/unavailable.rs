//! Why a call found no endpoint to go to: the typed error a caller can match on.
//!
//! It is built where the wait for an endpoint gives up: by fail-fast, when no endpoint became
//! ready within `ready_wait` ([`super::failfast`]), and by the deadline layer, when a call's
//! deadline passed while none was ready ([`super::deadline`]). The layers in between speak gRPC
//! answers, not errors, so it rides up in the answer's extensions (which is also how retries know
//! there was nothing to retry on); the balancer hands it to its caller as the error beneath
//! tonic's `UNAVAILABLE` status:
//!
//! ```
//! use meshlb::balance::{unavailable::Reason, Unavailable};
//! use std::error::Error;
//!
//! fn explain(status: &tonic::Status) -> &'static str {
//!     match status.source().and_then(|e| e.downcast_ref::<Unavailable>()) {
//!         Some(u) if u.reason == Reason::NoEndpoints => "discovery found no endpoint",
//!         Some(_) => "no endpoint is ready",
//!         None => "an answer from an endpoint",
//!     }
//! }
//! let status = tonic::Status::from_error(Box::new(Unavailable::new(Reason::NoEndpoints, "none")));
//! assert_eq!(status.code(), tonic::Code::Unavailable);
//! assert_eq!(explain(&status), "discovery found no endpoint");
//! ```
//!
//! Knows reasons and messages; nothing of endpoints, registries or layers.

use std::sync::Arc;
use tonic::Status;

/// Why no endpoint was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Discovery found no endpoint.
    NoEndpoints,
    /// Every endpoint reports NOT_SERVING.
    Unhealthy,
    /// Every endpoint is ejected.
    Ejected,
    /// Every endpoint is connecting or unreachable.
    Connecting,
    /// A mix of the above, or endpoints busy.
    Other,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 5] = [
        Self::NoEndpoints,
        Self::Unhealthy,
        Self::Ejected,
        Self::Connecting,
        Self::Other,
    ];

    /// Its metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no_endpoints",
            Self::Unhealthy => "unhealthy",
            Self::Ejected => "ejected",
            Self::Connecting => "connecting",
            Self::Other => "other",
        }
    }
}

/// No endpoint was ready for a call.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// Why.
    pub reason: Reason,
    /// The status the caller sees; also what tonic finds beneath the error.
    status: Arc<Status>,
}

impl Unavailable {
    /// No endpoint, for `reason`, explained by `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            status: Arc::new(Status::unavailable(message)),
        }
    }

    /// What the caller is told.
    pub fn message(&self) -> &str {
        self.status.message()
    }

    /// The answer that carries it up the stack: `UNAVAILABLE` with the message, and itself.
    pub fn into_http(self) -> http::Response<tonic::body::Body> {
        let mut response = self.status.as_ref().clone().into_http();
        response.extensions_mut().insert(self);
        response
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Unavailable {
    // tonic looks for a `Status` among an error's sources, and keeps the error as the status's
    // own source: so the caller gets the right code, and this beneath it.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.status.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn tonic_turns_it_into_unavailable_and_keeps_it_beneath() {
        let status = Status::from_error(Box::new(Unavailable::new(Reason::Ejected, "all out")));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "all out");
        let beneath = status
            .source()
            .and_then(|e| e.downcast_ref::<Unavailable>());
        assert_eq!(beneath.map(|u| u.reason), Some(Reason::Ejected));
    }

    #[test]
    fn its_answer_carries_the_status_and_itself() {
        let response = Unavailable::new(Reason::Connecting, "dialing").into_http();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "dialing");
        let carried = response.extensions().get::<Unavailable>().unwrap();
        assert_eq!(carried.reason, Reason::Connecting);
    }
}
