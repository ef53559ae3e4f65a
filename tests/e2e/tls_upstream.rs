//! `https://` tools: the real binary forwards over TLS to a tool on 127.0.0.1 whose certificate
//! a private CA signed, trusted through `SSL_CERT_FILE`; without that CA the call is refused
//! (502) and nothing reaches the tool — never sent unverified.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::support::{self, fixture, listeners, send, sha256_hex, write_serve_config};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

const KEY: &str = "tls-test-key";

/// The fixture certificate for 127.0.0.1, signed by the fixture CA.
pub(crate) fn acceptor() -> tokio_rustls::TlsAcceptor {
    let dir = fixture("tls");
    let certs = CertificateDer::pem_file_iter(dir.join("tool.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("tool.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A JSON tool behind TLS (the fixture certificate for 127.0.0.1); records each request line.
async fn tls_tool() -> (String, Arc<Mutex<Vec<String>>>) {
    let acceptor = acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate hangs up here.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let host = req.headers().get("host").map(|h| h.to_str().unwrap().to_owned());
                        let line = format!("{} {} host={}", req.method(), req.uri(), host.unwrap_or_default());
                        let _ = req.into_body().collect().await;
                        log.lock().unwrap().push(line);
                        let body = Full::new(bytes::Bytes::from_static(br#"{"tls":true}"#));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, seen)
}

/// `toolgate serve` with one agent allowed one https tool; `ca` is its `SSL_CERT_FILE`.
fn serve(dir: &std::path::Path, tool_url: &str, ca: Option<&std::path::Path>) -> (std::process::Child, String) {
    let policy = format!(
        "agents:\n  tls-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ secure.read ]\ntools:\n  secure.read:\n    upstream: {{ url: \"{tool_url}/records/{{id}}\", method: GET }}\n    arguments: {{ type: object, required: [ id ], properties: {{ id: {{ type: string }} }} }}\n",
        sha256_hex(KEY)
    );
    serve_policy(dir, &policy, ca)
}

/// `toolgate serve` on `policy`, trusting `ca` (`SSL_CERT_FILE`; none: an empty trust store).
fn serve_policy(dir: &std::path::Path, policy: &str, ca: Option<&std::path::Path>) -> (std::process::Child, String) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("tls.yaml"), policy).unwrap();
    let cfg = write_serve_config(dir, "");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    cmd.arg("serve")
        .arg("-c")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .env_remove("SSL_CERT_DIR");
    match ca {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        // An empty trust store: the test CA is certainly not in it.
        None => cmd.env("SSL_CERT_FILE", dir.join("no-roots.pem")),
    };
    std::fs::write(dir.join("no-roots.pem"), "").unwrap();
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let (data, _, log) = listeners(&mut child);
    // Keep reading its log (shown if a test fails): a closed pipe would fail its writes.
    std::thread::spawn(move || log.map_while(Result::ok).for_each(|line| eprintln!("toolgate: {line}")));
    (child, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_tools_are_called_over_verified_tls() {
    let (tool, seen) = tls_tool().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, data) = serve(dir.path(), &tool, Some(&fixture("tls").join("ca.pem")));
    let auth = vec![("authorization", format!("Bearer {KEY}"))];
    let url = format!("{data}/v1/tools/secure.read");
    for _ in 0..3 {
        let r = send("POST", &url, &auth, br#"{"id": "42"}"#.to_vec()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json(), serde_json::json!({"tls": true}));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Origin form, and the Host without https's default port (there is none here: 127.0.0.1:PORT).
    let port = tool.rsplit(':').next().unwrap();
    let want = format!("GET /records/42?id=42 host=127.0.0.1:{port}");
    assert_eq!(*seen.lock().unwrap(), vec![want.clone(), want.clone(), want]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_tool_with_an_untrusted_certificate_is_never_called() {
    let (tool, seen) = tls_tool().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, data) = serve(dir.path(), &tool, None);
    let auth = vec![("authorization", format!("Bearer {KEY}"))];
    let r = send(
        "POST",
        &format!("{data}/v1/tools/secure.read"),
        &auth,
        br#"{"id": "42"}"#.to_vec(),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    r.assert_error(502, "upstream_error");
    assert!(
        seen.lock().unwrap().is_empty(),
        "a request reached a tool whose certificate is not trusted"
    );
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    let e = events
        .iter()
        .find(|e| e["request_id"] == r.request_id().as_str() && e["event"] == "tool_call")
        .expect("an audit event");
    assert_eq!(e["code"], "upstream_error");
}

/// TLS in front of a plain server on `backend`: what a TLS-terminating sidecar does. Counts
/// the connections that completed a handshake.
async fn tls_terminator(backend: u16) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let acceptor = acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let handshakes: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let done = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (url, handshakes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_mcp_server_is_reached_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let crm = crate::mcp::upstream_mcp(&dir.path().join("no-rug-pull")).await;
    let (url, handshakes) = tls_terminator(crm.port).await;
    let policy = format!(
        "mcp_servers:\n  crm: {{ url: \"{url}/mcp\" }}\nagents:\n  crm-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ crm.* ]\n",
        sha256_hex(KEY)
    );
    let (mut child, data) = serve_policy(dir.path(), &policy, Some(&fixture("tls").join("ca.pem")));
    // The server's tools are discovered at start (over TLS); then a call goes the same way.
    let auth = vec![("authorization", format!("Bearer {KEY}"))];
    let call = format!("{data}/v1/tools/crm.notes");
    let mut r = send("POST", &call, &auth, br#"{"customer_id": "C-1"}"#.to_vec()).await;
    for _ in 0..100 {
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        r = send("POST", &call, &auth, br#"{"customer_id": "C-1"}"#.to_vec()).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("Customer C-1 prefers email."),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}
