//! What the layers' unit tests share: requests as the layers above would hand them down, and
//! a bounded wait for an answer (on tokio's paused clock, a call that never ends fails the
//! test at once instead of hanging it).

use super::deadline::Readiness;
use super::endpoint::BoxError;
use super::probe::Duplicable;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tonic::body::Body;

/// A request to `path` whose body was kept, as the replay layer hands it down.
pub fn kept_request(path: &str) -> http::Request<Body> {
    let body = Bytes::from_static(b"hello");
    let mut request = http::Request::new(Body::new(http_body_util::Full::new(body.clone())));
    *request.uri_mut() = format!("http://x{path}").parse().unwrap();
    request.extensions_mut().insert(Duplicable(body));
    request
}

/// The call's answer.
pub async fn answered(
    call: tokio::task::JoinHandle<Result<http::Response<Body>, BoxError>>,
) -> http::Response<Body> {
    tokio::time::timeout(Duration::from_secs(600), call)
        .await
        .expect("the call ended")
        .expect("the call did not panic")
        .expect("the layer answers with a response")
}

/// A balancer named "t" whose endpoints are ready or not, as the test says; counts the times it
/// was asked why not.
pub struct Fleet {
    ready: bool,
    why: &'static str,
    asked: AtomicU64,
}

impl Fleet {
    /// Ready, or not ready because of `why`.
    pub fn new(ready: bool, why: &'static str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            ready,
            why,
            asked: AtomicU64::new(0),
        })
    }

    /// How many times it was asked why nothing is ready.
    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }
}

impl Readiness for Fleet {
    fn target(&self) -> &str {
        "t"
    }
    fn why_unready(&self) -> Option<super::unavailable::Unavailable> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        let reason = super::unavailable::Reason::NoEndpoints;
        (!self.ready).then(|| super::unavailable::Unavailable::new(reason, self.why))
    }
}

/// Lets the tasks this one woke (an endpoint's accrual task) run until they wait again.
pub(crate) async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}
