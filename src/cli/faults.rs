//! `meshlb faults`: change a running replica's latency or failure rate, to watch traffic move.

use crate::replica::FaultConfig;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The replica's address.
    #[arg(long)]
    addr: SocketAddr,
    /// Latency added to every call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Up to this much more latency, at random.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    jitter: Duration,
    /// Share of calls answered with UNAVAILABLE.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let faults = FaultConfig {
        latency: args.latency,
        jitter: args.jitter,
        fail_rate: args.fail_rate,
    };
    faults.validate().map_err(super::UsageError)?;
    crate::fleet::set_faults(args.addr, faults)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", args.addr, s.message()))?;
    println!(
        "{}: latency={} jitter={} fail-rate={}",
        args.addr,
        humantime::format_duration(faults.latency),
        humantime::format_duration(faults.jitter),
        faults.fail_rate
    );
    Ok(ExitCode::SUCCESS)
}
