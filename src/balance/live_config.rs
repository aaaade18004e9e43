//! The service config the call path reads, which can change while calls run: DNS may publish a
//! new one in gRPC's `_grpc_config` TXT record ([`super::dns_config`]).
//!
//! Each layer reads the current config when it looks a method up; a replacement applies from
//! then on (a call that spans it may retry under the new policy). Knows nothing of where a
//! config comes from.

use super::service_config::ServiceConfig;
use std::sync::{Arc, RwLock};

/// A shared, replaceable [`ServiceConfig`].
#[derive(Debug, Clone, Default)]
pub struct LiveConfig(Arc<RwLock<Arc<ServiceConfig>>>);

impl LiveConfig {
    /// Starts with `config`.
    pub fn new(config: Arc<ServiceConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<ServiceConfig> {
        // A poisoned lock only means a writer panicked between two whole configs.
        match self.0.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `config` in force for the calls that start from now on.
    pub fn replace(&self, config: Arc<ServiceConfig>) {
        match self.0.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

impl From<Arc<ServiceConfig>> for LiveConfig {
    fn from(config: Arc<ServiceConfig>) -> Self {
        Self::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_is_seen_by_every_clone() {
        let live = LiveConfig::new(Arc::default());
        let layer_copy = live.clone();
        assert!(layer_copy.current().method("/a.S/M").is_none());
        let config = r#"{"methodConfig": [{"name": [{"service": "a.S"}], "timeout": "1s"}]}"#;
        live.replace(Arc::new(ServiceConfig::from_json(config).unwrap()));
        let method = layer_copy.current();
        let method = method.method("/a.S/M").expect("the new config");
        assert_eq!(method.timeout, Some(std::time::Duration::from_secs(1)));
    }
}
