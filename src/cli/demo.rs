//! `meshlb demo`: the main job in one command. Starts the default fleet (one replica slow), runs
//! the same load with p2c over peak-EWMA and with round-robin, prints both side by side with a
//! one-line conclusion, and drains the fleet.

use super::client::{balancer, drive};
use super::up::{launch, load_spec};
use crate::fleet::RunningFleet;
use crate::load::{CallKind, LoadSpec, Stop};
use crate::report::{ms, side_by_side, Report};
use crate::Policy;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet description (default: the built-in one, as in replicas/fleet.toml).
    #[arg(long, env = "MESHLB_FLEET")]
    fleet: Option<PathBuf>,
    /// The data file every replica loads (default: the built-in data, as in replicas/users.json).
    #[arg(long, env = "MESHLB_DATA")]
    data: Option<PathBuf>,
    /// How long each policy runs.
    #[arg(long, env = "MESHLB_DURATION", value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Calls in flight at once.
    #[arg(long, env = "MESHLB_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10000))]
    concurrency: u32,
    #[command(flatten)]
    service_config: super::client::ServiceConfigArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Free ports, so the demo runs on a machine where 50051 is taken.
    let spec = load_spec(args.fleet.as_deref(), None, Some(0))?;
    let mut launch = launch(args.data)?;
    if std::env::var_os("RUST_LOG").is_none() {
        launch.log = "warn".into();
    }
    println!(
        "starting {} replicas from {}",
        spec.members.len(),
        args.fleet
            .as_ref()
            .map_or("the built-in fleet".into(), |p| p.display().to_string())
    );
    let fleet = RunningFleet::start(&spec, &launch).await?;
    for m in &fleet.members {
        println!(
            "  {:<10} {:<22} latency {}",
            m.id,
            m.addr.to_string(),
            humantime::format_duration(m.faults.latency)
        );
    }
    // The client talks to the entry tier only; a slow replica behind it (two tiers) is the front
    // replicas' balancers' business.
    let entry = fleet.tiers().first().cloned().unwrap_or_default();
    let slow = fleet
        .members
        .iter()
        .filter(|m| m.tier == entry)
        .max_by_key(|m| m.faults.latency)
        .filter(|m| !m.faults.latency.is_zero())
        .map(|m| m.id.clone());

    let target = fleet.target();
    let load = LoadSpec {
        stop: Stop::Duration(args.duration),
        concurrency: args.concurrency as usize,
        rate: None,
        call: CallKind::GetPoint.into(),
    };
    let mut reports = Vec::new();
    for policy in [Policy::P2c, Policy::RoundRobin] {
        println!(
            "\nrunning {policy} for {} at {} calls in flight...",
            humantime::format_duration(args.duration),
            args.concurrency
        );
        let lb = balancer(
            &target,
            Some(policy),
            Duration::from_secs(10),
            crate::proto::USERGUIDE_SERVICE,
            &Default::default(),
            None,
            &args.service_config,
        )?;
        lb.wait_ready(Duration::from_secs(5)).await;
        let report = drive(&lb, &load, false, true).await;
        print!("{}", report.table());
        reports.push(report);
    }
    println!();
    print!("{}", side_by_side(&reports[0], &reports[1]));
    println!(
        "\n{}",
        conclusion(&reports[0], &reports[1], slow.as_deref())
    );

    let statuses = fleet.drain(Duration::from_secs(15)).await;
    let clean = statuses.iter().all(|(_, s)| s.is_some_and(|s| s.success()));
    println!(
        "fleet drained{}",
        if clean {
            ""
        } else {
            " (some replicas did not exit cleanly)"
        }
    );
    let failed = reports.iter().any(|r| r.ok != r.calls);
    Ok(if failed || !clean {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn conclusion(p2c: &Report, rr: &Report, slow: Option<&str>) -> String {
    let mut line = format!(
        "conclusion: p2c p99 {} vs round-robin p99 {}",
        ms(p2c.latency_ms.p99),
        ms(rr.latency_ms.p99)
    );
    if let Some(slow) = slow {
        line.push_str(&format!(
            "; the slow replica {slow} got {:.1}% of calls with p2c and {:.1}% with round-robin",
            p2c.share(slow) * 100.0,
            rr.share(slow) * 100.0
        ));
    }
    if p2c.latency_ms.p99 > 0.0 {
        line.push_str(&format!(
            "; round-robin's p99 is {:.1}x p2c's, and p2c makes {:.1}x the calls/s",
            rr.latency_ms.p99 / p2c.latency_ms.p99,
            p2c.rps / rr.rps.max(1e-9)
        ));
    }
    line
}
