//! The balanced client against real replicas on loopback: distribution, latency awareness, the
//! health gate, killed and frozen replicas, fail-fast.

use crate::support::{
    drive, eventually, ipv4_target, latency, set_faults, set_serving, state_of, Process, Replica,
};
use meshlb::balance::{ApertureConfig, ConnectConfig, Coordinate, EndpointState, EwmaConfig};
use meshlb::health::HealthConfig;
use meshlb::replica::FaultConfig;
use meshlb::{Balancer, Policy};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const SERVICE: &str = meshlb::proto::USERGUIDE_SERVICE;

async fn three(faults: [FaultConfig; 3]) -> Vec<Replica> {
    fleet("r", faults).await
}

/// Replicas on 127.0.0.2, .3, …, named `{prefix}1`, `{prefix}2`, …, one per fault setting.
async fn fleet(prefix: &str, faults: impl IntoIterator<Item = FaultConfig>) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for (i, f) in faults.into_iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        replicas.push(Replica::start(&ip, &format!("{prefix}{}", i + 1), f).await);
    }
    replicas
}

fn target(replicas: &[Replica]) -> String {
    ipv4_target(&replicas.iter().map(|r| r.addr).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_calls_over_three_replicas() {
    let replicas = three(Default::default()).await;
    let lb = crate::support::userguide(target(&replicas))
        .health_service(SERVICE)
        // Equal replicas: a debug build's scheduling noise on a loaded machine may make one look
        // slow for a moment, and ejecting it is the detector's job, not what this test is about.
        .outlier(meshlb::balance::OutlierConfig {
            enabled: false,
            ..Default::default()
        })
        .build()
        .await
        .unwrap();
    let tally = drive(&lb, 300, 6).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.ok(), 300);
    for r in &replicas {
        assert!(tally.of(&r.id) >= 30, "{} got {:?}", r.id, tally.by_replica);
    }
    let endpoints = lb.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert!(endpoints.iter().all(|e| e.state == EndpointState::Ready));
    assert_eq!(endpoints.iter().map(|e| e.served).sum::<u64>(), 300);
    assert!(endpoints.iter().all(|e| e.in_flight == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_replica_gets_a_small_share_and_recovers_when_fixed() {
    let replicas = three([latency(50), latency(0), latency(0)]).await;
    let slow = &replicas[0];

    // The baseline gives the slow replica its third, whatever its latency.
    let rr = crate::support::userguide(target(&replicas))
        .policy(Policy::RoundRobin)
        .build()
        .await
        .unwrap();
    all_ready(&rr, 3).await;
    let baseline = drive(&rr, 150, 6).await;
    assert!(baseline.errors.is_empty());
    assert!(baseline.share(&slow.id) > 0.25, "{:?}", baseline.by_replica);

    let lb = crate::support::userguide(target(&replicas))
        .health_service(SERVICE)
        // A short decay so the recovery below is seen within the test's deadline.
        .ewma(EwmaConfig {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(1),
        })
        .build()
        .await
        .unwrap();
    let tally = drive(&lb, 400, 6).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert!(
        tally.share(&slow.id) < 0.10,
        "slow replica got {:?}",
        tally.by_replica
    );
    ejected_under_load(&lb, slow).await;

    set_faults(slow.admin, FaultConfig::default()).await;
    eventually("the fixed replica gets its share back", || async {
        let window = drive(&lb, 90, 6).await;
        (window.share(&slow.id) > 0.15).then_some(())
    })
    .await;
}

/// p2c alone, with no ejection to hide behind: the latency estimate is what keeps calls off the
/// slow replica (with every cost equal, p2c is random and it would get a third).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_by_its_latency_estimate_alone_keeps_calls_off_a_slow_replica() {
    let replicas = three([latency(50), latency(0), latency(0)]).await;
    let slow = &replicas[0];
    let lb = crate::support::userguide(target(&replicas))
        .outlier(meshlb::balance::OutlierConfig {
            enabled: false,
            ..Default::default()
        })
        // A short decay: one scheduling stall of a fast replica in a debug build would otherwise
        // hold its peak above the slow one's for the rest of the test.
        .ewma(EwmaConfig {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(1),
        })
        .build()
        .await
        .unwrap();
    all_ready(&lb, 3).await;
    let tally = drive(&lb, 300, 6).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert!(
        tally.share(&slow.id) < 0.10,
        "slow replica got {:?}",
        tally.by_replica
    );
    assert!(
        lb.endpoints()
            .iter()
            .all(|e| e.state == EndpointState::Ready),
        "nothing was ejected: {:?}",
        lb.endpoints()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_replica_gets_no_calls_until_it_serves_again() {
    let replicas = three(Default::default()).await;
    let lb = crate::support::userguide(target(&replicas))
        .health_service(SERVICE)
        .build()
        .await
        .unwrap();
    let sick = &replicas[1];
    set_serving(sick.admin, false).await;
    eventually("the gate shuts", || async {
        (state_of(&lb, sick.addr) == Some(EndpointState::Unhealthy)).then_some(())
    })
    .await;
    let tally = drive(&lb, 120, 6).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of(&sick.id), 0, "{:?}", tally.by_replica);

    set_serving(sick.admin, true).await;
    eventually("calls come back", || async {
        (drive(&lb, 60, 6).await.of(&sick.id) > 0).then_some(())
    })
    .await;
}

/// Whether every endpoint the balancer knows is in `state`.
fn all_in(lb: &Balancer, state: EndpointState) -> bool {
    lb.endpoints().iter().all(|e| e.state == state)
}

/// Waits until `lb` knows `n` endpoints and all are ready: a balancer calls as soon as one is,
/// and a test that needs them all must not race the others' connecting.
async fn all_ready(lb: &Balancer, n: usize) {
    eventually("every endpoint is ready", || async {
        (lb.endpoints().len() == n && all_in(lb, EndpointState::Ready)).then_some(())
    })
    .await;
}

/// `wait_settled` returns once every endpoint has had its first word: the live ones in
/// rotation, the dead one with its failure, not at the first ready one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_every_endpoint_hears_the_live_ones_and_the_dead_one() {
    let replicas = fleet("settle", [FaultConfig::default(), FaultConfig::default()]).await;
    // A port nobody listens on: its connections are refused.
    let dead = std::net::TcpListener::bind("127.0.0.9:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    addrs.push(dead);
    let lb = crate::support::userguide(ipv4_target(&addrs))
        .health_service(SERVICE)
        .build()
        .await
        .unwrap();
    assert!(
        lb.wait_settled(Duration::from_secs(20)).await,
        "{:?}",
        lb.endpoints()
    );
    let endpoints = lb.endpoints();
    assert_eq!(endpoints.len(), 3);
    for replica in &replicas {
        assert_eq!(state_of(&lb, replica.addr), Some(EndpointState::Ready));
    }
    let refused = endpoints.iter().find(|e| e.addr == dead).unwrap();
    assert_eq!(refused.state, EndpointState::Connecting);
    assert!(refused.last_error.is_some(), "{refused:?}");
}

/// Runs calls in the background, `concurrency` at a time, until stopped; returns the tally.
fn background_load(
    lb: Balancer,
    stop: Arc<AtomicBool>,
    concurrency: usize,
) -> tokio::task::JoinHandle<crate::support::Tally> {
    tokio::spawn(async move {
        let mut total = crate::support::Tally::default();
        while !stop.load(Ordering::Relaxed) {
            let t = drive(&lb, 4 * concurrency, concurrency).await;
            for (id, n) in t.by_replica {
                *total.by_replica.entry(id).or_default() += n;
            }
            total.errors.extend(t.errors);
        }
        total
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_routed_around_and_no_call_fails() {
    let mut procs: Vec<Process> = (0..3)
        .map(|i| {
            Process::spawn(
                &format!("127.0.0.{}", i + 2),
                &["--id", &format!("p{}", i + 1), "--latency", "5ms"],
            )
        })
        .collect();
    let lb = crate::support::userguide(ipv4_target(
        &procs.iter().map(|p| p.addr).collect::<Vec<_>>(),
    ))
    .health_service(SERVICE)
    .build()
    .await
    .unwrap();
    assert!(drive(&lb, 30, 3).await.errors.is_empty());

    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(lb.clone(), stop.clone(), 4);
    let victim = procs[0].addr;
    eventually("load is flowing to the victim", || async {
        lb.endpoints()
            .iter()
            .any(|e| e.addr == victim && e.served > 30)
            .then_some(())
    })
    .await;
    procs[0].child.kill().unwrap(); // SIGKILL
    procs[0].child.wait().unwrap();
    eventually("the killed replica leaves rotation", || async {
        (state_of(&lb, victim) != Some(EndpointState::Ready)).then_some(())
    })
    .await;
    let after_kill = drive(&lb, 60, 4).await;
    stop.store(true, Ordering::Relaxed);
    let during = load.await.unwrap();

    assert!(
        during.errors.is_empty(),
        "calls failed: {:?}",
        during.errors
    );
    assert!(after_kill.errors.is_empty(), "{:?}", after_kill.errors);
    assert_eq!(after_kill.of("p1"), 0);
    assert_eq!(after_kill.ok(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_is_detected_by_keepalive_and_returns_after_sigcont() {
    let procs: Vec<Process> = (0..3)
        .map(|i| {
            Process::spawn(
                &format!("127.0.0.{}", i + 2),
                &["--id", &format!("f{}", i + 1)],
            )
        })
        .collect();
    let lb = crate::support::userguide(ipv4_target(
        &procs.iter().map(|p| p.addr).collect::<Vec<_>>(),
    ))
    .health_service(SERVICE)
    .connect(ConnectConfig {
        connect_timeout: Duration::from_millis(500),
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(300),
        tls: None,
    })
    .health(HealthConfig {
        service: SERVICE.into(),
        answer_timeout: Duration::from_millis(800),
        ..HealthConfig::default()
    })
    .timeout(Duration::from_secs(5))
    .build()
    .await
    .unwrap();
    // Every replica ready before the freeze: a debug build's first calls can be slow enough
    // for the latency detector to eject one, and an ejected endpoint is not what this is about
    // (it needs calls to be probed back, and would pass for "noticed" without keepalive).
    eventually("every replica is ready", || async {
        assert!(drive(&lb, 30, 3).await.errors.is_empty());
        all_in(&lb, EndpointState::Ready).then_some(())
    })
    .await;

    let frozen = &procs[0];
    frozen.signal(libc::SIGSTOP);
    eventually("keepalive notices the frozen replica", || async {
        (state_of(&lb, frozen.addr) == Some(EndpointState::Connecting)).then_some(())
    })
    .await;
    let tally = drive(&lb, 60, 4).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of("f1"), 0);

    frozen.signal(libc::SIGCONT);
    // Calls while waiting: if the freeze got it ejected, a call is what probes it back.
    eventually(
        "the thawed replica is ready again and gets calls",
        || async {
            let served = drive(&lb, 60, 4).await.of("f1");
            (served > 0 && state_of(&lb, frozen.addr) == Some(EndpointState::Ready)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_fails_fast_with_the_reason() {
    let replicas = three(Default::default()).await;
    let lb = crate::support::userguide(target(&replicas))
        .health_service(SERVICE)
        .ready_wait(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    for r in &replicas {
        set_serving(r.admin, false).await;
    }
    eventually("every gate shuts", || async {
        all_in(&lb, EndpointState::Unhealthy).then_some(())
    })
    .await;
    let tally = tokio::time::timeout(crate::support::DEADLINE, drive(&lb, 3, 3))
        .await
        .expect("calls end instead of hanging");
    assert_eq!(tally.errors.len(), 3);
    for status in &tally.errors {
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("all 3 endpoints") && status.message().contains("unhealthy"),
            "{}",
            status.message()
        );
        // The reason is typed, beneath the status, for a caller to match on.
        let typed = std::error::Error::source(status)
            .and_then(|e| e.downcast_ref::<meshlb::balance::Unavailable>())
            .map(|u| u.reason);
        assert_eq!(
            typed,
            Some(meshlb::balance::unavailable::Reason::Unhealthy),
            "{status:?}"
        );
    }
    // A recovered replica ends fail-fast.
    set_serving(replicas[2].admin, true).await;
    eventually("calls succeed again", || async {
        drive(&lb, 3, 3).await.errors.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn malformed_target_is_a_clear_error() {
    let err = crate::support::userguide("ipv4:not-an-ip:50051")
        .build_lazy()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not-an-ip"), "{err}");
    let err = crate::support::userguide("users.local")
        .build_lazy()
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing port"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_bounds_a_call_to_a_slow_replica() {
    let replicas = three([latency(2000), latency(2000), latency(2000)]).await;
    let lb = crate::support::userguide(target(&replicas))
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    // With no endpoint ready yet, the deadline would rightly answer UNAVAILABLE with the reason;
    // this test is about ready endpoints that answer too slowly.
    eventually("every endpoint is ready", || async {
        all_in(&lb, EndpointState::Ready).then_some(())
    })
    .await;
    let tally = tokio::time::timeout(crate::support::DEADLINE, drive(&lb, 2, 2))
        .await
        .expect("no hang");
    assert_eq!(tally.errors.len(), 2);
    assert!(
        tally
            .errors
            .iter()
            .all(|s| s.code() == Code::DeadlineExceeded),
        "{:?}",
        tally.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_is_hedged_to_another_replica_within_the_budget() {
    use meshlb::balance::{HedgeConfig, HedgeDelay, OutlierConfig};
    let replicas = three([latency(0), latency(0), latency(400)]).await;
    // No service config: meshlb's adaptive hedging alone, drawing on its retry budget.
    let lb = Balancer::builder(target(&replicas))
        .health_service(SERVICE)
        // Hedging alone: no outlier ejection to take the slow replica out first.
        .outlier(OutlierConfig {
            enabled: false,
            ..OutlierConfig::default()
        })
        .hedge(HedgeConfig {
            delay: HedgeDelay::Fixed(Duration::from_millis(30)),
            ..HedgeConfig::default()
        })
        .build()
        .await
        .unwrap();
    let tally = drive(&lb, 200, 4).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    let (hedges, wins) = lb.hedges();
    assert!(wins > 0, "hedges {hedges}, wins {wins}");
    // Every hedge draws on the retry budget: at most 20 % of calls plus 10 per second.
    assert!(hedges <= 200 / 5 + 10 * 10, "{hedges} hedges for 200 calls");

    let off = crate::support::userguide(target(&replicas))
        .hedge(HedgeConfig {
            delay: HedgeDelay::Off,
            ..HedgeConfig::default()
        })
        .build()
        .await
        .unwrap();
    drive(&off, 50, 4).await;
    assert_eq!(off.hedges(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_service_config_makes_calls_retried() {
    let flaky = FaultConfig {
        fail_rate: 0.3,
        ..FaultConfig::default()
    };
    let replicas = three([flaky, flaky, flaky]).await;
    // A library user who gives no config gets no retries, whatever the service.
    let bare = Balancer::builder(target(&replicas))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .build()
        .await
        .unwrap();
    let tally = drive(&bare, 200, 4).await;
    assert_eq!(bare.retries(), 0);
    let failed = tally.errors.len();
    assert!(
        (30..=100).contains(&failed),
        "{failed} of 200 failed without retries"
    );
    assert!(tally.errors.iter().all(|s| s.code() == Code::Unavailable));
    // The UserGuide service config retries UNAVAILABLE (3 attempts): about 2.7 % fail.
    let configured = crate::support::userguide(target(&replicas))
        .build()
        .await
        .unwrap();
    let tally = drive(&configured, 200, 4).await;
    assert!(
        configured.retries() > 30,
        "{} retries",
        configured.retries()
    );
    assert!(tally.errors.len() <= 20, "{:?}", tally.errors);
    // A bad config is an error naming its field, before anything starts.
    let error = Balancer::builder(target(&replicas))
        .service_config(r#"{"methodConfig": [{"name": [{}], "timeout": "soon"}]}"#)
        .unwrap_err();
    assert_eq!(error.field, "methodConfig[0].timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedging_policy_hedges_and_a_fast_non_fatal_failure_hedges_at_once() {
    let failing = FaultConfig {
        fail_rate: 1.0,
        ..FaultConfig::default()
    };
    // In address order, as round-robin takes them: failing, slow, fast.
    let replicas = three([failing, latency(300), latency(0)]).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "userguide.v1.UserGuideService"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.02s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}],
        "loadBalancingConfig": [{"round_robin": {}}]}"#;
    // Failure accrual off, so the failing replica keeps its share of the calls.
    let lb = Balancer::builder(target(&replicas))
        .health_service(SERVICE)
        .accrual(meshlb::balance::AccrualConfig {
            threshold: u32::MAX,
            ..Default::default()
        })
        .service_config(config)
        .unwrap()
        .build()
        .await
        .unwrap();
    assert_eq!(
        lb.policy(),
        Policy::RoundRobin,
        "the config chose the policy"
    );
    all_ready(&lb, 3).await;
    let tally = drive(&lb, 60, 1).await;
    // Every other call goes to the failing replica: it fails at once with a non-fatal
    // UNAVAILABLE, before the hedging delay, and is hedged then, to the next replica in turn (the
    // slow one), whose answer is the call's; the calls in between go to the fast one. Without
    // hedging about 30 would fail; a couple are allowed for a loaded machine.
    let (hedges, wins) = lb.hedges();
    assert!(hedges >= 25, "{hedges} hedges for 60 calls");
    assert!(wins >= 25, "{wins} of {hedges} hedges answered");
    assert!(
        tally.errors.len() <= 2,
        "{} failed: {:?}",
        tally.errors.len(),
        tally.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn your_own_discovery_stream_adds_and_removes_endpoints() {
    use tower::discover::Change;
    let replicas = three([latency(0), latency(0), latency(0)]).await;
    let (changes, discovered) = tokio::sync::mpsc::unbounded_channel();
    for r in &replicas[..2] {
        changes.send(Change::Insert(r.addr, ())).unwrap();
    }
    // The target only names the balancer: it need not parse as one.
    let lb = crate::support::userguide("my registry")
        .health_service(SERVICE)
        .discovery(tokio_stream::wrappers::UnboundedReceiverStream::new(
            discovered,
        ))
        .build()
        .await
        .unwrap();
    all_ready(&lb, 2).await;
    let tally = drive(&lb, 60, 3).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert!(tally.of(&replicas[0].id) > 0 && tally.of(&replicas[1].id) > 0);
    assert_eq!(tally.of(&replicas[2].id), 0);
    // The registry adds the third and removes the first.
    changes.send(Change::Insert(replicas[2].addr, ())).unwrap();
    changes.send(Change::Remove(replicas[0].addr)).unwrap();
    eventually("the third endpoint is ready and the first gone", || async {
        let e = lb.endpoints();
        (e.len() == 2
            && e.iter()
                .any(|e| e.addr == replicas[2].addr && e.state == EndpointState::Ready))
        .then_some(())
    })
    .await;
    let tally = drive(&lb, 60, 3).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of(&replicas[0].id), 0);
    assert!(tally.of(&replicas[2].id) > 0);
}

/// `random_subsetting_experimental` (gRFC A68) from the service config: of five discovered replicas the
/// balancer connects to two and only those serve; when a member goes away, the next in the
/// client's ranking takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_of_the_fleet_serves_and_a_lost_member_is_replaced() {
    use tower::discover::Change;
    let replicas = fleet("s", vec![latency(0); 5]).await;
    let (changes, discovered) = tokio::sync::mpsc::unbounded_channel();
    for r in &replicas {
        changes.send(Change::Insert(r.addr, ())).unwrap();
    }
    let config = r#"{"loadBalancingConfig": [{"random_subsetting_experimental": {"subsetSize": 2,
        "childPolicy": [{"round_robin": {}}]}}]}"#;
    let lb = crate::support::userguide("a large fleet")
        .service_config(config)
        .unwrap()
        .discovery(tokio_stream::wrappers::UnboundedReceiverStream::new(
            discovered,
        ))
        .build()
        .await
        .unwrap();
    let members = || {
        let mut addrs: Vec<_> = lb.endpoints().iter().map(|e| e.addr).collect();
        addrs.sort();
        addrs
    };
    let ready_pair = || async {
        let e = lb.endpoints();
        (e.len() == 2 && e.iter().all(|e| e.state == EndpointState::Ready)).then_some(())
    };
    eventually("two members, both ready", ready_pair).await;
    let first = members();
    let id_of = |addr| &replicas.iter().find(|r| r.addr == addr).unwrap().id;
    let tally = drive(&lb, 40, 2).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.by_replica.len(), 2, "{:?}", tally.by_replica);
    for addr in &first {
        assert!(tally.of(id_of(*addr)) > 0, "{:?}", tally.by_replica);
    }

    changes.send(Change::Remove(first[0])).unwrap();
    eventually("the lost member replaced", || async {
        let now = members();
        (now.len() == 2 && !now.contains(&first[0]) && now.contains(&first[1])).then_some(())
    })
    .await;
    eventually("two members, both ready", ready_pair).await;
    let second = members();
    let tally = drive(&lb, 40, 2).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of(id_of(first[0])), 0);
    for addr in &second {
        assert!(tally.of(id_of(*addr)) > 0, "{:?}", tally.by_replica);
    }
}

/// p2c's aperture over eight replicas with a minimum of two: a light load is served by two
/// members and no other replica is connected to; twelve calls in flight widen it to the whole
/// fleet; at five it narrows with calls on the members it lets go (none fails); when the load
/// stops it narrows back to two; a member that stops serving is replaced, so two stay in
/// rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aperture_follows_the_load_and_keeps_its_minimum_in_rotation() {
    let replicas = fleet("a", vec![latency(20); 8]).await;
    let lb = crate::support::userguide(target(&replicas))
        .health_service(SERVICE)
        .aperture(ApertureConfig {
            min: 2,
            window: Duration::from_millis(300),
            interval: Duration::from_millis(20),
            narrow_after: Duration::from_millis(200),
            ..ApertureConfig::default()
        })
        .build()
        .await
        .unwrap();
    let ready = |n: usize| {
        let lb = lb.clone();
        async move {
            let e = lb.endpoints();
            (lb.aperture() == Some(n)
                && e.len() == n
                && e.iter().all(|e| e.state == EndpointState::Ready))
            .then_some(())
        }
    };
    eventually("an aperture of two, both ready", || ready(2)).await;
    let light = drive(&lb, 30, 1).await;
    assert!(light.errors.is_empty(), "{:?}", light.errors);
    assert!(light.by_replica.len() <= 2, "{:?}", light.by_replica);

    // Twelve in flight: 12 / 1.125 members wanted, more than the fleet has.
    let stop = Arc::new(AtomicBool::new(false));
    let heavy = background_load(lb.clone(), stop.clone(), 12);
    eventually("the aperture widened to the whole fleet", || ready(8)).await;
    // Calls reach the new members too, not only the first two.
    eventually("calls served by most of the fleet", || async {
        let served = lb.endpoints().iter().filter(|e| e.served > 0).count();
        (served >= 6).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let tally = heavy.await.unwrap();
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);

    // Five in flight: members are let go while calls are on them, and none of those fails.
    let stop = Arc::new(AtomicBool::new(false));
    let medium = background_load(lb.clone(), stop.clone(), 5);
    eventually("narrowed under load", || async {
        (lb.aperture().is_some_and(|n| n <= 6) && lb.endpoints().len() <= 6).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let tally = medium.await.unwrap();
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert!(tally.ok() > 0);

    eventually("narrowed back to two", || ready(2)).await;

    // A member stops serving: one more joins, so two are in rotation again.
    let member = lb.endpoints()[0].addr;
    let sick = replicas.iter().find(|r| r.addr == member).unwrap();
    set_serving(sick.admin, false).await;
    eventually("the sick member replaced", || async {
        let e = lb.endpoints();
        let in_rotation = e.iter().filter(|e| e.state == EndpointState::Ready).count();
        (e.len() == 3 && in_rotation == 2 && lb.aperture() == Some(3)).then_some(())
    })
    .await;
    let tally = drive(&lb, 30, 2).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of(&sick.id), 0, "{:?}", tally.by_replica);
}

/// Two clients that know their places among two (`0/2`, `1/2`), each with an aperture of one
/// under a light load, over six replicas: each takes its slice of the ring, three replicas, and
/// the slices are the two halves of the fleet, so every replica serves one client's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_apertures_split_the_fleet_between_their_clients() {
    let replicas = fleet("p", vec![latency(0); 6]).await;
    let mut served = Vec::new();
    for index in 0..2 {
        let lb = crate::support::userguide(target(&replicas))
            .health_service(SERVICE)
            .aperture(ApertureConfig {
                min: 1,
                interval: Duration::from_millis(20),
                ..ApertureConfig::default()
            })
            .coordinate(Coordinate::new(index, 2).unwrap())
            .build()
            .await
            .unwrap();
        eventually("its slice of three, all ready", || async {
            let e = lb.endpoints();
            (lb.aperture() == Some(3)
                && e.len() == 3
                && e.iter().all(|e| e.state == EndpointState::Ready))
            .then_some(())
        })
        .await;
        let tally = drive(&lb, 60, 3).await;
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        let mut ids: Vec<String> = tally.by_replica.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids.len(), 3, "{index}/2: {:?}", tally.by_replica);
        served.push(ids);
    }
    assert!(
        served[0].iter().all(|id| !served[1].contains(id)),
        "the halves overlap: {served:?}"
    );
}

/// By default (p2c or round-robin), with an aperture turned off, and with pick-first even when
/// given one, every endpoint is connected to; with an aperture whose minimum is above the
/// fleet's size, the fleet is used whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_aperture_or_below_its_minimum_every_endpoint_is_used() {
    let replicas = three(Default::default()).await;
    let off = ApertureConfig {
        enabled: false,
        min: 1,
        ..ApertureConfig::default()
    };
    let builders = [
        (crate::support::userguide(target(&replicas)), None),
        (
            crate::support::userguide(target(&replicas)).policy(Policy::RoundRobin),
            None,
        ),
        (
            crate::support::userguide(target(&replicas)).aperture(off),
            None,
        ),
        // Pick-first uses one endpoint however many calls are in flight: no aperture.
        (
            crate::support::userguide(target(&replicas))
                .policy(Policy::PickFirst)
                .aperture(ApertureConfig::default()),
            None,
        ),
        // The default minimum, 12, is above 3.
        (
            crate::support::userguide(target(&replicas)).aperture(ApertureConfig::default()),
            Some(3),
        ),
    ];
    for (builder, aperture) in builders {
        let lb = builder.build().await.unwrap();
        eventually("every endpoint ready, the aperture as expected", || async {
            let e = lb.endpoints();
            (e.len() == 3
                && e.iter().all(|e| e.state == EndpointState::Ready)
                && lb.aperture() == aperture)
                .then_some(())
        })
        .await;
    }
}

/// A config that retries every method (`"name": [{}]`) must not hold a live stream back: a
/// bidirectional call whose caller writes its next message only after the answer to the last
/// goes through message by message (waiting for the request's end to keep it would deadlock).
#[tokio::test]
async fn a_live_stream_is_sent_as_it_comes_even_under_a_retry_policy() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };
    let r = Replica::start("127.0.0.1", "stream-1", FaultConfig::default()).await;
    let config = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 3,
        "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let lb = Balancer::builder(crate::support::ipv4_target(&[r.addr]))
        .service_config(config)
        .unwrap()
        .build()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let ask = |symbol: &str| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    tx.send(ask("userguide.v1.User")).await.unwrap();
    let exchange = async {
        let mut answers = ServerReflectionClient::new(lb.clone())
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = answers.message().await.unwrap().expect("a first answer");
        // Only now the caller writes its second message.
        tx.send(ask("userguide.v1.Point")).await.unwrap();
        let second = answers.message().await.unwrap().expect("a second answer");
        drop(tx);
        (first, second, answers.message().await.unwrap())
    };
    let (first, second, end) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the stream is not held back");
    assert!(first.message_response.is_some() && second.message_response.is_some());
    assert!(
        end.is_none(),
        "the stream ends when the caller stops writing"
    );
    r.stop().await;
}

/// Drives load until `slow` is ejected as a latency outlier; every call has ended on return.
async fn ejected_under_load(lb: &Balancer, slow: &Replica) {
    eventually(
        "the slow replica is ejected as a latency outlier",
        || async {
            drive(lb, 30, 6).await;
            (state_of(lb, slow.addr) == Some(EndpointState::EjectedLatency)).then_some(())
        },
    )
    .await;
}

/// Calls of `method` a replica answered, as its own metrics count them.
async fn answered(replica: &Replica, method: &str) -> u64 {
    let (_, text) = crate::support::http_get(replica.metrics, "/metrics").await;
    let method = format!("grpc_method=\"{method}\"");
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(&method))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Three replicas behind `lb`'s builder; the first turns slow (200 ms) once every replica has
/// answered a few calls, and is driven out as a latency outlier. Returns the replicas and the
/// balancer, every call ended.
async fn one_ejected(
    builder: impl FnOnce(String) -> meshlb::balance::Builder,
) -> (Vec<Replica>, Balancer) {
    // Far slower than the fast ones even when a loaded machine slows them to tens of
    // milliseconds: then a probe of it is judged too slow, and it rightly stays out.
    let replicas = three([latency(0), latency(0), latency(0)]).await;
    let lb = builder(target(&replicas))
        .health_service(SERVICE)
        .build()
        .await
        .unwrap();
    // Fast at first, so that it has the answers an estimate needs before it is judged: slow from
    // the start, p2c would keep it under the outlier detector's minimum of samples (its first
    // 200 ms answer holds its peak high for longer than the test runs), and it would never be
    // ejected at all.
    eventually("every replica has answered a few calls", || async {
        let tally = drive(&lb, 60, 6).await;
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        (replicas.iter().all(|r| tally.of(&r.id) >= 5)).then_some(())
    })
    .await;
    set_faults(replicas[0].admin, latency(200)).await;
    ejected_under_load(&lb, &replicas[0]).await;
    (replicas, lb)
}

/// Drives load until the slow replica has answered two more calls of `method` (its probes);
/// asserts that no caller's call was answered by it meanwhile.
async fn probed_without_a_caller(lb: &Balancer, slow: &Replica, method: &str) {
    // Every call dispatched so far has ended: from here, what the slow replica answers is probes.
    let before = answered(slow, method).await;
    let (by_slow, calls) = (
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    );
    eventually("two probes of the ejected replica", || async {
        let tally = drive(lb, 60, 6).await;
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        by_slow.fetch_add(tally.of(&slow.id), Ordering::Relaxed);
        calls.fetch_add(tally.ok(), Ordering::Relaxed);
        (answered(slow, method).await >= before + 2).then_some(())
    })
    .await;
    assert_eq!(
        by_slow.load(Ordering::Relaxed),
        0,
        "callers waited for the slow replica's probes ({} calls); endpoints now: {:?}",
        calls.load(Ordering::Relaxed),
        lb.endpoints()
    );
}

/// An ejected replica is still probed (it gets calls), but with a method that may be duplicated
/// the probe is a copy: no caller waits for the slow replica, however many probes it gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_an_ejected_replica_never_cost_a_caller() {
    // The UserGuide config retries GetPoint: its calls may be duplicated.
    let (replicas, lb) = one_ejected(crate::support::userguide).await;
    probed_without_a_caller(&lb, &replicas[0], "GetPoint").await;
}

/// With no service config, no call may be duplicated: none is ever a probe. The balancer sends
/// the call it was told to probe with instead (here a GetPoint of its own, which the slow
/// replica answers slowly: it stays out), and the caller's call goes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_may_not_be_duplicated_is_never_a_probe() {
    let (replicas, lb) = one_ejected(|target| {
        meshlb::Balancer::builder(target).probe(meshlb::load::get_point_probe())
    })
    .await;
    probed_without_a_caller(&lb, &replicas[0], "GetPoint").await;
}

/// The default probe of a call that may not be duplicated is a health `Check`: the slow
/// replica's server answers it at once (its injected latency is its handlers'), so it comes
/// back on trust, without a caller having waited for its judgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_probe_is_a_health_check() {
    let (replicas, lb) = one_ejected(meshlb::Balancer::builder).await;
    let slow = &replicas[0];
    // The health watch asks `Watch`; any `Check` is a probe. Counted from the start, not from
    // now: on a loaded machine the probe may already have been sent. `Ready` comes once a probe
    // answered in time; the Check is waited for too, to know it was the probe that did.
    eventually(
        "the slow replica back in rotation after a health check",
        || async {
            let tally = drive(&lb, 30, 6).await;
            assert!(tally.errors.is_empty(), "{:?}", tally.errors);
            (state_of(&lb, slow.addr) == Some(EndpointState::Ready)
                && answered(slow, "Check").await > 0)
                .then_some(())
        },
    )
    .await;
    assert!(
        answered(slow, "Check").await > 0,
        "a Check was its probe; endpoints now: {:?}",
        lb.endpoints()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_balancer_is_not_ready_until_an_answer_ends() {
    use meshlb::proto::userguide::v1::{
        user_guide_service_client::UserGuideServiceClient, ListUsersRequest, Point,
    };
    let replica = Replica::start("127.0.0.2", "bp-1", FaultConfig::default()).await;
    let lb = crate::support::userguide(format!("ipv4:{}", replica.addr))
        .health_service(SERVICE)
        .max_in_flight(1)
        .build()
        .await
        .unwrap();
    // One stream open and not yet read to its end: the balancer is full.
    let mut first = UserGuideServiceClient::new(lb.clone());
    let stream = first
        .list_users(ListUsersRequest {
            point: Some(Point { value: 1000 }),
        })
        .await
        .unwrap()
        .into_inner();
    // The balancer itself says so: not ready, which is what tonic's `ready()` waits on.
    let mut probe = lb.clone();
    let mut ready = tokio_test::task::spawn(std::future::poll_fn(|cx| {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut probe, cx)
    }));
    assert!(ready.poll().is_pending(), "a full balancer is not ready");
    // Its place in the queue goes with it (a clone that waited keeps its turn).
    drop(ready);
    drop(probe);
    let mut second = UserGuideServiceClient::new(lb.clone());
    let mut waiting =
        tokio_test::task::spawn(second.get_point(crate::support::get_point_request()));
    assert!(
        waiting.poll().is_pending(),
        "a second call waits in ready() while the stream is open"
    );
    assert!(!waiting.is_woken());
    // The stream's end frees its slot, and the waiting caller goes on.
    drop(stream);
    eventually("the waiting call is woken", || async {
        waiting.is_woken().then_some(())
    })
    .await;
    let answer = tokio::time::timeout(crate::support::DEADLINE, waiting)
        .await
        .expect("the call ends");
    assert!(answer.is_ok(), "{answer:?}");
}
