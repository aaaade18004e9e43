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
use tonic::metadata::MetadataMap;
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
    /// The server's descriptors are not usable (garbage, missing imports, too many).
    #[error("the server's descriptors: {0}")]
    ServerDescriptors(String),
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
        Ok(Self::of_pool(checked(
            compiler.descriptor_pool(),
            "the .proto files",
        )?))
    }

    /// Reads an encoded `FileDescriptorSet`.
    pub fn from_protoset(path: &Path) -> Result<Self, SchemaError> {
        let bytes = std::fs::read(path).map_err(|error| SchemaError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let what = format!("{} is not a usable FileDescriptorSet", path.display());
        let set = prost_reflect::prost_types::FileDescriptorSet::decode(bytes.as_slice()).map_err(
            |e| SchemaError::Descriptors {
                what: what.clone(),
                error: e.to_string(),
            },
        )?;
        if let Some(file) = import_cycle(&set.file) {
            return Err(SchemaError::Descriptors {
                what,
                error: format!("{file} imports itself"),
            });
        }
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(set.file)
            .map_err(|e| SchemaError::Descriptors {
                what: what.clone(),
                error: e.to_string(),
            })?;
        Ok(Self::of_pool(checked(pool, &what)?))
    }

    /// Asks the server through `transport`: the services it lists and, for `services` (all of
    /// them when `None`), their files and every file they import.
    pub async fn from_reflection<T: Transport>(
        transport: T,
        services: Option<&[&str]>,
        metadata: &MetadataMap,
    ) -> Result<Self, SchemaError> {
        let (mut session, listed) = Session::open_any(transport, metadata).await?;
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
        Self::of_server(files, listed)
    }

    /// Asks the server for the file that defines `symbol` (a service, method, message or enum,
    /// whether or not a service uses it) and every file it imports.
    pub async fn for_symbol<T: Transport>(
        transport: T,
        symbol: &str,
        metadata: &MetadataMap,
    ) -> Result<Self, SchemaError> {
        let (mut session, listed) = Session::open_any(transport, metadata).await?;
        // A method is found by its service.
        let asked = match split_method(symbol) {
            Ok((service, _)) if symbol.contains('/') => service,
            _ => symbol,
        };
        let files = session.files_for(&[asked.to_owned()]).await?;
        Self::of_server(files, listed)
    }

    fn of_server(
        files: Vec<FileDescriptorProto>,
        listed: Vec<String>,
    ) -> Result<Self, SchemaError> {
        if let Some(file) = import_cycle(&files) {
            return Err(server_descriptors(format!(
                "{} imports itself",
                one_line(&file)
            )));
        }
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(files)
            .map_err(|e| server_descriptors(e.to_string()))?;
        let pool = checked(pool, "the server's descriptors")
            .map_err(|e| server_descriptors(e.to_string()))?;
        Ok(Self {
            pool,
            services: listed.iter().map(|s| one_line(s)).collect(),
        })
    }

    /// Descriptors from `source`; reflection asks only for `service` when given, sending
    /// `metadata` (a server may want credentials for reflection too).
    pub async fn load<T: Transport>(
        source: &Source,
        transport: T,
        service: Option<&str>,
        metadata: &MetadataMap,
    ) -> Result<Self, SchemaError> {
        match source {
            Source::Reflection => {
                let services = service.map(|s| [s]);
                Self::from_reflection(transport, services.as_ref().map(|s| &s[..]), metadata).await
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
    use prost_reflect::prost_types::field_descriptor_proto::Label;
    let proto = f.field_descriptor_proto();
    if f.is_map() {
        ""
    } else if f.is_list() {
        "repeated "
    } else if proto.label() == Label::Required {
        "required "
    } else if proto.proto3_optional() || f.parent_file().syntax() == prost_reflect::Syntax::Proto2 {
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
    /// Opens reflection v1, else v1alpha (for older servers); returns the services listed.
    async fn open_any<T: Transport>(
        transport: T,
        metadata: &MetadataMap,
    ) -> Result<(Self, Vec<String>), SchemaError> {
        for path in REFLECTION_PATHS {
            match Self::open(transport.clone(), path, metadata).await {
                Ok(opened) => return Ok(opened),
                Err(status) if status.code() == Code::Unimplemented => continue,
                Err(status) => return Err(reflection_failed(&status)),
            }
        }
        Err(SchemaError::NoReflection)
    }

    /// Opens the stream at `path` with a `ListServices` request (some servers send their
    /// headers only once a request arrived) and returns the services it lists.
    async fn open<T: Transport>(
        transport: T,
        path: &'static str,
        metadata: &MetadataMap,
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
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
        *request.metadata_mut() = metadata.clone();
        let response = grpc
            .streaming(request, PathAndQuery::from_static(path), codec)
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

    /// The files that define `symbols`, and every file they import, by name. Each file is asked
    /// for at most once, and a server that sends more than [`MAX_FILES`] files or
    /// [`MAX_SCHEMA_BYTES`] is refused: a server cannot keep the client asking.
    async fn files_for(
        &mut self,
        symbols: &[String],
    ) -> Result<Vec<FileDescriptorProto>, SchemaError> {
        let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
        let mut asked: BTreeSet<String> = BTreeSet::new();
        let mut bytes_total = 0usize;
        let mut missing: Vec<MessageRequest> = symbols
            .iter()
            .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
            .collect();
        while let Some(ask) = missing.pop() {
            let symbol = match &ask {
                MessageRequest::FileContainingSymbol(s) => Some(s.clone()),
                _ => None,
            };
            // Servers say "no such symbol" as an error answer, or (tonic) by ending the stream.
            let answer = self.ask(ask).await.map_err(|status| match &symbol {
                Some(name) if status.code() == Code::NotFound => {
                    SchemaError::UnknownSymbol(one_line(name))
                }
                _ => reflection_failed(&status),
            })?;
            let encoded = match answer {
                MessageResponse::FileDescriptorResponse(r) => r.file_descriptor_proto,
                MessageResponse::ErrorResponse(e)
                    if symbol.is_some() && Code::from_i32(e.error_code) == Code::NotFound =>
                {
                    return Err(SchemaError::UnknownSymbol(one_line(
                        symbol.as_deref().unwrap_or_default(),
                    )))
                }
                MessageResponse::ErrorResponse(e) => {
                    return Err(SchemaError::Reflection(format!(
                        "{}: {}",
                        crate::grpc::code_name(Code::from_i32(e.error_code)),
                        one_line(&e.error_message)
                    )))
                }
                other => return Err(reflection_failed(&unexpected(&other))),
            };
            for bytes in encoded {
                bytes_total += bytes.len();
                let file = FileDescriptorProto::decode(bytes.as_slice())
                    .map_err(|e| server_descriptors(e.to_string()))?;
                files.insert(file.name().to_owned(), file);
            }
            if files.len() > MAX_FILES || bytes_total > MAX_SCHEMA_BYTES {
                return Err(server_descriptors(format!(
                    "more than {MAX_FILES} files or {} MiB of descriptors",
                    MAX_SCHEMA_BYTES >> 20
                )));
            }
            // Imports the server did not send along, each asked for once.
            for file in files.values() {
                for dep in &file.dependency {
                    if !files.contains_key(dep) && asked.insert(dep.clone()) {
                        missing.push(MessageRequest::FileByFilename(dep.clone()));
                    }
                }
            }
        }
        if let Some(dep) = files
            .values()
            .flat_map(|f| &f.dependency)
            .find(|d| !files.contains_key(*d))
        {
            return Err(server_descriptors(format!(
                "the server did not send {}",
                one_line(dep)
            )));
        }
        Ok(files.into_values().collect())
    }
}

/// The most files reflection may bring.
const MAX_FILES: usize = 10_000;
/// The most descriptor bytes reflection may bring.
const MAX_SCHEMA_BYTES: usize = 64 << 20;

fn server_descriptors(error: String) -> SchemaError {
    SchemaError::ServerDescriptors(error)
}

/// Text from a server, fit for one error line: control characters out, at most 300 characters.
fn one_line(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::grpc::bounded(&clean, 300)
}

/// Checks what prost-reflect takes on trust: map entries without their key and value fields
/// (its accessors panic on them).
fn checked(pool: DescriptorPool, what: &str) -> Result<DescriptorPool, SchemaError> {
    for m in pool.all_messages() {
        if m.is_map_entry() && (m.get_field(1).is_none() || m.get_field(2).is_none()) {
            return Err(SchemaError::Descriptors {
                what: what.to_owned(),
                error: format!("{} is a map entry without its key and value", m.full_name()),
            });
        }
    }
    Ok(pool)
}

/// The first file that imports itself through some chain of imports (prost-reflect's resolver
/// would recurse without end on it), if there is one.
fn import_cycle(files: &[FileDescriptorProto]) -> Option<String> {
    let deps: BTreeMap<&str, &[String]> = files
        .iter()
        .map(|f| (f.name(), f.dependency.as_slice()))
        .collect();
    for (start, first) in &deps {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = first.iter().map(String::as_str).collect();
        while let Some(name) = stack.pop() {
            if name == *start {
                return Some((*start).to_owned());
            }
            if seen.insert(name) {
                if let Some(next) = deps.get(name) {
                    stack.extend(next.iter().map(String::as_str));
                }
            }
        }
    }
    None
}

fn unexpected(answer: &MessageResponse) -> Status {
    let kind = match answer {
        MessageResponse::FileDescriptorResponse(_) => "file descriptors",
        MessageResponse::AllExtensionNumbersResponse(_) => "extension numbers",
        MessageResponse::ListServicesResponse(_) => "a service list",
        MessageResponse::ErrorResponse(_) => "an error",
    };
    Status::internal(format!("an unexpected reflection answer ({kind})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, deps: &[&str]) -> FileDescriptorProto {
        FileDescriptorProto {
            name: Some(name.into()),
            dependency: deps.iter().map(|d| (*d).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn import_cycles_are_found_before_the_resolver_recurses_on_them() {
        assert_eq!(import_cycle(&[file("a", &["a"])]), Some("a".into()));
        assert_eq!(
            import_cycle(&[file("a", &["b"]), file("b", &["c"]), file("c", &["a"])]),
            Some("a".into())
        );
        assert_eq!(
            import_cycle(&[file("a", &["b", "c"]), file("b", &["c"]), file("c", &[])]),
            None
        );
    }

    #[test]
    fn a_map_entry_without_its_fields_is_refused_not_a_panic_later() {
        use prost_reflect::prost_types::{DescriptorProto, MessageOptions};
        let mut f = file("m.proto", &[]);
        f.package = Some("p".into());
        f.message_type = vec![DescriptorProto {
            name: Some("Entry".into()),
            options: Some(MessageOptions {
                map_entry: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let mut pool = DescriptorPool::new();
        // prost-reflect takes it as it is; `checked` must not.
        pool.add_file_descriptor_protos([f]).unwrap();
        let e = checked(pool, "test").unwrap_err();
        assert!(e.to_string().contains("p.Entry"), "{e}");
    }

    #[test]
    fn server_text_is_one_short_line() {
        let line = one_line(&format!("bad\nthing\u{1b}[31m{}", "x".repeat(1000)));
        assert!(!line.contains('\n') && !line.contains('\u{1b}'));
        assert!(line.len() < 400, "{}", line.len());
    }

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
