//! The balancer's metrics, for Prometheus: per endpoint (state, calls in flight, the latency
//! estimate, calls by gRPC code, ejections by reason, probes), per balancer (retries, hedges and
//! hedge wins, refusals of the retry budget, calls failed fast by reason, discovery updates, DNS
//! errors), and per method the client-side latency and outcome.
//!
//! Hand a `prometheus_client` registry to [`Metrics::register`] and the result to
//! [`super::Builder::metrics`]; every balancer built with it reports into that registry,
//! labelled by its target. Almost everything is read from counters the balancer keeps anyway,
//! when the registry is scraped, so the call path pays only for the per-method histogram.
//! Names: `meshlb_*` for what is the balancer's own, go-grpc-prometheus'
//! `grpc_client_handled_total` / `grpc_client_handling_seconds` for calls. It knows nothing of
//! how the registry is served.

use super::endpoint::EndpointState;
use super::registry::Registry;
use super::unavailable::Reason as FailFastReason;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use tokio::time::Instant;
use tonic::Code;

/// The state label values of `meshlb_endpoint_state`, one series each (1 for the current one).
pub const STATES: [EndpointState; 6] = [
    EndpointState::Ready,
    EndpointState::Connecting,
    EndpointState::Unhealthy,
    EndpointState::Ejected,
    EndpointState::EjectedLatency,
    EndpointState::Probing,
];

fn state_label(state: EndpointState) -> &'static str {
    match state {
        EndpointState::Ready => "ready",
        EndpointState::Connecting => "connecting",
        EndpointState::Unhealthy => "unhealthy",
        EndpointState::Ejected => "ejected_failures",
        EndpointState::EjectedLatency => "ejected_latency",
        EndpointState::Probing => "probing",
    }
}

/// Every series this module exports, as Prometheus names them: dashboards and alerts depend on
/// them (a unit test fails when one changes).
pub const NAMES: &[&str] = &[
    "grpc_client_handled_total",
    "grpc_client_handling_seconds",
    "meshlb_balancer_aperture_endpoints",
    "meshlb_balancer_budget_exhausted_total",
    "meshlb_balancer_fail_fast_total",
    "meshlb_balancer_hedge_wins_total",
    "meshlb_balancer_hedges_total",
    "meshlb_balancer_retries_total",
    "meshlb_discovery_dns_errors_total",
    "meshlb_discovery_endpoints_added_total",
    "meshlb_discovery_endpoints_removed_total",
    "meshlb_endpoint_calls_total",
    "meshlb_endpoint_ejections_total",
    "meshlb_endpoint_in_flight_calls",
    "meshlb_endpoint_latency_ewma_seconds",
    "meshlb_endpoint_probes_total",
    "meshlb_endpoint_state",
];

/// Distinct methods the per-method series keep; calls to further ones (a proxy forwarding
/// whatever paths its callers send) are counted under `other`, so memory stays bounded.
pub const MAX_METHODS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    target: String,
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    target: String,
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(crate::grpc::LATENCY_BUCKETS)
}

// === impl Metrics ===

/// The balancer's series in a registry; cheap to clone. See the module docs.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Method label sets created so far (at most [`MAX_METHODS`] are kept apart).
    methods: std::sync::Mutex<usize>,
    balancers: Arc<Balancers>,
}

/// The balancers reporting into one registry, read at each scrape.
#[derive(Debug, Default)]
struct Balancers(Mutex<Vec<Weak<Registry>>>);

impl Metrics {
    /// Registers the balancer's series in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let handled = Family::<HandledLabels, Counter>::default();
        let handling = Family::new_with_constructor(histogram as fn() -> Histogram);
        registry.register(
            "grpc_client_handled",
            "Calls completed through the balancer, by the gRPC code the caller saw",
            handled.clone(),
        );
        registry.register(
            "grpc_client_handling_seconds",
            "Call latency through the balancer, retries and hedges included, to the end of the answer",
            handling.clone(),
        );
        let balancers = Arc::new(Balancers::default());
        registry.register_collector(Box::new(Collector(balancers.clone())));
        Self {
            inner: Arc::new(Inner {
                handled,
                handling,
                methods: Default::default(),
                balancers,
            }),
        }
    }

    /// Reports `registry` (a balancer's endpoints) from now on, until it is gone.
    pub(super) fn attach(&self, registry: &Arc<Registry>) {
        let mut all = self
            .inner
            .balancers
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.retain(|r| r.strong_count() > 0);
        all.push(Arc::downgrade(registry));
    }

    /// A call to `path` through the balancer of `target` began; the guard records it.
    pub(super) fn call(&self, target: &str, path: &str) -> CallMetrics {
        let (service, method) = crate::telemetry::rpc_names(path);
        let mut labels = MethodLabels {
            target: target.to_owned(),
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
        };
        // The read guard `get` returns must be gone before `admit_method` may create the series.
        let known = self.inner.handling.get(&labels).is_some();
        if !known && !self.admit_method(&labels) {
            labels.grpc_service = "other".into();
            labels.grpc_method = "other".into();
        }
        CallMetrics {
            metrics: self.clone(),
            labels,
            start: Instant::now(),
            done: false,
        }
    }
}

impl Metrics {
    /// Whether a method not seen before gets series of its own. Its histogram is made here, at
    /// the first call's start and under the lock, so that many first calls at once count as one
    /// method, not many.
    fn admit_method(&self, labels: &MethodLabels) -> bool {
        let mut seen = self.inner.methods.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.handling.get(labels).is_some() {
            return true;
        }
        if *seen >= MAX_METHODS {
            return false;
        }
        *seen += 1;
        drop(self.inner.handling.get_or_create(labels));
        true
    }
}

/// One call's outcome and latency, recorded once: when its answer ends, or as `Canceled` if the
/// caller drops it first.
#[derive(Debug)]
pub struct CallMetrics {
    metrics: Metrics,
    labels: MethodLabels,
    start: Instant,
    done: bool,
}

impl CallMetrics {
    /// The call ended with `code`.
    pub fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let inner = &self.metrics.inner;
        inner
            .handled
            .get_or_create(&HandledLabels {
                target: self.labels.target.clone(),
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: crate::grpc::metric_code_name(code),
            })
            .inc();
        inner
            .handling
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The call's metrics end with its answer ([`crate::answer::Ending`]).
impl crate::answer::Outcome for CallMetrics {
    fn finish(&mut self, code: Code) {
        CallMetrics::finish(self, code);
    }
}

// === the collector ===

#[derive(Debug)]
struct Collector(Arc<Balancers>);

type ReadEndpoint = fn(&super::EndpointSnapshot) -> f64;
type ReadBalancer = fn(&Registry) -> u64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    target: String,
    endpoint: String,
}

fn describe<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &'a str,
    metric: &impl EncodeMetric,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, None, metric.metric_type())
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let balancers: Vec<Arc<Registry>> = self
            .0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // One snapshot per balancer, so every series of a scrape agrees.
        let views: Vec<_> = balancers
            .iter()
            .map(|b| {
                let endpoints: Vec<_> = b
                    .shared_endpoints()
                    .into_iter()
                    .map(|e| (e.snapshot(), e.counters()))
                    .collect();
                (b, endpoints)
            })
            .collect();
        let gauge = ConstGauge::new(0.0);
        let counter = ConstCounter::new(0u64);

        let mut m = describe(
            &mut encoder,
            "meshlb_endpoint_state",
            "1 for the state each endpoint is in (ready, connecting, unhealthy, ejected_failures, ejected_latency)",
            &gauge,
        )?;
        for (b, endpoints) in &views {
            for (snap, _) in endpoints {
                for state in STATES {
                    let labels = [
                        ("target", b.target().to_owned()),
                        ("endpoint", snap.addr.to_string()),
                        ("state", state_label(state).to_owned()),
                    ];
                    let value = if snap.state == state { 1.0 } else { 0.0 };
                    ConstGauge::new(value).encode(m.encode_family(&labels.to_vec())?)?;
                }
            }
        }
        let endpoint_gauges: [(&str, &str, ReadEndpoint); 2] = [
            (
                "meshlb_endpoint_in_flight_calls",
                "Calls started on the endpoint and not yet ended",
                |s| s.in_flight as f64,
            ),
            (
                "meshlb_endpoint_latency_ewma_seconds",
                "The endpoint's latency estimate",
                |s| s.ewma_rtt.as_secs_f64(),
            ),
        ];
        for (name, help, read) in endpoint_gauges {
            let mut m = describe(&mut encoder, name, help, &gauge)?;
            for (b, endpoints) in &views {
                for (snap, _) in endpoints {
                    let labels = EndpointLabels {
                        target: b.target().to_owned(),
                        endpoint: snap.addr.to_string(),
                    };
                    ConstGauge::new(read(snap)).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let mut m = describe(
            &mut encoder,
            "meshlb_endpoint_calls",
            "Attempts ended on the endpoint, by the gRPC code it answered (a broken connection is Unavailable)",
            &counter,
        )?;
        for (b, endpoints) in &views {
            for (snap, counters) in endpoints {
                for (code, n) in counters.by_code.iter().enumerate() {
                    if *n == 0 {
                        continue;
                    }
                    let labels = vec![
                        ("target", b.target().to_owned()),
                        ("endpoint", snap.addr.to_string()),
                        (
                            "grpc_code",
                            crate::grpc::metric_code_name(Code::from_i32(code as i32)).to_owned(),
                        ),
                    ];
                    ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let mut m = describe(
            &mut encoder,
            "meshlb_endpoint_ejections",
            "Times the endpoint was ejected, by reason (failures, latency)",
            &counter,
        )?;
        for (b, endpoints) in &views {
            for (snap, counters) in endpoints {
                for (reason, n) in [
                    ("failures", counters.ejections_failures),
                    ("latency", counters.ejections_latency),
                ] {
                    let labels = vec![
                        ("target", b.target().to_owned()),
                        ("endpoint", snap.addr.to_string()),
                        ("reason", reason.to_owned()),
                    ];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let mut m = describe(
            &mut encoder,
            "meshlb_endpoint_probes",
            "Probe calls sent to the endpoint while it was ejected",
            &counter,
        )?;
        for (b, endpoints) in &views {
            for (snap, counters) in endpoints {
                let labels = EndpointLabels {
                    target: b.target().to_owned(),
                    endpoint: snap.addr.to_string(),
                };
                ConstCounter::new(counters.probes).encode(m.encode_family(&labels)?)?;
            }
        }

        let balancer_counters: [(&str, &str, ReadBalancer); 6] = [
            ("meshlb_balancer_retries", "Retries made", |r| r.retries()),
            ("meshlb_balancer_hedges", "Hedged calls sent", |r| {
                r.hedges().0
            }),
            (
                "meshlb_balancer_hedge_wins",
                "Hedges that gave the call its answer (before the original, or after it failed)",
                |r| r.hedges().1,
            ),
            (
                "meshlb_balancer_budget_exhausted",
                "Retries or hedges the retry budget refused",
                |r| r.counters().budget_exhausted.load(Ordering::Relaxed),
            ),
            (
                "meshlb_discovery_endpoints_added",
                "Endpoints discovery added",
                |r| r.counters().discovered.load(Ordering::Relaxed),
            ),
            (
                "meshlb_discovery_dns_errors",
                "DNS lookups that failed (the last good set was kept)",
                |r| {
                    r.counters()
                        .dns_errors
                        .get()
                        .map_or(0, |c| c.load(Ordering::Relaxed))
                },
            ),
        ];
        for (name, help, read) in balancer_counters {
            let mut m = describe(&mut encoder, name, help, &counter)?;
            for b in &balancers {
                let labels = vec![("target", b.target().to_owned())];
                ConstCounter::new(read(b)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = describe(
            &mut encoder,
            "meshlb_balancer_aperture_endpoints",
            "Endpoints the aperture uses now, of those discovered (no series without an aperture)",
            &gauge,
        )?;
        for b in &balancers {
            if let Some(size) = b.aperture() {
                let labels = vec![("target", b.target().to_owned())];
                ConstGauge::new(size as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = describe(
            &mut encoder,
            "meshlb_discovery_endpoints_removed",
            "Endpoints discovery removed",
            &counter,
        )?;
        for b in &balancers {
            let labels = vec![("target", b.target().to_owned())];
            ConstCounter::new(b.counters().removed.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels)?)?;
        }
        let mut m = describe(
            &mut encoder,
            "meshlb_balancer_fail_fast",
            "Calls failed fast with UNAVAILABLE, by reason",
            &counter,
        )?;
        for b in &balancers {
            for (i, reason) in FailFastReason::ALL.iter().enumerate() {
                let labels = vec![
                    ("target", b.target().to_owned()),
                    ("reason", reason.label().to_owned()),
                ];
                ConstCounter::new(b.counters().fail_fast[i].load(Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `# TYPE` lines of an encoded registry, sorted.
    pub(crate) fn exported(registry: &prometheus_client::registry::Registry) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
        let mut names: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_exported_names_are_the_documented_ones() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        // Families show up once they have a series.
        metrics.call("ipv4:127.0.0.1:1", "/s.S/M").finish(Code::Ok);
        let mut expected: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        expected.sort();
        assert_eq!(exported(&registry), expected);
    }

    #[test]
    fn per_method_series_stop_growing_at_the_cap() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        for i in 0..MAX_METHODS + 10 {
            metrics.call("t", &format!("/s.S/M{i}")).finish(Code::Ok);
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let kept = text
            .lines()
            .filter(|l| l.starts_with("grpc_client_handling_seconds_count{"))
            .count();
        assert_eq!(kept, MAX_METHODS + 1, "{text}");
        assert!(text.contains("grpc_method=\"other\""), "{text}");
    }

    #[test]
    fn first_calls_at_once_to_one_method_count_as_one() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        // More first calls than the cap, all in flight at once, to one method.
        let open: Vec<CallMetrics> = (0..MAX_METHODS + 10)
            .map(|_| metrics.call("t", "/s.S/Same"))
            .collect();
        drop(open);
        metrics.call("t", "/s.S/Next").finish(Code::Ok);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("grpc_method=\"Next\""), "{text}");
        assert!(!text.contains("grpc_method=\"other\""), "{text}");
    }

    /// Each series' label names, from the text a scrape gets.
    fn label_names(text: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut all = std::collections::BTreeMap::<String, Vec<String>>::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, rest) = line.split_once('{').unwrap_or((line, ""));
            let name = name.split_whitespace().next().unwrap_or_default();
            let labels = rest.split_once('}').map_or("", |(l, _)| l);
            let mut names: Vec<String> = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, _)| k.to_owned())
                .filter(|k| k != "le")
                .collect();
            names.sort();
            let name = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            all.entry(name.to_owned()).or_insert(names);
        }
        all
    }

    #[tokio::test]
    async fn every_series_keeps_its_label_names() {
        use crate::balance::accrual::AccrualConfig;
        use crate::balance::endpoint::Shared;
        let mut prom = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut prom);
        let balancer = super::super::registry::Registry::new("ipv4:127.0.0.1:1".into());
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let connection = crate::connection::Connection::spawn(
            addr,
            crate::connection::Settings {
                connect_timeout: std::time::Duration::from_millis(100),
                keepalive_interval: std::time::Duration::from_secs(10),
                keepalive_timeout: std::time::Duration::from_secs(5),
                max_header_list_size: 1 << 20,
                tls: None,
            },
        );
        let shared = Shared::new(
            addr,
            crate::health::Gate::new(),
            AccrualConfig::default(),
            Default::default(),
        );
        shared.finish(
            crate::balance::completion::Outcome::Status(Code::NotFound),
            std::time::Duration::from_millis(1),
            None,
            None,
        );
        balancer.insert(addr, shared, connection, tokio::spawn(async {}));
        balancer.set_aperture(1);
        metrics.attach(&balancer);
        metrics.call("ipv4:127.0.0.1:1", "/s.S/M").finish(Code::Ok);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &prom).unwrap();
        let got = label_names(&text);
        // Dashboards and alerts group and filter by these: renaming one breaks them.
        let (t, e) = ("target", "endpoint");
        let expected: &[(&str, &[&str])] = &[
            (
                "grpc_client_handled_total",
                &["grpc_code", "grpc_method", "grpc_service", t],
            ),
            (
                "grpc_client_handling_seconds",
                &["grpc_method", "grpc_service", t],
            ),
            ("meshlb_balancer_aperture_endpoints", &[t]),
            ("meshlb_balancer_budget_exhausted_total", &[t]),
            ("meshlb_balancer_fail_fast_total", &["reason", t]),
            ("meshlb_balancer_hedge_wins_total", &[t]),
            ("meshlb_balancer_hedges_total", &[t]),
            ("meshlb_balancer_retries_total", &[t]),
            ("meshlb_discovery_dns_errors_total", &[t]),
            ("meshlb_discovery_endpoints_added_total", &[t]),
            ("meshlb_discovery_endpoints_removed_total", &[t]),
            ("meshlb_endpoint_calls_total", &[e, "grpc_code", t]),
            ("meshlb_endpoint_ejections_total", &[e, "reason", t]),
            ("meshlb_endpoint_in_flight_calls", &[e, t]),
            ("meshlb_endpoint_latency_ewma_seconds", &[e, t]),
            ("meshlb_endpoint_probes_total", &[e, t]),
            ("meshlb_endpoint_state", &[e, "state", t]),
        ];
        let expected: std::collections::BTreeMap<String, Vec<String>> = expected
            .iter()
            .map(|(n, l)| (n.to_string(), l.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(got, expected, "{text}");
        // And the values a dashboard selects on.
        let values = |series: &str, label: &str| -> Vec<String> {
            let prefix = format!("{series}{{");
            let key = format!("{label}=\"");
            let mut v: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .filter_map(|l| l.split_once(&key))
                .filter_map(|(_, rest)| rest.split_once('"'))
                .map(|(value, _)| value.to_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            values("meshlb_endpoint_state", "state"),
            [
                "connecting",
                "ejected_failures",
                "ejected_latency",
                "probing",
                "ready",
                "unhealthy"
            ]
        );
        assert_eq!(
            values("meshlb_endpoint_ejections_total", "reason"),
            ["failures", "latency"]
        );
        assert_eq!(
            values("meshlb_balancer_fail_fast_total", "reason"),
            [
                "connecting",
                "ejected",
                "no_endpoints",
                "other",
                "unhealthy"
            ]
        );
        assert_eq!(
            values("meshlb_endpoint_calls_total", "grpc_code"),
            ["NotFound"]
        );
    }

    #[test]
    fn code_names_follow_go_grpc_prometheus() {
        use crate::grpc::metric_code_name;
        assert_eq!(metric_code_name(Code::Ok), "OK");
        assert_eq!(metric_code_name(Code::Cancelled), "Canceled");
        assert_eq!(metric_code_name(Code::Unauthenticated), "Unauthenticated");
        assert_eq!(crate::grpc::CODE_COUNT, Code::Unauthenticated as usize + 1);
    }
}
