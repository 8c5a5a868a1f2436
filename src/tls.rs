//! rustls set-up: the public listener's server config (wss://) and the
//! client config used to reach wss:// upstreams.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::{self, pki_types};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<pki_types::CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<pki_types::PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| file_err(path, e))?
        .ok_or_else(|| file_err(path, "no PEM private key found"))
}

/// Checks the public listener's files one by one, as far as each goes:
/// `(certificate problem, key problem)`; a key that does not match the
/// certificate counts as the key's.
pub fn check_server_files(cert: &Path, key: &Path) -> (Option<TlsError>, Option<TlsError>) {
    let cert_err = read_certs(cert).err();
    let key_err = read_key(key).err();
    if cert_err.is_some() || key_err.is_some() {
        return (cert_err, key_err);
    }
    (None, server_acceptor(cert, key).err())
}

/// The acceptor for `wss://` on the public listener.
pub fn server_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let certs = read_certs(cert)?;
    let key_der = read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Client TLS for `wss://` upstreams: the system roots plus `ca_file`.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamTls")
    }
}

impl UpstreamTls {
    pub fn new(ca_file: Option<&Path>) -> Result<UpstreamTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A malformed system certificate is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| file_err(path, e))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// System roots only (no `ca_file`); cannot fail.
    pub fn system_only() -> UpstreamTls {
        match UpstreamTls::new(None) {
            Ok(t) => t,
            Err(_) => {
                let config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(rustls::DEFAULT_VERSIONS)
                    .map(|b| {
                        b.with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth()
                    });
                // The ring provider supports the default versions (proven by rustls' own tests).
                #[allow(clippy::expect_used)]
                let config = config.expect("ring supports the default protocol versions");
                UpstreamTls {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                }
            }
        }
    }

    pub fn connector(&self) -> &tokio_rustls::TlsConnector {
        &self.connector
    }
}
