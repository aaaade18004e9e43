//! DNS discovery against a real DNS server on loopback whose answers the test changes.

use crate::dns_server::{DnsServer, Mode};
use crate::support::{drive, eventually, Replica};
use meshlb::discovery::DnsConfig;
use meshlb::replica::ReplicaConfig;
use meshlb::Balancer;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tonic::Code;

/// Two replicas on one port, on 127.0.0.2 and 127.0.0.3, like two pods of a headless Service.
async fn pods() -> (Replica, Replica, u16) {
    let first = Replica::start("127.0.0.2", "pod-a", Default::default()).await;
    let port = first.addr.port();
    let mut config = ReplicaConfig::new("pod-b", crate::support::users());
    config.drain_grace = Duration::from_millis(100);
    let second = Replica::start_on(SocketAddr::from(([127, 0, 0, 3], port)), config).await;
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
    let lb = Balancer::builder(format!("dns://{}/users.mesh.test:{port}", dns.addr))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .dns(dns_config())
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
        dns.set(mode);
        let seen = dns.queries();
        eventually("discovery asks again and fails", || async {
            (dns.queries() >= seen + 2).then_some(())
        })
        .await;
        let tally = drive(&lb, 40, 4).await;
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert_eq!(tally.of(&b.id), 40);
    }

    // Scaled to zero: everything is removed and calls fail fast, saying why.
    dns.set(Mode::Records(vec![]));
    eventually("every endpoint is removed", || async {
        lb.endpoints().is_empty().then_some(())
    })
    .await;
    let tally = drive(&lb, 2, 2).await;
    assert_eq!(tally.errors.len(), 2);
    for status in tally.errors {
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("no endpoints for dns://"),
            "{}",
            status.message()
        );
    }
}
