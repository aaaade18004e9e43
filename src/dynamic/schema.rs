//! Where a service's descriptors come from: the server itself (gRPC server reflection, v1, then
//! v1alpha for older servers), a `.proto` file compiled at run time (protox, the compiler the
//! build uses), or a `FileDescriptorSet` file. Resolves `package.Service/Method` to its
//! descriptor, and names what exists when it does not.
//!
//! Knows descriptors and the reflection protocol; nothing of JSON or of how calls are balanced.

use crate::load::Transport;
use prost::Message as _;
use prost_reflect::prost_types::FileDescriptorProto;
use prost_reflect::{DescriptorPool, MethodDescriptor, ServiceDescriptor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tonic_reflection::pb::v1::{
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    ServerReflectionRequest, ServerReflectionResponse,
};

/// Reflection's paths, newest first. v1alpha's messages are v1's under another name.
const REFLECTION_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Where to get descriptors from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Ask the server (gRPC server reflection).
    Reflection,
    /// Compile these `.proto` files, importing from these directories (each file's own directory
    /// when none is given).
    Proto {
        /// The files.
        files: Vec<PathBuf>,
        /// The import paths.
        imports: Vec<PathBuf>,
    },
    /// Read an encoded `FileDescriptorSet` (`protoc --descriptor_set_out --include_imports`).
    Protoset(PathBuf),
}

/// Why descriptors could not be had, or a name is not in them.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A `.proto` file did not compile (protox's `file:line:column: message`).
    #[error("{0}")]
    Proto(String),
    /// A file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A descriptor set that is not one, or descriptors that do not fit together.
    #[error("{what}: {error}")]
    Descriptors {
        /// Where they came from.
        what: String,
        /// What is wrong.
        error: String,
    },
    /// `--call` is not `package.Service/Method`.
    #[error("expected package.Service/Method, got {0:?}")]
    BadName(String),
    /// No such service.
    #[error("unknown service {name}; {}", listing("services", known))]
    UnknownService {
        /// The name asked for.
        name: String,
        /// The services there are.
        known: Vec<String>,
    },
    /// No such method in the service.
    #[error("unknown method {method} of {service}; {}", listing("methods", known))]
    UnknownMethod {
        /// The service.
        service: String,
        /// The method asked for.
        method: String,
        /// Its methods.
        known: Vec<String>,
    },
    /// No such service, message or enum.
    #[error("unknown symbol {0}")]
    UnknownSymbol(String),
    /// The server does not speak reflection.
    #[error("the server has no reflection service (v1 or v1alpha); give its schema with --proto FILE or --protoset FILE")]
    NoReflection,
    /// Reflection failed (the call itself, or the server's error answer).
    #[error("server reflection failed: {0}")]
    Reflection(String),
}

fn listing(what: &str, names: &[String]) -> String {
    if names.is_empty() {
        format!("there are no {what}")
    } else {
        format!("there are: {}", names.join(", "))
    }
}

/// Descriptors, and the services the server (or the files) offer.
#[derive(Debug, Clone)]
pub struct Schema {
    pool: DescriptorPool,
    services: Vec<String>,
}

impl Schema {
    /// Compiles `files`, importing from `imports` (each file's directory when empty).
    pub fn from_proto(files: &[PathBuf], imports: &[PathBuf]) -> Result<Self, SchemaError> {
        let imports: Vec<PathBuf> = if imports.is_empty() {
            let dirs: BTreeSet<PathBuf> = files
                .iter()
                .map(|f| match f.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                    _ => PathBuf::from("."),
                })
                .collect();
            dirs.into_iter().collect()
        } else {
            imports.to_vec()
        };
        let mut compiler = protox::Compiler::new(&imports).map_err(proto_error)?;
        compiler.include_imports(true);
        compiler.open_files(files).map_err(proto_error)?;
        Ok(Self::of_pool(compiler.descriptor_pool()))
    }

    /// Reads an encoded `FileDescriptorSet`.
    pub fn from_protoset(path: &Path) -> Result<Self, SchemaError> {
        let bytes = std::fs::read(path).map_err(|error| SchemaError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let pool =
            DescriptorPool::decode(bytes.as_slice()).map_err(|e| SchemaError::Descriptors {
                what: format!("{} is not a usable FileDescriptorSet", path.display()),
                error: e.to_string(),
            })?;
        Ok(Self::of_pool(pool))
    }

    /// Asks the server through `transport`: the services it lists and, for `services` (all of
    /// them when `None`), their files and every file they import.
    pub async fn from_reflection<T: Transport>(
        transport: T,
        services: Option<&[&str]>,
    ) -> Result<Self, SchemaError> {
        let mut opened = None;
        for path in REFLECTION_PATHS {
            match Session::open(transport.clone(), path).await {
                Ok(s) => {
                    opened = Some(s);
                    break;
                }
                Err(status) if status.code() == Code::Unimplemented => continue,
                Err(status) => return Err(reflection_failed(&status)),
            }
        }
        let Some((mut session, listed)) = opened else {
            return Err(SchemaError::NoReflection);
        };
        let wanted: Vec<String> = match services {
            Some(names) => {
                for name in names {
                    if !listed.iter().any(|s| s == name) {
                        return Err(SchemaError::UnknownService {
                            name: (*name).to_owned(),
                            known: listed,
                        });
                    }
                }
                names.iter().map(|s| (*s).to_owned()).collect()
            }
            None => listed.clone(),
        };
        let files = session.files_for(&wanted).await?;
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(files)
            .map_err(|e| SchemaError::Descriptors {
                what: "the server's descriptors".into(),
                error: e.to_string(),
            })?;
        Ok(Self {
            pool,
            services: listed,
        })
    }

    /// Descriptors from `source`; reflection asks only for `service` when given.
    pub async fn load<T: Transport>(
        source: &Source,
        transport: T,
        service: Option<&str>,
    ) -> Result<Self, SchemaError> {
        match source {
            Source::Reflection => {
                let services = service.map(|s| [s]);
                Self::from_reflection(transport, services.as_ref().map(|s| &s[..])).await
            }
            Source::Proto { files, imports } => Self::from_proto(files, imports),
            Source::Protoset(path) => Self::from_protoset(path),
        }
    }

    fn of_pool(pool: DescriptorPool) -> Self {
        let services = pool.services().map(|s| s.full_name().to_owned()).collect();
        Self { pool, services }
    }

    /// Every descriptor known.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The services on offer, by full name.
    pub fn service_names(&self) -> &[String] {
        &self.services
    }

    /// A service by full name.
    pub fn service(&self, name: &str) -> Result<ServiceDescriptor, SchemaError> {
        self.pool
            .get_service_by_name(name)
            .filter(|_| self.services.iter().any(|s| s == name))
            .ok_or_else(|| SchemaError::UnknownService {
                name: name.to_owned(),
                known: self.services.clone(),
            })
    }

    /// `package.Service/Method` (or `package.Service.Method`).
    pub fn method(&self, name: &str) -> Result<MethodDescriptor, SchemaError> {
        let (service, method) = split_method(name)?;
        let service = self.service(service)?;
        let found = service.methods().find(|m| m.name() == method);
        found.ok_or_else(|| SchemaError::UnknownMethod {
            service: service.full_name().to_owned(),
            method: method.to_owned(),
            known: service.methods().map(|m| m.name().to_owned()).collect(),
        })
    }

    /// A service, message or enum written out as in a `.proto` file.
    pub fn describe(&self, symbol: &str) -> Result<String, SchemaError> {
        if let Ok(service) = self.service(symbol) {
            let mut out = format!("service {} {{\n", service.full_name());
            for m in service.methods() {
                out.push_str(&format!("  {}\n", signature(&m)));
            }
            out.push('}');
            return Ok(out);
        }
        if let Some(message) = self.pool.get_message_by_name(symbol) {
            let mut out = format!("message {} {{\n", message.full_name());
            for f in message.fields() {
                out.push_str(&format!(
                    "  {}{} {} = {};\n",
                    label(&f),
                    kind_name(&f.kind()),
                    f.name(),
                    f.number()
                ));
            }
            out.push('}');
            return Ok(out);
        }
        if let Some(e) = self.pool.get_enum_by_name(symbol) {
            let mut out = format!("enum {} {{\n", e.full_name());
            for v in e.values() {
                out.push_str(&format!("  {} = {};\n", v.name(), v.number()));
            }
            out.push('}');
            return Ok(out);
        }
        if let Ok(m) = self.method(symbol) {
            return Ok(signature(&m));
        }
        Err(SchemaError::UnknownSymbol(symbol.to_owned()))
    }
}

/// `rpc M(In) returns (stream Out);`
pub fn signature(m: &MethodDescriptor) -> String {
    let stream = |yes: bool| if yes { "stream " } else { "" };
    format!(
        "rpc {}({}{}) returns ({}{});",
        m.name(),
        stream(m.is_client_streaming()),
        m.input().full_name(),
        stream(m.is_server_streaming()),
        m.output().full_name()
    )
}

fn label(f: &prost_reflect::FieldDescriptor) -> &'static str {
    if f.is_map() {
        ""
    } else if f.is_list() {
        "repeated "
    } else if f.supports_presence()
        && f.containing_oneof().is_none()
        && !matches!(f.kind(), prost_reflect::Kind::Message(_))
    {
        "optional "
    } else {
        ""
    }
}

fn kind_name(kind: &prost_reflect::Kind) -> String {
    use prost_reflect::Kind;
    match kind {
        Kind::Message(m) if m.is_map_entry() => {
            let key = m.map_entry_key_field().kind();
            let value = m.map_entry_value_field().kind();
            format!("map<{}, {}>", kind_name(&key), kind_name(&value))
        }
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `package.Service/Method` → (`package.Service`, `Method`); a dot before the method works too.
pub fn split_method(name: &str) -> Result<(&str, &str), SchemaError> {
    let name = name.strip_prefix('/').unwrap_or(name);
    let at = name.rfind('/').or_else(|| name.rfind('.'));
    match at {
        Some(i) if i > 0 && i + 1 < name.len() => Ok((&name[..i], &name[i + 1..])),
        _ => Err(SchemaError::BadName(name.to_owned())),
    }
}

/// The request path of a method: `/package.Service/Method`.
pub fn path_of(m: &MethodDescriptor) -> Result<PathAndQuery, SchemaError> {
    let path = format!("/{}/{}", m.parent_service().full_name(), m.name());
    path.parse()
        .map_err(|_| SchemaError::BadName(path.trim_start_matches('/').to_owned()))
}

fn proto_error(e: protox::Error) -> SchemaError {
    // protox's Debug form is the one with `file:line:column:`.
    SchemaError::Proto(format!("{e:?}"))
}

fn reflection_failed(status: &Status) -> SchemaError {
    SchemaError::Reflection(format!(
        "{}: {}",
        crate::grpc::code_name(status.code()),
        status.message()
    ))
}

/// One reflection stream: a request, then its answer, in turn.
struct Session {
    tx: tokio::sync::mpsc::Sender<ServerReflectionRequest>,
    rx: tonic::Streaming<ServerReflectionResponse>,
}

fn request(message: MessageRequest) -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    }
}

impl Session {
    /// Opens the stream at `path` with a `ListServices` request (some servers send their
    /// headers only once a request arrived) and returns the services it lists.
    async fn open<T: Transport>(
        transport: T,
        path: &'static str,
    ) -> Result<(Self, Vec<String>), Status> {
        let (tx, requests) = tokio::sync::mpsc::channel(4);
        let mut grpc = tonic::client::Grpc::new(transport);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))?;
        let codec =
            tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
        tx.send(request(MessageRequest::ListServices(String::new())))
            .await
            .map_err(|_| Status::internal("the reflection request stream closed"))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(requests);
        let response = grpc
            .streaming(
                tonic::Request::new(stream),
                PathAndQuery::from_static(path),
                codec,
            )
            .await?;
        let mut session = Self {
            tx,
            rx: response.into_inner(),
        };
        let services = match session.answer().await? {
            MessageResponse::ListServicesResponse(list) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => return Err(unexpected(&other)),
        };
        Ok((session, services))
    }

    async fn answer(&mut self) -> Result<MessageResponse, Status> {
        match self.rx.message().await? {
            Some(ServerReflectionResponse {
                message_response: Some(m),
                ..
            }) => Ok(m),
            Some(_) => Err(Status::internal("an empty reflection answer")),
            None => Err(Status::internal("the reflection stream ended early")),
        }
    }

    async fn ask(&mut self, message: MessageRequest) -> Result<MessageResponse, Status> {
        self.tx
            .send(request(message))
            .await
            .map_err(|_| Status::internal("the reflection request stream closed"))?;
        self.answer().await
    }

    /// The files that define `symbols`, and every file they import, by name.
    async fn files_for(
        &mut self,
        symbols: &[String],
    ) -> Result<Vec<FileDescriptorProto>, SchemaError> {
        let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
        let mut missing: Vec<MessageRequest> = symbols
            .iter()
            .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
            .collect();
        while let Some(ask) = missing.pop() {
            let answer = self.ask(ask).await.map_err(|s| reflection_failed(&s))?;
            let encoded = match answer {
                MessageResponse::FileDescriptorResponse(r) => r.file_descriptor_proto,
                MessageResponse::ErrorResponse(e) => {
                    return Err(SchemaError::Reflection(format!(
                        "{}: {}",
                        crate::grpc::code_name(Code::from_i32(e.error_code)),
                        e.error_message
                    )))
                }
                other => return Err(reflection_failed(&unexpected(&other))),
            };
            for bytes in encoded {
                let file = FileDescriptorProto::decode(bytes.as_slice()).map_err(|e| {
                    SchemaError::Descriptors {
                        what: "the server's descriptors".into(),
                        error: e.to_string(),
                    }
                })?;
                files.insert(file.name().to_owned(), file);
            }
            // Imports the server did not send along.
            for file in files.values() {
                for dep in &file.dependency {
                    let asked = missing
                        .iter()
                        .any(|m| matches!(m, MessageRequest::FileByFilename(n) if n == dep));
                    if !files.contains_key(dep) && !asked {
                        missing.push(MessageRequest::FileByFilename(dep.clone()));
                    }
                }
            }
        }
        Ok(files.into_values().collect())
    }
}

fn unexpected(answer: &MessageResponse) -> Status {
    Status::internal(format!("an unexpected reflection answer: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_slash_or_the_last_dot() {
        assert_eq!(split_method("a.b.S/M").unwrap(), ("a.b.S", "M"));
        assert_eq!(split_method("/a.b.S/M").unwrap(), ("a.b.S", "M"));
        assert_eq!(split_method("a.b.S.M").unwrap(), ("a.b.S", "M"));
        for bad in ["", "M", "S/", "/M", "."] {
            assert!(split_method(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn imports_come_from_the_import_path() {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("meshlb-schema-{}-{n}", std::process::id()));
        let (api, common) = (root.join("api"), root.join("shared/common"));
        std::fs::create_dir_all(&api).unwrap();
        std::fs::create_dir_all(&common).unwrap();
        std::fs::write(
            common.join("money.proto"),
            "syntax = \"proto3\";\npackage common;\nmessage Money { int64 cents = 1; }\n",
        )
        .unwrap();
        std::fs::write(
            api.join("shop.proto"),
            "syntax = \"proto3\";\npackage shop.v1;\nimport \"common/money.proto\";\n\
             import \"google/protobuf/empty.proto\";\n\
             service Shop { rpc Price(google.protobuf.Empty) returns (common.Money); }\n",
        )
        .unwrap();
        let file = api.join("shop.proto");
        // Without the import path the import is not found, and the error says which.
        let e = Schema::from_proto(std::slice::from_ref(&file), &[]).unwrap_err();
        assert!(e.to_string().contains("common/money.proto"), "{e}");
        let schema = Schema::from_proto(&[file], &[api.clone(), root.join("shared")]).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        let price = schema.method("shop.v1.Shop/Price").unwrap();
        assert_eq!(price.output().full_name(), "common.Money");
        assert_eq!(schema.service_names(), ["shop.v1.Shop"]);
        assert_eq!(
            schema.describe("shop.v1.Shop.Price").unwrap(),
            "rpc Price(google.protobuf.Empty) returns (common.Money);"
        );
        let e = schema.method("shop.v1.Shop/Cost").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown method Cost of shop.v1.Shop; there are: Price"
        );
    }
}
