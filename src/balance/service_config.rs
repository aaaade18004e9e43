//! gRPC service config: the policy language every gRPC implementation reads (grpc-go,
//! grpc-java, grpc-core), so one JSON file tells every client of a service which methods are
//! safe to retry or hedge, how long calls may take, and how to balance.
//!
//! What is read, as gRPC's specs define it (A6 for retries and hedging, the service config doc):
//! - `methodConfig[]`: `name[]` (`{"service": S, "method": M}`, `{"service": S}` for every method
//!   of S, `{}` for every method), `timeout`, `waitForReady`, `retryPolicy` (`maxAttempts`,
//!   `initialBackoff`, `maxBackoff`, `backoffMultiplier`, `retryableStatusCodes`) or
//!   `hedgingPolicy` (`maxAttempts`, `hedgingDelay`, `nonFatalStatusCodes`). The most specific
//!   name wins: service and method, then service, then the default.
//! - `retryThrottling` (`maxTokens`, `tokenRatio`).
//! - `loadBalancingConfig[]`: the first policy this balancer knows of `round_robin`,
//!   `pick_first` and `meshlb_p2c` (whose config holds the outlier-ejection settings); the older
//!   `loadBalancingPolicy` string too. `random_subsetting_experimental` (gRFC A68, as grpc-go
//!   and grpc-java name it; A68's first draft's `random_subsetting` too) wraps one of them:
//!   `subsetSize` (required, at least 1) and `childPolicy[]`, the policy over the subset.
//!
//! A config that does not follow the spec is an error naming the field
//! (`methodConfig[0].retryPolicy.maxAttempts: must be at least 2`); unknown fields are errors
//! too, so a misspelt one is not silently ignored. This module only reads configs: it knows
//! nothing of how calls are made.

use super::outlier::OutlierConfig;
use serde_json::Value;
use std::time::Duration;
use tonic::Code;

/// The most attempts gRPC allows a retry or hedging policy; larger values are capped to it.
pub const MAX_ATTEMPTS: u32 = 5;

/// A parsed, validated service config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    methods: Vec<MethodConfig>,
    /// Retry throttling, if configured.
    pub retry_throttling: Option<RetryThrottling>,
    /// The balancing policy, if the config chooses one.
    pub load_balancing: Option<LoadBalancing>,
    /// `random_subsetting_experimental`'s `subsetSize`: connect to at most this many of the
    /// discovered addresses ([`crate::discovery::subset`]).
    pub subset_size: Option<usize>,
    /// `healthCheckConfig.serviceName`: the grpc.health.v1 service each endpoint is watched for.
    pub health_check_service: Option<String>,
}

/// The policy of the methods one `methodConfig` entry names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodConfig {
    names: Vec<Name>,
    /// The longest a call may take (the caller's own deadline wins when shorter).
    pub timeout: Option<Duration>,
    /// Wait for a ready endpoint instead of failing fast.
    pub wait_for_ready: Option<bool>,
    /// How failed calls are retried.
    pub retry: Option<RetryPolicy>,
    /// How slow calls are hedged.
    pub hedging: Option<HedgingPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    service: Option<String>,
    method: Option<String>,
}

/// `retryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (2 to [`MAX_ATTEMPTS`]).
    pub max_attempts: u32,
    /// The first backoff's upper bound (each backoff is random below its bound).
    pub initial_backoff: Duration,
    /// The largest backoff bound.
    pub max_backoff: Duration,
    /// How the bound grows after each try.
    pub backoff_multiplier: f64,
    /// The codes worth another try.
    pub retryable_codes: Vec<Code>,
}

impl RetryPolicy {
    /// The upper bound of the backoff before try number `attempt` (2 = the first retry).
    pub fn backoff_bound(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(2) as i32;
        let bound = self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        Duration::from_secs_f64(bound.min(self.max_backoff.as_secs_f64()))
    }
}

/// `hedgingPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    /// Tries in all, the first included (2 to [`MAX_ATTEMPTS`]).
    pub max_attempts: u32,
    /// How long to wait before each hedge.
    pub hedging_delay: Duration,
    /// Codes after which the other tries go on (any other code ends the call).
    pub non_fatal_codes: Vec<Code>,
}

/// `retryThrottling`: a token bucket shared by every call of the channel. Each failed try costs a
/// token, each success earns `token_ratio`; retries and hedges stop while the bucket is at or
/// below half full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryThrottling {
    /// The bucket's size (at most 1000).
    pub max_tokens: f64,
    /// Tokens earned by a success.
    pub token_ratio: f64,
}

/// The balancing policy a config chooses.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadBalancing {
    /// meshlb's own: p2c over peak-EWMA with these outlier-ejection settings.
    P2c(OutlierConfig),
    /// Each ready endpoint in turn.
    RoundRobin,
    /// The first ready endpoint, in address order, for every call.
    PickFirst,
}

/// A service config that does not follow the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service config: {field}: {message}")]
pub struct ServiceConfigError {
    /// Where, as a JSON path (`methodConfig[0].retryPolicy.maxAttempts`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// An error at `field` (a JSON path; empty for the whole document).
pub(super) fn error(field: &str, message: impl Into<String>) -> ServiceConfigError {
    ServiceConfigError {
        field: if field.is_empty() {
            "(the document)".into()
        } else {
            field.to_owned()
        },
        message: message.into(),
    }
}

// === impl ServiceConfig ===

impl ServiceConfig {
    /// Parses and validates a service config.
    pub fn from_json(text: &str) -> Result<Self, ServiceConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| error("", e.to_string()))?;
        let root = object(
            &value,
            "",
            &[
                "methodConfig",
                "retryThrottling",
                "loadBalancingConfig",
                "loadBalancingPolicy",
                "healthCheckConfig",
            ],
        )?;
        let mut config = ServiceConfig::default();
        if let Some(methods) = root.get("methodConfig") {
            let methods = array(methods, "methodConfig")?;
            for (i, m) in methods.iter().enumerate() {
                config
                    .methods
                    .push(method_config(m, &format!("methodConfig[{i}]"))?);
            }
        }
        let mut seen: Vec<(&Name, usize)> = Vec::new();
        for (i, m) in config.methods.iter().enumerate() {
            for (k, name) in m.names.iter().enumerate() {
                if let Some((_, j)) = seen.iter().find(|(n, _)| *n == name) {
                    return Err(error(
                        &format!("methodConfig[{i}].name[{k}]"),
                        format!("{} is already named by methodConfig[{j}]", name.describe()),
                    ));
                }
                seen.push((name, i));
            }
        }
        if let Some(h) = root.get("healthCheckConfig") {
            let h = object(h, "healthCheckConfig", &["serviceName"])?;
            if let Some(name) = h.get("serviceName") {
                let name = string(name, "healthCheckConfig.serviceName")?;
                config.health_check_service = Some(name.to_owned());
            }
        }
        if let Some(t) = root.get("retryThrottling") {
            config.retry_throttling = Some(throttling(t, "retryThrottling")?);
        }
        if let Some(lb) = root.get("loadBalancingConfig") {
            let (policy, subset) = load_balancing(lb, "loadBalancingConfig", true)?;
            config.load_balancing = Some(policy);
            config.subset_size = subset;
        } else if let Some(policy) = root.get("loadBalancingPolicy") {
            let field = "loadBalancingPolicy";
            config.load_balancing =
                Some(match string(policy, field)?.to_ascii_lowercase().as_str() {
                    "round_robin" => LoadBalancing::RoundRobin,
                    "pick_first" => LoadBalancing::PickFirst,
                    other => {
                        return Err(error(
                            field,
                            format!("unknown policy {other:?} (round_robin, pick_first)"),
                        ))
                    }
                });
        }
        Ok(config)
    }

    /// The policy for a call to `path` (`/package.Service/Method`): the entry naming the service
    /// and method, else the one naming the service, else the default one.
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        let (service, method) = crate::telemetry::rpc_names(path);
        // One pass (every call looks its method up): the most specific name seen so far wins,
        // the first of equals (the parser refuses a name given twice).
        let mut best: Option<(u8, &MethodConfig)> = None;
        for m in &self.methods {
            for n in &m.names {
                let rank = match (n.service.as_deref(), n.method.as_deref()) {
                    (Some(s), Some(x)) if s == service && x == method => return Some(m),
                    (Some(s), None) if s == service => 2,
                    (None, _) => 1,
                    _ => continue,
                };
                if best.is_none_or(|(r, _)| rank > r) {
                    best = Some((rank, m));
                }
            }
        }
        best.map(|(_, m)| m)
    }
}

impl Name {
    fn describe(&self) -> String {
        match (&self.service, &self.method) {
            (Some(s), Some(m)) => format!("{s}/{m}"),
            (Some(s), None) => format!("every method of {s}"),
            _ => "the default".into(),
        }
    }
}

// === the JSON walk ===

fn object<'a>(
    value: &'a Value,
    field: &str,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, ServiceConfigError> {
    let map = value
        .as_object()
        .ok_or_else(|| error(field, "must be an object"))?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        let at = if field.is_empty() {
            unknown.clone()
        } else {
            format!("{field}.{unknown}")
        };
        return Err(error(
            &at,
            format!("unknown field (expected one of: {})", known.join(", ")),
        ));
    }
    Ok(map)
}

fn array<'a>(value: &'a Value, field: &str) -> Result<&'a Vec<Value>, ServiceConfigError> {
    value
        .as_array()
        .ok_or_else(|| error(field, "must be an array"))
}

fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str, ServiceConfigError> {
    value
        .as_str()
        .ok_or_else(|| error(field, "must be a string"))
}

fn number(value: &Value, field: &str) -> Result<f64, ServiceConfigError> {
    // The protobuf JSON mapping also allows numbers as strings.
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
    .ok_or_else(|| error(field, "must be a number"))
}

fn required<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<&'a Value, ServiceConfigError> {
    map.get(key)
        .ok_or_else(|| error(&format!("{field}.{key}"), "is required"))
}

/// A protobuf JSON `Duration`: decimal seconds with an `s` (`"0.1s"`, `"1.5s"`, `"10s"`).
fn duration(value: &Value, field: &str) -> Result<Duration, ServiceConfigError> {
    let text = string(value, field)?;
    let seconds = text
        .strip_suffix('s')
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n <= 315_576_000_000.0)
        .ok_or_else(|| {
            error(
                field,
                format!("{text:?} is not a duration such as \"0.1s\""),
            )
        })?;
    Ok(Duration::from_secs_f64(seconds))
}

fn positive_duration(value: &Value, field: &str) -> Result<Duration, ServiceConfigError> {
    let d = duration(value, field)?;
    if d.is_zero() {
        return Err(error(field, "must be more than 0s"));
    }
    Ok(d)
}

fn attempts(value: &Value, field: &str) -> Result<u32, ServiceConfigError> {
    let n = number(value, field)?;
    if n.fract() != 0.0 || n < 2.0 {
        return Err(error(field, "must be a whole number, at least 2"));
    }
    Ok((n.min(MAX_ATTEMPTS as f64)) as u32)
}

/// A status code by its canonical name (`"UNAVAILABLE"`) or number.
fn code(value: &Value, field: &str) -> Result<Code, ServiceConfigError> {
    let index = match value {
        Value::String(s) => (0..crate::grpc::CODE_COUNT)
            .find(|i| crate::grpc::code_name(Code::from_i32(*i as i32)).eq_ignore_ascii_case(s)),
        Value::Number(n) => n
            .as_u64()
            .filter(|n| (*n as usize) < crate::grpc::CODE_COUNT)
            .map(|n| n as usize),
        _ => None,
    };
    match index {
        Some(0) => Err(error(field, "OK is not a failure")),
        Some(i) => Ok(Code::from_i32(i as i32)),
        None => Err(error(
            field,
            format!("{value} is not a status code (UNAVAILABLE, 14, …)"),
        )),
    }
}

fn codes(value: &Value, field: &str) -> Result<Vec<Code>, ServiceConfigError> {
    array(value, field)?
        .iter()
        .enumerate()
        .map(|(i, c)| code(c, &format!("{field}[{i}]")))
        .collect()
}

fn method_config(value: &Value, field: &str) -> Result<MethodConfig, ServiceConfigError> {
    let map = object(
        value,
        field,
        &[
            "name",
            "timeout",
            "waitForReady",
            "retryPolicy",
            "hedgingPolicy",
            "maxRequestMessageBytes",
            "maxResponseMessageBytes",
        ],
    )?;
    let mut config = MethodConfig::default();
    let names_field = format!("{field}.name");
    for (i, n) in array(required(map, "name", field)?, &names_field)?
        .iter()
        .enumerate()
    {
        let at = format!("{names_field}[{i}]");
        let n = object(n, &at, &["service", "method"])?;
        let part = |key: &str| -> Result<Option<String>, ServiceConfigError> {
            match n.get(key) {
                None => Ok(None),
                Some(v) => {
                    let s = string(v, &format!("{at}.{key}"))?;
                    Ok((!s.is_empty()).then(|| s.to_owned()))
                }
            }
        };
        let name = Name {
            service: part("service")?,
            method: part("method")?,
        };
        if name.service.is_none() && name.method.is_some() {
            return Err(error(&at, "a method needs its service"));
        }
        config.names.push(name);
    }
    if config.names.is_empty() {
        return Err(error(
            &names_field,
            "must name at least one service (or {} for every one)",
        ));
    }
    if let Some(t) = map.get("timeout") {
        config.timeout = Some(duration(t, &format!("{field}.timeout"))?);
    }
    if let Some(w) = map.get("waitForReady") {
        let at = format!("{field}.waitForReady");
        config.wait_for_ready = Some(
            w.as_bool()
                .ok_or_else(|| error(&at, "must be true or false"))?,
        );
    }
    for key in ["maxRequestMessageBytes", "maxResponseMessageBytes"] {
        if let Some(v) = map.get(key) {
            // Accepted for compatibility; the balancer does not enforce message sizes.
            number(v, &format!("{field}.{key}"))?;
        }
    }
    if let Some(r) = map.get("retryPolicy") {
        let at = format!("{field}.retryPolicy");
        let r = object(
            r,
            &at,
            &[
                "maxAttempts",
                "initialBackoff",
                "maxBackoff",
                "backoffMultiplier",
                "retryableStatusCodes",
            ],
        )?;
        let multiplier_field = format!("{at}.backoffMultiplier");
        let multiplier = number(required(r, "backoffMultiplier", &at)?, &multiplier_field)?;
        if multiplier <= 0.0 {
            return Err(error(&multiplier_field, "must be more than 0"));
        }
        let codes_field = format!("{at}.retryableStatusCodes");
        let retryable = codes(required(r, "retryableStatusCodes", &at)?, &codes_field)?;
        if retryable.is_empty() {
            return Err(error(&codes_field, "must name at least one code"));
        }
        config.retry = Some(RetryPolicy {
            max_attempts: attempts(
                required(r, "maxAttempts", &at)?,
                &format!("{at}.maxAttempts"),
            )?,
            initial_backoff: positive_duration(
                required(r, "initialBackoff", &at)?,
                &format!("{at}.initialBackoff"),
            )?,
            max_backoff: positive_duration(
                required(r, "maxBackoff", &at)?,
                &format!("{at}.maxBackoff"),
            )?,
            backoff_multiplier: multiplier,
            retryable_codes: retryable,
        });
    }
    if let Some(h) = map.get("hedgingPolicy") {
        let at = format!("{field}.hedgingPolicy");
        if config.retry.is_some() {
            return Err(error(
                &at,
                "a method has a retryPolicy or a hedgingPolicy, not both",
            ));
        }
        let h = object(
            h,
            &at,
            &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"],
        )?;
        config.hedging = Some(HedgingPolicy {
            max_attempts: attempts(
                required(h, "maxAttempts", &at)?,
                &format!("{at}.maxAttempts"),
            )?,
            hedging_delay: match h.get("hedgingDelay") {
                Some(d) => duration(d, &format!("{at}.hedgingDelay"))?,
                None => Duration::ZERO,
            },
            non_fatal_codes: match h.get("nonFatalStatusCodes") {
                Some(c) => codes(c, &format!("{at}.nonFatalStatusCodes"))?,
                None => Vec::new(),
            },
        });
    }
    Ok(config)
}

fn throttling(value: &Value, field: &str) -> Result<RetryThrottling, ServiceConfigError> {
    let map = object(value, field, &["maxTokens", "tokenRatio"])?;
    let tokens_field = format!("{field}.maxTokens");
    let max_tokens = number(required(map, "maxTokens", field)?, &tokens_field)?;
    if !(max_tokens > 0.0 && max_tokens <= 1000.0) {
        return Err(error(&tokens_field, "must be more than 0 and at most 1000"));
    }
    let ratio_field = format!("{field}.tokenRatio");
    let ratio = number(required(map, "tokenRatio", field)?, &ratio_field)?;

    // gRPC keeps three decimal places; a ratio that truncates to nothing would never refill.
    let token_ratio = (ratio * 1000.0).trunc() / 1000.0;
    if token_ratio <= 0.0 {
        return Err(error(&ratio_field, "must be at least 0.001"));
    }
    Ok(RetryThrottling {
        max_tokens,
        token_ratio,
    })
}

/// The first policy named that this balancer knows, and the subset size when it is wrapped in
/// `random_subsetting` (which may not wrap itself).
fn load_balancing(
    value: &Value,
    field: &str,
    may_subset: bool,
) -> Result<(LoadBalancing, Option<usize>), ServiceConfigError> {
    let choices = array(value, field)?;
    for (i, choice) in choices.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let map = choice
            .as_object()
            .filter(|m| m.len() == 1)
            .ok_or_else(|| error(&at, "must be an object with exactly one policy name"))?;
        let Some((name, config)) = map.iter().next() else {
            continue;
        };
        let at = format!("{at}.{name}");
        match name.as_str() {
            "round_robin" => {
                object(config, &at, &[])?;
                return Ok((LoadBalancing::RoundRobin, None));
            }
            "pick_first" => {
                object(config, &at, &["shuffleAddressList"])?;
                return Ok((LoadBalancing::PickFirst, None));
            }
            "meshlb_p2c" => return Ok((LoadBalancing::P2c(p2c(config, &at)?), None)),
            "random_subsetting" | "random_subsetting_experimental" => {
                if !may_subset {
                    return Err(error(&at, "random_subsetting may not wrap itself"));
                }
                return subsetting(config, &at);
            }
            // Another implementation's policy: the next choice may be one of ours, as gRPC does.
            _ => continue,
        }
    }
    Err(error(
        field,
        "names no policy this balancer knows (meshlb_p2c, round_robin, pick_first, \
         random_subsetting_experimental)",
    ))
}

fn subsetting(
    value: &Value,
    field: &str,
) -> Result<(LoadBalancing, Option<usize>), ServiceConfigError> {
    let map = object(value, field, &["subsetSize", "childPolicy"])?;
    // Required, as grpc-go and grpc-java require it: a config they refuse is not one to share.
    let at = format!("{field}.subsetSize");
    let n = map
        .get("subsetSize")
        .ok_or_else(|| error(&at, "is required: how many endpoints to connect to"))?;
    let n = number(n, &at)?;
    if n.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&n) {
        return Err(error(&at, "must be a whole number, at least 1"));
    }
    let size = n as usize;
    let at = format!("{field}.childPolicy");
    let child = map
        .get("childPolicy")
        .ok_or_else(|| error(&at, "is required: the policy over the subset"))?;
    let (policy, _) = load_balancing(child, &at, false)?;
    Ok((policy, Some(size)))
}

fn p2c(value: &Value, field: &str) -> Result<OutlierConfig, ServiceConfigError> {
    let map = object(value, field, &["outlierEjection"])?;
    let mut outlier = OutlierConfig::default();
    let Some(o) = map.get("outlierEjection") else {
        return Ok(outlier);
    };
    let at = format!("{field}.outlierEjection");
    let o = object(
        o,
        &at,
        &[
            "enabled",
            "factor",
            "floor",
            "window",
            "interval",
            "minSamples",
        ],
    )?;
    if let Some(e) = o.get("enabled") {
        let f = format!("{at}.enabled");
        outlier.enabled = e
            .as_bool()
            .ok_or_else(|| error(&f, "must be true or false"))?;
    }
    if let Some(f) = o.get("factor") {
        let field = format!("{at}.factor");
        outlier.factor = number(f, &field)?;
        if !(outlier.factor > 1.0 && outlier.factor <= 1000.0) {
            return Err(error(&field, "must be more than 1 and at most 1000"));
        }
    }
    // An hour at most: the detector adds and multiplies these, and must never overflow.
    let at_most_an_hour = |d: Duration, field: String| {
        if d > Duration::from_secs(3600) {
            Err(error(&field, "must be at most 3600s"))
        } else {
            Ok(d)
        }
    };
    if let Some(d) = o.get("floor") {
        let field = format!("{at}.floor");
        outlier.floor = at_most_an_hour(duration(d, &field)?, field)?;
    }
    if let Some(d) = o.get("window") {
        let field = format!("{at}.window");
        outlier.window = at_most_an_hour(positive_duration(d, &field)?, field)?;
    }
    if let Some(d) = o.get("interval") {
        let field = format!("{at}.interval");
        outlier.interval = at_most_an_hour(positive_duration(d, &field)?, field)?;
    }
    if let Some(n) = o.get("minSamples") {
        let field = format!("{at}.minSamples");
        let n = number(n, &field)?;
        if n.fract() != 0.0 || n < 1.0 {
            return Err(error(&field, "must be a whole number, at least 1"));
        }
        outlier.min_samples = n as u64;
    }
    Ok(outlier)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERGUIDE: &str = r#"{
      "methodConfig": [
        {"name": [{"service": "userguide.v1.UserGuideService"}], "timeout": "2.5s",
         "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 8]}},
        {"name": [{"service": "userguide.v1.UserGuideService", "method": "ListUsers"}],
         "hedgingPolicy": {"maxAttempts": 9, "hedgingDelay": "0.005s"}},
        {"name": [{}], "timeout": "30s"}
      ],
      "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.12345},
      "loadBalancingConfig": [{"weighted_target_experimental": {}}, {"meshlb_p2c": {"outlierEjection": {"factor": 4}}}]
    }"#;

    #[test]
    fn random_subsetting_wraps_a_policy_and_sizes_the_subset() {
        let config = ServiceConfig::from_json(
            r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 7,
                "childPolicy": [{"some_other": {}}, {"round_robin": {}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(config.load_balancing, Some(LoadBalancing::RoundRobin));
        assert_eq!(config.subset_size, Some(7));
        // grpc-go's and grpc-java's name.
        let config = ServiceConfig::from_json(
            r#"{"loadBalancingConfig": [{"random_subsetting_experimental":
                {"subsetSize": 20, "childPolicy": [{"meshlb_p2c": {}}]}}]}"#,
        )
        .unwrap();
        assert!(matches!(config.load_balancing, Some(LoadBalancing::P2c(_))));
        assert_eq!(config.subset_size, Some(20));
        assert_eq!(ServiceConfig::from_json("{}").unwrap().subset_size, None);
    }

    #[test]
    fn reads_every_part_and_picks_the_most_specific_name() {
        let config = ServiceConfig::from_json(USERGUIDE).unwrap();
        let get = config
            .method("/userguide.v1.UserGuideService/GetPoint")
            .unwrap();
        assert_eq!(get.timeout, Some(Duration::from_millis(2500)));
        let retry = get.retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, 3);
        assert_eq!(
            retry.retryable_codes,
            vec![Code::Unavailable, Code::ResourceExhausted]
        );
        assert_eq!(retry.backoff_bound(2), Duration::from_millis(10));
        assert_eq!(retry.backoff_bound(3), Duration::from_millis(20));
        assert_eq!(retry.backoff_bound(9), Duration::from_millis(100));
        let list = config
            .method("/userguide.v1.UserGuideService/ListUsers")
            .unwrap();
        let hedge = list.hedging.as_ref().unwrap();
        assert_eq!(hedge.max_attempts, MAX_ATTEMPTS, "capped");
        assert_eq!(hedge.hedging_delay, Duration::from_millis(5));
        assert!(list.retry.is_none());
        let other = config.method("/grpc.health.v1.Health/Check").unwrap();
        assert_eq!(other.timeout, Some(Duration::from_secs(30)));
        assert!(other.retry.is_none());
        let throttling = config.retry_throttling.unwrap();
        assert_eq!(
            (throttling.max_tokens, throttling.token_ratio),
            (10.0, 0.123)
        );
        match config.load_balancing {
            Some(LoadBalancing::P2c(o)) => assert_eq!(o.factor, 4.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_config_and_no_default_entry_mean_no_policy() {
        assert!(ServiceConfig::default().method("/a.B/C").is_none());
        let config =
            ServiceConfig::from_json(r#"{"methodConfig":[{"name":[{"service":"a.B"}]}]}"#).unwrap();
        assert!(config.method("/a.B/C").is_some());
        assert!(config.method("/x.Y/Z").is_none());
        assert_eq!(
            ServiceConfig::from_json(r#"{"loadBalancingPolicy":"round_robin"}"#)
                .unwrap()
                .load_balancing,
            Some(LoadBalancing::RoundRobin)
        );
    }

    #[test]
    fn the_health_check_service_is_read() {
        let config =
            ServiceConfig::from_json(r#"{"healthCheckConfig": {"serviceName": "a.B"}}"#).unwrap();
        assert_eq!(config.health_check_service.as_deref(), Some("a.B"));
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            ("[]", "(the document)", "must be an object"),
            ("{", "(the document)", "EOF"),
            (r#"{"methodconfig": []}"#, "methodconfig", "unknown field"),
            (
                r#"{"methodConfig": [{"timeout": "1s"}]}"#,
                "methodConfig[0].name",
                "is required",
            ),
            (
                r#"{"methodConfig": [{"name": [{"method": "M"}]}]}"#,
                "methodConfig[0].name[0]",
                "needs its service",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "timeout": "1m"}]}"#,
                "methodConfig[0].timeout",
                "not a duration",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
                "methodConfig[0].retryPolicy.maxAttempts",
                "at least 2",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
                "methodConfig[0].retryPolicy.initialBackoff",
                "more than 0s",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": []}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes",
                "at least one",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVALABLE"]}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
                "not a status code",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes",
                "is required",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [14]}, "hedgingPolicy": {"maxAttempts": 2}}]}"#,
                "methodConfig[0].hedgingPolicy",
                "not both",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a.B"}]}, {"name": [{"service": "a.B"}]}]}"#,
                "methodConfig[1].name[0]",
                "already named",
            ),
            (
                r#"{"retryThrottling": {"maxTokens": 0, "tokenRatio": 1}}"#,
                "retryThrottling.maxTokens",
                "more than 0",
            ),
            (
                r#"{"retryThrottling": {"maxTokens": 10}}"#,
                "retryThrottling.tokenRatio",
                "is required",
            ),
            (
                r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.0005}}"#,
                "retryThrottling.tokenRatio",
                "at least 0.001",
            ),
            (
                r#"{"loadBalancingConfig": [{"meshlb_p2c": {"outlierEjection": {"factor": 1e30}}}]}"#,
                "loadBalancingConfig[0].meshlb_p2c.outlierEjection.factor",
                "at most 1000",
            ),
            (
                r#"{"loadBalancingConfig": [{"meshlb_p2c": {"outlierEjection": {"floor": "99999s"}}}]}"#,
                "loadBalancingConfig[0].meshlb_p2c.outlierEjection.floor",
                "at most 3600s",
            ),
            (
                r#"{"loadBalancingConfig": [{"grpclb": {}}]}"#,
                "loadBalancingConfig",
                "no policy",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 0, "childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting.subsetSize",
                "whole number",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 2.5, "childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting.subsetSize",
                "whole number",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 3}}]}"#,
                "loadBalancingConfig[0].random_subsetting.childPolicy",
                "is required",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 9, "childPolicy": [{"random_subsetting_experimental": {"subsetSize": 3, "childPolicy": [{"round_robin": {}}]}}, {"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting.childPolicy[0].random_subsetting_experimental",
                "may not wrap itself",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting_experimental": {"childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting_experimental.subsetSize",
                "is required",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 2, "childPolicy": [{"round_robin": {}}], "size": 3}}]}"#,
                "loadBalancingConfig[0].random_subsetting.size",
                "unknown",
            ),
            (
                r#"{"loadBalancingConfig": [{"meshlb_p2c": {"outlierEjection": {"factor": 0.5}}}]}"#,
                "loadBalancingConfig[0].meshlb_p2c.outlierEjection.factor",
                "more than 1",
            ),
        ];
        for (json, field, says) in cases {
            let e = ServiceConfig::from_json(json).expect_err(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.message.contains(says), "{json}: {e}");
        }
    }
}
