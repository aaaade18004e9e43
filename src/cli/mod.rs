//! The `meshlb` commands. Each subcommand is a module holding its clap arguments and a `run`
//! that calls into the library; nothing here implements balancing or serving itself.

mod bench;
mod call;
mod certs;
mod client;
mod demo;
mod faults;
mod list;
mod method;
mod replica;
mod up;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Client-side load balancing for gRPC, shown as a small service mesh.
#[derive(Debug, Parser)]
#[command(
    name = "meshlb",
    version,
    about,
    arg_required_else_help = true,
    after_help = "Logs: the tools print warnings only, a replica logs at info; RUST_LOG=info (or debug) shows more."
)]
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
    /// List a server's services (or a service's methods), by server reflection or from .proto files.
    List(list::Args),
    /// Show a service, method, message or enum as its .proto declares it.
    Describe(list::Args),
    /// Read or change a running replica's latency, failure rate or reported health (admin listener).
    Faults(faults::Args),
    /// Make throw-away TLS certificates (CA, server, client) for demos and tests.
    Certs(certs::Args),
    /// Compare meshlb's policies with tonic's balance_list, a hand-rolled tower p2c and a direct channel, scenario by scenario.
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

/// The command whose help a usage error points to: `meshlb SUBCOMMAND` when the arguments name
/// one, else `meshlb`.
fn help_for(args: impl Iterator<Item = String>) -> String {
    use clap::CommandFactory;
    let cli = Cli::command();
    let names: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
    args.take_while(|a| !a.starts_with('-'))
        .find(|a| names.contains(&a.as_str()))
        .map_or_else(|| "meshlb".to_owned(), |name| format!("meshlb {name}"))
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
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Bare `meshlb` (or a bare subcommand group): the help is the answer.
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) if e.use_stderr() => {
            eprintln!(
                "{} (see {} --help)",
                one_line(&e.render().to_string()),
                help_for(std::env::args().skip(1))
            );
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
        // A server logs what it does; the tools log only what goes wrong, so their own output
        // (tables, the live view, progress bars) stays readable. RUST_LOG=info shows more.
        // The exporter's own errors are left out of the tools' output: they say once, in their
        // own words, when spans did not reach the collector.
        let level = if service == "meshlb-replica" {
            "info"
        } else {
            "warn,opentelemetry_sdk=off"
        };
        let telemetry = crate::telemetry::init(service, level);
        let result = match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Replica(args) => replica::run(*args).await,
            Command::Up(args) => up::run(args).await,
            Command::Client(args) => client::run(args).await,
            Command::Call(args) => call::run(args).await,
            Command::List(args) => list::list(args).await,
            Command::Describe(args) => list::describe(args).await,
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

/// clap's error in one line: what is wrong, with the names it lists and its tip, without the usage
/// block. Scripts and people read the first line, and it must name the problem.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.to_owned());
        }
    }
    match parts.split_first() {
        Some((head, [])) => head.clone(),
        Some((head, rest)) => format!("{head} {}", rest.join("; ")),
        None => "error: bad usage".into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn error_line(args: &[&str]) -> String {
        let err = Cli::try_parse_from(args).unwrap_err();
        one_line(&err.render().to_string())
    }

    #[test]
    fn usage_errors_keep_the_names_and_the_tip_in_one_line() {
        let missing = error_line(&["meshlb", "client"]);
        assert!(missing.starts_with("error:"), "{missing}");
        assert!(missing.contains("--target"), "{missing}");
        assert!(!missing.contains('\n'));
        let typo = error_line(&["meshlb", "clinet"]);
        assert!(typo.contains("'client'"), "{typo}");
        assert!(!typo.contains("Usage"), "{typo}");
    }
}
