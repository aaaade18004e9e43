//! TLS and mTLS across the mesh: the balancer, health gate and retries work the same over TLS,
//! and every wrong combination is refused with a reason instead of hanging.

use crate::support::{drive, users, Replica};
use meshlb::balance::EndpointState;
use meshlb::replica::ReplicaConfig;
use meshlb::tls::{write_certs, CertPaths, ClientTls, ServerTls};
use meshlb::Balancer;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

fn certs(name: &str) -> CertPaths {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("meshlb-it-tls-{name}-{}", std::process::id()));
    let names: Vec<String> = ["localhost", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    write_certs(&dir, &names).unwrap()
}

async fn tls_replicas(paths: &CertPaths, mtls: bool) -> Vec<Replica> {
    let server = ServerTls {
        cert: paths.server_cert.clone(),
        key: paths.server_key.clone(),
        client_ca: mtls.then(|| paths.ca.clone()),
    }
    .config()
    .unwrap();
    let mut replicas = Vec::new();
    for i in 2..=4 {
        let mut config = ReplicaConfig::new(format!("tls-{i}"), users());
        config.tls = Some(server.clone());
        config.drain_grace = Duration::from_millis(100);
        replicas.push(Replica::start_with(&format!("127.0.0.{i}"), config).await);
    }
    replicas
}

fn target(replicas: &[Replica]) -> String {
    crate::support::ipv4_target(&replicas.iter().map(|r| r.addr).collect::<Vec<_>>())
}

fn client(paths: &CertPaths, identity: bool, server_name: Option<&str>) -> ClientTls {
    ClientTls {
        ca: paths.ca.clone(),
        identity: identity.then(|| (paths.client_cert.clone(), paths.client_key.clone())),
        server_name: server_name.map(str::to_owned),
    }
}

async fn lb(target: String, tls: Option<ClientTls>) -> Balancer {
    let mut builder = crate::support::userguide(target)
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .ready_wait(Duration::from_millis(1500));
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    builder.build().await.unwrap()
}

/// Every call fails with UNAVAILABLE, quickly, and the message says why.
async fn refused(lb: &Balancer, why: &str) {
    let tally = tokio::time::timeout(crate::support::DEADLINE, drive(lb, 2, 2))
        .await
        .expect("refused calls end instead of hanging");
    assert_eq!(tally.ok(), 0);
    for status in &tally.errors {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains(why),
            "expected {why:?} in {:?}",
            status.message()
        );
    }
    assert!(lb
        .endpoints()
        .iter()
        .all(|e| e.state != EndpointState::Ready));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_through_the_balancer_across_three_replicas() {
    let paths = certs("mtls");
    let replicas = tls_replicas(&paths, true).await;
    let lb = lb(target(&replicas), Some(client(&paths, true, None))).await;
    // The health gate runs over the same TLS connections: every endpoint is ready (waited for,
    // since the balancer calls once one is, and a debug build's handshakes are slow).
    crate::support::eventually("every endpoint is ready", || async {
        let endpoints = lb.endpoints();
        (endpoints.len() == 3 && endpoints.iter().all(|e| e.state == EndpointState::Ready))
            .then_some(())
    })
    .await;
    let tally = drive(&lb, 150, 6).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    for r in &replicas {
        assert!(tally.of(&r.id) > 0, "{:?}", tally.by_replica);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_server_name_for_ip_endpoints() {
    let paths = certs("name");
    let replicas = tls_replicas(&paths, false).await;
    // The endpoints are IPs; the certificate also carries "localhost": verify that name.
    let lb = lb(
        target(&replicas),
        Some(client(&paths, false, Some("localhost"))),
    )
    .await;
    let tally = drive(&lb, 30, 3).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);

    let wrong = self::lb(
        target(&replicas),
        Some(client(&paths, false, Some("evil.example"))),
    )
    .await;
    refused(&wrong, "not valid for name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_peers_are_refused_with_a_reason() {
    let paths = certs("refuse");
    let other = certs("other-ca");
    let mtls = tls_replicas(&paths, true).await;

    // No client certificate for an mTLS replica.
    let anonymous = lb(target(&mtls), Some(client(&paths, false, None))).await;
    refused(&anonymous, "127.0.0.").await;

    // A CA that did not sign the replicas' certificates.
    let untrusted = lb(target(&mtls), Some(client(&other, true, None))).await;
    refused(&untrusted, "invalid peer certificate").await;

    // Plaintext against TLS, and TLS against plaintext.
    let plaintext = lb(target(&mtls), None).await;
    refused(&plaintext, "127.0.0.").await;
    let plain_replica = Replica::start("127.0.0.2", "plain", Default::default()).await;
    let tls_to_plain = lb(
        format!("ipv4:{}", plain_replica.addr),
        Some(client(&paths, true, None)),
    )
    .await;
    refused(&tls_to_plain, &plain_replica.addr.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_replica_answers_health_in_plaintext_on_its_health_port() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let paths = certs("health");
    // A free port on an address no other test binds: freed here, it cannot be taken by another
    // test's server before the replica binds it.
    let probe = std::net::TcpListener::bind("127.0.0.97:0").unwrap();
    let health_addr = probe.local_addr().unwrap();
    drop(probe);
    let mut config = ReplicaConfig::new("tls-health", users());
    config.tls = Some(
        ServerTls {
            cert: paths.server_cert.clone(),
            key: paths.server_key.clone(),
            client_ca: None,
        }
        .config()
        .unwrap(),
    );
    config.health_listen = Some(health_addr);
    let replica = Replica::start_with("127.0.0.2", config).await;
    let status = crate::support::eventually("plaintext health answers", || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{health_addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: meshlb::proto::USERGUIDE_SERVICE.into(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status)
    })
    .await;
    assert_eq!(status, ServingStatus::Serving as i32);
    replica.stop().await;
}
