//! JWT keys from an identity provider over HTTPS: OpenID Connect discovery at the issuer, the
//! key set fetched and cached, a rotated key picked up by one refetch (and no more than one per
//! `min_refetch_seconds`, whatever the tokens say), and a provider that was never reached
//! refusing JWT callers with 503 while API keys still work. The provider is a real HTTPS server
//! (the fixture certificate for 127.0.0.1), trusted by the real binary through `SSL_CERT_FILE`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{
    ANALYST_KEY, Serving, TestUpstream, fixture, read_events, refused_url, send, serve_trusting_fixture_ca,
    write_fixture_policies, write_serve_config,
};

/// The identity provider: its discovery document and its key set (which the test changes),
/// counting the key-set fetches.
struct Provider {
    issuer: String,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

/// The fixture key set, with only the keys named.
fn key_set(kids: &[&str]) -> Value {
    let all: Value = serde_json::from_str(&std::fs::read_to_string(fixture("jwt/jwks.json")).unwrap()).unwrap();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    json!({ "keys": keys })
}

async fn provider(kids: &[&str]) -> Provider {
    let acceptor = crate::tls_upstream::acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let jwks = Arc::new(Mutex::new(key_set(kids)));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (iss, set, count) = (issuer.clone(), jwks.clone(), fetches.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, iss, set, count) = (acceptor.clone(), iss.clone(), set.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => {
                            json!({"issuer": iss, "jwks_uri": format!("{iss}/keys")})
                        }
                        "/keys" => {
                            count.fetch_add(1, Ordering::SeqCst);
                            set.lock().unwrap().clone()
                        }
                        _ => json!({}),
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(body.to_string())))
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
    Provider { issuer, jwks, fetches }
}

fn token(issuer: &str, alg: Algorithm, kid: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "svc-oidc-bot", "iss": issuer, "aud": "toolgate", "exp": now + 300, "iat": now});
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt/rsa.pem")).unwrap()),
        _ => EncodingKey::from_ec_pem(&std::fs::read(fixture("jwt/ec.pem")).unwrap()),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// `toolgate serve` with the fixture agents, `oidc-bot` identified by JWTs from `issuer`
/// (discovery), trusting the fixture CA.
fn serve(dir: &std::path::Path, issuer: &str, upstream: &str) -> (Serving, String) {
    let policies = dir.join("policies");
    write_fixture_policies(&policies, upstream);
    let auth = format!(
        "auth:\n  jwt: {{ issuer: \"{issuer}\", audience: toolgate, min_refetch_seconds: 3 }}\nagents:\n  oidc-bot:\n    credentials: {{ jwt_subject: svc-oidc-bot }}\n    tools: [ kb.* ]\n"
    );
    std::fs::write(policies.join("oidc.yaml"), auth).unwrap();
    let cfg = write_serve_config(dir, "");
    let (serving, data, _) = serve_trusting_fixture_ca(&cfg, &[]);
    (serving, data)
}

async fn call(data: &str, bearer: &str) -> crate::support::Resp {
    let headers = vec![("authorization", format!("Bearer {bearer}"))];
    send(
        "POST",
        &format!("{data}/v1/tools/kb.search"),
        &headers,
        br#"{"query":"q"}"#.to_vec(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_discovery_and_a_rotated_key_is_fetched_once() {
    let idp = provider(&["rsa-1"]).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, data) = serve(dir.path(), &idp.issuer, &upstream.url);

    let r = call(&data, &token(&idp.issuer, Algorithm::RS256, "rsa-1")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let events = read_events(&dir.path().join("audit.jsonl"));
    assert_eq!(events.last().unwrap()["agent"], "oidc-bot");

    // A key the provider does not publish: refused, and however many such tokens arrive, the
    // key set is fetched at most once per `min_refetch_seconds` (3 s; these take far less).
    let before = idp.fetches.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = call(&data, &token(&idp.issuer, Algorithm::ES256, "ec-1")).await;
        r.assert_error(401, "unauthenticated");
    }
    let fetched = idp.fetches.load(Ordering::SeqCst) - before;
    assert!(fetched <= 1, "unknown key ids made {fetched} fetches");

    // The provider rotates: its new key is fetched when a token names it.
    *idp.jwks.lock().unwrap() = key_set(&["rsa-1", "ec-1"]);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = call(&data, &token(&idp.issuer, Algorithm::ES256, "ec-1")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // And a key it dropped is no longer trusted once the set is fetched again.
    *idp.jwks.lock().unwrap() = key_set(&["ec-1"]);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = call(&data, &token(&idp.issuer, Algorithm::ES256, "ec-2-unknown")).await;
    r.assert_error(401, "unauthenticated");
    let r = call(&data, &token(&idp.issuer, Algorithm::RS256, "rsa-1")).await;
    r.assert_error(401, "unauthenticated");
    drop(child);
    assert_eq!(upstream.count("/"), 2, "only the two verified calls reached the tool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_never_reached_refuses_jwt_callers_with_503_and_api_keys_still_work() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = refused_url().replace("http://", "https://");
    let (child, data) = serve(dir.path(), &issuer, &upstream.url);
    let r = call(&data, &token(&issuer, Algorithm::RS256, "rsa-1")).await;
    let body = r.assert_error(503, "unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("keys"), "{body}");
    let events = read_events(&dir.path().join("audit.jsonl"));
    let event = events
        .iter()
        .find(|e| e["request_id"] == r.request_id())
        .expect("audited");
    assert_eq!(event["code"], "unavailable");
    assert_eq!(event["decision"], "deny");
    let r = call(&data, ANALYST_KEY).await;
    assert_eq!(r.status, 200);
    drop(child);
    assert_eq!(upstream.count("/"), 1, "only the API-key call reached the tool");
}

/// An admin token from the identity provider: its `email` names the person, its `groups` give
/// the approval groups and, through `admin.roles`, the operator role.
fn admin_token(issuer: &str, email: &str, groups: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": format!("u-{email}"), "email": email, "groups": groups, "iss": issuer,
        "aud": "toolgate-admin", "exp": now + 300, "iat": now});
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt/rsa.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_callers_sign_in_with_the_identity_provider() {
    let idp = provider(&["rsa-1"]).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    write_fixture_policies(&policies, &upstream.url);
    std::fs::write(
        policies.join("refunds.cedar"),
        "@id(\"big-refunds\")\n@approval(\"billing-leads\")\nforbid (principal, action == Action::\"billing.refund\", resource) when { context.input.amount > 100 };\n",
    )
    .unwrap();
    let d = dir.path().display();
    let cfg = dir.path().join("toolgate.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  token_env: TOOLGATE_TEST_UNSET_TOKEN\n  oidc: {{ issuer: \"{}\", audience: toolgate-admin }}\n  roles: {{ operator: [ platform-admins ] }}\npolicies: {d}/policies\naudit: {{ file: {d}/audit.jsonl }}\napprovals: {{ store: {d}/approvals.redb }}\n",
            idp.issuer
        ),
    )
    .unwrap();
    let (_child, data, admin) = serve_trusting_fixture_ca(&cfg, &[]);

    let held = send(
        "POST",
        &format!("{data}/v1/tools/billing.refund"),
        &[("authorization", format!("Bearer {}", crate::support::SUPPORT_KEY))],
        br#"{"order_id": "O-1", "amount": 250}"#.to_vec(),
    )
    .await;
    let id = held.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_ = |token: String| vec![("authorization", format!("Bearer {token}"))];
    let approve = format!("{admin}/admin/approvals/{id}/approve");
    // A platform admin operates, but is not in billing-leads.
    let ops = admin_token(&idp.issuer, "pia@example.com", &["platform-admins"]);
    let r = send("POST", &format!("{admin}/admin/reload"), &as_(ops.clone()), Vec::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    send("POST", &approve, &as_(ops), Vec::new())
        .await
        .assert_error(403, "forbidden");
    // A token for another audience, or signed by a key the provider does not publish: nobody.
    let mut wrong = admin_token(&idp.issuer, "eve@example.com", &["billing-leads"]);
    wrong.pop();
    send("POST", &approve, &as_(wrong), Vec::new())
        .await
        .assert_error(401, "unauthenticated");
    // A billing lead approves, as themselves.
    let lead = admin_token(&idp.issuer, "lou@example.com", &["billing-leads"]);
    let r = send("POST", &approve, &as_(lead.clone()), Vec::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // …but may not reload.
    send("POST", &format!("{admin}/admin/reload"), &as_(lead), Vec::new())
        .await
        .assert_error(403, "forbidden");
    let events = read_events(&dir.path().join("audit.jsonl"));
    let decided: Vec<&Value> = events.iter().filter(|e| e["event"] == "approval_decided").collect();
    assert_eq!(decided.len(), 1);
    assert_eq!(
        (&decided[0]["by"], &decided[0]["via"]),
        (&json!("lou@example.com"), &json!("oidc"))
    );
    let reloaded = events.iter().find(|e| e["event"] == "policy_reloaded");
    // The reload found nothing new (no event), so the refusals tell who was who.
    assert!(reloaded.is_none());
    let refused: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "admin_refused")
        .map(|e| e["by"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["pia@example.com", "lou@example.com"]);
}
