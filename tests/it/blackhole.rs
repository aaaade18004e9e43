//! A replica that goes silent: it runs in its own network namespace behind a veth pair, and the
//! namespace's side of the link goes down under load. No RST, no FIN: packets just vanish. The
//! balancer must stop sending to it quickly and lose no call. Needs root (CI runs as root); the
//! namespace and the veth pair exist only for the test and are removed even when it fails.

use crate::support::{eventually, get_point_request, state_of, Replica};
use meshlb::balance::{EndpointState, OutlierConfig, Policy};
use meshlb::netns::Netns;
use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use meshlb::replica::FaultConfig;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
                ns.name(),
                env!("CARGO_BIN_EXE_meshlb"),
                "replica",
            ])
            .args(["--listen", &format!("{}:0", ns.inner_ip())])
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

#[tokio::test]
async fn a_blackholed_replica_is_found_out_by_its_silence_and_no_call_fails() {
    blackhole_under(8, 0).await;
}

/// One caller: when its call sits on the silent replica, no other endpoint makes progress, and
/// the replica must still be found out (a rule of "overdue while the others answered" never
/// would).
#[tokio::test]
async fn a_lone_caller_stuck_on_a_blackholed_replica_is_failed_over() {
    blackhole_under(1, 1).await;
}

/// `callers` loops of unary calls over a fleet of two replicas and one in namespace `n`, whose
/// link is cut under load.
async fn blackhole_under(callers: usize, n: u32) {
    if !meshlb::netns::available() {
        eprintln!("skipped: network namespaces need root and iproute2 (CI has both)");
        return;
    }
    // What the detectors said, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshlb::balance=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let ns = Netns::new("t", n).expect("a network namespace");
    let silent = Inside::start(&ns);
    let a = Replica::start("127.0.0.1", "loud-1", FaultConfig::default()).await;
    let b = Replica::start("127.0.0.1", "loud-2", FaultConfig::default()).await;
    // A lone caller's test turns latency ejection off: on a loaded machine the namespaced replica
    // (behind a veth, in its own process) can be slow enough for it to take it out before the
    // cut, and that test is about the silence detector. For the same reason it goes round the
    // replicas: p2c with one call in flight sends each call to the faster of two, and it sent
    // the namespaced replica nothing for 20 s about one run in ten, so no call was there to be
    // stuck. Under load, p2c and both detectors run, as shipped.
    let lone = callers == 1;
    let lb = crate::support::userguide(crate::support::ipv4_target(&[a.addr, b.addr, silent.1]))
        .outlier(OutlierConfig {
            enabled: !lone,
            ..OutlierConfig::default()
        })
        .policy(if lone {
            Policy::RoundRobin
        } else {
            Policy::P2c
        })
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
    let workers: Vec<_> = (0..callers)
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

    ns.cut().expect("cut the link");
    let cut = std::time::Instant::now();
    eventually("the silent replica leaves rotation", || async {
        (state_of(&lb, silent.1) != Some(EndpointState::Ready)).then_some(())
    })
    .await;
    let detected = cut.elapsed();
    // Keep the load going a while after the cut: the stuck calls must have been failed over.
    let after = ok.load(Ordering::Relaxed);
    eventually("calls keep flowing after the cut", || async {
        (ok.load(Ordering::Relaxed) > after + 100 * callers as u64).then_some(())
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
        "failed calls: {:?}; endpoints: {:?}",
        failures.lock().unwrap(),
        lb.endpoints()
    );
    // Found out by the silence detector (its error, below), before HTTP/2 keepalive could have
    // (a ping every 10 s, answered within 5 s). How fast is a goal, measured in `meshlb bench
    // --scenarios blackhole` (under 1 s); a CI machine running other tests beside this one has
    // taken 2 s.
    assert!(
        detected < Duration::from_secs(4),
        "the silent replica stayed in rotation for {detected:?}"
    );
    let last_error = lb
        .endpoints()
        .into_iter()
        .find(|e| e.addr == silent.1)
        .and_then(|e| e.last_error)
        .unwrap_or_default();
    assert!(
        last_error.contains("silent"),
        "{last_error:?}; endpoints: {:?}",
        lb.endpoints()
    );
    a.stop().await;
    b.stop().await;
}
