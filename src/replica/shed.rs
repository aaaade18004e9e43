//! Load shedding: at most N gRPC calls at once. A call beyond the limit is answered at once with
//! `RESOURCE_EXHAUSTED` and a `grpc-retry-pushback-ms` trailer (how long calls hold a slot lately:
//! about when the next one frees up), instead of queueing behind the
//! others (where it would wait, time out and be retried anyway). Health calls are never shed: an
//! overloaded replica is busy, not unhealthy, and must not be ejected for it. The limit also
//! bounds the memory that callers can make the replica hold (calls × the largest message).
//!
//! Why `RESOURCE_EXHAUSTED` and not `UNAVAILABLE`: gRPC's status-code guide lists
//! RESOURCE_EXHAUSTED for a server out of resources, and it is in no default retry policy, so
//! clients that retry UNAVAILABLE blindly do not multiply the load; clients that follow gRPC's
//! retry design (A6) read the pushback and wait, and meshlb's balancer moves to another replica.
//!
//! Knows nothing of the services behind it, beyond the health service's path.

use axum::body::Body;
use http::{HeaderValue, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The shortest pushback: a caller told to wait less would be back before anything changed.
pub const MIN_PUSHBACK: Duration = Duration::from_millis(1);
/// The pushback before any call has finished here (nothing is known about how long slots are held).
pub const FIRST_PUSHBACK: Duration = Duration::from_millis(20);
/// The longest pushback.
pub const MAX_PUSHBACK: Duration = Duration::from_secs(1);

/// The trailer gRPC's retry design (A6) uses for server pushback.
pub use crate::grpc::PUSHBACK_HEADER;

/// Paths never shed.
const NEVER_SHED: &str = "/grpc.health.v1.Health/";

/// The replica's call limit.
#[derive(Debug, Clone)]
pub struct Shed {
    permits: Option<Arc<Semaphore>>,
    max: usize,
    /// How long calls have held their slot lately (an EWMA, µs): the pushback, since a slot
    /// frees up about that often per slot.
    held_us: Arc<AtomicU64>,
}

impl Shed {
    /// At most `max` calls at once; 0: no limit.
    pub fn new(max: usize) -> Self {
        Self {
            permits: (max > 0).then(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))),
            max,
            held_us: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A slot for a call to `path`, held until its answer ends; `Err` when the replica is full.
    pub fn admit(&self, path: &str) -> Result<Option<Slot>, Overloaded> {
        let Some(permits) = &self.permits else {
            return Ok(None);
        };
        if path.starts_with(NEVER_SHED) {
            return Ok(None);
        }
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(Slot {
                _permit: permit,
                since: tokio::time::Instant::now(),
                held_us: self.held_us.clone(),
            })),
            Err(_) => Err(Overloaded {
                max: self.max,
                pushback: self.pushback(),
            }),
        }
    }

    /// What a shed caller is told to wait: how long a slot is held lately, within bounds.
    pub fn pushback(&self) -> Duration {
        match self.held_us.load(Ordering::Relaxed) {
            0 => FIRST_PUSHBACK,
            us => Duration::from_micros(us).clamp(MIN_PUSHBACK, MAX_PUSHBACK),
        }
    }
}

/// One call's slot; freed (and its time recorded) when the call's answer ends.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    since: tokio::time::Instant,
    held_us: Arc<AtomicU64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let sample = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        // A lock-free EWMA (weight 1/8); racing updates only lose a sample.
        let old = self.held_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.held_us.store(new, Ordering::Relaxed);
    }
}

/// A call shed because the replica is at its limit.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded {
    max: usize,
    pushback: Duration,
}

impl Overloaded {
    /// The answer: `RESOURCE_EXHAUSTED` with the pushback.
    pub fn into_response(self) -> Response<Body> {
        let status = tonic::Status::resource_exhausted(format!(
            "the replica is at its limit of {} concurrent calls (--max-concurrent-calls); retry elsewhere or after the pushback",
            self.max
        ));
        let mut response = status.into_http::<Body>();
        response.headers_mut().insert(
            PUSHBACK_HEADER,
            HeaderValue::from(self.pushback.as_millis().max(1) as u64),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sheds_beyond_the_limit_but_never_health() {
        let shed = Shed::new(2);
        let a = shed.admit("/a.B/C").unwrap();
        let _b = shed.admit("/a.B/C").unwrap();
        let refused = shed.admit("/a.B/C").unwrap_err().into_response();
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.headers()[&PUSHBACK_HEADER], "20");
        assert!(shed.admit("/grpc.health.v1.Health/Check").is_ok());
        // Held 40 ms: the pushback follows how long slots are held.
        tokio::time::advance(Duration::from_millis(40)).await;
        drop(a);
        assert_eq!(shed.pushback(), Duration::from_millis(40));
        assert!(shed.admit("/a.B/C").is_ok());
        assert!(Shed::new(0).admit("/a.B/C").unwrap().is_none());
    }
}
