//! The scale scenario: what the balancer costs as the fleet grows. The same closed-loop load over
//! 3, 30, 100 and 300 replicas (processes, no injected latency): calls/s, latency and the
//! client's CPU per call of meshlb p2c as shipped (connected to every endpoint), of meshlb with
//! an aperture of 12 (it connects to the part of the fleet its load needs;
//! [`crate::balance::aperture`]), and of the hand-rolled tower p2c (`PeakEwmaDiscover` over
//! tonic channels): how much of the growth is the transport's (more connections, each call
//! alone on one) and how much meshlb's. The
//! library's memory per endpoint is measured on the balancer connected to every endpoint (the
//! heap bytes it holds once it has connected to and watches every one, divided by their number;
//! [`crate::heap`]); it keeps every balancer alive, so the CPU figures of `meshlb client` run as
//! a process of its own beside them (every endpoint, and `--aperture 12`) are what a deployed
//! client pays. Then the 300 again through a subset of 20 (`random_subsetting_experimental`).
//!
//! Knows the load generator and the fleet; nothing of how the figures are judged.

use super::{cpu_time, median, BenchConfig};
use crate::balance::ApertureConfig;
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use crate::load::{self, CallKind, LoadSpec, Recorder, Stop};
use crate::replica::FaultConfig;
use crate::report::{ms, Latency};
use crate::Balancer;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The fleet sizes measured.
pub const SIZES: [usize; 4] = [3, 30, 100, 300];

/// The subset sizes measured over the largest fleet.
pub const SUBSETS: [usize; 1] = [20];

/// One fleet size.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Endpoints discovered.
    pub endpoints: usize,
    /// The subset the balancer connected to, if it used one.
    pub subset: Option<usize>,
    /// The endpoints meshlb p2c with an aperture (or the subset) connected to.
    pub connected: usize,
    /// Calls per second (median over rounds).
    pub rps: f64,
    /// Latency of the median round, ms.
    pub latency_ms: Latency,
    /// The client's CPU time per call (median over rounds).
    pub cpu_us_per_call: f64,
    /// meshlb p2c as shipped, connected to every endpoint: calls/s and CPU per call.
    pub every_rps: Option<f64>,
    /// Its CPU time per call, µs.
    pub every_cpu_us_per_call: Option<f64>,
    /// The hand-rolled tower p2c over the same endpoints: calls/s and CPU per call (not
    /// measured for a subset: tower has none).
    pub tower_rps: Option<f64>,
    /// Its CPU time per call, µs.
    pub tower_cpu_us_per_call: Option<f64>,
    /// `meshlb client` in a process of its own (no other balancer beside it), connected to
    /// every endpoint: CPU time per call, µs (median over rounds).
    pub own_process_every_cpu_us_per_call: Option<f64>,
    /// The same with `--aperture 12`.
    pub own_process_aperture_cpu_us_per_call: Option<f64>,
    /// The replicas that client's calls reached (the most of any round).
    pub own_process_aperture_served_by: Option<usize>,
    /// The heap the balancer holds per connected endpoint once every one is ready (the resident
    /// set's growth where the allocator does not count), KiB: meshlb connected to every
    /// endpoint.
    pub memory_kib_per_endpoint: f64,
}

/// The scale scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleScenario {
    /// What was done, in a line.
    pub setup: String,
    /// One row per fleet size.
    pub rows: Vec<ScaleRow>,
}

/// Runs the scale scenario.
pub async fn run(
    config: &BenchConfig,
    launch: &Launch,
    progress: &impl Fn(&str),
) -> anyhow::Result<ScaleScenario> {
    let largest = SIZES[SIZES.len() - 1];
    progress(&format!("scale / starting {largest} replicas"));
    let faults = vec![FaultConfig::default(); largest];
    let spec = FleetSpec::uniform(IpAddr::V4(Ipv4Addr::LOCALHOST), &faults);
    let fleet = RunningFleet::start(&spec, launch).await?;
    let addrs: Vec<SocketAddr> = fleet.members.iter().map(|m| m.addr).collect();
    let mut rows = Vec::new();
    // Each balancer stays alive until the end, so that the next one's memory is not drawn from
    // what an earlier one freed (the figure would then read low).
    let mut alive = Vec::new();
    let mut tower_alive = Vec::new();
    for n in SIZES {
        let growth = Growth::start();
        let every = balancer(&addrs[..n], Members::Every)?;
        all_ready(&every, n).await?;
        let memory = growth.kib_per(n);
        let aperture = balancer(&addrs[..n], Members::Aperture)?;
        let connected = aperture_ready(&aperture).await?;
        let tower = super::tower_p2c(&addrs[..n], config)?;
        let target = crate::Target::Static(addrs[..n].to_vec()).to_string();
        let (mut rounds, mut every_rounds, mut tower_rounds) = (Vec::new(), Vec::new(), Vec::new());
        let (mut own_every, mut own_aperture) = (Vec::new(), Vec::new());
        for round in 0..config.rounds {
            progress(&format!("scale / {n} endpoints / round {}", round + 1));
            rounds.push(measure(&aperture, config).await);
            every_rounds.push(measure(&every, config).await);
            tower_rounds.push(measure(&tower, config).await);
            // The bench process holds every earlier balancer (for the memory figures): a
            // client in a process of its own is what a deployment runs.
            own_every.extend(super::client_process(launch, &target, config, |_| {}).await);
            own_aperture.extend(
                super::client_process(launch, &target, config, |cmd| {
                    cmd.args(["--aperture", &ApertureConfig::default().min.to_string()]);
                })
                .await,
            );
        }
        tower_alive.push(tower);
        let mut row = row(n, None, connected, &rounds, memory);
        let rps = |r: &[(f64, Latency, f64)]| median(r.iter().map(|r| r.0).collect());
        let cpu = |r: &[(f64, Latency, f64)]| median(r.iter().map(|r| r.2).collect());
        row.every_rps = Some(rps(&every_rounds));
        row.every_cpu_us_per_call = Some(cpu(&every_rounds));
        row.tower_rps = Some(rps(&tower_rounds));
        row.tower_cpu_us_per_call = Some(cpu(&tower_rounds));
        let own = |runs: &[super::ClientRun]| {
            (!runs.is_empty()).then(|| median(runs.iter().map(|r| r.cpu_us_per_call).collect()))
        };
        row.own_process_every_cpu_us_per_call = own(&own_every);
        row.own_process_aperture_cpu_us_per_call = own(&own_aperture);
        row.own_process_aperture_served_by = own_aperture.iter().map(|r| r.served_by).max();
        rows.push(row);
        alive.extend([every, aperture]);
    }
    for size in SUBSETS {
        let growth = Growth::start();
        let lb = balancer(&addrs, Members::Subset(size))?;
        all_ready(&lb, size).await?;
        let memory = growth.kib_per(size);
        let mut rounds = Vec::new();
        for round in 0..config.rounds {
            progress(&format!(
                "scale / {largest} endpoints, subset {size} / round {}",
                round + 1
            ));
            rounds.push(measure(&lb, config).await);
        }
        rows.push(row(largest, Some(size), size, &rounds, memory));
        alive.push(lb);
    }
    drop(alive);
    drop(tower_alive);
    let _ = fleet.drain(Duration::from_secs(20)).await;
    Ok(ScaleScenario {
        setup: format!(
            "{} replicas with no latency, the balancer over the first 3, 30, 100 and 300: as \
             shipped (every endpoint), with an aperture of 12, and tower's p2c, in the bench's \
             process; meshlb client as a process of its own, every endpoint and --aperture 12; \
             then over all {} through a subset of {}; {} in flight",
            largest, largest, SUBSETS[0], config.concurrency
        ),
        rows,
    })
}

/// Which endpoints a measured balancer connects to.
#[derive(Debug, Clone, Copy)]
enum Members {
    /// With the default aperture (`--aperture 12`).
    Aperture,
    /// Every endpoint, as shipped.
    Every,
    /// A subset of this size.
    Subset(usize),
}

fn balancer(addrs: &[SocketAddr], members: Members) -> anyhow::Result<Balancer> {
    let mut builder = Balancer::builder(crate::Target::Static(addrs.to_vec()).to_string())
        .health_service(crate::proto::USERGUIDE_SERVICE)
        .service_config(crate::proto::USERGUIDE_SERVICE_CONFIG)?;
    match members {
        Members::Aperture => builder = builder.aperture(ApertureConfig::default()),
        Members::Every => {}
        Members::Subset(size) => builder = builder.subset(size),
    }
    Ok(builder.build_lazy()?)
}

/// A row from a balancer's rounds: medians, and the latency of the round closest to the median.
fn row(
    endpoints: usize,
    subset: Option<usize>,
    connected: usize,
    rounds: &[(f64, Latency, f64)],
    memory: f64,
) -> ScaleRow {
    let rps = median(rounds.iter().map(|r| r.0).collect());
    let latency = rounds
        .iter()
        .min_by(|a, b| (a.0 - rps).abs().total_cmp(&(b.0 - rps).abs()))
        .map(|r| r.1)
        .unwrap_or_default();
    ScaleRow {
        endpoints,
        subset,
        connected,
        rps,
        latency_ms: latency,
        cpu_us_per_call: median(rounds.iter().map(|r| r.2).collect()),
        every_rps: None,
        every_cpu_us_per_call: None,
        tower_rps: None,
        tower_cpu_us_per_call: None,
        own_process_every_cpu_us_per_call: None,
        own_process_aperture_cpu_us_per_call: None,
        own_process_aperture_served_by: None,
        memory_kib_per_endpoint: memory,
    }
}

/// Waits until the aperture has decided and every member is ready; returns how many it has.
async fn aperture_ready(lb: &Balancer) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(size) = lb.aperture() {
            if ready_count(lb) == size {
                return Ok(size);
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "scale: the aperture ({:?}) was not ready within 60 s",
                lb.aperture()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready_count(lb: &Balancer) -> usize {
    lb.endpoints()
        .iter()
        .filter(|e| e.state == crate::balance::EndpointState::Ready)
        .count()
}

/// Waits until `n` endpoints are ready (connections made, health answered).
async fn all_ready(lb: &Balancer, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = ready_count(lb);
        if ready == n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("scale: only {ready} of {n} endpoints became ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One round: (calls/s, latency, CPU µs per call).
async fn measure<T: load::Transport>(lb: &T, config: &BenchConfig) -> (f64, Latency, f64) {
    let spec = |d| LoadSpec {
        stop: Stop::Duration(d),
        concurrency: config.concurrency,
        rate: None,
        call: CallKind::GetPoint.into(),
    };
    let (_never, cancel) = super::warm_up(lb, &spec(config.warmup)).await;
    let cpu_before = cpu_time();
    let started = tokio::time::Instant::now();
    let recorder = load::run(lb, &spec(config.duration), Recorder::default(), cancel).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before).as_secs_f64();
    let total = recorder.total();
    let calls = total.total.ok_count() + total.total.error_count();
    (
        calls as f64 / elapsed.max(1e-9),
        Latency::of(&total.total),
        cpu * 1e6 / calls.max(1) as f64,
    )
}

/// What the process gains while a balancer is built and connects: heap bytes when the binary's
/// allocator counts them ([`crate::heap`]), else the resident set's growth.
enum Growth {
    Heap(crate::heap::Measure),
    Resident(u64),
}

impl Growth {
    fn start() -> Self {
        match crate::heap::start() {
            Some(measure) => Growth::Heap(measure),
            None => Growth::Resident(resident_bytes()),
        }
    }

    /// The growth so far over `members`, KiB each; ends the measure.
    fn kib_per(self, members: usize) -> f64 {
        let bytes = match &self {
            Growth::Heap(measure) => measure.grown().max(0) as u64,
            Growth::Resident(before) => resident_bytes().saturating_sub(*before),
        };
        bytes as f64 / 1024.0 / members.max(1) as f64
    }
}

/// The process's resident memory, from `/proc/self/statm` (0 where there is none).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * 4096
}

impl ScaleScenario {
    fn cells(r: &ScaleRow) -> [String; 14] {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or("–".into());
        let us = |v: Option<f64>| opt(v, &|v| format!("{v:.1}µs"));
        [
            match r.subset {
                Some(size) => format!("{} (subset {size})", r.endpoints),
                None => r.endpoints.to_string(),
            },
            opt(r.every_rps, &|v| format!("{v:.0}")),
            us(r.every_cpu_us_per_call),
            r.connected.to_string(),
            format!("{:.0}", r.rps),
            ms(r.latency_ms.p50),
            ms(r.latency_ms.p99),
            format!("{:.1}µs", r.cpu_us_per_call),
            opt(r.tower_rps, &|v| format!("{v:.0}")),
            us(r.tower_cpu_us_per_call),
            us(r.own_process_every_cpu_us_per_call),
            us(r.own_process_aperture_cpu_us_per_call),
            r.own_process_aperture_served_by
                .map_or("–".into(), |n| n.to_string()),
            format!("{:.1} KiB", r.memory_kib_per_endpoint),
        ]
    }

    const HEADERS: [&'static str; 14] = [
        "endpoints",
        "every endpoint: calls/s",
        "every endpoint: CPU per call",
        "aperture: connected",
        "aperture: calls/s",
        "aperture: p50",
        "aperture: p99",
        "aperture: CPU per call",
        "tower p2c calls/s",
        "tower p2c CPU per call",
        "own process: every endpoint, CPU per call",
        "own process: aperture, CPU per call",
        "own process: aperture, replicas used",
        "memory per endpoint",
    ];

    /// The scenario as a terminal table.
    pub fn table(&self) -> String {
        let mut out = format!("\nscale ({})\n", self.setup);
        let rows: Vec<_> = self.rows.iter().map(Self::cells).collect();
        let mut widths = Self::HEADERS.map(|h| h.chars().count());
        for cells in &rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(out, "{}", line(&Self::HEADERS.map(String::from)));
        for cells in &rows {
            let _ = writeln!(out, "{}", line(cells));
        }
        out
    }

    /// The scenario as a Markdown section.
    pub fn markdown(&self) -> String {
        let mut out = format!("### scale ({})\n\n", self.setup);
        let _ = writeln!(out, "| {} |", Self::HEADERS.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(Self::HEADERS.len()));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", Self::cells(r).join(" | "));
        }
        out.push('\n');
        out
    }
}
