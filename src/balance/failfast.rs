//! Fail fast: a bound on how long a call waits for any ready endpoint.
//!
//! Without it, an empty or all-unhealthy endpoint set makes every call wait forever: the balancer
//! stays `Pending`. After `wait`, this layer reports ready anyway and answers each call at once
//! with `UNAVAILABLE` and the reason (no endpoints / all unhealthy / all ejected), until the inner
//! balancer has a ready endpoint again. It sits inside the `Buffer`, so the buffer's worker is never
//! handed a readiness error (which would fail the buffer for good).
//!
//! It knows nothing of endpoints: the reason comes from a [`Readiness`] (the registry answers).

use super::deadline::Readiness;
use super::endpoint::BoxError;
use super::unavailable::{Reason, Unavailable};
use futures::future::Either;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tonic::body::Body;
use tower::{Layer, Service};

/// Builds [`FailFast`] services.
#[derive(Clone)]
pub struct FailFastLayer {
    wait: Duration,
    readiness: Arc<dyn Readiness>,
}

impl FailFastLayer {
    /// Waits at most `wait` for readiness; `readiness` explains why nothing is ready.
    pub fn new(wait: Duration, readiness: Arc<dyn Readiness>) -> Self {
        Self { wait, readiness }
    }
}

impl<S> Layer<S> for FailFastLayer {
    type Service = FailFast<S>;

    fn layer(&self, inner: S) -> FailFast<S> {
        FailFast::new(inner, self.wait, self.readiness.clone())
    }
}

/// Bounds the wait for readiness of `S`.
pub struct FailFast<S> {
    inner: S,
    wait: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    failing: bool,
    readiness: Arc<dyn Readiness>,
}

impl<S> FailFast<S> {
    /// Wraps `inner`. The first wait is counted from now, not from the first call: a caller that
    /// already waited for the balancer to become ready (as `meshlb client` does) must not wait a
    /// second time. Must run inside a tokio runtime.
    pub fn new(inner: S, wait: Duration, readiness: Arc<dyn Readiness>) -> Self {
        Self {
            inner,
            wait,
            timer: Some(Box::pin(tokio::time::sleep(wait))),
            failing: false,
            readiness,
        }
    }
}

impl<S> Service<http::Request<Body>> for FailFast<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(result) => {
                if self.failing {
                    tracing::info!(target_name = %self.readiness.target(), "an endpoint is ready again");
                }
                self.failing = false;
                self.timer = None;
                Poll::Ready(result)
            }
            Poll::Pending if self.failing => Poll::Ready(Ok(())),
            Poll::Pending => {
                let wait = self.wait;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.timer = None;
                self.failing = true;
                tracing::info!(target_name = %self.readiness.target(), ?wait, "failing fast: no endpoint became ready");
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.failing {
            // An endpoint may have turned ready since poll_ready; the balancer has not seen it yet.
            let why = self.readiness.why_unready().unwrap_or_else(|| {
                let target = self.readiness.target();
                Unavailable::new(Reason::Other, format!("no ready endpoint for {target} yet"))
            });
            return Either::Right(ready(Ok(why.into_http())));
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{answered, Fleet};
    use tonic::{Code, Status};
    use tower::ServiceExt;
    use tower_test::mock;

    type Mock = mock::Mock<http::Request<Body>, http::Response<Body>>;
    type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

    const WAIT: Duration = Duration::from_millis(500);

    fn fail_fast() -> (FailFast<Mock>, Handle, Arc<Fleet>) {
        let readiness = Fleet::new(false, "no endpoints for t");
        let (service, mut handle) = mock::pair();
        handle.allow(0);
        let layer = FailFastLayer::new(WAIT, readiness.clone());
        (layer.layer(service), handle, readiness)
    }

    fn request() -> http::Request<Body> {
        http::Request::new(Body::empty())
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_ready_waits_the_bound_then_answers_unavailable_with_the_reason() {
        let (service, _handle, readiness) = fail_fast();
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(service.oneshot(request()));
        let response = answered(call).await;
        assert_eq!(
            started.elapsed(),
            WAIT,
            "the wait is bounded, not shortened"
        );
        let status = Status::from_header_map(response.headers()).expect("a trailers-only status");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "no endpoints for t");
        let carried = response.extensions().get::<Unavailable>();
        assert_eq!(carried.map(|u| u.reason), Some(Reason::NoEndpoints));
        assert_eq!(readiness.asked(), 1, "counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn once_failing_calls_are_answered_at_once_until_an_endpoint_is_ready() {
        let (mut service, mut handle, readiness) = fail_fast();
        tokio::time::advance(WAIT).await;
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            let response = service
                .ready()
                .await
                .unwrap()
                .call(request())
                .await
                .unwrap();
            assert!(response.extensions().get::<Unavailable>().is_some());
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no second wait");
        assert_eq!(readiness.asked(), 3);

        // The balancer is ready again: calls go through, and are not failed fast.
        handle.allow(1);
        let call = service.ready().await.unwrap().call(request());
        let call = tokio::spawn(call);
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(http::Response::new(Body::empty()));
        let response = answered(call).await;
        assert!(response.extensions().get::<Unavailable>().is_none());
        assert_eq!(readiness.asked(), 3);

        // Nothing ready once more: a fresh wait, not an instant failure.
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(service.oneshot(request()));
        let response = answered(call).await;
        assert_eq!(started.elapsed(), WAIT);
        assert!(response.extensions().get::<Unavailable>().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_balancer_ready_from_the_start_that_empties_later_waits_a_full_bound() {
        let (mut service, mut handle, _) = fail_fast();
        handle.allow(1);
        let call = tokio::spawn(service.ready().await.unwrap().call(request()));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(http::Response::new(Body::empty()));
        answered(call).await;

        // Long after the first bound: its timer must not make the next empty spell fail at once.
        tokio::time::advance(WAIT * 4).await;
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(service.oneshot(request()));
        let response = answered(call).await;
        assert_eq!(started.elapsed(), WAIT);
        assert!(response.extensions().get::<Unavailable>().is_some());
    }
}
