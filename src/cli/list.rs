//! `meshlb list` and `meshlb describe`: the services and methods a server offers (by server
//! reflection, or from --proto / --protoset files), as grpcurl shows them.

use super::call::OneShot;
use super::client::{balancer, ServiceConfigSource};
use super::method::{usage, SchemaArgs};
use crate::dynamic::schema::{Schema, Source};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    at: OneShot,
    #[command(flatten)]
    schema: SchemaArgs,
    /// A header (gRPC metadata) to send with the reflection call, `key: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// `list`: a service, to list its methods. `describe`: a service, method, message or enum.
    symbol: Option<String>,
}

/// Lists services, or a service's methods.
pub async fn list(args: Args) -> anyhow::Result<ExitCode> {
    // Names alone need no descriptors; a service's methods need only its own files.
    let only = Some(args.symbol.as_slice());
    let schema = load(&args, only).await?;
    match &args.symbol {
        None => {
            for name in schema.service_names() {
                println!("{name}");
            }
        }
        Some(service) => {
            let service = schema.service(service).map_err(usage)?;
            for m in service.methods() {
                println!("{}/{}", service.full_name(), m.name());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes out a symbol (every service when none is given) as a .proto file would.
pub async fn describe(args: Args) -> anyhow::Result<ExitCode> {
    let schema = load(&args, None).await?;
    let symbols: Vec<String> = match &args.symbol {
        Some(s) => vec![s.clone()],
        None => schema.service_names().to_vec(),
    };
    for symbol in symbols {
        println!("{}", schema.describe(&symbol).map_err(usage)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The schema; by reflection, of the `services` named (all of them when `None`; for `describe`
/// of one symbol, the files that define it).
async fn load(args: &Args, services: Option<&[String]>) -> anyhow::Result<Schema> {
    let metadata = crate::dynamic::invoke::metadata(&args.headers)
        .map_err(|e| super::UsageError(e.to_string()))?;
    // Reflection is asked of any endpoint that answers the server's own health (""); any one
    // will do.
    let lb = balancer(
        &args.at.target,
        None,
        args.at.timeout,
        "",
        &args.at.tls,
        None,
        &ServiceConfigSource(None),
    )?;
    let source = args.schema.source();
    if !matches!(source, Source::Reflection) {
        // A file needs no server.
        return Schema::load(&source, lb, None, &metadata)
            .await
            .map_err(usage);
    }
    let names: Option<Vec<&str>> = services.map(|s| s.iter().map(String::as_str).collect());
    let work = async {
        lb.wait_ready(args.at.timeout).await;
        let schema = match (&names, &args.symbol) {
            // describe SYMBOL: whatever defines it, used by a service or not.
            (None, Some(symbol)) => Schema::for_symbol(lb.clone(), symbol, &metadata).await,
            _ => Schema::from_reflection(lb.clone(), names.as_deref(), &metadata).await,
        };
        schema.map_err(usage)
    };
    tokio::time::timeout(args.at.timeout, work)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from {} within {:?}",
                args.at.target,
                args.at.timeout
            )
        })?
}
