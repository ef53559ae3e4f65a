//! TLS on the gateway's own listeners, with a CA minted per test: both planes over HTTPS,
//! agents identified by their client certificates (SPIFFE ID, subject CN) and refused with a
//! wrong or missing one, certificates rotated on disk and picked up, and the `healthcheck`
//! subcommand against a TLS admin plane.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::{ANALYST_KEY, Harness, Resp, SUPPORT_KEY, sha256_hex, try_send, write_fixture_policies};

/// A CA of the test's own: it signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and its key (PEM) for `sans` (IP addresses and DNS names), with `cn` and
    /// any extra URI SANs (SPIFFE IDs).
    fn leaf(&self, cn: &str, sans: &[&str], uris: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path.display().to_string()
    }
}

fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> (String, String) {
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// An HTTPS client that trusts `ca` and presents `identity` (a certificate and key), if any.
fn client(ca: &str, identity: Option<&(String, String)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// One request over a fresh HTTPS connection; `None` when no HTTP answer came (the handshake
/// was refused).
async fn https(
    config: rustls::ClientConfig,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Option<Resp> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build::<_, Full<Bytes>>(connector);
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .ok()?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some(Resp { status, headers, body })
}

fn bearer(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {key}")),
        ("content-type", "application/json".to_owned()),
    ]
}

fn json_only() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/json".to_owned())]
}

/// The fixture agents, each with its API key and a certificate identity: support-bot by a
/// SPIFFE ID, analyst-bot by its certificate's CN.
fn agents() -> String {
    format!(
        "agents:\n  support-bot:\n    credentials:\n      api_key_sha256: [ \"{}\" ]\n      spiffe_id: {SUPPORT_SPIFFE}\n    tools: [ tickets.read, kb.* ]\n  analyst-bot:\n    credentials:\n      api_key_sha256: [ \"{}\" ]\n      certificate_cn: {ANALYST_CN}\n    tools: [ kb.* ]\n",
        sha256_hex(SUPPORT_KEY),
        sha256_hex(ANALYST_KEY)
    )
}

const SUPPORT_SPIFFE: &str = "spiffe://agents.test/ns/support/sa/support-bot";
const ANALYST_CN: &str = "analyst-bot.agents.test";

/// The test's gateway with TLS on the data plane (a certificate for 127.0.0.1 from `ca`), the
/// admin plane too if `admin_tls`, and agents' certificates verified against `client_ca` in
/// `mode` (`required` or `optional`), if given.
async fn start(dir: &Path, ca: &Ca, client_ca: Option<(&Ca, &str)>, admin_tls: bool) -> (Harness, String, String) {
    let server = write_pair(dir, "server", &ca.leaf("127.0.0.1", &["127.0.0.1", "localhost"], &[]));
    let mut tls = format!("tls: {{ cert_file: {}, key_file: {}", server.0, server.1);
    if let Some((client_ca, mode)) = client_ca {
        let path = client_ca.write(dir, "client-ca.pem");
        tls.push_str(&format!(", client_ca_file: {path}, client_certificates: {mode}"));
    }
    tls.push_str(" }\n");
    let admin = if admin_tls {
        format!(", tls: {{ cert_file: {}, key_file: {} }}", server.0, server.1)
    } else {
        String::new()
    };
    let agents = agents();
    let harness = Harness::start_admin(&tls, &[("agents.yaml", &agents)], &admin).await;
    let running = harness.running.as_ref().unwrap();
    let data = format!("https://{}", running.data_addr);
    let admin = format!("{}://{}", running.admin_scheme, running.admin_addr);
    (harness, data, admin)
}

async fn call(config: rustls::ClientConfig, data: &str, tool: &str, headers: &[(&str, String)]) -> Option<Resp> {
    https(
        config,
        "POST",
        &format!("{data}/v1/tools/{tool}"),
        headers,
        r#"{"q":"tls"}"#,
    )
    .await
}

#[tokio::test]
async fn both_planes_speak_tls_and_nothing_gets_through_in_plain_http_or_unverified() {
    let ca = Ca::new("toolgate test CA");
    let dir = tempfile::tempdir().unwrap();
    let (h, data, admin) = start(dir.path(), &ca, None, true).await;
    assert!(admin.starts_with("https://"), "{admin}");

    let ok = call(client(&ca.pem, None), &data, "kb.search", &bearer(SUPPORT_KEY))
        .await
        .expect("an HTTPS answer");
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(h.upstream.count("/kb"), 1);
    let event = h.event_for(&ok);
    assert_eq!(event["agent"], "support-bot");
    assert_eq!(event["decision"], "allow");

    // The admin plane over TLS: health, and the token still required for /admin.
    let health = https(client(&ca.pem, None), "GET", &format!("{admin}/healthz"), &[], "")
        .await
        .expect("admin over HTTPS");
    assert_eq!(health.status, 200);
    let auth = [("authorization", format!("Bearer {}", crate::support::ADMIN_TOKEN))];
    let replicas = https(
        client(&ca.pem, None),
        "GET",
        &format!("{admin}/admin/replicas"),
        &auth,
        "",
    )
    .await
    .unwrap();
    assert_eq!(replicas.status, 200, "{}", String::from_utf8_lossy(&replicas.body));

    // Plain HTTP to either TLS port gets no HTTP answer, and nothing is forwarded.
    let plain = data.replace("https://", "http://");
    let refused = try_send(
        "POST",
        &format!("{plain}/v1/tools/kb.search"),
        &bearer(SUPPORT_KEY),
        b"{}".to_vec(),
    )
    .await;
    assert!(
        refused.is_none(),
        "plain HTTP on the TLS data port was answered: {:?}",
        refused.map(|r| r.status)
    );
    let refused = try_send(
        "GET",
        &format!("{}/healthz", admin.replace("https://", "http://")),
        &[],
        Vec::new(),
    )
    .await;
    assert!(refused.is_none(), "plain HTTP on the TLS admin port was answered");
    // A client that does not trust the gateway's CA stops at the handshake.
    let other = Ca::new("someone else's CA");
    let untrusted = call(client(&other.pem, None), &data, "kb.search", &bearer(SUPPORT_KEY)).await;
    assert!(
        untrusted.is_none(),
        "a client that does not trust the certificate got an answer"
    );
    assert_eq!(h.upstream.count("/kb"), 1, "none of those reached the tool");
}

#[tokio::test]
async fn a_client_certificate_identifies_its_agent_and_a_wrong_or_missing_one_is_refused() {
    let (server_ca, agents_ca) = (Ca::new("server CA"), Ca::new("agents CA"));
    let dir = tempfile::tempdir().unwrap();
    let (h, data, _) = start(dir.path(), &server_ca, Some((&agents_ca, "required")), false).await;
    let as_client = |id: &(String, String)| client(&server_ca.pem, Some(id));
    let support = agents_ca.leaf("support workload", &[], &[SUPPORT_SPIFFE]);
    let analyst = agents_ca.leaf(ANALYST_CN, &[], &[]);

    // The SPIFFE ID names support-bot: no key needed.
    let ok = call(as_client(&support), &data, "kb.search", &json_only())
        .await
        .expect("served");
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(h.event_for(&ok)["agent"], "support-bot");
    // The CN names analyst-bot, with its own allowlist.
    let ok = call(as_client(&analyst), &data, "kb.search", &json_only())
        .await
        .expect("served");
    assert_eq!(ok.status, 200);
    assert_eq!(h.event_for(&ok)["agent"], "analyst-bot");
    let not_allowed = call(as_client(&analyst), &data, "tickets.read", &json_only())
        .await
        .unwrap();
    not_allowed.assert_error(403, "tool_not_allowed");
    assert_eq!(h.event_for(&not_allowed)["agent"], "analyst-bot");

    // A valid certificate naming nobody in the policy: 401, audited.
    let stranger = agents_ca.leaf("nobody", &[], &["spiffe://agents.test/ns/x/sa/nobody"]);
    let r = call(as_client(&stranger), &data, "kb.search", &json_only())
        .await
        .unwrap();
    let body = r.assert_error(401, "unauthenticated");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("certificate"),
        "{body}"
    );
    let refusal = h.event_for(&r);
    assert_eq!(refusal["code"], "unauthenticated");
    // A key and a certificate naming different agents: refused, never one of them chosen.
    let r = call(as_client(&analyst), &data, "kb.search", &bearer(SUPPORT_KEY))
        .await
        .unwrap();
    r.assert_error(401, "unauthenticated");
    // The same agent both ways is fine.
    let r = call(as_client(&analyst), &data, "kb.search", &bearer(ANALYST_KEY))
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // A certificate from another CA, or none at all: the handshake fails, nothing is forwarded.
    let before = h.upstream.requests().len();
    let forged = Ca::new("forger").leaf("support workload", &[], &[SUPPORT_SPIFFE]);
    assert!(
        call(as_client(&forged), &data, "tickets.read", &json_only())
            .await
            .is_none(),
        "a certificate from another CA was accepted"
    );
    assert!(
        call(client(&server_ca.pem, None), &data, "kb.search", &bearer(SUPPORT_KEY))
            .await
            .is_none(),
        "no certificate was accepted with `required`"
    );
    assert_eq!(h.upstream.requests().len(), before);
}

#[tokio::test]
async fn with_optional_client_certificates_an_agent_may_use_its_key_instead() {
    let (server_ca, agents_ca) = (Ca::new("server CA"), Ca::new("agents CA"));
    let dir = tempfile::tempdir().unwrap();
    let (h, data, _) = start(dir.path(), &server_ca, Some((&agents_ca, "optional")), false).await;
    let r = call(client(&server_ca.pem, None), &data, "kb.search", &bearer(ANALYST_KEY))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["agent"], "analyst-bot");
    let r = call(client(&server_ca.pem, None), &data, "kb.search", &json_only())
        .await
        .unwrap();
    r.assert_error(401, "unauthenticated");
    // One it presents must still verify.
    let forged = Ca::new("forger").leaf(ANALYST_CN, &[], &[]);
    assert!(
        call(client(&server_ca.pem, Some(&forged)), &data, "kb.search", &json_only())
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_and_a_broken_one_keeps_the_last_good() {
    let (first, second) = (Ca::new("first CA"), Ca::new("second CA"));
    let dir = tempfile::tempdir().unwrap();
    let (_h, data, _) = start(dir.path(), &first, None, false).await;
    let key = bearer(SUPPORT_KEY);
    let served = |ca: &Ca| call(client(&ca.pem, None), &data, "kb.search", &key);
    assert_eq!(served(&first).await.unwrap().status, 200);
    assert!(served(&second).await.is_none());

    // Rotation as a certificate manager does it: new files renamed into place.
    let pair = second.leaf("127.0.0.1", &["127.0.0.1"], &[]);
    let staged = write_pair(dir.path(), "staged", &pair);
    std::fs::rename(&staged.1, dir.path().join("server.key")).unwrap();
    std::fs::rename(&staged.0, dir.path().join("server.crt")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if served(&second).await.is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served(&first).await.is_none(), "the old certificate is still served");

    // A broken file (half written, say): the last good certificate keeps serving.
    std::fs::write(dir.path().join("server.crt"), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served(&second).await.expect("still served").status, 200);
}

#[test]
fn healthcheck_asks_a_tls_admin_plane_and_fails_when_it_is_gone() {
    let ca = Ca::new("toolgate test CA");
    let dir = tempfile::tempdir().unwrap();
    let server = write_pair(
        dir.path(),
        "server",
        &ca.leaf("toolgate.internal", &["toolgate.internal"], &[]),
    );
    write_fixture_policies(&dir.path().join("policies"), &crate::support::refused_url());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let admin_port = free();
    let config = crate::support::write_serve_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!(
            "admin: {{ listen: 0.0.0.0:{admin_port}, tls: {{ cert_file: {}, key_file: {} }} }}",
            server.0, server.1
        ),
    );
    std::fs::write(&config, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_toolgate");
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_, admin, _log) = crate::support::listeners(&mut child);
    assert!(admin.starts_with("https://0.0.0.0:"), "{admin}");
    let healthcheck = |extra: &[&str]| {
        Command::new(bin)
            .args(["healthcheck", "--config"])
            .arg(&config)
            .args(extra)
            .output()
            .unwrap()
    };
    let up = healthcheck(&[]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let ready = healthcheck(&["--ready"]);
    assert!(ready.status.success(), "{}", String::from_utf8_lossy(&ready.stderr));
    child.kill().unwrap();
    child.wait().unwrap();
    let down = healthcheck(&["--timeout-ms", "1000"]);
    assert!(!down.status.success());
    let why = String::from_utf8_lossy(&down.stderr);
    assert!(why.contains("cannot connect"), "{why}");
}

#[test]
fn plain_http_beyond_loopback_needs_allow_plaintext_and_check_warns_about_it() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture_policies(&dir.path().join("policies"), &crate::support::refused_url());
    let config = crate::support::write_serve_config(dir.path(), "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen: 127.0.0.1:0\n", "listen: 0.0.0.0:0\n");
    std::fs::write(&config, &text).unwrap();
    let bin = env!("CARGO_BIN_EXE_toolgate");
    let check = || {
        Command::new(bin)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let refused = check();
    assert!(!refused.status.success());
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(out.contains("listen") && out.contains("allow_plaintext"), "{out}");
    let serve = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!serve.status.success(), "serve started in plain HTTP on 0.0.0.0");

    std::fs::write(&config, format!("{text}allow_plaintext: true\n")).unwrap();
    let allowed = check();
    let out = String::from_utf8_lossy(&allowed.stdout);
    assert!(allowed.status.success(), "{out}");
    assert!(out.contains("warning") && out.contains("plain HTTP"), "{out}");
}
