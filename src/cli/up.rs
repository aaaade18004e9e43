//! `meshlb up`: a local fleet of replicas, until Ctrl-C.

use super::UsageError;
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet description.
    #[arg(long, env = "MESHLB_FLEET", default_value = "replicas/fleet.toml")]
    fleet: PathBuf,
    /// How many replicas (more than the file lists get no faults; fewer drops the last ones).
    #[arg(long, env = "MESHLB_REPLICAS", value_parser = clap::value_parser!(u16).range(1..=200))]
    replicas: Option<u16>,
    /// First port (replica i gets base+i); 0 gives each a free port.
    #[arg(long, env = "MESHLB_BASE_PORT")]
    base_port: Option<u16>,
    /// The data file every replica loads.
    #[arg(long, env = "MESHLB_DATA", default_value = "replicas/users.json")]
    data: PathBuf,
    /// Serve TLS with throw-away certificates (written to a temporary directory).
    #[arg(long, env = "MESHLB_TLS")]
    tls: bool,
    /// With --tls: also require client certificates (mTLS).
    #[arg(long, env = "MESHLB_MTLS", requires = "tls")]
    mtls: bool,
}

/// Reads the fleet file and applies the overrides; problems are usage errors.
pub fn load_spec(
    path: &std::path::Path,
    replicas: Option<u16>,
    base_port: Option<u16>,
) -> anyhow::Result<FleetSpec> {
    let mut spec = FleetSpec::load(path).map_err(|e| UsageError(e.to_string()))?;
    if let Some(n) = replicas {
        spec = spec.with_replicas(n as usize);
    }
    if let Some(port) = base_port {
        spec = spec.with_base_port(port);
    }
    if spec.members.is_empty() {
        return Err(UsageError(format!("{}: the fleet has no replicas", path.display())).into());
    }
    Ok(spec)
}

/// How to start replicas, checking the data file first so its absence is one clear line.
pub fn launch(data: PathBuf) -> anyhow::Result<Launch> {
    crate::replica::Users::load(&data).map_err(|e| UsageError(e.to_string()))?;
    let mut launch = Launch::this_binary()?;
    launch.data = data;
    if std::env::var_os("RUST_LOG").is_none() {
        launch.log = "info".into();
    }
    Ok(launch)
}

/// Makes throw-away certificates for a local fleet and sets `launch` to serve TLS (mTLS with
/// `mtls`) and to check readiness over it. Returns the client's TLS settings and the matching
/// client flags.
pub fn with_tls(
    launch: &mut Launch,
    purpose: &str,
    mtls: bool,
) -> anyhow::Result<(crate::tls::ClientTls, String)> {
    let dir = std::env::temp_dir().join(format!("meshlb-{purpose}-certs-{}", std::process::id()));
    let paths = crate::tls::write_certs(&dir, &super::certs::default_names())?;
    launch.extra_args = vec![
        "--tls-cert".into(),
        paths.server_cert.display().to_string(),
        "--tls-key".into(),
        paths.server_key.display().to_string(),
    ];
    let mut client = crate::tls::ClientTls {
        ca: paths.ca.clone(),
        identity: None,
        server_name: None,
    };
    let mut flags = format!(" --tls-ca {}", paths.ca.display());
    if mtls {
        launch.extra_args.push("--tls-client-ca".into());
        launch.extra_args.push(paths.ca.display().to_string());
        client.identity = Some((paths.client_cert.clone(), paths.client_key.clone()));
        flags.push_str(&format!(
            " --tls-cert {} --tls-key {}",
            paths.client_cert.display(),
            paths.client_key.display()
        ));
    }
    launch.client_tls = Some(client.config()?);
    Ok((client, flags))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spec = load_spec(&args.fleet, args.replicas, args.base_port)?;
    let mut launch = launch(args.data)?;
    let client_flags = if args.tls {
        let (_, flags) = with_tls(&mut launch, "up", args.mtls)?;
        flags
    } else {
        String::new()
    };
    let shutdown = super::shutdown_signal();
    let mut fleet = RunningFleet::start(&spec, &launch).await?;
    for m in &fleet.members {
        let upstream = m
            .upstream
            .as_ref()
            .map(|t| format!(" upstream={t}"))
            .unwrap_or_default();
        println!(
            "{:<10} {:<22} SERVING  tier={} latency={} jitter={} fail-rate={}{upstream}",
            m.id,
            m.addr.to_string(),
            m.tier,
            humantime::format_duration(m.faults.latency),
            humantime::format_duration(m.faults.jitter),
            m.faults.fail_rate
        );
    }
    let tiers = fleet.tiers();
    if tiers.len() > 1 {
        for tier in &tiers {
            println!("tier {tier}: {}", fleet.tier_target(tier));
        }
    }
    println!("target: {}", fleet.target());
    println!(
        "try:    meshlb client --target {} --watch --duration 60s{client_flags}",
        fleet.target()
    );
    std::io::stdout().flush()?;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            (id, status) = fleet.next_exit() => {
                // Reported, not restarted: a person watching the demo should see the failure.
                eprintln!("replica {id} exited ({status}); not restarting it");
            }
        }
    }
    eprintln!("draining {} replicas", fleet.members.len());
    for (id, status) in fleet.drain(Duration::from_secs(15)).await {
        match status {
            Some(s) if s.success() => {}
            Some(s) => eprintln!("replica {id} ended with {s}"),
            None => eprintln!("replica {id} did not drain in time and was killed"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
