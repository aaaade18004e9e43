//! What `--call package.Service/Method` needs on every command that takes it: where the schema
//! comes from (`--proto`, `--import-path`, `--protoset`, else server reflection), the request
//! data (`-d`) and the headers (`-H`), turned into an [`Invocation`].

use super::UsageError;
use crate::dynamic::schema::{self, Schema, SchemaError, Source};
use crate::dynamic::{invoke, json, Invocation};
use crate::load::{CallKind, Transport};
use std::path::PathBuf;

/// `--call`: one of the UserGuide service's calls, or any method by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallChoice {
    /// get-point, list-users or mix.
    UserGuide(CallKind),
    /// `package.Service/Method`.
    Method(String),
}

impl std::str::FromStr for CallChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(kind) = s.parse::<CallKind>() {
            return Ok(CallChoice::UserGuide(kind));
        }
        match schema::split_method(s) {
            Ok(_) if s.contains('.') || s.contains('/') => Ok(CallChoice::Method(s.to_owned())),
            _ => Err(format!(
                "unknown call {s:?}: expected get-point, list-users, mix or package.Service/Method"
            )),
        }
    }
}

/// Where a schema comes from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SchemaArgs {
    /// Compile this .proto file for the schema instead of asking the server (repeatable).
    #[arg(long, env = "MESHLB_PROTO")]
    pub proto: Vec<PathBuf>,
    /// Where --proto's imports are found (repeatable; default: each file's own directory).
    #[arg(long, env = "MESHLB_IMPORT_PATH", requires = "proto")]
    pub import_path: Vec<PathBuf>,
    /// Read the schema from a FileDescriptorSet (`protoc --include_imports -o FILE`).
    #[arg(long, env = "MESHLB_PROTOSET", conflicts_with = "proto")]
    pub protoset: Option<PathBuf>,
}

impl SchemaArgs {
    /// The source these flags name: a file, else server reflection.
    pub fn source(&self) -> Source {
        match (&self.protoset, self.proto.is_empty()) {
            (Some(path), _) => Source::Protoset(path.clone()),
            (None, false) => Source::Proto {
                files: self.proto.clone(),
                imports: self.import_path.clone(),
            },
            (None, true) => Source::Reflection,
        }
    }
}

/// A method's request, headers and schema.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MethodArgs {
    /// With --call package.Service/Method: the request as JSON (`@FILE` reads a file, `@-`
    /// stdin); several messages (a JSON array, or one object per line) stream to a
    /// client-streaming method, or are cycled through by a load. Default: `{}`.
    #[arg(short = 'd', long = "data", env = "MESHLB_DATA")]
    pub data: Option<String>,
    /// A header (gRPC metadata) to send, `key: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    #[command(flatten)]
    pub schema: SchemaArgs,
}

impl MethodArgs {
    /// Whether any of these flags were given (they need `--call package.Service/Method`).
    pub fn given(&self) -> bool {
        self.data.is_some()
            || !self.headers.is_empty()
            || !self.schema.proto.is_empty()
            || self.schema.protoset.is_some()
    }

    /// The request text and the headers, read and checked before anything goes on the network
    /// (and before any deadline runs: reading `-d @-` waits for the writer).
    pub fn prepare(&self) -> Result<Prepared, UsageError> {
        Ok(Prepared {
            text: self.text()?,
            metadata: invoke::metadata(&self.headers).map_err(|e| UsageError(e.to_string()))?,
        })
    }

    fn text(&self) -> Result<String, UsageError> {
        let data = self.data.as_deref().unwrap_or("{}");
        match data.strip_prefix('@') {
            Some("-") => std::io::read_to_string(std::io::stdin())
                .map_err(|e| UsageError(format!("cannot read the request from stdin: {e}"))),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read the request from {path}: {e}"))),
            None => Ok(data.to_owned()),
        }
    }

    /// The call of `method`: its schema (from the server through `transport` unless a file is
    /// given, asked with the call's headers), the request messages and the headers.
    pub async fn invocation<T: Transport>(
        &self,
        prepared: Prepared,
        method: &str,
        transport: T,
    ) -> anyhow::Result<Invocation> {
        let (service, _) = schema::split_method(method).map_err(usage)?;
        let source = self.schema.source();
        let schema = Schema::load(&source, transport, Some(service), &prepared.metadata)
            .await
            .map_err(usage)?;
        let descriptor = schema.method(method).map_err(usage)?;
        let requests = json::messages(&descriptor.input(), &prepared.text)
            .map_err(|e| UsageError(format!("-d: {e}")))?;
        Invocation::new(descriptor, requests, prepared.metadata).map_err(usage)
    }
}

/// What `-d` and `-H` gave, read before the call.
#[derive(Debug)]
pub struct Prepared {
    text: String,
    metadata: tonic::metadata::MetadataMap,
}

/// A schema error as the command reports it: the user's (exit code 2) unless reflection failed on
/// the wire or the server's descriptors are unusable (exit code 1).
pub fn usage(error: SchemaError) -> anyhow::Error {
    match error {
        SchemaError::Reflection(_) | SchemaError::ServerDescriptors(_) => anyhow::Error::new(error),
        other => UsageError(other.to_string()).into(),
    }
}

/// The health service to watch for calls to `method`: UserGuide's own name, else the whole server
/// (`""`), which every grpc.health.v1 server answers.
pub fn health_service_for(method: &str) -> &'static str {
    match schema::split_method(method) {
        Ok((service, _)) if service == crate::proto::USERGUIDE_SERVICE => {
            crate::proto::USERGUIDE_SERVICE
        }
        _ => "",
    }
}
