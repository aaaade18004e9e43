//! One call through the balancer: its deadline, its retries and the retry budget, as the gRPC
//! service config of the balancer says ([`super::service_config`]).
//!
//! - The deadline is the shortest of the balancer's timeout (10 s by default), the method's
//!   `timeout` in the config and the caller's `grpc-timeout`. Past it the caller gets
//!   `DEADLINE_EXCEEDED` (or `UNAVAILABLE` with the reason, when no endpoint is ready at all),
//!   never a hang.
//! - A method with a `retryPolicy` is tried up to `maxAttempts` times: again after a code its
//!   policy lists (a failed connection counts as `UNAVAILABLE`; a shed call is
//!   `RESOURCE_EXHAUSTED`). Between tries: the server's `grpc-retry-pushback-ms` when it gave one
//!   (a negative or malformed one means no retry; the backoff starts over after it), else a
//!   random backoff below `initialBackoff × backoffMultiplier^n`, at most
//!   `maxBackoff`. Retries need the config's `retryThrottling` bucket to be more than half full
//!   or, for a config without one, meshlb's retry budget (retries add at most `budget_percent`
//!   to the load, as Linkerd's does).
//!   A fail-fast answer is not retried: nothing is ready to retry on.
//! - A method with a `hedgingPolicy` is sent once more after `hedgingDelay` if it has not
//!   answered (at once if it failed with a non-fatal code before that); the first answer that is
//!   not a non-fatal failure wins (meshlb sends at most one hedge). `Builder::hedge` adds meshlb's adaptive delay (the fleet's recent p95).
//! - With no policy for the method, a call is tried once and its body is not copied.
//! - The remaining time goes to the replica as `grpc-timeout`, and a streaming answer that stalls
//!   past the deadline ends with `DEADLINE_EXCEEDED` ([`super::deadline`]).
//! - Whatever happens, the caller gets a gRPC response; errors become a `grpc-status`.

use super::deadline::DeadlineBody;
use super::endpoint::{BoxError, EndpointError, ServedBy};
use super::failfast::FailedFast;
use super::hedge::{HedgeConfig, HedgeDelay};
use super::limit::Permit;
use super::metrics::MeteredBody;
use super::probe;
use super::replay;
use super::service_config::{HedgingPolicy, RetryPolicy, ServiceConfig};
use super::Buffered;
use crate::grpc::Pushback;
use crate::telemetry::{self, CallTrace};
use bytes::Bytes;
use http_body_util::Full;
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
    /// Every call's deadline, unless the method's config or the caller's `grpc-timeout` is shorter.
    pub timeout: Duration,
    /// How long a call may wait for any ready endpoint before failing with `UNAVAILABLE`.
    pub ready_wait: Duration,
    /// Retries may add at most this share of the call rate (0.2 = 20 %).
    pub budget_percent: f32,
    /// Retries always allowed per second, however few calls there are.
    pub budget_min_per_sec: u32,
    /// The gRPC service config: per-method timeouts, retry and hedging policies, throttling.
    /// Empty by default: no method is retried or hedged.
    pub service_config: Arc<ServiceConfig>,
    /// meshlb's adaptive hedging (opt-in), besides the config's `hedgingPolicy`.
    pub hedge: HedgeConfig,
    /// The largest request body kept so that a call can be tried again; a larger one (or one
    /// its caller is still writing) is sent once ([`super::replay`]).
    pub retry_buffer_limit: usize,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            ready_wait: Duration::from_secs(3),
            budget_percent: 0.2,
            budget_min_per_sec: 10,
            service_config: Arc::default(),
            hedge: HedgeConfig::default(),
            retry_buffer_limit: super::replay::DEFAULT_LIMIT,
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
}

/// What the config says of one call (borrowed from it: nothing is copied per call).
struct Plan<'a> {
    deadline: Duration,
    retry: Option<&'a RetryPolicy>,
    hedging: Option<&'a HedgingPolicy>,
    adaptive_hedge: bool,
}

impl<'a> Plan<'a> {
    fn of(config: &'a CallConfig, path: &str, caller: Option<Duration>) -> Self {
        let method = config.service_config.method(path);
        // The shortest of the balancer's own, the method's and the caller's.
        let limit = method
            .and_then(|m| m.timeout)
            .filter(|t| !t.is_zero())
            .map_or(config.timeout, |t| t.min(config.timeout));
        Self {
            deadline: caller.map_or(limit, |t| t.min(limit)),
            retry: method.and_then(|m| m.retry.as_ref()),
            hedging: method.and_then(|m| m.hedging.as_ref()),
            adaptive_hedge: config.hedge.applies_to(path),
        }
    }

    /// Whether the body is kept, to be sent more than once.
    fn buffers(&self) -> bool {
        self.retry.is_some() || self.hedging.is_some() || self.adaptive_hedge
    }

    fn max_attempts(&self) -> u32 {
        self.retry.map_or(1, |r| r.max_attempts)
    }

    /// Whether a try that ended with `code` is worth another under the retry policy.
    fn retries(&self, code: Code) -> bool {
        self.retry
            .is_some_and(|r| r.retryable_codes.contains(&code))
    }
}

/// Added to each response: how many tries it took (1 = no retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

/// Runs one call to completion of its response headers. A sampled call (or any, when spans are
/// not exported) runs inside one client span that is also its first try's; a retry or a hedge
/// adds a child span of its own (the replica's server span is a child of the try that reached
/// it). An unsampled call builds no span at all.
pub(super) async fn run(
    buffer: Buffered,
    shared: Arc<super::Shared>,
    mut request: http::Request<Body>,
    permit: Option<Permit>,
) -> Result<http::Response<Body>, BoxError> {
    let mut metered = shared
        .metrics
        .as_ref()
        .map(|m| m.call(shared.registry.target(), request.uri().path()));
    let response = match telemetry::decide_call() {
        CallTrace::Spans => traced(buffer, &shared, request, permit).await,
        forward => {
            // The attempts learn it from the request, and forward the context instead of a span.
            request.extensions_mut().insert(forward);
            run_in_span(buffer, &shared, request, permit).await
        }
    };
    let response = match metered.take() {
        None => response,
        // A trailers-only answer is complete: its status is in its headers.
        Some(mut call) if Status::from_header_map(response.headers()).is_some() => {
            call.finish(status_of(&response));
            response
        }
        Some(call) => response.map(|body| Body::new(MeteredBody::new(body, call))),
    };
    Ok(response)
}

/// The call inside its `grpc.call` span.
async fn traced(
    buffer: Buffered,
    shared: &super::Shared,
    request: http::Request<Body>,
    permit: Option<Permit>,
) -> http::Response<Body> {
    let (service, method) = telemetry::rpc_names(request.uri().path());
    let span = tracing::info_span!(
        target: crate::telemetry::RPC_SPANS,
        "grpc.call",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        meshlb.target = %shared.registry.target(),
        meshlb.policy = %shared.policy,
        meshlb.attempts = Empty,
        // The call span is also its first try's client span: a call tried once is one span.
        meshlb.attempt = 1,
        meshlb.first_status_code = Empty,
        server.address = Empty,
        server.port = Empty,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    );
    let response = run_in_span(buffer, shared, request, permit)
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
    response
}

/// `permit` is the call's share of the balancer's in-flight bound: it ends with the answer.
async fn run_in_span(
    buffer: Buffered,
    shared: &super::Shared,
    request: http::Request<Body>,
    permit: Option<Permit>,
) -> http::Response<Body> {
    let config = &shared.config;
    let path = request.uri().path().to_owned();
    let caller = crate::grpc::timeout(request.headers()).ok().flatten();
    let plan = Plan::of(config, &path, caller);
    let deadline = plan.deadline;
    let expires = tokio::time::Instant::now() + deadline;
    shared.budget.deposit();
    let attempts = async {
        if !plan.buffers() {
            let result = attempt(buffer, request, 1, false, expires, shared).await;
            return (result, 1);
        }
        let (parts, body) = request.into_parts();
        let body = match replay::read(body, config.retry_buffer_limit).await {
            Ok(replay::Request::Kept(bytes)) => bytes,
            // Still being written, or too big to keep: one try, as it comes.
            Ok(replay::Request::Once(body)) => {
                let request = http::Request::from_parts(parts, body);
                let result = attempt(buffer, request, 1, false, expires, shared).await;
                return (result, 1);
            }
            Err(status) => return (Ok(status.into_http()), 1),
        };
        let hedge = match plan.hedging {
            Some(h) => Some(Hedge {
                delay: h.hedging_delay,
                non_fatal: h.non_fatal_codes.clone(),
            }),
            None if plan.adaptive_hedge => {
                shared.latency.delay(config.hedge.delay).map(|delay| Hedge {
                    delay,
                    non_fatal: vec![Code::Unavailable],
                })
            }
            None => None,
        };
        let mut tries = 1;
        let mut since_pushback = 0;
        loop {
            let result = hedged(
                &buffer,
                &parts,
                &body,
                tries,
                hedge.as_ref(),
                expires,
                shared,
            )
            .await;
            let pushback = match &result {
                Ok(response) => Pushback::of(response.headers()),
                Err(_) => None,
            };
            let code = code_of(&result);
            // A listed code is retried; a shed answer (its pushback) only when its code,
            // RESOURCE_EXHAUSTED, is listed too, as A6 says.
            let retryable = code.is_some_and(|c| plan.retries(c));
            if let Some(throttle) = &shared.throttle {
                // As grpc-core and grpc-go count: a success refills, a retryable failure drains,
                // anything else (a code the policy does not retry, a fail-fast) leaves it.
                match code {
                    Some(Code::Ok) => throttle.succeeded(),
                    _ if retryable => throttle.failed(),
                    _ => {}
                }
            }
            let again =
                tries < plan.max_attempts() && pushback != Some(Pushback::DoNotRetry) && retryable;
            if !again {
                return (result, tries);
            }
            if !shared.may_send_another() {
                shared.registry.count_budget_exhausted();
                return (result, tries);
            }
            match (pushback, plan.retry) {
                // The server said when to try again. A pause that outlasts the deadline would
                // only turn the server's answer into a timeout: give the caller the answer. The
                // backoff starts over after a pushback, as grpc-go does.
                (Some(Pushback::Wait(pause)), _) => {
                    if tokio::time::Instant::now() + pause >= expires {
                        return (result, tries);
                    }
                    tokio::time::sleep(pause).await;
                    since_pushback = 0;
                }
                // A backoff past the deadline ends in the deadline's own answer.
                (_, Some(retry)) => {
                    since_pushback += 1;
                    tokio::time::sleep(backoff(retry, since_pushback + 1)).await;
                }
                _ => {}
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
    response.map(|body| Body::new(DeadlineBody::new(body, expires, permit)))
}

/// When to hedge a call, and which failures of one try leave the other to answer.
struct Hedge {
    delay: Duration,
    non_fatal: Vec<Code>,
}

impl Hedge {
    /// Whether `result` is a failure after which the other try may still answer.
    fn non_fatal(&self, result: &Result<http::Response<Body>, BoxError>) -> bool {
        code_of(result).is_some_and(|c| c != Code::Ok && self.non_fatal.contains(&c))
    }
}

/// One try, hedged after the hedge's delay when there is one: the first useful answer wins and
/// the other attempt is cancelled.
async fn hedged(
    buffer: &Buffered,
    parts: &http::request::Parts,
    body: &Bytes,
    number: u32,
    hedge: Option<&Hedge>,
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
    let Some(hedge) = hedge else {
        return first.await;
    };
    tokio::pin!(first);
    // A non-fatal failure before the delay sends the hedge at once (A6); its answer is then the
    // only one left.
    let early = tokio::select! {
        result = &mut first => {
            if !hedge.non_fatal(&result) {
                return result;
            }
            Some(result)
        }
        () = tokio::time::sleep(hedge.delay) => None,
    };
    if early.is_some() {
        if let Some(throttle) = &shared.throttle {
            throttle.failed();
        }
    }
    if !shared.may_send_another() {
        shared.registry.count_budget_exhausted();
        return match early {
            Some(result) => result,
            None => first.await,
        };
    }
    shared.registry.count_hedge(false);
    // An event on the call's span for traces, not a log line per hedge.
    tracing::info!(target: telemetry::RPC_SPANS, delay_ms = hedge.delay.as_secs_f64() * 1000.0, "hedge");
    let second = attempt(
        buffer.clone(),
        rebuild(parts, body),
        number,
        true,
        expires,
        shared,
    );
    if early.is_some() {
        // The first try failed already: the hedge's answer is the call's (a win when useful).
        let result = second.await;
        if !hedge.non_fatal(&result) {
            shared.registry.count_hedge(true);
        }
        return result;
    }
    tokio::pin!(second);
    let non_fatal = |result: &Result<http::Response<Body>, BoxError>| {
        let failed = hedge.non_fatal(result);
        if let (true, Some(throttle)) = (failed, &shared.throttle) {
            throttle.failed();
        }
        failed
    };
    tokio::select! {
        result = &mut first => {
            if non_fatal(&result) { second.await } else { result }
        }
        result = &mut second => {
            if non_fatal(&result) {
                first.await
            } else {
                shared.registry.count_hedge(true);
                result
            }
        }
    }
}

/// One try, with the trace context in the request's metadata: reported on the call's span for a
/// first try, on a span of its own for a retry or a hedge.
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
    // An unsampled call builds no span: it only passes the trace on, not sampled.
    // Which span the try reports to: none for an unsampled call, the call's own span for its
    // first try (a call tried once is one span), a span of its own for a retry or a hedge.
    let (span, own) = match request.extensions_mut().remove::<CallTrace>() {
        Some(CallTrace::Forward(cx)) => {
            telemetry::inject_context(&cx, request.headers_mut());
            (None, false)
        }
        _ if number == 1 && !hedge => {
            let call = tracing::Span::current();
            telemetry::inject(&call, request.headers_mut());
            (Some(call), false)
        }
        _ => {
            let span = attempt_span(request.uri().path(), number, hedge);
            telemetry::inject(&span, request.headers_mut());
            (Some(span), true)
        }
    };
    let started = tokio::time::Instant::now();
    let call = async {
        let mut request = request;
        loop {
            buffer.ready().await?;
            match buffer.call(request).await {
                Ok(response) => return Ok(response),
                // An ejected endpoint took a copy as its probe: this try goes elsewhere.
                Err(error) => request = probe::again(error)?,
            }
        }
    };
    let result: Result<http::Response<Body>, BoxError> = match &span {
        Some(span) if own => call.instrument(span.clone()).await,
        _ => call.await,
    };
    let code = match &result {
        Ok(response) => status_of(response),
        Err(_) => Code::Unavailable,
    };
    if let Some(span) = &span {
        let served_by = match &result {
            Ok(response) => response.extensions().get::<ServedBy>().map(|s| s.0),
            Err(error) => error.downcast_ref::<EndpointError>().map(|e| e.addr),
        };
        if let Some(addr) = served_by {
            span.record("server.address", tracing::field::display(addr.ip()));
            span.record("server.port", addr.port());
        }
        if own {
            span.record("rpc.grpc.status_code", code as i32);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
        } else {
            // The call's own status is its last try's, recorded when it ends.
            span.record("meshlb.first_status_code", code as i32);
        }
    }
    if code == Code::Ok {
        if let HedgeDelay::Quantile { quantile, .. } = shared.config.hedge.delay {
            shared.latency.record(started.elapsed(), quantile);
        }
    }
    result
}

/// The client span of try `number` of a call to `path`.
fn attempt_span(path: &str, number: u32, hedge: bool) -> tracing::Span {
    let (service, method) = telemetry::rpc_names(path);
    tracing::info_span!(
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
    )
}

/// The status a response carries in its headers (a trailers-only answer); OK otherwise, since a
/// streaming answer's final status comes later, in its trailers.
fn status_of(response: &http::Response<Body>) -> Code {
    Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code())
}

/// The code a try ended with, as a retry policy judges it: a failed connection is
/// `UNAVAILABLE`; `None` for a fail-fast answer (nothing was ready to try on, so nothing to retry).
fn code_of(result: &Result<http::Response<Body>, BoxError>) -> Option<Code> {
    match result {
        Err(_) => Some(Code::Unavailable),
        Ok(response) if response.extensions().get::<FailedFast>().is_some() => None,
        Ok(response) => Some(status_of(response)),
    }
}

/// A random backoff below the policy's bound for try number `attempt` (jittered, as gRPC's A6
/// says, so that callers that failed together do not come back together).
fn backoff(retry: &RetryPolicy, attempt: u32) -> Duration {
    use rand::Rng;
    let bound = retry.backoff_bound(attempt).as_secs_f64();
    if bound <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(rand::rng().random_range(0.0..bound))
}

fn rebuild(parts: &http::request::Parts, body: &Bytes) -> http::Request<Body> {
    let mut request = http::Request::new(Body::new(Full::new(body.clone())));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
        .extensions_mut()
        .insert(probe::Duplicable(body.clone()));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"methodConfig": [
        {"name": [{"service": "a.S"}], "timeout": "2s",
         "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
        {"name": [{"service": "a.S", "method": "Hedged"}],
         "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.003s"}}
    ]}"#;

    fn config() -> CallConfig {
        CallConfig {
            service_config: Arc::new(ServiceConfig::from_json(CONFIG).unwrap()),
            ..CallConfig::default()
        }
    }

    #[test]
    fn without_a_config_nothing_is_retried_hedged_or_copied() {
        let config = CallConfig::default();
        let plan = Plan::of(&config, "/userguide.v1.UserGuideService/GetPoint", None);
        assert!(!plan.buffers());
        assert_eq!(plan.max_attempts(), 1);
        assert!(!plan.retries(Code::Unavailable));
        assert_eq!(plan.deadline, Duration::from_secs(10));
    }

    #[test]
    fn the_config_sets_deadline_attempts_and_codes_per_method() {
        let config = config();
        let plan = Plan::of(&config, "/a.S/Get", None);
        assert!(plan.buffers());
        assert_eq!(plan.max_attempts(), 4);
        assert!(plan.retries(Code::Unavailable));
        assert!(!plan.retries(Code::NotFound));
        assert_eq!(plan.deadline, Duration::from_secs(2));
        // The caller's shorter deadline wins; a longer one does not.
        let short = Plan::of(&config, "/a.S/Get", Some(Duration::from_millis(300)));
        assert_eq!(short.deadline, Duration::from_millis(300));
        let long = Plan::of(&config, "/a.S/Get", Some(Duration::from_secs(60)));
        assert_eq!(long.deadline, Duration::from_secs(2));
        // The balancer's own timeout bounds the config's too.
        let tight = CallConfig {
            timeout: Duration::from_secs(1),
            ..config.clone()
        };
        assert_eq!(
            Plan::of(&tight, "/a.S/Get", None).deadline,
            Duration::from_secs(1)
        );
        let hedged = Plan::of(&config, "/a.S/Hedged", None);
        assert_eq!(hedged.max_attempts(), 1);
        assert_eq!(
            hedged.hedging.unwrap().hedging_delay,
            Duration::from_millis(3)
        );
        let other = Plan::of(&config, "/b.T/Get", None);
        assert!(!other.buffers());
    }

    #[test]
    fn backoff_is_random_below_its_bound() {
        let config = ServiceConfig::from_json(CONFIG).unwrap();
        let retry = config.method("/a.S/Get").unwrap().retry.clone().unwrap();
        for attempt in 2..8 {
            let bound = retry.backoff_bound(attempt);
            for _ in 0..50 {
                assert!(backoff(&retry, attempt) < bound);
            }
        }
    }

    #[test]
    fn codes_as_retry_policies_judge_them() {
        assert_eq!(
            code_of(&Ok(Status::unavailable("x").into_http())),
            Some(Code::Unavailable)
        );
        let mut failed_fast = Status::unavailable("x").into_http();
        failed_fast.extensions_mut().insert(FailedFast);
        assert_eq!(code_of(&Ok(failed_fast)), None);
        assert_eq!(
            code_of(&Ok(Status::not_found("x").into_http())),
            Some(Code::NotFound)
        );
        assert_eq!(
            code_of(&Err("connection refused".into())),
            Some(Code::Unavailable)
        );
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
        assert_eq!(code_of(&Ok(shed)), Some(Code::ResourceExhausted));
        for bad in ["-1", "soon", ""] {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-retry-pushback-ms", bad.parse().unwrap());
            assert_eq!(Pushback::of(&h), Some(Pushback::DoNotRetry), "{bad:?}");
        }
    }
}
