//! Shared test helpers: replicas in-process or as real processes, and polling with a deadline.

#![allow(dead_code)]

use meshlb::replica::{self, FaultConfig, ReplicaConfig, Users};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn users() -> Users {
    Users::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/replicas/users.json"
    )))
    .expect("shipped data loads")
}

/// Polls `check` until it returns `Some`, or panics with `what` after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Listeners on one port, one at each of `ips`, as the pods of a headless Service share one.
/// A port the kernel found free at the first address may be taken at another by a test running
/// beside this one: such a port is given back and another tried.
pub async fn one_port(ips: &[std::net::IpAddr]) -> Vec<tokio::net::TcpListener> {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind((ips[0], 0))
            .await
            .expect("bind loopback");
        let port = first.local_addr().unwrap().port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            match tokio::net::TcpListener::bind((*ip, port)).await {
                Ok(listener) => all.push(listener),
                Err(_) => break,
            }
        }
        if all.len() == ips.len() {
            return all;
        }
    }
    panic!("no port free at every one of {ips:?} in 50 tries");
}

/// A replica running in this process.
pub struct Replica {
    pub addr: SocketAddr,
    /// Its admin listener (same IP, a free port).
    pub admin: SocketAddr,
    pub id: String,
    /// Its metrics listener (same IP, a free port).
    pub metrics: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), replica::ReplicaError>>>,
}

impl Replica {
    pub async fn start(ip: &str, id: &str, faults: FaultConfig) -> Self {
        let mut config = ReplicaConfig::new(id, users());
        config.faults = faults;
        config.drain_grace = Duration::from_millis(200);
        Self::start_with(ip, config).await
    }

    pub async fn start_with(ip: &str, config: ReplicaConfig) -> Self {
        Self::start_on(format!("{ip}:0").parse().unwrap(), config).await
    }

    /// Starts on exactly `addr` (for several replicas on one port, [`one_port`] is safer).
    pub async fn start_on(addr: SocketAddr, config: ReplicaConfig) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind loopback");
        Self::serve(listener, config).await
    }

    /// A replica serving on `listener` (one of [`one_port`]'s, say).
    pub async fn serve(listener: tokio::net::TcpListener, config: ReplicaConfig) -> Self {
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
            .await
            .expect("bind the admin listener");
        let admin_addr = admin.local_addr().unwrap();
        let metrics = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
            .await
            .expect("bind the metrics listener");
        let metrics_addr = metrics.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let id = config.id.clone();
        let listeners = replica::Listeners {
            serving: listener,
            admin: Some(admin),
            metrics: Some(metrics),
        };
        let task = tokio::spawn(replica::run(listeners, config, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin: admin_addr,
            id,
            metrics: metrics_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the drain and returns at once.
    pub fn begin_drain(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Drains and waits for the replica to end.
    pub async fn stop(mut self) {
        self.begin_drain();
        if let Some(task) = self.task.take() {
            task.await
                .expect("replica task")
                .expect("replica ends cleanly");
        }
    }

    /// Ends the replica abruptly, like a crash: connections are cut, nothing drains.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A replica as a real `meshlb replica` process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its admin listener, unless started with `--admin-listen none`.
    pub admin: Option<SocketAddr>,
}

impl Process {
    pub fn spawn(ip: &str, args: &[&str]) -> Self {
        Self::spawn_on(&format!("{ip}:0"), args)
    }

    pub fn spawn_on(listen: &str, args: &[&str]) -> Self {
        Self::spawn_with(listen, args, |_| {})
    }

    pub fn spawn_with(listen: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
        cmd.arg("replica")
            .args(["--listen", listen])
            .args([
                "--data",
                concat!(env!("CARGO_MANIFEST_DIR"), "/replicas/users.json"),
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // Last, so a test can send stderr somewhere or change the environment.
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn meshlb replica");
        let stdout = child.stdout.take().unwrap();
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("second line");
        let admin = match line.trim() {
            "admin off" => None,
            other => Some(
                other
                    .strip_prefix("admin on ")
                    .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                    .parse()
                    .expect("admin address"),
            ),
        };
        Self { child, addr, admin }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Waits (polling, with the deadline) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let child = &mut self.child;
        let status = eventually("process exit", || {
            let s = child.try_wait().expect("try_wait");
            async move { s }
        })
        .await;
        status.code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET over a plain socket: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw HTTP/1.1 bytes and reads until the server closes: (status, body).
pub async fn http_raw(addr: SocketAddr, raw: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut text))
        .await
        .expect("answered and closed within the deadline")
        .unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Calls made through a balancer, counted by the replica that answered.
#[derive(Debug, Default)]
pub struct Tally {
    pub by_replica: std::collections::BTreeMap<String, usize>,
    pub errors: Vec<tonic::Status>,
}

impl Tally {
    pub fn ok(&self) -> usize {
        self.by_replica.values().sum()
    }

    pub fn of(&self, id: &str) -> usize {
        self.by_replica.get(id).copied().unwrap_or(0)
    }

    pub fn share(&self, id: &str) -> f64 {
        self.of(id) as f64 / self.ok().max(1) as f64
    }
}

pub fn get_point_request() -> meshlb::proto::userguide::v1::GetPointRequest {
    meshlb::proto::userguide::v1::GetPointRequest {
        profile: Some(meshlb::proto::userguide::v1::Profile {
            age: 26,
            name: "james".into(),
        }),
    }
}

/// Makes `calls` GetPoint calls through `lb`, `concurrency` at a time.
pub async fn drive(lb: &meshlb::Balancer, calls: usize, concurrency: usize) -> Tally {
    use futures::StreamExt;
    use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
    let results: Vec<_> = futures::stream::iter(0..calls)
        .map(|_| {
            let mut client = UserGuideServiceClient::new(lb.clone());
            async move {
                client.get_point(get_point_request()).await.map(|r| {
                    r.metadata()
                        .get("x-replica-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                        .to_owned()
                })
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut tally = Tally::default();
    for r in results {
        match r {
            Ok(id) => *tally.by_replica.entry(id).or_default() += 1,
            Err(status) => tally.errors.push(status),
        }
    }
    tally
}

/// A client of the admin listener at `addr` (a replica's `admin`, not its serving address).
pub async fn admin(
    addr: SocketAddr,
) -> meshlb::proto::admin::v1::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to admin");
    meshlb::proto::admin::v1::admin_service_client::AdminServiceClient::new(ch)
}

/// Changes a replica's fault knobs at run time, through its admin listener at `addr`.
pub async fn set_faults(addr: SocketAddr, faults: FaultConfig) {
    admin(addr)
        .await
        .set_faults(meshlb::replica::admin::faults_request(faults))
        .await
        .expect("set faults");
}

/// Makes a replica report SERVING or NOT_SERVING, through its admin listener at `addr`.
pub async fn set_serving(addr: SocketAddr, serving: bool) {
    admin(addr)
        .await
        .set_serving(meshlb::proto::admin::v1::SetServingRequest { serving })
        .await
        .expect("set serving");
}

/// The state the balancer reports for `addr`, if it knows it.
pub fn state_of(lb: &meshlb::Balancer, addr: SocketAddr) -> Option<meshlb::balance::EndpointState> {
    lb.endpoints()
        .into_iter()
        .find(|e| e.addr == addr)
        .map(|e| e.state)
}

pub fn latency(ms: u64) -> FaultConfig {
    FaultConfig {
        latency: Duration::from_millis(ms),
        ..Default::default()
    }
}

pub fn ipv4_target(addrs: &[SocketAddr]) -> String {
    let list: Vec<_> = addrs.iter().map(ToString::to_string).collect();
    format!("ipv4:{}", list.join(","))
}

/// A balancer for the UserGuide service as the tools build one: with its service config
/// (`replicas/service-config.json`: GetPoint retried on UNAVAILABLE, throttled).
pub fn userguide(target: impl Into<String>) -> meshlb::balance::Builder {
    meshlb::Balancer::builder(target)
        .service_config(meshlb::proto::USERGUIDE_SERVICE_CONFIG)
        .expect("the built-in service config is valid")
}

/// `meshlb up`'s lines up to its `try:` line; the rest is drained on a thread so that `up` never
/// blocks on a full pipe.
pub fn lines_until_try(child: &mut Child) -> Vec<String> {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("up's output is text");
        let done = line.starts_with("try:");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    seen
}

/// The UserGuide service with `faults`, beside a health service that says SERVING for the
/// server and for UserGuide, as one router: for tests that serve it over hyper themselves.
pub async fn userguide_routes(faults: meshlb::replica::Faults) -> axum::Router {
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in ["", meshlb::proto::USERGUIDE_SERVICE] {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let guide = meshlb::replica::UserGuide::new(users(), faults);
    tonic::service::Routes::new(health_service)
        .add_service(
            meshlb::proto::userguide::v1::user_guide_service_server::UserGuideServiceServer::new(
                guide,
            ),
        )
        .prepare()
        .into_axum_router()
}
