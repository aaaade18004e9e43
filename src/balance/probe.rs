//! Probes that never cost a caller. When failure accrual or outlier ejection lets an ejected
//! endpoint take one call to judge it by, the call it is handed is, if it may be duplicated (its
//! method has a retry or hedging policy, so its request is kept: [`Duplicable`]), copied: the copy
//! goes to the endpoint as the probe and runs to its end on its own task, and the caller's own
//! request comes back ([`Detached`]) to be sent elsewhere at once. A call that may not be
//! duplicated is the probe itself, as before: its caller waits for the judged endpoint.
//!
//! Knows requests and futures; nothing of how endpoints are judged or picked.

use super::endpoint::BoxError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tonic::body::Body;

/// The longest a detached probe may run: past it, it is dropped and judges nothing (the next
/// call probes again).
pub const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// In a request's extensions: its body, kept, so that the request may be sent more than once.
#[derive(Debug, Clone)]
pub(crate) struct Duplicable(pub(crate) Bytes);

/// The error a caller's try gets when the endpoint took a copy of it as its probe: the request
/// inside goes to another endpoint.
#[derive(Debug)]
pub struct Detached(Mutex<Option<http::Request<Body>>>);

impl std::fmt::Display for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the endpoint took a copy of this call as its probe")
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
