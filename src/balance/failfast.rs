//! Fail fast: a bound on how long a call waits for any ready endpoint.
//!
//! Without it, an empty or all-unhealthy endpoint set makes every call wait forever: the balancer
//! stays `Pending`. After `wait`, this wrapper reports ready anyway and answers each call at once
//! with `UNAVAILABLE` and the reason (no endpoints / all unhealthy / all ejected), until the inner
//! balancer has a ready endpoint again. It sits inside the `Buffer`, so the buffer's worker is never
//! handed a readiness error (which would fail the buffer for good).

use super::registry::Registry;
use futures::future::Either;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tonic::body::Body;
use tower::Service;

use super::endpoint::BoxError;

/// Added to a response that fail-fast produced, so retries skip it.
#[derive(Debug, Clone, Copy)]
pub struct FailedFast;

/// Bounds the wait for readiness of `S`.
pub struct FailFast<S> {
    inner: S,
    wait: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    failing: bool,
    registry: Arc<Registry>,
}

impl<S> FailFast<S> {
    /// Wraps `inner`; `registry` explains why nothing is ready. The first wait is counted from
    /// now, not from the first call: a caller that already waited for the balancer to become
    /// ready (as `meshlb client` does) must not wait a second time. Must run inside a tokio
    /// runtime.
    pub fn new(inner: S, wait: Duration, registry: Arc<Registry>) -> Self {
        Self {
            inner,
            wait,
            timer: Some(Box::pin(tokio::time::sleep(wait))),
            failing: false,
            registry,
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
                    tracing::info!(target_name = %self.registry.target(), "an endpoint is ready again");
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
                tracing::info!(target_name = %self.registry.target(), reason = %self.registry.why_unavailable(), "failing fast");
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.failing {
            let status = tonic::Status::unavailable(self.registry.fail_fast());
            let mut response = status.into_http();
            response.extensions_mut().insert(FailedFast);
            return Either::Right(ready(Ok(response)));
        }
        Either::Left(self.inner.call(request))
    }
}
