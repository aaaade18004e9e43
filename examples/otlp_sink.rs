//! A minimal OTLP/gRPC trace receiver that decodes and counts what it gets: a stand-in for Jaeger
//! when measuring the exporter's cost by hand (`meshlb bench --scenarios tracing` runs the same
//! receiver in-process). `cargo run --release --example otlp_sink -- 127.0.0.1:4317`

use meshlb::bench::tracing::Sink;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("OTLP sink on {}", listener.local_addr()?);
    let sink = Sink::default();
    let server = sink.serve(listener);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    while !server.is_finished() {
        tick.tick().await;
        eprintln!("spans received: {}", sink.spans());
    }
    Ok(())
}
