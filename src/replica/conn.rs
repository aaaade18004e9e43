//! Accepting and keeping connections, for any listener of the replica: a cap on open connections,
//! accept errors that back off instead of spinning, a TLS handshake and first request that must
//! arrive in time, an idle timeout for connections with no open stream, HTTP/1 header-read
//! timeouts and HTTP/2 keepalive pings, and a drain that lets open calls finish.
//!
//! It knows nothing of what is served: the caller hands in a service per connection.

use bytes::Bytes;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::CertificateDer;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::Service;

/// How long a connection may stay open, and how many may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections beyond this are closed as soon as they are accepted (0: no cap).
    pub max_connections: usize,
    /// A new connection must finish its TLS handshake and send its first request headers within
    /// this; an HTTP/1 request must send its headers within this too (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no open stream for this long is closed (HTTP/2: with a GOAWAY).
    pub idle_timeout: Duration,
    /// HTTP/2 pings to a peer this long silent; a peer that does not answer in
    /// `keepalive_timeout` is dropped.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Once graceful shutdown has begun, how long a connection may take to finish before it is cut.
/// Only used when the connection is idle anyway (the drain has its own timeout).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Accept errors from a lack of resources (no file descriptors) back off, doubling up to this.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// The response body every connection sends.
pub type Body = axum::body::Body;

/// Who is on the other end of a connection: the TLS client certificates, when there are any.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's certificate chain (leaf first), under mTLS.
    pub certificates: Option<Vec<CertificateDer<'static>>>,
}

/// Serves `listener` until `stop` resolves; then stops accepting and returns a [`Drain`] that
/// finishes the open connections.
pub async fn serve<S, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    make_service: F,
    stop: impl Future<Output = ()>,
) -> Drain
where
    F: Fn(Peer) -> S + Clone + Send + 'static,
    S: Service<Request<hyper::body::Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let (drain_tx, drain_rx) = watch::channel(false);
    // Every connection's task, so the drain can wait for them and cut the rest when it gives up.
    let mut connections = JoinSet::new();
    let permits = Arc::new(Semaphore::new(if limits.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        limits.max_connections.min(Semaphore::MAX_PERMITS)
    }));
    let mut refusing = Refusals::default();
    let mut exhausted = Exhaustion::default();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                exhausted.recovered();
                stream
            }
            Err(error) if is_out_of_resources(&error) => {
                // The error repeats until a descriptor frees up; retrying at once would spin a
                // core and flood the log.
                let pause = exhausted.failed(&error);
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = &mut stop => break,
                }
            }
            Err(error) => {
                // Per-connection failures (the peer reset before accept): nothing to wait for.
                tracing::debug!(%error, "accept failed");
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refusing.refused(limits.max_connections);
            drop(stream);
            continue;
        };
        refusing.accepted();
        let _ = stream.set_nodelay(true);
        let born = Instant::now();
        let tls = tls.clone();
        let builder = builder.clone();
        let drain = drain_rx.clone();
        let make = make_service.clone();
        let handshake_deadline = born + limits.header_read_timeout;
        let task = async move {
            match tls {
                None => {
                    let service = make(Peer::default());
                    serve_one(stream, service, &builder, limits, born, drain).await;
                }
                Some(acceptor) => {
                    let peer_addr = stream.peer_addr().ok();
                    let handshake =
                        tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            let certificates = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                            let service = make(Peer { certificates });
                            serve_one(stream, service, &builder, limits, born, drain).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(peer = ?peer_addr, %error, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = ?peer_addr, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(task);
    }
    drop(listener);
    Drain {
        drain_tx,
        connections,
    }
}

/// The connections left open when a listener stops accepting.
#[derive(Debug)]
pub struct Drain {
    drain_tx: watch::Sender<bool>,
    connections: JoinSet<()>,
}

impl Drain {
    /// Asks every connection to finish its open streams and close (HTTP/2: GOAWAY), and waits
    /// until all have. Dropped before that (a drain timeout), it cuts the connections still open.
    pub async fn finish(self) {
        let Self {
            drain_tx,
            mut connections,
        } = self;
        let _ = drain_tx.send(true);
        while connections.join_next().await.is_some() {}
    }
}

async fn serve_one<I, S>(
    io: I,
    service: S,
    builder: &auto::Builder<TokioExecutor>,
    limits: ConnLimits,
    born: Instant,
    mut drain: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<hyper::body::Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (open_tx, mut open_rx) = watch::channel(0usize);
    let tracked = TowerToHyperService::new(Tracked {
        inner: service,
        open: Arc::new(open_tx),
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), tracked);
    tokio::pin!(conn);
    // Until its first request, a connection gets only the header-read timeout: an attacker's
    // silent connection (idle TCP, a bare HTTP/2 preface, a completed TLS handshake) costs a
    // descriptor for seconds, not for the idle timeout.
    let mut idle_since = Some(born);
    let mut idle_limit = limits.header_read_timeout;
    let mut closing_at: Option<Instant> = None;
    let mut draining = *drain.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let idle_deadline = match (idle_since, closing_at, draining) {
            (Some(since), None, false) => Some(since + idle_limit),
            _ => None,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection closed with an error");
                }
                return;
            }
            changed = drain.changed(), if !draining && closing_at.is_none() => {
                if changed.is_err() || *drain.borrow() {
                    // The drain waits for open calls itself, with its own timeout.
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
            changed = open_rx.changed() => {
                if changed.is_err() {
                    continue;
                }
                let open = *open_rx.borrow_and_update();
                if open == 0 {
                    idle_since.get_or_insert_with(Instant::now);
                } else {
                    idle_since = None;
                    idle_limit = limits.idle_timeout;
                }
            }
            () = sleep_until(idle_deadline) => {
                tracing::debug!(idle = ?idle_limit, "closing an idle connection");
                conn.as_mut().graceful_shutdown();
                closing_at = Some(Instant::now() + IDLE_CLOSE_GRACE);
            }
            () = sleep_until(closing_at) => {
                // The peer did not finish closing; the descriptor is worth more than its manners.
                return;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn is_out_of_resources(error: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
    }
}

// === impl Exhaustion ===

/// Accept failing for lack of resources: logged once when it starts and once when it ends.
#[derive(Debug, Default)]
struct Exhaustion {
    failures: u64,
    backoff: Option<Duration>,
}

impl Exhaustion {
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.failures += 1;
        let next = match self.backoff {
            None => {
                tracing::warn!(%error, "accept failing for lack of resources; backing off until it recovers");
                ACCEPT_BACKOFF_MIN
            }
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.backoff = Some(next);
        next
    }

    fn recovered(&mut self) {
        if self.backoff.take().is_some() {
            tracing::warn!(
                failures = self.failures,
                "accept recovered after failing for lack of resources"
            );
            self.failures = 0;
        }
    }
}

// === impl Refusals ===

/// Connections refused at the cap: logged once when refusing starts and once when it ends.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
}

impl Refusals {
    fn refused(&mut self, max: usize) {
        if self.count == 0 {
            tracing::warn!(
                max_connections = max,
                "connection limit reached; refusing new connections"
            );
        }
        self.count += 1;
    }

    fn accepted(&mut self) {
        if self.count > 0 {
            tracing::warn!(
                refused = self.count,
                "below the connection limit again; accepting"
            );
            self.count = 0;
        }
    }
}

// === impl Tracked ===

/// Counts a connection's open streams: a call is open from its request until its response body
/// is done (or dropped, when the stream is reset).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    open: Arc<watch::Sender<usize>>,
}

struct OpenGuard(Arc<watch::Sender<usize>>);

impl OpenGuard {
    fn new(open: &Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        Self(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<S, B> Service<Request<B>> for Tracked<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let guard = OpenGuard::new(&self.open);
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| Body::new(Holding::new(body, guard))))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds `guard` until the body is done or dropped (a stream reset).
    pub struct Holding<G> {
        #[pin]
        inner: Body,
        guard: G,
    }
}

impl<G> Holding<G> {
    /// `inner`, holding `guard`.
    pub fn new(inner: Body, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<G> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn resource_exhaustion_backs_off_and_resets() {
        let mut e = Exhaustion::default();
        let error = std::io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..10).map(|_| e.failed(&error)).collect();
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), ACCEPT_BACKOFF_MAX);
        e.recovered();
        assert_eq!(e.failed(&error), ACCEPT_BACKOFF_MIN);
    }

    #[cfg(unix)]
    #[test]
    fn only_resource_errors_back_off() {
        assert!(is_out_of_resources(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_out_of_resources(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
