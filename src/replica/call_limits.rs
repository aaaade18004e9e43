//! What one gRPC call may do on the replica: how long it may run (the caller's `grpc-timeout`,
//! bounded by the replica's maximum call duration, so a stream whose caller never finishes it is
//! not held forever) and how many request messages it may send (exactly one for unary and
//! server-streaming methods, as gRPC requires).
//!
//! Knows nothing of routing or of the services behind it beyond two paths (health watches stream
//! for ever; reflection streams requests); it wraps request and response bodies.

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tonic::Status;

/// Health watches stream for as long as the client wants: the maximum call duration does not apply
/// to their answers (it still bounds the wait for their request, so an unfinished one is not held).
const UNBOUNDED_STREAMS: &[&str] = &["/grpc.health.v1.Health/Watch"];

/// Client- and bidi-streaming methods served on the replica; every other method takes exactly one
/// request message.
const STREAMING_REQUEST_PREFIXES: &[&str] = &["/grpc.reflection."];

/// Why a call's time limit is what it is, for the `DEADLINE_EXCEEDED` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The caller's `grpc-timeout`.
    Caller(Duration),
    /// The replica's `--max-call-duration`.
    Replica(Duration),
}

impl Limit {
    /// The time the call may take.
    pub fn duration(self) -> Duration {
        match self {
            Self::Caller(d) | Self::Replica(d) => d,
        }
    }

    /// The status a call gets when it runs past the limit.
    pub fn exceeded(self) -> Status {
        match self {
            Self::Caller(d) => Status::deadline_exceeded(format!(
                "the caller's deadline ({d:?}, grpc-timeout) passed in the replica"
            )),
            Self::Replica(d) => Status::deadline_exceeded(format!(
                "the call ran past the replica's maximum call duration ({})",
                humantime::format_duration(d)
            )),
        }
    }
}

/// How long each part of a call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Until the answer's headers: the request arrives and the handler runs.
    pub headers: Option<Limit>,
    /// The whole call, the answer's stream included.
    pub body: Option<Limit>,
}

/// The bounds of a call to `path` with these headers; an error for a malformed `grpc-timeout`
/// (answered with `INTERNAL`, as grpc-go does).
pub fn bounds_of(
    path: &str,
    headers: &HeaderMap,
    max_call_duration: Option<Duration>,
) -> Result<Bounds, Status> {
    let caller = crate::grpc::timeout(headers).map_err(|e| Status::internal(e.to_string()))?;
    let shorter = |replica: Option<Duration>| match (caller, replica) {
        (Some(c), Some(r)) if r < c => Some(Limit::Replica(r)),
        (Some(c), _) => Some(Limit::Caller(c)),
        (None, Some(r)) => Some(Limit::Replica(r)),
        (None, None) => None,
    };
    let streams_forever = UNBOUNDED_STREAMS.contains(&path);
    Ok(Bounds {
        headers: shorter(max_call_duration),
        body: shorter(max_call_duration.filter(|_| !streams_forever)),
    })
}

/// Whether a call to `path` must carry exactly one request message.
pub fn single_message(path: &str) -> bool {
    !STREAMING_REQUEST_PREFIXES
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

pin_project! {
    /// A request body that fails the call with `INTERNAL` when a second gRPC message starts. tonic
    /// decodes the first message of a unary call and drains the rest silently, so without this a
    /// second message would be ignored and the call answered OK.
    pub struct OneMessage<B> {
        #[pin]
        inner: B,
        framing: Framing,
    }
}

impl<B> OneMessage<B> {
    /// Checks `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            framing: Framing::default(),
        }
    }
}

impl<B> HttpBody for OneMessage<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.framing.feed(data.clone()) > 1 {
                        // tonic finds a Status in the error's source chain and answers with it.
                        let status = Status::internal(
                            "more than one request message for a method that takes one",
                        );
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the length-prefixed messages (1 flag byte, 4 length bytes, the payload) in a stream of
/// chunks split anywhere.
#[derive(Debug, Default)]
struct Framing {
    messages: usize,
    header: [u8; 5],
    header_len: usize,
    payload_left: u64,
}

impl Framing {
    /// Takes the next chunk; returns how many messages have started so far.
    fn feed(&mut self, mut chunk: Bytes) -> usize {
        while chunk.has_remaining() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(chunk.len() as u64)) as usize;
                chunk.advance(n);
                self.payload_left -= n as u64;
                continue;
            }
            if self.header_len == 0 {
                self.messages += 1;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            chunk.advance(n);
            self.header_len += n;
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.payload_left = u64::from(len);
                self.header_len = 0;
            }
        }
        self.messages
    }
}

pin_project! {
    /// A gRPC response body that ends with `DEADLINE_EXCEEDED` trailers once the call's limit
    /// passes, so a streaming answer is bounded after its headers too. The timer is armed only when
    /// the body has to wait.
    pub struct Bounded<B> {
        #[pin]
        inner: B,
        expires: Instant,
        limit: Limit,
        timer: Option<Pin<Box<Sleep>>>,
        done: bool,
    }
}

impl<B> Bounded<B> {
    /// Bounds `inner` by `limit`, counted from `start`.
    pub fn new(inner: B, start: Instant, limit: Limit) -> Self {
        // A limit of centuries (a mistyped flag) must not overflow the clock.
        let expires = start
            .checked_add(limit.duration())
            .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
        Self {
            inner,
            expires,
            limit,
            timer: None,
            done: false,
        }
    }
}

impl<B> HttpBody for Bounded<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let expires = *this.expires;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                *this.done = true;
                let mut trailers = HeaderMap::new();
                if let Err(error) = this.limit.exceeded().add_header(&mut trailers) {
                    tracing::debug!(%error, "cannot encode the deadline status");
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn counts_messages_split_anywhere() {
        let mut bytes = message(3);
        bytes.extend(message(0));
        bytes.extend(message(300));
        for split in 0..bytes.len() {
            let mut f = Framing::default();
            f.feed(Bytes::copy_from_slice(&bytes[..split]));
            assert_eq!(
                f.feed(Bytes::copy_from_slice(&bytes[split..])),
                3,
                "{split}"
            );
        }
        let mut one = Framing::default();
        for b in message(10) {
            assert_eq!(one.feed(Bytes::copy_from_slice(&[b])), 1);
        }
    }

    #[tokio::test]
    async fn a_second_message_is_an_internal_error() {
        let mut bytes = message(2);
        bytes.extend(message(2));
        let body = OneMessage::new(http_body_util::Full::new(Bytes::from(bytes)));
        let err = body.collect().await.unwrap_err();
        let status = err.downcast::<Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::Internal);

        let single = OneMessage::new(http_body_util::Full::new(Bytes::from(message(5))));
        assert_eq!(single.collect().await.unwrap().to_bytes().len(), 10);
    }

    #[test]
    fn the_shorter_limit_wins_and_watch_answers_are_unbounded() {
        let mut h = HeaderMap::new();
        let max = Some(Duration::from_secs(60));
        let replica = Some(Limit::Replica(Duration::from_secs(60)));
        let b = bounds_of("/a.B/C", &h, max).unwrap();
        assert_eq!((b.headers, b.body), (replica, replica));
        // A watch streams forever, but its request must still arrive.
        let w = bounds_of("/grpc.health.v1.Health/Watch", &h, max).unwrap();
        assert_eq!((w.headers, w.body), (replica, None));
        h.insert("grpc-timeout", "2S".parse().unwrap());
        let caller = Some(Limit::Caller(Duration::from_secs(2)));
        let b = bounds_of("/a.B/C", &h, max).unwrap();
        assert_eq!((b.headers, b.body), (caller, caller));
        let w = bounds_of("/grpc.health.v1.Health/Watch", &h, max).unwrap();
        assert_eq!(w.body, caller);
        h.insert("grpc-timeout", "2H".parse().unwrap());
        assert_eq!(bounds_of("/a.B/C", &h, max).unwrap().body, replica);
        h.insert("grpc-timeout", "1.5S".parse().unwrap());
        assert_eq!(
            bounds_of("/a.B/C", &h, max).unwrap_err().code(),
            tonic::Code::Internal
        );
        assert!(single_message("/userguide.v1.UserGuideService/GetPoint"));
        assert!(!single_message(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_with_deadline_trailers() {
        let (_tx, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
        let stalled =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body));
        let limit = Limit::Replica(Duration::from_secs(5));
        let bounded = Bounded::new(stalled, Instant::now(), limit);
        let collected = bounded.collect().await.unwrap();
        let trailers = collected.trailers().expect("trailers").clone();
        assert_eq!(trailers.get("grpc-status").unwrap(), "4");
    }
}
