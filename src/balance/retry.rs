//! Retries, as the gRPC service config's `retryPolicy` says: a [`tower::retry::Policy`], so the
//! layer is tower's own `Retry` ([`RetryPolicy::layer`]).
//!
//! - A method with a `retryPolicy` is tried up to `maxAttempts` times: again after a code its
//!   policy lists (a failed connection counts as `UNAVAILABLE`; a shed call is
//!   `RESOURCE_EXHAUSTED`). A fail-fast answer is not retried: nothing is ready to retry on.
//! - Between tries: the server's `grpc-retry-pushback-ms` when it gave one (a negative or
//!   malformed one means no retry; a pause past the deadline gives the caller the server's
//!   answer instead; the backoff starts over after it, as grpc-go's does), else a random backoff
//!   below `initialBackoff × backoffMultiplier^n`, at most `maxBackoff` (jittered, as gRPC's A6
//!   says, so that callers that failed together do not come back together).
//! - Each retry needs the balancer's [`Allowance`]: the config's `retryThrottling` bucket, or
//!   meshlb's retry budget.
//! - Only a request whose body was kept ([`super::replay`]) can be sent again; any other is
//!   tried once.
//!
//! Knows the service config, the allowance and the counters; nothing of endpoints or of how a
//! try is made.

use super::deadline::{connection_failed, Expires};
use super::endpoint::BoxError;
use super::live_config::LiveConfig;
use super::registry::BalancerCounters;
use super::replay;
use super::service_config::RetryPolicy as Policy;
use super::throttle::Allowance;
use super::unavailable::Unavailable;
use crate::grpc::Pushback;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::Code;
use tower::retry::RetryLayer;

/// Added to each response: how many tries it took (1 = no retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

/// In a try's request: which try of its call it is, and whether it is a hedge (for its span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Try {
    /// 1 for the first.
    pub number: u32,
    /// A hedge of try `number`.
    pub hedge: bool,
}

/// What every call's policy shares.
struct Shared {
    target: Arc<str>,
    service_config: LiveConfig,
    allowance: Arc<Allowance>,
    counters: Arc<BalancerCounters>,
}

/// One call's retry state; the layer holds a fresh one that each call starts from.
#[derive(Clone)]
pub struct RetryPolicy {
    shared: Arc<Shared>,
    tries: u32,
    since_pushback: u32,
}

impl RetryPolicy {
    /// Retries as `service_config` says, within `allowance`, counted in `counters`; `target`
    /// names the balancer in messages.
    pub fn new(
        target: Arc<str>,
        service_config: impl Into<LiveConfig>,
        allowance: Arc<Allowance>,
        counters: Arc<BalancerCounters>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                target,
                service_config: service_config.into(),
                allowance,
                counters,
            }),
            tries: 1,
            since_pushback: 0,
        }
    }

    /// tower's retry layer with this policy.
    pub fn layer(self) -> RetryLayer<Self> {
        RetryLayer::new(self)
    }

    /// The call ends with `result`: it carries how many tries it took.
    fn done(&self, result: &mut Result<http::Response<Body>, BoxError>) {
        if let Err(error) = result {
            *result = Ok(connection_failed(&self.shared.target, error));
        }
        if let Ok(response) = result {
            response.extensions_mut().insert(Attempts(self.tries));
        }
    }
}

/// The code a try ended with, as a retry policy judges it: a failed connection is
/// `UNAVAILABLE`; `None` for a fail-fast answer (nothing was ready to try on, so nothing to retry).
pub(super) fn code_of(result: &Result<http::Response<Body>, BoxError>) -> Option<Code> {
    match result {
        Err(_) => Some(Code::Unavailable),
        Ok(response) if response.extensions().get::<Unavailable>().is_some() => None,
        Ok(response) => Some(status_of(response)),
    }
}

/// The status a response carries in its headers (a trailers-only answer); OK otherwise, since a
/// streaming answer's final status comes later, in its trailers.
pub(super) fn status_of(response: &http::Response<Body>) -> Code {
    crate::answer::code_in(response.headers()).unwrap_or(Code::Ok)
}

/// A random backoff below the policy's bound for try number `attempt`.
fn backoff(retry: &Policy, attempt: u32) -> Duration {
    use rand::Rng;
    let bound = retry.backoff_bound(attempt).as_secs_f64();
    if bound <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(rand::rng().random_range(0.0..bound))
}

impl tower::retry::Policy<http::Request<Body>, http::Response<Body>, BoxError> for RetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut http::Request<Body>,
        result: &mut Result<http::Response<Body>, BoxError>,
    ) -> Option<Sleep> {
        let shared = self.shared.clone();
        let config = shared.service_config.current();
        let policy = config
            .method(request.uri().path())
            .and_then(|m| m.retry.as_ref());
        let pushback = match &*result {
            Ok(response) => Pushback::of(response.headers()),
            Err(_) => None,
        };
        let code = code_of(result);
        // A listed code is retried; a shed answer (its pushback) only when its code,
        // RESOURCE_EXHAUSTED, is listed too, as A6 says.
        let retryable = code
            .zip(policy)
            .is_some_and(|(c, p)| p.retryable_codes.contains(&c));
        shared.allowance.record(code, retryable);
        let max_attempts = policy.map_or(1, |p| p.max_attempts);
        if self.tries >= max_attempts || pushback == Some(Pushback::DoNotRetry) || !retryable {
            self.done(result);
            return None;
        }
        // The server's pushback, or the policy's backoff (counted since the last pushback).
        let (pause, since_pushback) = match (pushback, policy) {
            (Some(Pushback::Wait(pause)), _) => (pause, 0),
            (_, Some(policy)) => (
                backoff(policy, self.since_pushback + 2),
                self.since_pushback + 1,
            ),
            _ => (Duration::ZERO, self.since_pushback),
        };
        // A pause that outlasts the deadline would only turn the server's answer into a
        // timeout, and spend a token on a retry never sent: give the caller the answer.
        let expires = request.extensions().get::<Expires>().map(|e| e.0);
        if expires.is_some_and(|e| Instant::now() + pause >= e) {
            self.done(result);
            return None;
        }
        if !shared.allowance.may_send_another() {
            shared.counters.count_budget_exhausted();
            self.done(result);
            return None;
        }
        self.since_pushback = since_pushback;
        shared.counters.count_retry();
        tracing::debug!(
            path = request.uri().path(),
            tries = self.tries,
            "retrying on the balancer"
        );
        self.tries += 1;
        request.extensions_mut().insert(Try {
            number: self.tries,
            hedge: false,
        });
        Some(tokio::time::sleep(pause))
    }

    fn clone_request(&mut self, request: &http::Request<Body>) -> Option<http::Request<Body>> {
        if self.tries == 1 {
            // Called once per call before its first try (on the layer's fresh policy): the
            // budget grows with the calls.
            self.shared.allowance.deposit();
        }
        replay::copy(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::probe::Duplicable;
    use crate::balance::service_config::ServiceConfig;
    use crate::balance::testing::{answered, kept_request};
    use tonic::Status;
    use tower::retry::budget::TpsBudget;
    use tower::{Layer, ServiceExt};
    use tower_test::mock;

    const CONFIG: &str = r#"{"methodConfig": [
        {"name": [{"service": "a.S"}],
         "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}}
    ]}"#;

    fn policy(throttling: Option<&str>) -> (RetryPolicy, Arc<BalancerCounters>) {
        let json = match throttling {
            Some(t) => CONFIG.replacen("{\"methodConfig\"", &format!("{{{t}, \"methodConfig\""), 1),
            None => CONFIG.to_owned(),
        };
        let config = Arc::new(ServiceConfig::from_json(&json).unwrap());
        let allowance = Arc::new(Allowance::new(
            TpsBudget::new(Duration::from_secs(10), 10, 0.2),
            config.retry_throttling,
        ));
        let counters = Arc::new(BalancerCounters::default());
        let policy = RetryPolicy::new("t".into(), config, allowance, counters.clone());
        (policy, counters)
    }

    fn answer(code: Code, pushback: Option<&str>) -> http::Response<Body> {
        let mut response = Status::new(code, "x").into_http();
        if let Some(ms) = pushback {
            response
                .headers_mut()
                .insert("grpc-retry-pushback-ms", ms.parse().unwrap());
        }
        response
    }

    type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

    /// Answers the next try with `response`; says when the try arrived and which it was.
    async fn answer_next(handle: &mut Handle, response: http::Response<Body>) -> (Instant, Try) {
        let (request, send) = handle.next_request().await.expect("another try");
        let at = Instant::now();
        let number = request.extensions().get::<Try>().copied().unwrap_or(Try {
            number: 1,
            hedge: false,
        });
        send.send_response(response);
        (at, number)
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_code_is_retried_after_a_jittered_backoff_up_to_max_attempts() {
        let (policy, counters) = policy(None);
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        let started = Instant::now();
        let (first, t1) = answer_next(&mut handle, answer(Code::Unavailable, None)).await;
        let (second, t2) = answer_next(&mut handle, answer(Code::Unavailable, None)).await;
        let (third, t3) = answer_next(&mut handle, answer(Code::Unavailable, None)).await;
        let response = answered(call).await;
        assert_eq!(first, started);
        // Below initialBackoff × multiplier^n: 20 ms, then 40 ms.
        assert!(
            second - first < Duration::from_millis(20),
            "{:?}",
            second - first
        );
        assert!(
            third - second < Duration::from_millis(40),
            "{:?}",
            third - second
        );
        assert_eq!([t1.number, t2.number, t3.number], [1, 2, 3]);
        assert_eq!(status_of(&response), Code::Unavailable);
        assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(3)));
        assert_eq!(
            counters.retries.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert!(handle.next_request().await.is_none(), "maxAttempts is 3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pushback_sets_the_pause_and_a_negative_one_stops_retries() {
        let (policy, _) = policy(None);
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        let call = tokio::spawn(service.clone().oneshot(kept_request("/a.S/Get")));
        let (first, _) =
            answer_next(&mut handle, answer(Code::ResourceExhausted, Some("250"))).await;
        let (second, _) = answer_next(&mut handle, answer(Code::Ok, None)).await;
        assert_eq!(second - first, Duration::from_millis(250));
        let response = answered(call).await;
        assert_eq!(status_of(&response), Code::Ok);
        assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(2)));

        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        answer_next(&mut handle, answer(Code::Unavailable, Some("-1"))).await;
        let response = answered(call).await;
        assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn unlisted_codes_unpolicied_methods_and_unkept_bodies_are_tried_once() {
        let (policy, counters) = policy(None);
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        let mut unkept = kept_request("/a.S/Get");
        unkept.extensions_mut().remove::<Duplicable>();
        let cases = [
            (kept_request("/a.S/Get"), Code::NotFound),
            (kept_request("/b.T/Get"), Code::Unavailable),
            (unkept, Code::Unavailable),
        ];
        for (request, code) in cases {
            let call = tokio::spawn(service.clone().oneshot(request));
            answer_next(&mut handle, answer(code, None)).await;
            let response = answered(call).await;
            assert_eq!(status_of(&response), code);
        }
        assert_eq!(
            counters.retries.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connection_is_retried_and_a_last_one_becomes_unavailable() {
        let (policy, _) = policy(None);
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        for _ in 0..3 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_error("connection refused");
        }
        let response = answered(call).await;
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("connection refused"),
            "{status:?}"
        );
        assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_is_counted_or_paid_for_when_its_pause_would_outlast_the_deadline() {
        let (policy, counters) = policy(None);
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        // A backoff, then a pushback, each longer than the time left (none).
        for pushback in [None, Some("250")] {
            let mut request = kept_request("/a.S/Get");
            request.extensions_mut().insert(Expires(Instant::now()));
            let call = tokio::spawn(service.clone().oneshot(request));
            answer_next(&mut handle, answer(Code::Unavailable, pushback)).await;
            let response = answered(call).await;
            assert_eq!(
                status_of(&response),
                Code::Unavailable,
                "the server's answer"
            );
            assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(1)));
        }
        let counted =
            |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(counted(&counters.retries), 0);
        assert_eq!(counted(&counters.budget_exhausted), 0, "no budget asked");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_throttling_bucket_stops_retries() {
        let (policy, counters) = policy(Some(
            r#""retryThrottling": {"maxTokens": 2, "tokenRatio": 0.1}"#,
        ));
        let (service, mut handle) = mock::pair::<http::Request<Body>, http::Response<Body>>();
        let service = policy.layer().layer(service);
        // 2 tokens: the first failure leaves 1, at half, so no retry.
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        answer_next(&mut handle, answer(Code::Unavailable, None)).await;
        let response = answered(call).await;
        assert_eq!(response.extensions().get::<Attempts>(), Some(&Attempts(1)));
        assert_eq!(
            counters
                .budget_exhausted
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
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
        let failed_fast =
            Unavailable::new(crate::balance::unavailable::Reason::Other, "x").into_http();
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
}
