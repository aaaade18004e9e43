//! One call through the balancer, and the stack of tower layers it goes down:
//!
//! ```text
//!  Deadline ──> Replay ──> Retry ──> Hedge ──> Attempt ──> Buffer ──> FailFast ──> p2c
//!  (deadline,   (keeps the  (tower's   (races a  (grpc-timeout,
//!   a status     body of a   Retry over copy of   trace context,
//!   whatever     call that   the service the try)  probes hand the
//!   happens)     may go      config's                request back)
//!                again)      retryPolicy)
//! ```
//!
//! Each layer is its own module, with its own settings and tests: [`super::deadline`],
//! [`super::replay`], [`super::retry`], [`super::hedge`], [`super::attempt`], [`super::failfast`].
//! What one call does, as the gRPC service config of the balancer says
//! ([`super::service_config`]): the shortest of the three deadlines; retries of the codes its
//! `retryPolicy` lists, within the budget; a hedge after `hedgingDelay`. With no policy for the
//! method, a call is tried once and its body is not copied.
//!
//! This module builds the stack (`stack`) and wraps each call in its metrics and its trace,
//! both of which end with the last frame of the answer (`Ending`): a stream's span covers the
//! stream, and a status in its trailers is the call's.

use super::attempt::Attempt;
use super::deadline::{Deadline, DeadlineLayer, Readiness};
use super::endpoint::BoxError;
use super::hedge::{Hedge, HedgeConfig, HedgeLayer, LatencyWindow};
use super::limit::Permit;
use super::live_config::LiveConfig;
use super::registry::Registry;
use super::replay::{Replay, ReplayLayer};
use super::retry::{Attempts, RetryPolicy};
use super::service_config::ServiceConfig;
use super::span::CallSpan;
use super::throttle::Allowance;
use super::unavailable::Unavailable;
use super::Buffered;
use crate::answer::{self, Ending, Outcome};
use crate::telemetry::{self, CallTrace};
use std::sync::Arc;
use std::time::Duration;
use tonic::body::Body;
use tonic::Status;
use tower::retry::budget::TpsBudget;
use tower::retry::Retry;
use tower::{ServiceBuilder, ServiceExt};

/// The call path's layers over the balancer's buffer.
pub(crate) type Stack = Deadline<Replay<Retry<RetryPolicy, Hedge<Attempt>>>>;

/// The layers, configured by `config` and reading their policies from `service_config`, over
/// `buffer`; `registry` answers why nothing is ready and holds the counters.
pub(super) fn stack(
    config: &CallConfig,
    service_config: &LiveConfig,
    registry: &Arc<Registry>,
    buffer: Buffered,
) -> Stack {
    // Throttling is the balancer's, fixed when it is built; method policies may change.
    let allowance = Arc::new(Allowance::new(
        config.budget(),
        config.service_config.retry_throttling,
    ));
    let counters = registry.counters_handle();
    let latency = Arc::new(LatencyWindow::default());
    let readiness: Arc<dyn Readiness> = registry.clone();
    ServiceBuilder::new()
        .layer(DeadlineLayer::new(
            config.timeout,
            service_config.clone(),
            readiness,
        ))
        .layer(ReplayLayer::new(
            service_config.clone(),
            config.hedge.clone(),
            config.retry_buffer_limit,
        ))
        .layer(
            RetryPolicy::new(
                registry.target().into(),
                service_config.clone(),
                allowance.clone(),
                counters.clone(),
            )
            .layer(),
        )
        .layer(HedgeLayer::new(
            service_config.clone(),
            config.hedge.clone(),
            latency.clone(),
            allowance,
            counters,
        ))
        .service(Attempt::new(buffer, latency, config.hedge.delay))
}

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
    /// The retry budget. Out-of-range settings are brought into tower's (which asserts them):
    /// a share from 0 to 1000 %, fewer than `i32::MAX` a second.
    pub(super) fn budget(&self) -> TpsBudget {
        let percent = if self.budget_percent.is_finite() {
            self.budget_percent.clamp(0.0, 10.0)
        } else {
            0.0
        };
        TpsBudget::new(
            Duration::from_secs(10),
            self.budget_min_per_sec.min(i32::MAX as u32 - 1),
            percent,
        )
    }
}

/// Runs one call. A sampled call (or any, when spans are not exported) has one client span that
/// is also its first try's, carried in the request ([`CallSpan`]); a retry or a hedge adds a
/// child span of its own (the replica's server span is a child of the try that reached it). An
/// unsampled call builds no span at all. The call's metrics and span end when its answer does.
pub(super) async fn run(
    stack: Stack,
    shared: Arc<super::Shared>,
    mut request: http::Request<Body>,
    permit: Option<Permit>,
) -> Result<http::Response<Body>, BoxError> {
    let metered = shared
        .metrics
        .as_ref()
        .map(|m| m.call(shared.registry.target(), request.uri().path()));
    let (response, span) = match telemetry::decide_call() {
        CallTrace::Spans(parent) => traced(stack, &shared, request, permit, parent).await,
        CallTrace::Forward(context) => {
            // Every try forwards the same context, so it goes into the headers once, here, and
            // every copy of the request (retries, hedges, probes) carries it: a request extension
            // would cost an allocation, a map insert and a copy per retry layer's clone.
            telemetry::inject_span_context(&context, request.headers_mut());
            (run_in_span(stack, request, permit).await, None)
        }
    };
    let mut response = match (metered, span) {
        (None, None) => response,
        mut outcome => match answer::code_in(response.headers()) {
            // A trailers-only answer has ended: there is no body to watch.
            Some(code) => {
                outcome.finish(code);
                response
            }
            None => response.map(|body| Body::new(Ending::new(body, outcome, None))),
        },
    };
    // No endpoint was ready: the caller gets the typed reason (tonic finds the status beneath).
    if let Some(unavailable) = response.extensions_mut().remove::<Unavailable>() {
        return Err(Box::new(unavailable));
    }
    Ok(response)
}

/// The call with its span, handed down in the request (`parent`: the caller's context, when
/// the call was sampled on it); the span goes back with the answer, to end with it.
async fn traced(
    stack: Stack,
    shared: &super::Shared,
    mut request: http::Request<Body>,
    permit: Option<Permit>,
    parent: Option<opentelemetry::Context>,
) -> (http::Response<Body>, Option<CallSpan>) {
    let Some(span) = CallSpan::call(
        request.uri().path(),
        shared.registry.target(),
        shared.policy.as_str(),
        parent,
    ) else {
        // meshlb's spans are not recorded (filtered out, or no OTel layer): the caller's own
        // trace, if it has one, still goes on to the replica, written once for every try.
        telemetry::inject(&tracing::Span::current(), request.headers_mut());
        return (run_in_span(stack, request, permit).await, None);
    };
    request.extensions_mut().insert(span.clone());
    let response = run_in_span(stack, request, permit).await;
    span.note_sampled();
    // Only where there was more than one: each record passes every layer of the subscriber.
    if let Some(Attempts(n @ 2..)) = response.extensions().get::<Attempts>() {
        span.record_attempts(*n);
    }
    (response, Some(span))
}

/// `permit` is the call's share of the balancer's in-flight bound: it ends with the answer.
async fn run_in_span(
    mut stack: Stack,
    request: http::Request<Body>,
    permit: Option<Permit>,
) -> http::Response<Body> {
    let answer = match stack.ready().await {
        Ok(stack) => stack.call_with(request, permit).await,
        Err(error) => Err(error),
    };
    // The deadline layer answers every call with a response; an error here is a bug below it.
    answer.unwrap_or_else(|error| Status::internal(error.to_string()).into_http())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::retry::budget::Budget;

    #[test]
    fn out_of_range_budgets_are_brought_into_range_not_a_panic() {
        for percent in [-1.0, f32::NAN, f32::INFINITY, 5000.0] {
            let config = CallConfig {
                budget_percent: percent,
                budget_min_per_sec: u32::MAX,
                ..CallConfig::default()
            };
            assert!(
                config.budget().withdraw(),
                "{percent}: the reserve allows a retry"
            );
        }
    }
}
