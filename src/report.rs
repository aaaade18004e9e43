//! Reports of a load run: the numbers (a serde struct with stable keys, the `--format json`
//! output) and their rendering as terminal tables. Knows nothing of how the calls were made.

use crate::load::{Recording, Stats};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest call.
    pub max: f64,
}

impl Latency {
    /// The percentiles of `stats`' latency histogram.
    pub fn of(stats: &Stats) -> Self {
        let h = &stats.latency;
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One replica's row.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRow {
    /// Its `x-replica-id`.
    pub id: String,
    /// Its address, when known.
    pub addr: String,
    /// Calls it answered (successes and errors).
    pub calls: u64,
    /// Calls it answered with an error.
    pub errors: u64,
    /// Median latency of its successful calls.
    pub p50_ms: f64,
    /// 99th percentile latency of its successful calls.
    pub p99_ms: f64,
}

/// The summary of a run; `--format json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target string.
    pub target: String,
    /// The balancing policy.
    pub policy: String,
    /// Calls made.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// `UNAVAILABLE` calls by reason (the status message).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unavailable_reasons: BTreeMap<String, u64>,
    /// Retries the balancer made.
    pub retries: u64,
    /// Hedged calls sent.
    pub hedges: u64,
    /// Hedged calls that answered before the original.
    pub hedge_wins: u64,
    /// Length of the run in seconds.
    pub duration_s: f64,
    /// Calls per second.
    pub rps: f64,
    /// Latency of successful calls.
    pub latency_ms: Latency,
    /// The client process's CPU time (user and system, every thread: the balancer, the load,
    /// the exporter) per call, µs; 0 where it is not measured.
    pub cpu_us_per_call: f64,
    /// Per replica, ordered by id.
    pub replicas: Vec<ReplicaRow>,
    /// The trace id of one sampled call, when spans were exported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Report {
    /// Summarises `recording`, made against `target` with `policy` in `elapsed`.
    pub fn new(
        target: &str,
        policy: &str,
        recording: &Recording,
        retries: u64,
        elapsed: Duration,
    ) -> Self {
        let ok = recording.total.ok_count();
        let calls = ok + recording.total.error_count();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let replicas = recording
            .replicas
            .iter()
            .map(|(id, r)| {
                let lat = Latency::of(&r.stats);
                ReplicaRow {
                    id: id.clone(),
                    addr: r.addr.map(|a| a.to_string()).unwrap_or_default(),
                    calls: r.stats.ok_count() + r.stats.error_count(),
                    errors: r.stats.error_count(),
                    p50_ms: lat.p50,
                    p99_ms: lat.p99,
                }
            })
            .collect();
        Self {
            target: target.to_owned(),
            policy: policy.to_owned(),
            calls,
            ok,
            errors: recording
                .total
                .errors
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            unavailable_reasons: recording.total.unavailable.clone(),
            retries,
            hedges: 0,
            hedge_wins: 0,
            duration_s: (secs * 1000.0).round() / 1000.0,
            rps: (calls as f64 / secs * 10.0).round() / 10.0,
            latency_ms: Latency::of(&recording.total),
            cpu_us_per_call: 0.0,
            replicas,
            trace_id: None,
        }
    }

    /// The share of calls replica `id` answered, in `[0, 1]`.
    pub fn share(&self, id: &str) -> f64 {
        let answered: u64 = self.replicas.iter().map(|r| r.calls).sum();
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .map_or(0.0, |r| r.calls as f64 / answered.max(1) as f64)
    }

    /// The whole report as a terminal table.
    pub fn table(&self) -> String {
        format!(
            "target {}  policy {}\n{}",
            self.target,
            self.policy,
            self.figures()
        )
    }

    /// The table without its `target … policy …` line (the live view's header names both).
    pub fn figures(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:<22} {:>7} {:>6}  {:<24} {:>6} {:>9} {:>9}",
            "replica", "address", "calls", "share", "", "errors", "p50", "p99"
        );
        for r in &self.replicas {
            let share = self.share(&r.id);
            let _ = writeln!(
                out,
                "{:<14} {:<22} {:>7} {:>5.1}%  {:<24} {:>6} {:>9} {:>9}",
                // A server that does not say who it is is known by its address alone.
                if r.id == r.addr { "-" } else { r.id.as_str() },
                r.addr,
                r.calls,
                share * 100.0,
                bar(share, 24),
                r.errors,
                ms(r.p50_ms),
                ms(r.p99_ms),
            );
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "calls {}  ok {}  errors {}  retries {}  hedges {} (won {})  {:.1} calls/s over {:.1} s",
            self.calls,
            self.ok,
            errors,
            self.retries,
            self.hedges,
            self.hedge_wins,
            self.rps,
            self.duration_s
        );
        let _ = writeln!(
            out,
            "latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        );
        out
    }
}

/// Two reports of the same fleet, replica by replica, side by side.
pub fn side_by_side(a: &Report, b: &Report) -> String {
    let mut ids: Vec<&str> = a.replicas.iter().map(|r| r.id.as_str()).collect();
    for r in &b.replicas {
        if !ids.contains(&r.id.as_str()) {
            ids.push(&r.id);
        }
    }
    ids.sort_unstable();
    let mut out = String::new();
    let _ = writeln!(out, "{:<14} | {:^34} | {:^34}", "", a.policy, b.policy);
    let _ = writeln!(
        out,
        "{:<14} | {:>7} {:>6} {:<10} {:>8} | {:>7} {:>6} {:<10} {:>8}",
        "replica", "calls", "share", "", "p99", "calls", "share", "", "p99"
    );
    let row = |r: &Report, id: &str| {
        let found = r.replicas.iter().find(|x| x.id == id);
        let share = r.share(id);
        format!(
            "{:>7} {:>5.1}% {:<10} {:>8}",
            found.map_or(0, |x| x.calls),
            share * 100.0,
            bar(share, 10),
            found.map_or("-".into(), |x| ms(x.p99_ms))
        )
    };
    for id in ids {
        let _ = writeln!(out, "{:<14} | {} | {}", id, row(a, id), row(b, id));
    }
    let total = |r: &Report| {
        format!(
            "{:>7} {:>7.0}/s  p99 {:>8}",
            r.calls,
            r.rps,
            ms(r.latency_ms.p99)
        )
    };
    let _ = writeln!(out, "{:<14} | {:>34} | {:>34}", "total", total(a), total(b));
    let lat = |r: &Report| {
        format!(
            "p50 {} p99.9 {}",
            ms(r.latency_ms.p50),
            ms(r.latency_ms.p999)
        )
    };
    let _ = writeln!(out, "{:<14} | {:>34} | {:>34}", "", lat(a), lat(b));
    out
}

fn bar(share: f64, width: usize) -> String {
    let filled = (share.clamp(0.0, 1.0) * width as f64).round() as usize;
    "█".repeat(filled)
}

/// Milliseconds with a unit, precise enough to compare.
pub fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else if v >= 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}
