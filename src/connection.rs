//! One HTTP/2 connection to one endpoint, driven directly with h2.
//!
//! tonic's `Channel` puts a buffer task in front of each connection, and hyper's HTTP/2 client
//! hands each request to its connection task over a channel, then spawns a task per call to
//! wait for the answer (and another to send the body when h2 has no room for it yet): a call
//! crossed a queue and two task hand-offs before h2 saw it. Here the caller opens the stream on
//! h2's `SendRequest` itself, writes a body that is ready at once in the same poll, and awaits
//! the answer itself; only a body still streaming when the answer comes is left to a task of
//! its own. One task per endpoint connects (TCP with `TCP_NODELAY`, then TLS when configured,
//! then the HTTP/2 handshake), drives the connection and its keepalive pings until it ends, and
//! connects again after a jittered backoff, for as long as anyone holds a [`Connection`].
//! Handles are cheap clones over that one connection: the balancer's endpoint, the health watch
//! and the silence detector's probes share it, so what health sees is what calls get.
//!
//! Readiness: a handle is ready while the connection is up and may open a stream (at the peer's
//! stream limit too: the call then waits in h2 for its stream to open), `Pending` while it is
//! being made, and an error once per failed attempt (then `Pending` until the next attempt's outcome, so a caller that looks again
//! during the backoff waits for the next try instead of failing at once). The caller decides
//! what a failure means; this module knows nothing of health, accrual or balancing.

use crate::backoff::Backoff;
use crate::tls::Connector;
use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http_body::{Body as _, Frame};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tonic::body::Body;
use tower::Service;

/// An error on the way to a connection, or of one.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How connections are made and kept.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long the TCP connect and the TLS handshake may take together.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval; a peer that stops answering pings is cut off.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// The largest header list accepted in an answer.
    pub max_header_list_size: u32,
    /// TLS towards the endpoint, if set.
    pub tls: Option<Connector>,
}

/// Backoff between failed attempts to connect: soon at first (a replica restarting), at most
/// every few seconds for an address that stays dead.
const RECONNECT_BASE: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A connection that lived at least this long ended normally; a shorter one counts as a failed
/// attempt, so a peer that accepts and at once closes is not reconnected to in a tight loop.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(1);

/// Flow-control windows as hyper's HTTP/2 client sets them (h2's own are 64 KiB): a stream of
/// answers is not held up waiting for window updates.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// How much of a request body h2 may hold for one stream before the body waits for room.
const SEND_BUFFER: usize = 1024 * 1024;

/// `meshlb/VERSION`, sent unless the caller set its own (gRPC's spec asks clients to send one).
const USER_AGENT: http::HeaderValue =
    http::HeaderValue::from_static(concat!("meshlb/", env!("CARGO_PKG_VERSION")));

/// A call whose stream could not be opened: the connection had just ended or been told to go
/// away. Nothing was sent, so nothing was processed.
#[derive(Debug, thiserror::Error)]
#[error("the connection closed before the call was sent: {0}")]
pub struct NotSent(#[from] h2::Error);

/// Why there is no connection right now.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ConnectError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

#[derive(Clone)]
enum Current {
    Connecting,
    /// Up; the `Notify` tells the connection's task that a handle found it unusable for new
    /// streams (told to go away, or out of stream ids) while it still runs.
    Up(SendRequest<Bytes>, Arc<tokio::sync::Notify>),
    /// The last attempt failed; the number tells attempts apart (from 1).
    Failed(Arc<ConnectError>, u64),
}

struct Slot {
    state: Mutex<(Current, Vec<Waker>)>,
}

impl Slot {
    fn set(&self, current: Current) {
        let wakers = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = current;
            std::mem::take(&mut state.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// A handle on one endpoint's connection; a `tower::Service` for HTTP/2 requests whose URI is a
/// path (as tonic's generated clients send them): the endpoint's origin is added here.
#[derive(Clone)]
pub struct Connection {
    slot: Arc<Slot>,
    /// This handle's copy of the sender, so that a ready connection costs no lock.
    send: Option<SendRequest<Bytes>>,
    /// The failed attempt this handle last reported, so each is reported once.
    reported: u64,
    scheme: Scheme,
    authority: Authority,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("authority", &self.authority)
            .field("up", &self.send.is_some())
            .finish()
    }
}

impl Connection {
    /// A connection to `addr`, made on its own task at once and remade whenever it ends, until
    /// the last handle is dropped. Needs a Tokio runtime.
    pub fn spawn(addr: SocketAddr, settings: Settings) -> Self {
        let slot = Arc::new(Slot {
            state: Mutex::new((Current::Connecting, Vec::new())),
        });
        let scheme = if settings.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let authority = Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        tokio::spawn(drive(Arc::downgrade(&slot), addr, settings));
        Self {
            slot,
            send: None,
            reported: 0,
            scheme,
            authority,
        }
    }

    /// Sends `request` on the connection [`Service::poll_ready`] found up. Inherent (not the
    /// `Service` future) so that a caller can await it without a box.
    pub fn send(
        &mut self,
        request: http::Request<Body>,
    ) -> impl Future<Output = Result<http::Response<Incoming>, BoxError>> + Send + 'static {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
        if !parts.headers.contains_key(http::header::USER_AGENT) {
            parts.headers.insert(http::header::USER_AGENT, USER_AGENT);
        }
        strip_connection_headers(&mut parts.headers);
        let end = body.is_end_stream();
        // The stream is opened here, in the caller's poll: no hand-off to the connection's task.
        let opened = match self.send.as_mut() {
            Some(send) => match send.send_request(http::Request::from_parts(parts, ()), end) {
                Ok((answer, stream)) => {
                    // At the peer's limit of streams, the new one waits to open, and h2 keeps
                    // one waker per stream: the call's own task must be the one that waits
                    // (its body waits on the same waker), not the next poll_ready of this
                    // handle, from whichever task polls the endpoint. So the sender that opened
                    // it goes with the call, and the handle keeps a fresh one. (Looked at with
                    // a waker that does nothing: the call's first poll registers its own.)
                    let mut look = Context::from_waker(Waker::noop());
                    let waits = send.poll_ready(&mut look).is_pending();
                    let opener = waits.then(|| std::mem::replace(send, send.clone()));
                    Ok((answer, stream, opener))
                }
                Err(error) => Err(BoxError::from(NotSent::from(error))),
            },
            None => Err(BoxError::from("called before the connection was ready")),
        };
        async move {
            let (answer, stream, opener) = opened?;
            if let Some(mut opener) = opener {
                // An error is the connection's, and the answer reports it for this stream.
                let _ = std::future::poll_fn(|cx| opener.poll_ready(cx)).await;
            }
            let mut answer = std::pin::pin!(answer);
            let mut pipe = (!end).then(|| Pipe::new(body, stream));
            // The body is sent while the answer is awaited, in the same task: a unary call's one
            // message and its end go out in the first poll.
            let response = std::future::poll_fn(|cx| {
                if let Some(sending) = &mut pipe {
                    if Pin::new(&mut *sending).poll(cx).is_ready() {
                        pipe = None;
                    }
                }
                answer.as_mut().poll(cx)
            })
            .await?;
            if let Some(rest) = pipe {
                // Answered before its body was all sent (a stream of requests the server answers
                // early): the rest goes on, on its own task, until the body ends or the stream
                // is reset.
                tokio::spawn(rest);
            }
            Ok(response.map(Incoming::new))
        }
    }

    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match &state.0 {
            Current::Up(send, unusable) => {
                let mut send = send.clone();
                match send.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.send = Some(send);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => {
                        self.send = Some(send);
                        return Poll::Pending;
                    }
                    // Ended, told to go away, or out of stream ids: the connection's task makes
                    // the next one (the calls still on this one finish there).
                    Poll::Ready(Err(_)) => unusable.notify_one(),
                }
            }
            Current::Failed(error, attempt) if *attempt != self.reported => {
                self.reported = *attempt;
                return Poll::Ready(Err(Box::new(Shared(error.clone()))));
            }
            Current::Connecting | Current::Failed(..) => {}
        }
        if !state.1.iter().any(|w| w.will_wake(cx.waker())) {
            state.1.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Service<http::Request<Body>> for Connection {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Some(send) = &mut self.send {
            match send.poll_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                // That connection ended; the task is making the next one.
                Poll::Ready(Err(_)) => self.send = None,
            }
        }
        self.poll_slot(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// Leaves out what HTTP/2 forbids in a request (RFC 9113, 8.2.2), as hyper's client did: h2
/// refuses the whole request for one of them, and a caller's stray `Connection` header is no
/// reason for a call to fail.
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    if let Some(listed) = headers.remove(CONNECTION) {
        // The names it lists are this connection's own, too.
        for name in listed.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Sends a request body on its stream, each frame as the body yields it. A frame is taken
/// before room is asked for it (room held for a body that is idle would starve the
/// connection's other streams), and the first frame and the end need none: h2 holds a frame
/// beyond the window until the peer opens it, so a unary call's message and its end go out at
/// once. A stream the peer resets, or a connection that ends, stops it.
struct Pipe {
    body: Body,
    stream: h2::SendStream<Bytes>,
    /// A frame taken from the body, waiting for room.
    held: Option<Bytes>,
    first: bool,
}

impl Pipe {
    fn new(body: Body, stream: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            held: None,
            first: true,
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if let Some(data) = self.held.take() {
                if self.stream.capacity() < data.len() {
                    self.stream.reserve_capacity(data.len());
                }
                if self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.held = Some(data);
                            return self.poll_reset(cx);
                        }
                        Poll::Ready(Some(Ok(_))) => {
                            self.held = Some(data);
                            continue;
                        }
                        Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                        Poll::Ready(None) => return Poll::Ready(Err("the stream closed".into())),
                    }
                }
                self.stream.send_data(data, false)?;
                continue;
            }
            let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
                return self.poll_reset(cx);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        if std::mem::take(&mut self.first) || end {
                            self.stream.send_data(data, end)?;
                            if end {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            self.held = Some(data);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(error)) => {
                    // A body cancelled by its writer resets the stream as cancelled, not as an
                    // error of the answer.
                    self.stream.send_reset(reset_reason(&error));
                    return Poll::Ready(Err(error.into()));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// While the pipe waits (for the body, or for room): a stream the peer reset, or a
    /// connection that ended, ends it, rather than leaving it to wait for a body that may never
    /// go on.
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.stream.poll_reset(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(format!(
                "the server reset the stream ({reason:?})"
            )
            .into())),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error.into())),
        }
    }
}

/// The HTTP/2 reason an error carries in its chain (a writer's cancellation is `CANCEL`), or
/// `INTERNAL_ERROR`.
fn reset_reason(error: &(dyn std::error::Error + 'static)) -> h2::Reason {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        next = e.source();
    }
    h2::Reason::INTERNAL_ERROR
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // A body that fails has reset its stream; one the peer reset is answered already.
        self.poll_send(cx).map(|_| ())
    }
}

/// An answer's body as h2 delivers it: data, then trailers. Each chunk read gives its bytes
/// back to the flow-control window, so the peer may send more.
#[derive(Debug)]
pub struct Incoming {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Incoming {
    fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// A failed attempt, shared by every handle that asks (the error itself is not `Clone`).
#[derive(Debug)]
struct Shared(Arc<ConnectError>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0.source)
    }
}

/// The connection's task: connect, serve, repeat, while any handle lives.
async fn drive(slot: Weak<Slot>, addr: SocketAddr, settings: Settings) {
    let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
    let mut attempt: u64 = 0;
    loop {
        let outcome = tokio::time::timeout(settings.connect_timeout, connect(addr, &settings))
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError {
                    what: "connect timed out",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", settings.connect_timeout),
                    ),
                })
            });
        let Some(live) = slot.upgrade() else { return };
        let failure = match outcome {
            Ok((send, ping, mut connection)) => {
                let unusable = Arc::new(tokio::sync::Notify::new());
                live.set(Current::Up(send, unusable.clone()));
                // Hold no strong reference while the connection runs: dropping the last handle
                // drops the last sender, which ends the connection.
                drop(live);
                let started = tokio::time::Instant::now();
                let mut pings = Box::pin(keepalive(
                    ping,
                    settings.keepalive_interval,
                    settings.keepalive_timeout,
                ));
                let ended: Result<(), BoxError> = tokio::select! {
                    ended = &mut connection => ended.map_err(BoxError::from),
                    unanswered = &mut pings => Err(unanswered),
                    () = unusable.notified() => {
                        // Told to go away (a server draining, or one with a maximum connection
                        // age), or out of stream ids: it takes no new calls, but may carry its
                        // own until they end, which a health watch never does. The next
                        // connection is made now; this one goes on, pinged, on its own task.
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = connection => {}
                                _ = pings => {}
                            }
                        });
                        Ok(())
                    }
                };
                if let Err(error) = &ended {
                    tracing::debug!(%addr, %error, "connection ended");
                }
                if started.elapsed() >= HEALTHY_LIFETIME {
                    backoff.reset();
                    let Some(live) = slot.upgrade() else { return };
                    live.set(Current::Connecting);
                    continue;
                }
                // Closed right after it was made (a server that speaks no HTTP/2, or refuses
                // this client): a failed attempt, with the reason when h2 has one.
                ConnectError {
                    what: "connection closed right after the handshake",
                    source: match ended {
                        Err(error) => std::io::Error::other(error),
                        Ok(()) => std::io::Error::other("the server closed it"),
                    },
                }
            }
            Err(error) => {
                drop(live);
                error
            }
        };
        tracing::debug!(%addr, error = %failure, "cannot connect");
        attempt += 1;
        let Some(live) = slot.upgrade() else { return };
        live.set(Current::Failed(Arc::new(failure), attempt));
        // Nobody is kept alive by the wait: the handles may all go meanwhile.
        drop(live);
        tokio::time::sleep(backoff.next_delay()).await;
        let Some(live) = slot.upgrade() else { return };
        live.set(Current::Connecting);
    }
}

/// Pings the peer every `interval` and returns when a ping goes unanswered for `timeout`: the
/// connection is then dropped, and every call on it fails (a peer
/// frozen, or a link gone silent, answers nothing else either).
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> BoxError {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        let pong = ping.ping(h2::Ping::opaque());
        match tokio::time::timeout(timeout, pong).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return error.into(),
            Err(_) => return format!("keepalive ping unanswered within {timeout:?}").into(),
        }
    }
}

type Handshake = (
    SendRequest<Bytes>,
    Option<h2::PingPong>,
    Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>,
);

async fn connect(addr: SocketAddr, settings: &Settings) -> Result<Handshake, ConnectError> {
    let fail = |what| move |source| ConnectError { what, source };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(fail("tcp connect error"))?;
    tcp.set_nodelay(true).map_err(fail("tcp connect error"))?;
    let mut http2 = h2::client::Builder::new();
    http2
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(settings.max_header_list_size)
        .enable_push(false);
    let h2_error = |e: h2::Error| ConnectError {
        what: "http2 handshake error",
        source: std::io::Error::other(e),
    };
    match &settings.tls {
        Some(tls) => {
            let stream = tls
                .connect(addr, tcp)
                .await
                .map_err(fail("tls handshake error"))?;
            let (send, mut conn) = http2.handshake(stream).await.map_err(h2_error)?;
            Ok((send, conn.ping_pong(), Box::pin(conn)))
        }
        None => {
            let (send, mut conn) = http2.handshake(tcp).await.map_err(h2_error)?;
            Ok((send, conn.ping_pong(), Box::pin(conn)))
        }
    }
}

/// An address that refuses connections, for tests: a socket bound to it and never listening.
/// While the socket is held, no other socket is given its port (a port bound and then freed
/// may be given to another test's server at once, which would then take the connections).
#[cfg(test)]
pub(crate) fn refusing_addr() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("a free port");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn settings() -> Settings {
        Settings {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_header_list_size: 1 << 20,
            tls: None,
        }
    }

    /// Polls until the handle reports something other than `Pending`, for at most 10 s.
    async fn outcome(c: &mut Connection) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut cx = Context::from_waker(noop_waker_ref());
            if let Poll::Ready(result) = c.poll_ready(&mut cx) {
                return result.map_err(|e| e.to_string());
            }
            assert!(tokio::time::Instant::now() < deadline, "no outcome");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn each_failed_attempt_is_reported_once_then_the_next_is_awaited() {
        let (_reserved, addr) = refusing_addr();
        let mut c = Connection::spawn(addr, settings());
        let first = outcome(&mut c).await.expect_err("refused");
        assert!(first.starts_with("tcp connect error: "), "{first}");
        // Looked at again at once: the same failure is not reported twice; the handle waits for
        // the next attempt, whose failure it then reports.
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(c.poll_ready(&mut cx).is_pending());
        let second = outcome(&mut c).await.expect_err("refused again");
        assert!(second.starts_with("tcp connect error: "), "{second}");
    }

    #[tokio::test]
    async fn a_peer_that_closes_at_once_is_a_failed_attempt_with_a_reason() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let mut c = Connection::spawn(addr, settings());
        // The handshake may look done before the close arrives: up first, at most briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let error = loop {
            match outcome(&mut c).await {
                Err(e) => break e,
                Ok(()) => {
                    assert!(tokio::time::Instant::now() < deadline, "never failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        assert!(
            error.contains("closed right after the handshake") || error.contains("handshake"),
            "{error}"
        );
    }
}
