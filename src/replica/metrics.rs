//! The replica's golden signals, in Prometheus' text format on `GET /metrics` of the metrics
//! listener: gRPC calls started and handled by code, their latency and bytes, calls in flight,
//! REST requests by route and status, serving and draining state, the fault knobs, and the
//! process' CPU, memory and file descriptors.
//!
//! Names follow go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds` with `grpc_service`, `grpc_method`, `grpc_type`, `grpc_code`),
//! the convention most gRPC dashboards already query; what it has no name for is `meshlb_replica_*`.
//! Label values come from a fixed list of the methods served, so a caller cannot grow the
//! series by sending made-up paths. It knows nothing of how calls are routed or served.

use super::faults::Faults;
use bytes::Bytes;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Every series the replica exports, as Prometheus names them: dashboards and alerts depend on
/// them (a unit test fails when one changes).
pub const NAMES: &[&str] = &[
    "grpc_server_handled_total",
    "grpc_server_handling_seconds",
    "grpc_server_started_total",
    "meshlb_replica_draining",
    "meshlb_replica_fault_fail_rate",
    "meshlb_replica_fault_jitter_seconds",
    "meshlb_replica_fault_latency_seconds",
    "meshlb_replica_http_in_flight_requests",
    "meshlb_replica_http_received_bytes_total",
    "meshlb_replica_http_request_seconds",
    "meshlb_replica_http_requests_started_total",
    "meshlb_replica_http_requests_total",
    "meshlb_replica_http_sent_bytes_total",
    "meshlb_replica_in_flight_calls",
    "meshlb_replica_received_bytes_total",
    "meshlb_replica_sent_bytes_total",
    "meshlb_replica_serving",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_resident_memory_bytes",
];

/// The methods served, as `(service, method, grpc_type)`; anything else is `unknown`.
const METHODS: &[(&str, &str, &str)] = &[
    ("userguide.v1.UserGuideService", "GetPoint", "unary"),
    (
        "userguide.v1.UserGuideService",
        "ListUsers",
        "server_stream",
    ),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
];

/// The REST routes served; anything else is `other`.
const ROUTES: &[&str] = &["/v1/points", "/v1/users"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_type: &'static str,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCodeLabels {
    route: &'static str,
    code: u16,
}

fn histogram() -> Histogram {
    Histogram::new(crate::grpc::LATENCY_BUCKETS)
}

/// Every series the replica exports; cheap to clone.
#[derive(Clone)]
pub struct ReplicaMetrics {
    registry: Arc<Registry>,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<MethodLabels, Gauge>,
    received: Family<MethodLabels, Counter>,
    sent: Family<MethodLabels, Counter>,
    rest: Family<RouteCodeLabels, Counter>,
    rest_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    rest_started: Family<RouteLabels, Counter>,
    rest_in_flight: Family<RouteLabels, Gauge>,
    rest_received: Family<RouteLabels, Counter>,
    rest_sent: Family<RouteLabels, Counter>,
}

impl std::fmt::Debug for ReplicaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaMetrics").finish_non_exhaustive()
    }
}

impl ReplicaMetrics {
    /// The replica's series, reading its state (faults, serving, draining) when scraped.
    pub fn new(faults: Faults, state: Arc<ServingState>) -> Self {
        let mut registry = Registry::default();
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling = Family::new_with_constructor(histogram as fn() -> Histogram);
        let in_flight = Family::<MethodLabels, Gauge>::default();
        let received = Family::<MethodLabels, Counter>::default();
        let sent = Family::<MethodLabels, Counter>::default();
        let rest = Family::<RouteCodeLabels, Counter>::default();
        let rest_seconds = Family::new_with_constructor(histogram as fn() -> Histogram);
        let rest_started = Family::<RouteLabels, Counter>::default();
        let rest_in_flight = Family::<RouteLabels, Gauge>::default();
        let rest_received = Family::<RouteLabels, Counter>::default();
        let rest_sent = Family::<RouteLabels, Counter>::default();
        registry.register(
            "grpc_server_started",
            "gRPC calls started on the server",
            started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "gRPC calls completed on the server, by status code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "gRPC call latency on the server, to the end of the answer",
            handling.clone(),
        );
        registry.register(
            "meshlb_replica_in_flight_calls",
            "gRPC calls started and not yet completed",
            in_flight.clone(),
        );
        registry.register(
            "meshlb_replica_received_bytes",
            "gRPC request bytes received (HTTP/2 DATA: messages with their 5-byte gRPC prefix)",
            received.clone(),
        );
        registry.register(
            "meshlb_replica_sent_bytes",
            "gRPC answer bytes sent (HTTP/2 DATA: messages with their 5-byte gRPC prefix)",
            sent.clone(),
        );
        registry.register(
            "meshlb_replica_http_requests",
            "REST requests, by route and HTTP status",
            rest.clone(),
        );
        registry.register(
            "meshlb_replica_http_request_seconds",
            "REST request latency, to the answer's headers",
            rest_seconds.clone(),
        );
        registry.register(
            "meshlb_replica_http_requests_started",
            "REST requests started, by route",
            rest_started.clone(),
        );
        registry.register(
            "meshlb_replica_http_in_flight_requests",
            "REST requests started and not yet answered",
            rest_in_flight.clone(),
        );
        registry.register(
            "meshlb_replica_http_received_bytes",
            "REST request body bytes received",
            rest_received.clone(),
        );
        registry.register(
            "meshlb_replica_http_sent_bytes",
            "REST answer body bytes sent",
            rest_sent.clone(),
        );
        registry.register_collector(Box::new(StateCollector { faults, state }));
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        Self {
            registry: Arc::new(registry),
            started,
            handled,
            handling,
            in_flight,
            received,
            sent,
            rest,
            rest_seconds,
            rest_started,
            rest_in_flight,
            rest_received,
            rest_sent,
        }
    }

    /// The registry, for serving.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A gRPC call to `path` begins: counted as started and in flight until the guard is
    /// finished or dropped.
    pub fn grpc_call(&self, path: &str) -> GrpcCall {
        let labels = method_labels(path);
        self.started.get_or_create(&labels).inc();
        self.in_flight.get_or_create(&labels).inc();
        GrpcCall {
            metrics: self.clone(),
            labels,
            start: Instant::now(),
            done: false,
        }
    }

    /// Counts request body bytes of a call to `path`.
    #[cfg(test)]
    fn received(&self, labels: &MethodLabels, bytes: usize) {
        self.received.get_or_create(labels).inc_by(bytes as u64);
    }

    /// A REST request to `path` begins: counted as started and in flight until it is answered
    /// ([`RestCall::answered`]) or dropped.
    pub fn rest_call(&self, path: &str) -> RestCall {
        let route = RouteLabels {
            route: ROUTES
                .iter()
                .find(|r| **r == path)
                .copied()
                .unwrap_or("other"),
        };
        self.rest_started.get_or_create(&route).inc();
        self.rest_in_flight.get_or_create(&route).inc();
        RestCall {
            metrics: self.clone(),
            route,
            start: Instant::now(),
            done: false,
        }
    }

    /// A REST request to `path` answered at once (before any handler ran) with `response`.
    pub fn rest_refused<B: http_body::Body>(&self, path: &str, response: &http::Response<B>) {
        self.rest_call(path).answered(response);
    }
}

/// One REST request in flight.
pub struct RestCall {
    metrics: ReplicaMetrics,
    route: RouteLabels,
    start: Instant,
    done: bool,
}

impl RestCall {
    /// A counter of this request's body bytes.
    pub fn request_counter(&self) -> RequestBytes {
        RequestBytes(
            self.metrics
                .rest_received
                .get_or_create(&self.route)
                .clone(),
        )
    }

    /// Answered with `response`: its status, latency and body size (REST answers are whole JSON
    /// documents, so the size is known before they are sent).
    pub fn answered<B: http_body::Body>(mut self, response: &http::Response<B>) {
        self.done = true;
        let m = &self.metrics;
        m.rest_in_flight.get_or_create(&self.route).dec();
        m.rest
            .get_or_create(&RouteCodeLabels {
                route: self.route.route,
                code: response.status().as_u16(),
            })
            .inc();
        m.rest_seconds
            .get_or_create(&self.route)
            .observe(self.start.elapsed().as_secs_f64());
        let hint = response.body().size_hint();
        m.rest_sent
            .get_or_create(&self.route)
            .inc_by(hint.exact().unwrap_or(hint.lower()));
    }
}

impl Drop for RestCall {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.rest_in_flight.get_or_create(&self.route).dec();
        }
    }
}

fn method_labels(path: &str) -> MethodLabels {
    let (service, method) = crate::telemetry::rpc_names(path);
    let (grpc_service, grpc_method, grpc_type) = METHODS
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .copied()
        .unwrap_or(("unknown", "unknown", "unknown"));
    MethodLabels {
        grpc_service,
        grpc_method,
        grpc_type,
    }
}

// === impl GrpcCall ===

/// One gRPC call in flight. Finished with its status when the answer ends; dropped before that,
/// the caller went away (`Canceled`).
pub struct GrpcCall {
    metrics: ReplicaMetrics,
    labels: MethodLabels,
    start: Instant,
    done: bool,
}

impl GrpcCall {
    /// The call ended with `code`.
    pub fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        m.in_flight.get_or_create(&self.labels).dec();
        m.handled
            .get_or_create(&HandledLabels {
                grpc_service: self.labels.grpc_service,
                grpc_method: self.labels.grpc_method,
                grpc_type: self.labels.grpc_type,
                grpc_code: crate::grpc::metric_code_name(code),
            })
            .inc();
        m.handling
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }

    fn sent(&self, bytes: usize) {
        self.metrics
            .sent
            .get_or_create(&self.labels)
            .inc_by(bytes as u64);
    }

    /// A counter of this call's request body bytes.
    pub fn request_counter(&self) -> RequestBytes {
        RequestBytes(self.metrics.received.get_or_create(&self.labels).clone())
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// Counts one call's request body bytes (a gRPC method's or a REST route's counter).
pub struct RequestBytes(Counter);

pin_project_lite::pin_project! {
    /// A request body whose data bytes are counted.
    pub struct CountedRequest<B> {
        #[pin]
        inner: B,
        counter: RequestBytes,
    }
}

impl<B> CountedRequest<B> {
    /// `inner`, counted by `counter`.
    pub fn new(inner: B, counter: RequestBytes) -> Self {
        Self { inner, counter }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for CountedRequest<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Ok(Some(data))) = frame.as_ref().map(|f| f.as_ref().map(|f| f.data_ref())) {
            this.counter.0.inc_by(data.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The call's metrics end with its answer ([`crate::answer::Ending`]), and count the bytes of its
/// messages on the way.
impl crate::answer::Outcome for GrpcCall {
    fn finish(&mut self, code: tonic::Code) {
        GrpcCall::finish(self, code);
    }

    fn sent(&mut self, len: usize) {
        GrpcCall::sent(self, len);
    }
}

// === state and process ===

/// What the replica reports about itself: serving (health) and draining.
#[derive(Debug, Default)]
pub struct ServingState {
    /// Its health says `SERVING`.
    pub serving: AtomicBool,
    /// It is draining.
    pub draining: AtomicBool,
}

#[derive(Debug)]
struct StateCollector {
    faults: Faults,
    state: Arc<ServingState>,
}

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let flag = |b: &AtomicBool| if b.load(Ordering::Relaxed) { 1.0 } else { 0.0 };
        crate::metrics::gauge(
            &mut encoder,
            "meshlb_replica_serving",
            "1 while the replica's health says SERVING",
            flag(&self.state.serving),
        )?;
        crate::metrics::gauge(
            &mut encoder,
            "meshlb_replica_draining",
            "1 while the replica drains",
            flag(&self.state.draining),
        )?;
        let faults = self.faults.get();
        crate::metrics::gauge(
            &mut encoder,
            "meshlb_replica_fault_latency_seconds",
            "Injected latency per call",
            faults.latency.as_secs_f64(),
        )?;
        crate::metrics::gauge(
            &mut encoder,
            "meshlb_replica_fault_jitter_seconds",
            "Injected latency jitter",
            faults.jitter.as_secs_f64(),
        )?;
        crate::metrics::gauge(
            &mut encoder,
            "meshlb_replica_fault_fail_rate",
            "Share of calls answered UNAVAILABLE on purpose",
            faults.fail_rate,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_exported_names_are_the_documented_ones() {
        let metrics = ReplicaMetrics::new(
            Faults::new(Default::default()),
            Arc::new(ServingState::default()),
        );
        // Families show up once they have a series.
        let mut call = metrics.grpc_call("/userguide.v1.UserGuideService/GetPoint");
        call.sent(10);
        metrics.received(&call.labels, 10);
        call.finish(tonic::Code::NotFound);
        let rest = metrics.rest_call("/v1/points");
        rest.request_counter().0.inc_by(3);
        rest.answered(&http::Response::new(http_body_util::Full::new(
            Bytes::from_static(b"{}"),
        )));
        let _in_flight = metrics.rest_call("/v1/users");
        let text = crate::metrics::encode(metrics.registry());
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        names.sort();
        let mut expected = NAMES.to_vec();
        expected.sort();
        assert_eq!(names, expected);
        // The labels a dashboard groups by.
        assert!(
            text.contains(
                "grpc_server_handled_total{grpc_service=\"userguide.v1.UserGuideService\",grpc_method=\"GetPoint\",grpc_type=\"unary\",grpc_code=\"NotFound\"} 1"
            ),
            "{text}"
        );
        for line in [
            "meshlb_replica_http_requests_total{route=\"/v1/points\",code=\"200\"} 1",
            "meshlb_replica_http_requests_started_total{route=\"/v1/points\"} 1",
            "meshlb_replica_http_in_flight_requests{route=\"/v1/points\"} 0",
            "meshlb_replica_http_in_flight_requests{route=\"/v1/users\"} 1",
            "meshlb_replica_http_received_bytes_total{route=\"/v1/points\"} 3",
            "meshlb_replica_http_sent_bytes_total{route=\"/v1/points\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn the_userguide_methods_listed_are_the_served_ones() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f, s)))
            .find(|(f, s)| {
                format!("{}.{}", f.package(), s.name()) == crate::proto::USERGUIDE_SERVICE
            })
            .map(|(_, s)| s)
            .expect("the UserGuide service is described");
        let listed: Vec<_> = METHODS
            .iter()
            .filter(|(s, _, _)| *s == crate::proto::USERGUIDE_SERVICE)
            .map(|(_, m, t)| (m.to_string(), t.to_string()))
            .collect();
        let served: Vec<_> = service
            .method
            .iter()
            .map(|m| {
                let kind = match (m.client_streaming(), m.server_streaming()) {
                    (false, false) => "unary",
                    (false, true) => "server_stream",
                    (true, false) => "client_stream",
                    (true, true) => "bidi_stream",
                };
                (m.name().to_owned(), kind.to_owned())
            })
            .collect();
        assert_eq!(listed, served);
    }

    #[test]
    fn method_labels_come_from_the_served_list_only() {
        let known = method_labels("/userguide.v1.UserGuideService/GetPoint");
        assert_eq!(
            (known.grpc_service, known.grpc_method, known.grpc_type),
            ("userguide.v1.UserGuideService", "GetPoint", "unary")
        );
        let made_up = method_labels("/userguide.v1.UserGuideService/Anything123");
        assert_eq!(made_up.grpc_method, "unknown");
        assert_eq!(method_labels("/x.Y/Z").grpc_service, "unknown");
    }
}
