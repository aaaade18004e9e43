//! A replica that goes silent: it runs in its own network namespace behind a veth pair, and the
//! namespace's side of the link goes down under load. No RST, no FIN: packets just vanish. The
//! balancer must stop sending to it quickly and lose no call. Needs root (CI runs as root); the
//! namespace and the veth pair exist only for the test and are removed even when it fails.

use crate::support::{eventually, get_point_request, state_of, Replica};
use meshlb::balance::EndpointState;
use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use meshlb::replica::FaultConfig;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A network namespace with one veth link to the host; removed on drop.
struct Netns {
    name: String,
    inner_link: String,
    host_link: String,
    inner_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new(tag: &str) -> Self {
        let id = std::process::id() % 100_000;
        let name = format!("mlb-{tag}-{id}");
        let host_link = format!("mlh{tag}{id}");
        let inner_link = format!("mln{tag}{id}");
        let subnet = format!("10.{}.{}", 100 + id % 150, (id / 150) % 250);
        let ns = Self {
            name,
            inner_link,
            host_link,
            inner_ip: format!("{subnet}.2"),
        };
        // Leftovers of an earlier run that was killed.
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_link])
            .output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_link,
        ]);
        ip(&["link", "set", &ns.inner_link, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{subnet}.1/30"),
            "dev",
            &ns.host_link,
        ]);
        ip(&["link", "set", &ns.host_link, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.2/30"),
            "dev",
            &ns.inner_link,
        ]);
        ns.exec(&["ip", "link", "set", &ns.inner_link, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Takes the namespace's side of the link down: a blackhole.
    fn cut(&self) {
        self.exec(&["ip", "link", "set", &self.inner_link, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}

/// A replica process inside `ns`; killed on drop. Its stdout stays open: a closed pipe would
/// make its next line fail.
struct Inside(
    Child,
    SocketAddr,
    #[allow(dead_code)] BufReader<std::process::ChildStdout>,
);

impl Inside {
    fn start(ns: &Netns) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_meshlb"),
                "replica",
            ])
            .args(["--listen", &format!("{}:0", ns.inner_ip)])
            .args(["--id", "silent", "--admin-listen", "none"])
            .args([
                "--data",
                concat!(env!("CARGO_MANIFEST_DIR"), "/replicas/users.json"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a replica in the namespace");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{line:?}"))
            .parse()
            .unwrap();
        Self(child, addr, stdout)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn a_blackholed_replica_is_routed_around_within_a_second_and_no_call_fails() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let ns = Netns::new("bh");
    let silent = Inside::start(&ns);
    let a = Replica::start("127.0.0.1", "loud-1", FaultConfig::default()).await;
    let b = Replica::start("127.0.0.1", "loud-2", FaultConfig::default()).await;
    let lb = meshlb::Balancer::builder(crate::support::ipv4_target(&[a.addr, b.addr, silent.1]))
        .build()
        .await
        .unwrap();
    eventually("all three endpoints ready", || async {
        lb.endpoints()
            .iter()
            .all(|e| e.state == EndpointState::Ready)
            .then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (lb, stop, ok, failed, failures) = (
                lb.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut client = UserGuideServiceClient::new(lb);
                while !stop.load(Ordering::Relaxed) {
                    match client.get_point(get_point_request()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            failures.lock().unwrap().push(status);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    let silent_served = || {
        lb.endpoints()
            .into_iter()
            .find(|e| e.addr == silent.1)
            .map_or(0, |e| e.served)
    };
    eventually("the namespaced replica serves its share", || async {
        (silent_served() > 50).then_some(())
    })
    .await;

    ns.cut();
    let cut = std::time::Instant::now();
    eventually("the silent replica leaves rotation", || async {
        (state_of(&lb, silent.1) != Some(EndpointState::Ready)).then_some(())
    })
    .await;
    let detected = cut.elapsed();
    // Keep the load going a while after the cut: the stuck calls must have been failed over.
    let after = ok.load(Ordering::Relaxed);
    eventually("calls keep flowing after the cut", || async {
        (ok.load(Ordering::Relaxed) > after + 500).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("every call ends")
            .unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed calls: {:?}",
        failures.lock().unwrap()
    );
    // The goal is under 1 s (measured in `meshlb bench --scenarios blackhole`); the test leaves
    // room for a loaded CI machine running other tests beside it.
    assert!(
        detected < Duration::from_millis(1500),
        "the silent replica stayed in rotation for {detected:?}"
    );
    let last_error = lb
        .endpoints()
        .into_iter()
        .find(|e| e.addr == silent.1)
        .and_then(|e| e.last_error)
        .unwrap_or_default();
    assert!(last_error.contains("silent"), "{last_error}");
    a.stop().await;
    b.stop().await;
}
