//! `toolgate healthcheck`: one `GET` to this gateway's own admin plane, for a container's
//! `HEALTHCHECK` (a distroless image has no curl).
//!
//! Over TLS the probe does not verify the certificate: it connects to its own process on
//! loopback, by an address the certificate is unlikely to name, sends no credential and reads
//! only the status. Everything else that connects to the listeners verifies as usual.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the TLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} did not answer as HTTP: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Where to reach a listener bound to `listen` from the same host: an unspecified address
/// (`0.0.0.0`, `::`) becomes loopback.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET path` on `addr` (over TLS if `tls`), within `timeout`: the status it answered.
pub async fn get(addr: SocketAddr, path: &str, tls: bool, timeout: Duration) -> Result<u16, ProbeError> {
    tokio::time::timeout(timeout, exchange(addr, path, tls))
        .await
        .unwrap_or(Err(ProbeError::Timeout { addr, timeout }))
}

async fn exchange(addr: SocketAddr, path: &str, tls: bool) -> Result<u16, ProbeError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    if !tls {
        return status(addr, path, TokioIo::new(tcp)).await;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Tls {
            addr,
            source: std::io::Error::other(e),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(OwnListener(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| ProbeError::Tls { addr, source })?;
    status(addr, path, TokioIo::new(stream)).await
}

async fn status<T>(addr: SocketAddr, path: &str, io: TokioIo<T>) -> Result<u16, ProbeError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| ProbeError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(http)?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .expect("a GET with a path and a host is a valid request");
    let res = sender.send_request(req).await.map_err(http)?;
    Ok(res.status().as_u16())
}

/// Accepts the certificate of the listener the probe is checking (see the module's doc); the
/// handshake's signatures are still verified, so the connection is a real TLS session.
#[derive(Debug)]
struct OwnListener(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for OwnListener {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
