//! meshlb's OTLP/gRPC span exporter: each batch the SDK's batch processor hands over, sent to a
//! collector's `TraceService/Export`.
//!
//! Each span is written straight from the SDK's `SpanData` into one buffer, byte for byte what
//! opentelemetry-proto's conversion and prost would write, and the request is framed around those
//! bytes ([`wire`]). opentelemetry-otlp, which this replaces, cost a sampled
//! call about 11k instructions more (BENCHMARKS.md): it copies the whole batch before converting
//! it, the conversion copies every string, and prost works out a span's length once per level of
//! the request it sits in.
//!
//! It reads the standard variables, the `_TRACES_` one first: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (`telemetry::init` exports only when it is set; without a scheme it means TLS unless
//! `…_INSECURE` is `true`), `…_HEADERS` (`key=value,…`, values percent-encoded), `…_TIMEOUT`
//! (milliseconds, default 10 000, at most a day, a bound on an export and its retries),
//! `…_COMPRESSION` (`none`; anything else is warned of and not done) and `…_PROTOCOL` (only
//! `grpc`). There is no TLS: an endpoint that asks for it is refused rather than sent
//! credentials in the clear. An export that fails with a
//! status the OTLP spec calls transient is tried again, at most three more times, within the
//! timeout.
//!
//! Knows nothing of which spans are made or sampled; `telemetry` decides that.

mod wire;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prost::Message as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use wire::ExportRequest;

const DEFAULT_ENDPOINT: &str = "http://localhost:4317";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Tries after the first, for a status the spec calls transient.
const RETRIES: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How much of a collector's own words an error repeats.
const QUOTED: usize = 300;

/// A collector's own words as an error may repeat them: bounded, and on one line with no
/// terminal escapes (tonic percent-decodes `grpc-message`, so it can hold any character).
fn quoted(text: &str) -> String {
    crate::grpc::bounded(text, QUOTED)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Where and how to export, from the environment.
#[derive(Clone)]
pub(crate) struct Settings {
    endpoint: http::Uri,
    headers: MetadataMap,
    timeout: Duration,
    /// What was asked for and will not be done, one line each, for the user.
    pub(crate) warnings: Vec<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are often credentials: only their names are shown.
        let names: Vec<&str> = self
            .headers
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str(),
            })
            .collect();
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Settings {
    /// How long an export may take, its retries included.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// From the process's `OTEL_EXPORTER_OTLP_*` variables.
    pub(crate) fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From `var`, which looks a variable up: the `_TRACES_` one, else the general one. An
    /// empty value counts as unset, as the spec says. What cannot be honoured safely (a protocol
    /// other than gRPC, TLS) is an error; what can be done without (compression, a malformed
    /// timeout or header) is a warning.
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
        let mut warnings = Vec::new();
        if let Some((name, protocol)) = get("PROTOCOL") {
            if !protocol.eq_ignore_ascii_case("grpc") {
                return Err(format!(
                    "{name}={protocol}: meshlb exports OTLP over gRPC only (set it to grpc, or unset it)"
                ));
            }
        }
        if let Some((name, compression)) = get("COMPRESSION") {
            if !compression.eq_ignore_ascii_case("none") {
                warnings.push(format!(
                    "{name}={compression}: meshlb's exporter does not compress; spans go uncompressed"
                ));
            }
        }
        let insecure = get("INSECURE").is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"));
        let endpoint = match get("ENDPOINT") {
            Some((name, value)) => endpoint(&value, insecure).map_err(|e| {
                // Not repeated when it holds credentials.
                let shown = if value.contains('@') {
                    "…"
                } else {
                    value.as_str()
                };
                format!("{name}={shown}: {e}")
            })?,
            None => http::Uri::from_static(DEFAULT_ENDPOINT),
        };
        let headers = match get("HEADERS") {
            Some((name, value)) => headers(&value, |w| warnings.push(format!("{name}: {w}"))),
            None => MetadataMap::new(),
        };
        let timeout = match get("TIMEOUT") {
            Some((name, value)) => match value.parse::<u64>() {
                // Capped: tonic cannot write a `grpc-timeout` of more than 99,999,999 hours.
                Ok(ms) if ms > 0 => Duration::from_millis(ms).min(crate::backoff::LONGEST),
                _ => {
                    warnings.push(format!(
                        "{name}={value}: not a positive number of milliseconds; using {}",
                        humantime::format_duration(DEFAULT_TIMEOUT)
                    ));
                    DEFAULT_TIMEOUT
                }
            },
            None => DEFAULT_TIMEOUT,
        };
        Ok(Settings {
            endpoint,
            headers,
            timeout,
            warnings,
        })
    }
}

/// A collector's address: `http://host:port`, or `host:port`, which the spec reads as TLS unless
/// `insecure`.
fn endpoint(value: &str, insecure: bool) -> Result<http::Uri, String> {
    let value = match (value.contains("://"), insecure) {
        (true, _) => value.to_owned(),
        (false, true) => format!("http://{value}"),
        (false, false) => {
            return Err(
                "without a scheme it means TLS (OTEL_EXPORTER_OTLP_INSECURE is not true), \
                 and meshlb's exporter has no TLS: write http://host:port, or set \
                 OTEL_EXPORTER_OTLP_INSECURE=true"
                    .to_owned(),
            )
        }
    };
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // It would be repeated in every error message; headers are the place for credentials.
        return Err(
            "credentials in the URL are not taken: put them in OTEL_EXPORTER_OTLP_HEADERS"
                .to_owned(),
        );
    }
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

/// `key=value,key2=value2`, values percent-decoded, as gRPC metadata. A pair that cannot be a
/// header is left out and `warn`ed of by its key alone (its value is often a credential).
fn headers(value: &str, mut warn: impl FnMut(String)) -> MetadataMap {
    let mut map = MetadataMap::new();
    for (n, pair) in value.split(',').map(str::trim).enumerate() {
        if pair.is_empty() {
            continue;
        }
        let Some((key, raw)) = pair.split_once('=') else {
            warn(format!("pair {} has no '=', left out", n + 1));
            continue;
        };
        // A key that is not a header name may hold the credential itself ("Authorization:
        // Basic …="): it is named by its place only.
        let Ok(name) = MetadataKey::from_bytes(key.trim().to_ascii_lowercase().as_bytes()) else {
            warn(format!(
                "pair {}: the key is not a header name, left out",
                n + 1
            ));
            continue;
        };
        let value = percent_encoding::percent_decode_str(raw.trim())
            .decode_utf8()
            .ok()
            .and_then(|v| MetadataValue::try_from(v.as_ref()).ok());
        match value {
            Some(value) => map.append(name, value),
            None => {
                warn(format!(
                    "the value of '{name}' cannot be a header, left out"
                ));
                continue;
            }
        };
    }
    map
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
    /// inside a tokio runtime; the exports run on it. On a current-thread runtime, a flush or
    /// shutdown called from the runtime's own thread waits for an export that cannot run until
    /// it returns: call those off the runtime (`spawn_blocking`), as the tools do.
    pub(crate) fn new(settings: Settings) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the exporter needs a tokio runtime".to_owned())?;
        let channel = tonic::transport::Endpoint::from(settings.endpoint.clone())
            .user_agent(concat!("meshlb/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| e.to_string())?
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
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let request = wire::request(batch, &self.resource, &self.resource_schema_url);
        // The task runs without the batch processor's "no telemetry from the exporter" context:
        // `telemetry::init`'s layer only records meshlb's own spans, and this path makes none.
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
    let mut last: Option<String> = None;
    loop {
        let mut call = tonic::Request::new(request.clone());
        *call.metadata_mut() = settings.headers.clone();
        call.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
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
                let partial = response.into_inner().partial_success.unwrap_or_default();
                let said = quoted(&partial.error_message);
                if partial.rejected_spans > 0 {
                    return Err(failed(format!(
                        "the collector rejected {} spans: {said}",
                        partial.rejected_spans
                    )));
                }
                if !said.is_empty() {
                    tracing::debug!(collector = %said, "the collector took the spans, with a warning");
                }
                return Ok(());
            }
            Ok(Err(status)) => status,
            Err(_) => {
                let after = last.map(|why| format!(", after {why}")).unwrap_or_default();
                return Err(failed(format!(
                    "no answer within {:?}{after}",
                    settings.timeout
                )));
            }
        };
        let why = crate::health::with_causes(
            format!("{}: {}", status.code(), quoted(status.message())),
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
        last = Some(why);
        tokio::time::sleep(wait).await;
    }
}

/// The codes OTLP/gRPC says a client may retry on. `RESOURCE_EXHAUSTED` is one only with a
/// `RetryInfo` detail, which is not read here (nor is the delay one asks for): it is final.
fn transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::wire::tests::batch;
    use super::*;

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
            ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", " "),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=a%20b%2Cc , X-Tenant=blue",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "GRPC"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "None"),
        ])
        .unwrap();
        assert_eq!(
            s.endpoint.to_string(),
            "http://collector.observability:4317/"
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.headers.get("api-key").unwrap(), "a b,c");
        assert_eq!(s.headers.get("x-tenant").unwrap(), "blue");
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.endpoint.to_string(), "http://localhost:4317/");
        assert_eq!(defaults.timeout, DEFAULT_TIMEOUT);
        assert!(defaults.headers.is_empty());
    }

    #[test]
    fn what_it_cannot_do_safely_is_refused_in_one_line_naming_the_variable() {
        for (var, value, says) in [
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://otel.example:4317",
                "no TLS",
            ),
            // Without a scheme the spec means TLS: refused, not sent in the clear.
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "otel.example:4317",
                "INSECURE=true",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://", "not a URL"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "ftp://x:1",
                "expected http://host:port",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/protobuf",
                "over gRPC only",
            ),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://u:s3cret@otel:4317",
                "credentials",
            ),
        ] {
            let error = settings(&[(var, value)]).expect_err(value);
            assert!(error.starts_with(var), "{error}");
            assert!(error.contains(says), "{error}");
            assert!(!error.contains('\n'), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn what_it_can_do_without_is_a_warning_that_never_shows_a_header_value() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization Bearer s3cret,x-ok=1,bad key=s3cret,nl=s3%0Acret,\
                 Authorization: Basic s3cretdXNlcjpwYXNz=",
            ),
        ])
        .unwrap();
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert_eq!(s.headers.len(), 1);
        assert_eq!(s.headers.get("x-ok").unwrap(), "1");
        let all = s.warnings.join("\n");
        for says in [
            "OTEL_EXPORTER_OTLP_TIMEOUT=ten: not a positive number of milliseconds",
            "OTEL_EXPORTER_OTLP_COMPRESSION=gzip: meshlb's exporter does not compress",
            "OTEL_EXPORTER_OTLP_HEADERS: pair 1 has no '='",
            "pair 3: the key is not a header name",
            "the value of 'nl' cannot be a header",
            "pair 5: the key is not a header name",
        ] {
            assert!(all.contains(says), "{says} not in:\n{all}");
        }
        assert_eq!(s.warnings.len(), 6, "{all}");
        assert!(!all.contains("s3"), "{all}");
        let settings_shown = format!("{s:?}");
        assert!(settings_shown.contains("x-ok"), "{settings_shown}");
        assert!(!settings_shown.contains("\"1\""), "{settings_shown}");
        // A timeout tonic could not write as `grpc-timeout` is capped, not a panic later.
        let huge = settings(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "999999999999999")]).unwrap();
        assert_eq!(huge.timeout, crate::backoff::LONGEST);
        assert_eq!(
            settings(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")])
                .unwrap()
                .warnings
                .len(),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_nobody_answers_fails_saying_where_it_went() {
        let (_reserved, nobody) = crate::connection::refusing_addr();
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
        let mut exporter = Exporter::new(settings(&vars).unwrap()).unwrap();
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name("meshlb-client")
                .build(),
        );
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
        // The time left, as the collector sees it: no more than the timeout.
        let left = crate::grpc::timeout(&metadata.clone().into_headers())
            .expect("a well-formed grpc-timeout")
            .expect("a grpc-timeout");
        assert!(
            left <= Duration::from_secs(4) && left > Duration::ZERO,
            "{left:?}"
        );
        let agent = metadata.get("user-agent").unwrap().to_str().unwrap();
        assert!(agent.starts_with("meshlb/"), "{agent}");
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, "service.name");
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

        // Three more tries, no more; and a collector's words on one line, without escapes.
        let (collector, endpoint) = collector::Collector::start(
            (0..5)
                .map(|_| Err(tonic::Status::unavailable("down\nfor \u{1b}[31mgood")))
                .collect(),
        )
        .await;
        let error = export_to(&endpoint, &[])
            .await
            .expect_err("still down")
            .to_string();
        assert_eq!(collector.got.lock().unwrap().len(), 1 + RETRIES as usize);
        assert!(error.contains("down for  [31mgood"), "{error}");
        assert!(!error.chars().any(char::is_control), "{error:?}");
    }
}
