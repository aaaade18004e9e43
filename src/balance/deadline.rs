//! A call's deadline after its response headers: a streaming answer that stalls past the deadline
//! ends with `DEADLINE_EXCEEDED` instead of hanging the caller. (Up to the headers, `call` bounds
//! the wait itself.) The timer is only armed when the body actually has to wait, so a unary answer
//! that is already complete costs no timer. It also holds the call's share of the balancer's
//! in-flight bound ([`super::limit`]) until the answer ends.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::Status;

pin_project! {
    /// A response body that fails with `DEADLINE_EXCEEDED` once `expires` passes.
    pub struct DeadlineBody {
        #[pin]
        inner: Body,
        expires: Instant,
        timer: Option<Pin<Box<Sleep>>>,
        expired: bool,
        permit: Option<super::limit::Permit>,
    }
}

impl DeadlineBody {
    /// Bounds `inner` by `expires`; `permit` is released when the answer ends.
    pub fn new(inner: Body, expires: Instant, permit: Option<super::limit::Permit>) -> Self {
        Self {
            inner,
            expires,
            timer: None,
            expired: false,
            permit,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        if let Poll::Ready(frame) = inner.as_mut().poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) || inner.is_end_stream() {
                // The answer is over (ended, or broken off), even if the caller keeps the body:
                // free its slot.
                this.permit.take();
            }
            return Poll::Ready(frame);
        }
        let expires = *this.expires;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                *this.expired = true;
                this.permit.take();
                Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the call's deadline passed while the answer was streaming",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_at_the_deadline() {
        let frames =
            futures::stream::iter([Ok::<_, Status>(Frame::data(Bytes::from_static(b"first")))])
                .chain(futures::stream::pending());
        let inner = Body::new(StreamBody::new(frames));
        let mut body = DeadlineBody::new(inner, Instant::now() + Duration::from_secs(2), None);
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_body_passes_through_untouched() {
        let inner = Body::new(http_body_util::Full::new(Bytes::from_static(b"all")));
        let mut body = DeadlineBody::new(inner, Instant::now(), None);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"all");
    }

    use futures::StreamExt;
}
