//! Benchmarks: the same load against the same local fleet through each contender, scenario by
//! scenario, so the numbers are comparable within one run, round by round (every contender once
//! per round). Contenders: meshlb p2c (peak-EWMA with outlier ejection), p2c with hedging, p2c over
//! plain peak-EWMA, p2c reporting metrics, p2c without a service config (no call may be
//! duplicated: probes are the balancer's own, one-slow only), meshlb round-robin, tonic's
//! `Channel::balance_list` (what a tonic user gets today), and a single direct `Channel` to one
//! healthy replica (the floor). Knows nothing of how results are printed beyond producing rows;
//! [`Scenario::markdown`] and [`Scenario::table`] render them.

pub mod failures;
pub mod scale;
pub mod tracing;

use crate::admin_client::AdminAddr;
use crate::balance::{EwmaConfig, HedgeConfig, OutlierConfig};
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use crate::load::{self, CallKind, LoadSpec, Recorder, Recording, Stop, Transport, Workload};
use crate::replica::FaultConfig;
use crate::report::{ms, Latency};
use crate::{Balancer, Policy};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The scenarios, each over three replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// All at 5 ms: the balancer's overhead.
    Uniform,
    /// One replica 50 ms slower: the headline.
    OneSlow,
    /// 1, 10 and 100 ms.
    Spread,
    /// Uniform, one replica turned slow for the middle third of the run.
    Degrade,
    /// No injected latency: maximum throughput and the balancer's own CPU cost.
    NoLatency,
}

impl ScenarioKind {
    /// Every scenario, in report order.
    pub const ALL: [ScenarioKind; 5] = [
        ScenarioKind::Uniform,
        ScenarioKind::OneSlow,
        ScenarioKind::Spread,
        ScenarioKind::Degrade,
        ScenarioKind::NoLatency,
    ];

    /// The name `--scenarios` takes.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Uniform => "uniform",
            ScenarioKind::OneSlow => "one-slow",
            ScenarioKind::Spread => "spread",
            ScenarioKind::Degrade => "degrade",
            ScenarioKind::NoLatency => "no-latency",
        }
    }

    fn latencies_ms(self) -> [u64; 3] {
        match self {
            ScenarioKind::Uniform | ScenarioKind::Degrade => [5, 5, 5],
            ScenarioKind::OneSlow => [5, 5, 55],
            ScenarioKind::Spread => [1, 10, 100],
            ScenarioKind::NoLatency => [0, 0, 0],
        }
    }

    fn has_direct(self) -> bool {
        matches!(
            self,
            ScenarioKind::Uniform | ScenarioKind::OneSlow | ScenarioKind::NoLatency
        )
    }
}

impl std::str::FromStr for ScenarioKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown scenario {s:?}: expected uniform, one-slow, spread, degrade or no-latency")
            })
    }
}

/// Who is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Contender {
    /// meshlb as shipped: p2c over peak-EWMA with latency-outlier ejection.
    MeshlbP2c,
    /// meshlb p2c with hedging at the p95 on top.
    MeshlbP2cHedged,
    /// meshlb p2c over plain peak-EWMA (measured to the end of the body): no ejection, no hedging.
    MeshlbP2cPlain,
    /// meshlb p2c reporting into a metrics registry that is scraped every second.
    MeshlbP2cMetrics,
    /// meshlb p2c making the same GetPoint calls as `--call package.Service/Method` does: the
    /// schema by server reflection, the requests from JSON, dynamic messages on the wire.
    MeshlbP2cAnyMethod,
    /// meshlb p2c with no service config: no call may be duplicated, so an ejected replica's
    /// probe is the balancer's own health Check.
    MeshlbP2cOnce,
    /// As [`Contender::MeshlbP2cOnce`], probing with GetPoint itself (`--probe`): judged by what
    /// callers would meet.
    MeshlbP2cOnceProbed,
    /// meshlb, round-robin.
    MeshlbRoundRobin,
    /// tower's p2c over `PeakEwmaDiscover`, latency to the end of the body, on plain tonic
    /// channels: what a tonic user builds by hand, with none of meshlb's layers.
    TowerP2c,
    /// tonic's `Channel::balance_list`.
    TonicBalanceList,
    /// One `Channel` to the first (fast) replica.
    Direct,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::MeshlbP2c => "meshlb p2c",
            Contender::MeshlbP2cHedged => "p2c + hedging",
            Contender::MeshlbP2cPlain => "p2c, plain EWMA",
            Contender::MeshlbP2cMetrics => "p2c + metrics",
            Contender::MeshlbP2cAnyMethod => "p2c, --call by reflection",
            Contender::MeshlbP2cOnce => "p2c, no retries (Check probes)",
            Contender::MeshlbP2cOnceProbed => "p2c, no retries (GetPoint probes)",
            Contender::MeshlbRoundRobin => "meshlb round-robin",
            Contender::TowerP2c => "tower p2c (hand-rolled)",
            Contender::TonicBalanceList => "tonic balance_list",
            Contender::Direct => "direct channel",
        }
    }
}

/// How the benchmark runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Scenarios to run.
    pub scenarios: Vec<ScenarioKind>,
    /// Measured time per contender and round.
    pub duration: Duration,
    /// Unmeasured load before each measurement.
    pub warmup: Duration,
    /// Calls in flight.
    pub concurrency: usize,
    /// Rounds; each figure is the median over rounds.
    pub rounds: usize,
    /// Every fleet serves TLS and every contender connects with it (certificates are made for
    /// the run).
    pub tls: Option<crate::tls::ClientTls>,
}

/// One contender's figures in one scenario (medians over rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Who.
    pub contender: Contender,
    /// Calls per second.
    pub rps: f64,
    /// Latency percentiles, ms.
    pub latency_ms: Latency,
    /// Failed calls (summed over rounds).
    pub errors: u64,
    /// Share of calls per replica, in fleet order.
    pub shares: Vec<f64>,
    /// Client CPU time per call, µs (user + system, this process).
    pub cpu_us_per_call: f64,
    /// This p99 over meshlb p2c's p99 in the uniform scenario.
    pub p99_vs_uniform_p2c: Option<f64>,
    /// Degrade only: p99 per phase (before, slow, after).
    pub phase_p99_ms: Option<[f64; 3]>,
    /// Degrade only: ms from the change until the slow replica's share in a 100 ms window fell
    /// under 5 %.
    pub ms_until_share_below_5pct: Option<f64>,
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Which.
    pub kind: ScenarioKind,
    /// Injected latency per replica, ms.
    pub latencies_ms: [u64; 3],
    /// Rows, one per contender.
    pub rows: Vec<Row>,
}

/// Runs every configured scenario; `progress` is told what is being measured.
pub async fn run(
    config: &BenchConfig,
    launch: &Launch,
    progress: impl Fn(&str),
) -> anyhow::Result<Vec<Scenario>> {
    let mut results: Vec<Scenario> = Vec::new();
    for &kind in &config.scenarios {
        let faults: Vec<FaultConfig> = kind
            .latencies_ms()
            .iter()
            .map(|&ms| FaultConfig {
                latency: Duration::from_millis(ms),
                ..Default::default()
            })
            .collect();
        let spec = FleetSpec::uniform(IpAddr::V4(Ipv4Addr::LOCALHOST), &faults);
        let fleet = RunningFleet::start(&spec, launch).await?;
        let addrs: Vec<SocketAddr> = fleet.members.iter().map(|m| m.addr).collect();
        let ids: Vec<String> = fleet.members.iter().map(|m| m.id.clone()).collect();
        let slow_admin = fleet.members.get(2).map(|m| m.admin.clone());
        let mut contenders = vec![
            Contender::MeshlbP2c,
            Contender::MeshlbP2cHedged,
            Contender::MeshlbP2cPlain,
            Contender::MeshlbP2cMetrics,
            Contender::MeshlbRoundRobin,
            Contender::TonicBalanceList,
        ];
        if kind == ScenarioKind::NoLatency {
            // Where the client's own cost shows: the dynamic path beside the typed one.
            contenders.insert(1, Contender::MeshlbP2cAnyMethod);
        }
        if kind == ScenarioKind::OneSlow {
            // Where probes show: calls that may not be duplicated are never probes either.
            contenders.insert(1, Contender::MeshlbP2cOnce);
            contenders.insert(2, Contender::MeshlbP2cOnceProbed);
        }
        if kind.has_direct() {
            contenders.push(Contender::TowerP2c);
            contenders.push(Contender::Direct);
        }
        // Round by round, every contender once per round: the machine's drift (another
        // process, a slower minute) then falls on every contender alike instead of on whichever
        // ran during it.
        let mut rounds: Vec<Vec<Round>> = contenders.iter().map(|_| Vec::new()).collect();
        for round in 0..config.rounds {
            for (i, contender) in contenders.iter().enumerate() {
                progress(&format!(
                    "{} / {} / round {}",
                    kind.name(),
                    contender.label(),
                    round + 1
                ));
                rounds[i].push(
                    measure(kind, *contender, &addrs, &ids, slow_admin.as_ref(), config).await?,
                );
            }
        }
        let rows: Vec<Row> = contenders
            .iter()
            .zip(rounds)
            .map(|(contender, rounds)| median_row(*contender, rounds))
            .collect();
        let _ = fleet.drain(Duration::from_secs(10)).await;
        results.push(Scenario {
            kind,
            latencies_ms: kind.latencies_ms(),
            rows,
        });
    }
    let uniform_p2c = results
        .iter()
        .find(|s| s.kind == ScenarioKind::Uniform)
        .and_then(|s| s.rows.iter().find(|r| r.contender == Contender::MeshlbP2c))
        .map(|r| r.latency_ms.p99);
    if let Some(base) = uniform_p2c.filter(|b| *b > 0.0) {
        for row in results.iter_mut().flat_map(|s| s.rows.iter_mut()) {
            row.p99_vs_uniform_p2c = Some(row.latency_ms.p99 / base);
        }
    }
    Ok(results)
}

/// One round of one contender.
struct Round {
    rps: f64,
    latency: Latency,
    errors: u64,
    shares: Vec<f64>,
    cpu_us_per_call: f64,
    phase_p99_ms: Option<[f64; 3]>,
    ms_until_below: Option<f64>,
}

async fn measure(
    kind: ScenarioKind,
    contender: Contender,
    addrs: &[SocketAddr],
    ids: &[String],
    slow_admin: Option<&AdminAddr>,
    config: &BenchConfig,
) -> anyhow::Result<Round> {
    let target = crate::Target::Static(addrs.to_vec()).to_string();
    match contender {
        Contender::MeshlbP2c
        | Contender::MeshlbP2cHedged
        | Contender::MeshlbP2cPlain
        | Contender::MeshlbP2cMetrics
        | Contender::MeshlbP2cAnyMethod
        | Contender::MeshlbP2cOnce
        | Contender::MeshlbP2cOnceProbed
        | Contender::MeshlbRoundRobin => {
            let policy = if contender == Contender::MeshlbRoundRobin {
                Policy::RoundRobin
            } else {
                Policy::P2c
            };
            // The UserGuide service config, as `meshlb client` uses it; the policy set here wins
            // over the config's balancing choice.
            let mut builder = Balancer::builder(target)
                .policy(policy)
                .health_service(crate::proto::USERGUIDE_SERVICE);
            let once = matches!(
                contender,
                Contender::MeshlbP2cOnce | Contender::MeshlbP2cOnceProbed
            );
            if !once {
                builder = builder.service_config(crate::proto::USERGUIDE_SERVICE_CONFIG)?;
            }
            if contender == Contender::MeshlbP2cOnceProbed {
                builder = builder.probe(crate::load::get_point_probe());
            }
            if contender == Contender::MeshlbP2cHedged {
                builder = builder.hedge(HedgeConfig::p95());
            }
            if contender == Contender::MeshlbP2cPlain {
                builder = builder.outlier(OutlierConfig {
                    enabled: false,
                    ..OutlierConfig::default()
                });
            }
            if let Some(tls) = &config.tls {
                builder = builder.tls(tls.clone());
            }
            // Metrics on, and read as Prometheus would (every second, more often than the usual
            // 15 s), so the figure includes the scrapes' cost.
            let mut registry = None;
            if contender == Contender::MeshlbP2cMetrics {
                let mut r = prometheus_client::registry::Registry::default();
                builder = builder.metrics(&crate::balance::Metrics::register(&mut r));
                registry = Some(r);
            }
            let lb = builder.build().await?;
            let scraper = registry.map(|registry| {
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        std::hint::black_box(crate::metrics::encode(&registry));
                    }
                })
            });
            let call = if contender == Contender::MeshlbP2cAnyMethod {
                lb.wait_ready(Duration::from_secs(3)).await;
                Workload::Method(std::sync::Arc::new(get_point_by_reflection(&lb).await?))
            } else {
                CallKind::GetPoint.into()
            };
            let round = measure_on(&lb, call, kind, ids, slow_admin, config).await;
            if let Some(scraper) = scraper {
                scraper.abort();
            }
            round
        }
        Contender::TowerP2c => {
            let svc = tower_p2c(addrs, config)?;
            let typed = CallKind::GetPoint.into();
            measure_on(&svc, typed, kind, ids, slow_admin, config).await
        }
        Contender::TonicBalanceList | Contender::Direct => {
            let channel = if contender == Contender::Direct {
                tonic_endpoint(addrs[0], config)?.connect().await?
            } else {
                let endpoints = addrs
                    .iter()
                    .map(|a| tonic_endpoint(*a, config))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                tonic::transport::Channel::balance_list(endpoints.into_iter())
            };
            let typed = CallKind::GetPoint.into();
            measure_on(&channel, typed, kind, ids, slow_admin, config).await
        }
    }
}

/// What a tonic user builds by hand: tower's p2c over `PeakEwmaDiscover` (latency to the end of
/// the body) on plain tonic channels, behind a `Buffer`.
pub(crate) fn tower_p2c(addrs: &[SocketAddr], config: &BenchConfig) -> anyhow::Result<TowerP2c> {
    let channels = addrs
        .iter()
        .map(|a| Ok(tonic_endpoint(*a, config)?.connect_lazy()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ewma = EwmaConfig::default();
    let discover = tower::load::PeakEwmaDiscover::new(
        tower::discover::ServiceList::new(channels),
        ewma.default_rtt,
        ewma.decay,
        crate::balance::completion::BodyEnd,
    );
    Ok(tower::buffer::Buffer::new(
        TowerBalance::new(discover),
        1024,
    ))
}

pub(crate) type TowerP2c = tower::buffer::Buffer<
    http::Request<tonic::body::Body>,
    <TowerBalance as tower::Service<http::Request<tonic::body::Body>>>::Future,
>;

type TowerBalance = tower::balance::p2c::Balance<
    tower::load::PeakEwmaDiscover<
        tower::discover::ServiceList<Vec<tonic::transport::Channel>>,
        crate::balance::completion::BodyEnd,
    >,
    http::Request<tonic::body::Body>,
>;

/// A plain tonic endpoint, with the run's TLS if any.
fn tonic_endpoint(
    addr: SocketAddr,
    config: &BenchConfig,
) -> anyhow::Result<tonic::transport::Endpoint> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = &config.tls {
        endpoint = endpoint.tls_config(tls.config()?)?;
    }
    Ok(endpoint)
}

/// What one `meshlb client` run in a process of its own reported.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientRun {
    /// Calls per second.
    pub rps: f64,
    /// The client process's CPU time per call, µs.
    pub cpu_us_per_call: f64,
    /// Replicas that served at least one call.
    pub served_by: usize,
}

/// Runs `meshlb client` against `target` for the configured duration and concurrency, in a
/// process of its own (nothing else of the bench's in it), with what `configure` adds; `None`
/// if it gave no report.
pub(crate) async fn client_process(
    launch: &Launch,
    target: &str,
    config: &BenchConfig,
    configure: impl FnOnce(&mut tokio::process::Command),
) -> Option<ClientRun> {
    let mut cmd = tokio::process::Command::new(&launch.exe);
    cmd.args(["client", "--target", target, "--format", "json"])
        .args([
            "--duration",
            &humantime::format_duration(config.duration).to_string(),
        ])
        .args(["--concurrency", &config.concurrency.to_string()])
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    configure(&mut cmd);
    let out = cmd.output().await.ok()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let served_by = report["replicas"].as_array().map_or(0, |replicas| {
        replicas
            .iter()
            .filter(|r| r["calls"].as_u64().unwrap_or(0) > 0)
            .count()
    });
    Some(ClientRun {
        rps: report["rps"].as_f64()?,
        cpu_us_per_call: report["cpu_us_per_call"].as_f64()?,
        served_by,
    })
}

#[cfg(not(unix))]
pub(crate) fn cpu_time() -> Duration {
    // Not measured off Unix: the column reads 0.
    Duration::ZERO
}

#[cfg(unix)]
pub(crate) fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we hand it; a zeroed rusage is a valid initial value.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A cancel signal that never fires while its sender is kept.
pub(crate) type Never = (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
);

/// Runs `warmup` unmeasured; returns the measured run's cancel signal (keep the sender: a dropped
/// one reads as "cancelled").
pub(crate) async fn warm_up<T: Transport>(transport: &T, warmup: &LoadSpec) -> Never {
    let (never, cancel) = tokio::sync::watch::channel(false);
    load::run(transport, warmup, Recorder::default(), cancel.clone()).await;
    (never, cancel)
}

/// GetPoint as `meshlb client --call` makes it: the schema asked of the fleet, the same users as
/// the typed path's, from JSON.
async fn get_point_by_reflection(lb: &Balancer) -> anyhow::Result<crate::dynamic::Invocation> {
    use crate::dynamic::{json, Invocation, Schema};
    let service = crate::proto::USERGUIDE_SERVICE;
    let schema = Schema::from_reflection(lb.clone(), Some(&[service]), &Default::default()).await?;
    let method = schema.method(&format!("{service}/GetPoint"))?;
    let lines: Vec<String> = load::USERS
        .iter()
        .map(|(name, age)| serde_json::json!({"profile": {"name": name, "age": age}}).to_string())
        .collect();
    let requests = json::messages(&method.input(), &lines.join("\n"))?;
    Ok(Invocation::new(method, requests, Default::default())?)
}

async fn measure_on<T: Transport>(
    transport: &T,
    call: Workload,
    kind: ScenarioKind,
    ids: &[String],
    slow_admin: Option<&AdminAddr>,
    config: &BenchConfig,
) -> anyhow::Result<Round> {
    let spec = |d| LoadSpec {
        stop: Stop::Duration(d),
        concurrency: config.concurrency,
        rate: None,
        call: call.clone(),
    };
    let (_never, cancel) = warm_up(transport, &spec(config.warmup)).await;

    let degrade = if kind == ScenarioKind::Degrade {
        let slow = slow_admin
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the degrade scenario needs a third replica"))?;
        Some(slow)
    } else {
        None
    };
    let (recorder, window) = Recorder::with_window_if(degrade.is_some());
    let degrade = degrade.zip(window).map(|(slow, window)| {
        let d = config.duration;
        tokio::spawn(async move {
            // 100 ms windows, and the slow replica's knob turned at 1/3 and back at 2/3.
            let mut windows = Vec::new();
            let start = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut turned = (false, false);
            loop {
                tick.tick().await;
                let t = start.elapsed();
                windows.push((t, window.take()));
                if !turned.0 && t >= d / 3 {
                    turned.0 = true;
                    // A fault change that fails would make this row measure a uniform fleet.
                    slow.set_faults(slow_faults(55)).await.map_err(|s| {
                        anyhow::anyhow!("degrade: cannot slow {}: {}", slow.addr, s.message())
                    })?;
                }
                if !turned.1 && t >= d * 2 / 3 {
                    turned.1 = true;
                    slow.set_faults(slow_faults(5)).await.map_err(|s| {
                        anyhow::anyhow!("degrade: cannot restore {}: {}", slow.addr, s.message())
                    })?;
                }
                if t >= d {
                    return Ok::<_, anyhow::Error>(windows);
                }
            }
        })
    });
    let cpu_before = cpu_time();
    let started = tokio::time::Instant::now();
    let recorder = load::run(transport, &spec(config.duration), recorder, cancel).await;
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let total = recorder.total();
    let calls = total.total.ok_count() + total.total.error_count();
    let answered: u64 = total
        .replicas
        .values()
        .map(|r| r.stats.ok_count() + r.stats.error_count())
        .sum();
    let shares = ids
        .iter()
        .map(|id| {
            total.replicas.get(id).map_or(0.0, |r| {
                (r.stats.ok_count() + r.stats.error_count()) as f64 / answered.max(1) as f64
            })
        })
        .collect();
    let (phase_p99_ms, ms_until_below) = match degrade {
        Some(task) => {
            let windows = task
                .await
                .map_err(|e| anyhow::anyhow!("degrade: the fault task failed: {e}"))??;
            phases(&windows, config.duration, &ids[2])
        }
        None => (None, None),
    };
    Ok(Round {
        rps: calls as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: Latency::of(&total.total),
        errors: total.total.error_count(),
        shares,
        cpu_us_per_call: cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
        phase_p99_ms,
        ms_until_below,
    })
}

fn slow_faults(ms: u64) -> FaultConfig {
    FaultConfig {
        latency: Duration::from_millis(ms),
        ..Default::default()
    }
}

/// p99 of each third of the run, and how long after the change the slow replica's share in a
/// window first fell under 5 %.
fn phases(
    windows: &[(Duration, Recording)],
    d: Duration,
    slow_id: &str,
) -> (Option<[f64; 3]>, Option<f64>) {
    let mut parts = [
        Recording::default(),
        Recording::default(),
        Recording::default(),
    ];
    for (t, w) in windows {
        let i = if *t <= d / 3 {
            0
        } else if *t <= d * 2 / 3 {
            1
        } else {
            2
        };
        parts[i].merge(w);
    }
    let p99 = parts.each_ref().map(|p| Latency::of(&p.total).p99);
    let below = windows
        .iter()
        .filter(|(t, _)| *t > d / 3 && *t <= d * 2 / 3)
        .find(|(_, w)| {
            let all: u64 = w.replicas.values().map(|r| r.stats.ok_count()).sum();
            let slow = w.replicas.get(slow_id).map_or(0, |r| r.stats.ok_count());
            all > 0 && (slow as f64) < 0.05 * all as f64
        })
        .map(|(t, _)| (t.saturating_sub(d / 3)).as_secs_f64() * 1000.0);
    (Some(p99), below)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn median_row(contender: Contender, rounds: Vec<Round>) -> Row {
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let n_shares = rounds.first().map_or(0, |r| r.shares.len());
    Row {
        contender,
        rps: m(|r| r.rps),
        latency_ms: Latency {
            p50: m(|r| r.latency.p50),
            p90: m(|r| r.latency.p90),
            p99: m(|r| r.latency.p99),
            p999: m(|r| r.latency.p999),
            max: m(|r| r.latency.max),
        },
        errors: rounds.iter().map(|r| r.errors).sum(),
        shares: (0..n_shares)
            .map(|i| median(rounds.iter().map(|r| r.shares[i]).collect()))
            .collect(),
        cpu_us_per_call: m(|r| r.cpu_us_per_call),
        p99_vs_uniform_p2c: None,
        phase_p99_ms: rounds.iter().all(|r| r.phase_p99_ms.is_some()).then(|| {
            [0, 1, 2].map(|i| {
                median(
                    rounds
                        .iter()
                        .filter_map(|r| r.phase_p99_ms.map(|p| p[i]))
                        .collect(),
                )
            })
        }),
        ms_until_share_below_5pct: {
            let v: Vec<f64> = rounds.iter().filter_map(|r| r.ms_until_below).collect();
            (!v.is_empty()).then(|| median(v))
        },
    }
}

const COLUMNS: [&str; 11] = [
    "contender",
    "calls/s",
    "p50",
    "p90",
    "p99",
    "p99.9",
    "max",
    "errors",
    "share per replica",
    "p99 / uniform p2c p99",
    "client CPU per call",
];

/// One row's cells, in [`COLUMNS`] order.
fn cells(r: &Row, share_separator: &str) -> Vec<String> {
    let l = &r.latency_ms;
    let shares: Vec<String> = r
        .shares
        .iter()
        .map(|s| format!("{:.1}%", s * 100.0))
        .collect();
    vec![
        r.contender.label().to_owned(),
        format!("{:.0}", r.rps),
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max),
        r.errors.to_string(),
        shares.join(share_separator),
        r.p99_vs_uniform_p2c
            .map_or("-".into(), |x| format!("{x:.2}x")),
        format!("{:.1}µs", r.cpu_us_per_call),
    ]
}

impl Scenario {
    fn header(&self) -> String {
        let lat: Vec<String> = self
            .latencies_ms
            .iter()
            .map(|l| format!("{l} ms"))
            .collect();
        let mut h = format!("{} (replicas at {})", self.kind.name(), lat.join(", "));
        if self.kind == ScenarioKind::Degrade {
            h.push_str("; the third replica at 55 ms during the middle third of the run");
        }
        h
    }

    /// A terminal table.
    pub fn table(&self) -> String {
        let mut out = format!("\n{}\n", self.header());
        let line = |cells: &[String]| {
            format!(
                "{:<19} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>20} {:>8} {:>9}\n",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                cells[4],
                cells[5],
                cells[6],
                cells[7],
                cells[8],
                cells[9],
                cells[10]
            )
        };
        // The long Markdown headings would not fit a terminal's columns.
        let mut short = COLUMNS.map(String::from);
        short[9] = "p99/uni".into();
        short[10] = "cpu/call".into();
        out.push_str(&line(&short));
        for r in &self.rows {
            out.push_str(&line(&cells(r, " ")));
            if let Some([a, b, c]) = r.phase_p99_ms {
                let _ = writeln!(
                    out,
                    "{:<19} p99 before/slow/after: {} / {} / {}; slow share under 5% after {}",
                    "",
                    ms(a),
                    ms(b),
                    ms(c),
                    r.ms_until_share_below_5pct
                        .map_or("never".into(), |t| format!("{t:.0} ms"))
                );
            }
        }
        out
    }

    /// A Markdown section for BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n", self.header(), COLUMNS.join(" | "));
        out.push_str(&format!("|{}\n", "---|".repeat(COLUMNS.len())));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", cells(r, " / ").join(" | "));
        }
        for r in &self.rows {
            if let Some([a, b, c]) = r.phase_p99_ms {
                let _ = writeln!(
                    out,
                    "\n{}: p99 before / during / after the slowdown: {} / {} / {}; the slow replica's share fell under 5 % (100 ms windows) {}.",
                    r.contender.label(),
                    ms(a),
                    ms(b),
                    ms(c),
                    r.ms_until_share_below_5pct
                        .map_or("never during the slow phase".into(), |t| format!("{t:.0} ms after the change"))
                );
            }
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn scenario_names_round_trip() {
        for k in ScenarioKind::ALL {
            assert_eq!(k.name().parse::<ScenarioKind>(), Ok(k));
        }
        assert!("fast".parse::<ScenarioKind>().is_err());
    }
}
