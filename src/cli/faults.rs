//! `meshlb faults`: read or change a running replica's latency, failure rate and reported health
//! through its admin listener, to watch traffic move. Knobs not named keep their values.

use super::client::TlsArgs;
use super::UsageError;
use crate::admin_client::AdminAddr;
use crate::replica::FaultConfig;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The replica's admin address (`admin on ADDR`, its second output line; `meshlb up` lists them).
    #[arg(long, env = "MESHLB_ADMIN_ADDR")]
    addr: SocketAddr,
    /// Latency added to every call, e.g. `50ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    latency: Option<Duration>,
    /// Up to this much more latency, at random.
    #[arg(long, value_parser = humantime::parse_duration)]
    jitter: Option<Duration>,
    /// Share of calls answered with UNAVAILABLE, between 0 and 1.
    #[arg(long)]
    fail_rate: Option<f64>,
    /// Report SERVING over grpc.health.v1.
    #[arg(long, conflicts_with = "not_serving")]
    serving: bool,
    /// Report NOT_SERVING (calls are still answered; balancers move away).
    #[arg(long)]
    not_serving: bool,
    /// TLS towards the admin listener (under mTLS, with a certificate --admin-allow names).
    #[command(flatten)]
    tls: TlsArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tls = match args.tls.client_tls() {
        Some(tls) => Some(tls.config().map_err(|e| UsageError(e.to_string()))?),
        None => None,
    };
    let admin = AdminAddr {
        addr: args.addr,
        tls,
    };
    let fail = |s: tonic::Status| {
        let hint = if s.code() == tonic::Code::Unimplemented {
            " (no admin service there: --addr takes the replica's admin address, its `admin on` line, not its serving port)"
        } else {
            ""
        };
        // tonic's "transport error" alone says nothing; the TLS or connection error under it does.
        let message =
            crate::health::with_causes(s.message().to_owned(), std::error::Error::source(&s));
        anyhow::anyhow!(
            "{}: {} {message}{hint}",
            args.addr,
            crate::grpc::code_name(s.code()),
        )
    };
    let mut state = admin.state().await.map_err(fail)?;
    let faults = &mut state.faults;
    let changes = args.latency.is_some() || args.jitter.is_some() || args.fail_rate.is_some();
    if changes {
        let wanted = FaultConfig {
            latency: args.latency.unwrap_or(faults.latency),
            jitter: args.jitter.unwrap_or(faults.jitter),
            fail_rate: args.fail_rate.unwrap_or(faults.fail_rate),
        };
        wanted.validate().map_err(UsageError)?;
        admin.set_faults(wanted).await.map_err(fail)?;
        *faults = wanted;
    }
    if args.serving || args.not_serving {
        admin.set_serving(args.serving).await.map_err(fail)?;
        state.serving = args.serving;
    }
    println!(
        "{}: latency={} jitter={} fail-rate={} {}",
        args.addr,
        humantime::format_duration(state.faults.latency),
        humantime::format_duration(state.faults.jitter),
        state.faults.fail_rate,
        state.health_word()
    );
    Ok(ExitCode::SUCCESS)
}
