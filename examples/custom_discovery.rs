//! meshlb over your own discovery: a service registry, a file watch, anything that can say
//! "this address joined" and "that one left". Here the addresses come from the command line, and
//! the last one is removed halfway through.
//!
//! `cargo run --example custom_discovery -- 127.0.0.1:50051 127.0.0.1:50052`

use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use meshlb::proto::userguide::v1::{GetPointRequest, Profile};
use std::net::SocketAddr;
use tower::discover::Change;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addrs = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let (changes, discovered) = tokio::sync::mpsc::unbounded_channel();
    for addr in &addrs {
        changes.send(Change::Insert(*addr, ()))?;
    }

    // The target string only names the balancer; the endpoints come from the stream.
    let lb = meshlb::Balancer::builder("my-registry:users")
        .discovery(tokio_stream::wrappers::UnboundedReceiverStream::new(
            discovered,
        ))
        .service_config(meshlb::proto::USERGUIDE_SERVICE_CONFIG)?
        .build()
        .await?;
    let mut client = UserGuideServiceClient::new(lb.clone());
    for round in 0..2 {
        for _ in 0..50 {
            let request = GetPointRequest {
                profile: Some(Profile {
                    name: "james".into(),
                    age: 26,
                }),
            };
            client.get_point(request).await?;
        }
        for e in lb.endpoints() {
            println!("round {round}: {} {} served={}", e.addr, e.state, e.served);
        }
        if let (0, Some(last)) = (round, addrs.last()) {
            // The registry says the last endpoint left: it gets no more calls.
            changes.send(Change::Remove(*last))?;
            while lb.endpoints().iter().any(|e| e.addr == *last) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    Ok(())
}
