//! Logs and traces. `tracing` to stderr (filtered by `RUST_LOG`), and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, meshlb's spans exported over OTLP/gRPC (batched, off the
//! request path): bridged from `tracing` by `tracing-opentelemetry`, except the balancer's call
//! spans, which it builds with the tracer this module keeps (`direct_tracer`). The standard
//! variables work: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, and the exporter's (`crate::otlp`, meshlb's own). W3C Trace Context
//! (`traceparent`, `tracestate`) crosses every hop in gRPC metadata: [`inject`] on the way out
//! ([`inject_span_context`] for a call that is not sampled and has no span); on the way in,
//! [`decide_served`] where meshlb's exporter runs (no span for a call that is not sampled),
//! else [`extract`] through the global propagator.
//!
//! Knows nothing of what is traced; the balancer and the replica open their own spans.

use opentelemetry::propagation::Extractor;
#[cfg(test)]
use opentelemetry::propagation::Injector;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SamplingDecision, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The target of the per-call RPC spans. Logs leave it out by default: those spans only matter to
/// the exporter, and creating two or three per call for nobody costs the request path.
pub const RPC_SPANS: &str = "meshlb::rpc";

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The running exporter, for [`flush`]; set once by [`init`].
static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();
/// meshlb's tracer, set with [`PROVIDER`], for the spans the balancer builds without `tracing`.
static TRACER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracer> =
    std::sync::OnceLock::new();
/// The first export that failed in this process, if any.
static EXPORT_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Whether this process exports spans (so a span's trace id means something to a trace UI).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The exporter, if one runs. [`Telemetry::shutdown`] flushes pending spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// How long [`Telemetry::shutdown`] waits for the last export.
    wait: std::time::Duration,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Long enough for the last export to run its course (the SDK's own wait is 5 s,
            // shorter than an export's timeout): cut short, it would say only "timed out".
            if let Err(error) = provider.shutdown_with_timeout(self.wait) {
                tracing::warn!(%error, "could not flush spans");
            }
        }
    }
}

/// Exports the spans ended so far and says whether every export of this process reached the
/// collector: a trace id is worth showing (as a trace UI link) only then. Blocks until the
/// collector answers, the exporter gives up, or the SDK's own wait (5 s) runs out, whichever is
/// first; call it off the async workers.
pub fn flush() -> Result<(), String> {
    let provider = PROVIDER.get().ok_or("spans are not exported")?;
    let flushed = provider.force_flush();
    // The exporter's own words, rather than the flush's wrapping of them.
    match EXPORT_FAILURE.lock().map(|f| f.clone()) {
        Ok(Some(failure)) => Err(failure),
        _ => flushed.map_err(|e| e.to_string()),
    }
}

/// The OTLP exporter, remembering the first failed export so [`flush`] can tell the user that
/// a trace never reached the collector.
#[derive(Debug)]
struct Recorded<E>(E);

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Recorded<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.0.export(batch).await;
        if let Err(error) = &result {
            if let Ok(mut first) = EXPORT_FAILURE.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
        result
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// Installs logging, and tracing export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// `default_service` names the service unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
/// does; logs show `default_level` and above unless `RUST_LOG` says otherwise, in colour only on
/// a terminal. Must run inside a tokio runtime (the exporter's channel lives there). Calling it
/// twice keeps the first setup.
pub fn init(default_service: &str, default_level: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let logs = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},{RPC_SPANS}=off")));

    let endpoint_set = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()));
    let mut wait = std::time::Duration::from_secs(5);
    let provider = if endpoint_set {
        match exporter_provider(default_service) {
            Ok((p, timeout)) => {
                wait = timeout + std::time::Duration::from_secs(1);
                Some(p)
            }
            Err(error) => {
                eprintln!("warning: tracing export disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let installed = subscriber(logs, provider.as_ref().map(|p| p.tracer("meshlb")))
        .try_init()
        .is_ok();
    // A second call keeps the first setup, exporting or not.
    if installed {
        EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    }
    if let (true, Some(p)) = (installed, &provider) {
        let _ = PROVIDER.set(p.clone());
        let _ = TRACER.set(p.tracer("meshlb"));
    }
    Telemetry { provider, wait }
}

/// Logs to stderr as `logs` lets through, and, with a `tracer`, meshlb's spans bridged to it.
fn subscriber(
    logs: EnvFilter,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(logs);
    // Only our spans, plus p2c's choice when asked for (the TRACE event in tower::balance that
    // carries `chosen`; its other events fire on every poll and would only cost), so the
    // exporter's own h2/hyper/tonic spans never feed back into it.
    let choices = if p2c_choices() {
        LevelFilter::TRACE
    } else {
        LevelFilter::OFF
    };
    // `most` is the hint that lets `tracing`'s macros skip a level nobody records with one
    // compare: a filter without one makes every `debug!` and `trace!` in h2, hyper and tower ask
    // the subscriber (about 1.2k instructions per call of the client).
    let (ours, most) = match tracer {
        Some(_) => (
            Targets::new()
                .with_target("meshlb", LevelFilter::INFO)
                .with_target("tower::balance::p2c", choices),
            std::cmp::max(LevelFilter::INFO, choices),
        ),
        None => (Targets::new(), LevelFilter::OFF),
    };
    let only_the_choice = filter_fn(move |meta| {
        *meta.level() <= most
            && (!meta.target().starts_with("tower::") || meta.fields().field("chosen").is_some())
    })
    .with_max_level_hint(most);
    // Filtered even when absent: a bare `None` layer counts as wanting every span, and the
    // logs' filter alone could then not keep a span from being built (a replica built one per
    // call, and parsed the caller's `traceparent` into it, for nobody). With no tracer, the
    // filter lets nothing through.
    let otel = tracer.map(bridge).with_filter(ours.and(only_the_choice));
    tracing_subscriber::registry().with(fmt).with(otel)
}

/// tracing-opentelemetry's layer as meshlb sets it up, for `tracing` spans exported through
/// `tracer`.
pub(crate) fn bridge<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    // Busy/idle timing, thread, source-location and target attributes cost a clock read or an
    // allocation on every poll or span, on the request path, and say nothing a trace needs.
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        // Activating the OTel context on every poll of a sampled span (a context clone and a
        // thread-local push and pop) serves only code that reads `Context::current()`; spans
        // here find their parent through tracing's current span.
        .with_context_activation(false)
}

/// The OTel context a call started now belongs to: the current `tracing` span's, when the OTel
/// layer records it, else OpenTelemetry's current context. Under [`init`]'s layer, which records
/// only meshlb's spans, a span of the program's own is not recorded, and the call starts a trace
/// (as the bridge would start it, unless a span of meshlb's were an ancestor of that span: the
/// bridge would look up to it, which only it can do, and which meshlb's own code never needs).
pub(crate) fn caller_context() -> opentelemetry::Context {
    let current = tracing::Span::current();
    if !current.is_none() {
        let cx = current.context();
        if cx.has_active_span() {
            return cx;
        }
    }
    opentelemetry::Context::current()
}

/// meshlb's tracer while its exporter runs, for spans built straight with it rather than through
/// `tracing` (the balancer's call spans: [`crate::balance::span`]); `None` when nothing is
/// exported, when the exporter is not meshlb's, or when p2c's choices are traced (they are
/// `tracing` events, and need a `tracing` span to land on).
pub(crate) fn direct_tracer() -> Option<&'static opentelemetry_sdk::trace::SdkTracer> {
    TRACER.get().filter(|_| exporting() && !p2c_choices())
}

/// Whether sampled traces carry p2c's choice: only when `MESHLB_TRACE_P2C` is `1`, `true` or
/// `on`. Each choice event cost a sampled call about 28k instructions (tower formats both loads,
/// the SDK stores and exports the event), a third of what tracing added to it. The event
/// attaches to the current span of the balancer's worker, so a try that records it runs inside
/// its span.
pub(crate) fn p2c_choices() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MESHLB_TRACE_P2C")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "on"))
    })
}

/// The provider, and how long an export may take.
fn exporter_provider(
    default_service: &str,
) -> Result<(SdkTracerProvider, std::time::Duration), String> {
    let settings = crate::otlp::Settings::from_env()?;
    let timeout = settings.timeout();
    for warning in &settings.warnings {
        eprintln!("warning: tracing export: {warning}");
    }
    let exporter = crate::otlp::Exporter::new(settings)?;
    let named_by_env = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let mut resource = Resource::builder();
    if !named_by_env {
        resource = resource.with_service_name(default_service.to_owned());
    }
    // The sampler the environment names (OTEL_TRACES_SAMPLER), kept for `decide_call`.
    let sampler = opentelemetry_sdk::trace::Config::default().sampler;
    let _ = SAMPLER.set(sampler.clone());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Recorded(exporter))
        .with_resource(resource.build())
        .with_sampler(sampler)
        .with_id_generator(DecidedIds::default())
        .build();
    Ok((provider, timeout))
}

/// The propagator's way in: the tests hold [`inject_span_context`] to what it writes.
#[cfg(test)]
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

#[cfg(test)]
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, crate::grpc::never_indexed(value));
        }
    }
}

/// The global propagator's way in ([`extract`]); the tests also hold [`extract_span_context`]
/// to what the SDK's W3C propagator reads through it.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes `span`'s trace context into outgoing request headers (gRPC metadata), as W3C
/// `traceparent` and `tracestate` ([`inject_span_context`]: the global propagator's lock and
/// formatting cost a sampled call more than the rest of its header work).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    let span = cx.span();
    if span.span_context().is_valid() {
        inject_span_context(span.span_context(), headers);
    }
}

/// Makes `span` continue the trace named in incoming request headers, if any, as the global
/// propagator reads them: a program with a subscriber of its own may have installed another
/// (B3, or baggage beside W3C). A disabled span (nothing exported, nothing logged) has no
/// parent to take: the headers are not parsed. Where meshlb's own exporter runs, a server
/// decides first ([`decide_served`], with [`extract_span_context`]).
pub fn extract(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The caller's W3C trace context in incoming headers: `traceparent` read as the spec says
/// (`parse_traceparent`), with `tracestate` when it is well formed. The inverse of
/// [`inject_span_context`], and for the same reason: through the global propagator, a replica
/// spent about 2.4k instructions per call (a lock, a `Vec` of parts, `from_str_radix`) reading
/// 55 bytes.
pub fn extract_span_context(headers: &http::HeaderMap) -> Option<SpanContext> {
    let (trace_id, span_id, flags) = parse_traceparent(headers.get(TRACEPARENT)?.as_bytes())?;
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// A `traceparent` value as W3C Trace Context (level 1) defines it:
/// `version-traceid-parentid-flags`, lowercase hex of 2, 32, 16 and 2 digits. Version `ff` and
/// all-zero ids are invalid; version `00` is exactly 55 bytes; a later version may add fields
/// after a `-`, which are skipped. Only the sampled flag is kept (the spec's other flags are
/// zeroed, as the SDK's propagator does).
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim_ascii();
    let (head, rest) = value.split_at_checked(55)?;
    let version = hex_value(&head[0..2])?;
    let well_placed = head[2] == b'-' && head[35] == b'-' && head[52] == b'-';
    let extended_well = match version {
        0 => rest.is_empty(),
        0xff => false,
        _ => rest.is_empty() || rest[0] == b'-',
    };
    if !well_placed || !extended_well {
        return None;
    }
    let trace_id =
        u128::from(hex_value(&head[3..19])?) << 64 | u128::from(hex_value(&head[19..35])?);
    let span_id = hex_value(&head[36..52])?;
    let flags = hex_value(&head[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    // Two digits fit a byte: the cast keeps every bit.
    Some((
        TraceId::from(trace_id),
        SpanId::from(span_id),
        TraceFlags::new(flags as u8) & TraceFlags::SAMPLED,
    ))
}

/// Lowercase hex digits (at most 16) as a number; `None` at any other byte. By a table and in
/// 64 bits: a replica that exports reads 50 digits on every call.
fn hex_value(digits: &[u8]) -> Option<u64> {
    const INVALID: u8 = 0xff;
    const DIGITS: [u8; 256] = {
        let mut table = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    let mut n = 0u64;
    let mut invalid = 0u8;
    for d in digits {
        let v = DIGITS[usize::from(*d)];
        invalid |= v & 0xf0;
        n = n << 4 | u64::from(v & 0xf);
    }
    (invalid == 0).then_some(n)
}

/// The trace id of the first sampled call this process made, for a link to it.
static FIRST_SAMPLED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Remembers `span`'s trace id if it is the process's first sampled call (one atomic load once
/// there is one, and nothing at all when nothing is exported).
pub fn note_sampled(span: &tracing::Span) {
    if exporting() && FIRST_SAMPLED.get().is_none() {
        note_sampled_context(span.context().span().span_context());
    }
}

/// [`note_sampled`] for the context of a span that is not a `tracing` one.
pub fn note_sampled_context(sc: &SpanContext) {
    if exporting() && FIRST_SAMPLED.get().is_none() && sc.is_valid() && sc.is_sampled() {
        let _ = FIRST_SAMPLED.set(sc.trace_id().to_string());
    }
}

/// The trace id [`note_sampled`] kept, if any.
pub fn first_sampled_trace_id() -> Option<String> {
    FIRST_SAMPLED.get().cloned()
}

/// The sampler the exporter was built with (from `OTEL_TRACES_SAMPLER`), for [`decide_call`].
static SAMPLER: std::sync::OnceLock<Box<dyn ShouldSample>> = std::sync::OnceLock::new();

thread_local! {
    /// The trace id [`decide_call`] sampled a new trace on, for the span it is about to open.
    static NEXT_TRACE_ID: std::cell::Cell<Option<TraceId>> = const { std::cell::Cell::new(None) };
}

/// Lets go of the trace id [`decide_call`] or [`decide_served`] kept for a span that was then not
/// built (a subscriber that disabled it): the next new trace on this thread must not take it.
#[cfg(feature = "server")]
pub(crate) fn forget_decided_trace_id() {
    NEXT_TRACE_ID.with(std::cell::Cell::take);
}

/// Random ids, except that a new trace started right after [`decide_call`] sampled it gets the
/// trace id the decision was made on: the exporter's sampler then decides the same way.
#[derive(Debug, Default)]
struct DecidedIds(RandomIdGenerator);

impl IdGenerator for DecidedIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .with(std::cell::Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// How a call is traced, decided when it starts ([`decide_call`]).
#[derive(Debug, Clone)]
pub enum CallTrace {
    /// Spans for the call and its attempts (exported and sampled, or not exported at all: then
    /// spans are disabled and cost next to nothing), with the caller's context when the decision
    /// was made on it.
    Spans(Option<opentelemetry::Context>),
    /// Exported but not sampled: no span is built; this context (the caller's, or a new trace)
    /// goes out with the call, its sampled flag clear, so the next hops do not sample it either.
    /// It is the same for every try, so it is written into the request's headers once
    /// ([`inject_span_context`]) and every copy of the request carries it.
    Forward(SpanContext),
}

/// Decides, before any span exists, whether the call about to start under the current span is
/// sampled, with the exporter's own sampler. Building spans (with tracing-opentelemetry) costs
/// the same sampled or not; an unsampled call builds none.
pub fn decide_call() -> CallTrace {
    match sampler() {
        Some(sampler) => decide(sampler, caller_context(), "grpc.call"),
        None => CallTrace::Spans(None),
    }
}

/// [`decide_call`] for a call served: on the caller's context in the request's headers, so a
/// server builds no span for a call its caller did not sample (a replica that exports spent
/// about 11k instructions on the span of each call it then dropped). `Spans` carries the
/// caller's context (or an empty one) only when a span is to be built; a `Forward` is the
/// caller's context, to make current while the call is served, so that the calls it makes
/// go on unsampled in the same trace.
pub fn decide_served(headers: &http::HeaderMap) -> CallTrace {
    let Some(sampler) = sampler() else {
        return CallTrace::Spans(None);
    };
    let parent = match extract_span_context(headers) {
        Some(sc) => opentelemetry::Context::new().with_remote_span_context(sc),
        None => opentelemetry::Context::new(),
    };
    decide(sampler, parent, "grpc.server")
}

/// The exporter's sampler, while meshlb's own exporter runs: only then is a call decided before
/// its span is built (under a subscriber of the program's own, the span decides as it is built).
fn sampler() -> Option<&'static dyn ShouldSample> {
    SAMPLER.get().filter(|_| exporting()).map(|s| &**s)
}

/// The decision under `parent`, with `sampler`.
fn decide(sampler: &dyn ShouldSample, parent: opentelemetry::Context, name: &str) -> CallTrace {
    let psc = parent.span().span_context().clone();
    let trace_id = if psc.is_valid() {
        psc.trace_id()
    } else {
        TraceId::from(rand::random::<u128>())
    };
    let result = sampler.should_sample(
        Some(&parent),
        trace_id,
        name,
        &opentelemetry::trace::SpanKind::Internal,
        &[],
        &[],
    );
    if result.decision == SamplingDecision::RecordAndSample {
        if !psc.is_valid() {
            NEXT_TRACE_ID.with(|next| next.set(Some(trace_id)));
        }
        return CallTrace::Spans(Some(parent));
    }
    let forward = if psc.is_valid() {
        SpanContext::new(
            psc.trace_id(),
            psc.span_id(),
            TraceFlags::default(),
            true,
            psc.trace_state().clone(),
        )
    } else {
        SpanContext::new(
            trace_id,
            SpanId::from(rand::random::<u64>()),
            TraceFlags::default(),
            false,
            TraceState::default(),
        )
    };
    CallTrace::Forward(forward)
}

/// Writes `sc` into outgoing request headers as W3C `traceparent` (and `tracestate` when it
/// has one): what the [`TraceContextPropagator`] that [`init`] installs writes, without its
/// global lock, an OTel `Context`, or a `String` per header. Every unsampled call pays this.
pub fn inject_span_context(sc: &SpanContext, headers: &mut http::HeaderMap) {
    // Whatever an earlier hop or try left there belongs to another context: each header is
    // replaced, or removed where there is nothing to write.
    if !sc.is_valid() {
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        return;
    }
    // "00-" 32 hex "-" 16 hex "-" 2 hex, written by hand: through `write!` the ids' hex
    // formatting cost an unsampled call more than the rest of its tracing.
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut buf[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut buf[36..52], &sc.span_id().to_bytes());
    hex_into(
        &mut buf[53..55],
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
    );
    match http::HeaderValue::from_bytes(&buf).ok() {
        Some(value) => headers.insert(TRACEPARENT, crate::grpc::never_indexed(value)),
        None => headers.remove(TRACEPARENT),
    };
    let state = sc.trace_state().header();
    match http::HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(TRACESTATE, crate::grpc::never_indexed(value))
        }
        _ => headers.remove(TRACESTATE),
    };
}

/// Writes `bytes` as lowercase hex into `out` (twice their length).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// `(service, method)` of a gRPC path such as `/userguide.v1.UserGuideService/GetPoint`.
pub fn rpc_names(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Spans kept as the SDK ends them, for the unit tests of the modules that make spans.
#[cfg(test)]
pub(crate) mod kept {
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};
    use std::sync::{Arc, Mutex};

    /// Keeps every span it is given (as a simple exporter: at once, when the span ends).
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Kept(pub(crate) Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            rpc_names("/userguide.v1.UserGuideService/GetPoint"),
            ("userguide.v1.UserGuideService", "GetPoint")
        );
        assert_eq!(rpc_names("/odd"), ("odd", ""));
    }

    #[test]
    fn without_an_exporter_a_call_span_the_logs_leave_out_is_never_built() {
        // A replica logs at info and leaves RPC spans out of its logs: with nothing exported,
        // its per-call span must cost nothing (no registry slot, no parsing of the caller's
        // `traceparent` into it).
        let logs = EnvFilter::new(format!("info,{RPC_SPANS}=off"));
        tracing::subscriber::with_default(subscriber(logs, None), || {
            let span = tracing::info_span!(target: RPC_SPANS, "grpc.server");
            assert!(span.is_disabled(), "an RPC span nobody records was built");
            let logged = tracing::info_span!("a span the logs show");
            assert!(
                !logged.is_disabled(),
                "the logs' own spans must still be built"
            );
        });
        let logs = EnvFilter::new(format!("info,{RPC_SPANS}=info"));
        tracing::subscriber::with_default(subscriber(logs, None), || {
            let span = tracing::info_span!(target: RPC_SPANS, "grpc.server");
            assert!(
                !span.is_disabled(),
                "RUST_LOG asked for RPC spans in the logs"
            );
        });
    }

    #[test]
    fn the_subscriber_says_the_most_verbose_level_anything_records() {
        // `tracing`'s macros skip a level above this hint with one compare; without it, every
        // `trace!` in h2 and hyper asks the subscriber.
        use tracing::Subscriber as _;
        let warn = || EnvFilter::new(format!("warn,{RPC_SPANS}=off"));
        assert_eq!(
            subscriber(warn(), None).max_level_hint(),
            Some(LevelFilter::WARN)
        );
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let choices = if p2c_choices() {
            LevelFilter::TRACE
        } else {
            LevelFilter::INFO
        };
        assert_eq!(
            subscriber(warn(), Some(tracer)).max_level_hint(),
            Some(choices),
            "exported spans are info"
        );
    }

    #[test]
    fn extract_then_inject_round_trips_a_foreign_traceparent() {
        // Without an exporter there is no OTel span to carry it; a hop must still read and
        // write the W3C format.
        let mut incoming = http::HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        incoming.insert("traceparent", tp.parse().unwrap());
        incoming.insert("tracestate", "vendor=x1".parse().unwrap());
        let sc = extract_span_context(&incoming).unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        let mut outgoing = http::HeaderMap::new();
        inject_span_context(&sc, &mut outgoing);
        assert_eq!(outgoing, incoming);
        assert!(
            outgoing["traceparent"].is_sensitive(),
            "a trace id is new on every call: never indexed by HPACK"
        );
    }

    /// What the SDK's propagator reads from these headers, as a span context (invalid: nothing).
    fn propagator_reads(headers: &http::HeaderMap) -> Option<SpanContext> {
        let cx = opentelemetry::propagation::TextMapPropagator::extract(
            &TraceContextPropagator::new(),
            &HeaderExtractor(headers),
        );
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    #[test]
    fn reads_a_traceparent_as_the_propagator_does() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let span = "00f067aa0ba902b7";
        let agreed = [
            format!("00-{id}-{span}-01"),
            format!("00-{id}-{span}-00"),
            // Flags other than sampled are zeroed.
            format!("00-{id}-{span}-ff"),
            format!("00-{id}-{span}-02"),
            // A later version, with and without a field of its own.
            format!("01-{id}-{span}-01"),
            format!("cc-{id}-{span}-01-what-the-future-holds"),
            // Invalid: version ff, extra fields in version 00, zero ids, uppercase, not hex,
            // too few parts, empty.
            format!("ff-{id}-{span}-01"),
            format!("00-{id}-{span}-01-extra"),
            format!("00-00000000000000000000000000000000-{span}-01"),
            format!("00-{id}-0000000000000000-01"),
            format!("00-{}-{span}-01", id.to_uppercase()),
            format!("00-{id}-{}-01", span.to_uppercase()),
            format!("00-{id}-{span}-0A"),
            format!("00-{id}-{span}-0g"),
            format!("00-{id}-{span}"),
            format!("0x-{id}-{span}-01"),
            String::new(),
            "00-stale".to_owned(),
        ];
        for traceparent in agreed {
            for state in [None, Some("vendor=x1,other=y2"), Some("not a tracestate")] {
                let mut headers = http::HeaderMap::new();
                headers.insert("traceparent", traceparent.parse().unwrap());
                if let Some(state) = state {
                    headers.insert("tracestate", state.parse().unwrap());
                }
                assert_eq!(
                    extract_span_context(&headers),
                    propagator_reads(&headers),
                    "{traceparent:?} with tracestate {state:?}"
                );
            }
        }
        let mut none = http::HeaderMap::new();
        assert_eq!(extract_span_context(&none), None);
        none.insert("tracestate", "vendor=x1".parse().unwrap());
        assert_eq!(extract_span_context(&none), None);
    }

    #[test]
    fn reads_hex_digits_and_nothing_else() {
        assert_eq!(hex_value(b"0123456789abcdef"), Some(0x0123_4567_89ab_cdef));
        assert_eq!(hex_value(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(hex_value(b""), Some(0));
        for bad in [
            &b"0A"[..],
            b"0g",
            b"-1",
            b"0\xe9",
            b"0 ",
            b"/0",
            b":0",
            b"`0",
        ] {
            assert_eq!(hex_value(bad), None, "{bad:?}");
        }
        let mut traceparent = *b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(&traceparent).is_some());
        traceparent[10] = 0xe9;
        assert_eq!(parse_traceparent(&traceparent), None, "a byte past ASCII");
    }

    #[test]
    fn reads_a_traceparent_by_the_spec_where_the_propagator_is_lenient() {
        // The SDK reads each part as a number of any width; the spec fixes the widths, and a
        // value that breaks them is another system's id, not this trace's.
        let mut headers = http::HeaderMap::new();
        for loose in [
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-1-2-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b70-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "A0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            headers.insert("traceparent", loose.parse().unwrap());
            assert!(propagator_reads(&headers).is_some(), "{loose}");
            assert_eq!(extract_span_context(&headers), None, "{loose}");
        }
    }

    #[test]
    fn a_call_is_decided_on_its_callers_context() {
        use opentelemetry_sdk::trace::Sampler;
        let follow = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
        let caller = |flags| {
            let sc = SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
                SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                flags,
                true,
                TraceState::from_key_value([("vendor", "x1")]).unwrap(),
            );
            (
                opentelemetry::Context::new().with_remote_span_context(sc.clone()),
                sc,
            )
        };
        // Unsampled caller: no span; the caller's own context goes on, unsampled.
        let (cx, sc) = caller(TraceFlags::default());
        match decide(&follow, cx, "grpc.server") {
            CallTrace::Forward(forward) => {
                assert_eq!(forward.trace_id(), sc.trace_id());
                assert_eq!(forward.span_id(), sc.span_id());
                assert!(!forward.is_sampled());
                assert_eq!(forward.trace_state().header(), "vendor=x1");
            }
            other => panic!("an unsampled caller's call was decided {other:?}"),
        }
        assert_eq!(NEXT_TRACE_ID.with(std::cell::Cell::take), None);
        // Sampled caller: spans under the caller's context, and no new trace id kept.
        let (cx, sc) = caller(TraceFlags::SAMPLED);
        match decide(&follow, cx, "grpc.server") {
            CallTrace::Spans(Some(parent)) => assert_eq!(*parent.span().span_context(), sc),
            other => panic!("a sampled caller's call was decided {other:?}"),
        }
        assert_eq!(NEXT_TRACE_ID.with(std::cell::Cell::take), None);
        // No caller: a new trace, whose id the span must then take; or, not sampled, a new
        // context to forward, unsampled.
        match decide(&follow, opentelemetry::Context::new(), "grpc.server") {
            CallTrace::Spans(Some(parent)) => assert!(!parent.has_active_span()),
            other => panic!("a new trace was decided {other:?}"),
        }
        assert!(NEXT_TRACE_ID.with(std::cell::Cell::take).is_some());
        match decide(
            &Sampler::AlwaysOff,
            opentelemetry::Context::new(),
            "grpc.server",
        ) {
            CallTrace::Forward(forward) => assert!(forward.is_valid() && !forward.is_sampled()),
            other => panic!("an unsampled new trace was decided {other:?}"),
        }
        assert_eq!(NEXT_TRACE_ID.with(std::cell::Cell::take), None);
    }

    #[test]
    fn a_forwarded_context_is_written_as_the_propagator_writes_it() {
        let propagator = TraceContextPropagator::new();
        for (flags, state) in [
            (TraceFlags::default(), TraceState::default()),
            (
                TraceFlags::SAMPLED,
                TraceState::from_key_value([("vendor", "x1")]).unwrap(),
            ),
        ] {
            let sc = SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
                SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                flags,
                true,
                state,
            );
            let mut ours = http::HeaderMap::new();
            inject_span_context(&sc, &mut ours);
            let mut theirs = http::HeaderMap::new();
            opentelemetry::propagation::TextMapPropagator::inject_context(
                &propagator,
                &opentelemetry::Context::new().with_remote_span_context(sc),
                &mut HeaderInjector(&mut theirs),
            );
            assert_eq!(ours.get("traceparent"), theirs.get("traceparent"));
            // The propagator writes an empty `tracestate` too; a header with nothing in it is
            // left out (the W3C spec reads a missing one and an empty one alike).
            let non_empty = theirs.get("tracestate").filter(|v| !v.is_empty());
            assert_eq!(ours.get("tracestate"), non_empty);
            assert!(ours["traceparent"].is_sensitive());
        }
    }

    #[test]
    fn a_forwarded_context_replaces_what_the_request_carried() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-stale".parse().unwrap());
        headers.insert("tracestate", "old=1".parse().unwrap());
        let sc = SpanContext::new(
            TraceId::from(1_u128),
            SpanId::from(2_u64),
            TraceFlags::new(0xff),
            true,
            TraceState::default(),
        );
        inject_span_context(&sc, &mut headers);
        assert_eq!(
            headers["traceparent"], "00-00000000000000000000000000000001-0000000000000002-01",
            "only the sampled flag is written"
        );
        assert!(headers.get("tracestate").is_none());
        inject_span_context(&SpanContext::empty_context(), &mut headers);
        assert!(headers.is_empty(), "an invalid context writes nothing");
    }
}
