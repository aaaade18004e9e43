//! The replica on its own: gRPC, REST, health, reflection, bad input, drain.

use crate::support::{http_get, Process, Replica};
use meshlb::proto::userguide::v1::{self as pb, user_guide_service_client::UserGuideServiceClient};
use meshlb::replica::FaultConfig;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

fn get_point(name: &str, age: i32) -> pb::GetPointRequest {
    pb::GetPointRequest {
        profile: Some(pb::Profile {
            age,
            name: name.into(),
        }),
    }
}

/// One gRPC message frame: no compression, a 4-byte length, the payload.
fn grpc_frame(payload: &[u8]) -> bytes::Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

/// A hand-made GetPoint request to `r`, for what a generated client would never send.
fn raw_get_point(r: &Replica) -> http::request::Builder {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "{}/userguide.v1.UserGuideService/GetPoint",
            r.url()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

async fn channel(r: &Replica) -> Channel {
    Channel::from_shared(r.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn grpc_unary_and_streaming_with_replica_id() {
    let r = Replica::start("127.0.0.1", "r-one", FaultConfig::default()).await;
    let mut client = UserGuideServiceClient::new(channel(&r).await);

    let ok = client.get_point(get_point("james", 26)).await.unwrap();
    assert_eq!(ok.metadata().get("x-replica-id").unwrap(), "r-one");
    assert_eq!(ok.into_inner().point.unwrap().value, 1000);

    let missing = client.get_point(get_point("james", 99)).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("james"), "{}", missing.message());
    assert_eq!(missing.metadata().get("x-replica-id").unwrap(), "r-one");

    let empty = client.get_point(get_point("", 26)).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let negative = client.get_point(get_point("amy", -1)).await.unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);

    let mut stream = client
        .list_users(pb::ListUsersRequest {
            point: Some(pb::Point { value: 800 }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        let user = msg.user.unwrap();
        assert_eq!(user.cache.unwrap().value, 800);
        names.push(user.profile.unwrap().name);
    }
    assert_eq!(names, ["jake", "molly"]);
    r.stop().await;
}

#[tokio::test]
async fn rest_on_the_same_port() {
    let r = Replica::start("127.0.0.1", "r-rest", FaultConfig::default()).await;
    let (status, body) = http_get(r.addr, "/v1/points?name=james&age=26").await;
    assert_eq!((status, body.as_str()), (200, r#"{"value":1000}"#));

    let (status, body) = http_get(r.addr, "/v1/users?points=1000").await;
    assert_eq!(status, 200);
    let users: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<_> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["profile"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["james", "amy", "robert"]);

    let (status, body) = http_get(r.addr, "/v1/points?name=nobody&age=3").await;
    assert_eq!(status, 404);
    assert!(body.contains("NOT_FOUND"), "{body}");

    let (status, body) = http_get(r.addr, "/v1/points?name=james").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("INVALID_ARGUMENT") && body.contains("age"),
        "{body}"
    );

    let (status, body) = http_get(r.addr, "/v1/users?points=lots").await;
    assert_eq!(status, 400);
    assert!(body.contains("points"), "{body}");
    r.stop().await;
}

#[tokio::test]
async fn health_check_and_watch_flip_on_drain() {
    let mut r = Replica::start("127.0.0.1", "r-health", FaultConfig::default()).await;
    let mut health = HealthClient::new(channel(&r).await);
    for service in ["", meshlb::proto::USERGUIDE_SERVICE] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: meshlb::proto::USERGUIDE_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    r.begin_drain();
    let next = tokio::time::timeout(crate::support::DEADLINE, watch.message())
        .await
        .expect("watch answers within the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    r.stop().await;
}

#[tokio::test]
async fn reflection_lists_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let r = Replica::start("127.0.0.1", "r-refl", FaultConfig::default()).await;
    let mut client = ServerReflectionClient::new(channel(&r).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in ["userguide.v1.UserGuideService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing in {names:?}"
        );
    }
    // The admin service lives on the admin listener only, and is not advertised here.
    assert!(
        !names.iter().any(|n| n.contains("admin")),
        "admin advertised on the serving port: {names:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn admin_changes_faults_at_run_time() {
    use meshlb::proto::admin::v1::{admin_service_client::AdminServiceClient, GetFaultsRequest};
    let r = Replica::start("127.0.0.1", "r-admin", FaultConfig::default()).await;
    let ch = channel(&r).await;
    let mut admin = crate::support::admin(r.admin).await;
    let mut client = UserGuideServiceClient::new(ch.clone());
    // Not on the serving port: whoever can call the service cannot reconfigure the replica.
    let on_serving_port = AdminServiceClient::new(ch)
        .get_faults(GetFaultsRequest {})
        .await
        .unwrap_err();
    assert_eq!(on_serving_port.code(), Code::Unimplemented);
    assert!(client.get_point(get_point("amy", 24)).await.is_ok());

    let request = meshlb::replica::admin::faults_request(FaultConfig {
        fail_rate: 1.0,
        ..Default::default()
    });
    admin.set_faults(request).await.unwrap();
    let failed = client.get_point(get_point("amy", 24)).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable);
    let now = admin
        .get_faults(GetFaultsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.faults.unwrap().fail_rate, 1.0);

    let bad = meshlb::replica::admin::faults_request(FaultConfig {
        fail_rate: 2.0,
        ..Default::default()
    });
    assert_eq!(
        admin.set_faults(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A latency of 10^15 µs would hang calls for decades: refused, naming the bound.
    let huge = meshlb::replica::admin::faults_request(FaultConfig {
        latency: std::time::Duration::from_micros(1_000_000_000_000_000),
        ..Default::default()
    });
    let err = admin.set_faults(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 10m"), "{}", err.message());
    r.stop().await;
}

#[tokio::test]
async fn oversized_message_is_resource_exhausted() {
    let r = Replica::start("127.0.0.1", "r-big", FaultConfig::default()).await;
    let mut client = UserGuideServiceClient::new(channel(&r).await);
    let huge = "x".repeat(200 * 1024);
    let err = client.get_point(get_point(&huge, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    // and the replica still serves
    assert!(client.get_point(get_point("amy", 24)).await.is_ok());
    r.stop().await;
}

#[tokio::test]
async fn malformed_protobuf_gets_a_status_not_a_crash() {
    use tower::ServiceExt;
    let r = Replica::start("127.0.0.1", "r-garbage", FaultConfig::default()).await;
    let ch = channel(&r).await;
    // A gRPC frame whose payload is not a valid GetPointRequest (field 1, wire type 7 is invalid).
    let request = raw_get_point(&r)
        .body(tonic::body::Body::new(http_body_util::Full::new(
            grpc_frame(&[0x0f, 0xff, 0xff, 0xff]),
        )))
        .unwrap();
    let response = ch.clone().oneshot(request).await.unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("trailers-only status");
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    let mut client = UserGuideServiceClient::new(ch);
    assert!(client.get_point(get_point("amy", 24)).await.is_ok());
    r.stop().await;
}

#[tokio::test]
async fn garbage_bytes_on_the_port_are_closed_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = Replica::start("127.0.0.1", "r-bytes", FaultConfig::default()).await;
    let mut raw = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    raw.write_all(b"\x00\x01\x02garbage that is not HTTP\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    // The replica answers 400 or just closes; either way the read ends.
    tokio::time::timeout(crate::support::DEADLINE, raw.read_to_end(&mut sink))
        .await
        .expect("connection closed within the deadline")
        .ok();
    let text = String::from_utf8_lossy(&sink);
    assert!(
        sink.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );

    let mut client = UserGuideServiceClient::new(channel(&r).await);
    assert!(client.get_point(get_point("amy", 24)).await.is_ok());
    r.stop().await;
}

#[tokio::test]
async fn sigterm_drains_without_dropping_in_flight_calls() {
    let mut p = Process::spawn(
        "127.0.0.1",
        &[
            "--id",
            "drainer",
            "--latency",
            "400ms",
            "--drain-grace",
            "300ms",
        ],
    );
    let ch = Channel::from_shared(format!("http://{}", p.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(ch.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    // Read the watch on its own task from now on, so the flip is consumed as it arrives and not
    // lost when the drained process closes the connection.
    let flipped = tokio::spawn(async move {
        while let Ok(Some(m)) = watch.message().await {
            if m.status == ServingStatus::NotServing as i32 {
                return true;
            }
        }
        false
    });
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = UserGuideServiceClient::new(ch.clone());
            tokio::spawn(async move { client.get_point(get_point("molly", 26)).await })
        })
        .collect();
    p.signal(libc::SIGTERM);
    let flipped = tokio::time::timeout(crate::support::DEADLINE, flipped).await;
    assert!(
        matches!(flipped, Ok(Ok(true))),
        "health flips to NOT_SERVING"
    );
    for call in calls {
        let answer = call.await.unwrap().expect("in-flight call completes");
        assert_eq!(answer.into_inner().point.unwrap().value, 800);
    }
    assert_eq!(p.wait_exit().await, Some(0));
}

#[tokio::test]
async fn missing_data_file_is_one_clear_line_and_exit_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args([
            "replica",
            "--listen",
            "127.0.0.1:0",
            "--data",
            "/nonexistent/users.json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/users.json"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn the_callers_grpc_timeout_bounds_the_handler() {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use prost::Message;
    let r = Replica::start("127.0.0.1", "r-deadline", crate::support::latency(3000)).await;
    // A plain HTTP/2 client, so only the replica can enforce the header.
    let client: Client<_, http_body_util::Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let payload = get_point("james", 26).encode_to_vec();
    let request = raw_get_point(&r)
        .header("grpc-timeout", "200m")
        .body(http_body_util::Full::new(grpc_frame(&payload)))
        .unwrap();
    let response = tokio::time::timeout(crate::support::DEADLINE, client.request(request))
        .await
        .expect("the replica answers before its 3 s latency")
        .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("grpc-timeout"), "{status:?}");
    let _ = response.into_body().collect().await;
    r.stop().await;
}
