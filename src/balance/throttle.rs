//! Retry throttling, as gRPC's service config defines it (`retryThrottling`): a token bucket
//! shared by every call of one balancer. A failed try (a code the method's policy would retry)
//! costs a token, a success earns `tokenRatio`; while the bucket is at or below half full, no
//! retry or hedge is sent. It keeps a failing service from being asked twice for every call.
//! Without that bucket, meshlb's retry budget decides ([`Allowance`]: retries add at most a share
//! of the calls, as Linkerd's). Retries and hedges draw on the same [`Allowance`].
//! It knows nothing of how calls are made.

use super::service_config::RetryThrottling;
use std::sync::Mutex;
use tonic::Code;
use tower::retry::budget::{Budget, TpsBudget};

/// Whether a balancer may send one more try (a retry or a hedge), shared by all its calls.
#[derive(Debug)]
pub struct Allowance {
    budget: TpsBudget,
    throttle: Option<Throttle>,
}

impl Allowance {
    /// The config's `retryThrottling` bucket when it has one, else `budget`.
    pub fn new(budget: TpsBudget, throttling: Option<RetryThrottling>) -> Self {
        Self {
            budget,
            throttle: throttling.map(Throttle::new),
        }
    }

    /// A call started: the budget grows with the calls.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Whether one more try may be sent now (takes it from the budget when it may).
    pub fn may_send_another(&self) -> bool {
        match &self.throttle {
            Some(throttle) => throttle.allows(),
            None => self.budget.withdraw(),
        }
    }

    /// A try ended with `code` (`None`: failed fast, nothing was tried); `retryable` when the
    /// method's policy retries that code. As grpc-core and grpc-go count: a success refills, a
    /// retryable failure drains, anything else leaves the bucket.
    pub fn record(&self, code: Option<Code>, retryable: bool) {
        if let Some(throttle) = &self.throttle {
            match code {
                Some(Code::Ok) => throttle.succeeded(),
                _ if retryable => throttle.failed(),
                _ => {}
            }
        }
    }

    /// A hedged try failed with a non-fatal code.
    pub fn hedge_failed(&self) {
        if let Some(throttle) = &self.throttle {
            throttle.failed();
        }
    }
}

/// The token bucket.
#[derive(Debug)]
pub struct Throttle {
    config: RetryThrottling,
    tokens: Mutex<f64>,
}

impl Throttle {
    /// A full bucket.
    pub fn new(config: RetryThrottling) -> Self {
        Self {
            config,
            tokens: Mutex::new(config.max_tokens),
        }
    }

    fn update(&self, f: impl FnOnce(f64) -> f64) -> f64 {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        *tokens = f(*tokens).clamp(0.0, self.config.max_tokens);
        *tokens
    }

    /// A try failed with a retryable code.
    pub fn failed(&self) {
        self.update(|t| t - 1.0);
    }

    /// A try succeeded (or failed with a code that is not retried).
    pub fn succeeded(&self) {
        let ratio = self.config.token_ratio;
        self.update(|t| t + ratio);
    }

    /// Whether a retry or hedge may be sent now.
    pub fn allows(&self) -> bool {
        self.update(|t| t) > self.config.max_tokens / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stop_at_half_and_resume_after_successes() {
        let t = Throttle::new(RetryThrottling {
            max_tokens: 10.0,
            token_ratio: 0.5,
        });
        assert!(t.allows());
        for _ in 0..4 {
            t.failed();
        }
        assert!(t.allows(), "6 tokens left, above half");
        t.failed();
        assert!(!t.allows(), "5 tokens: at half, no retries");
        t.succeeded();
        assert!(t.allows(), "5.5 tokens");
        for _ in 0..100 {
            t.succeeded();
        }
        for _ in 0..4 {
            t.failed();
        }
        assert!(t.allows(), "the bucket never holds more than max_tokens");
        t.failed();
        assert!(!t.allows());
    }
}
