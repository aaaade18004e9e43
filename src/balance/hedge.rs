//! Hedged calls (opt-in): when an idempotent call has not answered after the fleet's recent p95 latency,
//! send the same call again (the balancer will most likely pick another endpoint: the first one
//! now has a call in flight, which raises its peak-EWMA cost) and take whichever answers first,
//! cancelling the other. Hedges draw on the same budget as retries, so an overloaded fleet is not
//! made worse.
//!
//! The service config's `hedgingPolicy` works the same way with its own delay: a call is sent
//! once more after `hedgingDelay` if it has not answered (at once if it failed with a non-fatal
//! code before that); the first answer that is not a non-fatal failure wins (meshlb sends at
//! most one hedge).
//!
//! As a tower layer ([`HedgeLayer`]), below the retry layer: each try may be hedged. Knows the
//! policies, the allowance and the latency window; nothing of endpoints or of how a try is made.

use super::endpoint::BoxError;
use super::live_config::LiveConfig;
use super::registry::BalancerCounters;
use super::replay;
use super::retry::{code_of, Try};
use super::span::CallSpan;
use super::throttle::Allowance;
use crate::telemetry;
use futures::future::{BoxFuture, Either};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::Code;
use tower::{Layer, Service, ServiceExt};

/// When to hedge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// Never.
    Off,
    /// After this long.
    Fixed(Duration),
    /// After this quantile of the fleet's recent latency (measured over about a second), but not
    /// sooner than `min`. No hedging until the first window is measured.
    Quantile {
        /// E.g. 0.95.
        quantile: f64,
        /// The shortest delay.
        min: Duration,
    },
}

/// Hedging settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeConfig {
    /// Path prefixes of the methods that may be hedged (they must be idempotent).
    pub methods: Vec<String>,
    /// When.
    pub delay: HedgeDelay,
}

impl Default for HedgeConfig {
    /// Off. Measured on a 2-core machine (BENCHMARKS.md), hedging at the p95 made p99 worse than
    /// outlier ejection alone (the extra calls cost more than the slow ones they saved), so it is
    /// opt-in: see [`HedgeConfig::p95`].
    fn default() -> Self {
        Self {
            methods: vec![format!("/{}/GetPoint", crate::proto::USERGUIDE_SERVICE)],
            delay: HedgeDelay::Off,
        }
    }
}

impl HedgeConfig {
    /// GetPoint hedged after the fleet's recent p95 latency (at least 1 ms).
    pub fn p95() -> Self {
        Self {
            delay: HedgeDelay::Quantile {
                quantile: 0.95,
                min: Duration::from_millis(1),
            },
            ..Self::default()
        }
    }
}

impl HedgeConfig {
    /// Whether calls to `path` may be hedged.
    pub fn applies_to(&self, path: &str) -> bool {
        self.delay != HedgeDelay::Off && self.methods.iter().any(|m| path.starts_with(m))
    }
}

/// The fleet's recent latency, condensed into one quantile per window.
#[derive(Debug)]
pub struct LatencyWindow {
    window: Mutex<(Histogram<u64>, Instant)>,
    quantile_us: AtomicU64,
}

const WINDOW: Duration = Duration::from_secs(1);
const MIN_SAMPLES: u64 = 20;

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            // 1 µs to 1 min at 2 significant figures: constant bounds, so this cannot fail.
            window: Mutex::new((
                Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid"),
                Instant::now(),
            )),
            quantile_us: AtomicU64::new(0),
        }
    }
}

impl LatencyWindow {
    /// Records one successful attempt's latency; closes the window when it is old enough.
    pub fn record(&self, latency: Duration, quantile: f64) {
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (hist, since) = &mut *guard;
        hist.saturating_record(
            u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        if since.elapsed() >= WINDOW && hist.len() >= MIN_SAMPLES {
            self.quantile_us
                .store(hist.value_at_quantile(quantile), Ordering::Relaxed);
            hist.reset();
            *since = Instant::now();
        }
    }

    /// The hedge delay under `delay`, or `None` for no hedge.
    pub fn delay(&self, delay: HedgeDelay) -> Option<Duration> {
        match delay {
            HedgeDelay::Off => None,
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Quantile { min, .. } => {
                let us = self.quantile_us.load(Ordering::Relaxed);
                (us > 0).then(|| Duration::from_micros(us).max(min))
            }
        }
    }
}

/// Which tries are hedged, and what they share.
#[derive(Clone)]
pub struct HedgeLayer {
    shared: Arc<Shared>,
}

struct Shared {
    service_config: LiveConfig,
    adaptive: HedgeConfig,
    latency: Arc<LatencyWindow>,
    allowance: Arc<Allowance>,
    counters: Arc<BalancerCounters>,
}

impl HedgeLayer {
    /// Hedges as `service_config`'s `hedgingPolicy` says, and as `adaptive` says (after the
    /// fleet's recent latency, read from `latency`), within `allowance`, counted in `counters`.
    pub fn new(
        service_config: impl Into<LiveConfig>,
        adaptive: HedgeConfig,
        latency: Arc<LatencyWindow>,
        allowance: Arc<Allowance>,
        counters: Arc<BalancerCounters>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                service_config: service_config.into(),
                adaptive,
                latency,
                allowance,
                counters,
            }),
        }
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;
    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service whose hedgeable tries race a copy of themselves.
#[derive(Clone)]
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// When to hedge a try, and which failures of one try leave the other to answer.
struct Plan {
    delay: Duration,
    non_fatal: Vec<Code>,
}

impl Plan {
    /// Whether `result` is a failure after which the other try may still answer.
    fn non_fatal(&self, result: &Result<http::Response<Body>, BoxError>) -> bool {
        code_of(result).is_some_and(|c| c != Code::Ok && self.non_fatal.contains(&c))
    }
}

impl Shared {
    fn plan(&self, path: &str) -> Option<Plan> {
        match self
            .service_config
            .current()
            .method(path)
            .and_then(|m| m.hedging.as_ref())
        {
            Some(h) => Some(Plan {
                delay: h.hedging_delay,
                non_fatal: h.non_fatal_codes.clone(),
            }),
            None if self.adaptive.applies_to(path) => {
                self.latency.delay(self.adaptive.delay).map(|delay| Plan {
                    delay,
                    non_fatal: vec![Code::Unavailable],
                })
            }
            None => None,
        }
    }
}

type Answer = Result<http::Response<Body>, BoxError>;

impl<S> Service<http::Request<Body>> for Hedge<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The plan first: a call that is not hedged is not copied.
        let planned = self.shared.plan(request.uri().path());
        let Some((plan, mut copy)) = planned.and_then(|p| Some((p, replay::copy(&request)?)))
        else {
            return Either::Left(self.inner.call(request));
        };
        let number = request.extensions().get::<Try>().map_or(1, |t| t.number);
        copy.extensions_mut().insert(Try {
            number,
            hedge: true,
        });
        let first = self.inner.call(request);
        let second = self.inner.clone();
        Either::Right(Box::pin(race(
            first,
            second,
            copy,
            plan,
            self.shared.clone(),
        )))
    }
}

/// The first try, and the hedge after the plan's delay: the first useful answer wins and the
/// other try is cancelled.
async fn race<S>(
    first: S::Future,
    mut second: S,
    copy: http::Request<Body>,
    plan: Plan,
    shared: Arc<Shared>,
) -> Answer
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = BoxError>,
{
    tokio::pin!(first);
    // A non-fatal failure before the delay sends the hedge at once (A6); its answer is then the
    // only one left.
    let early = tokio::select! {
        result = &mut first => {
            if !plan.non_fatal(&result) {
                return result;
            }
            Some(result)
        }
        () = tokio::time::sleep(plan.delay) => None,
    };
    if early.is_some() {
        shared.allowance.hedge_failed();
    }
    if !shared.allowance.may_send_another() {
        shared.counters.count_budget_exhausted();
        return match early {
            Some(result) => result,
            None => first.await,
        };
    }
    shared.counters.count_hedge(false);
    // An event on the call's span for traces, not a log line per hedge. The span comes with
    // the request: it is not the current one.
    let delay_ms = plan.delay.as_secs_f64() * 1000.0;
    match copy.extensions().get::<CallSpan>() {
        Some(call) => call.hedge_event(delay_ms),
        None => tracing::info!(target: telemetry::RPC_SPANS, delay_ms, "hedge"),
    }
    let hedge = async move { second.ready().await?.call(copy).await };
    if early.is_some() {
        // The first try failed already: the hedge's answer is the call's (a win when useful).
        let result = hedge.await;
        if !plan.non_fatal(&result) {
            shared.counters.count_hedge(true);
        }
        return result;
    }
    tokio::pin!(hedge);
    let non_fatal = |result: &Answer| {
        let failed = plan.non_fatal(result);
        if failed {
            shared.allowance.hedge_failed();
        }
        failed
    };
    tokio::select! {
        result = &mut first => {
            if !non_fatal(&result) {
                return result;
            }
            let result = hedge.await;
            if !plan.non_fatal(&result) {
                shared.counters.count_hedge(true);
            }
            result
        }
        result = &mut hedge => {
            if non_fatal(&result) {
                first.await
            } else {
                shared.counters.count_hedge(true);
                result
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::retry::status_of;
    use crate::balance::service_config::ServiceConfig;
    use crate::balance::testing::{answered, kept_request};
    use tonic::Status;
    use tower::retry::budget::TpsBudget;
    use tower_test::mock;

    const HEDGED: &str = r#"{"methodConfig": [
        {"name": [{"service": "a.S"}],
         "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.01s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}
    ]}"#;

    type Mock = mock::Mock<http::Request<Body>, http::Response<Body>>;
    type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;

    fn hedged() -> (Hedge<Mock>, Handle, Arc<BalancerCounters>) {
        let config = Arc::new(ServiceConfig::from_json(HEDGED).unwrap());
        let allowance = Arc::new(Allowance::new(
            TpsBudget::new(Duration::from_secs(10), 10, 0.2),
            None,
        ));
        let counters = Arc::new(BalancerCounters::default());
        let layer = HedgeLayer::new(
            config,
            HedgeConfig::default(),
            Arc::default(),
            allowance,
            counters.clone(),
        );
        let (service, handle) = mock::pair();
        (layer.layer(service), handle, counters)
    }

    fn is_hedge(request: &http::Request<Body>) -> bool {
        request.extensions().get::<Try>().is_some_and(|t| t.hedge)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_try_is_hedged_after_the_delay_and_the_first_useful_answer_wins() {
        let (service, mut handle, counters) = hedged();
        let started = Instant::now();
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        let (first, _first_answer) = handle.next_request().await.unwrap();
        assert!(!is_hedge(&first));
        let (second, answer) = handle.next_request().await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(10),
            "sent after the hedging delay"
        );
        assert!(is_hedge(&second));
        answer.send_response(Status::ok("").into_http());
        let response = answered(call).await;
        assert_eq!(status_of(&response), Code::Ok);
        assert_eq!(counters.hedges(), (1, 1), "one hedge, and it won");
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_fatal_failure_sends_the_hedge_at_once() {
        let (service, mut handle, counters) = hedged();
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        let (_, answer) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        let failed_at = Instant::now();
        answer.send_response(Status::unavailable("down").into_http());
        let (hedge, answer) = handle.next_request().await.unwrap();
        assert_eq!(Instant::now(), failed_at, "no wait for the delay");
        assert!(is_hedge(&hedge));
        answer.send_response(Status::ok("").into_http());
        assert_eq!(status_of(&answered(call).await), Code::Ok);
        assert_eq!(counters.hedges(), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_in_flight_that_answers_after_the_first_try_failed_is_a_win() {
        let (service, mut handle, counters) = hedged();
        let call = tokio::spawn(service.oneshot(kept_request("/a.S/Get")));
        let (_, first) = handle.next_request().await.unwrap();
        let (hedge, second) = handle.next_request().await.unwrap();
        assert!(is_hedge(&hedge));
        first.send_response(Status::unavailable("down").into_http());
        tokio::time::advance(Duration::from_millis(5)).await;
        second.send_response(Status::ok("").into_http());
        assert_eq!(status_of(&answered(call).await), Code::Ok);
        assert_eq!(
            counters.hedges(),
            (1, 1),
            "the hedge's answer was the call's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_answer_is_final_and_a_method_without_a_policy_is_not_hedged() {
        let (service, mut handle, counters) = hedged();
        let call = tokio::spawn(service.clone().oneshot(kept_request("/a.S/Get")));
        let (_, answer) = handle.next_request().await.unwrap();
        answer.send_response(Status::not_found("no").into_http());
        assert_eq!(status_of(&answered(call).await), Code::NotFound);

        let call = tokio::spawn(service.oneshot(kept_request("/b.T/Get")));
        let (_, answer) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        answer.send_response(Status::ok("").into_http());
        assert_eq!(status_of(&answered(call).await), Code::Ok);
        assert_eq!(counters.hedges(), (0, 0));
        assert!(
            handle.next_request().await.is_none(),
            "no other request was sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_follows_the_windowed_quantile() {
        let w = LatencyWindow::default();
        let q = HedgeDelay::Quantile {
            quantile: 0.95,
            min: Duration::from_millis(1),
        };
        assert_eq!(w.delay(q), None, "no hedging before a window is measured");
        for i in 0..100 {
            w.record(Duration::from_millis(if i < 90 { 2 } else { 40 }), 0.95);
        }
        assert_eq!(w.delay(q), None, "the window is not a second old yet");
        tokio::time::advance(WINDOW).await;
        w.record(Duration::from_millis(2), 0.95);
        let d = w.delay(q).unwrap();
        assert!(
            d >= Duration::from_millis(39) && d <= Duration::from_millis(41),
            "{d:?}"
        );
        assert_eq!(
            w.delay(HedgeDelay::Fixed(Duration::from_millis(7))),
            Some(Duration::from_millis(7))
        );
        assert_eq!(w.delay(HedgeDelay::Off), None);
    }

    #[test]
    fn only_listed_methods_are_hedged() {
        assert!(!HedgeConfig::default().applies_to("/userguide.v1.UserGuideService/GetPoint"));
        let c = HedgeConfig::p95();
        assert!(c.applies_to("/userguide.v1.UserGuideService/GetPoint"));
        assert!(!c.applies_to("/userguide.v1.UserGuideService/ListUsers"));
    }
}
