//! `meshlb call`: one balanced call, printing the answer and which replica served it: one of
//! UserGuide's (typed), or any method by name (`--call package.Service/Method -d JSON`, the way
//! grpcurl makes it).

use super::client::balancer;
use super::method::MethodArgs;
use super::UsageError;
use crate::balance::ServedBy;
use crate::dynamic::{json, Answer};
use crate::proto::userguide::v1::{
    user_guide_service_client::UserGuideServiceClient, GetPointRequest, ListUsersRequest, Point,
    Profile,
};
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;

/// Where a one-shot command goes and how long it may take (`call`, `list`, `describe`).
#[derive(Debug, clap::Args)]
pub struct OneShot {
    /// Where the replicas are (same syntax as `client --target`).
    #[arg(long, env = "MESHLB_TARGET")]
    pub target: String,
    /// Deadline of the whole command (waiting for a ready endpoint included).
    #[arg(long, env = "MESHLB_TIMEOUT", value_parser = super::positive_duration, default_value = "5s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: super::client::TlsArgs,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    at: OneShot,
    #[command(flatten)]
    service_config: super::client::ServiceConfigArgs,
    /// Any method, as package.Service/Method (instead of get-point or list-users): its schema
    /// from server reflection, --proto or --protoset; its request from -d; the answers printed as
    /// JSON, one per line.
    #[arg(long, value_parser = parse_method)]
    call: Option<String>,
    #[command(flatten)]
    any: MethodArgs,
    /// The grpc.health.v1 service name to watch on each endpoint (default: the called service's
    /// for UserGuide, else "", the whole server).
    #[arg(long, env = "MESHLB_HEALTH_SERVICE")]
    health_service: Option<String>,
    #[command(subcommand)]
    method: Option<Method>,
}

fn parse_method(s: &str) -> Result<String, String> {
    crate::dynamic::schema::split_method(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
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
    let code = call(args).await?;
    if crate::telemetry::exporting() {
        let exported = tokio::task::spawn_blocking(crate::telemetry::flush).await;
        if let Ok(Err(error)) | Err(error) = exported.map_err(|e| e.to_string()) {
            eprintln!("warning: spans were not exported ({error})");
        }
    }
    Ok(code)
}

async fn call(args: Args) -> anyhow::Result<ExitCode> {
    let method = match (args.method, &args.call) {
        (Some(_), Some(_)) => {
            return Err(
                UsageError("give a method as a subcommand or as --call, not both".into()).into(),
            )
        }
        (None, None) => {
            return Err(UsageError(
                "no method: give get-point, list-users or --call package.Service/Method".into(),
            )
            .into())
        }
        (Some(_), None) if args.any.given() => {
            return Err(UsageError(
                "-d, -H, --proto and --protoset go with --call package.Service/Method".into(),
            )
            .into())
        }
        (Some(m), None) => Ok(m),
        (None, Some(name)) => Err(name.as_str()),
    };
    // -d and -H are read and checked before anything else: a bad one is a usage error, and
    // `-d @-` may wait for its writer, which no deadline should count.
    let prepared = match &method {
        Err(_) => Some(args.any.prepare()?),
        Ok(_) => None,
    };
    let health = match (&args.health_service, &method) {
        (Some(name), _) => name.as_str(),
        (None, Err(name)) => super::method::health_service_for(name),
        (None, Ok(_)) => crate::proto::USERGUIDE_SERVICE,
    };
    let lb = balancer(
        &args.at.target,
        None,
        args.at.timeout,
        health,
        &args.at.tls,
        None,
        &args.service_config,
    )?;
    // One deadline for the whole command: the wait for a ready endpoint counts against it.
    let deadline = crate::balance::deadline::expiry(tokio::time::Instant::now(), args.at.timeout);
    lb.wait_ready(args.at.timeout).await;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let method = match method {
        Ok(m) => m,
        Err(name) => {
            let prepared = prepared.ok_or_else(|| anyhow::anyhow!("no request prepared"))?;
            let call = async {
                let invocation = args.any.invocation(prepared, name, lb.clone()).await?;
                if invocation.kind().takes_one_request() && invocation.requests() > 1 {
                    return Err(UsageError(format!(
                        "-d: {name} takes one request message, got {}",
                        invocation.requests()
                    ))
                    .into());
                }
                // Printed as they come: a stream may be long, or endless.
                let mut print =
                    |m: &prost_reflect::DynamicMessage| println!("{}", json::to_line(m));
                anyhow::Ok(invocation.call(lb, Some(left()), &mut print).await)
            };
            let answer = match tokio::time::timeout(left(), call).await {
                Ok(answer) => answer?,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    args.at.timeout
                ))),
            };
            return Ok(print_answer(answer));
        }
    };
    let mut client = UserGuideServiceClient::new(lb);
    let served = |metadata: &tonic::metadata::MetadataMap, ext: &http::Extensions| {
        served_by(metadata, ext.get::<ServedBy>().map(|s| s.0))
    };
    let result = match method {
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
    Ok(exit(result))
}

fn exit(result: Result<(), tonic::Status>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => {
            eprintln!(
                "error: {}: {}",
                crate::grpc::code_name(status.code()),
                status.message()
            );
            ExitCode::FAILURE
        }
    }
}

/// After the answers (printed as they came): who served them (`x-replica-id` and address, or the
/// address), and the status that ended a stream, if any.
fn print_answer(answer: Result<Answer, tonic::Status>) -> ExitCode {
    let answer = match answer {
        Ok(a) => a,
        Err(status) => return exit(Err(status)),
    };
    println!("{}", served_by(&answer.metadata, answer.served_by));
    exit(answer.ended.map_or(Ok(()), Err))
}

/// `served by ID (ADDR)`: the answer's `x-replica-id` and the endpoint, whichever are known.
fn served_by(
    metadata: &tonic::metadata::MetadataMap,
    addr: Option<std::net::SocketAddr>,
) -> String {
    let id = metadata.get("x-replica-id").and_then(|v| v.to_str().ok());
    match (id, addr) {
        (Some(id), Some(addr)) => format!("served by {id} ({addr})"),
        (Some(id), None) => format!("served by {id}"),
        (None, Some(addr)) => format!("served by {addr}"),
        (None, None) => "served by ?".to_owned(),
    }
}
