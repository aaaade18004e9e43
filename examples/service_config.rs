//! A tonic client balanced by meshlb that follows a gRPC service config: the same JSON file
//! grpc-go, grpc-java and grpcio read tells it which methods to retry, with what backoff and
//! deadline, and how to balance.
//!
//! `cargo run --example service_config -- TARGET [SERVICE_CONFIG.json]` (default: the UserGuide
//! service's, `replicas/service-config.json`).

use meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient;
use meshlb::proto::userguide::v1::{GetPointRequest, Profile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .unwrap_or_else(|| "dns:///users.meshlb.svc.cluster.local:50051".into());
    let config = match args.next() {
        Some(path) => std::fs::read_to_string(path)?,
        None => meshlb::proto::USERGUIDE_SERVICE_CONFIG.to_owned(),
    };

    // An invalid config is an error naming the field, before anything starts.
    let lb = meshlb::Balancer::builder(&target)
        .service_config(&config)?
        .build()
        .await?;
    let mut client = UserGuideServiceClient::new(lb.clone());
    let mut failed = 0;
    for _ in 0..100 {
        let request = GetPointRequest {
            profile: Some(Profile {
                name: "james".into(),
                age: 26,
            }),
        };
        if client.get_point(request).await.is_err() {
            failed += 1;
        }
    }
    println!(
        "100 calls, {failed} failed, {} retries, policy {}",
        lb.retries(),
        lb.policy()
    );
    Ok(())
}
