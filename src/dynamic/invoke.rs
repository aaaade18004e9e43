//! One call to a method known by its descriptor, of any of the four kinds (unary, server
//! streaming, client streaming, both), with request metadata. The load generator makes the same
//! call over and over ([`Invocation::once`]); `meshlb call` keeps the answers ([`Invocation::call`]).
//!
//! Knows descriptors and tonic's client; nothing of JSON or of where descriptors came from.

use super::codec::DynamicCodec;
use crate::balance::{Attempts, ServedBy};
use crate::load::Transport;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use std::net::SocketAddr;
use std::time::Duration;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{
    AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataKey, BinaryMetadataValue, MetadataMap,
};
use tonic::Status;

/// The four kinds of gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One request, one answer.
    Unary,
    /// One request, a stream of answers.
    ServerStreaming,
    /// A stream of requests, one answer.
    ClientStreaming,
    /// Streams both ways.
    Bidi,
}

impl Kind {
    /// Whether a call sends one request message (unary, server streaming).
    pub fn takes_one_request(self) -> bool {
        matches!(self, Kind::Unary | Kind::ServerStreaming)
    }

    /// The kind of `method`.
    pub fn of(method: &MethodDescriptor) -> Self {
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => Kind::Unary,
            (false, true) => Kind::ServerStreaming,
            (true, false) => Kind::ClientStreaming,
            (true, true) => Kind::Bidi,
        }
    }
}

/// A header given as `key: value` that gRPC metadata cannot carry.
#[derive(Debug, thiserror::Error)]
#[error("bad header {0:?}: expected 'key: value' with an ASCII name and value (base64 for a key ending in -bin)")]
pub struct BadHeader(String);

/// Request metadata from `key: value` lines. A key ending in `-bin` is binary metadata, its value
/// given in base64 (padded or not), as grpcurl takes it; it is sent as the bytes it stands for.
pub fn metadata(headers: &[String]) -> Result<MetadataMap, BadHeader> {
    use base64::Engine as _;
    let mut map = MetadataMap::new();
    for h in headers {
        let bad = || BadHeader(h.clone());
        let (k, v) = h.split_once(':').ok_or_else(bad)?;
        let (k, v) = (k.trim(), v.trim());
        if k.to_ascii_lowercase().ends_with("-bin") {
            let key: BinaryMetadataKey = k.parse().map_err(|_| bad())?;
            // Standard or URL-safe alphabet, as grpcurl takes either.
            let unpadded = v.trim_end_matches('=');
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(unpadded)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(unpadded))
                .map_err(|_| bad())?;
            map.append_bin(key, BinaryMetadataValue::from_bytes(&bytes));
        } else {
            let key: AsciiMetadataKey = k.parse().map_err(|_| bad())?;
            let value: AsciiMetadataValue = v.parse().map_err(|_| bad())?;
            map.append(key, value);
        }
    }
    Ok(map)
}

/// A method, the requests to send it and the metadata to send with them.
#[derive(Debug, Clone)]
pub struct Invocation {
    method: MethodDescriptor,
    path: PathAndQuery,
    requests: Vec<DynamicMessage>,
    metadata: MetadataMap,
}

/// What a call got back.
#[derive(Debug)]
pub struct Answer {
    /// How many answers came.
    pub messages: usize,
    /// The answer's headers.
    pub metadata: MetadataMap,
    /// The endpoint that served it, when the balancer made the call.
    pub served_by: Option<SocketAddr>,
    /// A status that ended a stream after it had answered.
    pub ended: Option<Status>,
}

/// Who served a call: `x-replica-id` when the server says, else the endpoint's address.
pub fn server_of(metadata: &MetadataMap, addr: Option<SocketAddr>) -> Option<String> {
    metadata
        .get("x-replica-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| addr.map(|a| a.to_string()))
}

/// What [`Invocation::once`] tells the load generator.
#[derive(Debug)]
pub struct Served {
    /// The answer's headers.
    pub metadata: MetadataMap,
    /// The endpoint.
    pub addr: Option<SocketAddr>,
    /// Tries the balancer made.
    pub attempts: u32,
}

impl Invocation {
    /// `requests` to `method` with `metadata`. A unary or server-streaming method takes its
    /// requests one per call (a load cycles through them); a client-streaming one sends them all.
    pub fn new(
        method: MethodDescriptor,
        requests: Vec<DynamicMessage>,
        metadata: MetadataMap,
    ) -> Result<Self, super::SchemaError> {
        let path = super::schema::path_of(&method)?;
        Ok(Self {
            method,
            path,
            requests,
            metadata,
        })
    }

    /// The method.
    pub fn method(&self) -> &MethodDescriptor {
        &self.method
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        Kind::of(&self.method)
    }

    /// How many request messages it has.
    pub fn requests(&self) -> usize {
        self.requests.len()
    }

    fn request<M>(&self, message: M, timeout: Option<Duration>) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        request
    }

    fn nth(&self, n: u64) -> DynamicMessage {
        match self.requests.len() {
            0 => DynamicMessage::new(self.method.input()),
            len => self.requests[(n % len as u64) as usize].clone(),
        }
    }

    /// Makes the call, handing each answer to `each` as it arrives (a stream may be long, or
    /// endless).
    pub async fn call<T: Transport>(
        &self,
        transport: T,
        timeout: Option<Duration>,
        each: &mut (dyn FnMut(&DynamicMessage) + Send),
    ) -> Result<Answer, Status> {
        let mut grpc = tonic::client::Grpc::new(transport);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))?;
        let codec = DynamicCodec::new(self.method.output());
        let path = self.path.clone();
        let all = || tokio_stream::iter(self.requests.clone());
        let single = |response: tonic::Response<DynamicMessage>,
                      each: &mut dyn FnMut(&DynamicMessage)| {
            let (metadata, message, extensions) = response.into_parts();
            each(&message);
            Answer {
                messages: 1,
                metadata,
                served_by: extensions.get::<ServedBy>().map(|s| s.0),
                ended: None,
            }
        };
        let (metadata, mut stream, extensions) = match self.kind() {
            Kind::Unary => {
                let r = grpc
                    .unary(self.request(self.nth(0), timeout), path, codec)
                    .await?;
                return Ok(single(r, each));
            }
            Kind::ClientStreaming => {
                let r = grpc
                    .client_streaming(self.request(all(), timeout), path, codec)
                    .await?;
                return Ok(single(r, each));
            }
            Kind::ServerStreaming => grpc
                .server_streaming(self.request(self.nth(0), timeout), path, codec)
                .await?
                .into_parts(),
            Kind::Bidi => grpc
                .streaming(self.request(all(), timeout), path, codec)
                .await?
                .into_parts(),
        };
        let mut answer = Answer {
            messages: 0,
            metadata,
            served_by: extensions.get::<ServedBy>().map(|s| s.0),
            ended: None,
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    answer.messages += 1;
                    each(&m);
                }
                Ok(None) => return Ok(answer),
                Err(status) => {
                    answer.ended = Some(status);
                    return Ok(answer);
                }
            }
        }
    }

    /// Call number `n` of a load (unary or server streaming, its answers read to the end and
    /// dropped). A failure after the headers is the call's status, with who served it.
    pub async fn once<T: Transport>(
        &self,
        grpc: &mut tonic::client::Grpc<T>,
        n: u64,
    ) -> Result<Served, (Status, Option<Served>)> {
        grpc.ready()
            .await
            .map_err(|e| (Status::unavailable(e.into().to_string()), None))?;
        let codec = DynamicCodec::new(self.method.output());
        let request = self.request(self.nth(n), None);
        let served = |metadata: MetadataMap, ext: &http::Extensions| Served {
            metadata,
            addr: ext.get::<ServedBy>().map(|s| s.0),
            attempts: ext.get::<Attempts>().map_or(1, |a| a.0),
        };
        if self.kind() == Kind::ServerStreaming {
            let response = grpc
                .server_streaming(request, self.path.clone(), codec)
                .await
                .map_err(|s| (s, None))?;
            let (metadata, mut stream, ext) = response.into_parts();
            let served = served(metadata, &ext);
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(served),
                    Err(status) => return Err((status, Some(served))),
                }
            }
        }
        let response = grpc
            .unary(request, self.path.clone(), codec)
            .await
            .map_err(|s| (s, None))?;
        let (metadata, _, ext) = response.into_parts();
        Ok(served(metadata, &ext))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_ascii_or_base64_binary() {
        let map = metadata(&[
            "x-user: james".into(),
            "x-trace-bin: AAEC/w==".into(),
            "x-raw-bin: AAEC/w".into(),
            "x-url-bin: AAEC_w".into(),
        ])
        .unwrap();
        assert_eq!(map.get("x-user").unwrap(), "james");
        for key in ["x-trace-bin", "x-raw-bin", "x-url-bin"] {
            let value = map.get_bin(key).unwrap().to_bytes().unwrap();
            assert_eq!(&value[..], &[0u8, 1, 2, 255], "{key}");
        }
        for bad in [
            "no colon",
            "x-bin: not base64!",
            "bad key: v",
            "x: line\nbreak",
        ] {
            let err = metadata(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains("bad header"), "{bad}: {err}");
        }
    }
}
