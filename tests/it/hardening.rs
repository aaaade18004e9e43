//! The replica under attack: the admin service off the data plane, connections that time out or
//! are refused, accept errors that back off, bounded echoes, and gRPC's rules for timeouts,
//! content-types and message counts. Real sockets against real replicas.

use crate::support::{self, eventually, Process, Replica, DEADLINE};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshlb::admin_client::AdminAddr;
use meshlb::proto::userguide::v1::{self as pb, user_guide_service_client::UserGuideServiceClient};
use meshlb::replica::{Allow, ConnLimits, FaultConfig, ReplicaConfig};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn get_point(name: &str, age: i32) -> pb::GetPointRequest {
    pb::GetPointRequest {
        profile: Some(pb::Profile {
            age,
            name: name.into(),
        }),
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A replica in this process with tight connection limits, so timeouts show within the deadline.
async fn tight(id: &str, limits: ConnLimits) -> Replica {
    let mut config = ReplicaConfig::new(id, support::users());
    config.drain_grace = Duration::from_millis(100);
    config.limits = limits;
    config.max_call_duration = Some(Duration::from_secs(1));
    Replica::start_with("127.0.0.1", config).await
}

fn quick_limits() -> ConnLimits {
    ConnLimits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..ConnLimits::default()
    }
}

/// A plain HTTP/2 client: it sends what a generated client never would.
fn h2() -> Client<hyper_util::client::legacy::connect::HttpConnector, http_body_util::Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// One raw gRPC call: its HTTP status and its gRPC status (from headers or trailers).
async fn raw_grpc(
    addr: SocketAddr,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Option<tonic::Status>) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/userguide.v1.UserGuideService/GetPoint"
        ))
        .header("content-type", content_type)
        .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, h2().request(request))
        .await
        .expect("an answer within the deadline")
        .expect("an HTTP answer");
    let code = response.status().as_u16();
    let mut status = tonic::Status::from_header_map(response.headers());
    let collected = response.into_body().collect().await.expect("body");
    if status.is_none() {
        status = collected
            .trailers()
            .and_then(tonic::Status::from_header_map);
    }
    (code, status)
}

/// Resolves when the peer closes the connection (EOF or reset).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

async fn served(addr: SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    UserGuideServiceClient::new(channel)
        .get_point(get_point("amy", 24))
        .await
        .is_ok()
}

#[tokio::test]
async fn the_admin_listener_under_mtls_takes_only_the_admin_identity() {
    let dir = std::env::temp_dir().join(format!("meshlb-admin-mtls-{}", std::process::id()));
    let certs = meshlb::tls::write_certs(&dir, &["127.0.0.1".into()]).unwrap();
    let server = meshlb::tls::ServerTls {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: Some(certs.ca.clone()),
    };
    let mut config = ReplicaConfig::new("r-admin-mtls", support::users());
    config.tls = Some(server.config().unwrap());
    config.admin_allow = Allow::Certified(vec![meshlb::tls::ADMIN_IDENTITY.into()]);
    let r = Replica::start_with("127.0.0.1", config).await;
    let as_who = |identity: Option<(std::path::PathBuf, std::path::PathBuf)>| AdminAddr {
        addr: r.admin,
        tls: Some(
            meshlb::tls::ClientTls {
                ca: certs.ca.clone(),
                identity,
                server_name: None,
            }
            .config()
            .unwrap(),
        ),
    };

    // An ordinary caller's certificate is valid for the service, not for the admin listener.
    let caller = as_who(Some((certs.client_cert.clone(), certs.client_key.clone())));
    let err = caller.set_serving(false).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not allowed"), "{err:?}");
    // No certificate at all: the handshake itself fails.
    assert!(as_who(None).get_faults().await.is_err());

    let admin = as_who(Some((certs.admin_cert.clone(), certs.admin_key.clone())));
    let previous = admin
        .set_faults(FaultConfig {
            fail_rate: 0.5,
            ..Default::default()
        })
        .await
        .expect("the admin identity is allowed");
    assert_eq!(previous, FaultConfig::default());
    assert_eq!(admin.get_faults().await.unwrap().fail_rate, 0.5);
    r.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_while_others_are_served() {
    let r = tight("r-slowloris", quick_limits()).await;
    let addr = r.addr;

    // Idle TCP: connects and never says a word.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // An HTTP/2 client that stops after the preface.
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // HTTP/1.1 headers, one byte at a time, never finished.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut slow_read, mut slow_write) = slow.split();
    let dribble = async {
        for byte in b"GET /v1/points?name=amy&age=24 HTTP/1.1\r\nHost: x\r\nX-Slow: yes".iter() {
            if slow_write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await;
    };
    let slow_closed = async {
        let mut buf = [0u8; 256];
        loop {
            match slow_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };

    // Meanwhile an ordinary caller is served.
    assert!(served(addr).await, "a normal call while under attack");
    let closed = async {
        for s in &mut idle {
            assert!(closed_by_peer(s).await);
        }
        assert!(closed_by_peer(&mut preface).await);
        tokio::select! {
            () = slow_closed => {}
            () = dribble => unreachable!(),
        }
    };
    tokio::time::timeout(DEADLINE, closed)
        .await
        .expect("every silent or slow connection is closed by the replica");
    assert!(served(addr).await, "still serving after the attack");
    r.stop().await;
}

#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_the_idle_timeout() {
    let r = tight("r-idle", quick_limits()).await;
    let mut stream = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/points?name=amy&age=24 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tokio::time::timeout(DEADLINE, closed_by_peer(&mut stream))
        .await
        .expect("the idle keep-alive connection is closed");
    r.stop().await;
}

type Unfinished = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<Result<http_body::Frame<Bytes>, std::io::Error>>,
>;

/// A gRPC request to `path` whose body starts a message and never ends; keep the sender alive.
async fn unfinished(
    addr: SocketAddr,
    path: &str,
) -> (
    http::Request<Unfinished>,
    tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, std::io::Error>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(&[
        0, 0, 0, 0, 9,
    ]))))
    .await
    .unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    (request, tx)
}

#[tokio::test]
async fn a_stream_never_finished_ends_at_the_maximum_call_duration() {
    let r = tight("r-unfinished", ConnLimits::default()).await;
    let client: Client<_, Unfinished> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // A health watch streams for as long as its caller wants, but only once its request is in.
    for path in [
        "/userguide.v1.UserGuideService/GetPoint",
        "/grpc.health.v1.Health/Watch",
    ] {
        let (request, tx) = unfinished(r.addr, path).await;
        let response = tokio::time::timeout(DEADLINE, client.request(request))
            .await
            .expect("answered within the deadline")
            .unwrap();
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{path}: {status:?}");
        assert!(
            status.message().contains("maximum call duration"),
            "{status:?}"
        );
        drop(tx);
    }
    r.stop().await;
}

#[tokio::test]
async fn calls_beyond_the_limit_are_shed_with_pushback_and_health_still_answers() {
    let mut config = ReplicaConfig::new("r-shed", support::users());
    config.max_concurrent_calls = 2;
    config.max_call_duration = None;
    let r = Replica::start_with("127.0.0.1", config).await;
    let client: Client<_, Unfinished> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Two calls that hold their permits: their requests never finish.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (request, tx) = unfinished(r.addr, "/userguide.v1.UserGuideService/GetPoint").await;
        held.push((tokio::spawn(client.request(request)), tx));
    }
    let channel = tonic::transport::Endpoint::from_shared(r.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let shed = eventually("a third call is shed", || {
        let channel = channel.clone();
        async move {
            let err = UserGuideServiceClient::new(channel)
                .get_point(get_point("amy", 24))
                .await
                .err()?;
            (err.code() == Code::ResourceExhausted).then_some(err)
        }
    })
    .await;
    let pushback: u64 = shed
        .metadata()
        .get(meshlb::replica::shed::PUSHBACK_HEADER.as_str())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a pushback: {shed:?}"));
    assert!((1..=1000).contains(&pushback), "{pushback}");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is never shed");
    assert_eq!(health.into_inner().status, 1);
    // Permits come back when the held calls end.
    for (call, tx) in held {
        drop(tx);
        let _ = call.await;
    }
    eventually("served again below the limit", || {
        let channel = channel.clone();
        async move {
            UserGuideServiceClient::new(channel)
                .get_point(get_point("amy", 24))
                .await
                .ok()
        }
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_until_one_closes() {
    let limits = ConnLimits {
        max_connections: 2,
        ..ConnLimits::default()
    };
    let r = tight("r-cap", limits).await;
    let first = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    tokio::time::timeout(DEADLINE, closed_by_peer(&mut third))
        .await
        .expect("the third connection is closed at once");
    drop((first, second));
    eventually("a call once below the cap again", || async {
        served(r.addr).await.then_some(())
    })
    .await;
    r.stop().await;
}

/// The replica's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn out_of_file_descriptors_the_replica_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt;
    let log = std::env::temp_dir().join(format!("meshlb-emfile-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).unwrap();
    let p = Process::spawn_with(
        "127.0.0.1:0",
        &["--header-read-timeout", "1h", "--idle-timeout", "1h"],
        |cmd| {
            cmd.env("RUST_LOG", "warn");
            cmd.stderr(stderr);
            // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 64,
                        rlim_max: 64,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(p.addr).await.unwrap());
    }
    eventually("the replica runs out of descriptors", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("lack of resources")
            .then_some(())
    })
    .await;
    let before = cpu_time(p.child.id());
    // A measurement window, not a wait for an event: a spinning accept loop burns the whole of it.
    let window = Duration::from_millis(1500);
    tokio::time::sleep(window).await;
    let burnt = cpu_time(p.child.id()).saturating_sub(before);
    assert!(
        burnt < window / 2,
        "the accept loop spins: {burnt:?} of CPU in {window:?}"
    );
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines < 20, "the log is flooded: {lines} lines");

    drop(held);
    eventually("served again once descriptors come back", || async {
        served(p.addr).await.then_some(())
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("accept recovered"), "{text}");
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn a_huge_name_gets_a_bounded_not_found_that_a_default_client_accepts() {
    let r = Replica::start("127.0.0.1", "r-echo", FaultConfig::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(r.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let name = "n".repeat(17 * 1024);
    let err = UserGuideServiceClient::new(channel)
        .get_point(get_point(&name, 30))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().len() < 300, "{} bytes", err.message().len());
    assert!(err.message().contains('…'), "{}", err.message());

    let (status, body) = support::http_raw(
        r.addr,
        &format!("GET /v1/users?points={name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.len() < 400, "REST echoes {} bytes", body.len());
    r.stop().await;
}

#[tokio::test]
async fn malformed_grpc_timeouts_are_internal_errors() {
    let r = Replica::start("127.0.0.1", "r-timeout", FaultConfig::default()).await;
    let body = frame(&get_point("amy", 24).encode_to_vec());
    for bad in ["99999999999999H", "-1S", "abc", "1.5S"] {
        let (_, status) = raw_grpc(
            r.addr,
            "application/grpc",
            &[("grpc-timeout", bad)],
            body.clone(),
        )
        .await;
        let status = status.expect("a gRPC status");
        assert_eq!(status.code(), Code::Internal, "{bad}: {status:?}");
        assert!(status.message().contains("grpc-timeout"), "{status:?}");
    }
    let (_, ok) = raw_grpc(r.addr, "application/grpc", &[("grpc-timeout", "5S")], body).await;
    assert_eq!(ok.expect("a status").code(), Code::Ok);
    r.stop().await;
}

#[tokio::test]
async fn only_grpc_content_types_reach_the_grpc_routes() {
    let r = Replica::start("127.0.0.1", "r-ctype", FaultConfig::default()).await;
    let body = frame(&get_point("amy", 24).encode_to_vec());
    for other in ["application/grpc-web", "application/grpcfoo"] {
        let (http, _) = raw_grpc(r.addr, other, &[], body.clone()).await;
        assert_eq!(http, 415, "{other}");
    }
    for grpc in ["application/grpc+proto", "application/grpc"] {
        let (http, status) = raw_grpc(r.addr, grpc, &[], body.clone()).await;
        assert_eq!(http, 200, "{grpc}");
        assert_eq!(status.expect("a status").code(), Code::Ok, "{grpc}");
    }
    r.stop().await;
}

#[tokio::test]
async fn a_second_request_message_in_a_unary_call_is_an_error() {
    let r = Replica::start("127.0.0.1", "r-two", FaultConfig::default()).await;
    let mut body = frame(&get_point("amy", 24).encode_to_vec());
    body.extend(frame(&get_point("james", 26).encode_to_vec()));
    let (_, status) = raw_grpc(r.addr, "application/grpc", &[], body).await;
    let status = status.expect("a status");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("more than one"), "{status:?}");
    r.stop().await;
}

#[tokio::test]
async fn rest_answers_405_and_absolute_form_targets_with_json_errors() {
    let r = Replica::start("127.0.0.1", "r-rest-edges", FaultConfig::default()).await;
    let (status, body) = support::http_raw(
        r.addr,
        "POST /v1/points HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(json["message"].as_str().unwrap().contains("GET"), "{json}");

    let (status, body) = support::http_raw(
        r.addr,
        "GET http://evil/v1/points?name=amy&age=24 HTTP/1.1\r\nHost: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(json["code"], "INVALID_ARGUMENT");
    r.stop().await;
}

#[test]
fn an_id_that_is_not_a_header_value_fails_before_listening() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args(["replica", "--listen", "127.0.0.1:0", "--id", "a\nb"])
        .args([
            "--data",
            concat!(env!("CARGO_MANIFEST_DIR"), "/replicas/users.json"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--id"), "{stderr}");
}

#[tokio::test]
async fn faults_changes_only_the_knobs_it_names() {
    let p = Process::spawn("127.0.0.1", &["--latency", "40ms"]);
    let admin = p.admin.expect("an admin listener");
    let faults = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshlb"))
            .args(["faults", "--addr", &admin.to_string()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = faults(&["--fail-rate", "0.1"]);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("latency=40ms") && line.contains("fail-rate=0.1"),
        "{line}"
    );
    // No knobs: shows them, changes nothing.
    let shown = String::from_utf8_lossy(&faults(&[]).stdout).into_owned();
    assert!(
        shown.contains("latency=40ms") && shown.contains("fail-rate=0.1"),
        "{shown}"
    );
    assert!(shown.trim_end().ends_with(" serving"), "{shown}");
    let out = faults(&["--not-serving"]);
    assert!(out.status.success(), "{out:?}");
    eventually("the replica reports NOT_SERVING", || async {
        (meshlb::fleet::health_of(p.addr, None).await
            == Some(tonic_health::pb::health_check_response::ServingStatus::NotServing))
        .then_some(())
    })
    .await;
    // No knobs again: the health it reports is shown with the knobs.
    let shown = String::from_utf8_lossy(&faults(&[]).stdout).into_owned();
    assert!(
        shown.trim_end().ends_with(" not-serving") && shown.contains("latency=40ms"),
        "{shown}"
    );
    // The serving port has no admin service.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args(["faults", "--addr", &p.addr.to_string(), "--latency", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("unimplemented") || err.contains("not implemented"),
        "{err}"
    );
}

/// An HTTP/2 frame: 3-byte length, type, flags, stream id.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A literal HPACK header with incremental indexing: a static-table name index (or 0 and the name).
fn hpack(index: u8, name: &str, value: &str) -> Vec<u8> {
    let mut h = vec![0x40 | index];
    if index == 0 {
        h.push(name.len() as u8);
        h.extend(name.as_bytes());
    }
    h.push(value.len() as u8);
    h.extend(value.as_bytes());
    h
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let mut config = ReplicaConfig::new("r-ping", support::users());
    config.limits = ConnLimits {
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_millis(500),
        ..ConnLimits::default()
    };
    // No call bound: only keepalive can free this connection.
    config.max_call_duration = None;
    let r = Replica::start_with("127.0.0.1", config).await;
    let mut stream = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(hpack(4, "", "/userguide.v1.UserGuideService/GetPoint"));
    block.extend(hpack(1, "", "localhost"));
    block.extend(hpack(31, "", "application/grpc"));
    block.extend(hpack(0, "te", "trailers"));
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    hello.extend(h2_frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS, the stream stays open
    stream.write_all(&hello).await.unwrap();
    // From here on the peer reads but never answers: its PINGs go unanswered.
    tokio::time::timeout(DEADLINE, closed_by_peer(&mut stream))
        .await
        .expect("the replica drops a peer that does not answer its pings");
    assert!(served(r.addr).await);
    r.stop().await;
}

#[tokio::test]
async fn tls_connections_that_never_speak_are_closed() {
    use tokio_rustls::rustls;
    let dir = std::env::temp_dir().join(format!("meshlb-tls-silent-{}", std::process::id()));
    let certs = meshlb::tls::write_certs(&dir, &["127.0.0.1".into()]).unwrap();
    let server = meshlb::tls::ServerTls {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: None,
    };
    let mut config = ReplicaConfig::new("r-tls-silent", support::users());
    config.tls = Some(server.config().unwrap());
    config.limits = quick_limits();
    let r = Replica::start_with("127.0.0.1", config).await;

    // Silent before the handshake.
    let mut raw = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    // Silent after a completed handshake.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&certs.ca).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");

    let both = async {
        assert!(closed_by_peer(&mut raw).await);
        let mut buf = [0u8; 256];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(DEADLINE, both)
        .await
        .expect("both silent TLS connections are closed");
    r.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_draining_replica_cannot_be_made_serving_again() {
    let mut config = ReplicaConfig::new("r-drain-admin", support::users());
    config.drain_grace = Duration::from_secs(3);
    let mut r = Replica::start_with("127.0.0.1", config).await;
    let admin = AdminAddr::plaintext(r.admin);
    admin
        .set_serving(true)
        .await
        .expect("allowed before the drain");
    r.begin_drain();
    let refused = eventually("SetServing is refused while draining", || async {
        admin
            .set_serving(true)
            .await
            .err()
            .filter(|s| s.code() == Code::FailedPrecondition)
    })
    .await;
    assert!(refused.message().contains("draining"), "{refused:?}");
    r.stop().await;
}
