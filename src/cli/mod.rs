//! The `meshlb` commands. Each subcommand is a module holding its clap arguments and a `run`
//! that calls into the library; nothing here implements balancing or serving itself.

mod bench;
mod call;
mod certs;
mod client;
mod demo;
mod faults;
mod replica;
mod up;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Client-side load balancing for gRPC, shown as a small service mesh.
#[derive(Debug, Parser)]
#[command(name = "meshlb", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local fleet, p2c vs round-robin, side by side: the one-command demo.
    Demo(demo::Args),
    /// Run one replica of the UserGuide service (gRPC + REST on one port).
    Replica(Box<replica::Args>),
    /// Start a local fleet of replicas until Ctrl-C.
    Up(up::Args),
    /// Drive load through the balancer and show the per-replica distribution.
    Client(client::Args),
    /// Make one balanced call and show which replica served it.
    Call(call::Args),
    /// Read or change a running replica's latency, failure rate or reported health (admin listener).
    Faults(faults::Args),
    /// Make throw-away TLS certificates (CA, server, client) for demos and tests.
    Certs(certs::Args),
    /// Compare meshlb p2c, round-robin, tonic balance_list and a direct channel, scenario by scenario.
    Bench(bench::Args),
}

/// A duration flag that must be more than zero (`0s` would make every call or run end at once).
pub(crate) fn positive_duration(value: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if d.is_zero() => Err("must be more than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A failure the user caused (bad flag, target or file): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the arguments, runs the command, and maps the outcome to an exit code:
/// 0 success, 1 failure, 2 bad usage.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One clear line, not clap's usage block: scripts and people read the first line.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("error: bad usage");
            eprintln!("{first} (see meshlb --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let service = match cli.command {
        Command::Replica(_) => "meshlb-replica",
        Command::Up(_) => "meshlb-up",
        _ => "meshlb-client",
    };
    let (result, telemetry) = runtime.block_on(async {
        let telemetry = crate::telemetry::init(service);
        let result = match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Replica(args) => replica::run(*args).await,
            Command::Up(args) => up::run(args).await,
            Command::Client(args) => client::run(args).await,
            Command::Call(args) => call::run(args).await,
            Command::Faults(args) => faults::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Certs(args) => certs::run(args).await,
        };
        (result, telemetry)
    });
    // Flush spans while the runtime (which carries the exporter's connection) is still up.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Resolves when the process gets SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives early is not lost (the
/// default SIGTERM action would kill the process without draining).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
