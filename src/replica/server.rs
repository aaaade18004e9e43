//! The replica's connection plumbing: accepting, routing gRPC and REST by content-type, stamping
//! `x-replica-id`, and the drain sequence.

use super::service::{Admin, UserGuide};
use super::{rest, Faults, ReplicaConfig, ReplicaError};
use crate::proto::admin::v1::admin_service_server::AdminServiceServer;
use crate::proto::userguide::v1::user_guide_service_server::UserGuideServiceServer;
use crate::proto::{FILE_DESCRIPTOR_SET, USERGUIDE_SERVICE};
use axum::body::Body;
use http::{HeaderValue, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tower::{Service, ServiceExt};
use tracing::Instrument;

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves on `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(
    listener: TcpListener,
    config: ReplicaConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaError> {
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
    let routes = tonic::service::Routes::new(health_service)
        .add_service(
            UserGuideServiceServer::new(userguide.clone())
                .max_decoding_message_size(config.max_message_size),
        )
        .add_service(AdminServiceServer::new(Admin::new(faults, health.clone())))
        .add_service(reflection_v1())
        .add_service(reflection_v1alpha());
    let router = ByContentType {
        grpc: routes.prepare().into_axum_router(),
        rest: rest::router(userguide),
        id,
    };

    let addr = listener.local_addr()?;
    tracing::info!(%addr, id = %config.id, users = config.users.len(), "replica serving");

    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let drain_grace = config.drain_grace;
    let draining = health.clone();
    let stop_accepting = async move {
        shutdown.await;
        tracing::info!(grace = ?drain_grace, "draining: health is NOT_SERVING");
        draining
            .set_service_status("", ServingStatus::NotServing)
            .await;
        draining
            .set_service_status(USERGUIDE_SERVICE, ServingStatus::NotServing)
            .await;
        tokio::time::sleep(drain_grace).await;
    };
    tokio::pin!(stop_accepting);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Running out of file descriptors must not end the replica.
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let result = match tls {
                        None => {
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let peer = stream.peer_addr().ok();
                            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                            let stream = match handshake.await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::warn!(peer = ?peer, %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::warn!(peer = ?peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection closed with an error");
                    }
                });
            }
            () = &mut stop_accepting => break,
        }
    }
    drop(listener);
    // Watch streams never end on their own; clearing the statuses ends them, so the drain waits
    // only for real calls.
    health.clear_service_status("").await;
    health.clear_service_status(USERGUIDE_SERVICE).await;
    match tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained: every in-flight call finished"),
        Err(_) => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out; closing the remaining calls")
        }
    }
    let _ = health_stop.send(());
    if let Some(server) = health_server {
        let _ = server.await;
    }
    Ok(())
}

fn reflection_v1() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor set is generated by build.rs and always valid")
}

fn reflection_v1alpha() -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the descriptor set is generated by build.rs and always valid")
}

// === impl ByContentType ===

/// Sends `application/grpc*` requests to the gRPC routes and everything else to REST, as
/// grpc-gateway does, and stamps every response with the replica's id.
#[derive(Clone)]
struct ByContentType {
    grpc: axum::Router,
    rest: axum::Router,
    id: HeaderValue,
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
        let is_grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let router = if is_grpc {
            self.grpc.clone()
        } else {
            self.rest.clone()
        };
        let id = self.id.clone();
        let span = if is_grpc {
            server_span(&req, &id)
        } else {
            tracing::Span::none()
        };
        // The caller's deadline bounds the handler, as tonic's own server does: past it, the
        // caller has given up and the work is wasted.
        let deadline = if is_grpc {
            crate::grpc::timeout(req.headers())
        } else {
            None
        };
        Box::pin(async move {
            let call = router.oneshot(req.map(Body::new)).instrument(span.clone());
            let mut response = match deadline {
                None => call.await?,
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(response) => response?,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "the caller's deadline ({limit:?}, grpc-timeout) passed in the replica"
                    ))
                    .into_http::<Body>(),
                },
            };
            if is_grpc {
                too_large_is_resource_exhausted(&mut response);
                let code = tonic::Status::from_header_map(response.headers())
                    .map_or(tonic::Code::Ok, |s| s.code());
                span.record("rpc.grpc.status_code", code as i32);
                if matches!(
                    code,
                    tonic::Code::Unknown
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unimplemented
                        | tonic::Code::Internal
                        | tonic::Code::Unavailable
                        | tonic::Code::DataLoss
                ) {
                    span.record("otel.status_code", "ERROR");
                }
            }
            response.headers_mut().insert("x-replica-id", id);
            Ok(response)
        })
    }
}

/// The server span of one gRPC call, continuing the caller's trace. Health checks get none: every
/// client watches every replica, and those spans would bury the calls.
fn server_span<B>(req: &Request<B>, id: &HeaderValue) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/grpc.health.v1.Health/") {
        return tracing::Span::none();
    }
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
    crate::telemetry::extract(&span, req.headers());
    span
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
