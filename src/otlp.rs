//! meshlb's OTLP/gRPC span exporter: each batch the SDK's batch processor hands over, sent to a
//! collector's `TraceService/Export`.
//!
//! Each span is written straight from the SDK's `SpanData` into one buffer, byte for byte what
//! opentelemetry-proto's conversion and prost would write (the tests hold it to that), and the
//! request is framed around those bytes. opentelemetry-otlp, which this replaces, cost a sampled
//! call about 11k instructions more (BENCHMARKS.md): it copies the whole batch before converting
//! it, the conversion copies every string, and prost works out a span's length once per level of
//! the request it sits in.
//!
//! It reads the standard variables, the `_TRACES_` one first: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (default `http://localhost:4317`), `…_HEADERS` (`key=value,…`, values percent-encoded),
//! `…_TIMEOUT` (milliseconds, default 10 000, a bound on an export and its retries),
//! `…_COMPRESSION` (only `none`) and `…_PROTOCOL` (only `grpc`). An export that fails with a
//! status the OTLP spec calls transient is tried again, at most three more times, within the
//! timeout.
//!
//! Knows nothing of which spans are made or sampled; `telemetry` decides that.

use bytes::BufMut as _;
use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::{
    Attributes as ProtoAttributes, ResourceAttributesWithSchema,
};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prost::encoding::{self, WireType};
use prost::Message as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

const DEFAULT_ENDPOINT: &str = "http://localhost:4317";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Tries after the first, for a status the spec calls transient.
const RETRIES: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Where and how to export, from the environment.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    endpoint: http::Uri,
    headers: MetadataMap,
    timeout: Duration,
}

impl Settings {
    /// From the process's `OTEL_EXPORTER_OTLP_*` variables.
    pub(crate) fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From `var`, which looks a variable up: the `_TRACES_` one, else the general one. An
    /// empty value counts as unset, as the spec says.
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = |suffix: &str| {
            [
                format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
                format!("OTEL_EXPORTER_OTLP_{suffix}"),
            ]
            .into_iter()
            .find_map(|name| {
                let value = var(&name)?.trim().to_owned();
                (!value.is_empty()).then_some((name, value))
            })
        };
        if let Some((name, protocol)) = get("PROTOCOL") {
            if protocol != "grpc" {
                return Err(format!(
                    "{name}={protocol}: meshlb exports OTLP over gRPC only (set it to grpc, or unset it)"
                ));
            }
        }
        if let Some((name, compression)) = get("COMPRESSION") {
            if compression != "none" {
                return Err(format!(
                    "{name}={compression}: meshlb's exporter does not compress (set it to none, or unset it)"
                ));
            }
        }
        let endpoint = match get("ENDPOINT") {
            Some((name, value)) => endpoint(&value).map_err(|e| format!("{name}={value}: {e}"))?,
            None => http::Uri::from_static(DEFAULT_ENDPOINT),
        };
        let headers = match get("HEADERS") {
            Some((name, value)) => headers(&value).map_err(|e| format!("{name}: {e}"))?,
            None => MetadataMap::new(),
        };
        let timeout = match get("TIMEOUT") {
            Some((name, value)) => match value.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(format!(
                        "{name}={value}: expected a positive number of milliseconds"
                    ))
                }
            },
            None => DEFAULT_TIMEOUT,
        };
        Ok(Settings {
            endpoint,
            headers,
            timeout,
        })
    }
}

/// A collector's address: `http://host:port`, or `host:port` (taken as plain HTTP/2).
fn endpoint(value: &str) -> Result<http::Uri, String> {
    let value = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("https") => Err(
            "meshlb's exporter has no TLS: export to a collector or agent over http:// \
             (on localhost, or a sidecar)"
                .to_owned(),
        ),
        _ => Err("expected http://host:port".to_owned()),
    }
}

/// `key=value,key2=value2`, values percent-decoded, as gRPC metadata.
fn headers(value: &str) -> Result<MetadataMap, String> {
    let mut map = MetadataMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, raw) = pair
            .split_once('=')
            .ok_or_else(|| format!("'{pair}' is not key=value"))?;
        let decoded = percent_encoding::percent_decode_str(raw.trim())
            .decode_utf8()
            .map_err(|_| format!("the value of '{}' is not UTF-8 once decoded", key.trim()))?;
        let key = MetadataKey::from_bytes(key.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("'{}' is not a header name", key.trim()))?;
        let value = MetadataValue::try_from(decoded.as_ref())
            .map_err(|_| format!("the value of '{key}' cannot be a header"))?;
        map.append(key, value);
    }
    Ok(map)
}

/// The exporter the SDK's batch processor calls.
#[derive(Debug)]
pub(crate) struct Exporter {
    client: tonic::client::Grpc<tonic::transport::Channel>,
    settings: Settings,
    /// Where the sending runs: the batch processor calls [`SpanExporter::export`] from a thread
    /// of its own, outside any runtime, and the channel and its timers live in this one.
    runtime: tokio::runtime::Handle,
    resource: Resource,
    resource_schema_url: String,
    stopped: AtomicBool,
}

impl Exporter {
    /// An exporter to `settings.endpoint`, which connects when it first exports. Must be called
    /// inside a tokio runtime; the exports run on it.
    pub(crate) fn new(settings: Settings) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the exporter needs a tokio runtime".to_owned())?;
        let channel = tonic::transport::Endpoint::from(settings.endpoint.clone())
            .connect_timeout(settings.timeout)
            .connect_lazy();
        Ok(Exporter {
            client: tonic::client::Grpc::new(channel),
            settings,
            runtime,
            resource: Resource::default(),
            resource_schema_url: String::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// The request for `batch`, its spans grouped by instrumentation scope in the order they
    /// first appear.
    fn request(&self, batch: Vec<SpanData>) -> ExportRequest {
        let mut scopes: Vec<(opentelemetry::InstrumentationScope, Vec<Bytes>)> = Vec::new();
        // Room for the whole batch at a typical span's size, so the buffer rarely grows.
        let mut buf = BytesMut::with_capacity(batch.len() * 256);
        for mut data in batch {
            let scope = std::mem::take(&mut data.instrumentation_scope);
            encode_span(data, &mut buf);
            let encoded = buf.split().freeze();
            match scopes.iter_mut().find(|(s, _)| *s == scope) {
                Some((_, spans)) => spans.push(encoded),
                None => scopes.push((scope, vec![encoded])),
            }
        }
        ExportRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: scopes
                    .into_iter()
                    .map(|(scope, spans)| ScopeSpans {
                        schema_url: scope.schema_url().unwrap_or_default().to_owned(),
                        scope: Some(InstrumentationScope::from((&scope, None))),
                        spans,
                    })
                    .collect(),
                schema_url: self.resource_schema_url.clone(),
            }],
        }
    }
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let request = self.request(batch);
        let sent = self
            .runtime
            .spawn(send(self.client.clone(), request, self.settings.clone()));
        match sent.await {
            Ok(result) => result.map_err(OTelSdkError::InternalFailure),
            Err(error) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP export to {} did not finish: {error}",
                self.settings.endpoint
            ))),
        }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if self.stopped.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        let converted = ResourceAttributesWithSchema::from(resource);
        self.resource = Resource {
            attributes: converted.attributes.0,
            ..Resource::default()
        };
        self.resource_schema_url = converted.schema_url.unwrap_or_default();
    }
}

/// Sends `request`, again after a transient failure, until it is answered or the timeout is
/// spent; the error says why the spans were lost.
async fn send(
    mut client: tonic::client::Grpc<tonic::transport::Channel>,
    request: ExportRequest,
    settings: Settings,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let mut backoff = crate::backoff::Backoff::new(RETRY_BASE, RETRY_MAX);
    let failed = |why: String| format!("OTLP export to {} failed: {why}", settings.endpoint);
    // Room for the gRPC frame's header too.
    let size = request.encoded_len() + 16;
    loop {
        let mut call = tonic::Request::new(request.clone());
        *call.metadata_mut() = settings.headers.clone();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        call.set_timeout(left);
        let answered = tokio::time::timeout_at(deadline, async {
            client
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            // The encode buffer as large as the request, and a single frame however large:
            // grown from tonic's default 8 KiB, a batch of 512 spans was copied six times over.
            let whole = tonic::codec::BufferSettings::new(size, size);
            let codec = crate::grpc::SizedCodec::<ExportRequest, ExportTraceServiceResponse>::new(
                whole,
                tonic::codec::BufferSettings::default(),
            );
            let path = http::uri::PathAndQuery::from_static(EXPORT);
            client.unary(call, path, codec).await
        })
        .await;
        let status = match answered {
            Ok(Ok(response)) => {
                if let Some(partial) = response.into_inner().partial_success {
                    if partial.rejected_spans > 0 {
                        return Err(failed(format!(
                            "the collector rejected {} spans: {}",
                            partial.rejected_spans, partial.error_message
                        )));
                    }
                }
                return Ok(());
            }
            Ok(Err(status)) => status,
            Err(_) => return Err(failed(format!("no answer within {:?}", settings.timeout))),
        };
        let why = crate::health::with_causes(
            format!("{}: {}", status.code(), status.message()),
            std::error::Error::source(&status),
        );
        let wait = backoff.next_delay();
        if !transient(status.code())
            || backoff.failures() > RETRIES
            || tokio::time::Instant::now() + wait >= deadline
        {
            return Err(failed(why));
        }
        tracing::debug!(error = %why, "OTLP export failed; trying again");
        tokio::time::sleep(wait).await;
    }
}

// === a span on the wire ===
//
// `opentelemetry.proto.trace.v1.Span`, written field by field from the SDK's `SpanData`. Going
// through opentelemetry-proto's `Span` instead cost 8.6k instructions a span (BENCHMARKS.md): an
// owned copy of every string, a `Display` call for each string value, prost working out each
// attribute's length three times, and the drop of it all. Attribute values other than strings,
// numbers and booleans, events, links and the status go through opentelemetry-proto's own
// conversion and prost; the unit tests hold the bytes to what that conversion makes.

/// `Span` field numbers (trace.proto).
mod field {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const DROPPED_ATTRIBUTES: u32 = 10;
    pub const EVENTS: u32 = 11;
    pub const DROPPED_EVENTS: u32 = 12;
    pub const LINKS: u32 = 13;
    pub const DROPPED_LINKS: u32 = 14;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
}

fn encode_span(data: SpanData, buf: &mut BytesMut) {
    use opentelemetry_proto::tonic::trace::v1::{span, status, SpanFlags, Status};
    let context = &data.span_context;
    bytes_field(field::TRACE_ID, &context.trace_id().to_bytes(), buf);
    bytes_field(field::SPAN_ID, &context.span_id().to_bytes(), buf);
    let trace_state = context.trace_state().header();
    bytes_field(field::TRACE_STATE, trace_state.as_bytes(), buf);
    if data.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes_field(field::PARENT_SPAN_ID, &data.parent_span_id.to_bytes(), buf);
    }
    bytes_field(field::NAME, data.name.as_bytes(), buf);
    varint_field(
        field::KIND,
        span::SpanKind::from(data.span_kind) as i32 as u64,
        buf,
    );
    fixed64_field(field::START, nanos(data.start_time), buf);
    fixed64_field(field::END, nanos(data.end_time), buf);
    for kv in data.attributes {
        key_value(field::ATTRIBUTES, kv, buf);
    }
    varint_field(
        field::DROPPED_ATTRIBUTES,
        data.dropped_attributes_count.into(),
        buf,
    );
    for event in data.events.events {
        let event = span::Event {
            time_unix_nano: nanos(event.timestamp),
            name: event.name.into_owned(),
            attributes: ProtoAttributes::from(event.attributes).0,
            dropped_attributes_count: event.dropped_attributes_count,
        };
        encoding::message::encode(field::EVENTS, &event, buf);
    }
    varint_field(field::DROPPED_EVENTS, data.events.dropped_count.into(), buf);
    for link in data.links.links {
        encoding::message::encode(field::LINKS, &span::Link::from(link), buf);
    }
    varint_field(field::DROPPED_LINKS, data.links.dropped_count.into(), buf);
    let status = Status {
        code: status::StatusCode::from(&data.status).into(),
        message: match data.status {
            opentelemetry::trace::Status::Error { description } => description.into_owned(),
            _ => String::new(),
        },
    };
    encoding::message::encode(field::STATUS, &status, buf);
    // Last, as prost orders fields by number.
    let mut flags = u32::from(data.span_context.trace_flags().to_u8())
        | SpanFlags::ContextHasIsRemoteMask as u32;
    if data.parent_span_is_remote {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    encoding::encode_key(field::FLAGS, WireType::ThirtyTwoBit, buf);
    buf.put_u32_le(flags);
}

/// One `KeyValue` (key 1, `AnyValue` 2) under `tag`.
fn key_value(tag: u32, kv: opentelemetry::KeyValue, buf: &mut BytesMut) {
    use opentelemetry::Value;
    let key = kv.key.as_str();
    let key_len = if key.is_empty() {
        0
    } else {
        1 + encoding::encoded_len_varint(key.len() as u64) + key.len()
    };
    // `AnyValue`'s oneof: string 1, bool 2, int 3, double 4; the rest as opentelemetry-proto
    // makes it.
    let (value_len, other) = match &kv.value {
        Value::String(s) => (
            1 + encoding::encoded_len_varint(s.as_str().len() as u64) + s.as_str().len(),
            None,
        ),
        Value::Bool(_) => (2, None),
        Value::I64(i) => (1 + encoding::encoded_len_varint(*i as u64), None),
        Value::F64(_) => (9, None),
        _ => {
            let any = AnyValue::from(kv.value.clone());
            (any.encoded_len(), Some(any))
        }
    };
    let kv_len = key_len + 1 + encoding::encoded_len_varint(value_len as u64) + value_len;
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(kv_len as u64, buf);
    bytes_field(1, key.as_bytes(), buf);
    encoding::encode_key(2, WireType::LengthDelimited, buf);
    encoding::encode_varint(value_len as u64, buf);
    match (&kv.value, other) {
        (_, Some(any)) => any.encode_raw(buf),
        (Value::String(s), _) => {
            // A oneof's member is written even when empty.
            encoding::encode_key(1, WireType::LengthDelimited, buf);
            encoding::encode_varint(s.as_str().len() as u64, buf);
            buf.put_slice(s.as_str().as_bytes());
        }
        (Value::Bool(b), _) => {
            encoding::encode_key(2, WireType::Varint, buf);
            encoding::encode_varint(u64::from(*b), buf);
        }
        (Value::I64(i), _) => {
            encoding::encode_key(3, WireType::Varint, buf);
            encoding::encode_varint(*i as u64, buf);
        }
        (Value::F64(f), _) => {
            encoding::encode_key(4, WireType::SixtyFourBit, buf);
            buf.put_f64_le(*f);
        }
        _ => {}
    }
}

/// A length-delimited field, left out when empty (proto3's default).
fn bytes_field(tag: u32, bytes: &[u8], buf: &mut BytesMut) {
    if !bytes.is_empty() {
        encoding::encode_key(tag, WireType::LengthDelimited, buf);
        encoding::encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// A varint field, left out when zero.
fn varint_field(tag: u32, value: u64, buf: &mut BytesMut) {
    if value != 0 {
        encoding::encode_key(tag, WireType::Varint, buf);
        encoding::encode_varint(value, buf);
    }
}

/// A fixed64 field, left out when zero.
fn fixed64_field(tag: u32, value: u64, buf: &mut BytesMut) {
    if value != 0 {
        encoding::encode_key(tag, WireType::SixtyFourBit, buf);
        buf.put_u64_le(value);
    }
}

/// Nanoseconds since the epoch, 0 before it (as opentelemetry-proto has it).
fn nanos(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The codes OTLP/gRPC says a client may retry on (without RetryInfo, `RESOURCE_EXHAUSTED` is
/// not one of them).
fn transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
    )
}

// `ExportTraceServiceRequest` as it goes on the wire, with each span already encoded: a span is a
// length-delimited field either way, so a collector reads the same bytes.

#[derive(Clone, PartialEq, prost::Message)]
struct ExportRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
    #[prost(string, tag = "3")]
    schema_url: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    scope: Option<InstrumentationScope>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<Bytes>,
    #[prost(string, tag = "3")]
    schema_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn context(trace: u128, span: u64, state: &str, remote: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            state.parse::<TraceState>().expect("a valid tracestate"),
        )
    }

    /// Spans with every field set one way or another, in two scopes taking turns.
    fn batch() -> Vec<SpanData> {
        let meshlb = opentelemetry::InstrumentationScope::builder("meshlb").build();
        let bridged = opentelemetry::InstrumentationScope::builder("tracing-opentelemetry")
            .with_version("0.34")
            .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
            .with_attributes([KeyValue::new("scope.kind", "bridge")])
            .build();
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(1_765_000_000_000 + ms);
        let every_value = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("empty", ""),
            KeyValue::new("", "no key"),
            KeyValue::new("unicode", "naïve ✓"),
            KeyValue::new("server.port", 50051_i64),
            KeyValue::new("negative", -7_i64),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("ratio", 0.25_f64),
            KeyValue::new("hedge", false),
            KeyValue::new("sampled", true),
            KeyValue::new(
                "tags",
                Value::Array(Array::String(vec![
                    StringValue::from("a"),
                    StringValue::from("b"),
                ])),
            ),
            KeyValue::new("ids", Value::Array(Array::I64(vec![1, -2, 3]))),
            KeyValue::new("long", "x".repeat(300)),
        ];
        let mut events = SpanEvents::default();
        events.events.push(Event::new(
            "hedge",
            at(3),
            vec![KeyValue::new("delay_ms", 2_i64)],
            1,
        ));
        events.events.push(Event::new("bare", at(4), vec![], 0));
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(7, 8, "k=v", true),
            vec![KeyValue::new("why", "follows")],
            0,
        ));
        links.dropped_count = 1;
        let span = |scope: &opentelemetry::InstrumentationScope, n: u64| SpanData {
            span_context: context(0xabc, n, "", false),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "userguide.v1.UserGuideService/GetPoint".into(),
            start_time: at(0),
            end_time: at(5),
            attributes: vec![KeyValue::new("meshlb.attempt", n as i64)],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
        let mut full = span(&meshlb, 1);
        full.span_context = context(0xdead_beef, 1, "vendor=abc,other=1", false);
        full.parent_span_id = SpanId::from(99);
        full.parent_span_is_remote = true;
        full.attributes = every_value;
        full.dropped_attributes_count = 3;
        full.events = events;
        full.links = links;
        full.status = Status::error("the replica said no");
        let mut server = span(&bridged, 2);
        server.span_kind = SpanKind::Server;
        server.status = Status::Ok;
        let mut before_epoch = span(&meshlb, 4);
        before_epoch.start_time = UNIX_EPOCH - Duration::from_secs(1);
        before_epoch.span_kind = SpanKind::Internal;
        vec![
            full,
            server,
            span(&meshlb, 3),
            before_epoch,
            span(&bridged, 5),
        ]
    }

    fn resource() -> opentelemetry_sdk::Resource {
        opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("meshlb-client")
            .with_attribute(KeyValue::new("host.name", "pod-7"))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.30.0")
            .build()
    }

    fn exporter(resource: &opentelemetry_sdk::Resource) -> Exporter {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let settings = Settings::from_lookup(|_| None).expect("the defaults are valid");
        let mut exporter = Exporter::new(settings).expect("inside a runtime");
        exporter.set_resource(resource);
        exporter
    }

    #[test]
    fn a_batch_goes_out_as_opentelemetry_proto_would_send_it() {
        // One resource for both: its attributes come out in its hash map's order.
        let resource = resource();
        let ours = exporter(&resource).request(batch()).encode_to_vec();
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).expect("valid OTLP");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch(), &(&resource).into()),
        };
        assert_eq!(decoded, theirs);
        assert_eq!(ours, theirs.encode_to_vec(), "the same bytes");
        // What the comparison rests on: two scopes in the order they came, every span kept.
        let scopes = &decoded.resource_spans[0].scope_spans;
        assert_eq!(scopes.len(), 2);
        assert_eq!(scopes[0].scope.as_ref().unwrap().name, "meshlb");
        assert_eq!(scopes[0].spans.len(), 3);
        assert_eq!(scopes[1].spans.len(), 2);
        assert_eq!(scopes[0].spans[0].attributes.len(), 13);
        assert_eq!(scopes[0].spans[0].events.len(), 2);
    }

    #[test]
    fn each_span_is_encoded_as_opentelemetry_proto_encodes_it() {
        // Byte for byte, not only once decoded: a collector that reads the wire gets the same.
        for data in batch() {
            let mut buf = BytesMut::new();
            encode_span(data.clone(), &mut buf);
            let theirs = opentelemetry_proto::tonic::trace::v1::Span::from(data);
            let decoded = opentelemetry_proto::tonic::trace::v1::Span::decode(&buf[..]).unwrap();
            assert_eq!(decoded, theirs);
            assert_eq!(buf.to_vec(), theirs.encode_to_vec(), "{}", theirs.name);
        }
    }

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_traces_variables_come_before_the_general_ones() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "collector.observability:4317",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", ""),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=a%20b%2Cc , X-Tenant=blue",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ])
        .unwrap();
        assert_eq!(
            s.endpoint.to_string(),
            "http://collector.observability:4317/"
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.headers.get("api-key").unwrap(), "a b,c");
        assert_eq!(s.headers.get("x-tenant").unwrap(), "blue");
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.endpoint.to_string(), "http://localhost:4317/");
        assert_eq!(defaults.timeout, DEFAULT_TIMEOUT);
        assert!(defaults.headers.is_empty());
    }

    #[test]
    fn what_it_cannot_do_is_refused_in_one_line_naming_the_variable() {
        for (var, value, says) in [
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://otel.example:4317",
                "no TLS",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://", "not a URL"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "ftp://x:1",
                "expected http://host:port",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten", "milliseconds"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0", "milliseconds"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue", "not key=value"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "bad key=1",
                "not a header name",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/protobuf",
                "over gRPC only",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                "gzip",
                "does not compress",
            ),
        ] {
            let error = settings(&[(var, value)]).expect_err(value);
            assert!(error.starts_with(var), "{error}");
            assert!(error.contains(says), "{error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_nobody_answers_fails_saying_where_it_went() {
        // A port nobody listens on: bind it, then free it.
        let nobody = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let endpoint = format!("http://{nobody}");
        let settings = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
        ])
        .unwrap();
        let exporter = Exporter::new(settings).unwrap();
        let started = std::time::Instant::now();
        // The batch processor calls it from a thread of its own, outside the runtime.
        let error =
            std::thread::spawn(move || futures::executor::block_on(exporter.export(batch())))
                .join()
                .unwrap()
                .expect_err("nobody answered");
        let error = error.to_string();
        assert!(error.contains(&endpoint), "{error}");
        assert!(error.contains("connect"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    /// A collector that keeps what it gets and answers as it is told, one answer per export.
    #[cfg(feature = "server")]
    mod collector {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
            TraceService, TraceServiceServer,
        };
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use std::sync::{Arc, Mutex};

        pub type Answer = Result<ExportTraceServiceResponse, tonic::Status>;

        #[derive(Clone, Default)]
        pub struct Collector {
            pub got: Arc<Mutex<Vec<(tonic::metadata::MetadataMap, ExportTraceServiceRequest)>>>,
            answers: Arc<Mutex<Vec<Answer>>>,
        }

        impl Collector {
            /// Serves on a free loopback port; answers OK once `answers` run out.
            pub async fn start(answers: Vec<Answer>) -> (Self, String) {
                let collector = Collector {
                    answers: Arc::new(Mutex::new(answers)),
                    ..Collector::default()
                };
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let endpoint = format!("http://{}", listener.local_addr().unwrap());
                let service = TraceServiceServer::new(collector.clone());
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        )),
                );
                (collector, endpoint)
            }

            pub fn rejecting(n: i64) -> Answer {
                Ok(ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans: n,
                        error_message: "too old".into(),
                    }),
                })
            }
        }

        #[tonic::async_trait]
        impl TraceService for Collector {
            async fn export(
                &self,
                request: tonic::Request<ExportTraceServiceRequest>,
            ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
                let (metadata, _, request) = request.into_parts();
                self.got.lock().unwrap().push((metadata, request));
                let mut answers = self.answers.lock().unwrap();
                let answer = if answers.is_empty() {
                    Ok(ExportTraceServiceResponse::default())
                } else {
                    answers.remove(0)
                };
                answer.map(tonic::Response::new)
            }
        }
    }

    /// Exports `batch()` as the batch processor does, from a thread outside the runtime.
    #[cfg(feature = "server")]
    async fn export_to(endpoint: &str, extra: &[(&str, &str)]) -> OTelSdkResult {
        let mut vars = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)];
        vars.extend_from_slice(extra);
        let exporter = Exporter::new(settings(&vars).unwrap()).unwrap();
        tokio::task::spawn_blocking(move || futures::executor::block_on(exporter.export(batch())))
            .await
            .unwrap()
    }

    #[cfg(feature = "server")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reaches_the_collector_with_the_headers_asked_for() {
        let (collector, endpoint) = collector::Collector::start(vec![]).await;
        export_to(
            &endpoint,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "4000"),
            ],
        )
        .await
        .expect("exported");
        let got = collector.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        let (metadata, request) = &got[0];
        assert_eq!(metadata.get("x-api-key").unwrap(), "s3cret");
        // The time left, as the collector sees it (tonic writes it in its own unit).
        assert!(metadata.get("grpc-timeout").is_some(), "{metadata:?}");
        let spans: usize = request.resource_spans[0]
            .scope_spans
            .iter()
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(spans, batch().len());
    }

    #[cfg(feature = "server")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collector_briefly_unavailable_gets_the_batch_again_and_a_refusal_is_final() {
        let (collector, endpoint) = collector::Collector::start(vec![
            Err(tonic::Status::unavailable("restarting")),
            Err(tonic::Status::unavailable("restarting")),
        ])
        .await;
        export_to(&endpoint, &[]).await.expect("the third try");
        assert_eq!(collector.got.lock().unwrap().len(), 3);

        let (collector, endpoint) =
            collector::Collector::start(vec![Err(tonic::Status::invalid_argument("bad batch"))])
                .await;
        let error = export_to(&endpoint, &[])
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains("bad batch"), "{error}");
        assert_eq!(collector.got.lock().unwrap().len(), 1, "not asked again");

        let (_, endpoint) =
            collector::Collector::start(vec![collector::Collector::rejecting(2)]).await;
        let error = export_to(&endpoint, &[])
            .await
            .expect_err("rejected")
            .to_string();
        assert!(error.contains("rejected 2 spans: too old"), "{error}");
    }

    #[test]
    fn time_before_the_epoch_is_zero() {
        assert_eq!(nanos(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(nanos(UNIX_EPOCH + Duration::from_nanos(5)), 5);
        assert!(nanos(SystemTime::now()) > 0);
    }
}
