//! A whole candidate policy decided beside the enforced one (`shadow_policies`): the enforced
//! decisions do not change, the audit events and `/metrics` name the calls the candidate would
//! have decided otherwise, and the candidate is reloaded (a broken one keeps the last good).

use serde_json::Value;

use crate::support::{ANALYST_KEY, Harness, SUPPORT_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_is_decided_beside_and_never_enforced() {
    let h = Harness::start_with("shadow_policies: {{DIR}}/shadow\n").await;
    // The candidate: the policy in force, but support-bot may no longer read tickets.
    let shadow = h.dir.path().join("shadow");
    std::fs::create_dir_all(&shadow).unwrap();
    for e in std::fs::read_dir(&h.policy_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), shadow.join(e.file_name())).unwrap();
    }
    let agents = std::fs::read_to_string(shadow.join("agents.yaml")).unwrap();
    let narrowed = agents.replacen("tools: [ tickets.read, tickets.reply,", "tools: [ tickets.reply,", 1);
    assert_ne!(narrowed, agents);
    std::fs::write(shadow.join("agents.yaml"), narrowed).unwrap();
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let loaded: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reloaded" && e["shadow"] == true)
        .collect();
    assert_eq!(loaded.len(), 1, "the candidate's load is on the trail");

    // Enforced: allowed, and it reached the tool. The candidate would have refused it.
    let r = h
        .call("tickets.read", Some(SUPPORT_KEY), r#"{"ticket_id": "T-1"}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let e = h.event_for(&r);
    assert_eq!(e["decision"], "allow");
    assert_eq!(
        (&e["shadow"]["decision"], &e["shadow"]["code"]),
        (&"deny".into(), &"tool_not_allowed".into())
    );
    assert_eq!(e["shadow"]["policy_version"], loaded[0]["policy_version"]);
    assert_eq!(h.upstream.count("/tickets"), 1);
    // Where both agree, the event says nothing of the shadow.
    let same = h.call("kb.search", Some(ANALYST_KEY), r#"{"query": "q"}"#).await;
    assert_eq!(same.status, 200);
    assert!(h.event_for(&same).get("shadow").is_none());
    let metrics = String::from_utf8(h.admin("GET", "/metrics", false).await.body.to_vec()).unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("toolgate_shadow_differences_total{"))
        .unwrap_or_else(|| panic!("no shadow metric in:\n{metrics}"));
    assert!(
        line.contains("rule=\"allowlist\"") && line.contains("enforced=\"allow\"") && line.contains("shadow=\"deny\""),
        "{line}"
    );

    // A broken candidate: refused, audited, and the last good one still decides beside.
    std::fs::write(shadow.join("broken.yaml"), "agents: { x: { tols: [] } }\n").unwrap();
    assert_eq!(
        h.admin("POST", "/admin/reload", true).await.status,
        200,
        "the enforced policy is unaffected"
    );
    assert!(
        h.audit()
            .iter()
            .any(|e| e["event"] == "policy_reload_failed" && e["shadow"] == true)
    );
    let r = h
        .call("tickets.read", Some(SUPPORT_KEY), r#"{"ticket_id": "T-2"}"#)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["shadow"]["decision"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_in_shadow_mode_reports_and_changes_nothing() {
    let policy = format!(
        "agents:\n  trial-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ notes.echo ]\ntools:\n  notes.echo:\n    upstream: {{ url: \"{{{{UPSTREAM}}}}/secret-echo\" }}\n    filters: {{ input: [ trial-terms, trial-pii ], output: [ trial-out ] }}\nfilters:\n  trial-terms: {{ deny_terms: [ \"refund everything\" ], action: block, mode: shadow }}\n  trial-pii: {{ detect: [ email ], action: redact, mode: shadow }}\n  trial-out: {{ deny_terms: [ \"secret-echo\" ], action: block, mode: shadow }}\n",
        crate::support::sha256_hex("trial-key")
    );
    let h = Harness::start_full("", &[("trial.yaml", &policy)]).await;
    let r = h
        .call(
            "notes.echo",
            Some("trial-key"),
            r#"{"text": "please refund everything to ada@example.com"}"#,
        )
        .await;
    // Enforced: nothing blocked, nothing redacted, on the way in or out.
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("secret-echo"));
    let sent = h.upstream.requests().pop().unwrap();
    assert!(
        String::from_utf8_lossy(&sent.body).contains("ada@example.com"),
        "the shadow redactor changed nothing"
    );
    // Reported: the input filters in `would_deny`, the output filter as a note.
    let e = h.event_for(&r);
    assert_eq!(e["decision"], "allow");
    assert_eq!(
        e["would_deny"],
        serde_json::json!(["filter:trial-terms", "filter:trial-pii"])
    );
    let notes: Vec<&str> = e["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["message"].as_str())
        .collect();
    assert!(
        notes
            .iter()
            .any(|m| m.contains("'trial-out' (shadow mode) would have blocked")),
        "{notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_in_shadow_mode_still_allows_and_says_who_relies_on_it() {
    let policy = format!(
        "agents:\n  narrowing-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ kb.search, {{ tool: tickets.*, mode: shadow }} ]\n",
        crate::support::sha256_hex("narrowing-key")
    );
    let h = Harness::start_full("", &[("narrowing.yaml", &policy)]).await;
    // A call only the shadow grant allows: it passes, and the event names the grant.
    let r = h
        .call("tickets.read", Some("narrowing-key"), r#"{"ticket_id": "T-9"}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let e = h.event_for(&r);
    assert_eq!(e["would_deny"], serde_json::json!(["grant:tickets.*"]));
    assert_eq!(h.upstream.count("/tickets"), 1);
    // A call an enforced grant allows: nothing to report.
    let r = h.call("kb.search", Some("narrowing-key"), r#"{"query": "q"}"#).await;
    assert_eq!(r.status, 200);
    assert!(h.event_for(&r).get("would_deny").is_none());
    // And what no grant allows is still refused.
    h.call(
        "billing.refund",
        Some("narrowing-key"),
        r#"{"order_id": "O-1", "amount": 1}"#,
    )
    .await
    .assert_error(403, "tool_not_allowed");
}
