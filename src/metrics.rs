//! Serving metrics to Prometheus: `GET /metrics` in Prometheus' text format (version 0.0.4, which
//! every scraper reads) from any prometheus-client registry, and the process' own series. Used by
//! the replica and by `meshlb client --metrics-listen`; it knows nothing of what the series mean.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::future::Future;
use tokio::net::TcpListener;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `registry` in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector that fails leaves what it wrote so far.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// `GET /metrics`, answered with the text `render` returns on each scrape; anything else is 404.
pub fn router<F>(render: F) -> axum::Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
        }),
    )
}

/// Serves [`router`] until `shutdown` resolves. For a process that exits when its work is done
/// (the client): a server that must drain serves the router through its own connection limits
/// instead, so that a scraper that never finishes its request cannot hold it open.
pub async fn serve<F>(
    listener: TcpListener,
    render: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    if let Err(error) = axum::serve(listener, router(render))
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "the metrics listener stopped");
    }
}

/// Encodes one gauge with no labels (for collectors).
pub(crate) fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// The process' CPU time, resident memory and open file descriptors (Linux: from /proc), under
/// the names Prometheus' own client libraries use.
#[derive(Debug)]
pub struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = process_stats() else {
            return Ok(());
        };
        let cpu = prometheus_client::metrics::counter::ConstCounter::new(p.cpu_seconds);
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(m)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size",
            p.rss_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            p.open_fds,
        )
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: f64,
    open_fds: f64,
}

#[cfg(target_os = "linux")]
fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the name); rss is 24 (21).
    // SAFETY: sysconf has no memory effects.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
        )
    };
    let cpu_seconds = (ticks(11)? + ticks(12)?) / hz.max(1.0);
    let rss_bytes = ticks(21)? * page;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    Some(ProcessStats {
        cpu_seconds,
        rss_bytes,
        open_fds,
    })
}

#[cfg(not(target_os = "linux"))]
fn process_stats() -> Option<ProcessStats> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_series_are_there_on_linux() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let text = encode(&registry);
        if cfg!(target_os = "linux") {
            for name in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
            ] {
                assert!(text.contains(&format!("\n{name} ")), "{name}: {text}");
            }
        }
    }
}
