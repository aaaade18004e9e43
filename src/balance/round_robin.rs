//! Round-robin over the ready endpoints: the baseline that peak-EWMA p2c is compared against;
//! and pick-first (gRPC's `pick_first`: the first ready endpoint in address order, for every
//! call). Both use the same discovery stream, the same health-gated endpoints and tower's
//! `ReadyCache`, so the only difference in a comparison is the choice itself.
//!
//! The turn is kept by address, not by position in the cache: the cache reorders its ready set
//! whenever an endpoint is called and comes back, so "the next position" picks the same endpoint
//! twice in a row about one time in three (and a hedge after a fast failure went back to the
//! endpoint that had just failed). The addresses are kept in order beside the cache, so a turn
//! looks up the next address (O(log n), plus the endpoints that are not ready and are skipped)
//! rather than scanning the whole ready set.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::Hash;
use std::ops::Bound;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::discover::{Change, Discover};
use tower::ready_cache::ReadyCache;
use tower::Service;

use super::endpoint::BoxError;

/// Picks the ready endpoints in turn.
pub struct RoundRobin<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    discover: D,
    services: ReadyCache<D::Key, D::Service, Req>,
    /// Every endpoint's address, in order: the turn goes through them.
    order: BTreeSet<D::Key>,
    /// The address chosen last: the next turn is the first ready one after it.
    last: Option<D::Key>,
    chosen: Option<usize>,
    first: bool,
}

impl<D, Req> RoundRobin<D, Req>
where
    D: Discover,
    D::Key: Hash,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    /// Balances over what `discover` yields.
    pub fn new(discover: D) -> Self {
        Self {
            discover,
            services: ReadyCache::default(),
            order: BTreeSet::new(),
            last: None,
            chosen: None,
            first: false,
        }
    }

    /// Always the first ready endpoint of what `discover` yields, in key (address) order.
    pub fn pick_first(discover: D) -> Self {
        Self {
            first: true,
            ..Self::new(discover)
        }
    }
}

impl<D, Req> Service<Req> for RoundRobin<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + Ord,
    D::Error: Into<BoxError>,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Future: Send + 'static,
    <D::Service as Service<Req>>::Response: 'static,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while let Poll::Ready(Some(change)) = Pin::new(&mut self.discover).poll_discover(cx) {
            match change.map_err(Into::into)? {
                Change::Insert(key, svc) => {
                    self.order.insert(key.clone());
                    self.services.push(key, svc);
                }
                Change::Remove(key) => {
                    self.order.remove(&key);
                    self.services.evict(&key);
                }
            }
        }
        // A failed endpoint is evicted by the cache; endpoints here never fail readiness.
        let _ = self.services.poll_pending(cx);
        loop {
            if self.services.ready_len() == 0 {
                return Poll::Pending;
            }
            let after = match (&self.last, self.first) {
                (Some(last), false) => Bound::Excluded(last),
                _ => Bound::Unbounded,
            };
            // Past the highest address, the turn wraps to the lowest; only endpoints that are not
            // ready are walked past. Every ready key is in `order`; should one not be, the
            // cache's first still gets a turn rather than the caller waiting with no waker.
            let found = self
                .order
                .range((after, Bound::Unbounded))
                .chain(&self.order)
                .find_map(|key| self.services.get_ready(key).map(|(i, k, _)| (i, k.clone())))
                .or_else(|| {
                    self.services
                        .get_ready_index(0)
                        .map(|(k, _)| (0, k.clone()))
                });
            let Some((index, chosen)) = found else {
                return Poll::Pending;
            };
            match self.services.check_ready_index(cx, index) {
                Ok(true) => {
                    self.chosen = Some(index);
                    self.last = Some(chosen);
                    return Poll::Ready(Ok(()));
                }
                Ok(false) => {}
                // The cache dropped it; later turns need not walk past it until discovery does.
                Err(failed) => {
                    self.order.remove(&failed.0);
                }
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.chosen.take() {
            Some(index) => {
                let call = self.services.call_ready_index(index, request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            None => Box::pin(async { Err("round-robin called before it was ready".into()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn numbered() -> Vec<tower::util::BoxService<(), usize, BoxError>> {
        (0..3)
            .map(|i| {
                tower::util::BoxService::new(tower::service_fn(move |()| async move { Ok(i) }))
            })
            .collect()
    }

    #[tokio::test]
    async fn takes_every_endpoint_in_turn_whatever_the_cache_order() {
        let mut rr = RoundRobin::new(tower::discover::ServiceList::new(numbered()));
        let mut order = Vec::new();
        for _ in 0..9 {
            order.push(rr.ready().await.unwrap().call(()).await.unwrap());
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn an_endpoint_that_is_not_ready_loses_its_turn_to_the_next() {
        let (busy, mut handle) = tower_test::mock::pair::<(), usize>();
        handle.allow(0);
        let mut services = numbered();
        services[1] = tower::util::BoxService::new(busy);
        let mut rr = RoundRobin::new(tower::discover::ServiceList::new(services));
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rr.ready().await.unwrap().call(()).await.unwrap());
        }
        assert_eq!(order, [0, 2, 0, 2]);
    }

    #[tokio::test]
    async fn pick_first_always_takes_the_lowest_address() {
        let mut pf = RoundRobin::pick_first(tower::discover::ServiceList::new(numbered()));
        for _ in 0..4 {
            assert_eq!(pf.ready().await.unwrap().call(()).await.unwrap(), 0);
        }
    }
}
