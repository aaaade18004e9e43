//! Failure scenarios: the failures that do not announce themselves, measured side by side.
//!
//! - **blackhole**: three replicas, the third in a network namespace of its own (Linux, root);
//!   a quarter into the run its link goes down (no RST, no FIN) and stays down. Rows: meshlb p2c
//!   without the cut (the reference), with the cut, with the cut and silent-failure detection
//!   off, and tonic's `balance_list` with the cut. Figures: calls/s after the cut, failed calls,
//!   p99.9, and how long until the balancer stopped offering the silent replica.
//! - **overload**: three replicas at 5 ms that take 4 calls each at once (`--max-concurrent-calls`),
//!   so the fleet's capacity is about 2400 calls/s. First the capacity is measured (closed loop
//!   at 12 in flight); then an open loop offers 3x that. Figures: goodput (answered calls/s) over
//!   capacity, failed calls, and the balancer's retries against its budget (20 % of calls plus
//!   10 per second).
//!
//! Knows nothing of how results are printed beyond its tables.

use super::BenchConfig;
use crate::balance::SilenceConfig;
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use crate::load::{self, CallKind, LoadSpec, Recorder, Stop, Transport};
use crate::replica::FaultConfig;
use crate::report::{ms, Latency};
use crate::Balancer;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;

/// A failure scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// One replica's network goes silent under load.
    Blackhole,
    /// Three times the fleet's capacity offered.
    Overload,
}

impl FailureKind {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Blackhole => "blackhole",
            FailureKind::Overload => "overload",
        }
    }

    /// The kind named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        [FailureKind::Blackhole, FailureKind::Overload]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// One row of a failure scenario.
#[derive(Debug, Clone, Serialize)]
pub struct FailureRow {
    /// Who and how.
    pub label: String,
    /// Answered calls per second (after the cut, for blackhole).
    pub rps: f64,
    /// This row's calls/s over the reference row's.
    pub vs_reference: f64,
    /// Failed calls.
    pub errors: u64,
    /// Latency percentiles of answered calls, ms.
    pub latency_ms: Latency,
    /// Blackhole: ms from the cut until the silent replica left rotation (meshlb only).
    pub ms_until_out: Option<f64>,
    /// Overload: retries made, and the budget they had to fit in.
    pub retries: Option<(u64, u64)>,
}

/// A failure scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct FailureScenario {
    /// Which.
    pub kind: FailureKind,
    /// What was done, in a line.
    pub setup: String,
    /// Its rows; the first is the reference.
    pub rows: Vec<FailureRow>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
}

/// Runs one failure scenario.
pub async fn run(
    kind: FailureKind,
    config: &BenchConfig,
    launch: &Launch,
    progress: &impl Fn(&str),
) -> anyhow::Result<FailureScenario> {
    match kind {
        FailureKind::Blackhole => blackhole(config, launch, progress).await,
        FailureKind::Overload => overload(config, launch, progress).await,
    }
}

async fn blackhole(
    config: &BenchConfig,
    launch: &Launch,
    progress: &impl Fn(&str),
) -> anyhow::Result<FailureScenario> {
    let setup = format!(
        "three replicas at 2 ms, the third in its own network namespace; its link cut {} into a {} run; {} in flight",
        humantime::format_duration(config.duration / 4),
        humantime::format_duration(config.duration),
        config.concurrency
    );
    let skipped = if !crate::netns::available() {
        Some("needs Linux, root and iproute2 (network namespaces)")
    } else if config.tls.is_some() {
        Some("not under --tls: the certificates name 127.0.0.x, not the namespace's address")
    } else {
        None
    };
    if let Some(why) = skipped {
        return Ok(FailureScenario {
            kind: FailureKind::Blackhole,
            setup,
            rows: Vec::new(),
            skipped: Some(why.into()),
        });
    }
    let faults = [FaultConfig {
        latency: Duration::from_millis(2),
        ..Default::default()
    }; 3];
    let mut spec = FleetSpec::uniform(IpAddr::V4(Ipv4Addr::LOCALHOST), &faults);
    spec.members[2].isolated = true;
    let mut rows: Vec<FailureRow> = Vec::new();
    for (label, cut, silence, tonic) in [
        ("meshlb p2c, no cut", false, true, false),
        ("meshlb p2c", true, true, false),
        ("meshlb p2c, no silence detection", true, false, false),
        ("tonic balance_list", true, true, true),
    ] {
        progress(&format!("blackhole / {label}"));
        // A fresh fleet per row: a cut leaves connections half-dead for tens of seconds.
        let fleet = RunningFleet::start(&spec, launch).await?;
        let addrs: Vec<SocketAddr> = fleet.members.iter().map(|m| m.addr).collect();
        let target = crate::Target::Static(addrs.clone()).to_string();
        let row = if tonic {
            let channel = balance_list(&addrs, config)?;
            // The same 10 s deadline meshlb gives every call, around the whole channel: tonic's
            // own request timeout starts only once its balancer has picked a connection.
            let channel = tower::ServiceBuilder::new()
                .timeout(Duration::from_secs(10))
                .service(channel);
            cut_run(&channel, None, &fleet, cut, config).await?
        } else {
            let lb = balancer(target, config)?
                .silence(SilenceConfig {
                    enabled: silence,
                    ..SilenceConfig::default()
                })
                .build()
                .await?;
            cut_run(&lb, Some(&lb), &fleet, cut, config).await?
        };
        let _ = fleet.members[2].blackhole(false);
        let _ = fleet.drain(Duration::from_secs(5)).await;
        let reference = rows.first().map_or(row.0, |r| r.rps);
        rows.push(FailureRow {
            label: label.into(),
            rps: row.0,
            vs_reference: row.0 / reference.max(1e-9),
            errors: row.1,
            latency_ms: row.2,
            ms_until_out: row.3,
            retries: None,
        });
    }
    Ok(FailureScenario {
        kind: FailureKind::Blackhole,
        setup,
        rows,
        skipped: None,
    })
}

/// meshlb over `target`, as the other scenarios build it (TLS and the service config included).
fn balancer(target: String, config: &BenchConfig) -> anyhow::Result<crate::balance::Builder> {
    let builder = Balancer::builder(target)
        .health_service(crate::proto::USERGUIDE_SERVICE)
        .service_config(crate::proto::USERGUIDE_SERVICE_CONFIG)?;
    Ok(match &config.tls {
        Some(tls) => builder.tls(tls.clone()),
        None => builder,
    })
}

/// tonic's `balance_list` over `addrs`, as a tonic user would set it up.
fn balance_list(
    addrs: &[SocketAddr],
    config: &BenchConfig,
) -> anyhow::Result<tonic::transport::Channel> {
    let endpoints = addrs
        .iter()
        .map(|a| {
            super::tonic_endpoint(*a, config).map(|e| e.connect_timeout(Duration::from_secs(2)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(tonic::transport::Channel::balance_list(
        endpoints.into_iter(),
    ))
}

/// One blackhole run: (calls/s after the cut point, errors, latency, ms until out of rotation).
async fn cut_run<T: Transport>(
    transport: &T,
    lb: Option<&Balancer>,
    fleet: &RunningFleet,
    cut: bool,
    config: &BenchConfig,
) -> anyhow::Result<(f64, u64, Latency, Option<f64>)> {
    let spec = LoadSpec {
        stop: Stop::Duration(config.duration),
        concurrency: config.concurrency,
        rate: None,
        call: CallKind::GetPoint.into(),
    };
    let (recorder, window) = Recorder::with_window();
    let (_never, cancel) = tokio::sync::watch::channel(false);
    let silent = fleet.members[2].addr;
    let cut_at = config.duration / 4;
    let load = load::run(transport, &spec, recorder.clone(), cancel);
    tokio::pin!(load);
    let started = Instant::now();
    tokio::select! {
        _ = &mut load => anyhow::bail!("the load ended before the cut"),
        () = tokio::time::sleep(cut_at) => {}
    }
    window.take();
    let after_cut = Instant::now();
    if cut {
        fleet.members[2].blackhole(true)?;
    }
    let out_after = std::cell::Cell::new(None);
    let watch_rotation = async {
        let Some(lb) = lb.filter(|_| cut) else {
            return std::future::pending::<()>().await;
        };
        loop {
            let state = lb.endpoints().into_iter().find(|e| e.addr == silent);
            if state.is_some_and(|e| e.state != crate::balance::EndpointState::Ready) {
                out_after.set(Some(after_cut.elapsed().as_secs_f64() * 1000.0));
                return std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        recorder = &mut load => {
            let window = window.take();
            let total = recorder.total();
            let seconds = started.elapsed().saturating_sub(cut_at).as_secs_f64();
            let answered = window.total.ok_count() as f64;
            Ok((answered / seconds.max(1e-9), total.total.error_count(), Latency::of(&total.total), out_after.get()))
        }
        () = watch_rotation => unreachable!("the rotation watch never ends"),
    }
}

async fn overload(
    config: &BenchConfig,
    launch: &Launch,
    progress: &impl Fn(&str),
) -> anyhow::Result<FailureScenario> {
    const PER_REPLICA: usize = 4;
    let faults = [FaultConfig {
        latency: Duration::from_millis(5),
        ..Default::default()
    }; 3];
    let spec = FleetSpec::uniform(IpAddr::V4(Ipv4Addr::LOCALHOST), &faults);
    let mut launch = launch.clone();
    launch
        .extra_args
        .extend(["--max-concurrent-calls".to_owned(), PER_REPLICA.to_string()]);
    let fleet = RunningFleet::start(&spec, &launch).await?;
    let addrs: Vec<SocketAddr> = fleet.members.iter().map(|m| m.addr).collect();
    let target = crate::Target::Static(addrs.clone()).to_string();
    let builder = balancer(target.clone(), config)?;
    let balancer = || builder.clone().build();

    progress("overload / capacity");
    let lb = balancer().await?;
    let closed = LoadSpec {
        stop: Stop::Duration(config.duration),
        concurrency: PER_REPLICA * addrs.len(),
        rate: None,
        call: CallKind::GetPoint.into(),
    };
    let capacity = measure(&lb, &closed, config).await;
    let mut rows = vec![row(
        "capacity: meshlb p2c, closed loop at 12 in flight",
        &capacity,
        capacity.0,
        None,
    )];
    let offered = 3.0 * capacity.0;
    let open = LoadSpec {
        stop: Stop::Duration(config.duration),
        concurrency: 1024,
        rate: Some(offered.max(1.0)),
        call: CallKind::GetPoint.into(),
    };

    progress("overload / meshlb p2c at 3x");
    let lb = balancer().await?;
    let before = lb.retries();
    let run = measure(&lb, &open, config).await;
    let retries = lb.retries() - before;
    // The balancer's TpsBudget: 20 % of the calls deposited in its 10 s window (warm-up
    // included), plus a reserve of 10 per second of that window.
    let deposited = run.3 + run.4;
    let budget = (0.2 * deposited as f64 + 10.0 * 10.0) as u64;
    rows.push(row(
        &format!("meshlb p2c, open loop at {offered:.0}/s (3x)"),
        &run,
        capacity.0,
        Some((retries, budget)),
    ));

    progress("overload / tonic balance_list at 3x");
    let channel = balance_list(&addrs, config)?;
    let run = measure(&channel, &open, config).await;
    rows.push(row(
        &format!("tonic balance_list, open loop at {offered:.0}/s (3x)"),
        &run,
        capacity.0,
        None,
    ));
    let _ = fleet.drain(Duration::from_secs(5)).await;
    Ok(FailureScenario {
        kind: FailureKind::Overload,
        setup: format!(
            "three replicas at 5 ms taking {PER_REPLICA} calls each at once (--max-concurrent-calls); {} per row",
            humantime::format_duration(config.duration)
        ),
        rows,
        skipped: None,
    })
}

/// (answered calls/s, errors, latency, calls made, calls made in the warm-up).
async fn measure<T: Transport>(
    transport: &T,
    spec: &LoadSpec,
    config: &BenchConfig,
) -> (f64, u64, Latency, u64, u64) {
    let (_never, cancel) = tokio::sync::watch::channel(false);
    let warm = LoadSpec {
        stop: Stop::Duration(config.warmup),
        ..spec.clone()
    };
    let warmed = load::run(transport, &warm, Recorder::default(), cancel.clone()).await;
    let warm_calls = warmed.total().total.ok_count() + warmed.total().total.error_count();
    let started = Instant::now();
    let recorder = load::run(transport, spec, Recorder::default(), cancel).await;
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let total = recorder.total();
    let ok = total.total.ok_count();
    let errors = total.total.error_count();
    (
        ok as f64 / seconds,
        errors,
        Latency::of(&total.total),
        ok + errors,
        warm_calls,
    )
}

fn row(
    label: &str,
    run: &(f64, u64, Latency, u64, u64),
    reference: f64,
    retries: Option<(u64, u64)>,
) -> FailureRow {
    FailureRow {
        label: label.into(),
        rps: run.0,
        vs_reference: run.0 / reference.max(1e-9),
        errors: run.1,
        latency_ms: run.2,
        ms_until_out: None,
        retries,
    }
}

const COLUMNS: [&str; 7] = [
    "contender",
    "answered calls/s",
    "vs reference",
    "failed calls",
    "p99",
    "p99.9",
    "notes",
];

impl FailureScenario {
    fn cells(r: &FailureRow) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(out) = r.ms_until_out {
            notes.push(format!("out of rotation {out:.0} ms after the cut"));
        }
        if let Some((retries, budget)) = r.retries {
            notes.push(format!("retries {retries} (budget {budget})"));
        }
        vec![
            r.label.clone(),
            format!("{:.0}", r.rps),
            format!("{:.2}x", r.vs_reference),
            r.errors.to_string(),
            ms(r.latency_ms.p99),
            ms(r.latency_ms.p999),
            notes.join("; "),
        ]
    }

    /// The scenario as a terminal table.
    pub fn table(&self) -> String {
        let mut out = format!("\n{} ({})\n", self.kind.name(), self.setup);
        if let Some(why) = &self.skipped {
            let _ = writeln!(out, "skipped: {why}");
            return out;
        }
        for r in &self.rows {
            let c = Self::cells(r);
            let _ = writeln!(
                out,
                "{:<52} {:>8} {:>7} {:>6} {:>9} {:>9}  {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6]
            );
        }
        out
    }

    /// The scenario as a Markdown section.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {} ({})\n\n", self.kind.name(), self.setup);
        if let Some(why) = &self.skipped {
            let _ = writeln!(out, "Skipped: {why}.\n");
            return out;
        }
        let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(COLUMNS.len()));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", Self::cells(r).join(" | "));
        }
        out.push('\n');
        out
    }
}
