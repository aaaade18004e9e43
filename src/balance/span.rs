//! The spans of a call and of its tries: one type, [`CallSpan`], over two ways of making them.
//!
//! - **Direct**, when meshlb's own exporter runs ([`telemetry::init`]) and p2c's choices are not
//!   traced: a sampled call's span is built with meshlb's OpenTelemetry tracer. Bridged through
//!   `tracing`, the same span cost a sampled call about 9.5k instructions more (a quarter of all
//!   tracing added to it): opening it, recording each field through a visitor, activating its
//!   OTel context for the `traceparent`, and closing it, each pass through every layer of the
//!   subscriber.
//! - **Bridged**, otherwise: a `tracing` span, for a subscriber of the user's own (with
//!   tracing-opentelemetry, or a log of spans), and for p2c's choices (`MESHLB_TRACE_P2C`), which
//!   tower records as `tracing` events on the current span.
//!
//! Both carry the same name, kind, parent, attributes, status and events (`tests/it/tracing.rs`
//! runs its cases both ways). The span is shared by the layers of the call path, not cloned, and
//! ends when the last of them lets it go.
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
pub struct CallSpan(Arc<Made>);

// Always behind the one `Arc` of a `CallSpan`: boxing the larger variant would only add a
// second allocation to every sampled call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Made {
    Bridged(tracing::Span),
    /// Locked only by the call's own tries, one after another (a hedge's two at once at most).
    Direct(Mutex<opentelemetry_sdk::trace::Span>),
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
    /// with `policy`, a child of the caller's current span; `None` when nothing would record it.
    /// The call span is also its first try's client span: a call tried once is one span.
    pub fn call(path: &str, target: &str, policy: &'static str) -> Option<Self> {
        if let Some(tracer) = telemetry::direct_tracer() {
            let span = rpc_client(
                path,
                [
                    KeyValue::new(TARGET, target.to_owned()),
                    KeyValue::new(POLICY, policy),
                    KeyValue::new(ATTEMPT, 1),
                ],
            )
            .start_with_context(tracer, &tracing::Span::current().context());
            return Some(Self::direct(span));
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
        (!span.is_disabled()).then(|| Self(Arc::new(Made::Bridged(span))))
    }

    /// The client span of try `number` of the call to `path` (a retry, or a hedge), a child of
    /// this call's span.
    pub fn attempt(&self, path: &str, number: u32, hedge: bool) -> Self {
        match &*self.0 {
            Made::Direct(call) => {
                let parent = opentelemetry::Context::new()
                    .with_remote_span_context(lock(call).span_context().clone());
                let span = rpc_client(
                    path,
                    [
                        KeyValue::new(ATTEMPT, i64::from(number)),
                        KeyValue::new(HEDGE, hedge),
                    ],
                );
                match telemetry::direct_tracer() {
                    Some(tracer) => Self::direct(span.start_with_context(tracer, &parent)),
                    // The exporter stopped during the call: its tries go unrecorded.
                    None => Self(Arc::new(Made::Bridged(tracing::Span::none()))),
                }
            }
            Made::Bridged(call) => {
                let (service, method) = telemetry::rpc_names(path);
                Self(Arc::new(Made::Bridged(tracing::info_span!(
                    target: telemetry::RPC_SPANS,
                    parent: call,
                    "grpc.attempt",
                    otel.name = path.trim_start_matches('/'),
                    otel.kind = "client",
                    rpc.system = "grpc",
                    rpc.service = service,
                    rpc.method = method,
                    meshlb.attempt = number,
                    meshlb.hedge = hedge,
                    server.address = Empty,
                    server.port = Empty,
                    rpc.grpc.status_code = Empty,
                    otel.status_code = Empty,
                ))))
            }
        }
    }

    fn direct(span: opentelemetry_sdk::trace::Span) -> Self {
        Self(Arc::new(Made::Direct(Mutex::new(span))))
    }

    /// The `tracing` span, for what must run inside one (p2c's choice is an event on the current
    /// span); `None` for a span built directly.
    pub fn bridged(&self) -> Option<&tracing::Span> {
        match &*self.0 {
            Made::Bridged(span) => Some(span),
            Made::Direct(_) => None,
        }
    }

    /// Writes this span's context into outgoing request headers (`traceparent`, `tracestate`).
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        match &*self.0 {
            Made::Bridged(span) => telemetry::inject(span, headers),
            Made::Direct(span) => {
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
            Made::Direct(span) => {
                let mut span = lock(span);
                span.set_attribute(KeyValue::new(SERVER_ADDRESS, address.to_owned()));
                span.set_attribute(KeyValue::new(SERVER_PORT, i64::from(addr.port())));
            }
            // In one record: each record passes every layer of the subscriber.
            Made::Bridged(span) => {
                let Some(meta) = span.metadata() else {
                    return;
                };
                let fields = meta.fields();
                if let (Some(address_field), Some(port_field)) =
                    (fields.field("server.address"), fields.field("server.port"))
                {
                    let port = addr.port();
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
            Made::Direct(span) => {
                let mut span = lock(span);
                span.set_attribute(KeyValue::new(STATUS_CODE, code as i64));
                if code != Code::Ok {
                    span.set_status(Status::error(""));
                }
            }
            Made::Bridged(span) => {
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
            Made::Direct(span) => lock(span).set_attribute(KeyValue::new(key, value)),
            Made::Bridged(span) => {
                span.record(key.as_str(), value);
            }
        }
    }

    /// A `hedge` event on the span: a copy of the call went out after `delay_ms`.
    pub fn hedge_event(&self, delay_ms: f64) {
        match &*self.0 {
            Made::Direct(span) => lock(span).add_event(
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
            Made::Bridged(span) => {
                tracing::info!(target: telemetry::RPC_SPANS, parent: span, delay_ms, "hedge")
            }
        }
    }

    /// Remembers the span's trace id if it is the process's first sampled call
    /// ([`telemetry::first_sampled_trace_id`]).
    pub fn note_sampled(&self) {
        match &*self.0 {
            Made::Direct(span) => telemetry::note_sampled_context(lock(span).span_context()),
            Made::Bridged(span) => telemetry::note_sampled(span),
        }
    }
}

/// The builder of a client span of a call to `path`: its name, kind and RPC attributes, then
/// `extra`.
fn rpc_client<const N: usize>(path: &str, extra: [KeyValue; N]) -> SpanBuilder {
    let (service, method) = telemetry::rpc_names(path);
    let mut attributes = Vec::with_capacity(3 + N);
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
}
