//! gRPC wire conventions that both sides use: the `grpc-timeout` header and the canonical names of
//! status codes. No client or server logic here.

use std::time::Duration;
use tonic::Code;

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a `grpc-timeout` header value, in milliseconds (at least 1).
pub fn timeout_value(left: Duration) -> http::HeaderValue {
    let millis = left.as_millis().clamp(1, 99_999_999);
    // Digits and one ASCII letter are always a valid header value.
    http::HeaderValue::from_str(&format!("{millis}m"))
        .unwrap_or(http::HeaderValue::from_static("1m"))
}

/// The gRPC code's canonical name, e.g. `NOT_FOUND`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut h = http::HeaderMap::new();
        for (v, want) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("12x", None),
            ("m", None),
            ("123456789S", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(timeout(&h), want, "{v}");
        }
    }

    #[test]
    fn encodes_what_it_parses() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", timeout_value(Duration::from_millis(250)));
        assert_eq!(timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", timeout_value(Duration::ZERO));
        assert_eq!(timeout(&h), Some(Duration::from_millis(1)));
    }
}
