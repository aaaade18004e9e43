//! gRPC wire conventions that both sides use: the `grpc-timeout` header, server pushback, the
//! canonical names of status codes, how much caller input a message may repeat, and prost's codec
//! with buffers of a chosen size. No client or server logic here.

use std::time::Duration;
use tonic::Code;

/// A `grpc-timeout` header that is present but not what the spec allows (1 to 8 ASCII digits and
/// one unit of H M S m u n). gRPC servers answer such a call with `INTERNAL`, as grpc-go does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed grpc-timeout {0:?}: expected 1 to 8 digits and a unit (H, M, S, m, u or n)")]
pub struct MalformedTimeout(pub String);

/// The `grpc-timeout` header's name. A constant, because a name made from a string at run time
/// is parsed, and (not being one of HTTP's standard names) copied, on every call.
pub const TIMEOUT_HEADER: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` header: `None` when there is none.
pub fn timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, MalformedTimeout> {
    let Some(raw) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let malformed = || {
        let shown = String::from_utf8_lossy(raw.as_bytes());
        MalformedTimeout(crate::grpc::bounded(&shown, 32))
    };
    let value = raw.to_str().map_err(|_| malformed())?;
    if value.len() < 2 || value.len() > 9 {
        return Err(malformed());
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let n: u64 = digits.parse().map_err(|_| malformed())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(malformed()),
    }))
}

/// Caller input cut to at most `max` characters (with an ellipsis), for messages that repeat it:
/// an answer's `grpc-message` must stay far below the header-size limits clients enforce.
pub fn bounded(input: &str, max: usize) -> String {
    match input.char_indices().nth(max) {
        None => input.to_owned(),
        Some((end, _)) => format!("{}…", &input[..end]),
    }
}

/// Encodes a `grpc-timeout` header value, in milliseconds (at least 1).
pub fn timeout_value(left: Duration) -> http::HeaderValue {
    let mut millis = left.as_millis().clamp(1, 99_999_999);
    // At most 8 digits and the unit, written from the right (no formatter on the call path).
    let mut text = [b'm'; 9];
    let mut start = 8;
    while millis > 0 {
        start -= 1;
        text[start] = b'0' + (millis % 10) as u8;
        millis /= 10;
    }
    // Digits and one ASCII letter are always a valid header value.
    let value = http::HeaderValue::from_bytes(&text[start..])
        .unwrap_or(http::HeaderValue::from_static("1m"));
    never_indexed(value)
}

/// Marks a header value that is new on almost every call (a deadline, a trace id) so that
/// HPACK sends it as a literal, never indexed. Indexed, each would take a slot of the
/// connection's table for a value never sent again, evicting the headers that do repeat, and
/// every later call's lookup would walk the chain of them (measured: the dynamic table's
/// search and its `memcmp` were the largest cost tracing added to a call).
pub fn never_indexed(mut value: http::HeaderValue) -> http::HeaderValue {
    value.set_sensitive(true);
    value
}

/// The header of a server's pushback.
pub const PUSHBACK_HEADER: http::HeaderName =
    http::HeaderName::from_static("grpc-retry-pushback-ms");
/// The header of a call's status.
pub const STATUS_HEADER: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// A server's `grpc-retry-pushback-ms` (gRPC's retry design, A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long before the next attempt, and send this endpoint nothing meanwhile.
    Wait(Duration),
    /// Negative or malformed: do not retry this call.
    DoNotRetry,
}

impl Pushback {
    /// The pushback an answer's headers (or trailers) carry, if any.
    pub fn of(headers: &http::HeaderMap) -> Option<Self> {
        let value = headers.get(PUSHBACK_HEADER)?;
        Some(
            match value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                Some(ms) => Pushback::Wait(Duration::from_millis(ms.min(MAX_PUSHBACK_MS))),
                None => Pushback::DoNotRetry,
            },
        )
    }
}

/// A pushback longer than this is read as this: a misconfigured server must not park an endpoint
/// for hours.
const MAX_PUSHBACK_MS: u64 = 30_000;

/// How many status codes gRPC has (`OK` = 0 to `UNAUTHENTICATED` = 16).
pub const CODE_COUNT: usize = 17;

/// Latency histogram buckets for metrics, in seconds: sub-millisecond resolution up to 10 s (and
/// 30 s, 60 s), for the replica's and the balancer's histograms alike.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The code as go-grpc-prometheus labels it (`OK`, `Canceled`, `NotFound`): the convention of
/// every `grpc_code` label meshlb exports.
pub fn metric_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
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

/// prost's codec with buffers of the size the caller knows it needs, where tonic's default (8 KiB
/// each way, grown by doubling) is too much for a message that lives long, or too little for a
/// large one.
#[derive(Debug)]
pub(crate) struct SizedCodec<E, D> {
    encode: tonic::codec::BufferSettings,
    decode: tonic::codec::BufferSettings,
    messages: std::marker::PhantomData<fn(E) -> D>,
}

impl<E, D> SizedCodec<E, D> {
    pub(crate) fn new(
        encode: tonic::codec::BufferSettings,
        decode: tonic::codec::BufferSettings,
    ) -> Self {
        SizedCodec {
            encode,
            decode,
            messages: std::marker::PhantomData,
        }
    }
}

impl<E, D> tonic::codec::Codec for SizedCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = tonic_prost::ProstEncoder<E>;
    type Decoder = tonic_prost::ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<E, D>::raw_encoder(self.encode)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<E, D>::raw_decoder(self.decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut h = http::HeaderMap::new();
        assert_eq!(timeout(&h), Ok(None));
        for (v, want) in [
            ("100m", Duration::from_millis(100)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("5u", Duration::from_micros(5)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(timeout(&h), Ok(Some(want)), "{v}");
        }
    }

    #[test]
    fn rejects_malformed_grpc_timeouts() {
        let mut h = http::HeaderMap::new();
        for v in [
            "12x",
            "m",
            "123456789S",
            "99999999999999H",
            "-1S",
            "+1S",
            "abc",
            "1.5S",
            " 1S",
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            let err = timeout(&h).unwrap_err();
            assert!(err.to_string().contains("malformed grpc-timeout"), "{v}");
        }
    }

    #[test]
    fn bounds_echoed_input() {
        assert_eq!(bounded("james", 128), "james");
        let long = "x".repeat(17_000);
        let cut = bounded(&long, 128);
        assert_eq!(cut.chars().count(), 129);
        assert!(cut.ends_with('…'));
        // Never splits a character.
        assert_eq!(bounded("ééé", 2), "éé…");
    }

    #[test]
    fn encodes_what_it_parses() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", timeout_value(Duration::from_millis(250)));
        assert_eq!(timeout(&h), Ok(Some(Duration::from_millis(250))));
        h.insert("grpc-timeout", timeout_value(Duration::ZERO));
        assert_eq!(timeout(&h), Ok(Some(Duration::from_millis(1))));
        for millis in [1, 9, 10, 99, 100, 1234, 10_000, 98_765_432, 99_999_999] {
            let value = timeout_value(Duration::from_millis(millis));
            assert_eq!(value, format!("{millis}m").as_str());
        }
        // Eight digits at most, as the spec allows: a longer wait is sent as the longest.
        let value = timeout_value(Duration::from_secs(10 * 86_400 * 365));
        assert_eq!(value, "99999999m");
    }

    #[test]
    fn a_deadline_is_never_indexed_by_hpack() {
        assert!(timeout_value(Duration::from_millis(250)).is_sensitive());
    }
}
