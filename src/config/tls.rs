//! `tls:` on each listener, and the rule that keeps credentials off the network in clear: a
//! listener on an address other than loopback speaks TLS unless the config says
//! `allow_plaintext: true` (TLS ended in front of toolgate: a mesh sidecar, a load balancer).
//!
//! The files are read at load, so `toolgate check` fails on a missing or unreadable certificate
//! as `serve` would; the server reads them again when they change (`server::tls`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Problems;
use super::yaml::{Document, KeyPath};

/// A listener's certificate, key and (data plane only) the CA its clients' certificates chain to.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs that sign agents' client certificates. Set, a client certificate is verified
    /// against them and can identify an agent (`credentials.spiffe_id` or `certificate_cn`).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (the default: a client without a certificate from those
    /// CAs cannot connect) or `optional` (a client may connect without one and present an API
    /// key or JWT instead; one it presents must still verify).
    #[serde(default)]
    pub client_certificates: ClientCertificates,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertificates {
    #[default]
    Required,
    Optional,
}

/// What a listener looks like on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl TlsConfig {
    /// Reads and parses the files: the same errors `serve` would meet at start.
    fn check(&self, doc: &Document, at: &KeyPath, client_certs_allowed: bool, problems: &mut Problems) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &PathBuf| -> Result<usize, String> {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{} is not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{} holds no certificate", path.display()));
            }
            Ok(certs.len())
        };
        if let Err(e) = certs(&self.cert_file) {
            problems.push(doc.problem(&at.key("cert_file"), e));
        }
        if let Err(e) = PrivateKeyDer::from_pem_file(&self.key_file) {
            let why = format!("cannot read a PEM private key from {}: {e}", self.key_file.display());
            problems.push(doc.problem(&at.key("key_file"), why));
        }
        match &self.client_ca_file {
            Some(_) if !client_certs_allowed => problems.push(doc.problem(
                &at.key("client_ca_file"),
                "client certificates identify agents: only the data plane's `tls` takes them",
            )),
            Some(ca) => {
                if let Err(e) = certs(ca) {
                    problems.push(doc.problem(&at.key("client_ca_file"), e));
                }
            }
            None => {}
        }
    }
}

/// Checks one listener's `tls` and `allow_plaintext` against its address.
pub(super) fn check_listener(
    doc: &Document,
    at: &KeyPath,
    listen: SocketAddr,
    tls: Option<&TlsConfig>,
    allow_plaintext: bool,
    client_certs_allowed: bool,
    problems: &mut Problems,
) {
    match tls {
        Some(tls) => tls.check(doc, &at.key("tls"), client_certs_allowed, problems),
        None if !listen.ip().is_loopback() && !allow_plaintext => problems.push(doc.problem(
            &at.key("listen"),
            format!(
                "{listen} is not a loopback address, and plain HTTP would send credentials across the \
                 network in clear: configure `tls`, or set `allow_plaintext: true` if TLS ends in front \
                 of toolgate"
            ),
        )),
        None => {}
    }
}

/// The warning `check` prints for a listener that serves plain HTTP beyond loopback.
pub fn plaintext_warning(plane: &str, listen: SocketAddr, tls: Option<&TlsConfig>) -> Option<String> {
    (tls.is_none() && !listen.ip().is_loopback()).then(|| {
        format!(
            "the {plane} plane listens on {listen} in plain HTTP (`allow_plaintext: true`): \
             credentials cross the network in clear unless TLS ends in front of toolgate"
        )
    })
}
