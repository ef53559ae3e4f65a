//! Approval notifications that reach people: POSTed over HTTPS to a receiver that verifies
//! them as Stripe's and Slack's receivers do — HMAC-SHA256 over `<t>.<body>` with the shared
//! secret, computed here independently, a timestamp within five minutes, a delivery id taken
//! once — retried with back-off when the receiver fails, and in Slack's format with a link to
//! the inbox entry.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::{
    SUPPORT_KEY, Serving, TestUpstream, fixture, send, serve_trusting_fixture_ca, write_fixture_policies,
};

const SECRET: &str = "whsec-test-0f9e8d7c";

/// One delivery as the receiver saw it, and what it answered.
#[derive(Clone, Debug)]
struct Delivery {
    headers: http::HeaderMap,
    body: bytes::Bytes,
    status: u16,
}

/// The receiver's check, as its docs would have it: `Ok` or why not.
fn verify(headers: &http::HeaderMap, body: &[u8], now: u64, seen: &mut HashSet<String>) -> Result<(), &'static str> {
    let sig = headers
        .get("x-toolgate-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or("unsigned")?;
    let (t, v1) = sig
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .ok_or("malformed signature")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&hex::decode(v1).map_err(|_| "malformed signature")?)
        .map_err(|_| "bad signature")?;
    let t: u64 = t.parse().map_err(|_| "malformed timestamp")?;
    if t.abs_diff(now) > 300 {
        return Err("stale timestamp");
    }
    let delivery = headers
        .get("x-toolgate-delivery")
        .and_then(|v| v.to_str().ok())
        .ok_or("no delivery id")?;
    if !seen.insert(delivery.to_owned()) {
        return Err("replayed");
    }
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HTTPS receiver (the fixture certificate for 127.0.0.1) that fails its first `fail_first`
/// deliveries with 503, then verifies each: 200, or 401 with why.
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Delivery>>>) {
    let acceptor = crate::tls_upstream::acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/hook", listener.local_addr().unwrap().port());
    let log: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let got = log.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, log, seen) = (acceptor.clone(), got.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let (log, seen) = (log.clone(), seen.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let mut log = log.lock().unwrap();
                        let (status, why) = if log.len() < fail_first {
                            (503, "busy")
                        } else {
                            match verify(&parts.headers, &body, now(), &mut seen.lock().unwrap()) {
                                Ok(()) => (200, "ok"),
                                Err(why) => (401, why),
                            }
                        };
                        log.push(Delivery {
                            headers: parts.headers,
                            body,
                            status,
                        });
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(bytes::Bytes::from(why)))
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
    (url, log)
}

/// An HTTPS client trusting the fixture CA (the receiver's certificate).
fn https_client() -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<bytes::Bytes>,
> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("tls").join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// `toolgate serve` whose refunds over 100 are held, notifying `webhook` (config lines).
fn serve(dir: &std::path::Path, upstream: &str, webhook: &str) -> (Serving, String) {
    let policies = dir.join("policies");
    write_fixture_policies(&policies, upstream);
    std::fs::write(
        policies.join("refunds.cedar"),
        "@id(\"big-refunds\")\n@approval(\"billing-leads\")\nforbid (principal, action == Action::\"billing.refund\", resource) when { context.input.amount > 100 };\n",
    )
    .unwrap();
    let d = dir.display();
    let cfg = dir.join("toolgate.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, public_url: \"https://toolgate-admin.example.com\" }}\npolicies: {d}/policies\naudit: {{ file: {d}/audit.jsonl }}\napprovals: {{ store: {d}/approvals.redb, webhook: {webhook} }}\n"
        ),
    )
    .unwrap();
    let (serving, data, _) = serve_trusting_fixture_ca(&cfg, &[("HOOK_SECRET", SECRET)]);
    (serving, data)
}

async fn hold(data: &str, order: &str) -> String {
    let r = send(
        "POST",
        &format!("{data}/v1/tools/billing.refund"),
        &[("authorization", format!("Bearer {SUPPORT_KEY}"))],
        format!(r#"{{"order_id": "{order}", "amount": 250}}"#).into_bytes(),
    )
    .await;
    r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn deliveries(log: &Arc<Mutex<Vec<Delivery>>>, n: usize) -> Vec<Delivery> {
    for _ in 0..200 {
        if log.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    log.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_signed_retried_and_a_replay_is_refused() {
    let (url, log) = receiver(1).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_gw, data) = serve(
        dir.path(),
        &upstream.url,
        &format!("{{ url: \"{url}\", secret_env: HOOK_SECRET, max_attempts: 3, backoff_ms: 100 }}"),
    );
    let id = hold(&data, "O-7").await;

    // The first attempt met a busy receiver (503); the retry, 100 ms later, was taken.
    let seen = deliveries(&log, 2).await;
    assert_eq!(seen.iter().map(|d| d.status).collect::<Vec<_>>(), [503, 200]);
    let delivery = |d: &Delivery| d.headers["x-toolgate-delivery"].to_str().unwrap().to_owned();
    assert_eq!(
        delivery(&seen[0]),
        delivery(&seen[1]),
        "one notification, one delivery id"
    );
    let note: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(
        (&note["event"], &note["approval_id"]),
        (&json!("approval_requested"), &json!(id))
    );
    assert_eq!(
        note["inbox_url"],
        format!("https://toolgate-admin.example.com/ui/#{id}")
    );

    // The same request again, byte for byte: refused as a replay. With its body changed, or
    // its signature's timestamp moved, it no longer verifies.
    let mut seen_ids = HashSet::new();
    let ok = &seen[1];
    assert_eq!(verify(&ok.headers, &ok.body, now(), &mut seen_ids), Ok(()));
    assert_eq!(verify(&ok.headers, &ok.body, now(), &mut seen_ids), Err("replayed"));
    let mut tampered = ok.body.to_vec();
    tampered[10] ^= 1;
    assert_eq!(
        verify(&ok.headers, &tampered, now(), &mut HashSet::new()),
        Err("bad signature")
    );
    assert_eq!(
        verify(&ok.headers, &ok.body, now() + 3600, &mut HashSet::new()),
        Err("stale timestamp")
    );
    // …and the receiver itself refuses the replay sent over the wire.
    let client = https_client();
    let mut replay = http::Request::post(&url);
    for (k, v) in &ok.headers {
        if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
            replay = replay.header(k, v);
        }
    }
    let answer = client
        .request(replay.body(Full::new(ok.body.clone())).unwrap())
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_message_links_to_the_inbox_entry_and_escapes_what_the_agent_sent() {
    let (url, log) = receiver(0).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_gw, data) = serve(
        dir.path(),
        &upstream.url,
        &format!("{{ url: \"{url}\", secret_env: HOOK_SECRET, format: slack }}"),
    );
    let id = hold(&data, "<!channel> <https://evil.example|click>").await;
    let seen = deliveries(&log, 1).await;
    assert_eq!(seen[0].status, 200, "signed like every format");
    let msg: Value = serde_json::from_slice(&seen[0].body).unwrap();
    let link = format!("https://toolgate-admin.example.com/ui/#{id}");
    assert!(msg["text"].as_str().unwrap().contains(&link), "{msg}");
    let blocks = msg["blocks"].as_array().unwrap();
    let button = blocks.iter().find(|b| b["type"] == "actions").unwrap();
    assert_eq!(button["elements"][0]["url"], link.as_str());
    let text = msg.to_string();
    assert!(text.contains("&lt;!channel&gt;"), "{text}");
    assert!(
        !text.contains("<!channel>") && !text.contains("<https://evil"),
        "{text}"
    );
}
