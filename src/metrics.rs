//! Serving metrics to Prometheus: `GET /metrics` on a listener of its own, in Prometheus' text
//! format (version 0.0.4, which every scraper reads), from any prometheus-client registry. Used
//! by the replica and by `meshlb client --metrics-listen`; it knows nothing of what the series
//! mean.

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

/// Serves `GET /metrics` (the text `render` returns on each scrape) until `shutdown` resolves.
pub async fn serve<F>(
    listener: TcpListener,
    render: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
        }),
    );
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "the metrics listener stopped");
    }
}
