//! `meshlb replica`: one server of the mesh, configured by flags or `MESHLB_*` variables.

use super::UsageError;
use crate::replica::{self, Allow, ConnLimits, FaultConfig, ReplicaConfig, Users};
use anyhow::Context;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed as the first stdout line).
    #[arg(long, env = "MESHLB_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Replica id sent as `x-replica-id` (default: the hostname, then the bound address).
    #[arg(long, env = "MESHLB_ID")]
    id: Option<String>,
    /// The user database (default: the built-in data, as in replicas/users.json).
    #[arg(long, env = "MESHLB_DATA")]
    data: Option<PathBuf>,
    /// Latency added to every call, e.g. `20ms`.
    #[arg(long, env = "MESHLB_LATENCY", value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Up to this much more latency, at random.
    #[arg(long, env = "MESHLB_JITTER", value_parser = humantime::parse_duration, default_value = "0s")]
    jitter: Duration,
    /// Share of calls answered with UNAVAILABLE, between 0 and 1.
    #[arg(long, env = "MESHLB_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// How long to keep serving after going NOT_SERVING, so clients can move away.
    #[arg(long, env = "MESHLB_DRAIN_GRACE", value_parser = humantime::parse_duration, default_value = "1s")]
    drain_grace: Duration,
    /// How long to wait for in-flight calls once the replica stops accepting.
    #[arg(long, env = "MESHLB_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// Answer GetPoint by asking this target (a back tier) through the balancer, so a trace spans
    /// client -> this replica -> the back replica.
    #[arg(long, env = "MESHLB_UPSTREAM")]
    upstream: Option<String>,
    /// Reach --upstream over TLS, trusting this CA (PEM).
    #[arg(long, env = "MESHLB_UPSTREAM_TLS_CA", requires = "upstream")]
    upstream_tls_ca: Option<PathBuf>,
    /// Client certificate towards --upstream, for mTLS (PEM); needs --upstream-tls-key.
    #[arg(long, env = "MESHLB_UPSTREAM_TLS_CERT", requires_all = ["upstream_tls_key", "upstream_tls_ca"])]
    upstream_tls_cert: Option<PathBuf>,
    /// The private key of --upstream-tls-cert (PEM).
    #[arg(long, env = "MESHLB_UPSTREAM_TLS_KEY", requires = "upstream_tls_cert")]
    upstream_tls_key: Option<PathBuf>,
    /// The name to verify in the upstream replicas' certificates.
    #[arg(
        long,
        env = "MESHLB_UPSTREAM_TLS_SERVER_NAME",
        requires = "upstream_tls_ca"
    )]
    upstream_tls_server_name: Option<String>,
    /// The gRPC service config the upstream client follows (a JSON file; `builtin`: the
    /// UserGuide service's, as in replicas/service-config.json; `none`: no retries).
    #[arg(long, env = "MESHLB_UPSTREAM_SERVICE_CONFIG", default_value = "builtin", value_parser = super::client::parse_service_config)]
    upstream_service_config: super::client::ServiceConfigSource,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "MESHLB_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MESHLB_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS).
    #[arg(long, env = "MESHLB_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Also answer grpc.health.v1 in plaintext on this address (Kubernetes' gRPC probe cannot speak TLS).
    #[arg(long, env = "MESHLB_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Serve no gRPC server reflection (as servers without it do: clients then need the
    /// service's .proto).
    #[arg(long, env = "MESHLB_NO_REFLECTION")]
    no_reflection: bool,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "MESHLB_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    max_message_size: usize,
    /// Where the admin service (fault knobs, reported health) listens, `none` for no admin
    /// service; never on the serving port. Port 0 picks a free one (printed as the second line).
    #[arg(long, env = "MESHLB_ADMIN_LISTEN", default_value = "127.0.0.1:0", value_parser = parse_admin_listen)]
    admin_listen: AdminListen,
    /// Where `GET /metrics` (Prometheus' text format) is served, `none` for nowhere; plaintext
    /// and without authentication, so scrapers can read it: keep it off public networks. Printed
    /// as the third line.
    #[arg(long, env = "MESHLB_METRICS_LISTEN", default_value = "none", value_parser = parse_admin_listen)]
    metrics_listen: AdminListen,
    /// Under mTLS (--tls-client-ca), the client certificate names (DNS or IP subject alternative
    /// names) allowed to call the admin service, comma-separated; other certificates are refused.
    #[arg(
        long,
        env = "MESHLB_ADMIN_ALLOW",
        value_delimiter = ',',
        requires = "tls_client_ca"
    )]
    admin_allow: Vec<String>,
    /// Open connections beyond this are closed at once (0: no cap).
    #[arg(long, env = "MESHLB_MAX_CONNECTIONS", default_value_t = ConnLimits::default().max_connections)]
    max_connections: usize,
    /// A connection must send its first request (after TLS) within this, and an HTTP/1 request
    /// its headers.
    #[arg(long, env = "MESHLB_HEADER_READ_TIMEOUT", value_parser = super::positive_duration, default_value = "10s")]
    header_read_timeout: Duration,
    /// A connection with no open call for this long is closed.
    #[arg(long, env = "MESHLB_IDLE_TIMEOUT", value_parser = super::positive_duration, default_value = "5m")]
    idle_timeout: Duration,
    /// HTTP/2 keepalive: ping a connection silent this long; drop it when the ping goes unanswered
    /// for --keepalive-timeout.
    #[arg(long, env = "MESHLB_KEEPALIVE_INTERVAL", value_parser = super::positive_duration, default_value = "30s")]
    keepalive_interval: Duration,
    /// See --keepalive-interval.
    #[arg(long, env = "MESHLB_KEEPALIVE_TIMEOUT", value_parser = super::positive_duration, default_value = "10s")]
    keepalive_timeout: Duration,
    /// The longest a call may run when its caller sets no shorter deadline (health watches
    /// excepted); past it the call ends with DEADLINE_EXCEEDED. `0s`: unbounded.
    #[arg(long, env = "MESHLB_MAX_CALL_DURATION", value_parser = humantime::parse_duration, default_value = "5m")]
    max_call_duration: Duration,
    /// gRPC calls beyond this many at once are shed at once with RESOURCE_EXHAUSTED and a
    /// grpc-retry-pushback-ms trailer (health calls never are); 0: no limit.
    #[arg(long, env = "MESHLB_MAX_CONCURRENT_CALLS", default_value_t = replica::DEFAULT_MAX_CONCURRENT_CALLS)]
    max_concurrent_calls: usize,
}

/// `--admin-listen`: an address, or no admin service.
#[derive(Debug, Clone, Copy)]
enum AdminListen {
    Off,
    On(SocketAddr),
}

fn parse_admin_listen(value: &str) -> Result<AdminListen, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(AdminListen::Off);
    }
    value
        .parse()
        .map(AdminListen::On)
        .map_err(|_| format!("{value:?} is neither an address (IP:PORT) nor `none`"))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let users = match &args.data {
        Some(path) => Users::load(path).map_err(|e| UsageError(e.to_string()))?,
        None => Users::builtin(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            };
            Some(tls.config().map_err(|e| UsageError(e.to_string()))?)
        }
        _ => None,
    };
    let faults = FaultConfig {
        latency: args.latency,
        jitter: args.jitter,
        fail_rate: args.fail_rate,
    };
    faults.validate().map_err(UsageError)?;
    let id = match args.id.filter(|id| !id.is_empty()) {
        Some(id) => id,
        None => gethostname::gethostname()
            .into_string()
            .ok()
            .filter(|id| !id.is_empty())
            .unwrap_or_default(),
    };
    // Checked before anything is printed: scripts read "listening on" as "started".
    if !id.is_empty() && http::HeaderValue::from_str(&id).is_err() {
        return Err(UsageError(format!(
            "--id {id:?} cannot be sent as a header value (no control characters)"
        ))
        .into());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    let admin = match args.admin_listen {
        AdminListen::Off => None,
        AdminListen::On(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--admin-listen)"))?,
        ),
    };
    let metrics = match args.metrics_listen {
        AdminListen::Off => None,
        AdminListen::On(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?,
        ),
    };
    let mtls = args.tls_client_ca.is_some();
    if let Some(admin) = &admin {
        let addr = admin.local_addr()?;
        if !addr.ip().is_loopback() && !mtls {
            tracing::warn!(%addr, "the admin service is reachable beyond this host without client certificates; anyone who reaches it can reconfigure this replica");
        }
        if mtls && args.admin_allow.is_empty() {
            tracing::warn!("mTLS without --admin-allow: every admin call will be refused");
        }
    }
    let shutdown = super::shutdown_signal();
    // Tests and scripts read these lines to learn the ports, so they go first, in one write: a
    // reader that stops after the lines it wants must not make a later line fail. A replica
    // whose stdout is gone keeps serving.
    let mut lines = format!("listening on {bound}\n");
    match &admin {
        Some(admin) => lines.push_str(&format!("admin on {}\n", admin.local_addr()?)),
        None => lines.push_str("admin off\n"),
    }
    match &metrics {
        Some(metrics) => lines.push_str(&format!("metrics on {}\n", metrics.local_addr()?)),
        None => lines.push_str("metrics off\n"),
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(lines.as_bytes());
    let _ = stdout.flush();
    drop(stdout);

    let id = if id.is_empty() { bound.to_string() } else { id };
    let mut config = ReplicaConfig::new(id, users);
    config.faults = faults;
    config.drain_grace = args.drain_grace;
    config.drain_timeout = args.drain_timeout;
    config.max_message_size = args.max_message_size;
    config.reflection = !args.no_reflection;
    config.tls = tls;
    config.health_listen = args.health_listen;
    config.admin_allow = if mtls {
        Allow::Certified(args.admin_allow.clone())
    } else {
        Allow::Reachable
    };
    config.limits = ConnLimits {
        max_connections: args.max_connections,
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
        keepalive_interval: args.keepalive_interval,
        keepalive_timeout: args.keepalive_timeout,
    };
    config.max_call_duration = Some(args.max_call_duration).filter(|d| !d.is_zero());
    config.max_concurrent_calls = args.max_concurrent_calls;
    if let Some(target) = &args.upstream {
        let tls = args
            .upstream_tls_ca
            .clone()
            .map(|ca| crate::tls::ClientTls {
                ca,
                identity: args
                    .upstream_tls_cert
                    .clone()
                    .zip(args.upstream_tls_key.clone()),
                server_name: args.upstream_tls_server_name.clone(),
            });
        config.upstream = Some(upstream(target, tls, &args.upstream_service_config)?);
    }
    let listeners = replica::Listeners {
        serving: listener,
        admin,
        metrics,
    };
    replica::run(listeners, config, shutdown)
        .await
        .map_err(|e| match e {
            replica::ReplicaError::BadId(_) | replica::ReplicaError::BadFaults(_) => {
                anyhow::Error::new(UsageError(e.to_string()))
            }
            other => other.into(),
        })?;
    Ok(ExitCode::SUCCESS)
}

/// GetPoint through a balanced client to `target`.
fn upstream(
    target: &str,
    tls: Option<crate::tls::ClientTls>,
    service_config: &super::client::ServiceConfigSource,
) -> anyhow::Result<replica::Upstream> {
    use crate::proto::userguide::v1::{
        user_guide_service_client::UserGuideServiceClient, GetPointRequest, Profile,
    };
    let mut builder =
        crate::Balancer::builder(target).health_service(crate::proto::USERGUIDE_SERVICE);
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    if let Some(json) = &service_config.0 {
        builder = builder
            .service_config(json)
            .map_err(|e| UsageError(format!("--upstream-service-config: {e}")))?;
    }
    let lb = builder
        .build_lazy()
        .map_err(|e| UsageError(format!("--upstream: {e}")))?;
    let client = UserGuideServiceClient::new(lb);
    Ok(std::sync::Arc::new(move |name: String, age: i32| {
        let mut client = client.clone();
        Box::pin(async move {
            let request = GetPointRequest {
                profile: Some(Profile { age, name }),
            };
            let response = client.get_point(request).await?;
            Ok(response.into_inner().point.map_or(0, |p| p.value))
        })
    }))
}
