//! JWT bearer tokens over real HTTP: RS256 and ES256 from a JWKS file; expiry with leeway;
//! issuer and audience; `alg: none` and HS/RS confusion refused.

use crate::support::{self, Harness, fixture, send};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const AUTH: &str = r#"
auth:
  jwt: { issuer: "https://idp.test", audience: toolgate, jwks_file: "{{FIXTURES}}/jwt/jwks.json" }
agents:
  jwt-bot:
    credentials: { jwt_subject: "svc-jwt-bot" }
    tools: [ kb.* ]
"#;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"sub": "svc-jwt-bot", "iss": "https://idp.test", "aud": "toolgate", "exp": now() + 300, "iat": now()})
}

fn rs256(claims: &Value, kid: &str) -> String {
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt/rsa.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn es256(claims: &Value, kid: &str) -> String {
    let key = EncodingKey::from_ec_pem(&std::fs::read(fixture("jwt/ec.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn call(h: &Harness, token: &str) -> support::Resp {
    let headers = vec![("authorization", format!("Bearer {token}"))];
    send(
        "POST",
        &format!("{}/v1/tools/kb.search", h.data),
        &headers,
        br#"{"query":"q"}"#.to_vec(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_rs256_and_es256_tokens_from_the_jwks() {
    let h = Harness::start_full("", &[("auth.yaml", AUTH)]).await;
    for token in [rs256(&claims(), "rsa-1"), es256(&claims(), "ec-1")] {
        let r = call(&h, &token).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(h.event_for(&r)["agent"], "jwt-bot");
        assert!(
            !h.event_for(&r).to_string().contains(&token[20..]),
            "the token reached the audit log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerates_small_clock_skew_but_not_expiry() {
    let h = Harness::start_full("", &[("auth.yaml", AUTH)]).await;
    let mut c = claims();
    c["exp"] = json!(now() - 10);
    assert_eq!(call(&h, &rs256(&c, "rsa-1")).await.status, 200);
    c["exp"] = json!(now() - 120);
    let body = call(&h, &rs256(&c, "rsa-1")).await.assert_error(401, "unauthenticated");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"));
    c["exp"] = json!(now() + 300);
    c["nbf"] = json!(now() + 600);
    call(&h, &rs256(&c, "rsa-1")).await.assert_error(401, "unauthenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_wrong_issuer_audience_subject_and_missing_claims() {
    let h = Harness::start_full("", &[("auth.yaml", AUTH)]).await;
    for (key, value) in [
        ("iss", json!("https://evil.test")),
        ("aud", json!("other")),
        ("sub", json!("svc-unknown")),
    ] {
        let mut c = claims();
        c[key] = value;
        call(&h, &rs256(&c, "rsa-1")).await.assert_error(401, "unauthenticated");
    }
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    call(&h, &rs256(&c, "rsa-1")).await.assert_error(401, "unauthenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_alg_none_and_algorithm_confusion() {
    let h = Harness::start_full("", &[("auth.yaml", AUTH)]).await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        b64(&claims())
    );
    call(&h, &none).await.assert_error(401, "unauthenticated");

    // HS256 signed with the RSA public key as the HMAC secret: the classic confusion attack.
    let public_pem = std::fs::read(fixture("jwt/rsa.pub.pem")).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let confused = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&public_pem)).unwrap();
    call(&h, &confused).await.assert_error(401, "unauthenticated");

    // A token whose kid names the RSA key but is signed with the EC key.
    call(&h, &es256(&claims(), "rsa-1"))
        .await
        .assert_error(401, "unauthenticated");
    // A valid signature with its last byte changed.
    let mut t = rs256(&claims(), "rsa-1");
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    call(&h, &t).await.assert_error(401, "unauthenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_outside_the_policy_directory_is_picked_up() {
    let full: Value = serde_json::from_slice(&std::fs::read(fixture("jwt/jwks.json")).unwrap()).unwrap();
    let mut rsa_only = full.clone();
    rsa_only["keys"].as_array_mut().unwrap().retain(|k| k["kid"] == "rsa-1");
    let auth = AUTH.replace("{{FIXTURES}}/jwt/jwks.json", "{{DIR}}/jwks.json");
    // Written next to the policy directory, not in it.
    let h = Harness::start_full("", &[("../jwks.json", &rsa_only.to_string()), ("auth.yaml", &auth)]).await;
    let token = es256(&claims(), "ec-1");
    call(&h, &token).await.assert_error(401, "unauthenticated");

    // The identity provider adds a key.
    std::fs::write(h.dir.path().join("jwks.json"), full.to_string()).unwrap();
    let mut accepted = false;
    for _ in 0..60 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if call(&h, &token).await.status == 200 {
            accepted = true;
            break;
        }
    }
    assert!(accepted, "the new JWKS was not loaded");
    let reloaded: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reloaded")
        .collect();
    assert_eq!(reloaded.len(), 1);
    assert_eq!(reloaded[0]["trigger"], "file_change");
}

/// A token issued or valid only in the future, beyond the 30 s allowed for clock skew, is
/// refused; one a few seconds ahead (a clock slightly fast) is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_future_is_refused() {
    let h = Harness::start_full("", &[("auth.yaml", AUTH)]).await;
    let mut issued_ahead = claims();
    issued_ahead["iat"] = json!(now() + 3600);
    let mut valid_later = claims();
    valid_later["nbf"] = json!(now() + 3600);
    for (token, message) in [
        (rs256(&issued_ahead, "rsa-1"), "issued in the future"),
        (rs256(&valid_later, "rsa-1"), "not valid yet"),
    ] {
        let body = call(&h, &token).await.assert_error(401, "unauthenticated");
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{body}");
    }
    let mut slightly_fast = claims();
    slightly_fast["iat"] = json!(now() + 10);
    assert_eq!(call(&h, &rs256(&slightly_fast, "rsa-1")).await.status, 200);
}
