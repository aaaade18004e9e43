//! The spans of a call and of its tries: one type, [`CallSpan`], over two ways of making them.
//!
//! - **Direct**, when meshlb's own exporter runs ([`telemetry::init`]), the call was sampled
//!   when it started ([`telemetry::decide_call`], which hands over the caller's context), and
//!   p2c's choices are not traced: the span is built with meshlb's OpenTelemetry tracer. Bridged
//!   through `tracing`, the same span cost a sampled call about 9k instructions more (a quarter
//!   of all tracing added to it): opening it, recording each field through a visitor, activating
//!   its OTel context for the `traceparent`, and closing it, each a pass through every layer of
//!   the subscriber.
//! - **Bridged**, otherwise: a `tracing` span, for a subscriber of the user's own (with
//!   tracing-opentelemetry, or a log of spans), and for p2c's choices (`MESHLB_TRACE_P2C`), which
//!   tower records as `tracing` events on the current span.
//!
//! Both carry the same name, kind, parent, attributes (of the same types), status and events:
//! the unit test below compares what the two ways export, and `tests/it/tracing.rs` runs its
//! client cases both ways. The span is shared by the layers of the call path, not cloned, and
//! ends when the last of them lets it go: the answer's body, which holds it to the answer's end
//! ([`crate::answer::Ending`]; a stream's span covers the stream).
//!
//! Knows the spans' names and attributes (OpenTelemetry's RPC conventions and meshlb's own);
//! nothing of retries, hedges or policies, which only tell it what happened.

use crate::telemetry;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, Status, TraceContextExt};
use opentelemetry::{Key, KeyValue, StringValue, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tonic::Code;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span of a call, or of one of its tries; carried down the call path in the request rather
/// than entered as the current span (entering it on every poll, and in the balancer's worker,
/// would pass every layer of the subscriber each time).
#[derive(Debug, Clone)]
pub struct CallSpan(Arc<Kind>);

type Tracer = &'static opentelemetry_sdk::trace::SdkTracer;

// Always behind the one `Arc` of a `CallSpan`: boxing the larger variant would only add a
// second allocation to every sampled call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Kind {
    Bridged(tracing::Span),
    /// Locked by the call's layers and tries in turn (a hedge's two tries at once at most); the
    /// tracer makes the tries' spans.
    Direct(Mutex<opentelemetry_sdk::trace::Span>, Tracer),
}

const RPC_SYSTEM: Key = Key::from_static_str("rpc.system");
const RPC_SERVICE: Key = Key::from_static_str("rpc.service");
const RPC_METHOD: Key = Key::from_static_str("rpc.method");
const TARGET: Key = Key::from_static_str("meshlb.target");
const POLICY: Key = Key::from_static_str("meshlb.policy");
const ATTEMPT: Key = Key::from_static_str("meshlb.attempt");
const ATTEMPTS: Key = Key::from_static_str("meshlb.attempts");
const HEDGE: Key = Key::from_static_str("meshlb.hedge");
const FIRST_STATUS: Key = Key::from_static_str("meshlb.first_status_code");
const SERVER_ADDRESS: Key = Key::from_static_str("server.address");
const SERVER_PORT: Key = Key::from_static_str("server.port");
const STATUS_CODE: Key = Key::from_static_str("rpc.grpc.status_code");

impl CallSpan {
    /// The span of a call to `path` (`/package.Service/Method`) through the balancer of `target`
    /// with `policy`. `parent` is the caller's context when [`telemetry::decide_call`] sampled the
    /// call on it: the span is then built directly, as its child. Otherwise it is a `tracing`
    /// span, a child of the caller's current span, and `None` when nothing would record it. The call span is also its first try's
    /// client span: a call tried once is one span.
    pub fn call(
        path: &str,
        target: &str,
        policy: &'static str,
        parent: Option<opentelemetry::Context>,
    ) -> Option<Self> {
        Self::open(telemetry::direct_tracer(), path, target, policy, parent)
    }

    fn open(
        tracer: Option<Tracer>,
        path: &str,
        target: &str,
        policy: &'static str,
        parent: Option<opentelemetry::Context>,
    ) -> Option<Self> {
        let decided = parent.is_some();
        if let (Some(tracer), Some(parent)) = (tracer, parent) {
            let span = rpc_client(
                path,
                [
                    KeyValue::new(TARGET, target.to_owned()),
                    KeyValue::new(POLICY, policy),
                    KeyValue::new(ATTEMPT, 1),
                ],
            )
            .start_with_context(tracer, &parent);
            return Some(Self(Arc::new(Kind::Direct(Mutex::new(span), tracer))));
        }
        let (service, method) = telemetry::rpc_names(path);
        let span = tracing::info_span!(
            target: telemetry::RPC_SPANS,
            "grpc.call",
            // Plain strings, not `%` values: a sampled span records each `%` field through a
            // formatter into a new String.
            otel.name = path.trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            meshlb.target = target,
            meshlb.policy = policy,
            meshlb.attempts = Empty,
            meshlb.attempt = 1,
            meshlb.first_status_code = Empty,
            server.address = Empty,
            server.port = Empty,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        if span.is_disabled() {
            return None;
        }
        if decided {
            // The OTel span behind it is built lazily; built now, in the poll that sampled the
            // call, it takes the trace id the decision was made on (a thread-local), where a
            // later poll on another thread would take a random one, and leave that id behind.
            let _ = span.context();
        }
        Some(Self(Arc::new(Kind::Bridged(span))))
    }

    /// The client span of try `number` of the call to `path` (a retry, or a hedge), a child of
    /// this call's span.
    pub fn attempt(&self, path: &str, number: u32, hedge: bool) -> Self {
        match &*self.0 {
            Kind::Direct(call, tracer) => {
                // "Remote" only in how the context is carried: the span context keeps its own
                // `is_remote` (false), so the exported parent is not marked remote.
                let parent = opentelemetry::Context::new()
                    .with_remote_span_context(lock(call).span_context().clone());
                let span = rpc_client(
                    path,
                    [
                        KeyValue::new(ATTEMPT, i64::from(number)),
                        KeyValue::new(HEDGE, hedge),
                    ],
                )
                .start_with_context(*tracer, &parent);
                Self(Arc::new(Kind::Direct(Mutex::new(span), tracer)))
            }
            Kind::Bridged(call) => {
                let (service, method) = telemetry::rpc_names(path);
                Self(Arc::new(Kind::Bridged(tracing::info_span!(
                    target: telemetry::RPC_SPANS,
                    parent: call,
                    "grpc.attempt",
                    otel.name = path.trim_start_matches('/'),
                    otel.kind = "client",
                    rpc.system = "grpc",
                    rpc.service = service,
                    rpc.method = method,
                    // As i64: tracing-opentelemetry writes unsigned integers as strings.
                    meshlb.attempt = i64::from(number),
                    meshlb.hedge = hedge,
                    server.address = Empty,
                    server.port = Empty,
                    rpc.grpc.status_code = Empty,
                    otel.status_code = Empty,
                ))))
            }
        }
    }

    /// The `tracing` span, for what must run inside one (p2c's choice is an event on the current
    /// span); `None` for a span built directly.
    pub fn bridged(&self) -> Option<&tracing::Span> {
        match &*self.0 {
            Kind::Bridged(span) => Some(span),
            Kind::Direct(..) => None,
        }
    }

    /// Writes this span's context into outgoing request headers (`traceparent`, `tracestate`).
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        match &*self.0 {
            Kind::Bridged(span) => telemetry::inject(span, headers),
            Kind::Direct(span, _) => {
                telemetry::inject_span_context(lock(span).span_context(), headers)
            }
        }
    }

    /// Records the replica that answered (`server.address`, `server.port`).
    pub fn record_server(&self, addr: SocketAddr) {
        let mut buf = [0; 15];
        let v6;
        let address = match addr.ip() {
            std::net::IpAddr::V4(ip) => ipv4_text(ip, &mut buf),
            ip => {
                v6 = ip.to_string();
                v6.as_str()
            }
        };
        match &*self.0 {
            Kind::Direct(span, _) => {
                let mut span = lock(span);
                span.set_attribute(KeyValue::new(SERVER_ADDRESS, address.to_owned()));
                span.set_attribute(KeyValue::new(SERVER_PORT, i64::from(addr.port())));
            }
            // In one record: each record passes every layer of the subscriber.
            Kind::Bridged(span) => {
                let Some(meta) = span.metadata() else {
                    return;
                };
                let fields = meta.fields();
                if let (Some(address_field), Some(port_field)) =
                    (fields.field("server.address"), fields.field("server.port"))
                {
                    let port = i64::from(addr.port());
                    span.record_all(&fields.value_set(&[
                        (&address_field, Some(&address as &dyn tracing::Value)),
                        (&port_field, Some(&port as &dyn tracing::Value)),
                    ]));
                }
            }
        }
    }

    /// Records the span's gRPC status (`rpc.grpc.status_code`; the span's status is an error
    /// for any code but OK).
    pub fn record_status(&self, code: Code) {
        match &*self.0 {
            Kind::Direct(span, _) => {
                let mut span = lock(span);
                span.set_attribute(KeyValue::new(STATUS_CODE, code as i64));
                if code != Code::Ok {
                    span.set_status(Status::error(""));
                }
            }
            Kind::Bridged(span) => {
                span.record("rpc.grpc.status_code", code as i32);
                if code != Code::Ok {
                    span.record("otel.status_code", "ERROR");
                }
            }
        }
    }

    /// Records the status of the call's first try, when it was not the last.
    pub fn record_first_status(&self, code: Code) {
        self.record_int(FIRST_STATUS, code as i64);
    }

    /// Records how many tries the call took, when there was more than one.
    pub fn record_attempts(&self, n: u32) {
        self.record_int(ATTEMPTS, i64::from(n));
    }

    fn record_int(&self, key: Key, value: i64) {
        match &*self.0 {
            Kind::Direct(span, _) => lock(span).set_attribute(KeyValue::new(key, value)),
            Kind::Bridged(span) => {
                span.record(key.as_str(), value);
            }
        }
    }

    /// A `hedge` event on the span: a copy of the call went out after `delay_ms`.
    pub fn hedge_event(&self, delay_ms: f64) {
        match &*self.0 {
            Kind::Direct(span, _) => lock(span).add_event(
                "hedge",
                vec![
                    KeyValue::new(Key::from_static_str("delay_ms"), delay_ms),
                    // As tracing-opentelemetry names an event's level and target.
                    KeyValue::new(Key::from_static_str("level"), "INFO"),
                    KeyValue::new(
                        Key::from_static_str("target"),
                        Value::String(StringValue::from(telemetry::RPC_SPANS)),
                    ),
                ],
            ),
            Kind::Bridged(span) => {
                tracing::info!(target: telemetry::RPC_SPANS, parent: span, delay_ms, "hedge")
            }
        }
    }

    /// Remembers the span's trace id if it is the process's first sampled call
    /// ([`telemetry::first_sampled_trace_id`]).
    pub fn note_sampled(&self) {
        match &*self.0 {
            Kind::Direct(span, _) => telemetry::note_sampled_context(lock(span).span_context()),
            Kind::Bridged(span) => telemetry::note_sampled(span),
        }
    }
}

/// A span ends with its call's answer ([`crate::answer::Ending`]): its status is the answer's
/// last, and it ends when the answer is let go.
impl crate::answer::Outcome for CallSpan {
    fn finish(&mut self, code: Code) {
        self.record_status(code);
    }
}

/// The builder of a client span of a call to `path`: its name, kind and RPC attributes, then
/// `extra`.
fn rpc_client<const N: usize>(path: &str, extra: [KeyValue; N]) -> SpanBuilder {
    let (service, method) = telemetry::rpc_names(path);
    // Room for what the try records later (server address and port, status, first status), so
    // the span's list is not grown and copied on the call path.
    let mut attributes = Vec::with_capacity(3 + N + 4);
    attributes.extend([
        KeyValue::new(RPC_SYSTEM, "grpc"),
        KeyValue::new(RPC_SERVICE, service.to_owned()),
        KeyValue::new(RPC_METHOD, method.to_owned()),
    ]);
    attributes.extend(extra);
    SpanBuilder::from_name(path.trim_start_matches('/').to_owned())
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
}

fn lock(
    span: &Mutex<opentelemetry_sdk::trace::Span>,
) -> std::sync::MutexGuard<'_, opentelemetry_sdk::trace::Span> {
    span.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `ip` in dotted decimal, written by hand: through `Display` (four integers through a
/// formatter, into a new String) it cost every sampled call about 1k instructions.
fn ipv4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::kept::Kept;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn an_ipv4_address_is_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "255.255.255.255",
            "1.9.10.99",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut buf = [0; 15];
            assert_eq!(ipv4_text(ip, &mut buf), ip.to_string());
        }
    }

    const PATH: &str = "/userguide.v1.UserGuideService/GetPoint";

    /// A call retried once, with a hedge event, made inside a `caller` span of the program's,
    /// its spans made one way (`direct`) or the other, under a subscriber with meshlb's bridge,
    /// as they reach an exporter: (call, retry). Both are checked to be in the caller's trace.
    fn retried_call(direct: bool) -> (SpanData, SpanData) {
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        let tracer: Tracer = Box::leak(Box::new(provider.tracer("meshlb")));
        let subscriber =
            tracing_subscriber::registry().with(telemetry::bridge(provider.tracer("meshlb")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let _in = caller.enter();
            let call = CallSpan::open(
                direct.then_some(tracer),
                PATH,
                "ipv4:10.0.0.1:50051",
                "p2c",
                Some(telemetry::caller_context()),
            )
            .expect("recorded");
            assert_eq!(call.bridged().is_none(), direct, "made the way asked for");
            call.record_server("10.0.0.1:50051".parse().unwrap());
            call.record_first_status(Code::Unavailable);
            call.hedge_event(12.5);
            let retry = call.attempt(PATH, 2, false);
            retry.record_server("[::1]:50052".parse().unwrap());
            retry.record_status(Code::Ok);
            drop(retry);
            call.record_status(Code::Internal);
            call.record_attempts(2);
        });
        let spans = std::mem::take(&mut *kept.0.lock().unwrap());
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let named = |name: &str| spans.iter().find(|s| s.name == name).cloned();
        let caller = named("caller").expect("the caller's span");
        let call = spans
            .iter()
            .find(|s| s.parent_span_id == caller.span_context.span_id())
            .cloned()
            .expect("the call span, a child of the caller's");
        let retry = spans
            .iter()
            .find(|s| s.parent_span_id == call.span_context.span_id())
            .cloned()
            .expect("the retry's span, a child of the call's");
        for span in [&call, &retry] {
            assert_eq!(span.span_context.trace_id(), caller.span_context.trace_id());
        }
        (call, retry)
    }

    /// An attribute as an exporter writes it: its key, type and value (whether a string is
    /// borrowed or owned is the SDK's business).
    fn attribute(kv: &KeyValue) -> String {
        match &kv.value {
            Value::String(text) => format!("{}=String({:?})", kv.key, text.as_str()),
            value => format!("{}={value:?}", kv.key),
        }
    }

    /// What an exporter sees of a span, less its ids and times.
    fn seen(span: &SpanData) -> String {
        let mut attributes: Vec<String> = span.attributes.iter().map(attribute).collect();
        attributes.sort();
        let events: Vec<String> = span
            .events
            .iter()
            .map(|e| {
                let mut attributes: Vec<String> = e.attributes.iter().map(attribute).collect();
                attributes.sort();
                format!("{} {attributes:?}", e.name)
            })
            .collect();
        format!(
            "{} {:?} {:?} scope={} {attributes:?} {events:?}",
            span.name,
            span.span_kind,
            span.status,
            span.instrumentation_scope.name()
        )
    }

    #[test]
    fn a_call_made_directly_is_what_the_bridge_makes() {
        let (direct_call, direct_retry) = retried_call(true);
        let (bridged_call, bridged_retry) = retried_call(false);
        assert_eq!(seen(&direct_call), seen(&bridged_call));
        assert_eq!(seen(&direct_retry), seen(&bridged_retry));
        // And what both make is what the docs say (docs/tracing.md).
        let call = seen(&direct_call);
        for expected in [
            "GetPoint",
            "Client",
            "Error",
            r#"meshlb.attempt=I64(1)"#,
            r#"meshlb.attempts=I64(2)"#,
            r#"meshlb.first_status_code=I64(14)"#,
            r#"meshlb.policy=String(\"p2c\")"#,
            r#"rpc.grpc.status_code=I64(13)"#,
            r#"server.address=String(\"10.0.0.1\")"#,
            r#"server.port=I64(50051)"#,
            "hedge",
            "delay_ms=F64(12.5)",
        ] {
            assert!(call.contains(expected), "{expected} not in {call}");
        }
        let retry = seen(&direct_retry);
        for expected in [
            "meshlb.attempt=I64(2)",
            "meshlb.hedge=Bool(false)",
            "server.port=I64(50052)",
            "rpc.grpc.status_code=I64(0)",
            r#"server.address=String(\"::1\")"#,
        ] {
            assert!(retry.contains(expected), "{expected} not in {retry}");
        }
        assert!(!retry.contains("meshlb.target"), "{retry}");
    }
}
