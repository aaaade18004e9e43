//! `meshlb list` and `meshlb describe`: the services and methods a server offers (by server
//! reflection, or from --proto / --protoset files), as grpcurl shows them.

use super::client::{balancer, ServiceConfigArgs, ServiceConfigSource, TlsArgs};
use super::method::{usage, SchemaArgs};
use crate::dynamic::schema::{Schema, Source};
use std::process::ExitCode;

/// Where the server is; not needed when a file gives the schema.
#[derive(Debug, clap::Args)]
pub struct At {
    /// Where the replicas are (same syntax as `client --target`); not needed with --proto or
    /// --protoset.
    #[arg(long, env = "MESHLB_TARGET", required_unless_present_any = ["proto", "protoset"])]
    pub target: Option<String>,
    /// Deadline of the whole command (waiting for a ready endpoint included).
    #[arg(long, env = "MESHLB_TIMEOUT", value_parser = super::positive_duration, default_value = "5s")]
    pub timeout: std::time::Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    at: At,
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
    // A file needs no server (nor a target).
    match args.schema.source() {
        Source::Reflection => {}
        Source::Proto { files, imports } => {
            return Schema::from_proto(&files, &imports).map_err(usage)
        }
        Source::Protoset(path) => return Schema::from_protoset(&path).map_err(usage),
    }
    let target = args.at.target.as_deref().ok_or_else(|| {
        super::UsageError("--target is needed without --proto or --protoset".into())
    })?;
    // Reflection is asked of any endpoint that answers the server's own health (""); any one
    // will do.
    let lb = balancer(
        target,
        None,
        args.at.timeout,
        "",
        &args.at.tls,
        None,
        &ServiceConfigArgs {
            service_config: ServiceConfigSource(None),
            dns_service_config: false,
            subset: None,
            aperture: None,
            coordinate: None,
            probe: None,
        },
    )?;
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
        .map_err(|_| anyhow::anyhow!("no answer from {target} within {:?}", args.at.timeout))?
}
