//! gRPC's service config in DNS, as gRPC's DNS resolver reads it: a TXT record at
//! `_grpc_config.HOST` whose text is `grpc_config=` and a JSON list of choices, each a service
//! config for some of the clients:
//!
//! ```text
//! grpc_config=[{"clientLanguage": ["rust"], "percentage": 25, "clientHostname": ["web-1"],
//!               "serviceConfig": {"methodConfig": [ ... ]}}]
//! ```
//!
//! A client takes the first choice whose conditions all hold: `clientLanguage` (meshlb answers
//! to `rust`), `percentage` (against one draw per balancer, 0-99, so that a rollout to a share of
//! clients is stable), `clientHostname`. No record, or no choice for this client: the config the
//! balancer was built with. A record that does not parse (or whose config is invalid) is logged
//! and changes nothing: the last good config stays.
//!
//! Knows the record's format and the [`LiveConfig`] it updates; nothing of DNS lookups or calls.

use super::live_config::LiveConfig;
use super::service_config::{error, ServiceConfig, ServiceConfigError};
use serde_json::Value;
use std::sync::Arc;

/// The language meshlb answers to in `clientLanguage`.
pub const LANGUAGE: &str = "rust";

const PREFIX: &str = "grpc_config=";

/// Who is choosing: what `clientHostname` and `percentage` are matched against.
#[derive(Debug, Clone)]
pub struct Client {
    /// This machine's host name, if known.
    pub hostname: Option<String>,
    /// A draw in 0..100, once per balancer.
    pub roll: u32,
}

impl Client {
    /// This host, with a fresh draw.
    pub fn this_host() -> Self {
        use rand::Rng;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        Self {
            hostname,
            roll: rand::rng().random_range(0..100),
        }
    }
}

/// The config `texts` (the TXT record's texts) choose for `client`: `None` when there is no
/// `grpc_config` record or no choice applies.
pub fn choose(
    texts: &[String],
    client: &Client,
) -> Result<Option<ServiceConfig>, ServiceConfigError> {
    let Some(json) = texts.iter().find_map(|t| t.strip_prefix(PREFIX)) else {
        return Ok(None);
    };
    let value: Value =
        serde_json::from_str(json).map_err(|e| error("grpc_config", e.to_string()))?;
    let choices = value
        .as_array()
        .ok_or_else(|| error("grpc_config", "must be a list of choices"))?;
    for (i, choice) in choices.iter().enumerate() {
        let at = |field: &str| format!("grpc_config[{i}].{field}");
        let choice = choice
            .as_object()
            .ok_or_else(|| error(&format!("grpc_config[{i}]"), "must be an object"))?;
        if let Some(unknown) = choice.keys().find(|k| {
            ![
                "clientLanguage",
                "percentage",
                "clientHostname",
                "serviceConfig",
            ]
            .contains(&k.as_str())
        }) {
            return Err(error(&at(unknown), "unknown field"));
        }
        let names = |field: &str| -> Result<Option<Vec<String>>, ServiceConfigError> {
            choice
                .get(field)
                .map(|v| {
                    v.as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|s| s.as_str().map(str::to_owned))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| error(&at(field), "must be a list of strings"))
                })
                .transpose()
        };
        let languages = names("clientLanguage")?;
        let hostnames = names("clientHostname")?;
        let percentage = match choice.get("percentage") {
            None => None,
            Some(p) => Some(
                p.as_u64()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| error(&at("percentage"), "must be a whole number 0-100"))?,
            ),
        };
        let config = choice
            .get("serviceConfig")
            .ok_or_else(|| error(&at("serviceConfig"), "is required"))?;
        // Validated whether or not it applies here: a broken record is an error for everyone.
        let config =
            ServiceConfig::from_json(&config.to_string()).map_err(|e| ServiceConfigError {
                field: format!("{}.{}", at("serviceConfig"), e.field),
                message: e.message,
            })?;
        let language_ok = languages
            .is_none_or(|l| l.is_empty() || l.iter().any(|l| l.eq_ignore_ascii_case(LANGUAGE)));
        let host_ok = hostnames.is_none_or(|h| {
            h.is_empty() || client.hostname.as_ref().is_some_and(|me| h.contains(me))
        });
        let share_ok = percentage.is_none_or(|p| u64::from(client.roll) < p);
        if language_ok && host_ok && share_ok {
            return Ok(Some(config));
        }
    }
    Ok(None)
}

/// Puts in force what `texts` choose for `client`: their config, or `built` when they have none
/// for it. A bad record changes nothing (the last good config stays) and is the error.
pub fn apply(
    texts: &[String],
    client: &Client,
    live: &LiveConfig,
    built: &Arc<ServiceConfig>,
) -> Result<(), ServiceConfigError> {
    match choose(texts, client)? {
        Some(config) => live.replace(Arc::new(config)),
        None => live.replace(built.clone()),
    }
    Ok(())
}

/// Keeps `live` at what the record chooses, until discovery ends; `built` is the config the
/// balancer was built with.
pub async fn follow(
    mut records: tokio::sync::watch::Receiver<Vec<String>>,
    live: LiveConfig,
    built: Arc<ServiceConfig>,
    target: String,
) {
    let client = Client::this_host();
    while records.changed().await.is_ok() {
        let texts = records.borrow_and_update().clone();
        match apply(&texts, &client, &live, &built) {
            Ok(()) => {
                tracing::info!(%target, records = texts.len(), "service config from DNS read")
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "bad _grpc_config record: keeping the last good service config")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RETRIED: &str = r#"{"methodConfig": [{"name": [{"service": "a.S"}], "timeout": "2s"}]}"#;

    fn client(hostname: Option<&str>, roll: u32) -> Client {
        Client {
            hostname: hostname.map(str::to_owned),
            roll,
        }
    }

    fn timeout(config: Option<ServiceConfig>) -> Option<Duration> {
        config?.method("/a.S/M")?.timeout
    }

    #[test]
    fn the_first_choice_for_this_client_wins() {
        let record = format!(
            r#"grpc_config=[
                {{"clientLanguage": ["go", "java"], "serviceConfig": {{}}}},
                {{"clientHostname": ["other"], "serviceConfig": {{}}}},
                {{"percentage": 30, "clientLanguage": ["RUST"], "serviceConfig": {RETRIED}}},
                {{"serviceConfig": {{}}}}
            ]"#
        );
        let texts = vec!["v=spf1 unrelated".to_owned(), record];
        let me = |roll| choose(&texts, &client(Some("web-1"), roll)).unwrap();
        assert_eq!(timeout(me(29)), Some(Duration::from_secs(2)), "in the 30 %");
        let fallback = me(30).expect("the last choice applies to everyone");
        assert_eq!(fallback, ServiceConfig::default(), "outside the 30 %");
    }

    #[test]
    fn a_host_list_matches_this_host_only() {
        let texts = vec![format!(
            r#"grpc_config=[{{"clientHostname": ["web-1"], "serviceConfig": {RETRIED}}}]"#
        )];
        assert!(choose(&texts, &client(Some("web-1"), 0)).unwrap().is_some());
        assert!(choose(&texts, &client(Some("web-2"), 0)).unwrap().is_none());
        assert!(choose(&texts, &client(None, 0)).unwrap().is_none());
    }

    #[test]
    fn no_record_is_no_config_and_a_bad_one_is_an_error_naming_the_field() {
        assert!(choose(&["other".to_owned()], &client(None, 0))
            .unwrap()
            .is_none());
        let bad = |text: &str| choose(&[text.to_owned()], &client(None, 0)).unwrap_err();
        assert_eq!(bad("grpc_config=[{").field, "grpc_config");
        assert_eq!(bad(r#"grpc_config={}"#).field, "grpc_config");
        assert_eq!(
            bad(r#"grpc_config=[{"percentage": 101, "serviceConfig": {}}]"#).field,
            "grpc_config[0].percentage"
        );
        assert_eq!(
            bad(r#"grpc_config=[{"clientLanguag": ["rust"], "serviceConfig": {}}]"#).field,
            "grpc_config[0].clientLanguag"
        );
        assert_eq!(
            bad(r#"grpc_config=[{}]"#).field,
            "grpc_config[0].serviceConfig"
        );
        let e = bad(r#"grpc_config=[{"serviceConfig": {"methodConfig": [{"timeout": 3}]}}]"#);
        assert!(
            e.field
                .starts_with("grpc_config[0].serviceConfig.methodConfig[0]"),
            "{e:?}"
        );
    }

    #[test]
    fn a_bad_record_keeps_the_last_good_config_and_none_restores_the_built_one() {
        let built = Arc::new(ServiceConfig::default());
        let live = LiveConfig::new(built.clone());
        let me = client(None, 0);
        let now = || live.current().method("/a.S/M").and_then(|m| m.timeout);
        let good = vec![format!(r#"grpc_config=[{{"serviceConfig": {RETRIED}}}]"#)];
        apply(&good, &me, &live, &built).unwrap();
        assert_eq!(now(), Some(Duration::from_secs(2)));
        let bad = vec!["grpc_config=[not json".to_owned()];
        assert!(apply(&bad, &me, &live, &built).is_err());
        assert_eq!(
            now(),
            Some(Duration::from_secs(2)),
            "the last good one stays"
        );
        apply(&[], &me, &live, &built).unwrap();
        assert_eq!(now(), None, "no record: the built-in config");
    }
}
