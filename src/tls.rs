//! TLS for the mesh: throw-away certificates (a CA, a server certificate, a client certificate,
//! made with rcgen), the rustls server config a replica serves with (optionally requiring client
//! certificates: mTLS), and the client configs: the rustls connector the balancer connects with,
//! the tonic one the tools' plain channels use.
//!
//! Every file problem is an error naming the file. Knows nothing of balancing or serving.

#[cfg(feature = "tools")]
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;

/// What went wrong with TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The certificates and key do not make a valid configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
    /// Certificate generation or writing failed.
    #[error("cannot make certificates: {0}")]
    Generate(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: format!("not a PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        message: format!("not a PEM private key: {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A replica's TLS settings.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Its certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The rustls config: ALPN h2 and http/1.1 (gRPC and REST share the port).
    pub fn config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = certs(&self.cert)?;
        let key = key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs(ca)? {
                    roots.add(cert).map_err(|e| TlsError::Pem {
                        path: ca.clone(),
                        message: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::Config(format!(
                "{} and {} do not match: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The balanced client's TLS settings.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA that signs the replicas' certificates (PEM).
    pub ca: PathBuf,
    /// The client's certificate and key, for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name to verify in the replicas' certificates. Discovered endpoints are IP addresses,
    /// while certificates usually carry names; without this, the address itself is verified.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The tonic client config (files are read now, so a bad one fails at startup).
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        // Parse now so that a bad file is reported by name, not at the first handshake.
        certs(&self.ca)?;
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key_path)) = &self.identity {
            certs(cert)?;
            key(key_path)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key_path)?,
            ));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

impl ClientTls {
    /// The rustls connector the balancer's own connections use (ALPN h2; files are read now).
    pub fn connector(&self) -> Result<Connector, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&self.ca)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: self.ca.clone(),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key_path)) => builder
                .with_client_auth_cert(certs(cert)?, key(key_path)?)
                .map_err(|e| {
                    TlsError::Config(format!(
                        "{} and {} do not match: {e}",
                        cert.display(),
                        key_path.display()
                    ))
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = match &self.server_name {
            Some(name) => Some(
                rustls_pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Connector {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// How the balancer's connections do TLS: a rustls client config and the name to verify.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<rustls_pki_types::ServerName<'static>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Runs the handshake over `io` with the endpoint at `addr`: verifies the configured name, or
    /// else the address itself (discovered endpoints are IPs). Fails unless the server agreed to
    /// HTTP/2.
    pub async fn connect<IO>(
        &self,
        addr: std::net::SocketAddr,
        io: IO,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
        let stream = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, io)
            .await?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(std::io::Error::other(
                "the server did not agree to HTTP/2 (ALPN h2)",
            ));
        }
        Ok(stream)
    }
}

/// Where [`write_certs`] put its files.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// The client certificate.
    pub client_cert: PathBuf,
    /// The client key.
    pub client_key: PathBuf,
    /// The admin client certificate (its name is [`ADMIN_IDENTITY`]).
    pub admin_cert: PathBuf,
    /// The admin client key.
    pub admin_key: PathBuf,
}

/// The subject alternative name of the admin certificate [`write_certs`] makes: what a replica's
/// `--admin-allow` names so that only this certificate may reconfigure it.
pub const ADMIN_IDENTITY: &str = "meshlb-admin";

impl CertPaths {
    /// The files `write_certs` writes into `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
        }
    }
}

#[cfg(feature = "tools")]
/// Makes a throw-away CA, a server certificate valid for `names` (DNS names or IP addresses), a
/// client certificate and an admin client certificate, and writes them as PEM files into `dir` (keys readable by the owner only).
pub fn write_certs(dir: &Path, names: &[String]) -> Result<CertPaths, TlsError> {
    let g = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meshlb throw-away CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(g)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(g)?;

    let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(sans).map_err(g)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(g)?;
        let cert = params.signed_by(&key, &ca).map_err(g)?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        names.to_vec(),
        "meshlb replica",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) = leaf(
        vec!["meshlb-client".into()],
        "meshlb client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let (admin_pem, admin_key) = leaf(
        vec![ADMIN_IDENTITY.into()],
        "meshlb admin",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    std::fs::create_dir_all(dir)
        .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
    let paths = CertPaths::in_dir(dir);
    for (path, contents, secret) in [
        (&paths.ca, ca.pem(), false),
        (&paths.server_cert, server_pem, false),
        (&paths.server_key, server_key, true),
        (&paths.client_cert, client_pem, false),
        (&paths.client_key, client_key, true),
        (&paths.admin_cert, admin_pem, false),
        (&paths.admin_key, admin_key, true),
    ] {
        write_file(path, &contents, secret)?;
    }
    Ok(paths)
}

#[cfg(feature = "tools")]
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let fail = |e: std::io::Error| TlsError::Generate(format!("{}: {e}", path.display()));
    std::fs::write(path, contents).map_err(fail)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

#[cfg(all(test, feature = "tools"))]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("meshlb-tls-{name}-{}", std::process::id()))
    }

    #[test]
    fn generated_certificates_make_valid_configs() {
        let dir = temp("ok");
        let p = write_certs(&dir, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let server = ServerTls {
            cert: p.server_cert.clone(),
            key: p.server_key.clone(),
            client_ca: Some(p.ca.clone()),
        };
        let config = server.config().unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");
        let client = ClientTls {
            ca: p.ca.clone(),
            identity: Some((p.client_cert.clone(), p.client_key.clone())),
            server_name: Some("localhost".into()),
        };
        client.config().unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = temp("bad");
        let p = write_certs(&dir, &["localhost".into()]).unwrap();
        let missing = ServerTls {
            cert: dir.join("nope.pem"),
            key: p.server_key.clone(),
            client_ca: None,
        };
        assert!(missing
            .config()
            .unwrap_err()
            .to_string()
            .contains("nope.pem"));
        std::fs::write(dir.join("garbage.pem"), "hello").unwrap();
        let garbage = ClientTls {
            ca: dir.join("garbage.pem"),
            identity: None,
            server_name: None,
        };
        assert!(garbage
            .config()
            .unwrap_err()
            .to_string()
            .contains("garbage.pem"));
        let mismatched = ServerTls {
            cert: p.server_cert.clone(),
            key: p.client_key.clone(),
            client_ca: None,
        };
        let err = mismatched.config().unwrap_err().to_string();
        assert!(
            err.contains("server.pem") && err.contains("client.key"),
            "{err}"
        );
    }
}
