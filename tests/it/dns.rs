//! DNS discovery against a real DNS server on loopback whose answers the test changes.

use crate::dns_server::{DnsServer, Mode};
use crate::support::{drive, eventually, Replica};
use meshlb::discovery::DnsConfig;
use meshlb::replica::ReplicaConfig;
use std::net::Ipv4Addr;
use std::time::Duration;
use tonic::Code;

/// Two replicas on one port, on 127.0.0.2 and 127.0.0.3, like two pods of a headless Service.
async fn pods() -> (Replica, Replica, u16) {
    let mut listeners = crate::support::one_port(&[A.into(), B.into()])
        .await
        .into_iter();
    let (Some(a), Some(b)) = (listeners.next(), listeners.next()) else {
        panic!("one_port gives a listener per address");
    };
    let config = |id: &str, grace| {
        let mut config = ReplicaConfig::new(id, crate::support::users());
        config.drain_grace = Duration::from_millis(grace);
        config
    };
    let first = Replica::serve(a, config("pod-a", 200)).await;
    let second = Replica::serve(b, config("pod-b", 100)).await;
    let port = first.addr.port();
    (first, second, port)
}

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn dns_config() -> DnsConfig {
    DnsConfig {
        query_timeout: Duration::from_millis(300),
        backoff_max: Duration::from_millis(500),
        ..DnsConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_dns_answers_and_survives_a_dns_outage() {
    let (a, b, port) = pods().await;
    let dns = DnsServer::start(Mode::Records(vec![A])).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = meshlb::balance::Metrics::register(&mut registry);
    let lb = crate::support::userguide(format!("dns://{}/users.mesh.test:{port}", dns.addr))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .dns(dns_config())
        .metrics(&metrics)
        .build()
        .await
        .unwrap();
    let tally = drive(&lb, 30, 3).await;
    assert_eq!(
        tally.of(&a.id),
        30,
        "{:?} {:?}",
        tally.by_replica,
        tally.errors
    );

    // Scale up: the new pod gets traffic once the 1 s TTL runs out.
    dns.set(Mode::Records(vec![A, B]));
    eventually("the new pod gets calls", || async {
        (drive(&lb, 30, 3).await.of(&b.id) > 0).then_some(())
    })
    .await;

    // Scale down: the removed pod gets nothing more.
    dns.set(Mode::Records(vec![B]));
    eventually("the removed pod leaves", || async {
        (lb.endpoints().len() == 1).then_some(())
    })
    .await;
    let tally = drive(&lb, 40, 4).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of(&a.id), 0);

    // DNS down, then SERVFAIL: the last good set keeps serving.
    for mode in [Mode::Silent, Mode::ServFail] {
        let silent = matches!(mode, Mode::Silent);
        dns.set(mode);
        let seen = dns.queries();
        eventually("discovery asks again and fails", || async {
            (dns.queries() >= seen + 2).then_some(())
        })
        .await;
        let tally = drive(&lb, 40, 4).await;
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert_eq!(tally.of(&b.id), 40);
        if silent {
            eventually("a failed lookup is counted", || async {
                (sample(&registry, "meshlb_discovery_dns_errors_total{") >= 1.0).then_some(())
            })
            .await;
        }
    }

    // Scaled to zero: everything is removed and calls fail fast, saying why.
    dns.set(Mode::Records(vec![]));
    eventually("every endpoint is removed", || async {
        lb.endpoints().is_empty().then_some(())
    })
    .await;
    let tally = drive(&lb, 2, 2).await;
    assert_eq!(tally.errors.len(), 2);
    // The metrics saw it all: two pods added, both removed, and the two calls failed fast for
    // want of endpoints (failed lookups are checked during the outage, above).
    assert_eq!(
        sample(&registry, "meshlb_discovery_endpoints_added_total{"),
        2.0
    );
    assert_eq!(
        sample(&registry, "meshlb_discovery_endpoints_removed_total{"),
        2.0
    );
    assert_eq!(
        sample_with(
            &registry,
            "meshlb_balancer_fail_fast_total{",
            "reason=\"no_endpoints\""
        ),
        2.0
    );
    for status in tally.errors {
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("no endpoints for dns://"),
            "{}",
            status.message()
        );
    }
}

/// The cluster shape without a cluster: pods on 127.0.0.2-4 behind one DNS name, then a rolling
/// restart the way a Deployment does it (surge one new pod, add it to DNS, drain an old one,
/// remove it from DNS), under steady load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // Three old pods on 127.0.0.2-4 and their replacements on .5-.7, all on one port, held
    // from the start so that no other test takes it at an address before its pod starts.
    let ips: Vec<std::net::IpAddr> = (2..=7)
        .map(|l| Ipv4Addr::new(127, 0, 0, l).into())
        .collect();
    let mut listeners = crate::support::one_port(&ips).await.into_iter();
    let mut start_pod = move |id: String| {
        let listener = listeners.next();
        async move {
            let mut config = ReplicaConfig::new(id, crate::support::users());
            config.drain_grace = Duration::from_millis(1500);
            Replica::serve(listener.expect("a listener per pod"), config).await
        }
    };
    let mut old = Vec::new();
    for last in [2u8, 3, 4] {
        old.push(start_pod(format!("old-{last}")).await);
    }
    let port = old[0].addr.port();
    let mut records: Vec<Ipv4Addr> = (2..=4).map(|l| Ipv4Addr::new(127, 0, 0, l)).collect();
    let dns = DnsServer::start(Mode::Records(records.clone())).await;
    let lb = crate::support::userguide(format!(
        "dns://{}/users.meshlb.svc.cluster.local:{port}",
        dns.addr
    ))
    .health_service(meshlb::proto::USERGUIDE_SERVICE)
    .dns(dns_config())
    .build()
    .await
    .unwrap();
    eventually("all three pods are ready", || async {
        (lb.endpoints().len() == 3).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (lb, stop) = (lb.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut calls = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = drive(&lb, 12, 4).await;
                calls += t.ok() + t.errors.len();
                failures.extend(t.errors);
            }
            (calls, failures)
        })
    };

    let mut new_ids = Vec::new();
    let mut new_pods = Vec::new();
    for (i, old_pod) in old.into_iter().enumerate() {
        // Surge: the replacement starts, turns ready and enters DNS...
        let last = 5 + i as u8;
        let id = format!("new-{last}");
        let replacement = start_pod(id.clone()).await;
        records.push(Ipv4Addr::new(127, 0, 0, last));
        dns.set(Mode::Records(records.clone()));
        eventually("the replacement is discovered and ready", || async {
            (crate::support::state_of(&lb, replacement.addr)
                == Some(meshlb::balance::EndpointState::Ready))
            .then_some(())
        })
        .await;
        // ...then the old pod drains (NOT_SERVING first) and leaves DNS, as the endpoints
        // controller removes a terminating pod.
        let old_ip = match old_pod.addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("unexpected {other}"),
        };
        records.retain(|ip| *ip != old_ip);
        dns.set(Mode::Records(records.clone()));
        old_pod.stop().await;
        new_ids.push(id);
        new_pods.push(replacement);
    }
    eventually("only the new pods remain", || async {
        (lb.endpoints().len() == 3).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (calls, failures) = load.await.unwrap();
    assert!(calls > 100, "load ran: {calls} calls");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        failures.first()
    );

    let after = drive(&lb, 60, 4).await;
    assert!(after.errors.is_empty());
    assert_eq!(after.ok(), 60);
    for id in after.by_replica.keys() {
        assert!(
            new_ids.contains(id),
            "an old pod still served: {:?}",
            after.by_replica
        );
    }
    for pod in new_pods {
        pod.stop().await;
    }
}

/// The first sample whose series starts with `series` (its name and the start of its labels), in
/// `registry`'s current text.
fn sample(registry: &prometheus_client::registry::Registry, series: &str) -> f64 {
    sample_with(registry, series, "")
}

/// Like [`sample`], for the first such series that also contains `labels`.
fn sample_with(
    registry: &prometheus_client::registry::Registry,
    series: &str,
    labels: &str,
) -> f64 {
    let text = meshlb::metrics::encode(registry);
    text.lines()
        .filter(|l| l.starts_with(series))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// gRPC's service config in DNS: the `_grpc_config` TXT record turns retries on for a balancer
/// built without any; a bad record keeps the last good config; no record, the built-in one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_config_txt_record_sets_the_policies_and_a_bad_one_keeps_the_last_good() {
    let faults = meshlb::replica::FaultConfig {
        fail_rate: 0.1,
        ..Default::default()
    };
    let replica = Replica::start("127.0.0.2", "pod-a", faults).await;
    let port = replica.addr.port();
    let dns = DnsServer::start(Mode::Records(vec![A])).await;
    let retries = r#"grpc_config=[{"clientLanguage": ["rust"], "serviceConfig": {"methodConfig": [
        {"name": [{"service": "userguide.v1.UserGuideService"}],
         "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.001s", "maxBackoff": "0.01s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}}]"#;
    dns.set_txt(Some(retries.to_owned()));
    // No service config of its own: without DNS's, nothing is retried.
    let lb = meshlb::Balancer::builder(format!("dns://{}/users.mesh.test:{port}", dns.addr))
        .dns(DnsConfig {
            service_config: true,
            ..dns_config()
        })
        .build()
        .await
        .unwrap();
    let path = "/userguide.v1.UserGuideService/GetPoint";
    let retried = |lb: &meshlb::Balancer| {
        lb.service_config()
            .method(path)
            .is_some_and(|m| m.retry.is_some())
    };
    eventually("the record's retry policy is in force", || async {
        retried(&lb).then_some(())
    })
    .await;
    let with = drive(&lb, 200, 4).await;
    assert!(with.errors.len() <= 2, "with retries: {:?}", with.errors);

    // A bad record (an unknown field in a choice): the last good config stays. Read leniently,
    // it would have no choice for Rust, and turn retries off.
    let seen = dns.queries();
    dns.set_txt(Some(
        r#"grpc_config=[{"clientLanguage": ["go"], "bogus": 1, "serviceConfig": {}}]"#.to_owned(),
    ));
    eventually("discovery reads the bad record", || async {
        (dns.queries() >= seen + 6).then_some(())
    })
    .await;
    assert!(retried(&lb), "a bad record keeps the last good config");

    // No record: the balancer's own config (none), so the replica's failures reach the caller.
    dns.set_txt(None);
    eventually("the record's policy is gone", || async {
        (!retried(&lb)).then_some(())
    })
    .await;
    let without = drive(&lb, 200, 4).await;
    assert!(
        without.errors.len() >= 5,
        "without retries about 10 % fail: {} of 200",
        without.errors.len()
    );
    assert!(without.errors.iter().all(|s| s.code() == Code::Unavailable));
}
