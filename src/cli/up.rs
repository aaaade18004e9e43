//! `meshlb up`: a local fleet of replicas, until Ctrl-C.

use super::UsageError;
use crate::fleet::{FleetSpec, Launch, RunningFleet};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet description (default: the built-in one, as in replicas/fleet.toml).
    #[arg(long, env = "MESHLB_FLEET")]
    fleet: Option<PathBuf>,
    /// How many replicas (more than the file lists get no faults; fewer drops the last ones).
    #[arg(long, env = "MESHLB_REPLICAS", value_parser = clap::value_parser!(u16).range(1..=200))]
    replicas: Option<u16>,
    /// First port (replica i gets base+i); 0 gives each a free port.
    #[arg(long, env = "MESHLB_BASE_PORT")]
    base_port: Option<u16>,
    /// The data file every replica loads (default: the built-in data, as in replicas/users.json).
    #[arg(long, env = "MESHLB_DATA")]
    data: Option<PathBuf>,
    /// Serve TLS: with the certificates of --certs, or throw-away ones in a temporary directory
    /// (removed at exit).
    #[arg(long, env = "MESHLB_TLS")]
    tls: bool,
    /// With --tls: the certificates to use, as `meshlb certs --out DIR` writes them.
    #[arg(long, env = "MESHLB_CERTS", requires = "tls")]
    certs: Option<PathBuf>,
    /// Chaos: one fault at a time (kill and restart, freeze, slow, NOT_SERVING and, as root on
    /// Linux, a blackholed network), each printed as it happens.
    #[arg(long, env = "MESHLB_CHAOS")]
    chaos: bool,
    /// With --chaos: the mean pause between faults.
    #[arg(long, env = "MESHLB_CHAOS_EVERY", value_parser = super::positive_duration, default_value = "5s", requires = "chaos")]
    chaos_every: Duration,
    /// With --chaos: how long each fault lasts.
    #[arg(long, env = "MESHLB_CHAOS_LENGTH", value_parser = super::positive_duration, default_value = "2s", requires = "chaos")]
    chaos_length: Duration,
    /// With --chaos: the seed (the same seed gives the same faults in the same order).
    #[arg(
        long,
        env = "MESHLB_CHAOS_SEED",
        default_value_t = 1,
        requires = "chaos"
    )]
    chaos_seed: u64,
    /// With --tls: also require client certificates (mTLS).
    #[arg(long, env = "MESHLB_MTLS", requires = "tls")]
    mtls: bool,
}

/// Reads the fleet file and applies the overrides; problems are usage errors.
pub fn load_spec(
    path: Option<&std::path::Path>,
    replicas: Option<u16>,
    base_port: Option<u16>,
) -> anyhow::Result<FleetSpec> {
    let mut spec = match path {
        Some(path) => FleetSpec::load(path).map_err(|e| UsageError(e.to_string()))?,
        None => FleetSpec::builtin(),
    };
    if let Some(n) = replicas {
        spec = spec.with_replicas(n as usize);
    }
    if let Some(port) = base_port {
        spec = spec.with_base_port(port);
    }
    if spec.members.is_empty() {
        let name = path.map_or("the built-in fleet".into(), |p| p.display().to_string());
        return Err(UsageError(format!("{name}: the fleet has no replicas")).into());
    }
    Ok(spec)
}

/// How to start replicas, checking the data file first so its absence is one clear line.
pub fn launch(data: Option<PathBuf>) -> anyhow::Result<Launch> {
    if let Some(data) = &data {
        crate::replica::Users::load(data).map_err(|e| UsageError(e.to_string()))?;
    }
    let mut launch = Launch::this_binary()?;
    launch.data = data;
    if std::env::var_os("RUST_LOG").is_none() {
        launch.log = "info".into();
    }
    Ok(launch)
}

/// Certificates for a local fleet: the files in `dir`, or throw-away ones in a temporary directory
/// that is removed when the returned guard is dropped.
pub fn fleet_certs(
    dir: Option<&std::path::Path>,
    purpose: &str,
) -> anyhow::Result<(crate::tls::CertPaths, Option<TempDir>)> {
    match dir {
        Some(dir) => {
            let paths = crate::tls::CertPaths::in_dir(dir);
            for file in [&paths.ca, &paths.server_cert, &paths.server_key] {
                if !file.is_file() {
                    return Err(UsageError(format!(
                        "--certs {}: no {} (make them with `meshlb certs --out {}`)",
                        dir.display(),
                        file.display(),
                        dir.display()
                    ))
                    .into());
                }
            }
            Ok((paths, None))
        }
        None => {
            let dir =
                std::env::temp_dir().join(format!("meshlb-{purpose}-certs-{}", std::process::id()));
            let paths = crate::tls::write_certs(&dir, &super::certs::default_names())?;
            Ok((paths, Some(TempDir(dir))))
        }
    }
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets `launch` to serve TLS with `paths` (mTLS with `mtls`, the admin listener then allowing only
/// the admin certificate) and to check readiness and drive faults over it. Returns the client's
/// TLS settings and the matching client flags.
pub fn with_tls(
    launch: &mut Launch,
    paths: &crate::tls::CertPaths,
    mtls: bool,
) -> anyhow::Result<(crate::tls::ClientTls, String)> {
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
    let mut admin = client.clone();
    let mut flags = format!(" --tls-ca {}", paths.ca.display());
    if mtls {
        launch.extra_args.extend([
            "--tls-client-ca".into(),
            paths.ca.display().to_string(),
            "--admin-allow".into(),
            crate::tls::ADMIN_IDENTITY.into(),
        ]);
        client.identity = Some((paths.client_cert.clone(), paths.client_key.clone()));
        admin.identity = Some((paths.admin_cert.clone(), paths.admin_key.clone()));
        flags.push_str(&format!(
            " --tls-cert {} --tls-key {}",
            paths.client_cert.display(),
            paths.client_key.display()
        ));
    }
    launch.client_tls = Some(client.config().map_err(|e| UsageError(e.to_string()))?);
    launch.admin_tls = Some(admin.config().map_err(|e| UsageError(e.to_string()))?);
    Ok((client, flags))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut spec = load_spec(args.fleet.as_deref(), args.replicas, args.base_port)?;
    if args.chaos && !args.tls && crate::netns::available() {
        // One replica in a network namespace of its own, so that chaos can blackhole it. (Not
        // under TLS: the certificates name 127.0.0.x, not the namespace's address.)
        if let Some(last) = spec.members.iter_mut().rev().find(|m| m.upstream.is_none()) {
            last.isolated = true;
        }
    }
    let mut launch = launch(args.data)?;
    let mut _temp_certs = None;
    let client_flags = if args.tls {
        let (paths, temp) = fleet_certs(args.certs.as_deref(), "up")?;
        _temp_certs = temp;
        let (_, flags) = with_tls(&mut launch, &paths, args.mtls)?;
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
            "{:<10} {:<22} SERVING  pid={} admin={} metrics={} tier={} latency={} jitter={} fail-rate={}{upstream}",
            m.id,
            m.addr.to_string(),
            m.pid().map_or("?".into(), |p| p.to_string()),
            m.admin.addr,
            m.metrics,
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

    if args.chaos {
        let config = crate::chaos::ChaosConfig {
            every: args.chaos_every,
            length: args.chaos_length,
            seed: args.chaos_seed,
            ..Default::default()
        };
        let say = |line: String| {
            println!("{line}");
            let _ = std::io::stdout().flush();
        };
        crate::chaos::run(&mut fleet, &launch, config, say, shutdown).await?;
        return drain(fleet).await;
    }
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
    drain(fleet).await
}

async fn drain(fleet: RunningFleet) -> anyhow::Result<ExitCode> {
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
