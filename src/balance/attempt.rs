//! One try of a call, the bottom of the call path above the balancer's buffer: it tells the
//! server how long the caller still waits (`grpc-timeout`, from [`Expires`]), passes the trace
//! on, waits for a ready endpoint (the fail-fast layer below bounds that wait), and sends the
//! request; when an ejected endpoint sent a probe instead of it ([`probe`]: a copy of it, or a
//! call of the balancer's own), the request goes to another endpoint at once.
//!
//! Which span the try reports to: none for an unsampled call (it only forwards the trace
//! context, not sampled), the call's own span for its first try (a call tried once is one
//! span), a span of its own for a retry or a hedge ([`Try`]). The call's span comes in the
//! request (`CallSpan`), not as the current span.
//!
//! Knows requests, spans and the latency window hedging reads; nothing of policies.

use super::deadline::Expires;
use super::endpoint::{BoxError, EndpointError, ServedBy};
use super::hedge::{HedgeDelay, LatencyWindow};
use super::probe;
use super::retry::Try;
use super::span::CallSpan;
use super::Buffered;
use crate::answer::{Ending, Outcome};
use crate::telemetry;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::Code;
use tower::{Service, ServiceExt};
use tracing::Instrument;

/// Tries, each through the balancer's buffer.
#[derive(Clone)]
pub struct Attempt {
    /// Every layer above clones its inner service on every call (tower's retry keeps one for
    /// the next try); a clone of a buffer handle allocates, a clone of this `Arc` does not. Each
    /// try takes its own handle, once.
    buffer: Arc<Buffered>,
    /// Where successful tries' latencies go, and at which quantile, for adaptive hedging.
    latency: Option<(Arc<LatencyWindow>, f64)>,
}

impl Attempt {
    /// Tries through `buffer`; with `HedgeDelay::Quantile`, each success is recorded in `latency`.
    pub fn new(buffer: Buffered, latency: Arc<LatencyWindow>, delay: HedgeDelay) -> Self {
        let latency = match delay {
            HedgeDelay::Quantile { quantile, .. } => Some((latency, quantile)),
            _ => None,
        };
        Self {
            buffer: Arc::new(buffer),
            latency,
        }
    }
}

impl Service<http::Request<Body>> for Attempt {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    /// Always ready: the wait for an endpoint is inside the try, where the fail-fast layer
    /// bounds it and turns it into a status.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().run(request))
    }
}

impl Attempt {
    /// The call's span (when it has one) comes in the request ([`CallSpan`]); the
    /// current span is the caller's.
    async fn run(self, mut request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let Try { number, hedge } = request.extensions().get::<Try>().copied().unwrap_or(Try {
            number: 1,
            hedge: false,
        });
        let expires = request.extensions().get::<Expires>().map(|e| e.0);
        if let Some(expires) = expires {
            let left = expires.saturating_duration_since(tokio::time::Instant::now());
            request.headers_mut().insert(
                crate::grpc::TIMEOUT_HEADER,
                crate::grpc::timeout_value(left),
            );
        }
        let (span, own) = match request.extensions_mut().remove::<CallSpan>() {
            Some(call) if number == 1 && !hedge => {
                call.inject(request.headers_mut());
                (Some(call), false)
            }
            Some(call) => {
                let span = call.attempt(request.uri().path(), number, hedge);
                span.inject(request.headers_mut());
                (Some(span), true)
            }
            // No span of ours: the call wrote its trace context into the headers when it
            // started (the caller's, or an unsampled one), and every try carries it.
            None => (None, false),
        };
        let started = tokio::time::Instant::now();
        let mut buffer = Buffered::clone(&self.buffer);
        let send = async {
            let mut request = request;
            loop {
                buffer.ready().await?;
                match buffer.call(request).await {
                    Ok(response) => return Ok(response),
                    // An ejected endpoint sent its probe instead: this try goes elsewhere.
                    Err(error) => request = probe::again(error)?,
                }
            }
        };
        let mut result: Result<http::Response<Body>, BoxError> =
            match span.as_ref().and_then(CallSpan::bridged) {
                // p2c records its choice on the current span of the balancer's worker.
                Some(span) if telemetry::p2c_choices() => send.instrument(span.clone()).await,
                _ => send.await,
            };
        let headers_code = match &result {
            Ok(response) => crate::answer::code_in(response.headers()),
            Err(_) => Some(Code::Unavailable),
        };
        let code = headers_code.unwrap_or(Code::Ok);
        if let Some(span) = span {
            let served_by = match &result {
                Ok(response) => response.extensions().get::<ServedBy>().map(|s| s.0),
                Err(error) => error.downcast_ref::<EndpointError>().map(|e| e.addr),
            };
            if let Some(addr) = served_by {
                span.record_server(addr);
            }
            if own {
                // A try of its own ends with its answer, as the call does.
                match (&mut result, headers_code) {
                    (Ok(response), None) => {
                        let body = std::mem::take(response.body_mut());
                        let own = OwnTry { span, expires };
                        *response.body_mut() = Body::new(Ending::new(body, own, None));
                    }
                    _ => span.record_status(code),
                }
            } else if code != Code::Ok {
                // The call's own status is its last try's, recorded when it ends; a first try
                // that succeeded was the last (each record passes every layer of the
                // subscriber).
                span.record_first_status(code);
            }
        }
        if let (Code::Ok, Some((window, quantile))) = (code, &self.latency) {
            window.record(started.elapsed(), *quantile);
        }
        result
    }
}

/// The span of a retry or a hedge, which ends with its answer. The deadline layer above lets go
/// of a try's answer when the call's deadline passes: that try ended by the deadline (as the
/// call's span says), not by the caller.
struct OwnTry {
    span: CallSpan,
    expires: Option<tokio::time::Instant>,
}

impl Outcome for OwnTry {
    fn finish(&mut self, code: Code) {
        let past = self
            .expires
            .is_some_and(|expires| tokio::time::Instant::now() >= expires);
        self.span.record_status(match code {
            Code::Cancelled if past => Code::DeadlineExceeded,
            code => code,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::kept::Kept;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    const PATH: &str = "/userguide.v1.UserGuideService/ListUsers";

    /// The status code a retry's span records when its answer is let go (`finish(Cancelled)`)
    /// with the call's deadline `past` or not.
    fn let_go_code(past: bool) -> String {
        let kept = Kept::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        let subscriber =
            tracing_subscriber::registry().with(telemetry::bridge(provider.tracer("meshlb")));
        tracing::subscriber::with_default(subscriber, || {
            let call = CallSpan::call(PATH, "t", "p2c", None).expect("recorded");
            let now = tokio::time::Instant::now();
            let expires = if past {
                now.checked_sub(std::time::Duration::from_millis(1))
            } else {
                now.checked_add(std::time::Duration::from_secs(60))
            };
            let mut own = OwnTry {
                span: call.attempt(PATH, 2, false),
                expires,
            };
            own.finish(Code::Cancelled);
        });
        let spans = kept.0.lock().unwrap();
        let retry = spans
            .iter()
            .find(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "meshlb.hedge")
            })
            .expect("the retry's span ended");
        retry
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
            .map(|kv| kv.value.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_try_let_go_past_the_deadline_ended_by_it_before_it_by_the_caller() {
        assert_eq!(let_go_code(true), "4", "DEADLINE_EXCEEDED");
        assert_eq!(let_go_code(false), "1", "CANCELLED");
    }
}
