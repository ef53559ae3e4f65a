//! Content filters over real HTTP: every evasion form the filters must see through, checked
//! against what the upstream did (not) receive.

use crate::support::{Harness, SUPPORT_KEY};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_terms_cannot_be_evaded() {
    let h = Harness::start().await;
    let evasions = [
        ("case", r#"{"query": "PrOjEcT FaLcOn"}"#.to_owned()),
        (
            "full-width letters (NFKC)",
            json!({"query": "ｐｒｏｊｅｃｔ ｆａｌｃｏｎ"}).to_string(),
        ),
        (
            "ligature (NFKC)",
            json!({"query": "the classi\u{FB01}ed report"}).to_string(),
        ),
        (
            "zero-width space",
            json!({"query": "pro\u{200B}ject fal\u{200B}con"}).to_string(),
        ),
        (
            "zero-width joiner and soft hyphen",
            json!({"query": "proj\u{200D}ect fal\u{00AD}con"}).to_string(),
        ),
        (
            "word joiner and BOM",
            json!({"query": "project\u{2060} \u{FEFF}falcon"}).to_string(),
        ),
        (
            "non-breaking space",
            json!({"query": "project\u{00A0}falcon"}).to_string(),
        ),
        (
            "repeated and odd whitespace",
            "{\"query\": \"project \\t\\n  \\u2003 falcon\"}".to_owned(),
        ),
        ("JSON escapes", r#"{"query": "project \u0066alcon"}"#.to_owned()),
        (
            "escaped everything",
            r#"{"query": "\u0070\u0072\u006f\u006a\u0065\u0063\u0074\u0020\u0066\u0061\u006c\u0063\u006f\u006e"}"#
                .to_owned(),
        ),
        ("in a key", r#"{"query": "ok", "project falcon": 1}"#.to_owned()),
        (
            "deep in arrays and objects",
            r#"{"query": "ok", "x": [{"y": [["Project Falcon"]]}]}"#.to_owned(),
        ),
    ];
    for (what, body) in &evasions {
        let r = h.call("kb.search", Some(SUPPORT_KEY), body).await;
        assert_eq!(r.status, 403, "{what} slipped through: {:?}", r.body);
        assert_eq!(r.json()["error"]["code"], "content_blocked", "{what}");
        assert_eq!(h.event_for(&r)["reasons"][0]["rule"], "internal-terms", "{what}");
    }
    assert_eq!(h.upstream.requests().len(), 0, "an evasive call reached the tool");
    // And an innocent look-alike passes.
    let r = h
        .call("kb.search", Some(SUPPORT_KEY), r#"{"query": "project falconry club"}"#)
        .await;
    assert_eq!(r.status, 403, "substring match: `falconry` contains the term");
    let r = h
        .call("kb.search", Some(SUPPORT_KEY), r#"{"query": "project eagle"}"#)
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_is_what_the_upstream_receives_and_checksums_decide() {
    let h = Harness::start().await;
    let body = json!({
        "ticket_id": "T-1",
        "body": "card 4111 1111 1111 1111",
        "ref": "order 4111 1111 1111 1112",
        "phone": "+14155550123",
        "nested": {"list": ["ssn 123-45-6789", "fine"]},
    });
    let r = h.call("tickets.reply", Some(SUPPORT_KEY), &body.to_string()).await;
    assert_eq!(r.status, 200);
    let seen = h.upstream.requests()[0].json();
    assert_eq!(seen["body"], "[REDACTED:credit_card]");
    assert_eq!(
        seen["ref"], "order 4111 1111 1111 1112",
        "a non-Luhn number is not a card"
    );
    assert_eq!(seen["phone"], "[REDACTED:phone]");
    assert_eq!(seen["nested"]["list"], json!(["[REDACTED:ssn]", "fine"]));
    let e = h.event_for(&r);
    let kinds: Vec<&str> = e["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert!(
        kinds.iter().any(|m| m.contains("credit_card")) && kinds.iter().any(|m| m.contains("ssn")),
        "{kinds:?}"
    );
    assert!(!e.to_string().contains("4111 1111 1111 1111"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redacted_argument_is_redacted_in_the_url_path_too() {
    let policy = "agents:\n  lookup-bot:\n    credentials: { api_key_sha256: [ \"KEY\" ] }\n    tools: [ users.get ]\ntools:\n  users.get:\n    upstream: { url: \"{{UPSTREAM}}/users/{email}\", method: GET }\n    arguments: { type: object, required: [ email ], properties: { email: { type: string } } }\n    filters: { input: [ pii ] }\n";
    let policy = policy.replace("KEY", &crate::support::sha256_hex("lookup-key"));
    let h = Harness::start_full("", &[("lookup.yaml", &policy)]).await;
    let r = h
        .call("users.get", Some("lookup-key"), r#"{"email": "ada@example.com"}"#)
        .await;
    assert_eq!(r.status, 200);
    let seen = &h.upstream.requests()[0];
    assert!(!seen.uri.contains("ada"), "{}", seen.uri);
    assert!(seen.uri.starts_with("/users/%5BREDACTED%3Aemail%5D"), "{}", seen.uri);
}
