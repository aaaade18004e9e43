//! Backpressure: at most `max` calls in flight through one balancer (all its clones together).
//!
//! tonic asks a service `poll_ready` before every call, so this is where a caller waits when the
//! balancer is full, instead of the balancer piling up futures without bound. A call's permit is
//! taken in `poll_ready` and held until its answer ends (the body finished or dropped), so a
//! stream counts for as long as it streams. Knows nothing of endpoints or of what a call does.

use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// The default bound: far above what one client process usually has in flight, low enough that
/// a runaway caller meets backpressure before it runs the process out of memory.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

/// One clone's handle on the shared bound, with the permit its `poll_ready` reserved.
pub struct InFlight {
    semaphore: PollSemaphore,
    reserved: Option<OwnedSemaphorePermit>,
}

/// A call's share of the bound; dropping it frees the slot.
pub type Permit = OwnedSemaphorePermit;

impl InFlight {
    /// At most `max` permits out at once.
    pub fn new(max: usize) -> Self {
        Self {
            semaphore: PollSemaphore::new(std::sync::Arc::new(Semaphore::new(max))),
            reserved: None,
        }
    }

    /// Ready once this handle holds a permit for its next call.
    pub fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.reserved.is_none() {
            // The semaphore is never closed, so `None` cannot happen; it would mean no bound.
            self.reserved = std::task::ready!(self.semaphore.poll_acquire(cx));
        }
        Poll::Ready(())
    }

    /// The permit `poll_acquire` reserved: `None` for a caller that skipped `poll_ready`.
    pub fn take(&mut self) -> Option<Permit> {
        self.reserved.take()
    }

    /// For a caller that skipped `poll_ready`: waits for a permit (`None` only if the bound
    /// were closed, which it never is).
    pub fn acquire(&self) -> impl std::future::Future<Output = Option<Permit>> + Send + 'static {
        let semaphore = self.semaphore.clone_inner();
        async move { semaphore.acquire_owned().await.ok() }
    }
}

impl Clone for InFlight {
    /// Shares the bound; a permit stays with the handle that reserved it.
    fn clone(&self) -> Self {
        Self {
            semaphore: self.semaphore.clone(),
            reserved: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[tokio::test]
    async fn a_full_balancer_is_not_ready_until_a_call_ends() {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut a = InFlight::new(2);
        let mut b = a.clone();
        let mut c = a.clone();
        assert!(a.poll_acquire(&mut cx).is_ready());
        assert!(b.poll_acquire(&mut cx).is_ready());
        // Readiness is held, not counted twice.
        assert!(a.poll_acquire(&mut cx).is_ready());
        assert!(c.poll_acquire(&mut cx).is_pending(), "two in flight: full");
        let first = a.take().expect("reserved by poll_acquire");
        let _second = b.take().expect("reserved by poll_acquire");
        assert!(c.poll_acquire(&mut cx).is_pending());
        drop(first);
        assert!(
            c.poll_acquire(&mut cx).is_ready(),
            "a call ended: room again"
        );
    }
}
