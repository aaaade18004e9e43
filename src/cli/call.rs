//! `meshlb call`: one balanced call, printing the answer and which replica served it.

use super::client::balancer;
use crate::balance::ServedBy;
use crate::proto::userguide::v1::{
    user_guide_service_client::UserGuideServiceClient, GetPointRequest, ListUsersRequest, Point,
    Profile,
};
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the replicas are (same syntax as `client --target`).
    #[arg(long, env = "MESHLB_TARGET")]
    target: String,
    /// Deadline of the whole command (waiting for a ready endpoint included).
    #[arg(long, env = "MESHLB_TIMEOUT", value_parser = super::positive_duration, default_value = "5s")]
    timeout: Duration,
    #[command(flatten)]
    tls: super::client::TlsArgs,
    #[command(flatten)]
    service_config: super::client::ServiceConfigArgs,
    #[command(subcommand)]
    method: Method,
}

#[derive(Debug, clap::Subcommand)]
enum Method {
    /// GetPoint: the points of one user.
    GetPoint {
        /// The user's name.
        #[arg(long)]
        name: String,
        /// The user's age.
        #[arg(long, allow_negative_numbers = true)]
        age: i32,
    },
    /// ListUsers: every user with these points (server streaming).
    ListUsers {
        /// The points to match.
        #[arg(long, allow_negative_numbers = true)]
        points: i64,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let lb = balancer(
        &args.target,
        None,
        args.timeout,
        crate::proto::USERGUIDE_SERVICE,
        &args.tls,
        None,
        &args.service_config.service_config,
    )?;
    // One deadline for the whole command: the wait for a ready endpoint counts against it.
    let deadline = tokio::time::Instant::now() + args.timeout;
    lb.wait_ready(args.timeout).await;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut client = UserGuideServiceClient::new(lb);
    let served = |metadata: &tonic::metadata::MetadataMap, ext: &http::Extensions| {
        let id = metadata
            .get("x-replica-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        match ext.get::<ServedBy>() {
            Some(ServedBy(addr)) => format!("served by {id} ({addr})"),
            None => format!("served by {id}"),
        }
    };
    let result = match args.method {
        Method::GetPoint { name, age } => {
            let mut request = tonic::Request::new(GetPointRequest {
                profile: Some(Profile { age, name }),
            });
            request.set_timeout(left());
            client.get_point(request).await.map(|r| {
                let by = served(r.metadata(), r.extensions());
                let value = r.into_inner().point.map_or(0, |p| p.value);
                println!("{}", json!({ "value": value }));
                println!("{by}");
            })
        }
        Method::ListUsers { points } => {
            let mut request = tonic::Request::new(ListUsersRequest {
                point: Some(Point { value: points }),
            });
            request.set_timeout(left());
            match client.list_users(request).await {
                Ok(response) => {
                    let by = served(response.metadata(), response.extensions());
                    let mut stream = response.into_inner();
                    let mut result = Ok(());
                    loop {
                        match stream.message().await {
                            Ok(Some(msg)) => {
                                let user = msg.user.unwrap_or_default();
                                let profile = user.profile.unwrap_or_default();
                                println!(
                                    "{}",
                                    json!({
                                        "profile": { "name": profile.name, "age": profile.age },
                                        "cache": { "value": user.cache.map_or(0, |c| c.value) },
                                    })
                                );
                            }
                            Ok(None) => break,
                            Err(status) => {
                                result = Err(status);
                                break;
                            }
                        }
                    }
                    println!("{by}");
                    result
                }
                Err(status) => Err(status),
            }
        }
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(status) => {
            eprintln!(
                "error: {}: {}",
                crate::grpc::code_name(status.code()),
                status.message()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
