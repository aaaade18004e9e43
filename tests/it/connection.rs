//! The balancer's own connections: one per endpoint, shared by calls and the health watch, remade
//! when cut, and closed when the balancer goes. A counting TCP relay stands between the balancer
//! and a real replica, so the test sees every connection the balancer opens and can cut them.

use crate::support::{drive, eventually, userguide, Replica};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relays every connection it accepts to `to`, counting them, and can cut them all.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(ip: &str, to: SocketAddr) -> Self {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let links = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (accepted, open, links) = (accepted.clone(), open.clone(), links.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    open.fetch_add(1, Ordering::SeqCst);
                    let open = open.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                    links.lock().unwrap().push(link);
                }
            }
        });
        Self {
            addr,
            accepted,
            open,
            links,
            accept,
        }
    }

    /// Drops every relayed connection at once (both sockets close: the balancer sees EOF).
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
        // An aborted link never ran its decrement.
        self.open.store(0, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_endpoint_remade_when_cut_and_closed_with_the_balancer() {
    let replica = Replica::start("127.0.0.2", "c1", Default::default()).await;
    let relay = Relay::start("127.0.0.3", replica.addr).await;
    let lb = userguide(format!("ipv4:{}", relay.addr))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .build()
        .await
        .unwrap();

    // Calls and the health watch ride one connection.
    let tally = drive(&lb, 200, 8).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.of("c1"), 200);
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1, "one connection");

    // Cut: the connection is made again on its own, and calls go on over the new one.
    relay.cut();
    eventually("a second connection", || async {
        (relay.accepted.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    eventually("calls succeed over the new connection", || async {
        drive(&lb, 20, 4).await.errors.is_empty().then_some(())
    })
    .await;
    assert_eq!(
        relay.accepted.load(Ordering::SeqCst),
        2,
        "still one connection at a time"
    );

    // Dropping the balancer closes its connection; nothing reconnects afterwards.
    drop(lb);
    eventually("the connection closes with the balancer", || async {
        (relay.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2, "no reconnect");
}

/// A header HTTP/2 forbids (RFC 9113, 8.2.2) is left out of the call, not a reason to fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_headers_are_left_out_not_a_failed_call() {
    use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
    let replica = Replica::start("127.0.0.2", "h1", Default::default()).await;
    let lb = userguide(format!("ipv4:{}", replica.addr))
        .build()
        .await
        .unwrap();
    assert!(lb.wait_ready(std::time::Duration::from_secs(10)).await);
    let mut request = tonic::Request::new(crate::support::get_point_request());
    for (name, value) in [
        ("connection", "close, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
    ] {
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    let answer = UserGuideServiceClient::new(lb.clone())
        .get_point(request)
        .await;
    assert!(answer.is_ok(), "{answer:?}");
}

/// A UserGuide server over HTTP/2 only (health says SERVING, GetPoint answers after `latency`)
/// that takes at most `streams` streams at once per connection. Each connection it accepts is
/// sent to `accepted` with a handle that tells the connection to go away (GOAWAY, then it
/// carries the streams it has to their end).
async fn h2_server(
    streams: u32,
    latency: std::time::Duration,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let faults = meshlb::replica::Faults::new(meshlb::replica::FaultConfig {
        latency,
        ..Default::default()
    });
    let routes = crate::support::userguide_routes(faults).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, connections) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (go_away, told) = tokio::sync::oneshot::channel::<()>();
            let _ = accepted.send(go_away);
            let service = hyper_util::service::TowerToHyperService::new(routes.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    Ok(()) = told => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
    });
    (addr, connections)
}

/// At the server's limit of two streams per connection (one is the health watch's), calls wait
/// their turn and all end, none waits out its deadline (h2 keeps one waker per stream: the call
/// that waits for its stream to open must be the one it wakes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_servers_stream_limit_every_call_ends_in_its_turn() {
    let (addr, _connections) = h2_server(2, std::time::Duration::from_millis(5)).await;
    let lb = userguide(format!("ipv4:{addr}"))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    assert!(lb.wait_ready(std::time::Duration::from_secs(10)).await);
    let tally = tokio::time::timeout(std::time::Duration::from_secs(60), drive(&lb, 400, 32))
        .await
        .expect("every call ends");
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.ok(), 400);
}

/// A server that says GOAWAY but keeps the connection for a stream that has not ended (a
/// health watch never does): new calls go over a new connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn told_to_go_away_new_calls_take_a_new_connection_while_the_old_one_lingers() {
    let (addr, mut connections) = h2_server(100, std::time::Duration::ZERO).await;
    let lb = userguide(format!("ipv4:{addr}"))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .build()
        .await
        .unwrap();
    assert!(lb.wait_ready(std::time::Duration::from_secs(10)).await);
    assert!(drive(&lb, 20, 4).await.errors.is_empty());
    let first = connections.recv().await.expect("a first connection");
    // The health watch's stream stays open on it, so it lingers after the GOAWAY.
    first.send(()).unwrap();
    let connections = Arc::new(Mutex::new(connections));
    eventually("calls succeed over a second connection", || {
        let (lb, connections) = (lb.clone(), connections.clone());
        async move {
            let tally = drive(&lb, 20, 4).await;
            let second = connections.lock().unwrap().try_recv().is_ok();
            (tally.errors.is_empty() && second).then_some(())
        }
    })
    .await;
}
