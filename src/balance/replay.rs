//! What a call that may be tried again keeps of its request: the body the caller has already
//! written, up to a limit. A unary request (and a streaming one whose messages are all there) is
//! read at once and kept, so a retry or a hedge sends it again. A request still being written (a
//! client stream waiting for its caller, a bidirectional stream waiting for answers) or one over
//! the limit is sent once, as it comes: waiting for its end would hold the call back, or deadlock
//! it, and keeping it all would hold its memory (gRPC's A6 commits such calls the same way).
//!
//! As a tower layer ([`ReplayLayer`]), it reads the body of a call that its method's policy may
//! send more than once, and hands the request down with the body kept in its extensions
//! (`Duplicable`), which is what the retry and hedge layers copy it from ([`copy`]). A call
//! that will be sent once passes through untouched: its body is not copied.
//!
//! Knows HTTP bodies and which methods have a policy; nothing of endpoints or of how tries go.

use super::endpoint::BoxError;
use super::hedge::HedgeConfig;
use super::live_config::LiveConfig;
use super::probe::Duplicable;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::Either;
use http_body::{Body as _, Frame};
use http_body_util::Full;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tower::{Layer, Service};

/// Which calls keep their body, and how much of it at most.
#[derive(Clone)]
pub struct ReplayLayer {
    settings: Arc<Settings>,
}

struct Settings {
    service_config: LiveConfig,
    adaptive_hedge: HedgeConfig,
    limit: usize,
}

impl ReplayLayer {
    /// Keeps the body (up to `limit` bytes) of a call whose method `service_config` retries or
    /// hedges, or that `adaptive_hedge` hedges.
    pub fn new(
        service_config: impl Into<LiveConfig>,
        adaptive_hedge: HedgeConfig,
        limit: usize,
    ) -> Self {
        Self {
            settings: Arc::new(Settings {
                service_config: service_config.into(),
                adaptive_hedge,
                limit,
            }),
        }
    }
}

impl<S> Layer<S> for ReplayLayer {
    type Service = Replay<S>;
    fn layer(&self, inner: S) -> Replay<S> {
        Replay {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// A service whose retryable calls carry their body, kept.
#[derive(Clone)]
pub struct Replay<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl Settings {
    fn keeps(&self, path: &str) -> bool {
        self.service_config
            .current()
            .method(path)
            .is_some_and(|m| m.retry.is_some() || m.hedging.is_some())
            || self.adaptive_hedge.applies_to(path)
    }
}

impl<S> Service<http::Request<Body>> for Replay<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<Body>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !self.settings.keeps(request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        let (parts, body) = request.into_parts();
        let request = match read(body, self.settings.limit) {
            Ok(Request::Kept(bytes)) => {
                let mut request =
                    http::Request::from_parts(parts, Body::new(Full::new(bytes.clone())));
                request.extensions_mut().insert(Duplicable(bytes));
                request
            }
            // Still being written, or too big to keep: one try, as it comes.
            Ok(Request::Once(body)) => http::Request::from_parts(parts, body),
            Err(status) => return Either::Right(std::future::ready(Ok(status.into_http()))),
        };
        Either::Left(self.inner.call(request))
    }
}

/// A copy of `request`, extensions and all, when its body was kept (`Duplicable`).
pub fn copy(request: &http::Request<Body>) -> Option<http::Request<Body>> {
    let Duplicable(body) = request.extensions().get::<Duplicable>()?;
    let mut copy = http::Request::new(Body::new(Full::new(body.clone())));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// The largest request body kept for a retry by default (grpc-go's and grpc-core's retry buffer).
pub const DEFAULT_LIMIT: usize = 256 * 1024;

/// A request body as [`read`] found it.
pub enum Request {
    /// Complete and within the limit: may be sent again.
    Kept(Bytes),
    /// Still being written, or over the limit: to be sent once.
    Once(Body),
}

/// Reads what `body` holds right now, without waiting for more. Polled with a waker that does
/// nothing: it never waits, and whoever polls the rest of the body (hyper) registers its own.
pub fn read(mut body: Body, limit: usize) -> Result<Request, tonic::Status> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut kept = Kept::default();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Ok(Request::Kept(kept.take())),
            Poll::Ready(Some(Err(status))) => return Err(status),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    kept.push(data.copy_to_bytes(data.remaining()));
                    if kept.len() > limit {
                        return Ok(Request::Once(resumed(kept.take(), None, body)));
                    }
                }
                // gRPC requests carry no trailers; a body that sends some is passed on as is.
                Err(frame) => return Ok(Request::Once(resumed(kept.take(), Some(frame), body))),
            },
            // The caller has not written the rest yet: this call is not tried again.
            Poll::Pending => return Ok(Request::Once(resumed(kept.take(), None, body))),
        }
    }
}

/// The frames read so far. A unary request is one frame, kept as it came (no copy); only a
/// second frame makes a buffer.
#[derive(Default)]
struct Kept {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Kept {
    fn push(&mut self, data: Bytes) {
        match &mut self.more {
            Some(more) => more.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut more = BytesMut::from(std::mem::take(&mut self.first));
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn len(&self) -> usize {
        self.more.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    fn take(&mut self) -> Bytes {
        match self.more.take() {
            Some(more) => more.freeze(),
            None => std::mem::take(&mut self.first),
        }
    }
}

fn resumed(prefix: Bytes, pending: Option<Frame<Bytes>>, rest: Body) -> Body {
    Body::new(Resumed {
        prefix: Some(prefix),
        pending,
        rest,
    })
}

/// What was read, then the rest of the body as it comes.
struct Resumed {
    prefix: Option<Bytes>,
    pending: Option<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Resumed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(prefix) = self.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(Bytes::is_empty)
            && self.pending.is_none()
            && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streamed() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, tonic::Status>(Frame::data(b)));
        (tx, Body::new(http_body_util::StreamBody::new(frames)))
    }

    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn a_request_written_in_full_is_kept() {
        let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        match read(body, 16).unwrap() {
            Request::Kept(bytes) => assert_eq!(bytes, "hello"),
            Request::Once(_) => panic!("a complete body within the limit is kept"),
        }
    }

    #[tokio::test]
    async fn a_request_written_in_several_frames_is_kept_whole() {
        let (tx, body) = streamed();
        for part in ["one ", "two ", "three"] {
            tx.send(Bytes::from_static(part.as_bytes())).await.unwrap();
        }
        drop(tx);
        match read(body, 64).unwrap() {
            Request::Kept(bytes) => assert_eq!(bytes, "one two three"),
            Request::Once(_) => panic!("a complete body within the limit is kept"),
        }
    }

    #[tokio::test]
    async fn a_request_still_being_written_is_sent_once_and_whole() {
        let (tx, body) = streamed();
        tx.send(Bytes::from_static(b"first ")).await.unwrap();
        let Request::Once(body) = read(body, 1024).unwrap() else {
            panic!("a body whose caller has not finished is not kept");
        };
        // The caller goes on writing after the call has started.
        tx.send(Bytes::from_static(b"second")).await.unwrap();
        drop(tx);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, "first second");
    }

    #[tokio::test]
    async fn a_request_over_the_limit_is_sent_once_and_whole() {
        let body = Body::new(http_body_util::Full::new(Bytes::from(vec![7u8; 100])));
        let Request::Once(body) = read(body, 10).unwrap() else {
            panic!("a body over the limit is not kept");
        };
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 100);
    }
}
