//! A local fleet: replicas as child processes of this binary (`meshlb replica`), described by
//! `replicas/fleet.toml`, started, waited for until `SERVING`, watched, and drained together.
//! Used by `meshlb up`, `meshlb demo` and `meshlb bench`. Knows nothing of balancing.

use crate::admin_client::AdminAddr;
use crate::replica::FaultConfig;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

/// Why a fleet could not be described or started.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The fleet file could not be read.
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The fleet file is not valid.
    #[error("malformed fleet file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// A replica could not be started or did not become ready.
    #[error("replica {id}: {message}")]
    Replica {
        /// Its id.
        id: String,
        /// What went wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    fleet: FleetSection,
    #[serde(default)]
    replica: Vec<ReplicaEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetSection {
    #[serde(default = "default_host")]
    host: IpAddr,
    #[serde(default = "default_port")]
    base_port: u16,
}

impl Default for FleetSection {
    fn default() -> Self {
        Self {
            host: default_host(),
            base_port: default_port(),
        }
    }
}

fn default_host() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

const DEFAULT_TIER: &str = "users";

fn default_port() -> u16 {
    50051
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaEntry {
    id: Option<String>,
    tier: Option<String>,
    upstream: Option<String>,
    listen: Option<SocketAddr>,
    latency: Option<String>,
    jitter: Option<String>,
    fail_rate: Option<f64>,
    isolated: Option<bool>,
}

/// One replica of a fleet, before it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its id (`x-replica-id`).
    pub id: String,
    /// The tier it belongs to (default `users`).
    pub tier: String,
    /// The tier it asks for GetPoint (`--upstream`), if it is a front tier.
    pub upstream: Option<String>,
    /// Where it listens (port 0: any free port).
    pub listen: SocketAddr,
    /// Its fault knobs.
    pub faults: FaultConfig,
    /// Run it in a network namespace of its own (Linux, root), so that its network can be cut:
    /// it then listens on the namespace's address, on `listen`'s port.
    pub isolated: bool,
}

/// A fleet description.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    /// The replicas, in order.
    pub members: Vec<Member>,
    host: IpAddr,
    base_port: u16,
}

impl FleetSpec {
    /// Reads a fleet file.
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| FleetError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// The fleet built into the binary (`replicas/fleet.toml`: three replicas, the third 40 ms
    /// slower), used when no `--fleet` file is given.
    pub fn builtin() -> Self {
        Self::parse(include_str!("../replicas/fleet.toml"))
            .expect("the built-in fleet is checked by a unit test")
    }

    /// Parses the text of a fleet file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FleetFile = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        let mut spec = Self {
            members: Vec::new(),
            host: file.fleet.host,
            base_port: file.fleet.base_port,
        };
        for (i, entry) in file.replica.into_iter().enumerate() {
            let duration = |field: &str, v: Option<String>| -> Result<Duration, String> {
                v.map_or(Ok(Duration::ZERO), |s| {
                    humantime::parse_duration(&s)
                        .map_err(|e| format!("replica {}: {field} {s:?}: {e}", i + 1))
                })
            };
            let faults = FaultConfig {
                latency: duration("latency", entry.latency)?,
                jitter: duration("jitter", entry.jitter)?,
                fail_rate: entry.fail_rate.unwrap_or(0.0),
            };
            faults
                .validate()
                .map_err(|e| format!("replica {}: {e}", i + 1))?;
            spec.members.push(Member {
                id: entry.id.unwrap_or_else(|| format!("users-{}", i + 1)),
                tier: entry.tier.unwrap_or_else(|| DEFAULT_TIER.to_owned()),
                upstream: entry.upstream,
                listen: entry.listen.unwrap_or_else(|| spec.slot(i)),
                faults,
                isolated: entry.isolated.unwrap_or(false),
            });
        }
        for m in &spec.members {
            if let Some(up) = &m.upstream {
                if up == &m.tier
                    || !spec
                        .members
                        .iter()
                        .any(|o| &o.tier == up && o.upstream.is_none())
                {
                    return Err(format!(
                        "replica {}: upstream tier {up:?} must be another tier, of replicas without an upstream",
                        m.id
                    ));
                }
            }
        }
        Ok(spec)
    }

    /// A fleet of `n` replicas with these knobs, on free ports of `host`.
    pub fn uniform(host: IpAddr, faults: &[FaultConfig]) -> Self {
        let mut spec = Self {
            members: Vec::new(),
            host,
            base_port: 0,
        };
        for (i, f) in faults.iter().enumerate() {
            spec.members.push(Member {
                id: format!("users-{}", i + 1),
                tier: DEFAULT_TIER.to_owned(),
                upstream: None,
                listen: spec.slot(i),
                faults: *f,
                isolated: false,
            });
        }
        spec
    }

    fn slot(&self, i: usize) -> SocketAddr {
        let port = if self.base_port == 0 {
            0
        } else {
            self.base_port.saturating_add(i as u16)
        };
        SocketAddr::new(self.host, port)
    }

    /// Resizes to `n` replicas: extra ones have no faults, and the cut ones are dropped.
    pub fn with_replicas(mut self, n: usize) -> Self {
        self.members.truncate(n);
        while self.members.len() < n {
            let i = self.members.len();
            self.members.push(Member {
                id: format!("users-{}", i + 1),
                tier: DEFAULT_TIER.to_owned(),
                upstream: None,
                listen: self.slot(i),
                faults: FaultConfig::default(),
                isolated: false,
            });
        }
        self
    }

    /// Moves every replica to consecutive ports from `base_port` (0: free ports).
    pub fn with_base_port(mut self, base_port: u16) -> Self {
        self.base_port = base_port;
        for i in 0..self.members.len() {
            self.members[i].listen = self.slot(i);
        }
        self
    }
}

/// A started replica.
#[derive(Debug)]
pub struct Running {
    /// Its id.
    pub id: String,
    /// Its tier.
    pub tier: String,
    /// The tier it asks, if any.
    pub upstream: Option<String>,
    /// The address it bound.
    pub addr: SocketAddr,
    /// Its starting knobs.
    pub faults: FaultConfig,
    /// Its admin service.
    pub admin: AdminAddr,
    /// Where Prometheus scrapes it (`GET /metrics`).
    pub metrics: SocketAddr,
    /// What it was started from, to start it again.
    pub member: Member,
    child: Child,
    _stdout: BufReader<ChildStdout>,
    exited: Option<ExitStatus>,
    netns: Option<crate::netns::Netns>,
}

/// A started fleet. Dropping it kills whatever is still running; [`RunningFleet::drain`] stops
/// it gracefully.
#[derive(Debug)]
pub struct RunningFleet {
    /// The replicas, in order.
    pub members: Vec<Running>,
}

/// How to start replica processes.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `meshlb` binary.
    pub exe: PathBuf,
    /// The data file each replica loads (`None`: the data built into the binary).
    pub data: Option<PathBuf>,
    /// `RUST_LOG` for the replicas.
    pub log: String,
    /// How long each may take to print its address and say `SERVING`.
    pub ready_timeout: Duration,
    /// More flags for every replica (e.g. TLS).
    pub extra_args: Vec<String>,
    /// How to reach the replicas when they serve TLS.
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// How to reach their admin listeners when they serve TLS (with the admin identity under
    /// mTLS).
    pub admin_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Launch {
    /// This same binary, the built-in data, warnings only.
    pub fn this_binary() -> std::io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            data: None,
            log: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ready_timeout: Duration::from_secs(15),
            extra_args: Vec::new(),
            client_tls: None,
            admin_tls: None,
        })
    }
}

impl Running {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether it runs in a network namespace of its own (and so can be blackholed).
    pub fn is_isolated(&self) -> bool {
        self.netns.is_some()
    }

    /// Cuts (`true`) or restores its network, if it is isolated.
    pub fn blackhole(&self, cut: bool) -> Result<(), FleetError> {
        let Some(ns) = &self.netns else {
            return Err(FleetError::Replica {
                id: self.id.clone(),
                message: "not isolated in a network namespace".into(),
            });
        };
        let result = if cut { ns.cut() } else { ns.restore() };
        result.map_err(|e| FleetError::Replica {
            id: self.id.clone(),
            message: e.to_string(),
        })
    }

    /// Sends a signal to its process (SIGKILL, SIGSTOP, SIGCONT...).
    #[cfg(unix)]
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Whether its process has exited.
    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
            }
        }
        self.exited.is_some()
    }
}

impl RunningFleet {
    /// Starts replica `i` again on the address it had (after it was killed), and waits until it
    /// says `SERVING`.
    pub async fn restart(&mut self, i: usize, launch: &Launch) -> Result<(), FleetError> {
        let Some(old) = self.members.get_mut(i) else {
            return Ok(());
        };
        let _ = old.child.kill().await;
        let mut member = old.member.clone();
        member.listen = SocketAddr::new(member.listen.ip(), old.addr.port());
        let upstream = member
            .upstream
            .as_deref()
            .map(|tier| self.tier_target(tier));
        let netns = self.members[i].netns.take();
        let running = start_one(&member, upstream.as_deref(), launch, netns).await?;
        wait_serving(&running, launch).await?;
        self.members[i] = running;
        Ok(())
    }
}

impl RunningFleet {
    /// Starts every member and waits until each says `SERVING`.
    pub async fn start(spec: &FleetSpec, launch: &Launch) -> Result<Self, FleetError> {
        let mut fleet = RunningFleet {
            members: Vec::new(),
        };
        // Back tiers first, so a front tier's --upstream can name their addresses.
        let (back, front): (Vec<&Member>, Vec<&Member>) =
            spec.members.iter().partition(|m| m.upstream.is_none());
        for member in back {
            let netns = isolate(member, fleet.members.len())?;
            let running = start_one(member, None, launch, netns).await?;
            fleet.members.push(running);
        }
        for member in front {
            let upstream = member
                .upstream
                .as_deref()
                .map(|tier| fleet.tier_target(tier));
            let netns = isolate(member, fleet.members.len())?;
            let running = start_one(member, upstream.as_deref(), launch, netns).await?;
            fleet.members.push(running);
        }
        for m in &fleet.members {
            wait_serving(m, launch).await?;
        }
        Ok(fleet)
    }

    /// The tiers, entry tier first (the one no other tier asks), then the rest in file order.
    pub fn tiers(&self) -> Vec<String> {
        let mut tiers: Vec<String> = Vec::new();
        for m in &self.members {
            if !tiers.contains(&m.tier) {
                tiers.push(m.tier.clone());
            }
        }
        let asked = |t: &String| self.members.iter().any(|m| m.upstream.as_ref() == Some(t));
        tiers.sort_by_key(asked);
        tiers
    }

    /// The `ipv4:` target of one tier.
    pub fn tier_target(&self, tier: &str) -> String {
        let addrs: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|m| m.tier == tier)
            .map(|m| m.addr)
            .collect();
        crate::Target::Static(addrs).to_string()
    }

    /// The `ipv4:`/`ipv6:` target listing every replica.
    pub fn target(&self) -> String {
        match self.tiers().first() {
            Some(entry) => self.tier_target(entry),
            None => String::new(),
        }
    }

    /// Resolves when a replica that was running exits; gives its id and status. Pending forever
    /// when none is left running.
    pub async fn next_exit(&mut self) -> (String, ExitStatus) {
        loop {
            let waits: Vec<_> = self
                .members
                .iter_mut()
                .filter(|m| m.exited.is_none())
                .map(|m| Box::pin(async move { (m.child.wait().await, m) }))
                .collect();
            if waits.is_empty() {
                return std::future::pending().await;
            }
            let ((result, member), _, _) = futures::future::select_all(waits).await;
            if let Ok(status) = result {
                member.exited = Some(status);
                return (member.id.clone(), status);
            }
        }
    }

    /// Sends SIGTERM to every running replica and waits for each to finish draining (killing
    /// any that takes longer than `timeout`).
    pub async fn drain(mut self, timeout: Duration) -> Vec<(String, Option<ExitStatus>)> {
        for m in &mut self.members {
            if m.exited.is_none() {
                #[cfg(unix)]
                m.signal(libc::SIGTERM);
                // No SIGTERM elsewhere: the drain is a kill.
                #[cfg(not(unix))]
                let _ = m.child.start_kill();
            }
        }
        let mut statuses = Vec::new();
        for m in &mut self.members {
            let status = match m.exited {
                Some(s) => Some(s),
                None => match tokio::time::timeout(timeout, m.child.wait()).await {
                    Ok(Ok(s)) => Some(s),
                    _ => {
                        let _ = m.child.kill().await;
                        None
                    }
                },
            };
            statuses.push((m.id.clone(), status));
        }
        statuses
    }
}

/// A network namespace for an isolated member.
fn isolate(member: &Member, n: usize) -> Result<Option<crate::netns::Netns>, FleetError> {
    if !member.isolated {
        return Ok(None);
    }
    let fail = |message: String| FleetError::Replica {
        id: member.id.clone(),
        message,
    };
    if !crate::netns::available() {
        return Err(fail(
            "isolated replicas need Linux, root and iproute2's `ip` (network namespaces)".into(),
        ));
    }
    crate::netns::Netns::new("f", n as u32)
        .map(Some)
        .map_err(|e| fail(e.to_string()))
}

async fn start_one(
    member: &Member,
    upstream: Option<&str>,
    launch: &Launch,
    netns: Option<crate::netns::Netns>,
) -> Result<Running, FleetError> {
    let fail = |message: String| FleetError::Replica {
        id: member.id.clone(),
        message,
    };
    let (mut command, listen, admin_listen, metrics_listen) = match &netns {
        // Inside its namespace, everything it binds is on the namespace's address.
        Some(ns) => {
            let listen = SocketAddr::new(ns.inner_ip(), member.listen.port());
            let admin = SocketAddr::new(ns.inner_ip(), admin_listen(member.listen).port());
            let metrics = SocketAddr::new(ns.inner_ip(), metrics_listen(member.listen).port());
            (ns.command(&launch.exe), listen, admin, metrics)
        }
        None => (
            Command::new(&launch.exe),
            member.listen,
            admin_listen(member.listen),
            metrics_listen(member.listen),
        ),
    };
    let mut child = command
        .arg("replica")
        .args(["--listen", &listen.to_string()])
        .args(["--id", &member.id])
        .args([
            "--latency",
            &humantime::format_duration(member.faults.latency).to_string(),
        ])
        .args([
            "--jitter",
            &humantime::format_duration(member.faults.jitter).to_string(),
        ])
        .args(["--fail-rate", &member.faults.fail_rate.to_string()])
        .args(["--admin-listen", &admin_listen.to_string()])
        .args(["--metrics-listen", &metrics_listen.to_string()])
        .args(upstream.map(|u| ["--upstream", u]).into_iter().flatten())
        .args(
            launch
                .data
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--data"), d.as_os_str()]),
        )
        .args(&launch.extra_args)
        .env("RUST_LOG", &launch.log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", launch.exe.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout pipe".into()))?;
    let mut stdout = BufReader::new(stdout);
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        let read = tokio::time::timeout(launch.ready_timeout, stdout.read_line(&mut line)).await;
        match read {
            Ok(Ok(n)) if n > 0 => lines.push(line),
            Ok(_) => {
                let status = child.wait().await.ok();
                return Err(fail(format!(
                    "exited before listening ({})",
                    status.map_or("unknown status".into(), |s| s.to_string())
                )));
            }
            Err(_) => return Err(fail("did not start listening in time".into())),
        }
    }
    let addr = parse_line(&lines[0], "listening on ")
        .ok_or_else(|| fail(format!("unexpected first line {:?}", lines[0])))?;
    let admin = parse_line(&lines[1], "admin on ")
        .ok_or_else(|| fail(format!("unexpected second line {:?}", lines[1])))?;
    let metrics = parse_line(&lines[2], "metrics on ")
        .ok_or_else(|| fail(format!("unexpected third line {:?}", lines[2])))?;
    Ok(Running {
        id: member.id.clone(),
        tier: member.tier.clone(),
        upstream: member.upstream.clone(),
        addr,
        faults: member.faults,
        admin: AdminAddr {
            addr: admin,
            tls: launch.admin_tls.clone(),
        },
        metrics,
        member: member.clone(),
        child,
        _stdout: stdout,
        exited: None,
        netns,
    })
}

async fn wait_serving(member: &Running, launch: &Launch) -> Result<(), FleetError> {
    let timeout = launch.ready_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if health_of(member.addr, launch.client_tls.as_ref()).await == Some(ServingStatus::Serving)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FleetError::Replica {
                id: member.id.clone(),
                message: format!("not SERVING after {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One grpc.health.v1 Check of the whole server at `addr` (over TLS when `tls` is given).
pub async fn health_of(
    addr: SocketAddr,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Option<ServingStatus> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).ok()?;
    }
    let channel = endpoint.connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// How far above its serving port a fleet replica's admin listener is: fixed ports give fixed
/// admin ports (50053 -> 51053), so `meshlb faults --addr` can be written down.
pub const ADMIN_PORT_OFFSET: u16 = 1000;

/// The admin listener of a replica serving on `listen`: on loopback always, at
/// [`ADMIN_PORT_OFFSET`] above a fixed port, or on a free port.
fn admin_listen(listen: SocketAddr) -> SocketAddr {
    let ip = if listen.ip().is_loopback() {
        listen.ip()
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    let port = match listen.port() {
        0 => 0,
        p => p.checked_add(ADMIN_PORT_OFFSET).unwrap_or(0),
    };
    SocketAddr::new(ip, port)
}

/// How far above its serving port a fleet replica's metrics listener is (50051 -> 52051).
pub const METRICS_PORT_OFFSET: u16 = 2000;

/// The metrics listener of a replica serving on `listen`: beside the admin listener, on
/// loopback, at [`METRICS_PORT_OFFSET`] above a fixed port, or on a free port.
fn metrics_listen(listen: SocketAddr) -> SocketAddr {
    let admin = admin_listen(listen);
    let port = match listen.port() {
        0 => 0,
        p => p.checked_add(METRICS_PORT_OFFSET).unwrap_or(0),
    };
    SocketAddr::new(admin.ip(), port)
}

fn parse_line(line: &str, prefix: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shipped_fleet() {
        let spec = FleetSpec::builtin();
        assert_eq!(spec.members.len(), 3);
        assert_eq!(spec.members[0].listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(spec.members[2].listen, "127.0.0.1:50053".parse().unwrap());
        assert_eq!(spec.members[2].faults.latency, Duration::from_millis(40));
        assert!(spec.members[..2]
            .iter()
            .all(|m| m.faults == FaultConfig::default()));
    }

    #[test]
    fn admin_listeners_stay_on_loopback_beside_the_serving_port() {
        assert_eq!(
            admin_listen("127.0.0.3:50053".parse().unwrap()),
            "127.0.0.3:51053".parse().unwrap()
        );
        assert_eq!(
            admin_listen("0.0.0.0:50051".parse().unwrap()),
            "127.0.0.1:51051".parse().unwrap()
        );
        assert_eq!(admin_listen("127.0.0.1:0".parse().unwrap()).port(), 0);
        assert_eq!(admin_listen("127.0.0.1:65000".parse().unwrap()).port(), 0);
    }

    #[test]
    fn resizes_and_moves_ports() {
        let spec = FleetSpec::parse(include_str!("../replicas/fleet.toml"))
            .unwrap()
            .with_replicas(5)
            .with_base_port(0);
        assert_eq!(spec.members.len(), 5);
        assert_eq!(spec.members[4].id, "users-5");
        assert!(spec.members.iter().all(|m| m.listen.port() == 0));
        assert_eq!(spec.clone().with_replicas(1).members.len(), 1);
    }

    #[test]
    fn parses_the_two_tier_fleet() {
        let spec = FleetSpec::parse(include_str!("../replicas/two-tier.toml")).unwrap();
        let fronts: Vec<_> = spec.members.iter().filter(|m| m.tier == "front").collect();
        assert_eq!(fronts.len(), 2);
        assert!(fronts
            .iter()
            .all(|m| m.upstream.as_deref() == Some("users")));
        let err = FleetSpec::parse("[[replica]]\ntier = \"a\"\nupstream = \"nope\"\n").unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_fleet_files_say_what_is_wrong() {
        let err = FleetSpec::parse("[[replica]]\nlatency = \"fast\"\n").unwrap_err();
        assert!(err.contains("latency") && err.contains("fast"), "{err}");
        let err = FleetSpec::parse("[[replica]]\nfail_rate = 3.0\n").unwrap_err();
        assert!(err.contains("fail rate"), "{err}");
        let err = FleetSpec::parse("[[replica]]\nlatncy = \"1ms\"\n").unwrap_err();
        assert!(err.contains("latncy"), "{err}");
    }
}
