//! REST/JSON routes for callers that do not speak gRPC, served on the gRPC port (the server routes
//! by content-type, as grpc-gateway does). Errors are JSON with the gRPC code name and the HTTP
//! status grpc-gateway maps that code to.

use super::service::UserGuide;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use tonic::{Code, Status};

/// The REST routes: `GET /v1/points?name=&age=` and `GET /v1/users?points=`.
pub fn router(service: UserGuide) -> Router {
    Router::new()
        .route("/v1/points", get(get_point))
        .route("/v1/users", get(list_users))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
}

type Params = Query<HashMap<String, String>>;

async fn get_point(State(svc): State<UserGuide>, Query(q): Params) -> Response {
    let result = async {
        let name = required(&q, "name")?;
        let age: i32 = number(&q, "age")?;
        svc.points_of(name, age).await
    }
    .await;
    match result {
        Ok(value) => Json(json!({ "value": value })).into_response(),
        Err(status) => error(&status),
    }
}

async fn list_users(State(svc): State<UserGuide>, Query(q): Params) -> Response {
    let result = async {
        let points: i64 = number(&q, "points")?;
        svc.users_with(points).await
    }
    .await;
    match result {
        Ok(users) => {
            let users: Vec<_> = users
                .iter()
                .map(|u| {
                    json!({
                        "profile": { "name": u.name, "age": u.age },
                        "cache": { "value": u.points },
                    })
                })
                .collect();
            Json(users).into_response()
        }
        Err(status) => error(&status),
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(&Status::not_found(format!(
        "no route for {method} {}",
        echo(uri.path())
    )))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNIMPLEMENTED",
        &format!("{method} is not allowed on {}; use GET", echo(uri.path())),
    )
}

fn echo(input: &str) -> String {
    crate::grpc::bounded(input, super::ECHO_LIMIT)
}

fn required<'a>(q: &'a HashMap<String, String>, key: &str) -> Result<&'a str, Status> {
    q.get(key)
        .map(String::as_str)
        .ok_or_else(|| Status::invalid_argument(format!("query parameter {key:?} is required")))
}

fn number<T: std::str::FromStr>(q: &HashMap<String, String>, key: &str) -> Result<T, Status> {
    let raw = required(q, key)?;
    raw.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "query parameter {key:?} must be an integer, got {:?}",
            echo(raw)
        ))
    })
}

/// The HTTP status grpc-gateway gives each gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(status: &Status) -> Response {
    error_response(
        http_status(status.code()),
        crate::grpc::code_name(status.code()),
        status.message(),
    )
}

/// The JSON error every REST answer uses: `{"code": "NOT_FOUND", "message": "..."}`.
pub fn error_response(http: StatusCode, code: &str, message: &str) -> Response {
    (http, Json(json!({ "code": code, "message": message }))).into_response()
}
