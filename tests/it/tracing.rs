//! Traces across hops, asserted on what the real OTLP exporter sends to an in-process receiver:
//! client -> front replica -> back replica in one trace with the right parent links and RPC
//! attributes, a retry as two attempt spans on two replicas, and a foreign traceparent continued.
//! The client's own spans are asserted both ways it makes them ([`Way`]): they must not differ.

use crate::support::{eventually, Process};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
    events: Vec<(String, HashMap<String, String>)>,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    status: i32,
    /// When it started and ended, in nanoseconds since the epoch.
    start: u64,
    end: u64,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map_or("", String::as_str)
    }
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attrs: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                    events: span
                        .events
                        .iter()
                        .map(|e| {
                            let attrs = e.attributes.iter().map(|kv| (kv.key.clone(), text(kv)));
                            (e.name.clone(), attrs.collect())
                        })
                        .collect(),
                    status: span.status.as_ref().map_or(0, |s| s.code),
                    start: span.start_time_unix_nano,
                    end: span.end_time_unix_nano,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// `service`'s server spans, once the receiver has one.
async fn server_spans(receiver: &Receiver, service: &str) -> Vec<Span> {
    eventually(&format!("{service}'s server span"), || {
        let spans = receiver.spans();
        async move {
            let served: Vec<Span> = spans
                .into_iter()
                .filter(|s| s.service == service && s.kind == SPAN_SERVER)
                .collect();
            (!served.is_empty()).then_some(served)
        }
    })
    .await
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

const SPAN_SERVER: i32 = 2;
const SPAN_CLIENT: i32 = 3;

fn otel_env(cmd: &mut Command, collector: SocketAddr, service: &str) {
    // Only what the test sets: an exporter setting of the developer's would change its output.
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_EXPORTER_OTLP_") {
            cmd.env_remove(name);
        }
    }
    // A sampler of the developer's would change what is exported; each test sets its own.
    cmd.env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("OTEL_TRACES_SAMPLER_ARG")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
}

fn replica(collector: SocketAddr, service: &str, args: &[&str]) -> Process {
    Process::spawn_with("127.0.0.1:0", args, |cmd| otel_env(cmd, collector, service))
}

/// The two ways the client makes its call and try spans.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Way {
    /// `tracing` spans bridged by tracing-opentelemetry: what a subscriber of the user's own
    /// gets, and what carries p2c's choices (`MESHLB_TRACE_P2C`, which needs a `tracing` span).
    Bridged,
    /// Built straight with meshlb's tracer: what `meshlb` does when it exports (the default).
    Direct,
}

impl Way {
    /// Makes `cmd`, a `meshlb` command, make its spans this way.
    fn choose(self, cmd: &mut Command) {
        // p2c's choices are recorded only when asked for; the sampling test checks the default.
        match self {
            Way::Bridged => cmd.env("MESHLB_TRACE_P2C", "1"),
            Way::Direct => cmd.env_remove("MESHLB_TRACE_P2C"),
        };
    }
}

fn meshlb(collector: SocketAddr, way: Way, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
    otel_env(&mut cmd, collector, "client");
    way.choose(&mut cmd);
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.code().is_some(),
        "meshlb {args:?} was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_client_front_and_back() {
    one_trace_across_hops(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_client_front_and_back_bridged() {
    one_trace_across_hops(Way::Bridged).await;
}

async fn one_trace_across_hops(way: Way) {
    let (receiver, collector) = Receiver::start().await;
    let back = replica(collector, "back", &["--id", "back-1"]);
    let back_target = format!("ipv4:{}", back.addr);
    let front = replica(
        collector,
        "front",
        &["--id", "front-1", "--upstream", &back_target],
    );
    let out = meshlb(
        collector,
        way,
        &[
            "call",
            "--target",
            &format!("ipv4:{}", front.addr),
            "get-point",
            "--name",
            "james",
            "--age",
            "26",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#"{"value":1000}"#));

    let by_service = |spans: &[Span], service: &str, name: &str, kind: i32| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name && s.kind == kind)
            .cloned()
    };
    let method = "userguide.v1.UserGuideService/GetPoint";
    let spans = eventually("spans from all three processes", || {
        let spans = receiver.spans();
        async move {
            let ok = by_service(&spans, "back", method, SPAN_SERVER).is_some()
                && by_service(&spans, "front", method, SPAN_CLIENT).is_some()
                && by_service(&spans, "client", method, SPAN_CLIENT).is_some();
            ok.then_some(spans)
        }
    })
    .await;
    let client_attempt = by_service(&spans, "client", method, SPAN_CLIENT).unwrap();
    let front_server = by_service(&spans, "front", method, SPAN_SERVER).unwrap();
    let front_attempt = by_service(&spans, "front", method, SPAN_CLIENT).unwrap();
    let back_server = by_service(&spans, "back", method, SPAN_SERVER).unwrap();

    let trace = &client_attempt.trace_id;
    for s in [&front_server, &front_attempt, &back_server] {
        assert_eq!(&s.trace_id, trace, "one trace id across hops: {s:?}");
    }
    // client call -> front server -> front call -> back server: a call tried once is one
    // client span, which is its logical call too.
    assert_eq!(front_server.parent, client_attempt.span_id);
    assert_eq!(front_attempt.parent, front_server.span_id);
    assert_eq!(back_server.parent, front_attempt.span_id);
    assert_eq!(client_attempt.attr("meshlb.policy"), "p2c");
    assert_eq!(client_attempt.attr("meshlb.attempt"), "1");
    assert_eq!(
        client_attempt.attr("meshlb.target"),
        format!("ipv4:{}", front.addr)
    );
    // Fields only written when there is something to say are absent, not empty.
    for absent in [
        "meshlb.attempts",
        "meshlb.first_status_code",
        "otel.status_code",
    ] {
        assert!(
            !client_attempt.attrs.contains_key(absent),
            "{absent}: {client_attempt:?}"
        );
    }
    assert_eq!(client_attempt.status, 0, "{client_attempt:?}");
    assert_eq!(
        spans.iter().filter(|s| s.service == "client").count(),
        1,
        "one span for a call tried once: {spans:?}"
    );

    for s in [&client_attempt, &front_server, &front_attempt, &back_server] {
        assert_eq!(s.attr("rpc.system"), "grpc", "{s:?}");
        assert_eq!(s.attr("rpc.service"), "userguide.v1.UserGuideService");
        assert_eq!(s.attr("rpc.method"), "GetPoint");
        assert_eq!(s.attr("rpc.grpc.status_code"), "0", "{s:?}");
    }
    assert_eq!(client_attempt.attr("server.address"), "127.0.0.1");
    assert_eq!(
        client_attempt.attr("server.port"),
        front.addr.port().to_string()
    );
    assert_eq!(
        front_attempt.attr("server.port"),
        back.addr.port().to_string()
    );
    assert_eq!(back_server.attr("meshlb.replica_id"), "back-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_spans_hold_its_trailers_status_and_nest() {
    stream_spans(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_spans_hold_its_trailers_status_and_nest_bridged() {
    stream_spans(Way::Bridged).await;
}

/// A server-streaming call's spans on both sides end with the stream: each is exported, with the
/// status of the trailers, and the replica's lies within the client's.
async fn stream_spans(way: Way) {
    let (receiver, collector) = Receiver::start().await;
    let server = replica(collector, "streamer", &["--id", "s-1"]);
    let target = format!("ipv4:{}", server.addr);
    let out = meshlb(
        collector,
        way,
        &["call", "--target", &target, "list-users", "--points", "0"],
    );
    assert!(out.status.success(), "{out:?}");
    let method = "userguide.v1.UserGuideService/ListUsers";
    let (client, server) = eventually("both sides' spans of the stream", || {
        let spans = receiver.spans();
        async move {
            let of = |service: &str, kind: i32| {
                spans
                    .iter()
                    .find(|s| s.service == service && s.name == method && s.kind == kind)
                    .cloned()
            };
            Some((of("client", SPAN_CLIENT)?, of("streamer", SPAN_SERVER)?))
        }
    })
    .await;
    assert_eq!(server.parent, client.span_id, "{server:?}");
    for span in [&client, &server] {
        assert_eq!(span.attr("rpc.grpc.status_code"), "0", "{span:?}");
        assert_eq!(span.status, 0, "{span:?}");
        assert!(span.start <= span.end, "{span:?}");
    }
    assert!(
        client.start <= server.start && server.end <= client.end,
        "the replica's span lies within the client's: {client:?} {server:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_two_attempt_spans_on_two_replicas() {
    retry_spans(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_two_attempt_spans_on_two_replicas_bridged() {
    retry_spans(Way::Bridged).await;
}

async fn retry_spans(way: Way) {
    let (receiver, collector) = Receiver::start().await;
    let failing = replica(collector, "failing", &["--id", "bad", "--fail-rate", "1"]);
    let healthy = replica(collector, "healthy", &["--id", "good"]);
    let target = format!("ipv4:{},{}", failing.addr, healthy.addr);
    // Round-robin, one call at a time: a try that failed on the failing replica is retried on
    // the healthy one. Enough calls to outlast the client's connecting to both. (p2c may send the retry to the failing replica again, whose failures are
    // fast and look cheap, until the call runs out of tries; its event is checked below.)
    let out = meshlb(
        collector,
        way,
        &[
            "client",
            "--target",
            &target,
            "--requests",
            "200",
            "--concurrency",
            "1",
            "--policy",
            "round-robin",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["retries"].as_u64().unwrap() > 0, "{report}");
    let sampled = report["trace_id"]
        .as_str()
        .expect("a sampled trace id")
        .to_owned();
    eventually("the reported trace reaches the collector", || {
        let spans = receiver.spans();
        let sampled = sampled.clone();
        async move { spans.iter().any(|s| s.trace_id == sampled).then_some(()) }
    })
    .await;

    // A retried call: its first try is the call's own span, and each retry a child span of it;
    // the first failed on the failing replica, and the last answered from the healthy one.
    let (first, last) = eventually("a retried call's attempts", || {
        let spans = receiver.spans();
        let (bad, good) = (
            failing.addr.port().to_string(),
            healthy.addr.port().to_string(),
        );
        async move {
            let attempts: Vec<&Span> = spans
                .iter()
                .filter(|s| s.service == "client" && s.kind == SPAN_CLIENT)
                .collect();
            attempts.iter().find_map(|first| {
                if first.attr("meshlb.attempt") != "1" {
                    return None;
                }
                let mut retries: Vec<&&Span> = attempts
                    .iter()
                    .filter(|s| s.parent == first.span_id)
                    .collect();
                retries.sort_by_key(|s| s.attr("meshlb.attempt").parse::<u32>().unwrap_or(0));
                let last = retries.last()?;
                let retried = first.attr("server.port") == bad && last.attr("server.port") == good;
                retried.then(|| ((*first).clone(), (**last).clone()))
            })
        }
    })
    .await;
    assert_eq!(first.trace_id, last.trace_id);
    // The call's span says how its first try ended, and how the call did.
    assert_eq!(first.attr("meshlb.first_status_code"), "14");
    assert_eq!(first.attr("rpc.grpc.status_code"), "0");
    assert_eq!(last.attr("rpc.grpc.status_code"), "0");
    assert_ne!(last.attr("meshlb.attempt"), "1");
    assert_eq!(last.attr("meshlb.hedge"), "false");
    assert_eq!(last.attr("rpc.method"), "GetPoint");
    assert_eq!(last.attr("server.address"), "127.0.0.1");
    assert_eq!((first.status, last.status), (0, 0));
    // The call's span counts its tries (written only when there was more than one).
    assert_eq!(first.attr("meshlb.attempts"), last.attr("meshlb.attempt"));
    assert!(first
        .attr("meshlb.target")
        .contains(&healthy.addr.port().to_string()));
    // With two ready endpoints (and MESHLB_TRACE_P2C=1), tower's p2c records its choice on the
    // span of the try it routed. Two healthy replicas of their own: of the two above, either
    // may be the only one ready for every call (the failing one is soon ejected, and under load
    // it may be ready before the healthy one).
    if way == Way::Direct {
        return;
    }
    let other = replica(collector, "healthy", &["--id", "good-2"]);
    let target = format!("ipv4:{},{}", healthy.addr, other.addr);
    // Enough calls to outlast the client's connecting to the second replica.
    let out = meshlb(
        collector,
        way,
        &["client", "--target", &target, "--requests", "200"],
    );
    assert!(out.status.success(), "{out:?}");
    let p2c_events = eventually("a p2c decision on a span", || {
        let spans = receiver.spans();
        let target = target.clone();
        async move {
            let events: Vec<_> = spans
                .into_iter()
                .filter(|s| s.service == "client" && s.attr("meshlb.target") == target)
                .flat_map(|s| s.events)
                .filter(|(name, _)| name == "p2c")
                .collect();
            (!events.is_empty()).then_some(events)
        }
    })
    .await;
    let (_, attrs) = &p2c_events[0];
    for key in ["a.load", "b.load", "chosen"] {
        assert!(attrs.contains_key(key), "{key} missing in {attrs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_traceparent_is_continued() {
    let (receiver, collector) = Receiver::start().await;
    let r = replica(collector, "lone", &["--id", "lone-1"]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    get_point_in(r.addr, &format!("00-{trace_id}-{parent}-01"))
        .await
        .unwrap();
    let server = server_spans(&receiver, "lone").await.remove(0);
    assert_eq!(server.trace_id, trace_id);
    assert_eq!(server.parent, parent);
}

/// One `GetPoint` to `addr` over a channel of its own, in the trace `traceparent` names.
async fn get_point_in(
    addr: SocketAddr,
    traceparent: &str,
) -> Result<tonic::Response<meshlb::proto::userguide::v1::GetPointResponse>, tonic::Status> {
    use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(crate::support::get_point_request());
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    UserGuideServiceClient::new(channel)
        .get_point(request)
        .await
}

/// A gRPC server that hands the test the `traceparent` of each call other than a health check,
/// and answers it `NOT_FOUND` (health checks: `UNIMPLEMENTED`, which counts as serving).
async fn traceparent_recorder() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (seen, recorded) = tokio::sync::mpsc::unbounded_channel();
    let addr = h2_server(move |request| {
        let health = request.uri().path().starts_with("/grpc.health.v1.");
        if !health {
            let traceparent = request
                .headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap_or("not ASCII").to_owned());
            let _ = seen.send(traceparent.unwrap_or_default());
        }
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", if health { "12" } else { "5" })
            .body(http_body_util::Empty::<bytes::Bytes>::new())
    })
    .await;
    (addr, recorded)
}

/// A replica that exports decides on the caller's context before it builds a span: a call its
/// caller did not sample gets none, and goes on upstream with the caller's own span as parent
/// (a span built and dropped would have put its own id there). A sampled call through the same
/// replica is exported, with the replica's span as the next hop's parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_call_passes_a_replica_that_builds_no_span_for_it() {
    let (receiver, collector) = Receiver::start().await;
    let (back, mut upstream) = traceparent_recorder().await;
    let front = replica(
        collector,
        "front",
        &["--id", "front-1", "--upstream", &format!("ipv4:{back}")],
    );
    let caller = "00f067aa0ba902b7";
    let mut forwarded = Vec::new();
    for (trace_id, flags) in [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00"),
        ("5ce0a2f3577b34da6a3ce929d0e0e473", "01"),
    ] {
        let answer = get_point_in(front.addr, &format!("00-{trace_id}-{caller}-{flags}")).await;
        assert_eq!(
            answer.unwrap_err().code(),
            tonic::Code::NotFound,
            "the upstream's answer"
        );
        let seen = tokio::time::timeout(std::time::Duration::from_secs(10), upstream.recv())
            .await
            .expect("the upstream saw no call")
            .unwrap();
        forwarded.push(seen);
    }
    assert_eq!(
        forwarded[0], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "an unsampled call goes on in its trace, unsampled, from the caller's span"
    );
    let sampled: Vec<&str> = forwarded[1].split('-').collect();
    assert_eq!(sampled[1], "5ce0a2f3577b34da6a3ce929d0e0e473");
    assert_ne!(
        sampled[2], caller,
        "a sampled call goes on from the front's spans"
    );
    assert_eq!(sampled[3], "01");
    let served = server_spans(&receiver, "front").await;
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0].trace_id, "5ce0a2f3577b34da6a3ce929d0e0e473");
    let spans = receiver.spans();
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"),
        "the unsampled call was exported: {spans:?}"
    );
}

/// A replica that starts traces (its callers send none) decides on the trace id its span then
/// takes: at a ratio of 50 %, about half of the calls are exported, each its own trace (a
/// second decision by the exporter on another id would leave about a quarter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_traces_samples_them_once() {
    let (receiver, collector) = Receiver::start().await;
    let mut r = Process::spawn_with(
        "127.0.0.1:0",
        &["--id", "root-1", "--drain-grace", "0s"],
        |cmd| {
            otel_env(cmd, collector, "root");
            cmd.env("OTEL_TRACES_SAMPLER", "traceidratio")
                .env("OTEL_TRACES_SAMPLER_ARG", "0.5");
        },
    );
    // The client exports nothing, so it sends no `traceparent`.
    let out = Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .args(["client", "--target", &format!("ipv4:{}", r.addr)])
        .args(["--requests", "200", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A replica that stops flushes its spans first: once it has exited, the receiver has them.
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit().await, Some(0), "the replica's exit");
    let spans: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.service == "root" && s.kind == SPAN_SERVER)
        .collect();
    // 100 expected, a standard deviation of 7.
    assert!(
        (65..=135).contains(&spans.len()),
        "{} of 200 root calls exported",
        spans.len()
    );
    let traces: std::collections::HashSet<&str> =
        spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), spans.len(), "two calls shared a trace");
    assert!(
        spans.iter().all(|s| s.parent.is_empty()),
        "a root with a parent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_trace_link_when_the_collector_never_got_the_spans() {
    // A collector address nobody listens on, held for the whole test: a port bound and freed
    // could be given at once to another test's collector, which would then get these spans.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let nobody = reserved.local_addr().unwrap();
    let server = replica_plain("lonely");
    let target = format!("ipv4:{}", server.addr);
    // The tools' own log level (no RUST_LOG): the exporter's raw errors stay out of the output.
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
        otel_env(&mut cmd, nobody, "client");
        cmd.env_remove("RUST_LOG").args(args).output().unwrap()
    };
    let one_warning = |stderr: &str| {
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("warning: spans were not exported"),
            "{stderr}"
        );
    };
    for format in ["table", "json"] {
        let out = run(&[
            "client",
            "--target",
            &target,
            "--requests",
            "20",
            "--format",
            format,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(!stdout.contains("/trace/"), "{stdout}");
        assert!(!stdout.contains("\"trace_id\":\""), "{stdout}");
        one_warning(&stderr);
        assert!(stderr.contains("no trace to show"), "{stderr}");
    }
    let out = run(&[
        "call",
        "--target",
        &target,
        "get-point",
        "--name",
        "james",
        "--age",
        "26",
    ]);
    assert!(out.status.success(), "{out:?}");
    one_warning(&String::from_utf8_lossy(&out.stderr));
}

fn replica_plain(id: &str) -> Process {
    Process::spawn("127.0.0.1", &["--id", id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_decided_once_per_call_and_kept_by_every_hop() {
    sampled_once(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_decided_once_per_call_and_kept_by_every_hop_bridged() {
    sampled_once(Way::Bridged).await;
}

async fn sampled_once(way: Way) {
    // The client samples 30 % of new traces; the replica (parent-based, the default) follows.
    let (receiver, collector) = Receiver::start().await;
    let r = replica(collector, "sampled", &["--id", "sampled-1"]);
    // Two, so that p2c has a choice to make (and, by default, not to record).
    let r2 = replica(collector, "sampled", &["--id", "sampled-2"]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
    otel_env(&mut cmd, collector, "client");
    way.choose(&mut cmd);
    let out = cmd
        .env("OTEL_TRACES_SAMPLER", "traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "0.3")
        .args([
            "client",
            "--target",
            &format!("ipv4:{},{}", r.addr, r2.addr),
        ])
        .args([
            "--requests",
            "200",
            "--concurrency",
            "4",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A call's span is its first try's too; retries would be spans of their own.
    let is_call = |s: &Span| s.service == "client" && !s.attr("meshlb.target").is_empty();
    let is_attempt = |s: &Span| {
        s.service == "client" && s.kind == SPAN_CLIENT && s.attr("meshlb.target").is_empty()
    };
    let is_served =
        |s: &Span| s.service == "sampled" && s.kind == SPAN_SERVER && s.name.contains("GetPoint");
    // Every sampled try reached the replica, whose span is exported too.
    let spans = eventually("the replica's spans match the client's tries", || {
        let spans = receiver.spans();
        async move {
            let tries = spans.iter().filter(|s| is_call(s) || is_attempt(s)).count();
            let served = spans.iter().filter(|s| is_served(s)).count();
            (tries > 0 && served == tries).then_some(spans)
        }
    })
    .await;
    let calls: Vec<&Span> = spans.iter().filter(|s| is_call(s)).collect();
    // About 60 of 200 (a standard deviation of 6.5): not all, not none, and not 30 % of 30 %
    // (a second, independent decision by the exporter would leave about 18).
    assert!(
        (30..=90).contains(&calls.len()),
        "{} calls sampled of 200",
        calls.len()
    );
    let ids = |f: &dyn Fn(&Span) -> bool| -> std::collections::HashSet<String> {
        spans
            .iter()
            .filter(|s| f(s))
            .map(|s| s.span_id.clone())
            .collect()
    };
    let (call_ids, attempt_ids) = (ids(&is_call), ids(&is_attempt));
    for s in spans.iter().filter(|s| is_attempt(s)) {
        assert!(
            call_ids.contains(&s.parent),
            "an attempt without its call span: {s:?}"
        );
    }
    for s in spans.iter().filter(|s| is_served(s)) {
        assert!(
            attempt_ids.contains(&s.parent) || call_ids.contains(&s.parent),
            "a server span of an unsampled call: {s:?}"
        );
    }
    // Without MESHLB_TRACE_P2C, no span carries p2c's choice.
    if way == Way::Bridged {
        return;
    }
    for s in spans.iter().filter(|s| s.service == "client") {
        assert!(
            s.events.iter().all(|(name, _)| name != "p2c"),
            "a p2c event by default: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_call_stays_unsampled_on_every_try() {
    // The client samples nothing; the replicas (parent-based, the default) sample every trace
    // that comes without a sampled-flag-clear `traceparent`. A try that went out without one
    // (a retry among them) would leave a server span.
    let (receiver, collector) = Receiver::start().await;
    // Parent-based whatever the environment says: a replica that sampled nothing would pass.
    let parent_based = |service, args: &[&str]| {
        Process::spawn_with("127.0.0.1:0", args, |cmd| {
            otel_env(cmd, collector, service);
            cmd.env("OTEL_TRACES_SAMPLER", "parentbased_always_on");
        })
    };
    let failing = parent_based("failing", &["--id", "bad", "--fail-rate", "1"]);
    let healthy = parent_based("healthy", &["--id", "good"]);
    let client = |sampler: &str, target: String, requests: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
        otel_env(&mut cmd, collector, "client");
        let out = cmd
            .env("OTEL_TRACES_SAMPLER", sampler)
            .args(["client", "--target", &target, "--requests", requests])
            .args(["--concurrency", "1", "--format", "json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let both = format!("ipv4:{},{}", failing.addr, healthy.addr);
    // Enough calls to outlast the client's connecting to the failing replica (it starts
    // calling once one replica is ready; 20 calls were over before the other joined, under load).
    let report = client("always_off", both, "200");
    assert!(report["retries"].as_u64().unwrap() > 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    // Then one sampled call to each replica: each exports its spans in the order they end, so
    // once these arrive, a server span of an earlier call would have arrived too.
    let mut sampled = Vec::new();
    for r in [&failing, &healthy] {
        let report = client("always_on", format!("ipv4:{}", r.addr), "1");
        sampled.push(report["trace_id"].as_str().expect("a trace id").to_owned());
    }
    let spans = eventually("both replicas' spans of the sampled calls", || {
        let spans = receiver.spans();
        let sampled = sampled.clone();
        async move {
            let arrived = |service: &str, trace: &str| {
                spans
                    .iter()
                    .any(|s| s.service == service && s.trace_id == trace && s.kind == SPAN_SERVER)
            };
            (arrived("failing", &sampled[0]) && arrived("healthy", &sampled[1])).then_some(spans)
        }
    })
    .await;
    for s in spans.iter().filter(|s| s.service != "client") {
        assert!(
            sampled.contains(&s.trace_id),
            "a replica sampled a try of an unsampled call: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_is_an_event_on_the_call_span_and_a_child_span() {
    hedge_spans(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_is_an_event_on_the_call_span_and_a_child_span_bridged() {
    hedge_spans(Way::Bridged).await;
}

async fn hedge_spans(way: Way) {
    let (receiver, collector) = Receiver::start().await;
    // Both slow, so that every call outlasts the hedging delay whichever replica it reaches.
    let a = replica(collector, "slow-a", &["--id", "a", "--latency", "100ms"]);
    let b = replica(collector, "slow-b", &["--id", "b", "--latency", "100ms"]);
    // A file of each way's own: both ways' tests run at once, and each removes its file.
    let config =
        std::env::temp_dir().join(format!("meshlb-hedge-{way:?}-{}.json", std::process::id()));
    std::fs::write(
        &config,
        r#"{"methodConfig": [{"name": [{"service": "userguide.v1.UserGuideService"}],
            "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.010s"}}]}"#,
    )
    .unwrap();
    let out = meshlb(
        collector,
        way,
        &[
            "client",
            "--target",
            &format!("ipv4:{},{}", a.addr, b.addr),
            "--requests",
            "5",
            "--concurrency",
            "1",
            "--service-config",
            config.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    let _ = std::fs::remove_file(&config);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["hedges"].as_u64().unwrap() > 0, "{report}");
    let (call, hedge) = eventually("a hedged call's span and its hedge's", || {
        let spans = receiver.spans();
        async move {
            let client: Vec<&Span> = spans.iter().filter(|s| s.service == "client").collect();
            client.iter().find_map(|call| {
                let hedged = call.events.iter().any(|(name, _)| name == "hedge");
                let child = client
                    .iter()
                    .find(|s| s.parent == call.span_id && s.attr("meshlb.hedge") == "true")?;
                hedged.then(|| ((*call).clone(), (*child).clone()))
            })
        }
    })
    .await;
    assert_eq!(call.trace_id, hedge.trace_id);
    assert_eq!(hedge.kind, SPAN_CLIENT);
    // A hedge of the first try: the same number, marked as a hedge.
    assert_eq!(hedge.attr("meshlb.attempt"), "1");
    let (_, attrs) = call
        .events
        .iter()
        .find(|(name, _)| name == "hedge")
        .unwrap();
    assert_eq!(
        attrs.get("delay_ms").map(String::as_str),
        Some("10"),
        "{attrs:?}"
    );
    assert_eq!(attrs.get("target").map(String::as_str), Some("meshlb::rpc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_an_error_span() {
    failed_call_span(Way::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_an_error_span_bridged() {
    failed_call_span(Way::Bridged).await;
}

async fn failed_call_span(way: Way) {
    let (receiver, collector) = Receiver::start().await;
    let failing = replica(collector, "failing", &["--id", "bad", "--fail-rate", "1"]);
    // Tried twice: the retry is a span of its own, which fails too.
    let config = std::env::temp_dir().join(format!(
        "meshlb-failed-{:?}-{}.json",
        way,
        std::process::id()
    ));
    std::fs::write(
        &config,
        r#"{"methodConfig": [{"name": [{"service": "userguide.v1.UserGuideService"}],
            "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
                            "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
    )
    .unwrap();
    let out = meshlb(
        collector,
        way,
        &[
            "call",
            "--target",
            &format!("ipv4:{}", failing.addr),
            "--service-config",
            config.to_str().unwrap(),
            "get-point",
            "--name",
            "james",
            "--age",
            "26",
        ],
    );
    let _ = std::fs::remove_file(&config);
    assert!(!out.status.success(), "{out:?}");
    let (call, retry) = eventually("the failed call's span and its retry's", || {
        let spans = receiver.spans();
        async move {
            let call = spans
                .iter()
                .find(|s| s.service == "client" && s.attr("meshlb.attempt") == "1")?;
            let retry = spans
                .iter()
                .find(|s| s.service == "client" && s.parent == call.span_id)?;
            Some((call.clone(), retry.clone()))
        }
    })
    .await;
    assert_eq!(call.kind, SPAN_CLIENT);
    assert_eq!(call.attr("rpc.grpc.status_code"), "14", "{call:?}");
    assert_eq!(call.status, 2, "an error span: {call:?}");
    assert_eq!(call.attr("meshlb.first_status_code"), "14", "{call:?}");
    assert_eq!(call.attr("meshlb.attempts"), "2", "{call:?}");
    assert_eq!(
        call.attr("server.port"),
        failing.addr.port().to_string(),
        "{call:?}"
    );
    assert_eq!(retry.attr("meshlb.attempt"), "2", "{retry:?}");
    assert_eq!(retry.attr("rpc.grpc.status_code"), "14", "{retry:?}");
    assert_eq!(retry.status, 2, "the retry failed too: {retry:?}");
}

/// Keeps the spans the SDK ends, as it ends them (a simple exporter: at once, on that thread).
#[derive(Debug, Clone, Default)]
struct Ended(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanExporter for Ended {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Ended {
    /// Each ended span of ListUsers: its status code and its span status.
    fn list_users(&self) -> Vec<String> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.name.ends_with("/ListUsers"))
            .map(|s| {
                let code = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
                    .map(|kv| kv.value.to_string());
                format!("{code:?} {:?}", s.status)
            })
            .collect()
    }
}

type Frames = tokio::sync::mpsc::UnboundedSender<Result<http_body::Frame<bytes::Bytes>, String>>;

/// A gRPC server whose ListUsers answers are streamed by the test: each call hands the test the
/// sending end of its body. Everything else (the health watch) is `UNIMPLEMENTED`.
async fn streaming_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Frames>) {
    let (calls, answers) = tokio::sync::mpsc::unbounded_channel();
    let addr = h2_server(move |request| {
        let (frames, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut response = http::Response::builder().header("content-type", "application/grpc");
        if request.uri().path().ends_with("/ListUsers") {
            let _ = calls.send(frames);
        } else {
            response = response.header("grpc-status", "12");
        }
        let body = http_body_util::StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        );
        response.body(body)
    })
    .await;
    (addr, answers)
}

/// An HTTP/2 server on a port of its own that gives each request the response `answer` makes.
async fn h2_server<B>(
    answer: impl Fn(http::Request<hyper::body::Incoming>) -> http::Result<http::Response<B>>
        + Clone
        + Send
        + 'static,
) -> SocketAddr
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let service =
                hyper::service::service_fn(move |request| std::future::ready(answer(request)));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// One ListUsers message, framed as gRPC frames it.
fn user_message() -> http_body::Frame<bytes::Bytes> {
    use prost::Message;
    let message = meshlb::proto::userguide::v1::ListUsersResponse {
        user: Some(meshlb::proto::userguide::v1::User::default()),
    }
    .encode_to_vec();
    let mut framed = vec![0];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    http_body::Frame::data(framed.into())
}

fn status_trailers(code: &str) -> http_body::Frame<bytes::Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", code.parse().unwrap());
    http_body::Frame::trailers(trailers)
}

/// A stream's client span covers the stream: it is still open after the first message, ends
/// with the trailers and takes their status (or `CANCELLED` when the caller lets the stream go).
/// Made the bridged way (the process runs no exporter), inside a subscriber of the test's own.
#[tokio::test]
async fn a_streams_client_span_ends_with_the_stream_and_takes_its_trailers_status() {
    use ::tracing::subscriber::set_default;
    use meshlb::proto::userguide::v1::{
        user_guide_service_client::UserGuideServiceClient, ListUsersRequest, Point,
    };
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let ended = Ended::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(ended.clone())
        .build();
    // The test's runtime has one thread: the balancer's tasks and the server's run on it too.
    let _subscriber = set_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))),
    );
    let (addr, mut calls) = streaming_server().await;
    let lb = meshlb::Balancer::builder(format!("ipv4:{addr}"))
        .build()
        .await
        .unwrap();
    let mut client = UserGuideServiceClient::new(lb.clone());
    let request = || ListUsersRequest {
        point: Some(Point { value: 1 }),
    };

    // Failed half-way: the status is in the trailers.
    let mut stream = client.list_users(request()).await.unwrap().into_inner();
    let frames = calls.recv().await.expect("the call reached the server");
    frames.send(Ok(user_message())).unwrap();
    assert!(stream.message().await.unwrap().is_some(), "a first message");
    assert_eq!(ended.list_users(), Vec::<String>::new(), "still streaming");
    frames.send(Ok(status_trailers("15"))).unwrap();
    let error = stream.message().await.expect_err("the stream failed");
    assert_eq!(error.code(), tonic::Code::DataLoss);
    assert_eq!(
        ended.list_users(),
        [r#"Some("15") Error { description: "" }"#],
        "ended with the stream, with its trailers' status"
    );

    // Let go half-way by the caller.
    let mut stream = client.list_users(request()).await.unwrap().into_inner();
    let frames = calls.recv().await.expect("the call reached the server");
    frames.send(Ok(user_message())).unwrap();
    assert!(stream.message().await.unwrap().is_some(), "a first message");
    assert_eq!(ended.list_users().len(), 1, "still streaming");
    drop(stream);
    assert_eq!(
        ended.list_users()[1],
        r#"Some("1") Error { description: "" }"#
    );
}
