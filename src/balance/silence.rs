//! Silent-failure detection: an endpoint whose connection went quiet (its node or network died:
//! packets vanish, no RST, no FIN) is found in well under a second, taken out of rotation, and
//! its stuck calls are failed over to other endpoints, instead of waiting out their deadline or
//! HTTP/2 keepalive (tens of seconds).
//!
//! # How
//! Each endpoint records *progress*: the last time one of its calls ended, or a call started on
//! it while it had none in flight. A detector task looks every `interval`: an endpoint with calls
//! in flight and no progress for `max(floor, factor × the fleet's median latency)`, while some
//! other endpoint in rotation is not overdue (it answered, or has nothing in flight), is *suspect*. A suspect gets one grpc.health.v1
//! `Check` with a short deadline over its own connection. If that answers, the endpoint is only
//! busy (a long stream), and the answer counts as progress. If it does not, the endpoint is
//! declared silent: its gate shuts (the health watch must see `SERVING` again to reopen it) and
//! every call waiting on it ends with a connection error, which the call layer retries elsewhere.
//!
//! No pings are sent on a timer, so servers that police pings (grpc-go's `too_many_pings`) see
//! nothing unusual: one health check, only when calls are overdue. A uniformly slow fleet is never
//! suspect: the threshold follows the fleet's own latency, and an endpoint overdue alone is.
//!
//! Knows endpoints' progress and connections; nothing of discovery or how calls are balanced.

use super::endpoint::Shared;
use super::registry::Registry;
use crate::connection::Connection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Silent-failure detection settings.
#[derive(Debug, Clone, Copy)]
pub struct SilenceConfig {
    /// Off turns detection off.
    pub enabled: bool,
    /// Calls overdue by less than this are never suspect.
    pub floor: Duration,
    /// Overdue means more than this many times the fleet's median latency (or `floor`).
    pub factor: f64,
    /// How often the detector looks.
    pub interval: Duration,
    /// How long the health check of a suspect may take.
    pub probe_timeout: Duration,
}

impl Default for SilenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            floor: Duration::from_millis(250),
            factor: 8.0,
            interval: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(250),
        }
    }
}

impl SilenceConfig {
    fn threshold(&self, median: Duration) -> Duration {
        median.mul_f64(self.factor).max(self.floor)
    }
}

// === impl Progress ===

/// One endpoint's progress, and the signal that fails its waiting calls over.
#[derive(Debug)]
pub struct Progress {
    base: Instant,
    last_ns: AtomicU64,
    probing: AtomicBool,
    failover: watch::Sender<u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ns: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            failover: watch::Sender::new(0),
        }
    }
}

impl Progress {
    fn mark(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    /// A call starts; `was_idle` when none was in flight (the clock starts now, not at the last
    /// call of long ago).
    pub fn call_started(&self, was_idle: bool) {
        if was_idle {
            self.mark();
        }
    }

    /// A call ended (whatever its outcome): the connection moves.
    pub fn call_ended(&self) {
        self.mark();
    }

    /// How long since the last progress.
    pub fn quiet_for(&self, now: Instant) -> Duration {
        let last = self.base + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Resolves when the endpoint is declared silent; a call waiting on it should give up then.
    pub fn failed_over(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.failover.subscribe();
        async move {
            if rx.changed().await.is_err() {
                // The endpoint is gone without being declared silent: nothing to wait for.
                std::future::pending::<()>().await;
            }
        }
    }

    fn declare_silent(&self) {
        self.failover.send_modify(|n| *n += 1);
    }
}

/// Runs until the registry is gone.
pub async fn detect(registry: Weak<Registry>, config: SilenceConfig) {
    super::registry::every(registry, config.interval, |registry| {
        let endpoints = registry.connected_endpoints();
        for (shared, channel) in suspects(&endpoints, &config, Instant::now()) {
            if shared.progress().probing.swap(true, Ordering::AcqRel) {
                continue;
            }
            tokio::spawn(probe(shared, channel, config));
        }
    })
    .await;
}

/// What the detector reads of one endpoint.
#[derive(Debug, Clone, Copy)]
struct Look {
    in_rotation: bool,
    in_flight: u64,
    latency: Duration,
    quiet: Duration,
}

impl Look {
    fn of(e: &Shared, now: Instant) -> Self {
        Self {
            in_rotation: e.in_rotation(),
            in_flight: e.in_flight(),
            latency: e.latency().0,
            quiet: e.progress().quiet_for(now),
        }
    }
}

/// The endpoints worth a probe, with their connections.
fn suspects(
    endpoints: &[(Arc<Shared>, Connection)],
    config: &SilenceConfig,
    now: Instant,
) -> Vec<(Arc<Shared>, Connection)> {
    let looks: Vec<Look> = endpoints.iter().map(|(e, _)| Look::of(e, now)).collect();
    overdue_alone(&looks, config)
        .into_iter()
        .map(|i| endpoints[i].clone())
        .collect()
}

/// The indexes of the endpoints in rotation whose calls are overdue while another endpoint in
/// rotation is not. Not "while another answered": when every caller is stuck on the silent
/// endpoint (one caller, or p2c piling onto the endpoint that looked fastest), nobody else makes
/// progress, yet the stuck calls must not wait out their deadline. A fleet overdue everywhere is
/// slow, not silent.
fn overdue_alone(looks: &[Look], config: &SilenceConfig) -> Vec<usize> {
    let latencies: Vec<Duration> = looks
        .iter()
        .filter(|l| l.in_rotation)
        .map(|l| l.latency)
        .collect();
    if latencies.len() < 2 {
        return Vec::new();
    }
    let threshold = config.threshold(median(latencies));
    let overdue: Vec<bool> = looks
        .iter()
        .map(|l| l.in_rotation && l.in_flight > 0 && l.quiet > threshold)
        .collect();
    // An overdue endpoint is never its own witness, so one count answers for all (O(n), not n²).
    let on_time = looks
        .iter()
        .zip(&overdue)
        .any(|(l, &late)| l.in_rotation && !late);
    (0..looks.len())
        .filter(|&i| overdue[i] && on_time)
        .collect()
}

async fn probe(shared: Arc<Shared>, channel: Connection, config: SilenceConfig) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let quiet = shared.progress().quiet_for(Instant::now());
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    let answered = match tokio::time::timeout(config.probe_timeout, check).await {
        // Any answer, even an error status, means the connection carries frames.
        Ok(Ok(_)) => true,
        Ok(Err(status)) => {
            tracing::debug!(addr = %shared.addr(), %status, "a suspect's health check failed");
            !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            )
        }
        Err(_) => false,
    };
    if answered {
        tracing::debug!(addr = %shared.addr(), ?quiet, "a suspect answered its health check; only busy");
        shared.progress().call_ended();
    } else {
        let reason = format!(
            "silent: calls waited {quiet:?} while the rest of the fleet was not overdue, and a health check got no answer in {:?}",
            config.probe_timeout
        );
        tracing::warn!(addr = %shared.addr(), %reason, "connection declared silent; failing its calls over");
        shared.declare_silent(reason);
        shared.progress().declare_silent();
    }
    shared.progress().probing.store(false, Ordering::Release);
}

fn median(mut values: Vec<Duration>) -> Duration {
    // The middle value without sorting the rest: the look stays O(n) in the fleet's size.
    if values.is_empty() {
        return Duration::ZERO;
    }
    let middle = values.len() / 2;
    *values.select_nth_unstable(middle).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn progress_measures_quiet_time_and_fails_waiters_over() {
        let p = Progress::default();
        p.call_started(true);
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(p.quiet_for(Instant::now()), Duration::from_millis(300));
        // A call starting while others are in flight does not reset the clock.
        p.call_started(false);
        assert_eq!(p.quiet_for(Instant::now()), Duration::from_millis(300));
        p.call_ended();
        assert_eq!(p.quiet_for(Instant::now()), Duration::ZERO);

        let waiter = tokio::spawn(p.failed_over());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.declare_silent();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter is released")
            .unwrap();
    }

    fn look(in_flight: u64, quiet_ms: u64) -> Look {
        Look {
            in_rotation: true,
            in_flight,
            latency: Duration::from_millis(1),
            quiet: Duration::from_millis(quiet_ms),
        }
    }

    #[test]
    fn an_endpoint_overdue_alone_is_suspect_even_when_the_others_are_idle() {
        let c = SilenceConfig::default();
        // Busy others that answer, or others with nothing in flight: the stuck one is suspect.
        assert_eq!(
            overdue_alone(&[look(3, 900), look(2, 5), look(2, 1)], &c),
            [0]
        );
        assert_eq!(
            overdue_alone(&[look(0, 900), look(8, 900), look(0, 900)], &c),
            [1]
        );
        // Overdue everywhere: a slow fleet, not a silent endpoint.
        assert!(overdue_alone(&[look(3, 900), look(2, 900)], &c).is_empty());
        // Quiet with nothing in flight, or not overdue yet: nothing to suspect.
        assert!(overdue_alone(&[look(0, 900), look(2, 5)], &c).is_empty());
        assert!(overdue_alone(&[look(3, 200), look(0, 900)], &c).is_empty());
        // Out of rotation (ejected, or its gate shut): neither suspect nor a witness.
        let out = Look {
            in_rotation: false,
            ..look(0, 0)
        };
        assert!(overdue_alone(&[look(3, 900), out], &c).is_empty());
    }

    #[test]
    fn the_threshold_follows_the_fleet_with_a_floor() {
        let c = SilenceConfig::default();
        assert_eq!(c.threshold(Duration::from_millis(1)), c.floor);
        assert_eq!(
            c.threshold(Duration::from_millis(500)),
            Duration::from_secs(4)
        );
    }
}
