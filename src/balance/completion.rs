//! When a call is over: at the end of the response body, not at its headers.
//!
//! tower's `CompleteOnResponse` stops the clock when the response headers arrive, which
//! under-measures a streaming call, and a gRPC error arrives as HTTP 200 with a `grpc-status`
//! trailer, so it looks like a success unless someone reads the trailers. [`TrackedBody`] holds a
//! completion guard until the body yields its last frame, reads `grpc-status` on the way, and tells
//! the guard how the call ended. [`BodyEnd`] plugs the same into tower's own `PeakEwma`, for a
//! stack built of plain tower (the benchmark's contender); the balancer's endpoints keep their
//! estimate themselves ([`super::latency`]).

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tonic::Code;
use tower::load::peak_ewma::Handle;
use tower::load::TrackCompletion;

/// How one call ended, as the endpoint saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `grpc-status: 0`, or a body that ended cleanly.
    Ok,
    /// A non-OK `grpc-status`.
    Status(Code),
    /// The connection broke.
    Broken,
    /// One stream failed on a working connection (see [`super::failure`]): the call's problem,
    /// not the endpoint's.
    StreamError(Code),
    /// The caller dropped the call before it ended.
    Cancelled,
}

impl Outcome {
    /// The outcome named by a `grpc-status` header or trailer, if there is one.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let status = headers.get(crate::grpc::STATUS_HEADER)?;
        let code = status
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map(Code::from_i32)
            .unwrap_or(Code::Unknown);
        Some(if code == Code::Ok {
            Outcome::Ok
        } else {
            Outcome::Status(code)
        })
    }

    /// Whether this says something is wrong with the endpoint rather than with the request:
    /// those count towards failure accrual.
    pub fn is_endpoint_failure(self) -> bool {
        matches!(self, Outcome::Broken | Outcome::Status(Code::Unavailable))
    }
}

/// Something told how a call ended and then dropped.
pub trait Completion: Send + 'static {
    /// Records the outcome; called at most once, just before the guard is dropped.
    fn record(&mut self, outcome: Outcome);
}

impl Completion for Handle {
    // PeakEwma records the RTT when its handle drops; the outcome does not matter to it.
    fn record(&mut self, _: Outcome) {}
}

pin_project! {
    /// A response body that holds `G` until the body ends and tells it the outcome. Dropped before
    /// the end, it drops `G` unrecorded, which the guard reads as "cancelled".
    pub struct TrackedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G: Completion> TrackedBody<B, G> {
    /// Wraps `inner`. When the headers already carry `grpc-status` (a trailers-only response), the
    /// outcome is known now and recorded at once.
    pub fn new(inner: B, mut guard: G, headers: &HeaderMap) -> Self {
        let guard = match Outcome::from_headers(headers) {
            Some(outcome) => {
                guard.record(outcome);
                drop(guard);
                None
            }
            None => Some(guard),
        };
        Self { inner, guard }
    }
}

impl<B, G> TrackedBody<B, G> {
    /// Wraps `inner` for a call whose outcome is recorded already.
    pub fn recorded(inner: B) -> Self {
        Self { inner, guard: None }
    }
}

fn finish<G: Completion>(guard: &mut Option<G>, outcome: Outcome) {
    if let Some(mut g) = guard.take() {
        g.record(outcome);
    }
}

impl<B, G> Body for TrackedBody<B, G>
where
    B: Body,
    B::Error: std::error::Error + 'static,
    G: Completion,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    let outcome = Outcome::from_headers(trailers).unwrap_or(Outcome::Ok);
                    finish(this.guard, outcome);
                }
            }
            Some(Err(error)) => {
                let outcome = match super::failure::blame(error) {
                    super::failure::Blame::Endpoint => Outcome::Broken,
                    super::failure::Blame::Call(code, _) => Outcome::StreamError(code),
                };
                finish(this.guard, outcome)
            }
            None => finish(this.guard, Outcome::Ok),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A `TrackCompletion` for `PeakEwma` that completes at the end of the response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyEnd;

impl<B> TrackCompletion<Handle, http::Response<B>> for BodyEnd {
    type Output = http::Response<TrackedBody<B, Handle>>;

    fn track_completion(&self, handle: Handle, response: http::Response<B>) -> Self::Output {
        let (parts, body) = response.into_parts();
        if let Some(crate::grpc::Pushback::Wait(pause)) = crate::grpc::Pushback::of(&parts.headers)
        {
            // A shed call is answered at once, which would make the shedding endpoint look like
            // the cheapest one. It costs what its caller loses instead: the pushback, then a try
            // elsewhere (about as long again). The call stays pending that long, so p2c prefers
            // endpoints that are not shedding, yet still uses this one when every endpoint sheds
            // (stepping aside would leave it idle).
            tokio::spawn(async move {
                tokio::time::sleep(pause * 4).await;
                drop(handle);
            });
            return http::Response::from_parts(parts, TrackedBody::recorded(body));
        }
        let body = TrackedBody::new(body, handle, &parts.headers);
        http::Response::from_parts(parts, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Spy(Arc<Mutex<Vec<Outcome>>>);
    impl Completion for Spy {
        fn record(&mut self, outcome: Outcome) {
            self.0.lock().unwrap().push(outcome);
        }
    }

    fn body(
        frames: Vec<Result<Frame<Bytes>, tonic::Status>>,
    ) -> impl Body<Data = Bytes, Error = tonic::Status> {
        StreamBody::new(futures::stream::iter(frames))
    }

    fn trailers(code: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[tokio::test]
    async fn records_only_at_the_end_of_the_body_and_reads_the_trailers() {
        let spy = Spy::default();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"one"))),
            Ok(Frame::data(Bytes::from_static(b"two"))),
            Ok(Frame::trailers(trailers("14"))),
        ];
        let mut tracked = TrackedBody::new(body(frames), spy.clone(), &HeaderMap::new());
        let first = tracked.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert!(spy.0.lock().unwrap().is_empty(), "not before the end");
        while tracked.frame().await.is_some() {}
        assert_eq!(*spy.0.lock().unwrap(), [Outcome::Status(Code::Unavailable)]);
    }

    #[tokio::test]
    async fn trailers_only_response_is_recorded_at_once() {
        let spy = Spy::default();
        let _tracked = TrackedBody::new(body(vec![]), spy.clone(), &trailers("5"));
        assert_eq!(*spy.0.lock().unwrap(), [Outcome::Status(Code::NotFound)]);
    }

    #[tokio::test]
    async fn ok_trailers_and_broken_streams() {
        let spy = Spy::default();
        let mut ok = TrackedBody::new(
            body(vec![Ok(Frame::trailers(trailers("0")))]),
            spy.clone(),
            &HeaderMap::new(),
        );
        while ok.frame().await.is_some() {}
        let mut broken = TrackedBody::new(
            body(vec![Err(tonic::Status::internal("reset"))]),
            spy.clone(),
            &HeaderMap::new(),
        );
        while let Some(Ok(_)) = broken.frame().await {}
        assert_eq!(*spy.0.lock().unwrap(), [Outcome::Ok, Outcome::Broken]);
    }

    #[test]
    fn endpoint_failures_are_transport_and_unavailable_only() {
        assert!(Outcome::Broken.is_endpoint_failure());
        assert!(Outcome::Status(Code::Unavailable).is_endpoint_failure());
        assert!(!Outcome::Status(Code::NotFound).is_endpoint_failure());
        assert!(!Outcome::Ok.is_endpoint_failure());
    }
}
