//! How a gRPC call ends, read from its answer: the `grpc-status` of its trailers, or of its
//! headers for a trailers-only answer; the code of the error its body broke off with; `UNKNOWN`
//! when the body ended with no status; `CANCELLED` when the caller let the answer go first.
//!
//! A call ends with the last frame of its answer, not with its headers: a stream's headers come
//! before its first message, and a status in the trailers (a stream that fails half-way, a
//! deadline that passes mid-body) is known only at the end. [`Ending`] wraps an answer's body
//! and tells an [`Outcome`] (the client's call metrics and span, the replica's) once, when the
//! call ends. Dropping the outcome then is what ends a span.
//!
//! Knows gRPC statuses and HTTP bodies; nothing of what an outcome does with the code.

use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::Code;

/// What learns how a call ended.
pub trait Outcome {
    /// The call ended with `code`; called once.
    fn finish(&mut self, code: Code);

    /// A message's bytes went by (`len` of them).
    fn sent(&mut self, _len: usize) {}
}

/// Two outcomes of one call (its metrics and its span), told in turn.
impl<A: Outcome, B: Outcome> Outcome for (A, B) {
    fn finish(&mut self, code: Code) {
        self.0.finish(code);
        self.1.finish(code);
    }

    fn sent(&mut self, len: usize) {
        self.0.sent(len);
        self.1.sent(len);
    }
}

/// An outcome that may not be there (metrics off, a span not recorded).
impl<A: Outcome> Outcome for Option<A> {
    fn finish(&mut self, code: Code) {
        if let Some(outcome) = self {
            outcome.finish(code);
        }
    }

    fn sent(&mut self, len: usize) {
        if let Some(outcome) = self {
            outcome.sent(len);
        }
    }
}

/// The gRPC code of an error a body broke off with.
pub trait ErrorCode {
    /// The code the call ends with.
    fn code(&self) -> Code;
}

impl ErrorCode for tonic::Status {
    fn code(&self) -> Code {
        tonic::Status::code(self)
    }
}

/// A replica's answer broke off on its own side: whatever went wrong, it is the server's.
#[cfg(feature = "server")]
impl ErrorCode for axum::Error {
    fn code(&self) -> Code {
        Code::Internal
    }
}

/// The code in a `grpc-status` header (`None` without one, as in a stream's first headers), as
/// the server sent it. Only the code: tonic's `Status::from_header_map` also decodes the message
/// and copies the whole map (about 2k instructions on every call that reads its trailers), turns
/// a message that is not UTF-8 into `UNKNOWN` (the code here stays the server's, as grpc-go
/// reads it), and panics on a `grpc-status-details-bin` that is not base64 (never read here).
pub fn code_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get(crate::grpc::STATUS_HEADER)
        .map(|code| Code::from_bytes(code.as_bytes()))
}

/// An answer's body that tells its [`Outcome`] how the call ended (the module's doc says when).
#[derive(Debug)]
pub struct Ending<B, O: Outcome> {
    inner: B,
    /// Taken when told: the outcome is told once, and let go then.
    outcome: Option<O>,
}

impl<B, O: Outcome> Ending<B, O> {
    /// The body of an answer whose headers said `headers_code` (a trailers-only answer: the call
    /// has ended already, and its empty body may never be polled).
    pub fn new(inner: B, mut outcome: O, headers_code: Option<Code>) -> Self {
        let outcome = match headers_code {
            Some(code) => {
                outcome.finish(code);
                None
            }
            None => Some(outcome),
        };
        Self { inner, outcome }
    }

    fn end(&mut self, code: Code) {
        if let Some(mut outcome) = self.outcome.take() {
            outcome.finish(code);
        }
    }
}

impl<B, O> http_body::Body for Ending<B, O>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: ErrorCode,
    O: Outcome + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(outcome) = &mut this.outcome {
                        outcome.sent(data.len());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.end(code_in(trailers).unwrap_or(Code::Ok));
                }
            }
            Some(Err(error)) => this.end(error.code()),
            // Ended with no status: the answer broke off (told only if not told already).
            None => this.end(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B, O: Outcome> Drop for Ending<B, O> {
    /// Let go before it ended: the caller gave up on the call. The outcome is told now but let
    /// go after the body it wraps (fields drop after this), so a span of a try inside ends
    /// before the call's span around it.
    fn drop(&mut self) {
        if let Some(outcome) = &mut self.outcome {
            outcome.finish(Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    /// Keeps what it was told.
    #[derive(Debug, Clone, Default)]
    struct Told(Arc<Mutex<Vec<String>>>);

    impl Outcome for Told {
        fn finish(&mut self, code: Code) {
            self.0.lock().unwrap().push(format!("{code:?}"));
        }
        fn sent(&mut self, len: usize) {
            self.0.lock().unwrap().push(format!("{len} bytes"));
        }
    }

    impl Told {
        fn said(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    type Frames = Vec<Result<http_body::Frame<Bytes>, tonic::Status>>;

    fn body(frames: Frames) -> tonic::body::Body {
        tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    fn trailers(code: &str) -> http_body::Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        http_body::Frame::trailers(map)
    }

    fn data(n: usize) -> http_body::Frame<Bytes> {
        http_body::Frame::data(Bytes::from(vec![0; n]))
    }

    #[tokio::test]
    async fn a_stream_ends_with_its_trailers_status_not_at_its_headers() {
        let told = Told::default();
        let mut answer = Ending::new(
            body(vec![Ok(data(5)), Ok(data(7)), Ok(trailers("15"))]),
            told.clone(),
            None,
        );
        answer.frame().await.unwrap().unwrap();
        assert_eq!(told.said(), ["5 bytes"], "not ended after a first message");
        while answer.frame().await.is_some() {}
        assert_eq!(told.said(), ["5 bytes", "7 bytes", "DataLoss"]);
        drop(answer);
        assert_eq!(told.said().len(), 3, "told once, not again when dropped");
    }

    #[test]
    fn the_code_is_what_tonic_reads_but_a_bad_message_does_not_change_it() {
        for value in ["0", "4", "14", "16", "17", "99", "", "x", "1 "] {
            let mut map = http::HeaderMap::new();
            map.insert("grpc-status", value.parse().unwrap());
            map.insert("grpc-message", "a%20message".parse().unwrap());
            let tonic = tonic::Status::from_header_map(&map).map(|s| s.code());
            assert_eq!(code_in(&map), tonic, "grpc-status {value:?}");
        }
        assert_eq!(code_in(&http::HeaderMap::new()), None);
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", "14".parse().unwrap());
        map.insert("grpc-message", "%FF".parse().unwrap());
        assert_eq!(
            tonic::Status::from_header_map(&map).map(|s| s.code()),
            Some(Code::Unknown),
            "tonic's reading"
        );
        assert_eq!(code_in(&map), Some(Code::Unavailable), "the server's code");
    }

    #[tokio::test]
    async fn an_inner_answer_let_go_is_told_before_the_outer_outcome_is_let_go() {
        /// Says when it is let go.
        struct Goes(&'static str, Told);
        impl Outcome for Goes {
            fn finish(&mut self, code: Code) {
                self.1
                     .0
                    .lock()
                    .unwrap()
                    .push(format!("{} {code:?}", self.0));
            }
        }
        impl Drop for Goes {
            fn drop(&mut self) {
                self.1 .0.lock().unwrap().push(format!("{} gone", self.0));
            }
        }
        let told = Told::default();
        let inner = Ending::new(body(vec![Ok(data(1))]), Goes("try", told.clone()), None);
        let outer = Ending::new(inner, Goes("call", told.clone()), None);
        drop(outer);
        assert_eq!(
            told.said(),
            ["call Cancelled", "try Cancelled", "try gone", "call gone"],
            "the try's span ends inside the call's"
        );
    }

    #[tokio::test]
    async fn trailers_without_a_status_are_ok() {
        let told = Told::default();
        let answer = Ending::new(
            body(vec![Ok(http_body::Frame::trailers(http::HeaderMap::new()))]),
            told.clone(),
            None,
        );
        answer.collect().await.unwrap();
        assert_eq!(told.said(), ["Ok"]);
    }

    #[tokio::test]
    async fn a_trailers_only_answer_has_ended_at_its_headers() {
        let told = Told::default();
        let answer = Ending::new(body(vec![]), told.clone(), Some(Code::Unavailable));
        assert_eq!(told.said(), ["Unavailable"]);
        answer.collect().await.unwrap();
        assert_eq!(
            told.said(),
            ["Unavailable"],
            "the empty body's end says nothing more"
        );
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_ends_with_its_error_or_unknown() {
        let told = Told::default();
        let answer = Ending::new(
            body(vec![
                Ok(data(1)),
                Err(tonic::Status::deadline_exceeded("late")),
            ]),
            told.clone(),
            None,
        );
        assert!(answer.collect().await.is_err());
        assert_eq!(told.said(), ["1 bytes", "DeadlineExceeded"]);

        let told = Told::default();
        let answer = Ending::new(body(vec![Ok(data(2))]), told.clone(), None);
        answer.collect().await.unwrap();
        assert_eq!(told.said(), ["2 bytes", "Unknown"]);
    }

    #[tokio::test]
    async fn an_answer_let_go_before_its_end_is_cancelled() {
        let told = Told::default();
        let mut answer = Ending::new(
            body(vec![Ok(data(3)), Ok(trailers("0"))]),
            (told.clone(), Some(told.clone())),
            None,
        );
        answer.frame().await.unwrap().unwrap();
        drop(answer);
        assert_eq!(
            told.said(),
            ["3 bytes", "3 bytes", "Cancelled", "Cancelled"],
            "both outcomes are told"
        );
    }
}
