//! One call through the balancer: its deadline, its retries and the retry budget.
//!
//! - The deadline is the balancer's default timeout, or the caller's `grpc-timeout` when shorter.
//!   Past it the caller gets `DEADLINE_EXCEEDED` (or `UNAVAILABLE` with the reason, when no
//!   endpoint is ready at all), never a hang.
//! - A call of a retryable (idempotent) method that failed on the connection, or was answered
//!   `UNAVAILABLE`, or was shed by an overloaded server (`RESOURCE_EXHAUSTED` with a
//!   `grpc-retry-pushback-ms`), is sent again, at most `max_retries` more times, while the retry
//!   budget allows (retries add at most `budget_percent` to the load, as Linkerd's budget does).
//!   A pushback delays the next try by that long; a negative or malformed one means no retry. A
//!   fail-fast answer is not retried: nothing is ready to retry on.
//! - With hedging on (opt-in, [`super::hedge`]), a hedgeable call that has not answered after the
//!   fleet's recent p95 is sent once more; the first useful answer wins. Hedges share the retry
//!   budget.
//! - The remaining time goes to the replica as `grpc-timeout`, and a streaming answer that stalls
//!   past the deadline ends with `DEADLINE_EXCEEDED` ([`super::deadline`]).
//! - Whatever happens, the caller gets a gRPC response; errors become a `grpc-status`.

use super::deadline::DeadlineBody;
use super::endpoint::{BoxError, EndpointError, ServedBy};
use super::failfast::FailedFast;
use super::hedge::{HedgeConfig, HedgeDelay};
use super::metrics::MeteredBody;
use super::Buffered;
use crate::grpc::Pushback;
use crate::telemetry;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::Duration;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};
use tracing::field::Empty;
use tracing::Instrument;

/// How calls are bounded and retried.
#[derive(Debug, Clone)]
pub struct CallConfig {
    /// Every call's deadline unless the caller sets a shorter `grpc-timeout`.
    pub timeout: Duration,
    /// How long a call may wait for any ready endpoint before failing with `UNAVAILABLE`.
    pub ready_wait: Duration,
    /// Extra tries after the first, for retryable methods.
    pub max_retries: u32,
    /// Retries may add at most this share of the call rate (0.2 = 20 %).
    pub budget_percent: f32,
    /// Retries always allowed per second, however few calls there are.
    pub budget_min_per_sec: u32,
    /// Path prefixes of the methods that are safe to retry (idempotent).
    pub retry_methods: Vec<String>,
    /// Which calls are hedged, and when.
    pub hedge: HedgeConfig,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            ready_wait: Duration::from_secs(3),
            max_retries: 2,
            budget_percent: 0.2,
            budget_min_per_sec: 10,
            retry_methods: vec![
                format!("/{}/", crate::proto::USERGUIDE_SERVICE),
                "/grpc.health.v1.Health/Check".into(),
            ],
            hedge: HedgeConfig::default(),
        }
    }
}

impl CallConfig {
    pub(super) fn budget(&self) -> TpsBudget {
        TpsBudget::new(
            Duration::from_secs(10),
            self.budget_min_per_sec,
            self.budget_percent,
        )
    }

    fn is_retryable(&self, path: &str) -> bool {
        self.max_retries > 0 && self.retry_methods.iter().any(|p| path.starts_with(p))
    }

    /// Whether calls to `path` have their body buffered (to be sent more than once).
    fn buffers(&self, path: &str) -> bool {
        self.is_retryable(path) || self.hedge.applies_to(path)
    }
}

/// Added to each response: how many tries it took (1 = no retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

/// Runs one call to completion of its response headers, inside a span for the logical call with
/// one child span per attempt (the replica's server span is a child of the attempt that reached it).
pub(super) async fn run(
    buffer: Buffered,
    shared: Arc<super::Shared>,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let (service, method) = telemetry::rpc_names(request.uri().path());
    let span = tracing::info_span!(
        target: crate::telemetry::RPC_SPANS,
        "grpc.call",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "internal",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        meshlb.target = %shared.registry.target(),
        meshlb.policy = %shared.policy,
        meshlb.attempts = Empty,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    );
    let mut metered = shared
        .metrics
        .as_ref()
        .map(|m| m.call(shared.registry.target(), request.uri().path()));
    let response = run_in_span(buffer, &shared, request)
        .instrument(span.clone())
        .await;
    let code = status_of(&response);
    span.record("rpc.grpc.status_code", code as i32);
    if code != Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(Attempts(n)) = response.extensions().get::<Attempts>() {
        span.record("meshlb.attempts", n);
    }
    let response = match metered.take() {
        None => response,
        // A trailers-only answer is complete: its status is in its headers.
        Some(mut call) if Status::from_header_map(response.headers()).is_some() => {
            call.finish(code);
            response
        }
        Some(call) => response.map(|body| Body::new(MeteredBody::new(body, call))),
    };
    Ok(response)
}

async fn run_in_span(
    buffer: Buffered,
    shared: &super::Shared,
    request: http::Request<Body>,
) -> http::Response<Body> {
    let config = &shared.config;
    let deadline = crate::grpc::timeout(request.headers())
        .ok()
        .flatten()
        .map_or(config.timeout, |t| t.min(config.timeout));
    let expires = tokio::time::Instant::now() + deadline;
    shared.budget.deposit();
    let path = request.uri().path().to_owned();
    let attempts = async {
        if !config.buffers(&path) {
            let result = attempt(buffer, request, 1, false, expires, shared).await;
            return (result, 1);
        }
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(status) => return (Ok(status.into_http()), 1),
        };
        let hedge_delay = config
            .hedge
            .applies_to(&path)
            .then(|| shared.latency.delay(config.hedge.delay))
            .flatten();
        let max_retries = if config.is_retryable(&path) {
            config.max_retries
        } else {
            0
        };
        let mut tries = 1;
        loop {
            let result = hedged(&buffer, &parts, &body, tries, hedge_delay, expires, shared).await;
            let pushback = match &result {
                Ok(response) => Pushback::of(response.headers()),
                Err(_) => None,
            };
            let again = tries <= max_retries
                && pushback != Some(Pushback::DoNotRetry)
                && (worth_retrying(&result) || was_shed(&result));
            if !again {
                return (result, tries);
            }
            if !shared.budget.withdraw() {
                shared.registry.count_budget_exhausted();
                return (result, tries);
            }
            if let Some(Pushback::Wait(pause)) = pushback {
                // The server said when to try again. A pause that outlasts the deadline would
                // only turn the server's answer into a timeout: give the caller the answer.
                if tokio::time::Instant::now() + pause >= expires {
                    return (result, tries);
                }
                tokio::time::sleep(pause).await;
            }
            shared.registry.count_retry();
            tracing::debug!(path = parts.uri.path(), tries, "retrying on the balancer");
            tries += 1;
        }
    };
    let (result, tries) = match tokio::time::timeout(deadline, attempts).await {
        Ok(done) => done,
        Err(_) => {
            // Still no ready endpoint when the deadline hit: the reason is worth more to the
            // caller than the timeout.
            let status = if shared.registry.any_ready() {
                Status::deadline_exceeded(format!(
                    "no answer from {} within {deadline:?}",
                    shared.registry.target()
                ))
            } else {
                Status::unavailable(shared.registry.fail_fast())
            };
            return status.into_http();
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err(error) => Status::unavailable(format!(
            "{}: connection failed: {error}",
            shared.registry.target()
        ))
        .into_http(),
    };
    response.extensions_mut().insert(Attempts(tries));
    if Status::from_header_map(response.headers()).is_some() {
        // A trailers-only answer is complete already.
        return response;
    }
    response.map(|body| Body::new(DeadlineBody::new(body, expires)))
}

/// One try, hedged after `delay` when there is one: the first useful answer wins and the other
/// attempt is cancelled.
async fn hedged(
    buffer: &Buffered,
    parts: &http::request::Parts,
    body: &Bytes,
    number: u32,
    delay: Option<Duration>,
    expires: tokio::time::Instant,
    shared: &super::Shared,
) -> Result<http::Response<Body>, BoxError> {
    let first = attempt(
        buffer.clone(),
        rebuild(parts, body),
        number,
        false,
        expires,
        shared,
    );
    let Some(delay) = delay else {
        return first.await;
    };
    tokio::pin!(first);
    tokio::select! {
        result = &mut first => return result,
        () = tokio::time::sleep(delay) => {}
    }
    if !shared.budget.withdraw() {
        shared.registry.count_budget_exhausted();
        return first.await;
    }
    shared.registry.count_hedge(false);
    // An event on the call's span for traces, not a log line per hedge.
    tracing::info!(target: telemetry::RPC_SPANS, delay_ms = delay.as_secs_f64() * 1000.0, "hedge");
    let second = attempt(
        buffer.clone(),
        rebuild(parts, body),
        number,
        true,
        expires,
        shared,
    );
    tokio::pin!(second);
    tokio::select! {
        result = &mut first => {
            if worth_retrying(&result) { second.await } else { result }
        }
        result = &mut second => {
            if worth_retrying(&result) {
                first.await
            } else {
                shared.registry.count_hedge(true);
                result
            }
        }
    }
}

/// One try, in its own client span, with the trace context in the request's metadata.
async fn attempt(
    mut buffer: Buffered,
    mut request: http::Request<Body>,
    number: u32,
    hedge: bool,
    expires: tokio::time::Instant,
    shared: &super::Shared,
) -> Result<http::Response<Body>, BoxError> {
    // The replica learns how long the caller still waits, as gRPC servers expect.
    let left = expires.saturating_duration_since(tokio::time::Instant::now());
    request
        .headers_mut()
        .insert("grpc-timeout", crate::grpc::timeout_value(left));
    let (service, method) = telemetry::rpc_names(request.uri().path());
    let span = tracing::info_span!(
        target: crate::telemetry::RPC_SPANS,
        "grpc.attempt",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        meshlb.attempt = number,
        meshlb.hedge = hedge,
        server.address = Empty,
        server.port = Empty,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    );
    telemetry::inject(&span, request.headers_mut());
    let started = tokio::time::Instant::now();
    let result = async {
        buffer.ready().await?;
        buffer.call(request).await
    }
    .instrument(span.clone())
    .await;
    let served_by = match &result {
        Ok(response) => response.extensions().get::<ServedBy>().map(|s| s.0),
        Err(error) => error.downcast_ref::<EndpointError>().map(|e| e.addr),
    };
    if let Some(addr) = served_by {
        span.record("server.address", tracing::field::display(addr.ip()));
        span.record("server.port", addr.port());
    }
    let code = match &result {
        Ok(response) => status_of(response),
        Err(_) => Code::Unavailable,
    };
    span.record("rpc.grpc.status_code", code as i32);
    if code != Code::Ok {
        span.record("otel.status_code", "ERROR");
    } else if let HedgeDelay::Quantile { quantile, .. } = shared.config.hedge.delay {
        shared.latency.record(started.elapsed(), quantile);
    }
    result
}

/// The status a response carries in its headers (a trailers-only answer); OK otherwise, since a
/// streaming answer's final status comes later, in its trailers.
fn status_of(response: &http::Response<Body>) -> Code {
    Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code())
}

fn worth_retrying(result: &Result<http::Response<Body>, BoxError>) -> bool {
    match result {
        Err(_) => true,
        Ok(response) => {
            response.extensions().get::<FailedFast>().is_none()
                && Status::from_header_map(response.headers())
                    .is_some_and(|s| s.code() == Code::Unavailable)
        }
    }
}

/// Shed by an overloaded server (`RESOURCE_EXHAUSTED` with a pushback): the call did no work
/// there, so another endpoint may take it, after the pushback.
fn was_shed(result: &Result<http::Response<Body>, BoxError>) -> bool {
    match result {
        Ok(response) => {
            Pushback::of(response.headers()).is_some()
                && Status::from_header_map(response.headers())
                    .is_some_and(|s| s.code() == Code::ResourceExhausted)
        }
        Err(_) => false,
    }
}

fn rebuild(parts: &http::request::Parts, body: &Bytes) -> http::Request<Body> {
    let mut request = http::Request::new(Body::new(Full::new(body.clone())));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_only_listed_methods() {
        let config = CallConfig::default();
        assert!(config.is_retryable("/userguide.v1.UserGuideService/GetPoint"));
        assert!(!config.is_retryable("/meshlb.admin.v1.AdminService/SetFaults"));
        let off = CallConfig {
            max_retries: 0,
            ..CallConfig::default()
        };
        assert!(!off.is_retryable("/userguide.v1.UserGuideService/GetPoint"));
    }

    #[test]
    fn unavailable_is_worth_retrying_but_fail_fast_and_not_found_are_not() {
        let unavailable = Status::unavailable("x").into_http();
        assert!(worth_retrying(&Ok(unavailable)));
        let mut failed_fast = Status::unavailable("x").into_http();
        failed_fast.extensions_mut().insert(FailedFast);
        assert!(!worth_retrying(&Ok(failed_fast)));
        assert!(!worth_retrying(&Ok(Status::not_found("x").into_http())));
        assert!(worth_retrying(&Err("connection refused".into())));
    }

    #[test]
    fn shed_answers_with_a_pushback_may_go_elsewhere() {
        let mut shed = Status::resource_exhausted("full").into_http();
        shed.headers_mut()
            .insert("grpc-retry-pushback-ms", "20".parse().unwrap());
        assert_eq!(
            Pushback::of(shed.headers()),
            Some(Pushback::Wait(Duration::from_millis(20)))
        );
        assert!(was_shed(&Ok(shed)));
        // A quota error without a pushback is the caller's problem, not a shed.
        assert!(!was_shed(&Ok(
            Status::resource_exhausted("quota").into_http()
        )));
        for bad in ["-1", "soon", ""] {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-retry-pushback-ms", bad.parse().unwrap());
            assert_eq!(Pushback::of(&h), Some(Pushback::DoNotRetry), "{bad:?}");
        }
    }
}
