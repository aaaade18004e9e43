//! The health gate: for one endpoint, a `grpc.health.v1.Health/Watch` stream that opens a
//! [`Gate`] while the endpoint says `SERVING` and shuts it otherwise.
//!
//! The gate starts shut, so an endpoint whose connection never comes up is never offered.
//! `NOT_SERVING`, `SERVICE_UNKNOWN`, `NotFound` (tonic-health's answer for an unknown service) and a
//! broken or ended stream all shut it, within one message. The watch is re-established with
//! jittered exponential backoff. A server without the health service (`UNIMPLEMENTED`) counts as
//! serving, as grpc-go does.
//!
//! This module knows one connection and one gate; it knows nothing of balancing or discovery.
//! Whoever reads the gate (the balancer's endpoint) registers for wake-ups with
//! [`Gate::poll_open`], and may ask for an immediate re-check with [`Gate::recheck`] when it saw the
//! connection fail.

use crate::backoff::Backoff;
use crate::connection::Connection;
use futures::task::AtomicWaker;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::Service;

/// What the gate knows of an endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No answer yet, or the connection broke and is being re-established.
    Connecting,
    /// The endpoint said `SERVING` (or has no health service).
    Serving,
    /// The endpoint said it is not serving, or does not know the service.
    NotServing,
}

impl Health {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Health::Serving,
            2 => Health::NotServing,
            _ => Health::Connecting,
        }
    }
}

/// An open/shut signal for one endpoint, written by the health watch and read by the balancer.
#[derive(Debug, Default)]
pub struct Gate {
    health: AtomicU8,
    waker: AtomicWaker,
    recheck: Notify,
    last_error: std::sync::Mutex<Option<String>>,
    /// Told whenever the endpoint turns `SERVING` or `NOT_SERVING`, or fails to connect or to
    /// answer (the balancer's waits for a ready endpoint, and for every endpoint's first word).
    observer: Option<Arc<Notify>>,
}

impl Gate {
    /// A shut gate: nothing is offered until the first `SERVING`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A shut gate that tells every waiter of `observer` when it opens, when the endpoint says it
    /// is not serving, and when it fails.
    pub fn observed(observer: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            observer: Some(observer),
            ..Self::default()
        })
    }

    /// The current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    /// Why the last health watch failed (a refused connection, a TLS handshake error), until the
    /// endpoint answers again.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_error(&self, error: Option<String>) {
        let failed = error.is_some();
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        if failed {
            self.tell_observer();
        }
    }

    /// Tells the observer, if any, that something it may wait for changed (also the end of an
    /// ejection, which the balancer's gate decides).
    pub fn tell_observer(&self) {
        if let Some(observer) = &self.observer {
            observer.notify_waiters();
        }
    }

    /// Records a new health and wakes the reader if it changed.
    pub fn set(&self, health: Health) {
        let v = health as u8;
        if self.health.swap(v, Ordering::AcqRel) != v {
            self.waker.wake();
            if health != Health::Connecting {
                self.tell_observer();
            }
        }
    }

    /// Ready when the endpoint is serving; otherwise registers `cx` to be woken on a change.
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.health() == Health::Serving {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Shuts the gate for `reason` (kept as the last error until the endpoint answers again) and
    /// asks the watch to re-establish itself.
    pub fn shut(&self, reason: String) {
        self.set_error(Some(reason));
        self.recheck();
    }

    /// Shuts the gate and asks the watch to re-establish itself now: the caller saw the
    /// connection fail, and the gate stays shut until the endpoint answers `SERVING` again.
    pub fn recheck(&self) {
        self.set(Health::Connecting);
        self.recheck.notify_one();
    }
}

/// How the health watch behaves.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// The service name to watch (`""` means the whole server).
    pub service: String,
    /// First retry delay after a broken watch; doubles up to `backoff_max`.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
    /// How long the first answer of a new watch may take (a frozen process accepts TCP but never
    /// answers).
    pub answer_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            service: String::new(),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(5),
        }
    }
}

/// Watches `connection`'s health until the returned task is aborted, writing into `gate`.
pub fn spawn_watch(
    connection: Connection,
    config: HealthConfig,
    gate: Arc<Gate>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch_loop(connection, config, gate))
}

/// How one watch ended.
enum Ended {
    /// It had answered at least once before ending: retry soon.
    AfterAnswer,
    /// It never answered: back off.
    WithoutAnswer,
    /// The server has no health service: it counts as serving until a call fails.
    Unimplemented,
    /// The balancer asked for a re-check.
    Recheck,
}

async fn watch_loop(mut connection: Connection, config: HealthConfig, gate: Arc<Gate>) {
    let mut client = tonic::client::Grpc::new(connection.clone());
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    loop {
        let wait = match watch_once(&mut connection, &mut client, &config, &gate).await {
            Ended::Recheck => continue,
            Ended::Unimplemented => {
                gate.set(Health::Serving);
                backoff.reset();
                // Nothing to watch; only a failed call (recheck) or a slow poll looks again.
                config.backoff_max * 6
            }
            Ended::AfterAnswer => {
                backoff.reset();
                config.backoff_base
            }
            Ended::WithoutAnswer => backoff.next_delay(),
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = gate.recheck.notified() => {}
        }
    }
}

/// The decode buffer of a health watch, which lives as long as its endpoint: a status is a few
/// bytes, and tonic's default (8 KiB) was an eighth of what an endpoint holds.
const WATCH_BUFFER: usize = 256;

/// `grpc.health.v1.Health/Watch`, as tonic-health's client calls it but for the buffer size.
async fn watch(
    client: &mut tonic::client::Grpc<Connection>,
    request: HealthCheckRequest,
) -> Result<tonic::Response<tonic::Streaming<HealthCheckResponse>>, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Watch");
    client
        .server_streaming(tonic::Request::new(request), path, {
            // They grow if a message needs more.
            let small = tonic::codec::BufferSettings::new(WATCH_BUFFER, 32 * 1024);
            crate::grpc::SizedCodec::new(small, small)
        })
        .await
}

async fn watch_once(
    connection: &mut Connection,
    client: &mut tonic::client::Grpc<Connection>,
    config: &HealthConfig,
    gate: &Gate,
) -> Ended {
    let request = HealthCheckRequest {
        service: config.service.clone(),
    };
    let started = async {
        // Asked apart from the watch, so that a connection that cannot be made is reported in
        // its own words ("tcp connect error: …"), not as tonic's "service was not ready".
        std::future::poll_fn(|cx| connection.poll_ready(cx))
            .await
            .map_err(|e| {
                tonic::Status::unavailable(with_causes(
                    e.to_string(),
                    std::error::Error::source(&*e),
                ))
            })?;
        let mut stream = watch(client, request).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = tokio::select! {
        result = tokio::time::timeout(config.answer_timeout, started) => match result {
            Ok(Ok(started)) => started,
            Ok(Err(status)) if status.code() == Code::Unimplemented => return Ended::Unimplemented,
            Ok(Err(status)) => {
                let health = if status.code() == Code::NotFound { Health::NotServing } else { Health::Connecting };
                gate.set_error(Some(error_chain(&status)));
                gate.set(health);
                tracing::debug!(%status, "health watch failed");
                return Ended::WithoutAnswer;
            }
            Err(_) => {
                gate.set_error(Some(format!("no health answer within {:?}", config.answer_timeout)));
                gate.set(Health::Connecting);
                return Ended::WithoutAnswer;
            }
        },
        () = gate.recheck.notified() => return Ended::Recheck,
    };
    gate.set_error(None);
    let mut next = first;
    loop {
        match next {
            Some(msg) => gate.set(if msg.status == ServingStatus::Serving as i32 {
                Health::Serving
            } else {
                Health::NotServing
            }),
            None => {
                // tonic-health ends the stream when a status is cleared (a draining server).
                gate.set(Health::NotServing);
                return Ended::AfterAnswer;
            }
        }
        next = tokio::select! {
            msg = stream.message() => match msg {
                Ok(msg) => msg,
                Err(status) => {
                    tracing::debug!(%status, "health watch broke");
                    gate.set(Health::Connecting);
                    return Ended::AfterAnswer;
                }
            },
            () = gate.recheck.notified() => return Ended::Recheck,
        };
    }
}

/// A status with its whole chain of causes: tonic's "transport error" alone says nothing, the TLS
/// or connection error under it does.
fn error_chain(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_owned(),
        std::error::Error::source(status),
    )
}

/// `head`, then each cause from `source` down that `head` does not already say.
pub(crate) fn with_causes(
    head: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    let mut text = head;
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn gate_starts_shut_and_follows_health() {
        let gate = Gate::new();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert_eq!(gate.health(), Health::Connecting);
        assert!(gate.poll_open(&mut cx).is_pending());
        gate.set(Health::Serving);
        assert!(gate.poll_open(&mut cx).is_ready());
        gate.set(Health::NotServing);
        assert!(gate.poll_open(&mut cx).is_pending());
        gate.set(Health::Serving);
        gate.recheck();
        assert_eq!(gate.health(), Health::Connecting);
        assert!(gate.poll_open(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn a_change_wakes_the_reader() {
        let gate = Gate::new();
        let reader = {
            let gate = gate.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| gate.poll_open(cx)).await })
        };
        tokio::task::yield_now().await;
        gate.set(Health::Serving);
        tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .expect("task");
    }
}
