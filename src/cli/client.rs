//! `meshlb client`: load through the balancer, a progress bar or a live view, then the
//! per-replica table (or JSON).

use super::method::{CallChoice, MethodArgs};
use super::UsageError;
use crate::dynamic::invoke::Kind;
use crate::load::{self, CallKind, LoadSpec, Recorder, Stop, Window, Workload};
use crate::report::{self, Report};
use crate::{Balancer, Policy};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

/// How long `--watch` runs without `--duration`: in effect, until Ctrl-C.
const UNTIL_INTERRUPTED: Duration = Duration::from_secs(365 * 24 * 3600);

/// The fastest open loop: one call per microsecond, the resolution of its ticker.
const MAX_RATE: f64 = 1_000_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// TLS towards the replicas.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Connect with TLS, trusting this CA (PEM).
    #[arg(long, env = "MESHLB_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate for mTLS (PEM); needs --tls-key.
    #[arg(long, env = "MESHLB_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MESHLB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name to verify in the replicas' certificates (endpoints are IP addresses).
    #[arg(long, env = "MESHLB_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    pub(super) fn client_tls(&self) -> Option<crate::tls::ClientTls> {
        let ca = self.tls_ca.clone()?;
        Some(crate::tls::ClientTls {
            ca,
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            server_name: self.tls_server_name.clone(),
        })
    }
}

/// `--service-config`: the gRPC service config the balancer follows.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceConfigArgs {
    /// The gRPC service config (a JSON file, as grpc-go, grpc-java and grpcio read it) that calls
    /// follow: per-method timeouts, retries, hedging, throttling, the balancing policy. Default:
    /// the UserGuide service's, built in (as in replicas/service-config.json); `none`: no
    /// retries or hedging at all.
    #[arg(long, env = "MESHLB_SERVICE_CONFIG", default_value = "builtin", value_parser = parse_service_config)]
    pub service_config: ServiceConfigSource,
    /// Also follow the service config DNS publishes for a dns:// target, in gRPC's TXT record
    /// `_grpc_config.HOST`; while it has none for this client, --service-config's is in force.
    #[arg(long, env = "MESHLB_DNS_SERVICE_CONFIG")]
    pub dns_service_config: bool,
    /// Connect to at most N of the discovered endpoints (with --coordinate, at least its
    /// slice), a subset of this client's own (gRPC's random_subsetting_experimental); wins over
    /// the service config's subsetSize and --aperture. Default: every endpoint.
    #[arg(long, env = "MESHLB_SUBSET", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub subset: Option<u32>,
    /// An aperture: of a fleet larger than N endpoints, connect to the smallest part this
    /// client's load needs (about one call in flight per endpoint), at least N in rotation
    /// while N are alive; for many clients over a large fleet (a few clients leave some
    /// replicas idle, unless they know their places: --coordinate). p2c and round-robin only.
    /// Default: off, every endpoint.
    #[arg(long, env = "MESHLB_APERTURE", value_name = "N|off", value_parser = parse_aperture)]
    pub aperture: Option<crate::balance::ApertureConfig>,
    /// This client's place among the clients of the same service, client I of COUNT (I from
    /// 0; from a StatefulSet's ordinal, say): its --subset or --aperture is then its slice of a
    /// ring they all share, so that between them every replica has a client (and, with subsets
    /// of one size, none has more than one client more than another). It takes at least its
    /// slice, ceil(endpoints / COUNT): alone (0/1) it uses every endpoint. Not with pick-first.
    #[arg(long, env = "MESHLB_COORDINATE", value_name = "I/COUNT")]
    pub coordinate: Option<crate::balance::Coordinate>,
    /// What probes an ejected endpoint when the call it is handed may not be duplicated (its
    /// method has no retry or hedging policy): `health`, a grpc.health.v1 Check; `get-point`,
    /// UserGuide's GetPoint for a known user; or package.Service/Method, called with an empty
    /// request (it must answer OK to one, and be safe to call at any time). Default: get-point
    /// when watching UserGuide's health (UserGuide's calls), health otherwise. A call that may be
    /// duplicated is copied as the probe instead; no caller waits for either.
    #[arg(long, env = "MESHLB_PROBE", value_name = "health|get-point|METHOD", value_parser = parse_probe)]
    pub probe: Option<crate::balance::ProbeCall>,
}

/// The largest minimum `--aperture` takes: more connections than any fleet a client balances.
const MAX_APERTURE: usize = 100_000;

/// `off`, or the aperture's minimum.
fn parse_aperture(value: &str) -> Result<crate::balance::ApertureConfig, String> {
    let config = crate::balance::ApertureConfig::default();
    if value == "off" {
        return Ok(crate::balance::ApertureConfig {
            enabled: false,
            ..config
        });
    }
    match value.parse::<usize>() {
        Ok(min @ 1..=MAX_APERTURE) => Ok(crate::balance::ApertureConfig { min, ..config }),
        _ => Err(format!(
            "`{value}` is neither `off` nor a number of endpoints (1 to {MAX_APERTURE})"
        )),
    }
}

/// `health`, `get-point`, or package.Service/Method.
fn parse_probe(value: &str) -> Result<crate::balance::ProbeCall, String> {
    match value {
        "get-point" => Ok(crate::load::get_point_probe()),
        other => other.parse(),
    }
}

/// A service config's JSON, checked; `None` for no config.
#[derive(Debug, Clone)]
pub struct ServiceConfigSource(pub Option<String>);

/// `builtin`, `none`, or a file holding a valid service config.
pub fn parse_service_config(value: &str) -> Result<ServiceConfigSource, String> {
    let text = match value {
        "none" => return Ok(ServiceConfigSource(None)),
        "builtin" => crate::proto::USERGUIDE_SERVICE_CONFIG.to_owned(),
        path => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?,
    };
    crate::balance::ServiceConfig::from_json(&text).map_err(|e| format!("{value}: {e}"))?;
    Ok(ServiceConfigSource(Some(text)))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the replicas are: dns:///host:port, dns://DNS_IP:PORT/host:port, ipv4:a:p,b:p, host:port.
    #[arg(long, env = "MESHLB_TARGET")]
    pub target: String,
    /// Stop after this many calls (default 1000; with --watch and no --duration: until Ctrl-C).
    #[arg(long, env = "MESHLB_REQUESTS", conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Stop after this long, e.g. `10s`.
    #[arg(long, env = "MESHLB_DURATION", value_parser = super::positive_duration)]
    pub duration: Option<Duration>,
    /// Calls in flight at once.
    #[arg(long, env = "MESHLB_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub concurrency: u32,
    /// Open loop: this many calls per second (latency counts from when each call was due).
    #[arg(long, env = "MESHLB_RATE")]
    pub rate: Option<f64>,
    /// Which call: get-point, list-users or mix (UserGuide's), or any unary or server-streaming
    /// method as package.Service/Method (its schema by server reflection, --proto or --protoset;
    /// its request from -d).
    #[arg(long, env = "MESHLB_CALL", default_value = "get-point")]
    pub call: CallChoice,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Balancing policy: p2c (peak-EWMA), round-robin or pick-first. Default: what the service
    /// config chooses, else p2c.
    #[arg(long, env = "MESHLB_POLICY")]
    pub policy: Option<Policy>,
    /// Deadline of each call.
    #[arg(long, env = "MESHLB_TIMEOUT", value_parser = super::positive_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Output: a table, or one JSON object.
    #[arg(long, env = "MESHLB_FORMAT", value_enum, default_value = "table")]
    pub format: Format,
    /// Live view refreshed every second: distribution, latency and endpoint states.
    #[arg(long, env = "MESHLB_WATCH")]
    pub watch: bool,
    /// Base URL of the Jaeger UI, for the link to a sampled trace.
    #[arg(
        long,
        env = "MESHLB_JAEGER_UI",
        default_value = "http://localhost:16686"
    )]
    pub jaeger_ui: String,
    /// The grpc.health.v1 service name to watch on each endpoint (default: UserGuide's; with
    /// --call of another service, "", the whole server).
    #[arg(long, env = "MESHLB_HEALTH_SERVICE")]
    pub health_service: Option<String>,
    /// Serve the balancer's metrics (Prometheus' text format, `GET /metrics`) here while the
    /// load runs; the address is printed on stderr (`metrics on ADDR`).
    #[arg(long, env = "MESHLB_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub service_config: ServiceConfigArgs,
}

impl Args {
    fn spec(&self, call: Workload) -> Result<LoadSpec, UsageError> {
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate <= MAX_RATE) {
                return Err(UsageError(format!(
                    "--rate must be more than 0 and at most {MAX_RATE} calls/s, got {rate}"
                )));
            }
        }
        let stop = match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(d),
            // A live view runs until Ctrl-C.
            (None, None) if self.watch => Stop::Duration(UNTIL_INTERRUPTED),
            (None, None) => Stop::Requests(1000),
        };
        Ok(LoadSpec {
            stop,
            concurrency: self.concurrency as usize,
            rate: self.rate,
            call,
        })
    }
}

/// Builds the balancer a command runs over; a bad target or TLS file is a usage error.
pub fn balancer(
    target: &str,
    policy: Option<Policy>,
    timeout: Duration,
    health: &str,
    tls: &TlsArgs,
    metrics: Option<&crate::balance::Metrics>,
    service_config: &ServiceConfigArgs,
) -> anyhow::Result<Balancer> {
    // A GetPoint judges what UserGuide's callers meet; a health Check only that a server answers.
    let probe = match &service_config.probe {
        Some(probe) => probe.clone(),
        None if health == crate::proto::USERGUIDE_SERVICE => crate::load::get_point_probe(),
        None => crate::balance::ProbeCall::health(),
    };
    let mut builder = Balancer::builder(target)
        .timeout(timeout)
        .health_service(health)
        .probe(probe);
    if let Some(policy) = policy {
        builder = builder.policy(policy);
    }
    if let Some(json) = &service_config.service_config.0 {
        builder = builder
            .service_config(json)
            .map_err(|e| UsageError(e.to_string()))?;
    }
    if let Some(size) = service_config.subset {
        builder = builder.subset(size as usize);
    }
    if let Some(aperture) = service_config.aperture {
        builder = builder.aperture(aperture);
    }
    if let Some(coordinate) = service_config.coordinate {
        builder = builder.coordinate(coordinate);
    }
    if service_config.dns_service_config {
        builder = builder.dns(crate::discovery::DnsConfig {
            service_config: true,
            ..Default::default()
        });
    }
    if let Some(tls) = tls.client_tls() {
        builder = builder.tls(tls);
    }
    if let Some(metrics) = metrics {
        builder = builder.metrics(metrics);
    }
    builder
        .build_lazy()
        .map_err(|e| UsageError(e.to_string()).into())
}

/// The balancer's metrics, served while the load runs.
struct MetricsListener {
    metrics: crate::balance::Metrics,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl MetricsListener {
    /// Listens at `addr`.
    async fn start(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::balance::Metrics::register(&mut registry);
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        eprintln!("metrics on {}", listener.local_addr()?);
        let registry = std::sync::Arc::new(registry);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = tokio::spawn(crate::metrics::serve(
            listener,
            move || crate::metrics::encode(&registry),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            metrics,
            stop,
            served,
        })
    }

    /// Stops listening, before the balancer goes: a scrape after the report would find the
    /// run's counters with no endpoint left to count them by.
    async fn stop(self) {
        let _ = self.stop.send(());
        // A scraper that keeps its connection open must not hold the client's exit for long.
        let mut served = self.served;
        if tokio::time::timeout(Duration::from_secs(1), &mut served)
            .await
            .is_err()
        {
            served.abort();
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Checked before anything starts: flag mistakes are reported at once.
    args.spec(CallKind::GetPoint.into())?;
    let health = match (&args.health_service, &args.call) {
        (Some(name), _) => name.as_str(),
        (None, CallChoice::Method(method)) => super::method::health_service_for(method),
        (None, CallChoice::UserGuide(_)) => crate::proto::USERGUIDE_SERVICE,
    };
    if args.method.given() && !matches!(args.call, CallChoice::Method(_)) {
        return Err(UsageError(
            "-d, -H, --proto and --protoset go with --call package.Service/Method".into(),
        )
        .into());
    }
    // -d and -H first: a bad one is a usage error, and `-d @-` may wait for its writer.
    let prepared = match &args.call {
        CallChoice::Method(_) => Some(args.method.prepare()?),
        CallChoice::UserGuide(_) => None,
    };
    let metrics = match args.metrics_listen {
        Some(addr) => Some(MetricsListener::start(addr).await?),
        None => None,
    };
    let lb = balancer(
        &args.target,
        args.policy,
        args.timeout,
        health,
        &args.tls,
        metrics.as_ref().map(|m| &m.metrics),
        &args.service_config,
    )?;
    // Warm-up (every endpoint's connection and first health answer, the schema) stays out of
    // the figures, but counts against --duration: a run of 10 s takes 10 s, even against a dead
    // target. At most 3 s of it: an endpoint that neither answers nor fails by then is left to
    // join during the load.
    let waited = tokio::time::Instant::now();
    let warm_up = Duration::from_secs(3);
    if lb.wait_ready(warm_up).await {
        lb.wait_settled(warm_up.saturating_sub(waited.elapsed()))
            .await;
    }
    let call = match &args.call {
        CallChoice::UserGuide(kind) => Workload::from(*kind),
        CallChoice::Method(name) => {
            let prepared = prepared.ok_or_else(|| anyhow::anyhow!("no request prepared"))?;
            let schema = args.method.invocation(prepared, name, lb.clone());
            let invocation = tokio::time::timeout(args.timeout, schema)
                .await
                .map_err(|_| anyhow::anyhow!("no schema for {name} within {:?}", args.timeout))??;
            if !matches!(invocation.kind(), Kind::Unary | Kind::ServerStreaming) {
                return Err(UsageError(format!(
                    "meshlb client loads unary and server-streaming methods; {name} streams its requests (meshlb call makes one such call)"
                ))
                .into());
            }
            Workload::Method(std::sync::Arc::new(invocation))
        }
    };
    let mut spec = args.spec(call)?;
    if let Stop::Duration(d) = spec.stop {
        spec.stop = Stop::Duration(
            d.saturating_sub(waited.elapsed())
                .max(Duration::from_millis(1)),
        );
    }
    let mut report = drive(&lb, &spec, args.watch, args.format == Format::Table).await;
    if report.trace_id.is_some() {
        // A link to a trace the collector never got would send the user looking for nothing.
        let exported = tokio::task::spawn_blocking(crate::telemetry::flush).await;
        if let Ok(Err(error)) | Err(error) = exported.map_err(|e| e.to_string()) {
            eprintln!("warning: spans were not exported ({error}); no trace to show");
            report.trace_id = None;
        }
    }
    match args.format {
        Format::Table => {
            print!("{}", report.table());
            if let Some(id) = &report.trace_id {
                println!(
                    "trace {id}  {}/trace/{id}",
                    args.jaeger_ui.trim_end_matches('/')
                );
            }
        }
        Format::Json => println!("{}", serde_json::to_string(&report)?),
    }
    if let Some(listener) = metrics {
        listener.stop().await;
    }
    Ok(if report.ok == report.calls {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the load with a progress bar (on a terminal) or the live view, stopping early on Ctrl-C.
pub async fn drive(lb: &Balancer, spec: &LoadSpec, watch: bool, progress: bool) -> Report {
    let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
    let interrupted = tokio::spawn({
        let signal = super::shutdown_signal();
        async move {
            signal.await;
            let _ = cancel_tx.send(true);
        }
    });
    let (recorder, window) = Recorder::with_window_if(watch);
    let started = tokio::time::Instant::now();
    let cpu_before = crate::bench::cpu_time();
    let bar = (progress && !watch && std::io::stdout().is_terminal()).then(|| progress_bar(spec));
    let view = {
        let (lb, recorder, bar, stop) = (lb.clone(), recorder.clone(), bar.clone(), spec.stop);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(if watch {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(100)
            });
            tick.tick().await;
            let mut retries_before = lb.retries();
            loop {
                tick.tick().await;
                if let Some(window) = &window {
                    let retries = lb.retries();
                    let frame =
                        live_frame(&lb, window, started.elapsed(), retries - retries_before);
                    retries_before = retries;
                    print!("{frame}");
                } else if let Some(bar) = &bar {
                    // The bar counts calls for --requests and milliseconds for --duration.
                    bar.set_position(match stop {
                        Stop::Requests(_) => recorder.started(),
                        Stop::Duration(_) => started.elapsed().as_millis() as u64,
                    });
                }
            }
        })
    };
    let recorder = load::run(lb, spec, recorder, cancel).await;
    view.abort();
    interrupted.abort();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut report = Report::new(
        lb.target(),
        &lb.policy().to_string(),
        &recorder.total(),
        lb.retries(),
        started.elapsed(),
    );
    report.trace_id = recorder.trace_id();
    (report.hedges, report.hedge_wins) = lb.hedges();
    let cpu = crate::bench::cpu_time().saturating_sub(cpu_before);
    report.cpu_us_per_call =
        (cpu.as_secs_f64() * 1e6 / report.calls.max(1) as f64 * 10.0).round() / 10.0;
    report
}

fn progress_bar(spec: &LoadSpec) -> ProgressBar {
    let (len, unit) = match spec.stop {
        Stop::Requests(n) => (n, "calls"),
        Stop::Duration(d) => (d.as_millis() as u64, "ms"),
    };
    let bar = ProgressBar::new(len);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit}  {{elapsed}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// One frame of the live view: the last second's distribution (and its retries) and every
/// endpoint's state.
fn live_frame(lb: &Balancer, window: &Window, elapsed: Duration, retries: u64) -> String {
    let window = window.take();
    let second = Report::new(
        lb.target(),
        &lb.policy().to_string(),
        &window,
        retries,
        Duration::from_secs(1),
    );
    let mut out = String::new();
    if std::io::stdout().is_terminal() {
        out.push_str("\x1b[2J\x1b[H");
    }
    let _ = writeln!(
        out,
        "meshlb client --watch  {}  policy {}  t={:.0}s  (Ctrl-C for the final table)",
        lb.target(),
        lb.policy(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<22} {:<17} {:>9} {:>9} {:>9} {:>6} {:>8}",
        "endpoint", "state", "in-flight", "served", "errors", "shed", "ewma"
    );
    for e in lb.endpoints() {
        let _ = writeln!(
            out,
            "{:<22} {:<17} {:>9} {:>9} {:>9} {:>6} {:>8}",
            e.addr.to_string(),
            e.state.to_string(),
            e.in_flight,
            e.served,
            e.errors,
            e.shed,
            report::ms(e.ewma_rtt.as_secs_f64() * 1000.0)
        );
    }
    let _ = writeln!(out, "\nlast second:");
    out.push_str(&second.figures());
    out
}
