//! The tracing scenario: what exporting spans costs the client. Three replicas with no latency
//! (not exporting), an OTLP/gRPC receiver in this process that decodes and counts what it gets,
//! and the same `meshlb client` load run as a child process three ways, round by round: tracing
//! off, 1 % of calls sampled (`traceidratio`), and every call sampled. Each mode's calls/s is
//! compared with tracing off in the same round, and the ratio's median is the figure.
//!
//! Knows the fleet, the client's command line and the OTLP protocol; nothing of how the client
//! traces.

use super::{median, BenchConfig, ClientRun};
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use crate::replica::FaultConfig;
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An OTLP/gRPC trace receiver that decodes every export and counts its spans: a stand-in for
/// Jaeger or a collector.
#[derive(Debug, Default, Clone)]
pub struct Sink {
    spans: Arc<AtomicU64>,
}

impl Sink {
    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }

    /// Serves on `listener` until the task is aborted.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(%error, "the OTLP sink stopped");
            }
        })
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// How the client traces in one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No exporter.
    Off,
    /// `OTEL_TRACES_SAMPLER=traceidratio`, 1 %.
    OnePercent,
    /// Every call sampled (the default sampler).
    Every,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Off, Mode::OnePercent, Mode::Every];

    fn label(self) -> &'static str {
        match self {
            Mode::Off => "tracing off",
            Mode::OnePercent => "1 % sampled (traceidratio)",
            Mode::Every => "every call sampled",
        }
    }
}

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TracingRow {
    /// How the client traced.
    pub mode: Mode,
    /// Calls per second (median over rounds).
    pub rps: f64,
    /// Median over rounds of calls/s divided by tracing off's in the same round.
    pub ratio_to_off: f64,
    /// The client's CPU time per call, µs (median over rounds): what tracing costs the client
    /// itself, less shaken than calls/s by the replicas and the sink on the same two cores.
    pub cpu_us_per_call: f64,
    /// Median over rounds of tracing off's CPU per call divided by this mode's, in the same
    /// round (1.00x: tracing costs nothing).
    pub cpu_ratio_to_off: f64,
    /// Spans the sink received, over all rounds.
    pub spans: u64,
    /// Client runs that failed (no report).
    pub failed_runs: usize,
}

/// The tracing scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct TracingScenario {
    /// What was done, in a line.
    pub setup: String,
    /// One row per mode.
    pub rows: Vec<TracingRow>,
}

/// Runs the tracing scenario.
pub async fn run(
    config: &BenchConfig,
    launch: &Launch,
    progress: &impl Fn(&str),
) -> anyhow::Result<TracingScenario> {
    progress("tracing / starting 3 replicas and an OTLP sink");
    let spec = FleetSpec::uniform(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[FaultConfig::default(); 3],
    );
    let fleet = RunningFleet::start(&spec, launch).await?;
    let target = crate::Target::Static(fleet.members.iter().map(|m| m.addr).collect()).to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = listener.local_addr()?;
    let sink = Sink::default();
    let server = sink.serve(listener);

    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut cpu_ratios: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut spans = [0u64; 3];
    let mut failed = [0usize; 3];
    // Cold replicas (their first connections, their allocator's first pages) would count
    // against whichever mode ran first.
    progress("tracing / warm-up");
    let warm_up = BenchConfig {
        duration: Duration::from_secs(1),
        ..config.clone()
    };
    let _ = client_run(launch, &target, Mode::Off, sink_addr, &warm_up).await;
    for round in 0..config.rounds {
        let mut got = [None; 3];
        // Each round starts with another mode, so that what a run leaves behind (the sink still
        // decoding the last exports) does not always fall on the same one.
        for k in 0..Mode::ALL.len() {
            let i = (round + k) % Mode::ALL.len();
            let mode = Mode::ALL[i];
            progress(&format!("tracing / {} / round {}", mode.label(), round + 1));
            let before = sink.spans();
            got[i] = client_run(launch, &target, mode, sink_addr, config).await;
            spans[i] += settled(&sink).await - before;
            if got[i].is_none() {
                failed[i] += 1;
            }
        }
        // A round whose tracing-off run failed has nothing to compare with.
        for (i, run) in got.iter().enumerate() {
            if let Some(run) = run {
                rps[i].push(run.rps);
                cpu[i].push(run.cpu_us_per_call);
                if let Some(base) = got[0] {
                    ratios[i].push(run.rps / base.rps.max(1e-9));
                    cpu_ratios[i].push(base.cpu_us_per_call / run.cpu_us_per_call.max(1e-9));
                }
            }
        }
    }
    server.abort();
    let _ = fleet.drain(Duration::from_secs(10)).await;
    let rows = Mode::ALL
        .iter()
        .enumerate()
        .map(|(i, mode)| TracingRow {
            mode: *mode,
            rps: median(rps[i].clone()),
            ratio_to_off: median(ratios[i].clone()),
            cpu_us_per_call: median(cpu[i].clone()),
            cpu_ratio_to_off: median(cpu_ratios[i].clone()),
            spans: spans[i],
            failed_runs: failed[i],
        })
        .collect();
    Ok(TracingScenario {
        setup: format!(
            "3 replicas with no latency; `meshlb client` as a child process, {} in flight, exporting to an OTLP sink in the bench",
            config.concurrency
        ),
        rows,
    })
}

/// The sink's span count once it has stopped growing (the last exports decoded), or after 5 s.
async fn settled(sink: &Sink) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = sink.spans();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sink.spans();
        if now == last || tokio::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// One `meshlb client` run's figures with tracing as `mode` says, or `None` if it gave no
/// report.
async fn client_run(
    launch: &Launch,
    target: &str,
    mode: Mode,
    sink: SocketAddr,
    config: &BenchConfig,
) -> Option<ClientRun> {
    super::client_process(launch, target, config, |cmd| {
        // Only what the bench sets: an exporter setting of the user's would skew a row.
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_EXPORTER_OTLP_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("OTEL_SERVICE_NAME", "meshlb-bench-client")
            .env_remove("OTEL_TRACES_SAMPLER")
            .env_remove("OTEL_TRACES_SAMPLER_ARG");
        match mode {
            Mode::Off => {}
            Mode::OnePercent => {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}"))
                    .env("OTEL_TRACES_SAMPLER", "traceidratio")
                    .env("OTEL_TRACES_SAMPLER_ARG", "0.01");
            }
            Mode::Every => {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}"));
            }
        }
    })
    .await
}

impl TracingScenario {
    fn cells(r: &TracingRow) -> [String; 7] {
        [
            r.mode.label().to_owned(),
            format!("{:.0}", r.rps),
            format!("{:.2}x", r.ratio_to_off),
            format!("{:.1}µs", r.cpu_us_per_call),
            format!("{:.2}x", r.cpu_ratio_to_off),
            r.spans.to_string(),
            r.failed_runs.to_string(),
        ]
    }

    /// The scenario as a terminal table.
    pub fn table(&self) -> String {
        let mut out = format!("\ntracing ({})\n", self.setup);
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>13} {:>13} {:>13} {:>9} {:>12}",
            "client",
            "calls/s",
            "ratio to off",
            "CPU per call",
            "CPU vs off",
            "spans",
            "failed runs"
        );
        for r in &self.rows {
            let c = Self::cells(r);
            let _ = writeln!(
                out,
                "{:<28} {:>9} {:>13} {:>13} {:>13} {:>9} {:>12}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6]
            );
        }
        out
    }

    /// The scenario as a Markdown section.
    pub fn markdown(&self) -> String {
        let mut out = format!("### tracing ({})\n\n", self.setup);
        out.push_str("| client | calls/s | ratio to tracing off (median of rounds) | client CPU per call | off's CPU per call over this (median of rounds) | spans received | failed runs |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", Self::cells(r).join(" | "));
        }
        out.push('\n');
        out
    }
}
