//! A tonic client balanced by meshlb: discovery, the health gate, p2c over peak-EWMA.
//!
//! `cargo run --example balance -- TARGET` (default: the Kubernetes Service of `k8s/`), for
//! instance against `meshlb up`: `cargo run --example balance -- ipv4:127.0.0.1:50051,127.0.0.1:50052`.

use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use meshlb::proto::userguide::v1::{GetPointRequest, Profile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "dns:///users.meshlb.svc.cluster.local:50051".into());

    let lb = meshlb::Balancer::builder(&target)
        .health_service("userguide.v1.UserGuideService")
        .build() // waits (at most 3 s) for a ready endpoint; build_lazy() does not wait
        .await?;
    let mut client = UserGuideServiceClient::new(lb.clone()); // any tonic client runs over it
    for _ in 0..100 {
        let request = GetPointRequest {
            profile: Some(Profile {
                name: "james".into(),
                age: 26,
            }),
        };
        client.get_point(request).await?;
    }
    for e in lb.endpoints() {
        println!(
            "{} {} served={} ewma={:?}",
            e.addr, e.state, e.served, e.ewma_rtt
        );
    }

    Ok(())
}
