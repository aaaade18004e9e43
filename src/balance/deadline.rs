//! The top of the call path: every call's deadline, as a tower layer ([`DeadlineLayer`]).
//!
//! - The deadline is the shortest of the balancer's timeout, the method's `timeout` in the
//!   service config and the caller's `grpc-timeout`. It goes down the stack in the request's
//!   extensions ([`Expires`]), so that every try tells the server how long is left.
//! - Up to the response headers, the call is bounded by a timer: past it the caller gets
//!   `DEADLINE_EXCEEDED`, or `UNAVAILABLE` with the reason when no endpoint is ready at all (the
//!   reason is worth more than the timeout), never a hang.
//! - After the headers, [`DeadlineBody`]: a streaming answer that stalls past the deadline ends
//!   with `DEADLINE_EXCEEDED`. Its timer is only armed when the body actually has to wait, so a
//!   unary answer that is already complete costs no timer. It also holds the call's share of the
//!   balancer's in-flight bound ([`super::limit`]) until the answer ends.
//! - Whatever happens below, the caller gets a gRPC response: errors become a `grpc-status`.
//!
//! Knows the service config's timeouts; nothing of retries, endpoints or how a try is made.

use super::endpoint::BoxError;
use super::limit::Permit;
use super::live_config::LiveConfig;
use super::retry::Attempts;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

/// In a request's extensions: when its call's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expires(pub Instant);

/// What the deadline layer asks of the balancer below it when a call times out before its
/// answer: whether any endpoint is ready, and if not, why.
pub trait Readiness: Send + Sync {
    /// The balancer's name, for messages.
    fn target(&self) -> &str;
    /// `None` when some endpoint is ready; otherwise why none is, counted as a fail-fast.
    fn why_unready(&self) -> Option<super::unavailable::Unavailable>;
}

/// Where a deadline that cannot be represented ends: beyond any call's life.
const FAR_AWAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `after` from `now`; a length too long to represent (`Duration::MAX` as "none") is simply far
/// away, not an overflow.
pub fn expiry(now: Instant, after: Duration) -> Instant {
    now.checked_add(after).unwrap_or_else(|| now + FAR_AWAY)
}

/// The deadline's settings.
#[derive(Clone)]
pub struct DeadlineLayer {
    settings: Arc<Settings>,
}

struct Settings {
    timeout: Duration,
    service_config: LiveConfig,
    readiness: Arc<dyn Readiness>,
}

impl DeadlineLayer {
    /// Every call bounded by `timeout`, or less, as `service_config` and the caller say.
    pub fn new(
        timeout: Duration,
        service_config: impl Into<LiveConfig>,
        readiness: Arc<dyn Readiness>,
    ) -> Self {
        Self {
            settings: Arc::new(Settings {
                timeout,
                service_config: service_config.into(),
                readiness,
            }),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// A service whose calls end by their deadline.
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl Settings {
    /// The shortest of the balancer's own, the method's and the caller's.
    fn deadline(&self, path: &str, caller: Option<Duration>) -> Duration {
        let limit = self
            .service_config
            .current()
            .method(path)
            .and_then(|m| m.timeout)
            .filter(|t| !t.is_zero())
            .map_or(self.timeout, |t| t.min(self.timeout));
        caller.map_or(limit, |t| t.min(limit))
    }
}

/// The answer for a try that failed on its connection.
pub(super) fn connection_failed(target: &str, error: &BoxError) -> http::Response<Body> {
    Status::unavailable(format!("{target}: connection failed: {error}")).into_http()
}

impl<S> Deadline<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    /// Calls with `permit`, the call's share of the in-flight bound, held until the answer ends.
    pub fn call_with(
        &mut self,
        mut request: http::Request<Body>,
        permit: Option<Permit>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> {
        let caller = crate::grpc::timeout(request.headers()).ok().flatten();
        let deadline = self.settings.deadline(request.uri().path(), caller);
        let expires = expiry(Instant::now(), deadline);
        request.extensions_mut().insert(Expires(expires));
        let answer = self.inner.call(request);
        let settings = self.settings.clone();
        Box::pin(async move {
            let mut response = match tokio::time::timeout(deadline, answer).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => connection_failed(settings.readiness.target(), &error),
                Err(_) => {
                    let readiness = &settings.readiness;
                    return Ok(match readiness.why_unready() {
                        Some(unavailable) => unavailable.into_http(),
                        None => Status::deadline_exceeded(format!(
                            "no answer from {} within {deadline:?}",
                            readiness.target()
                        ))
                        .into_http(),
                    });
                }
            };
            if response.extensions().get::<Attempts>().is_none() {
                response.extensions_mut().insert(Attempts(1));
            }
            if response.headers().contains_key(crate::grpc::STATUS_HEADER) {
                // A trailers-only answer is complete already.
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(DeadlineBody::new(body, expires, permit))))
        })
    }
}

impl<S> Service<http::Request<Body>> for Deadline<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.call_with(request, None)
    }
}

pin_project! {
    /// A response body that fails with `DEADLINE_EXCEEDED` once `expires` passes.
    pub struct DeadlineBody {
        #[pin]
        inner: Body,
        expires: Instant,
        timer: Option<Pin<Box<Sleep>>>,
        expired: bool,
        permit: Option<super::limit::Permit>,
    }
}

impl DeadlineBody {
    /// Bounds `inner` by `expires`; `permit` is released when the answer ends.
    pub fn new(inner: Body, expires: Instant, permit: Option<super::limit::Permit>) -> Self {
        Self {
            inner,
            expires,
            timer: None,
            expired: false,
            permit,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        if let Poll::Ready(frame) = inner.as_mut().poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) || inner.is_end_stream() {
                // The answer is over (ended, or broken off), even if the caller keeps the body:
                // free its slot.
                this.permit.take();
            }
            return Poll::Ready(frame);
        }
        let expires = *this.expires;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                *this.expired = true;
                this.permit.take();
                // Let go of the stream now (its endpoint counts it in flight until it is
                // dropped), not when the caller drops a body that has ended.
                inner.set(Body::empty());
                Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the call's deadline passed while the answer was streaming",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_at_the_deadline() {
        struct Held(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Held {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = Held(dropped.clone());
        let frames =
            futures::stream::iter([Ok::<_, Status>(Frame::data(Bytes::from_static(b"first")))])
                .chain(futures::stream::pending())
                .map(move |frame| {
                    let _ = &held;
                    frame
                });
        let inner = Body::new(StreamBody::new(frames));
        let mut body = DeadlineBody::new(inner, Instant::now() + Duration::from_secs(2), None);
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(
            dropped.load(std::sync::atomic::Ordering::Relaxed),
            "the stalled stream is let go of at the deadline"
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_body_passes_through_untouched() {
        let inner = Body::new(http_body_util::Full::new(Bytes::from_static(b"all")));
        let mut body = DeadlineBody::new(inner, Instant::now(), None);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"all");
    }

    use futures::StreamExt;

    mod layer {
        use super::super::*;
        use crate::balance::service_config::ServiceConfig;
        use crate::balance::testing::{answered, Fleet};
        use tonic::Code;
        use tower::ServiceExt;
        use tower_test::mock;

        const CONFIG: &str =
            r#"{"methodConfig": [{"name": [{"service": "a.S"}], "timeout": "2s"}]}"#;

        type Mock = mock::Mock<http::Request<Body>, http::Response<Body>>;
        type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

        fn deadline(ready: bool) -> (Deadline<Mock>, Handle, Arc<Fleet>) {
            let fleet = Fleet::new(ready, "all 3 endpoints are connecting");
            let config = Arc::new(ServiceConfig::from_json(CONFIG).unwrap());
            let layer = DeadlineLayer::new(Duration::from_secs(10), config, fleet.clone());
            let (service, handle) = mock::pair();
            (layer.layer(service), handle, fleet)
        }

        fn request(path: &str, timeout: Option<&str>) -> http::Request<Body> {
            let mut request = http::Request::new(Body::empty());
            *request.uri_mut() = format!("http://x{path}").parse().unwrap();
            if let Some(t) = timeout {
                request
                    .headers_mut()
                    .insert("grpc-timeout", t.parse().unwrap());
            }
            request
        }

        fn status(response: &http::Response<Body>) -> Status {
            Status::from_header_map(response.headers()).expect("a trailers-only status")
        }

        #[test]
        fn the_deadline_is_the_shortest_of_the_balancers_the_methods_and_the_callers() {
            let (service, _, _) = deadline(true);
            let s = &service.settings;
            assert_eq!(s.deadline("/a.S/Get", None), Duration::from_secs(2));
            assert_eq!(s.deadline("/b.T/Get", None), Duration::from_secs(10));
            let short = Some(Duration::from_millis(300));
            assert_eq!(s.deadline("/a.S/Get", short), Duration::from_millis(300));
            let long = Some(Duration::from_secs(60));
            assert_eq!(s.deadline("/a.S/Get", long), Duration::from_secs(2));
            assert_eq!(s.deadline("/b.T/Get", long), Duration::from_secs(10));
        }

        #[tokio::test(start_paused = true)]
        async fn an_unanswered_call_ends_at_its_deadline_saying_why() {
            let (service, mut handle, fleet) = deadline(true);
            let started = Instant::now();
            let call = tokio::spawn(service.clone().oneshot(request("/a.S/Get", Some("300m"))));
            let (tried, _never) = handle.next_request().await.unwrap();
            assert_eq!(
                tried.extensions().get::<Expires>(),
                Some(&Expires(started + Duration::from_millis(300))),
                "the tries below learn when the call expires"
            );
            let response = answered(call).await;
            assert_eq!(started.elapsed(), Duration::from_millis(300));
            assert_eq!(status(&response).code(), Code::DeadlineExceeded);
            assert_eq!(fleet.asked(), 1);

            // Nothing ready: the reason, not the timeout.
            let (service, mut handle, _) = deadline(false);
            let call = tokio::spawn(service.oneshot(request("/a.S/Get", None)));
            let (_, _never) = handle.next_request().await.unwrap();
            let response = answered(call).await;
            let status = status(&response);
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "all 3 endpoints are connecting");
        }

        #[tokio::test(start_paused = true)]
        async fn no_deadline_at_all_is_a_far_one_not_a_panic() {
            let fleet = Fleet::new(true, "");
            let layer = DeadlineLayer::new(Duration::MAX, Arc::<ServiceConfig>::default(), fleet);
            let (service, mut handle) = mock::pair();
            let call = tokio::spawn(layer.layer(service).oneshot(request("/a.S/Get", None)));
            let (tried, answer) = handle.next_request().await.unwrap();
            let expires = tried.extensions().get::<Expires>().expect("an expiry").0;
            assert!(expires - Instant::now() > Duration::from_secs(3600 * 24 * 365));
            answer.send_response(Status::ok("").into_http());
            let response = answered(call).await;
            assert_eq!(status(&response).code(), Code::Ok);
        }

        #[tokio::test(start_paused = true)]
        async fn a_failed_try_becomes_unavailable_and_every_answer_counts_its_tries() {
            let (service, mut handle, _) = deadline(true);
            let call = tokio::spawn(service.clone().oneshot(request("/a.S/Get", None)));
            let (_, answer) = handle.next_request().await.unwrap();
            answer.send_error("connection refused");
            let response = answered(call).await;
            let status = status(&response);
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "t: connection failed: connection refused");
            assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(1)));
        }
    }
}
