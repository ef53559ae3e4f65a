//! TLS on a listener (rustls, the crypto provider the rest of the build uses): the certificate
//! and key, reloaded when their files change, and on the data plane the CAs that sign agents'
//! client certificates, whose identity ([`PeerCertificate`]) can name an agent.
//!
//! A reload builds a whole new rustls config from the files and swaps it in for the handshakes
//! that follow; connections already open keep theirs. Files that do not load (half written by
//! a rotation, a key that does not match) leave the last good config serving, and say why, as a
//! bad policy reload does. The files are polled once a second by their modification times and
//! sizes: certificate managers (cert-manager, a Kubernetes Secret volume) replace files by
//! renaming, which a poll sees as reliably as a notification would, with no watcher to keep.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::{ClientCertificates, TlsConfig};
pub use crate::policy::identity::ClientCertificate;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the client CA file {path} is not usable: {why}")]
    ClientCa { path: PathBuf, why: String },
    #[error("the certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A listener's TLS: the config for the next handshake, and what it was built from.
pub struct Tls {
    files: TlsConfig,
    current: ArcSwap<rustls::ServerConfig>,
    /// The files' modification times and sizes when `current` was built (or last tried).
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert_file", &self.files.cert_file).finish()
    }
}

impl Tls {
    /// Loads the files; an error here stops the start.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let stamp = stamp(files);
        let config = build(files)?;
        Ok(Self {
            files: files.clone(),
            current: ArcSwap::from_pointee(config),
            stamp: Mutex::new(stamp),
        })
    }

    /// An acceptor with the config in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Reloads the files if they changed since the last look. `Some(Ok)` when a new config is
    /// in force, `Some(Err)` when the changed files do not load (the last good one still
    /// serves), `None` when nothing changed.
    pub fn poll(&self) -> Option<Result<(), TlsError>> {
        let now = stamp(&self.files);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        Some(build(&self.files).map(|config| self.current.store(Arc::new(config))))
    }

    /// Whether this listener asks its clients for certificates.
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca_file.is_some()
    }
}

fn stamp(files: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    let paths = [
        Some(&files.cert_file),
        Some(&files.key_file),
        files.client_ca_file.as_ref(),
    ];
    paths
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |why: String| TlsError::File {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// A rustls server config from the files: TLS 1.2 and 1.3, HTTP/1.1 by ALPN.
fn build(files: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = read_certs(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| TlsError::File {
        path: files.key_file.clone(),
        why: e.to_string(),
    })?;
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca = |why: String| TlsError::ClientCa {
                path: path.clone(),
                why,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| ca(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match files.client_certificates {
                ClientCertificates::Required => verifier,
                ClientCertificates::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| ca(e.to_string()))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The identity in the end-entity certificate rustls verified, if the client sent one.
pub fn client_certificate(conn: &rustls::ServerConnection) -> Option<Arc<ClientCertificate>> {
    let cert = conn.peer_certificates()?.first()?;
    Some(Arc::new(parse_certificate(cert)))
}

/// Reads the names from a DER certificate; what does not parse is simply absent (the
/// certificate was verified by rustls already; a name it lacks identifies nobody).
pub fn parse_certificate(der: &[u8]) -> ClientCertificate {
    use x509_cert::der::Decode;
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return ClientCertificate::default();
    };
    let tbs = &cert.tbs_certificate;
    let uris: Vec<String> = match tbs.get::<SubjectAltName>() {
        Ok(Some((_, san))) => san
            .0
            .iter()
            .filter_map(|name| match name {
                GeneralName::UniformResourceIdentifier(uri) if uri.as_str().starts_with("spiffe://") => {
                    Some(uri.as_str().to_owned())
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    // More than one SPIFFE ID names no one in particular: none is taken.
    let spiffe_id = match <[String; 1]>::try_from(uris) {
        Ok([one]) => Some(one),
        Err(_) => None,
    };
    let common_name = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid == x509_cert::der::oid::db::rfc4519::CN)
        .find_map(|atv| {
            let v = &atv.value;
            Utf8StringRef::try_from(v)
                .map(|s| s.as_str().to_owned())
                .or_else(|_| PrintableStringRef::try_from(v).map(|s| s.as_str().to_owned()))
                .or_else(|_| Ia5StringRef::try_from(v).map(|s| s.as_str().to_owned()))
                .ok()
        });
    ClientCertificate { spiffe_id, common_name }
}

/// A handshake that failed: no request was read, so there is no call to audit; counted, and
/// logged at debug level (scanners and health checkers that speak plain HTTP fail here too).
pub(super) fn handshake_failed(peer: std::net::SocketAddr, why: &str) {
    metrics::counter!("toolgate_tls_handshake_failures_total").increment(1);
    tracing::debug!(%peer, "TLS handshake failed: {why}");
}
