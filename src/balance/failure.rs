//! Whose failure is it? A broken connection (refused, reset or closed, a GOAWAY with an error, a
//! keepalive that went unanswered) is the endpoint's (a graceful GOAWAY is not: its unprocessed
//! streams are retried elsewhere): it shuts the endpoint's gate and counts
//! towards ejection. A stream error on a working connection (a RST_STREAM of any reason, a refused
//! stream, answer headers over the client's limit, a malformed answer) is about one call: it
//! becomes that call's status and never changes the endpoint's state, so one caller's bad request
//! cannot get an endpoint ejected for everyone.
//!
//! Knows nothing of endpoints or balancing: it reads an error chain.

use std::error::Error;
use tonic::Code;

/// Who a failure is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blame {
    /// The connection broke: the endpoint is suspect.
    Endpoint,
    /// One stream failed on a healthy connection: the call gets this status.
    Call(Code, String),
}

/// The largest header list the client accepts in an answer: grpc-go's default (16 MiB), so an
/// answer any gRPC server would send is never refused for its size.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 20;

/// Reads `error`'s chain for an HTTP/2 stream error.
pub fn blame(error: &(dyn Error + 'static)) -> Blame {
    let mut next: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.is::<crate::connection::NotSent>() {
            // The request never left: the connection closed (a graceful GOAWAY, or a close the
            // call raced) before it was sent. Nothing was processed, so it may go elsewhere, and
            // the closing is the connection's own business, not a failure of the endpoint.
            return Blame::Call(
                Code::Unavailable,
                "the connection closed before the call was sent; the call was not processed".into(),
            );
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return blame_h2(h2);
        }
        next = e.source();
    }
    Blame::Endpoint
}

fn blame_h2(error: &h2::Error) -> Blame {
    if error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR) {
        // A graceful GOAWAY (a draining or idle-closing server): this stream was never
        // processed, so it may go elsewhere, and the endpoint did nothing wrong.
        return Blame::Call(
            Code::Unavailable,
            "the server is closing this connection (GOAWAY); the call was not processed".into(),
        );
    }
    if error.is_go_away() || error.is_io() || !error.is_reset() {
        return Blame::Endpoint;
    }
    let reason = error.reason().unwrap_or(h2::Reason::INTERNAL_ERROR);
    // The codes gRPC's HTTP/2 transport spec maps RST_STREAM reasons to.
    let code = match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    };
    let message = if error.is_remote() {
        format!("the server reset the stream ({reason:?}); the connection is fine")
    } else {
        format!(
            "the answer was refused ({reason:?}): malformed, or its headers exceed {} MiB; the connection is fine",
            MAX_HEADER_LIST_SIZE >> 20
        )
    };
    Blame::Call(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    // h2 builds RST_STREAM errors only from frames it receives, so the reset path is proven end to
    // end in tests/it/uncooperative.rs; here, what can be built by hand.

    #[test]
    fn errors_that_are_not_stream_resets_blame_the_endpoint() {
        let plain = std::io::Error::other("connection refused");
        assert_eq!(blame(&plain), Blame::Endpoint);
        // An h2 error that is not a received or sent reset (a library-side reason).
        let reason: h2::Error = h2::Reason::INTERNAL_ERROR.into();
        assert!(!reason.is_reset());
        assert_eq!(blame(&reason), Blame::Endpoint);
    }

    #[test]
    fn a_call_whose_stream_never_opened_may_go_elsewhere() {
        let closed: h2::Error = h2::Reason::INTERNAL_ERROR.into();
        let error: Box<dyn Error + Send + Sync> =
            Box::new(crate::connection::NotSent::from(closed));
        match blame(&*error) {
            Blame::Call(Code::Unavailable, message) => {
                assert!(message.contains("not processed"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn looks_through_wrappers() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrapper(std::io::Error::other("reset by peer"));
        assert_eq!(blame(&wrapped), Blame::Endpoint);
    }
}
