//! Discovery: turns a [`Target`] into a stream of endpoint insertions and removals
//! ([`tower::discover::Change`] keyed by `SocketAddr`), on its own task, so endpoints come and go
//! while no calls are flowing.
//!
//! Discovery knows addresses and nothing else: not health, not load, not connections. A later
//! stage (the balancer) turns each inserted address into a connected, health-gated endpoint and
//! may ask for an early re-resolution through [`Refresh`] when an endpoint's connection fails.
//!
//! - A static target (`ipv4:`, `ipv6:`) inserts its addresses once.
//! - A DNS target is resolved with hickory-resolver and re-resolved when the records' TTL runs out
//!   (clamped to a floor and a ceiling), or early on [`Refresh::request`] (rate-limited). Each
//!   answer is diffed against the last one. A failing DNS server keeps the last good set; an answer
//!   with no records removes everything.
//! - Your own source (a service registry, a file watch): [`from_stream`] takes any stream of
//!   insertions and removals.
//! - Of a large fleet, a client may keep a bounded subset ([`subset`]).

mod dns;
pub mod subset;

pub use dns::DnsConfig;

use crate::target::Target;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tower::discover::Change;

/// One discovery event: an address to add or to remove.
pub type Update = Change<SocketAddr, ()>;

/// Asks discovery to re-resolve now instead of waiting for the TTL.
#[derive(Debug, Clone, Default)]
pub struct Refresh(Arc<Notify>);

impl Refresh {
    /// Requests an early re-resolution; requests are coalesced and rate-limited by discovery.
    pub fn request(&self) {
        self.0.notify_one();
    }

    async fn requested(&self) {
        self.0.notified().await;
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The system's DNS configuration could not be read.
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
}

/// What discovery has done, for whoever reports on it.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    /// DNS lookups that failed (the last good set was kept).
    pub failures: Arc<std::sync::atomic::AtomicU64>,
}

/// A running discovery task and the updates it sends. Dropping it stops the task.
#[derive(Debug)]
pub struct Discovery {
    /// Insertions and removals, in order.
    pub updates: mpsc::UnboundedReceiver<Update>,
    /// Its counters.
    pub stats: DiscoveryStats,
    /// The handle to ask for an early re-resolution.
    pub refresh: Refresh,
    /// The texts of the `_grpc_config` TXT record, as DNS last gave them, when
    /// [`DnsConfig::service_config`] asks for them (DNS targets only).
    pub config_records: Option<tokio::sync::watch::Receiver<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts discovering `target` on a new task. Must run inside a tokio runtime.
pub fn spawn(target: &Target, config: &DnsConfig) -> Result<Discovery, DiscoveryError> {
    let (tx, updates) = mpsc::unbounded_channel();
    let refresh = Refresh::default();
    let stats = DiscoveryStats::default();
    let mut config_records = None;
    let task = match target {
        Target::Static(addrs) => {
            let addrs = addrs.clone();
            tokio::spawn(async move {
                for addr in addrs {
                    if tx.send(Change::Insert(addr, ())).is_err() {
                        return;
                    }
                }
                // Keep the stream open: a closed stream would read as "the service went away".
                tx.closed().await;
            })
        }
        Target::Dns { server, host, port } => {
            let resolver = dns::resolver(*server, config)?;
            let records = config.service_config.then(|| {
                let (tx, rx) = tokio::sync::watch::channel(Vec::new());
                config_records = Some(rx);
                tx
            });
            let watch = dns::Watch::new(
                resolver,
                host.clone(),
                *port,
                config.clone(),
                stats.failures.clone(),
                records,
            );
            tokio::spawn(watch.run(tx, refresh.clone()))
        }
    };
    Ok(Discovery {
        updates,
        stats,
        refresh,
        config_records,
        task,
    })
}

/// Discovery from your own stream of insertions and removals (a service registry's watch, a
/// file, a test). Early re-resolution requests are ignored: the stream says when things change.
/// Must run inside a tokio runtime.
pub fn from_stream<S>(changes: S) -> Discovery
where
    S: futures::Stream<Item = Update> + Send + 'static,
{
    use futures::StreamExt;
    let (tx, updates) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut changes = std::pin::pin!(changes);
        while let Some(change) = changes.next().await {
            if tx.send(change).is_err() {
                return;
            }
        }
        // Keep the channel open: an ended stream would read as "the service went away".
        tx.closed().await;
    });
    Discovery {
        updates,
        stats: DiscoveryStats::default(),
        refresh: Refresh::default(),
        config_records: None,
        task,
    }
}
