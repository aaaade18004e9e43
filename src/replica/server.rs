//! The replica's assembly: the serving port (gRPC and REST routed by content-type, each gRPC call
//! within its limits, every response stamped with `x-replica-id`), the admin listener, the
//! plaintext health port, and the drain sequence.

use super::admin::{self, Admin};
use super::metrics::{CountedRequest, GrpcCall, ReplicaMetrics, ServingState};
use super::service::UserGuide;
use super::{call_limits, conn, rest, shed, Faults, ReplicaConfig, ReplicaError};
use crate::proto::admin::v1::admin_service_server::AdminServiceServer;
use crate::proto::userguide::v1::user_guide_service_server::UserGuideServiceServer;
use crate::proto::{FILE_DESCRIPTOR_SET, USERGUIDE_SERVICE};
use axum::body::Body;
use http::{HeaderValue, Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tower::{Service, ServiceExt};
use tracing::Instrument;

/// The largest health request: a service name.
const HEALTH_MESSAGE_LIMIT: usize = 1024;

/// How long open admin calls may take to finish when the replica exits.
const ADMIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The sockets a replica serves on: the serving port, and the admin listener if it has one.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC and REST callers.
    pub serving: TcpListener,
    /// `meshlb.admin.v1.AdminService`; `None`: no admin service at all.
    pub admin: Option<TcpListener>,
    /// `GET /metrics` in Prometheus' text format, plaintext and without authentication so that
    /// a scraper can always read it; `None`: not served.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(serving: TcpListener) -> Self {
        Self {
            serving,
            admin: None,
            metrics: None,
        }
    }
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn run(
    listeners: impl Into<Listeners>,
    config: ReplicaConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaError> {
    let Listeners {
        serving,
        admin,
        metrics: metrics_listener,
    } = listeners.into();
    let id =
        HeaderValue::from_str(&config.id).map_err(|_| ReplicaError::BadId(config.id.clone()))?;
    config.faults.validate().map_err(ReplicaError::BadFaults)?;
    let faults = Faults::new(config.faults);
    let mut userguide = UserGuide::new(config.users.clone(), faults.clone());
    if let Some(upstream) = config.upstream.clone() {
        userguide = userguide.with_upstream(upstream);
    }

    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(USERGUIDE_SERVICE, ServingStatus::Serving)
        .await;

    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    // Kubernetes' gRPC probe cannot speak TLS: a replica serving TLS can also answer health in
    // plaintext on a port of its own.
    let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_server = match config.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "plaintext health on its own port");
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health_service.clone())
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = health_stopped.await;
                        },
                    ),
            ))
        }
        None => None,
    };

    let state = std::sync::Arc::new(ServingState::default());
    state
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let metrics = ReplicaMetrics::new(faults.clone(), state.clone());
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    // Through the same connection limits and timeouts as every other listener: the port is open
    // to scrapers without authentication, so a peer that never finishes a request must not hold
    // a connection (or the drain) for long.
    let metrics_server = match metrics_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "metrics on their own listener");
            let registry = metrics.clone();
            let app = crate::metrics::router(move || crate::metrics::encode(registry.registry()));
            Some(tokio::spawn(conn::serve(
                listener,
                None,
                config.limits,
                move |_| app.clone(),
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_server = admin.map(|listener| {
        let mut routes = tonic::service::Routes::new(AdminServiceServer::new(Admin::new(
            faults.clone(),
            health.clone(),
            state.clone(),
        )));
        if config.reflection {
            routes = routes
                .add_service(reflection_v1(ADMIN_SERVICES))
                .add_service(reflection_v1alpha(ADMIN_SERVICES));
        }
        let routes = routes.prepare().into_axum_router();
        let allow = config.admin_allow.clone();
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, ?allow, "admin service on its own listener");
        }
        let make = move |peer: conn::Peer| admin::Gate::new(routes.clone(), &allow, &peer);
        tokio::spawn(conn::serve(
            listener,
            tls.clone(),
            config.limits,
            make,
            async {
                let _ = admin_stopped.await;
            },
        ))
    });

    // Every service on the port has a decoding limit: health calls are never shed, so theirs is
    // what keeps unfinished health requests from holding memory.
    let mut routes = tonic::service::Routes::new(
        health_service
            .clone()
            .max_decoding_message_size(HEALTH_MESSAGE_LIMIT),
    )
    .add_service(
        UserGuideServiceServer::new(userguide.clone())
            .max_decoding_message_size(config.max_message_size),
    );
    if config.reflection {
        routes = routes
            .add_service(
                reflection_v1(SERVING_SERVICES).max_decoding_message_size(config.max_message_size),
            )
            .add_service(
                reflection_v1alpha(SERVING_SERVICES)
                    .max_decoding_message_size(config.max_message_size),
            );
    }
    let router = ByContentType {
        grpc: routes.prepare().into_axum_router(),
        rest: rest::router(userguide),
        id,
        max_call_duration: config.max_call_duration,
        shed: shed::Shed::new(config.max_concurrent_calls),
        metrics: metrics.clone(),
    };

    let addr = serving.local_addr()?;
    tracing::info!(%addr, id = %config.id, users = config.users.len(), "replica serving");

    let drain_grace = config.drain_grace;
    let draining = health.clone();
    let stop_accepting = async move {
        shutdown.await;
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        state
            .serving
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(grace = ?drain_grace, "draining: health is NOT_SERVING");
        draining
            .set_service_status("", ServingStatus::NotServing)
            .await;
        draining
            .set_service_status(USERGUIDE_SERVICE, ServingStatus::NotServing)
            .await;
        tokio::time::sleep(drain_grace).await;
    };
    let drain = conn::serve(
        serving,
        tls,
        config.limits,
        move |_| router.clone(),
        stop_accepting,
    )
    .await;
    // Watch streams never end on their own; clearing the statuses ends them, so the drain waits
    // only for real calls.
    health.clear_service_status("").await;
    health.clear_service_status(USERGUIDE_SERVICE).await;
    match tokio::time::timeout(config.drain_timeout, drain.finish()).await {
        Ok(()) => tracing::info!("drained: every in-flight call finished"),
        Err(_) => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out; closing the remaining calls")
        }
    }
    let _ = health_stop.send(());
    let _ = metrics_stop.send(());
    if let Some(server) = metrics_server {
        // A scrape is short; one still open when the replica exits is cut.
        if let Ok(drain) = server.await {
            let _ = tokio::time::timeout(ADMIN_DRAIN, drain.finish()).await;
        }
    }
    if let Some(server) = health_server {
        let _ = server.await;
    }
    let _ = admin_stop.send(());
    if let Some(server) = admin_server {
        // Admin calls are short; whatever is still open when the replica exits is cut.
        if let Ok(drain) = server.await {
            let _ = tokio::time::timeout(ADMIN_DRAIN, drain.finish()).await;
        }
    }
    Ok(())
}

/// The services the serving port's reflection advertises (the descriptor set also holds the admin
/// service, which is not served there).
const SERVING_SERVICES: &[&str] = &[USERGUIDE_SERVICE, "grpc.health.v1.Health"];
/// The services the admin listener's reflection advertises.
const ADMIN_SERVICES: &[&str] = &["meshlb.admin.v1.AdminService"];

fn reflection(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for service in services {
        builder = builder.with_service_name(*service);
    }
    builder
}

fn reflection_v1(
    services: &[&str],
) -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    reflection(services)
        .build_v1()
        .expect("the descriptor set is generated by build.rs and always valid")
}

fn reflection_v1alpha(
    services: &[&str],
) -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    reflection(services)
        .build_v1alpha()
        .expect("the descriptor set is generated by build.rs and always valid")
}

// === impl ByContentType ===

/// How a request's content-type routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `application/grpc`, `application/grpc+proto`, `application/grpc;...`.
    Grpc,
    /// Looks like gRPC but is not (gRPC-Web, `application/grpcfoo`): 415, as grpc-go answers.
    Unsupported,
    /// Everything else.
    Rest,
}

fn kind_of(headers: &http::HeaderMap) -> Kind {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return Kind::Rest;
    };
    let value = value.as_bytes();
    let Some(rest) = value.strip_prefix(b"application/grpc") else {
        return Kind::Rest;
    };
    match rest.first() {
        None | Some(b'+') | Some(b';') => Kind::Grpc,
        Some(_) => Kind::Unsupported,
    }
}

/// Sends gRPC requests to the gRPC routes and everything else to REST, as grpc-gateway does,
/// applies each call's limits, and stamps every response with the replica's id.
#[derive(Clone)]
struct ByContentType {
    grpc: axum::Router,
    rest: axum::Router,
    id: HeaderValue,
    max_call_duration: Option<std::time::Duration>,
    shed: shed::Shed,
    metrics: ReplicaMetrics,
}

impl<B> Service<Request<B>> for ByContentType
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let id = self.id.clone();
        // An absolute-form target (`GET http://evil/...`) asks a proxy to forward; this is not one.
        if req.version() < http::Version::HTTP_2 && req.uri().authority().is_some() {
            let response = rest::error_response(
                http::StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "absolute-form request targets are not served: this server is not a proxy",
            );
            self.metrics.rest_refused(req.uri().path(), &response);
            return Box::pin(async move { Ok(stamped(response, id)) });
        }
        match kind_of(req.headers()) {
            Kind::Rest => {
                let rest = self.rest.clone();
                let metered = self.metrics.rest_call(req.uri().path());
                let counter = metered.request_counter();
                Box::pin(async move {
                    let response = rest
                        .oneshot(req.map(|b| Body::new(CountedRequest::new(b, counter))))
                        .await?;
                    metered.answered(&response);
                    Ok(stamped(response, id))
                })
            }
            Kind::Unsupported => {
                let content_type = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                let response = rest::error_response(
                    http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "INVALID_ARGUMENT",
                    &format!(
                        "unsupported content-type {:?}: gRPC needs application/grpc (gRPC-Web is not served)",
                        crate::grpc::bounded(&content_type, super::ECHO_LIMIT)
                    ),
                );
                self.metrics.rest_refused(req.uri().path(), &response);
                Box::pin(async move { Ok(stamped(response, id)) })
            }
            Kind::Grpc => self.call_grpc(req, id),
        }
    }
}

impl ByContentType {
    fn call_grpc<B>(
        &self,
        req: Request<B>,
        id: HeaderValue,
    ) -> futures::future::BoxFuture<'static, Result<Response<Body>, Infallible>>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let (span, unsampled) = server_span(&req, &id);
        let path = req.uri().path();
        let metered = self.metrics.grpc_call(path);
        let bounds = match call_limits::bounds_of(path, req.headers(), self.max_call_duration) {
            Ok(bounds) => bounds,
            Err(status) => {
                let response = status.into_http::<Body>();
                return Box::pin(async move { Ok(finish_grpc(response, &span, id, metered)) });
            }
        };
        let permit = match self.shed.admit(path) {
            Ok(permit) => permit,
            Err(overloaded) => {
                let response = overloaded.into_response();
                return Box::pin(async move { Ok(finish_grpc(response, &span, id, metered)) });
            }
        };
        let counter = metered.request_counter();
        let req = if call_limits::single_message(path) {
            req.map(|b| {
                Body::new(call_limits::OneMessage::new(CountedRequest::new(
                    b, counter,
                )))
            })
        } else {
            req.map(|b| Body::new(CountedRequest::new(b, counter)))
        };
        let router = self.grpc.clone();
        let start = tokio::time::Instant::now();
        Box::pin(async move {
            let call = router.oneshot(req).instrument(span.clone());
            let call = match unsampled {
                None => futures::future::Either::Left(call),
                Some(caller) => {
                    use opentelemetry::context::FutureExt as _;
                    futures::future::Either::Right(call.with_context(caller))
                }
            };
            // The call's limit bounds the handler, as tonic's own server does: past it, the caller
            // has given up (or the replica has) and the work is wasted.
            let response = match bounds.headers {
                None => call.await?,
                Some(limit) => match tokio::time::timeout(limit.duration(), call).await {
                    Ok(response) => response?,
                    Err(_) => limit.exceeded().into_http::<Body>(),
                },
            };
            let response = match bounds.body {
                None => response,
                Some(limit) => {
                    response.map(|b| Body::new(call_limits::Bounded::new(b, start, limit)))
                }
            };
            let response = match permit {
                None => response,
                Some(permit) => response.map(|b| Body::new(conn::Holding::new(b, permit))),
            };
            Ok(finish_grpc(response, &span, id, metered))
        })
    }
}

fn stamped(mut response: Response<Body>, id: HeaderValue) -> Response<Body> {
    response.headers_mut().insert("x-replica-id", id);
    response
}

/// Stamps the answer, and hands the call's metrics and span to its body, which ends them when
/// the answer ends (a stream's span covers the stream, and takes the status of its trailers).
fn finish_grpc(
    mut response: Response<Body>,
    span: &tracing::Span,
    id: HeaderValue,
    call: GrpcCall,
) -> Response<Body> {
    too_large_is_resource_exhausted(&mut response);
    let headers_code = crate::answer::code_in(response.headers());
    let span = (!span.is_disabled()).then(|| ServerSpan(span.clone()));
    let response =
        response.map(|b| Body::new(crate::answer::Ending::new(b, (call, span), headers_code)));
    stamped(response, id)
}

/// A server span's status, recorded when its call ends.
struct ServerSpan(tracing::Span);

impl crate::answer::Outcome for ServerSpan {
    fn finish(&mut self, code: tonic::Code) {
        self.0.record("rpc.grpc.status_code", code as i32);
        // OpenTelemetry's RPC conventions: for a server, only these codes are its errors; the
        // rest are the caller's (a bad argument, a missing entity, a call it cancelled).
        if matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ) {
            self.0.record("otel.status_code", "ERROR");
        }
    }
}

/// The server span of one gRPC call, continuing the caller's trace; and, for a call that is not
/// sampled, no span but the caller's context, to serve the call under (a call it makes upstream
/// goes on in the same trace, unsampled). Health checks get neither: every client watches every
/// replica, and those spans would bury the calls.
fn server_span<B>(
    req: &Request<B>,
    id: &HeaderValue,
) -> (tracing::Span, Option<opentelemetry::Context>) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let path = req.uri().path();
    if path.starts_with("/grpc.health.v1.Health/") {
        return (tracing::Span::none(), None);
    }
    let decided = match crate::telemetry::decide_served(req.headers()) {
        crate::telemetry::CallTrace::Forward(caller) => {
            let cx = opentelemetry::Context::new().with_remote_span_context(caller);
            return (tracing::Span::none(), Some(cx));
        }
        crate::telemetry::CallTrace::Spans(decided) => decided,
    };
    let (service, method) = crate::telemetry::rpc_names(path);
    let span = tracing::info_span!(
        target: crate::telemetry::RPC_SPANS,
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        meshlb.replica_id = %id.to_str().unwrap_or("?"),
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    match decided {
        // Sampled: the caller's context is read already. A new trace's OTel span is built now,
        // in the poll that decided, so that it takes the id the decision was made on (built
        // early, it costs about 2k instructions more: its fields are then recorded one by one).
        Some(parent) if !span.is_disabled() => {
            if parent.has_active_span() {
                let _ = span.set_parent(parent);
            } else {
                let _ = span.context();
            }
        }
        Some(_) => crate::telemetry::forget_decided_trace_id(),
        // Not decided here (a subscriber of the program's own): the span reads the caller.
        None => crate::telemetry::extract(&span, req.headers()),
    }
    (span, None)
}

/// tonic answers an oversized message with OUT_OF_RANGE; the gRPC spec says RESOURCE_EXHAUSTED,
/// which is what grpc-go and grpc-core send and what clients' retry policies expect.
fn too_large_is_resource_exhausted(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s == "11");
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        m.to_str()
            .is_ok_and(|m| m.contains("too%20large") || m.contains("too large"))
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::kept::Kept;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// The name, status code and status of each span `kept` was given.
    fn codes(kept: &Kept) -> Vec<String> {
        let spans = kept.0.lock().unwrap();
        spans
            .iter()
            .map(|s| {
                let code = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
                    .map(|kv| kv.value.to_string());
                format!("{} {code:?} {:?}", s.name, s.status)
            })
            .collect()
    }

    type Frames = tokio::sync::mpsc::UnboundedSender<Result<http_body::Frame<Bytes>, Infallible>>;

    /// A streamed answer of a call to ListUsers, its frames sent through the channel returned,
    /// finished as the replica finishes one, inside a span exported to `kept`.
    fn streamed_answer(kept: &Kept) -> (Response<Body>, Frames, SdkTracerProvider) {
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(crate::telemetry::bridge(provider.tracer("meshlb")));
        let (frames, rx) = tokio::sync::mpsc::unbounded_channel();
        let body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ));
        let metrics = ReplicaMetrics::new(Faults::default(), Arc::default());
        let path = "/userguide.v1.UserGuideService/ListUsers";
        let response = tracing::subscriber::with_default(subscriber, || {
            let request = Request::post(path).body(()).unwrap();
            let id = HeaderValue::from_static("r-1");
            let (span, _) = server_span(&request, &id);
            finish_grpc(Response::new(body), &span, id, metrics.grpc_call(path))
        });
        (response, frames, provider)
    }

    fn trailers(code: &str) -> http_body::Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        http_body::Frame::trailers(map)
    }

    /// A stream's answer after its first message, its span still open.
    async fn half_way(kept: &Kept) -> (Body, Frames, SdkTracerProvider) {
        let (response, frames, provider) = streamed_answer(kept);
        let mut body = response.into_body();
        frames
            .send(Ok(http_body::Frame::data(Bytes::from_static(b"user"))))
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(codes(kept).is_empty(), "still streaming: {:?}", codes(kept));
        (body, frames, provider)
    }

    #[tokio::test]
    async fn a_streams_span_ends_with_its_trailers_and_takes_their_status() {
        let kept = Kept::default();
        let (mut body, frames, _provider) = half_way(&kept).await;
        frames.send(Ok(trailers("15"))).unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(
            codes(&kept),
            [r#"userguide.v1.UserGuideService/ListUsers Some("15") Error { description: "" }"#],
            "ended with its trailers, an error of the server's"
        );
    }

    #[tokio::test]
    async fn a_stream_the_caller_lets_go_is_cancelled_and_not_the_servers_error() {
        let kept = Kept::default();
        let (body, _frames, _provider) = half_way(&kept).await;
        drop(body);
        assert_eq!(
            codes(&kept),
            [r#"userguide.v1.UserGuideService/ListUsers Some("1") Unset"#]
        );
    }
}
