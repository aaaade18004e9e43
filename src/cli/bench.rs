//! `meshlb bench`: every contender against the same local fleet, scenario by scenario; tables on
//! stdout, the same as JSON and as a Markdown section for BENCHMARKS.md.

use super::up::launch;
use crate::bench::failures::{self, FailureKind};
use crate::bench::{self, BenchConfig, ScenarioKind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios, comma-separated: uniform, one-slow, spread, degrade, no-latency, the failure
    /// scenarios blackhole (needs root) and overload, scale (3 to 300 replicas), and tracing (the
    /// client exporting spans to an OTLP sink).
    #[arg(
        long,
        env = "MESHLB_SCENARIOS",
        value_delimiter = ',',
        default_value = "uniform,one-slow,spread,degrade,no-latency,blackhole,overload,scale,tracing",
        value_parser = parse_scenario
    )]
    scenarios: Vec<Scenario>,
    /// Measured time per contender and round.
    #[arg(long, env = "MESHLB_DURATION", value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, env = "MESHLB_WARMUP", value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Calls in flight.
    #[arg(long, env = "MESHLB_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10000))]
    concurrency: u32,
    /// Rounds; every figure is the median over rounds.
    #[arg(long, env = "MESHLB_ROUNDS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Where bench.json and bench.md go.
    #[arg(long, env = "MESHLB_OUT", default_value = "target/bench")]
    out: PathBuf,
    /// Serve and connect with TLS (throw-away certificates), to compare with a plaintext run.
    #[arg(long, env = "MESHLB_TLS")]
    tls: bool,
    /// The data file every replica loads (default: the built-in data).
    #[arg(long, env = "MESHLB_DATA")]
    data: Option<PathBuf>,
}

/// A performance scenario, a failure scenario, the scale or the tracing scenario.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    Perf(ScenarioKind),
    Failure(FailureKind),
    Scale,
    Tracing,
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    if s == "scale" {
        return Ok(Scenario::Scale);
    }
    if s == "tracing" {
        return Ok(Scenario::Tracing);
    }
    if let Some(kind) = FailureKind::parse(s) {
        return Ok(Scenario::Failure(kind));
    }
    s.parse::<ScenarioKind>()
        .map(Scenario::Perf)
        .map_err(|_| format!("unknown scenario {s:?}: expected uniform, one-slow, spread, degrade, no-latency, blackhole, overload, scale or tracing"))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data_flag = args
        .data
        .as_ref()
        .map(|d| format!(" --data {}", d.display()))
        .unwrap_or_default();
    let mut launch = launch(args.data)?;
    if std::env::var_os("RUST_LOG").is_none() {
        launch.log = "warn".into();
    }
    let mut _temp_certs = None;
    let tls = if args.tls {
        let (paths, temp) = super::up::fleet_certs(None, "bench")?;
        _temp_certs = temp;
        Some(super::up::with_tls(&mut launch, &paths, false)?.0)
    } else {
        None
    };
    let config = BenchConfig {
        scenarios: args
            .scenarios
            .iter()
            .filter_map(|s| match s {
                Scenario::Perf(k) => Some(*k),
                Scenario::Failure(_) | Scenario::Scale | Scenario::Tracing => None,
            })
            .collect(),
        duration: args.duration,
        warmup: args.warmup,
        concurrency: args.concurrency as usize,
        rounds: args.rounds as usize,
        tls,
    };
    let results = bench::run(&config, &launch, |what| eprintln!("measuring {what}")).await?;
    let scenarios: Vec<&str> = args
        .scenarios
        .iter()
        .map(|s| match s {
            Scenario::Perf(k) => k.name(),
            Scenario::Failure(k) => k.name(),
            Scenario::Scale => "scale",
            Scenario::Tracing => "tracing",
        })
        .collect();
    let mut markdown = format!(
        "Command: `meshlb bench --scenarios {} --duration {} --warmup {} --concurrency {} --rounds {}{}{}` ({} build); \
         closed loop, GetPoint; every figure is the median of {} rounds.\n\n",
        scenarios.join(","),
        humantime::format_duration(config.duration),
        humantime::format_duration(config.warmup),
        config.concurrency,
        config.rounds,
        if config.tls.is_some() { " --tls" } else { "" },
        data_flag,
        if cfg!(debug_assertions) { "debug" } else { "release" },
        config.rounds,
    );
    for scenario in &results {
        print!("{}", scenario.table());
        markdown.push_str(&scenario.markdown());
    }
    let mut failure_results = Vec::new();
    for scenario in &args.scenarios {
        if let Scenario::Failure(kind) = scenario {
            let result = failures::run(*kind, &config, &launch, &|what| {
                eprintln!("measuring {what}")
            })
            .await?;
            print!("{}", result.table());
            markdown.push_str(&result.markdown());
            failure_results.push(result);
        }
    }
    let mut scale = None;
    if args.scenarios.iter().any(|s| matches!(s, Scenario::Scale)) {
        let result =
            crate::bench::scale::run(&config, &launch, &|what| eprintln!("measuring {what}"))
                .await?;
        print!("{}", result.table());
        markdown.push_str(&result.markdown());
        scale = Some(result);
    }
    let mut tracing = None;
    if args
        .scenarios
        .iter()
        .any(|s| matches!(s, Scenario::Tracing))
    {
        let result =
            crate::bench::tracing::run(&config, &launch, &|what| eprintln!("measuring {what}"))
                .await?;
        print!("{}", result.table());
        markdown.push_str(&result.markdown());
        tracing = Some(result);
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "scenarios": results,
            "failures": failure_results,
            "scale": scale,
            "tracing": tracing,
        }))?,
    )?;
    std::fs::write(args.out.join("bench.md"), markdown)?;
    println!(
        "\nwrote {} and {}",
        args.out.join("bench.json").display(),
        args.out.join("bench.md").display()
    );
    Ok(ExitCode::SUCCESS)
}
