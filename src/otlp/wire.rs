//! The OTLP trace request on the wire: each span written straight from the SDK's `SpanData`, and
//! the `ExportTraceServiceRequest` framed around those bytes.
//!
//! `opentelemetry.proto.trace.v1.Span` is written field by field. Going through
//! opentelemetry-proto's `Span` instead cost about 8.5k instructions a span (BENCHMARKS.md): an
//! owned copy of every string, a `Display` call for each string value, prost working out each
//! attribute's length several times, and the drop of it all. Attribute values other than
//! strings, numbers and booleans, events, links and the status go through opentelemetry-proto's
//! own conversion and prost. The tests hold every byte to what that conversion and prost make.
//!
//! Knows nothing of where the request goes or how it is sent.

use bytes::BufMut as _;
use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::Attributes as ProtoAttributes;
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{self, WireType};
use prost::Message as _;

/// The request for `batch`, its spans grouped by instrumentation scope in the order they first
/// appear (as opentelemetry-proto groups them), under one resource.
pub(super) fn request(
    batch: Vec<SpanData>,
    resource: &Resource,
    schema_url: &str,
) -> ExportRequest {
    let mut scopes: Vec<(opentelemetry::InstrumentationScope, Vec<Bytes>)> = Vec::new();
    // Room for the whole batch at a typical span's size, so the buffer rarely grows.
    let mut buf = BytesMut::with_capacity(batch.len() * 512);
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
            resource: Some(resource.clone()),
            scope_spans: scopes
                .into_iter()
                .map(|(scope, spans)| ScopeSpans {
                    schema_url: scope.schema_url().unwrap_or_default().to_owned(),
                    scope: Some(InstrumentationScope::from((&scope, None))),
                    spans,
                })
                .collect(),
            schema_url: schema_url.to_owned(),
        }],
    }
}

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

/// Writes `data` as an OTLP `Span` message (without its tag and length) at the end of `buf`.
pub(super) fn encode_span(data: SpanData, buf: &mut BytesMut) {
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
    field_key(field::FLAGS, WireType::ThirtyTwoBit, buf);
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
    // `AnyValue`'s oneof (string 1, bool 2, int 3, double 4), whose member is written even when
    // empty, false or zero; arrays as opentelemetry-proto makes them.
    let value = match kv.value {
        Value::String(s) => Scalar::String(s),
        Value::Bool(b) => Scalar::Bool(b),
        Value::I64(i) => Scalar::Int(i),
        Value::F64(f) => Scalar::Double(f),
        other => Scalar::Other(AnyValue::from(other)),
    };
    let value_len = match &value {
        Scalar::String(s) => {
            let len = s.as_str().len();
            1 + encoding::encoded_len_varint(len as u64) + len
        }
        Scalar::Bool(_) => 2,
        Scalar::Int(i) => 1 + encoding::encoded_len_varint(*i as u64),
        Scalar::Double(_) => 9,
        Scalar::Other(any) => any.encoded_len(),
    };
    let kv_len = key_len + 1 + encoding::encoded_len_varint(value_len as u64) + value_len;
    field_key(tag, WireType::LengthDelimited, buf);
    varint(kv_len as u64, buf);
    bytes_field(1, key.as_bytes(), buf);
    field_key(2, WireType::LengthDelimited, buf);
    varint(value_len as u64, buf);
    match value {
        Scalar::String(s) => {
            field_key(1, WireType::LengthDelimited, buf);
            varint(s.as_str().len() as u64, buf);
            buf.put_slice(s.as_str().as_bytes());
        }
        Scalar::Bool(b) => {
            field_key(2, WireType::Varint, buf);
            varint(u64::from(b), buf);
        }
        Scalar::Int(i) => {
            field_key(3, WireType::Varint, buf);
            varint(i as u64, buf);
        }
        Scalar::Double(f) => {
            field_key(4, WireType::SixtyFourBit, buf);
            buf.put_f64_le(f);
        }
        Scalar::Other(any) => any.encode_raw(buf),
    }
}

/// An attribute's value, as [`key_value`] writes it.
enum Scalar {
    String(opentelemetry::StringValue),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other(AnyValue),
}

/// A varint, as prost writes it. Almost every one here (a tag, a length, a small number) is
/// one byte: written inline, where prost's loop behind a call cost a sampled span about 1k
/// instructions in all.
#[inline]
fn varint(value: u64, buf: &mut BytesMut) {
    if value < 0x80 {
        buf.put_u8(value as u8);
    } else {
        encoding::encode_varint(value, buf);
    }
}

/// A field's key (its number and wire type), as prost writes it.
#[inline]
fn field_key(tag: u32, wire_type: WireType, buf: &mut BytesMut) {
    varint(u64::from(tag << 3 | wire_type as u32), buf);
}

/// A length-delimited field, left out when empty (proto3's default).
fn bytes_field(tag: u32, bytes: &[u8], buf: &mut BytesMut) {
    if !bytes.is_empty() {
        field_key(tag, WireType::LengthDelimited, buf);
        varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// A varint field, left out when zero.
fn varint_field(tag: u32, value: u64, buf: &mut BytesMut) {
    if value != 0 {
        field_key(tag, WireType::Varint, buf);
        varint(value, buf);
    }
}

/// A fixed64 field, left out when zero.
fn fixed64_field(tag: u32, value: u64, buf: &mut BytesMut) {
    if value != 0 {
        field_key(tag, WireType::SixtyFourBit, buf);
        buf.put_u64_le(value);
    }
}

/// Nanoseconds since the epoch, 0 before it (as opentelemetry-proto has it).
fn nanos(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// `ExportTraceServiceRequest` as it goes on the wire, with each span already encoded: a span is a
// length-delimited field either way, so a collector reads the same bytes.

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ExportRequest {
    #[prost(message, repeated, tag = "1")]
    pub(super) resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub(super) resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub(super) scope_spans: Vec<ScopeSpans>,
    #[prost(string, tag = "3")]
    pub(super) schema_url: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub(super) scope: Option<InstrumentationScope>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub(super) spans: Vec<Bytes>,
    #[prost(string, tag = "3")]
    pub(super) schema_url: String,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
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
    pub(in crate::otlp) fn batch() -> Vec<SpanData> {
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
        // Lengths past one and two varint bytes, extreme numbers, arrays of every kind,
        // an empty name, an unsampled context, an error without words.
        let mut edges = span(&meshlb, 6);
        edges.name = "".into();
        edges.span_kind = SpanKind::Producer;
        edges.span_context = SpanContext::new(
            TraceId::from(0xfeed_u128),
            SpanId::from(6),
            TraceFlags::NOT_SAMPLED,
            false,
            TraceState::default(),
        );
        edges.attributes = vec![
            KeyValue::new("k".repeat(200), "long key"),
            KeyValue::new("huge", "v".repeat(20_000)),
            KeyValue::new("min", i64::MIN),
            KeyValue::new("max", i64::MAX),
            KeyValue::new("minus.zero", -0.0_f64),
            KeyValue::new("inf", f64::INFINITY),
            KeyValue::new("floats", Value::Array(Array::F64(vec![1.5, -2.0]))),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("none", Value::Array(Array::I64(vec![]))),
        ];
        edges.status = Status::error("");
        let mut consumer = span(&bridged, 7);
        consumer.span_kind = SpanKind::Consumer;
        vec![
            full,
            server,
            span(&meshlb, 3),
            before_epoch,
            span(&bridged, 5),
            edges,
            consumer,
        ]
    }

    fn resource() -> opentelemetry_sdk::Resource {
        opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("meshlb-client")
            .with_attribute(KeyValue::new("host.name", "pod-7"))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.30.0")
            .build()
    }

    #[test]
    fn a_batch_goes_out_as_opentelemetry_proto_would_send_it() {
        // One resource for both: its attributes come out in its hash map's order.
        let resource = resource();
        let converted = ResourceAttributesWithSchema::from(&resource);
        let proto = Resource {
            attributes: converted.attributes.0.clone(),
            ..Resource::default()
        };
        let schema_url = converted.schema_url.clone().unwrap_or_default();
        let ours = request(batch(), &proto, &schema_url).encode_to_vec();
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
        assert_eq!(scopes[0].spans.len(), 4);
        assert_eq!(scopes[1].spans.len(), 3);
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
        // NaN is not equal to itself once decoded: its bytes are.
        let mut nan = batch().remove(2);
        nan.attributes = vec![KeyValue::new("nan", f64::NAN)];
        let mut buf = BytesMut::new();
        encode_span(nan.clone(), &mut buf);
        let theirs = opentelemetry_proto::tonic::trace::v1::Span::from(nan);
        assert_eq!(buf.to_vec(), theirs.encode_to_vec());
    }

    #[test]
    fn time_before_the_epoch_is_zero() {
        assert_eq!(nanos(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(nanos(UNIX_EPOCH + Duration::from_nanos(5)), 5);
        assert!(nanos(SystemTime::now()) > 0);
    }
}
