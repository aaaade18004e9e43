//! Whose failure is it? A broken connection (refused, reset or closed, a GOAWAY with an error, a
//! keepalive that went unanswered) is the endpoint's: it shuts the endpoint's gate and counts
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
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return blame_h2(h2);
        }
        next = e.source();
    }
    Blame::Endpoint
}

fn blame_h2(error: &h2::Error) -> Blame {
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

    #[test]
    fn resets_blame_the_call_and_goaways_the_endpoint() {
        let reset: h2::Error = h2::Reason::INTERNAL_ERROR.into();
        match blame(&reset) {
            Blame::Call(code, _) => assert_eq!(code, Code::Internal),
            other => panic!("{other:?}"),
        }
        let refused: h2::Error = h2::Reason::REFUSED_STREAM.into();
        assert!(matches!(blame(&refused), Blame::Call(Code::Unavailable, _)));
        let plain = std::io::Error::other("connection refused");
        assert_eq!(blame(&plain), Blame::Endpoint);
    }

    #[test]
    fn finds_the_stream_error_under_wrappers() {
        #[derive(Debug)]
        struct Wrapper(h2::Error);
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
        let wrapped = Wrapper(h2::Reason::CANCEL.into());
        assert!(matches!(blame(&wrapped), Blame::Call(Code::Cancelled, _)));
    }
}
