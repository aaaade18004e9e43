//! Probes that never cost a caller. When failure accrual or outlier ejection lets an ejected
//! endpoint take one call to judge it by, the call it is handed is, if it may be duplicated (its
//! method has a retry or hedging policy, so its request is kept: `Duplicable`), copied: the copy
//! goes to the endpoint as the probe and runs to its end on its own task, and the caller's own
//! request comes back ([`Detached`]) to be sent elsewhere at once. A call that may not be
//! duplicated is never a probe: the balancer sends a call of its own instead ([`ProbeCall`]: a
//! grpc.health.v1 `Check` unless the user names a method), and the caller's request comes back
//! the same way.
//!
//! Knows requests and futures; nothing of how endpoints are judged or picked.

use super::completion::Outcome;
use super::endpoint::BoxError;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tonic::body::Body;
use tonic::Code;

/// The longest a detached probe may run: past it, it is dropped and judges nothing (the next
/// call probes again).
pub const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// What probes an ejected endpoint when the call it is handed may not be duplicated: a call the
/// balancer makes itself, so that no caller ever waits for an endpoint under judgement.
#[derive(Debug, Clone, Default)]
pub struct ProbeCall {
    kind: Kind,
    headers: http::HeaderMap,
}

#[derive(Debug, Clone, Default)]
enum Kind {
    #[default]
    Health,
    Method {
        path: PathAndQuery,
        message: Bytes,
    },
}

impl ProbeCall {
    /// `grpc.health.v1.Health/Check` for the service name the health watch asks about (the
    /// default). It shows that the endpoint answers, and how soon its server does; not how fast
    /// its handlers are, so an endpoint ejected for latency comes back on it on trust (see
    /// [`super::accrual`]): its first caller's answer is its trial.
    pub fn health() -> Self {
        Self::default()
    }

    /// A unary method of the service's, `package.Service/Method` (a leading `/` is optional),
    /// with `message`, the request encoded as protobuf (empty: every field at its default, a
    /// valid request of any method), at most 4 MiB (what gRPC servers take by default). Only an
    /// OK answer lets an endpoint back, so it must succeed, and be safe to call at any time: a
    /// probe that fails everywhere keeps every ejected endpoint out.
    pub fn method(method: &str, message: impl Into<Bytes>) -> Result<Self, String> {
        let message = message.into();
        if message.len() > MAX_PROBE_MESSAGE {
            return Err(format!(
                "probe message is {} bytes, more than {MAX_PROBE_MESSAGE}",
                message.len()
            ));
        }
        let trimmed = method.trim_start_matches('/');
        let well_formed = trimmed.split_once('/').is_some_and(|(service, name)| {
            !service.is_empty() && !name.is_empty() && !name.contains(['/', '?', '#'])
        });
        let path = if well_formed {
            PathAndQuery::try_from(format!("/{trimmed}")).ok()
        } else {
            None
        };
        let path = path.ok_or_else(|| {
            format!("probe method must be package.Service/Method, got {method:?}")
        })?;
        Ok(Self {
            kind: Kind::Method { path, message },
            headers: http::HeaderMap::new(),
        })
    }

    /// Sends `value` as metadata `name` with every probe (credentials, say, where the service
    /// asks for them).
    pub fn header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }
}

/// The largest request a [`ProbeCall::method`] may send.
const MAX_PROBE_MESSAGE: usize = 4 * 1024 * 1024;

impl std::str::FromStr for ProbeCall {
    type Err = String;

    /// `health`, or `package.Service/Method` called with an empty request.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "health" => Ok(Self::health()),
            method => Self::method(method, Bytes::new()),
        }
    }
}

/// Whose call a probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A copy of a caller's call: judged as any call is.
    Copy,
    /// The balancer's own [`ProbeCall`].
    Own {
        /// It is a health Check.
        health: bool,
    },
}

impl Probe {
    /// What the probe's `outcome` tells accrual. A copy's, as it is. The balancer's own call is
    /// chosen to succeed, so only OK shows the endpoint back (and UNIMPLEMENTED from a health
    /// Check: a server without a health service, which its watch takes as serving too). Any
    /// other status, a reset stream, or a probe cut off at [`PROBE_LIMIT`] did not show the
    /// endpoint able to serve: it is told as a probe the server gave up on, which ejects the
    /// endpoint again for the same reason. (A fast error would otherwise let a slow endpoint
    /// back: a handler that rejects a request before doing its work answers at once. And a
    /// probe with no verdict is offered again at once: an endpoint resetting every probe would
    /// be probed at the call rate.)
    pub(crate) fn verdict(self, outcome: Outcome) -> Outcome {
        let gave_up = Outcome::Status(Code::DeadlineExceeded);
        match (self, outcome) {
            (Probe::Copy, outcome) => outcome,
            (Probe::Own { health: true }, Outcome::Status(Code::Unimplemented)) => Outcome::Ok,
            (Probe::Own { .. }, Outcome::Status(code)) if code != Code::Unavailable => gave_up,
            (Probe::Own { .. }, Outcome::StreamError(_) | Outcome::Cancelled) => gave_up,
            (Probe::Own { .. }, outcome) => outcome,
        }
    }
}

/// A [`ProbeCall`], ready to send: its path and its one gRPC message, framed once per balancer.
#[derive(Debug, Clone)]
pub(crate) struct OwnProbe {
    path: PathAndQuery,
    frame: Bytes,
    health: bool,
    headers: http::HeaderMap,
}

impl OwnProbe {
    /// `call`, where a health check asks about `health_service`.
    pub(crate) fn new(call: &ProbeCall, health_service: &str) -> Self {
        let health = matches!(call.kind, Kind::Health);
        let (path, message) = match &call.kind {
            Kind::Health => {
                let request = tonic_health::pb::HealthCheckRequest {
                    service: health_service.to_owned(),
                };
                (
                    PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
                    Bytes::from(prost::Message::encode_to_vec(&request)),
                )
            }
            Kind::Method { path, message } => (path.clone(), message.clone()),
        };
        let mut frame = bytes::BytesMut::with_capacity(5 + message.len());
        frame.extend_from_slice(&[0]);
        frame.extend_from_slice(
            &u32::try_from(message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        frame.extend_from_slice(&message);
        let mut headers = call.headers.clone();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        headers.insert(
            crate::grpc::TIMEOUT_HEADER,
            crate::grpc::timeout_value(PROBE_LIMIT),
        );
        Self {
            path,
            frame: frame.freeze(),
            health,
            headers,
        }
    }

    /// What its probes are.
    pub(crate) fn role(&self) -> Probe {
        Probe::Own {
            health: self.health,
        }
    }

    /// One probe request, with the probe's own deadline.
    pub(crate) fn request(&self) -> http::Request<Body> {
        let mut request = http::Request::new(Body::new(Full::new(self.frame.clone())));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from(self.path.clone());
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// In a request's extensions: its body, kept, so that the request may be sent more than once.
#[derive(Debug, Clone)]
pub(crate) struct Duplicable(pub(crate) Bytes);

/// The error a caller's try gets when the endpoint sent its probe instead (a copy of the call, or
/// a call of the balancer's own): the request inside goes to another endpoint.
#[derive(Debug)]
pub struct Detached(Mutex<Option<http::Request<Body>>>);

impl std::fmt::Display for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the endpoint is being probed; this call goes elsewhere")
    }
}

impl std::error::Error for Detached {}

impl Detached {
    /// Hands `request` back to the caller's try.
    pub fn boxed(request: http::Request<Body>) -> BoxError {
        Box::new(Self(Mutex::new(Some(request))))
    }
}

/// The caller's request back, when `error` is a [`Detached`]; the error itself otherwise.
pub fn again(error: BoxError) -> Result<http::Request<Body>, BoxError> {
    match error.downcast::<Detached>() {
        Ok(detached) => {
            let taken = detached.0.lock().ok().and_then(|mut r| r.take());
            taken.ok_or_else(|| BoxError::from("a detached request was taken twice"))
        }
        Err(error) => Err(error),
    }
}

/// A copy of `request`, when it may be duplicated.
pub fn copy_of(request: &http::Request<Body>) -> Option<http::Request<Body>> {
    let Duplicable(body) = request.extensions().get::<Duplicable>()?;
    let mut copy = http::Request::new(Body::new(Full::new(body.clone())));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    // The probe's own time, not what its caller had left: a probe cut short by the caller's
    // deadline would prove nothing.
    copy.headers_mut().insert(
        crate::grpc::TIMEOUT_HEADER,
        crate::grpc::timeout_value(PROBE_LIMIT),
    );
    Some(copy)
}

/// Runs a probe to the end of its answer on its own task; its outcome is recorded by the
/// endpoint's own tracking of the call, its answer dropped.
pub fn run_detached<B>(
    probe: impl Future<Output = Result<http::Response<B>, BoxError>> + Send + 'static,
) where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    tokio::spawn(async move {
        let to_the_end = async {
            if let Ok(response) = probe.await {
                let _ = response.into_body().collect().await;
            }
        };
        let _ = tokio::time::timeout(PROBE_LIMIT, to_the_end).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_request_comes_back_and_other_errors_stay() {
        let mut request = http::Request::new(Body::empty());
        *request.uri_mut() = "/s.S/M".parse().unwrap();
        let back = again(Detached::boxed(request)).unwrap();
        assert_eq!(back.uri().path(), "/s.S/M");
        let other = again(BoxError::from("boom")).unwrap_err();
        assert_eq!(other.to_string(), "boom");
    }

    #[tokio::test]
    async fn the_balancers_own_probe_is_one_framed_grpc_message() {
        let health = OwnProbe::new(&ProbeCall::health(), "pkg.Svc").request();
        assert_eq!(health.uri().path(), "/grpc.health.v1.Health/Check");
        assert_eq!(health.method(), http::Method::POST);
        assert_eq!(health.headers()["content-type"], "application/grpc");
        assert_eq!(health.headers()["te"], "trailers");
        assert_eq!(health.headers()["grpc-timeout"], "10000m");
        let body = health.into_body().collect().await.unwrap().to_bytes();
        let asked: tonic_health::pb::HealthCheckRequest =
            prost::Message::decode(&body[5..]).unwrap();
        assert_eq!(body[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize,
            body.len() - 5
        );
        assert_eq!(asked.service, "pkg.Svc");

        let method: ProbeCall = "pkg.Svc/Get".parse().unwrap();
        let method = method.header(
            http::HeaderName::from_static("authorization"),
            http::HeaderValue::from_static("Bearer t"),
        );
        let request = OwnProbe::new(&method, "ignored").request();
        assert_eq!(request.uri().path(), "/pkg.Svc/Get");
        assert_eq!(request.headers()["authorization"], "Bearer t");
        assert_eq!(request.headers()["content-type"], "application/grpc");
        let too_big = ProbeCall::method("pkg.Svc/Get", vec![0; MAX_PROBE_MESSAGE + 1]);
        assert!(too_big.unwrap_err().contains("more than"));
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &[0, 0, 0, 0, 0], "an empty message");
    }

    #[test]
    fn only_ok_lets_an_endpoint_back_on_the_balancers_own_probe() {
        let own = Probe::Own { health: false };
        let health = Probe::Own { health: true };
        let gave_up = Outcome::Status(Code::DeadlineExceeded);
        assert_eq!(own.verdict(Outcome::Ok), Outcome::Ok);
        assert_eq!(own.verdict(Outcome::Status(Code::InvalidArgument)), gave_up);
        assert_eq!(own.verdict(Outcome::Status(Code::Unimplemented)), gave_up);
        assert_eq!(
            health.verdict(Outcome::Status(Code::Unimplemented)),
            Outcome::Ok
        );
        assert_eq!(health.verdict(Outcome::Status(Code::NotFound)), gave_up);
        // A failure stays one (it ejects for failures), and a copy is judged as its call.
        assert_eq!(own.verdict(Outcome::Broken), Outcome::Broken);
        let unavailable = Outcome::Status(Code::Unavailable);
        assert_eq!(own.verdict(unavailable), unavailable);
        let invalid = Outcome::Status(Code::InvalidArgument);
        assert_eq!(Probe::Copy.verdict(invalid), invalid);
        // No verdict would offer the probe again at once.
        assert_eq!(
            own.verdict(Outcome::StreamError(Code::Unavailable)),
            gave_up
        );
        assert_eq!(own.verdict(Outcome::Cancelled), gave_up);
        assert_eq!(Probe::Copy.verdict(Outcome::Cancelled), Outcome::Cancelled);
    }

    #[test]
    fn a_probe_method_must_name_a_service_and_a_method() {
        assert!("/pkg.Svc/Get".parse::<ProbeCall>().is_ok());
        for bad in [
            "",
            "pkg.Svc",
            "pkg.Svc/",
            "/Get",
            "a/b/c",
            "pkg.Svc/G et",
            "pkg.Svc/Get?x=1",
        ] {
            let error = bad.parse::<ProbeCall>().unwrap_err();
            assert!(error.contains("package.Service/Method"), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn only_a_kept_request_is_copied() {
        let mut request = http::Request::new(Body::empty());
        *request.uri_mut() = "/s.S/M".parse().unwrap();
        request.headers_mut().insert("x-a", "1".parse().unwrap());
        request
            .headers_mut()
            .insert("grpc-timeout", "3m".parse().unwrap());
        assert!(copy_of(&request).is_none());
        request
            .extensions_mut()
            .insert(Duplicable(Bytes::from_static(b"payload")));
        let copy = copy_of(&request).unwrap();
        assert_eq!(copy.uri(), request.uri());
        assert_eq!(copy.headers()["x-a"], "1");
        assert_eq!(
            copy.headers()["grpc-timeout"],
            "10000m",
            "the probe's own time"
        );
        let body = copy.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "payload");
    }
}
