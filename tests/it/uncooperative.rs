//! Failures that do not announce themselves: a request that makes one stream fail (it must stay
//! that call's problem), and a fleet that sheds load with pushback.

use crate::support::{get_point_request, state_of};
use meshlb::balance::EndpointState;
use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use std::convert::Infallible;
use std::net::SocketAddr;
use tonic::Code;

/// A gRPC server that answers health checks and GetPoint, but resets the stream of any call
/// carrying `x-poison`, and answers `x-huge` with headers over the client's limit.
async fn poisonable() -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use tower::ServiceExt;
    let routes = crate::support::userguide_routes(meshlb::replica::Faults::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let routes = routes.clone();
            let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let routes = routes.clone();
                async move {
                    if req.headers().contains_key("x-poison") {
                        // An error from the service: hyper resets this stream only.
                        return Err::<http::Response<axum::body::Body>, _>(std::io::Error::other(
                            "poisoned",
                        ));
                    }
                    let huge = req.headers().contains_key("x-huge");
                    let mut response = routes
                        .oneshot(req.map(axum::body::Body::new))
                        .await
                        .unwrap_or_else(|e: Infallible| match e {});
                    if huge {
                        let value = "h".repeat(17 << 20);
                        response
                            .headers_mut()
                            .insert("x-huge", value.parse().unwrap());
                    }
                    Ok(response)
                }
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_poisoned_request_never_changes_the_endpoint_or_other_callers() {
    let addr = poisonable().await;
    let lb = crate::support::userguide(format!("ipv4:{addr}"))
        .build()
        .await
        .unwrap();
    assert_eq!(state_of(&lb, addr), Some(EndpointState::Ready));
    let mut client = UserGuideServiceClient::new(lb.clone());
    for round in 0..12 {
        let mut poisoned = tonic::Request::new(get_point_request());
        poisoned
            .metadata_mut()
            .insert("x-poison", "1".parse().unwrap());
        let err = client.get_point(poisoned).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "round {round}: {err:?}");
        assert!(err.message().contains("reset the stream"), "{err:?}");
        // The endpoint is untouched and everyone else is served.
        assert_eq!(
            state_of(&lb, addr),
            Some(EndpointState::Ready),
            "round {round}"
        );
        client
            .get_point(get_point_request())
            .await
            .unwrap_or_else(|e| panic!("round {round}: a clean call failed: {e:?}"));
    }
    // Answer headers over the client's 16 MiB limit: refused, said so, endpoint untouched.
    let mut huge = tonic::Request::new(get_point_request());
    huge.metadata_mut().insert("x-huge", "1".parse().unwrap());
    let err = client.get_point(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("16 MiB"), "{err:?}");
    assert_eq!(state_of(&lb, addr), Some(EndpointState::Ready));
    assert!(client.get_point(get_point_request()).await.is_ok());
    assert_eq!(
        lb.retries(),
        0,
        "a stream error is not retried on the endpoint's behalf"
    );
}

fn limited(max_calls: usize, latency_ms: u64) -> meshlb::replica::ReplicaConfig {
    let mut config = meshlb::replica::ReplicaConfig::new(
        format!("limited-{max_calls}-{latency_ms}"),
        crate::support::users(),
    );
    config.max_concurrent_calls = max_calls;
    config.faults = crate::support::latency(latency_ms);
    config
}

#[tokio::test]
async fn a_shed_call_is_retried_no_sooner_than_the_pushback() {
    let r = crate::support::Replica::start_with("127.0.0.1", limited(1, 300)).await;
    let lb = crate::support::userguide(format!("ipv4:{}", r.addr))
        .build()
        .await
        .unwrap();
    // Calls hold the slot 300 ms, so the replica's pushback becomes about that.
    for _ in 0..2 {
        UserGuideServiceClient::new(lb.clone())
            .get_point(get_point_request())
            .await
            .unwrap();
    }
    // Two calls at once on a replica with one slot: one of them is shed, waits the pushback,
    // and is retried once the slot is free; both end well. Retried at once instead, it would be
    // shed on every try and fail.
    let call = || {
        let mut client = UserGuideServiceClient::new(lb.clone());
        async move {
            let started = tokio::time::Instant::now();
            let result = client.get_point(get_point_request()).await;
            (result, started.elapsed())
        }
    };
    let ((a, a_took), (b, b_took)) = tokio::join!(call(), call());
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    let snapshot = lb.endpoints().remove(0);
    assert!(snapshot.shed >= 1, "{snapshot:?}");
    assert!(lb.retries() >= 1);
    let later = a_took.max(b_took);
    assert!(
        later >= std::time::Duration::from_millis(600),
        "the shed call was answered after {later:?}, before the held call and its own had run"
    );
    r.stop().await;
}

#[tokio::test]
async fn shedding_endpoints_are_avoided_within_the_retry_budget() {
    let small = crate::support::Replica::start_with("127.0.0.1", limited(1, 20)).await;
    let big = crate::support::Replica::start_with("127.0.0.1", limited(0, 20)).await;
    let lb = crate::support::userguide(crate::support::ipv4_target(&[small.addr, big.addr]))
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let tally = crate::support::drive(&lb, 300, 8).await;
    let elapsed = started.elapsed().as_secs_f64();
    // The few calls that lose are the ones the retry budget declined to resend: shed, never
    // anything worse.
    assert!(tally.errors.len() < 300 / 20, "{:?}", tally.errors);
    assert!(
        tally
            .errors
            .iter()
            .all(|s| s.code() == Code::ResourceExhausted),
        "{:?}",
        tally.errors
    );
    let by_addr = |addr| lb.endpoints().into_iter().find(|e| e.addr == addr).unwrap();
    let (s, b) = (by_addr(small.addr), by_addr(big.addr));
    assert!(s.shed > 0, "the one-slot replica shed nothing: {s:?}");
    assert_eq!(b.shed, 0);
    assert!(
        tally.of(&big.id) > 2 * tally.of(&small.id),
        "the shedding replica is not avoided: {tally:?}"
    );
    // The retry budget: 20 % of calls, plus 10 per second.
    let budget = 300.0 * 0.2 + 10.0 * elapsed.max(1.0) * 10.0;
    assert!((lb.retries() as f64) <= budget, "{} retries", lb.retries());
    small.stop().await;
    big.stop().await;
}
