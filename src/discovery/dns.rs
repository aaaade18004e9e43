//! DNS discovery: resolve, diff against the last answer, wait for the TTL (or a refresh request),
//! repeat. A failing DNS server keeps the last good set and is retried with backoff; state changes
//! are logged once, not per attempt.

use super::{DiscoveryError, Refresh, Update};
use crate::backoff::Backoff;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tower::discover::Change;

/// How DNS discovery paces itself.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Never re-resolve sooner than this after an answer, whatever its TTL.
    pub ttl_floor: Duration,
    /// Never keep an answer longer than this, whatever its TTL.
    pub ttl_ceiling: Duration,
    /// The longest wait between retries while the DNS server fails.
    pub backoff_max: Duration,
    /// How long one query may take before it counts as a failure.
    pub query_timeout: Duration,
    /// Also read the service config gRPC's DNS resolver publishes, the TXT record
    /// `_grpc_config.HOST`, after each answered address lookup. Off by default, as in grpc-core.
    pub service_config: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            ttl_floor: Duration::from_secs(1),
            ttl_ceiling: Duration::from_secs(30),
            backoff_max: Duration::from_secs(10),
            query_timeout: Duration::from_secs(2),
            service_config: false,
        }
    }
}

/// Builds a resolver: the system's configuration, or the one server the target names.
pub(super) fn resolver(
    server: Option<SocketAddr>,
    config: &DnsConfig,
) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => {
            TokioResolver::builder_tokio().map_err(|e| DiscoveryError::Resolver(e.to_string()))?
        }
    };
    let opts = builder.options_mut();
    opts.timeout = config.query_timeout;
    opts.attempts = 1;
    // A headless Service answers A records; ask AAAA only when there are none.
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    builder
        .build()
        .map_err(|e| DiscoveryError::Resolver(e.to_string()))
}

/// The state of one DNS name being watched.
pub(super) struct Watch {
    resolver: TokioResolver,
    host: String,
    port: u16,
    config: DnsConfig,
    current: BTreeSet<SocketAddr>,
    /// Failed lookups in a row, and how long to wait before the next.
    backoff: Backoff,
    /// Every failed lookup, for metrics.
    failed_lookups: Arc<AtomicU64>,
    /// Where the `_grpc_config` TXT record's texts go, when they are read.
    config_records: Option<watch::Sender<Vec<String>>>,
    /// The full name the last address lookup answered for (after any search domain).
    answered: Option<String>,
}

/// The first retry of a failed lookup comes after about this long, doubling up to
/// `DnsConfig::backoff_max`.
const RETRY_BASE: Duration = Duration::from_millis(250);

/// What one lookup gave.
enum Answer {
    Records(BTreeSet<SocketAddr>, Duration),
    Empty,
    Failed(String),
}

impl Watch {
    pub(super) fn new(
        resolver: TokioResolver,
        host: String,
        port: u16,
        config: DnsConfig,
        failed_lookups: Arc<AtomicU64>,
        config_records: Option<watch::Sender<Vec<String>>>,
    ) -> Self {
        Self {
            resolver,
            host,
            port,
            current: BTreeSet::new(),
            backoff: Backoff::new(RETRY_BASE, config.backoff_max),
            config,
            failed_lookups,
            config_records,
            answered: None,
        }
    }

    pub(super) async fn run(mut self, tx: mpsc::UnboundedSender<Update>, refresh: Refresh) {
        loop {
            let last_lookup = Instant::now();
            let wait = match self.lookup().await {
                Answer::Records(addrs, ttl) => {
                    self.recovered();
                    if !self.apply(addrs, &tx) {
                        return;
                    }
                    // After the addresses, so that a slow or failing TXT query never holds
                    // them up; only while DNS answers, so that an outage costs one timeout a
                    // round, not two.
                    self.read_config().await;
                    ttl.clamp(self.config.ttl_floor, self.config.ttl_ceiling)
                }
                Answer::Empty => {
                    self.recovered();
                    if !self.current.is_empty() {
                        tracing::warn!(host = %self.host, "DNS answered with no records: removing every endpoint");
                    }
                    if !self.apply(BTreeSet::new(), &tx) {
                        return;
                    }
                    self.config.ttl_floor
                }
                Answer::Failed(error) => {
                    self.failed_lookups.fetch_add(1, Ordering::Relaxed);
                    if self.backoff.failures() == 0 {
                        tracing::warn!(host = %self.host, %error, kept = self.current.len(), "DNS lookup failed: keeping the last good set and retrying");
                    }
                    // Jittered, so that many clients do not retry a recovering DNS server in
                    // lockstep.
                    self.backoff.next_delay()
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = refresh.requested() => {
                    // Rate limit: a burst of failing endpoints asks many times.
                    let earliest = last_lookup + self.config.ttl_floor;
                    tokio::time::sleep_until(earliest).await;
                    self.resolver.clear_cache();
                }
                () = tx.closed() => return,
            }
        }
    }

    async fn lookup(&mut self) -> Answer {
        match self.resolver.lookup_ip(self.host.as_str()).await {
            Ok(lookup) => {
                self.answered = Some(lookup.query().name().to_string());
                let addrs: BTreeSet<_> = lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, self.port))
                    .collect();
                if addrs.is_empty() {
                    return Answer::Empty;
                }
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                Answer::Records(addrs, ttl)
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Answer::Empty,
            Err(e) => Answer::Failed(e.to_string()),
        }
    }

    /// Reads `_grpc_config.HOST` when asked to. Its texts go out when they change; no record
    /// is an empty list (no config from DNS); a failed lookup changes nothing, so the last good
    /// config stays.
    async fn read_config(&self) {
        let Some(tx) = &self.config_records else {
            return;
        };
        // The name the addresses came from, fully qualified: one query, no search list to
        // fall through (where a timeout on one name and NXDOMAIN on the next would read as
        // "no record" and drop a good config).
        let name = format!(
            "_grpc_config.{}",
            self.answered.as_deref().unwrap_or(&self.host)
        );
        let mut texts: Vec<String> = match self.resolver.txt_lookup(name.as_str()).await {
            // A record's strings are one text, split only because DNS strings are short.
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
            Err(error) => {
                tracing::debug!(%name, %error, "service config lookup failed: keeping the last one");
                return;
            }
        };
        // In a stable order: a server that rotates its answers changes nothing.
        texts.sort();
        tx.send_if_modified(|current| {
            let changed = *current != texts;
            if changed {
                *current = texts;
            }
            changed
        });
    }

    fn recovered(&mut self) {
        if self.backoff.failures() > 0 {
            tracing::info!(host = %self.host, failures = self.backoff.failures(), "DNS lookups succeed again");
            self.backoff.reset();
        }
    }

    /// Sends the difference between the current set and `next`; false when nobody listens.
    fn apply(&mut self, next: BTreeSet<SocketAddr>, tx: &mpsc::UnboundedSender<Update>) -> bool {
        for gone in self.current.difference(&next) {
            tracing::info!(host = %self.host, addr = %gone, "endpoint left DNS");
            if tx.send(Change::Remove(*gone)).is_err() {
                return false;
            }
        }
        for new in next.difference(&self.current) {
            tracing::info!(host = %self.host, addr = %new, "endpoint found in DNS");
            if tx.send(Change::Insert(*new, ())).is_err() {
                return false;
            }
        }
        self.current = next;
        true
    }
}
