//! The endpoint registry: which endpoints exist, their shared state for `endpoints()`, and the task
//! that turns discovery's address changes into connected, health-watched endpoints for the
//! balancer. This is the one place that joins discovery, health and balancing; each of those
//! knows nothing of the others.

use super::accrual::AccrualConfig;
use super::aperture::{Aperture, Members};
use super::endpoint::{Endpoint, EndpointSnapshot, EndpointState, Shared};
use super::latency::EwmaConfig;
use super::unavailable::{Reason, Unavailable};
use crate::discovery::subset::{Coordinate, Subset};
use crate::discovery::{Discovery, Update};
use crate::health::{self, HealthConfig};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower::discover::Change;

/// How connections to endpoints are made.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval; a peer that stops answering pings is cut off.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// TLS towards the endpoints (`https`), if set.
    pub tls: Option<crate::tls::Connector>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

struct Entry {
    shared: Arc<Shared>,
    channel: crate::connection::Connection,
    watch: JoinHandle<()>,
    added: Instant,
}

/// Every endpoint currently discovered.
pub struct Registry {
    target: String,
    endpoints: Mutex<BTreeMap<SocketAddr, Entry>>,
    counters: Arc<BalancerCounters>,
    /// Told by every endpoint's gate when it may have come into rotation.
    rotation: Arc<tokio::sync::Notify>,
    /// The aperture's members, as it last decided (0 without one).
    aperture: std::sync::atomic::AtomicUsize,
}

/// A balancer's own counters, beyond its endpoints', read when metrics are scraped. The call
/// path's layers count into them through their own handle, without seeing the registry.
#[derive(Debug, Default)]
pub struct BalancerCounters {
    /// Retries made.
    pub retries: AtomicU64,
    /// Hedges sent.
    pub hedges: AtomicU64,
    /// Hedges that gave the call its answer.
    pub hedge_wins: AtomicU64,
    /// Retries or hedges the budget refused.
    pub budget_exhausted: AtomicU64,
    /// Calls failed fast, by [`Reason`] (in `ALL` order).
    pub fail_fast: [AtomicU64; Reason::ALL.len()],
    /// Endpoints discovery added.
    pub discovered: AtomicU64,
    /// Endpoints discovery removed.
    pub removed: AtomicU64,
    /// DNS lookups that failed (the last good set was kept); shared with discovery.
    pub dns_errors: std::sync::OnceLock<Arc<AtomicU64>>,
}

impl super::deadline::Readiness for Registry {
    fn target(&self) -> &str {
        &self.target
    }

    /// Endpoints on probation are in rotation for their probes, but a caller's call does not go
    /// there: with only those left, the caller hears that they are ejected.
    fn why_unready(&self) -> Option<Unavailable> {
        let open = self
            .lock()
            .values()
            .any(|e| e.shared.gate().open_to_callers());
        (!open).then(|| self.fail_fast())
    }
}

impl BalancerCounters {
    /// Counts a retry or hedge the budget refused.
    pub fn count_budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a retry.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a hedge sent, and whether it won.
    pub fn count_hedge(&self, won: bool) {
        let counter = if won { &self.hedge_wins } else { &self.hedges };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Hedges sent and hedges that answered first.
    pub fn hedges(&self) -> (u64, u64) {
        (
            self.hedges.load(Ordering::Relaxed),
            self.hedge_wins.load(Ordering::Relaxed),
        )
    }
}

impl Registry {
    /// An empty registry for `target` (used in messages).
    pub fn new(target: String) -> Arc<Self> {
        Arc::new(Self {
            target,
            endpoints: Mutex::new(BTreeMap::new()),
            counters: Arc::default(),
            rotation: Arc::default(),
            aperture: Default::default(),
        })
    }

    /// The balancer's own counters.
    pub fn counters(&self) -> &BalancerCounters {
        &self.counters
    }

    /// The counters, for the layers that count into them.
    pub fn counters_handle(&self) -> Arc<BalancerCounters> {
        self.counters.clone()
    }

    /// Why no endpoint is ready, counted as one call failed fast.
    pub fn fail_fast(&self) -> Unavailable {
        let (reason, why) = self.unavailable();
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.counters.fail_fast[i].fetch_add(1, Ordering::Relaxed);
        }
        Unavailable::new(reason, why)
    }

    /// The target, as given.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, Entry>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of every endpoint, ordered by address.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        self.lock().values().map(|e| e.shared.snapshot()).collect()
    }

    /// Hedges sent and hedges that answered first, so far.
    pub fn hedges(&self) -> (u64, u64) {
        self.counters.hedges()
    }

    /// Retries made so far.
    pub fn retries(&self) -> u64 {
        self.counters.retries.load(Ordering::Relaxed)
    }

    fn unavailable(&self) -> (Reason, String) {
        let all = self.snapshot();
        if all.is_empty() {
            return (
                Reason::NoEndpoints,
                format!("no endpoints for {}", self.target),
            );
        }
        let count = |s| all.iter().filter(|e| e.state == s).count();
        let n = all.len();
        // On probation is still out for a caller: only its probe goes there.
        let ejected = count(EndpointState::Ejected)
            + count(EndpointState::EjectedLatency)
            + count(EndpointState::Probing);
        // One concrete cause (a refused connection, a TLS handshake error) beats a count.
        let cause = all
            .iter()
            .find_map(|e| {
                e.last_error
                    .as_ref()
                    .map(|err| format!("; {}: {err}", e.addr))
            })
            .unwrap_or_default();
        for (k, word, reason) in [
            (
                count(EndpointState::Unhealthy),
                "unhealthy",
                Reason::Unhealthy,
            ),
            (ejected, "ejected", Reason::Ejected),
            (
                count(EndpointState::Connecting),
                "connecting or unreachable",
                Reason::Connecting,
            ),
        ] {
            if k == n {
                return (
                    reason,
                    format!("all {n} endpoints of {} are {word}{cause}", self.target),
                );
            }
        }
        let why = format!(
            "no ready endpoint for {}: {} unhealthy, {} ejected, {} connecting or unreachable, {} busy",
            self.target,
            count(EndpointState::Unhealthy),
            ejected,
            count(EndpointState::Connecting),
            count(EndpointState::Ready),
        ) + &cause;
        (Reason::Other, why)
    }

    /// The shared state of every endpoint.
    pub fn shared_endpoints(&self) -> Vec<Arc<Shared>> {
        self.lock().values().map(|e| e.shared.clone()).collect()
    }

    /// What the aperture looks at: how many endpoints, how many in rotation or added less than
    /// `settle` ago, their calls in flight.
    fn members(&self, settle: Duration) -> Members {
        let now = Instant::now();
        let endpoints = self.lock();
        let mut members = Members {
            count: endpoints.len(),
            in_rotation: 0,
            settling: 0,
            in_flight: 0,
        };
        for entry in endpoints.values() {
            if entry.shared.in_rotation() {
                members.in_rotation += 1;
            } else if now.saturating_duration_since(entry.added) < settle {
                members.settling += 1;
            }
            members.in_flight += entry.shared.in_flight();
        }
        members
    }

    /// The aperture's size as it last decided (`None` without an aperture): how many of the
    /// discovered endpoints this client uses.
    pub fn aperture(&self) -> Option<usize> {
        Some(self.aperture.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    /// Records the aperture's size (0: none).
    pub(crate) fn set_aperture(&self, size: usize) {
        self.aperture.store(size, Ordering::Relaxed);
    }

    /// Whether any endpoint is in rotation (on probation for its probe included).
    pub fn any_ready(&self) -> bool {
        self.lock().values().any(|e| e.shared.in_rotation())
    }

    /// A health signal for a new endpoint, observed by [`Registry::until_ready`].
    pub fn health_signal(&self) -> Arc<health::Gate> {
        health::Gate::observed(self.rotation.clone())
    }

    /// Returns once some endpoint is ready: woken by the gates, not by polling.
    pub async fn until_ready(&self) {
        self.until(Self::any_ready).await
    }

    /// Whether every endpoint has had its first word (in rotation, not serving, or failed at
    /// least once); not while none is known.
    pub fn all_settled(&self) -> bool {
        let endpoints = self.lock();
        !endpoints.is_empty() && endpoints.values().all(|e| e.shared.settled())
    }

    /// Returns once every endpoint has had its first word ([`Registry::all_settled`]).
    pub async fn until_settled(&self) {
        self.until(Self::all_settled).await
    }

    /// Returns once `done`, looked at again each time a gate tells of a change.
    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            // Enabled before the look, so a gate changing between the look and the wait is heard.
            let told = self.rotation.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            if done(self) {
                return;
            }
            told.await;
        }
    }

    /// Every endpoint's shared state with its connection (what the silence detector probes).
    pub fn connected_endpoints(&self) -> Vec<(Arc<Shared>, crate::connection::Connection)> {
        self.lock()
            .values()
            .map(|e| (e.shared.clone(), e.channel.clone()))
            .collect()
    }

    pub(super) fn insert(
        &self,
        addr: SocketAddr,
        shared: Arc<Shared>,
        channel: crate::connection::Connection,
        watch: JoinHandle<()>,
    ) {
        let entry = Entry {
            shared,
            channel,
            watch,
            added: Instant::now(),
        };
        if let Some(old) = self.lock().insert(addr, entry) {
            old.watch.abort();
        }
    }

    fn remove(&self, addr: &SocketAddr) {
        if let Some(old) = self.lock().remove(addr) {
            old.watch.abort();
        }
    }

    /// Stops every health watch.
    pub fn shutdown(&self) {
        for (_, entry) in std::mem::take(&mut *self.lock()) {
            entry.watch.abort();
        }
    }
}

/// Calls `look` with the registry every `interval` until the balancer is gone: the loop the
/// detectors (outliers, silence) run on their own tasks.
pub(super) async fn every(
    registry: Weak<Registry>,
    interval: Duration,
    mut look: impl FnMut(&Registry),
) {
    // A zero interval (a config's mistake) would panic the task; a millisecond is as often as
    // any detector needs to look.
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        look(&registry);
    }
}

/// What the manager needs to build an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// Connections.
    pub connect: ConnectConfig,
    /// The health watch.
    pub health: HealthConfig,
    /// Failure accrual.
    pub accrual: AccrualConfig,
    /// The latency estimate p2c balances by.
    pub ewma: EwmaConfig,
    /// Which of the discovered addresses to connect to.
    pub membership: Membership,
    /// This client's place among its peers: a subset or an aperture is then its slice of a ring
    /// they share, not a salted one of its own ([`crate::discovery::subset`]).
    pub coordinate: Option<Coordinate>,
    /// The probe of an ejected endpoint when the call it is handed may not be duplicated.
    pub(crate) probe: super::probe::OwnProbe,
}

/// Which of the discovered addresses the registry connects to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Membership {
    /// Every one.
    All,
    /// A subset of a fixed size (`random_subsetting`).
    Subset(usize),
    /// An aperture sized by load ([`super::aperture`]).
    Aperture(super::aperture::ApertureConfig),
}

/// Consumes discovery updates until the balancer goes away: keeps the members (every address,
/// a subset's, or an aperture's, resized as it looks at the load), connects to each new one,
/// starts its health watch, registers it and hands it to the balancer.
pub async fn manage(
    mut discovery: Discovery,
    registry: Arc<Registry>,
    settings: EndpointSettings,
    to_balancer: mpsc::UnboundedSender<Change<SocketAddr, Endpoint>>,
) {
    let _ = registry
        .counters
        .dns_errors
        .set(discovery.stats.failures.clone());
    let subset_of = |size| match settings.coordinate {
        Some(coordinate) => Subset::placed(size, coordinate),
        None => Subset::new(size),
    };
    let (mut subset, mut aperture) = match settings.membership {
        Membership::All => (None, None),
        Membership::Subset(size) => (Some(subset_of(size)), None),
        Membership::Aperture(config) => {
            let aperture = Aperture::new(config);
            (Some(subset_of(aperture.size())), Some(aperture))
        }
    };
    let mut look = tokio::time::interval(
        aperture
            .as_ref()
            .map_or(Duration::from_secs(3600), Aperture::interval),
    );
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let updates = tokio::select! {
            first = discovery.updates.recv() => {
                let Some(first) = first else { return };
                // What discovery has queued came together (one DNS answer): a subset is chosen
                // once for all of it, so no member is connected only to be dropped a change
                // later.
                let mut batch = vec![first];
                while let Ok(more) = discovery.updates.try_recv() {
                    batch.push(more);
                }
                for update in &batch {
                    let counter = match update {
                        Update::Insert(..) => &registry.counters.discovered,
                        Update::Remove(_) => &registry.counters.removed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                match &mut subset {
                    Some(subset) => subset.apply_all(batch),
                    None => batch,
                }
            }
            _ = look.tick(), if aperture.is_some() => {
                match (&mut aperture, &mut subset) {
                    (Some(aperture), Some(subset)) => {
                        aperture.set_floor(subset.floor());
                        let size = aperture.look(
                            Instant::now(),
                            registry.members(aperture.settle()),
                            subset.known(),
                        );
                        subset.resize(size)
                    }
                    _ => Vec::new(),
                }
            }
        };
        for update in updates {
            if !hand_on(update, &discovery, &registry, &settings, &to_balancer) {
                return;
            }
        }
        // Recorded once the members are what it says, after a look or a discovery batch.
        if let (Some(_), Some(subset)) = (&aperture, &subset) {
            registry.set_aperture(subset.len());
        }
    }
}

/// Turns one address change into an endpoint change for the balancer; false once the balancer
/// is gone.
fn hand_on(
    update: Update,
    discovery: &Discovery,
    registry: &Registry,
    settings: &EndpointSettings,
    to_balancer: &mpsc::UnboundedSender<Change<SocketAddr, Endpoint>>,
) -> bool {
    let change = match update {
        Update::Insert(addr, ()) => {
            let channel = connect(addr, &settings.connect);
            let gate = registry.health_signal();
            let shared = Shared::new(addr, gate.clone(), settings.accrual, settings.ewma);
            let watch = health::spawn_watch(channel.clone(), settings.health.clone(), gate);
            registry.insert(addr, shared.clone(), channel.clone(), watch);
            tracing::debug!(%addr, "endpoint added");
            Change::Insert(
                addr,
                Endpoint::new(
                    shared,
                    channel,
                    discovery.refresh.clone(),
                    settings.probe.clone(),
                ),
            )
        }
        Update::Remove(addr) => {
            // The balancer hears of the removal first (it reads its queue before every
            // choice), so an endpoint gone from `endpoints()` is never chosen again.
            if to_balancer.send(Change::Remove(addr)).is_err() {
                return false;
            }
            registry.remove(&addr);
            tracing::debug!(%addr, "endpoint removed");
            return true;
        }
    };
    to_balancer.send(change).is_ok()
}

fn connect(addr: SocketAddr, config: &ConnectConfig) -> crate::connection::Connection {
    crate::connection::Connection::spawn(
        addr,
        crate::connection::Settings {
            connect_timeout: config.connect_timeout,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            max_header_list_size: super::failure::MAX_HEADER_LIST_SIZE,
            tls: config.tls.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_detector_with_a_zero_interval_runs_instead_of_panicking() {
        let registry = Registry::new("t".into());
        let looked = std::cell::Cell::new(0);
        let weak = Arc::downgrade(&registry);
        let run = every(weak, Duration::ZERO, |_| {
            looked.set(looked.get() + 1);
        });
        // It looks every millisecond until the registry is gone.
        let stop = async {
            while looked.get() < 3 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(registry);
        };
        tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, stop))
            .await
            .expect("the detector stops with its registry");
        assert!(looked.get() >= 3);
    }

    /// A registry for "t" with one endpoint, not yet serving: its shared state and health.
    fn one_endpoint() -> (Arc<Registry>, Arc<Shared>, Arc<health::Gate>) {
        let registry = Registry::new("t".into());
        let (shared, health) = add_endpoint(&registry, 1);
        (registry, shared, health)
    }

    /// Adds an endpoint at 127.0.0.1:`port`, not yet serving: its shared state and health.
    fn add_endpoint(registry: &Registry, port: u16) -> (Arc<Shared>, Arc<health::Gate>) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let health = registry.health_signal();
        let shared = Shared::new(
            addr,
            health.clone(),
            AccrualConfig::default(),
            EwmaConfig::default(),
        );
        let channel = connect(addr, &ConnectConfig::default());
        registry.insert(addr, shared.clone(), channel, tokio::spawn(async {}));
        (shared, health)
    }

    /// The wait for a ready endpoint is woken by the gate that opens, at that instant (on a paused
    /// clock, a wait that polled would have let time pass).
    #[tokio::test(start_paused = true)]
    async fn the_wait_for_readiness_ends_when_a_gate_opens_not_at_a_poll() {
        let (registry, shared, health) = one_endpoint();

        let start = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.until_ready().await }
        });
        crate::balance::testing::settle().await;
        assert!(!waiting.is_finished(), "nothing is serving yet");
        health.set(health::Health::Serving);
        crate::balance::testing::settle().await;
        assert!(waiting.is_finished(), "woken by the gate");
        assert_eq!(tokio::time::Instant::now(), start, "no time passed");

        // Ejected, it is out of rotation; the end of the ejection wakes a new wait.
        shared.eject_for_latency(Duration::from_millis(10));
        crate::balance::testing::settle().await;
        assert!(!registry.any_ready());
        let waiting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.until_ready().await }
        });
        crate::balance::testing::settle().await;
        assert!(!waiting.is_finished());
        // The ejection's backoff is at most a second; its end offers a probe: in rotation again.
        tokio::time::advance(Duration::from_secs(1)).await;
        crate::balance::testing::settle().await;
        assert!(waiting.is_finished(), "woken by the ejection's end");
    }

    /// The wait for every endpoint's first word ends when the last one says something: serving,
    /// not serving, or a failure. One endpoint in rotation is not enough, and nothing is polled.
    #[tokio::test(start_paused = true)]
    async fn the_wait_for_every_endpoint_ends_at_the_last_ones_first_word() {
        let (registry, _, first) = one_endpoint();
        let (_, second) = add_endpoint(&registry, 2);
        let (_, third) = add_endpoint(&registry, 3);
        let start = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.until_settled().await }
        });
        first.set(health::Health::Serving);
        crate::balance::testing::settle().await;
        assert!(registry.any_ready());
        assert!(!waiting.is_finished(), "two have not answered yet");
        second.set(health::Health::NotServing);
        crate::balance::testing::settle().await;
        assert!(!waiting.is_finished(), "one has not answered yet");
        third.shut("connection refused".into());
        crate::balance::testing::settle().await;
        assert!(waiting.is_finished(), "woken by the failure");
        assert_eq!(tokio::time::Instant::now(), start, "no time passed");
        assert!(registry.all_settled());
        assert!(
            !Registry::new("none".into()).all_settled(),
            "none known yet"
        );
    }

    /// An endpoint on probation is in rotation for its probe only: a caller left with nothing
    /// else hears that the fleet is ejected, not that some endpoint is ready.
    #[tokio::test(start_paused = true)]
    async fn a_caller_left_with_endpoints_on_probation_hears_they_are_ejected() {
        use crate::balance::deadline::Readiness;
        let (registry, shared, health) = one_endpoint();
        health.set(health::Health::Serving);
        crate::balance::testing::settle().await;
        assert!(registry.why_unready().is_none(), "ready");

        shared.eject_for_latency(Duration::from_millis(10));
        crate::balance::testing::settle().await;
        let out = registry.why_unready().expect("ejected");
        tokio::time::advance(Duration::from_secs(1)).await;
        crate::balance::testing::settle().await;
        assert_eq!(shared.snapshot().state, EndpointState::Probing);
        assert!(registry.any_ready(), "in rotation for its probe");
        let probing = registry.why_unready().expect("not open to callers");
        assert_eq!(probing.reason, out.reason);
        assert!(
            probing
                .to_string()
                .contains("all 1 endpoints of t are ejected"),
            "{probing}"
        );
    }
}
