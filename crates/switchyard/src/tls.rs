//! TLS on both sides, with rustls (ring): the client's connector for `https://` workers (the
//! system's roots plus `--worker-ca-cert`, and a client certificate for workers that require
//! mTLS) and the listener's server configuration (`--tls-cert-path`, `--tls-key-path`).
//!
//! Plain `http://` workers go through the same connector untouched: no handshake, no copy.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// The listener's certificate: set, the router serves HTTPS only.
    pub listener: Option<CertKeyPaths>,
    /// Extra roots trusted for `https://` workers (added to the system's).
    pub worker_ca: Option<PathBuf>,
    /// The certificate presented to workers that require client authentication.
    pub worker_identity: Option<CertKeyPaths>,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no PEM item of the expected kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material (a key that does not match its certificate, say).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Also the process default, for libraries that build their own configurations
            // (the Kubernetes client).
            let _ = rustls::crypto::ring::default_provider().install_default();
            Arc::new(rustls::crypto::ring::default_provider())
        })
        .clone()
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("no usable PEM private key ({e})")))
}

/// The system's trusted roots, read once (a few milliseconds of file reads).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::debug!("no system root certificates found; https workers need --worker-ca-cert");
            }
            Arc::new(roots)
        })
        .clone()
}

/// The client configuration for workers.
pub fn client_config(config: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = (*system_roots()).clone();
    if let Some(ca) = &config.worker_ca {
        for cert in certificates(ca)? {
            roots.add(cert).map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    // ALPN is left to the connector (it offers HTTP/1.1).
    let client = match &config.worker_identity {
        Some(id) => builder.with_client_auth_cert(certificates(&id.cert)?, private_key(&id.key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}

/// The default client configuration (system roots only), built once.
pub fn default_client_config() -> Arc<ClientConfig> {
    static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let roots = (*system_roots()).clone();
            let client = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .unwrap_or_else(|_| {
                    ClientConfig::builder().with_root_certificates(RootCertStore::empty()).with_no_client_auth()
                });
            Arc::new(client)
        })
        .clone()
}

/// The listener's server configuration (HTTP/1.1 by ALPN).
pub fn server_config(paths: &CertKeyPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates(&paths.cert)?, private_key(&paths.key)?)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("sy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let missing = dir.join("missing.pem");
        let e = server_config(&CertKeyPaths { cert: missing.clone(), key: missing.clone() }).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = client_config(&TlsConfig { worker_ca: Some(empty.clone()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("empty.pem") && e.to_string().contains("no PEM certificate"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        assert!(server_config(&CertKeyPaths { cert: c.clone(), key: k.clone() }).is_ok());
        // A key that is not the certificate's.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&k, other.signing_key.serialize_pem()).unwrap();
        assert!(server_config(&CertKeyPaths { cert: c, key: k }).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
