//! Business rules and approvals over real HTTP: every rule kind, decimals at the boundary,
//! shadow mode, the session-aware rules, and the whole approval cycle.

use crate::support::{Harness, Resp, TestUpstream, fixture, send, sha256_hex};
use serde_json::{Value, json};

pub(crate) const OPS_KEY: &str = "ops-key";
const FIN_KEY: &str = "fin-key";
const LIMITED_KEY: &str = "limited-key";

pub(crate) fn rule_files(upstream: &str) -> Vec<(&'static str, String)> {
    let tools = std::fs::read_to_string(fixture("rules/tools.yaml"))
        .unwrap()
        .replace("{{UPSTREAM}}", upstream)
        .replace("OPS_DIGEST", &sha256_hex(OPS_KEY))
        .replace("FIN_DIGEST", &sha256_hex(FIN_KEY))
        .replace("LIMITED_DIGEST", &sha256_hex(LIMITED_KEY));
    let rules = std::fs::read_to_string(fixture("rules/rules.cedar")).unwrap();
    vec![("rules-tools.yaml", tools), ("rules.cedar", rules)]
}

async fn start(extra_config: &str) -> Harness {
    // The rule files point at the harness's upstream, so they are written once it runs, then
    // loaded with an explicit reload.
    let h = Harness::start_with(extra_config).await;
    for (name, text) in rule_files(&h.upstream.url) {
        std::fs::write(h.policy_dir.join(name), text).unwrap();
    }
    let r = h.admin("POST", "/admin/reload", true).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let policy = h.admin("GET", "/admin/policy", true).await.json();
    let rules = policy["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["id"] == "external-email-trial" && r["mode"] == "shadow"),
        "{policy}"
    );
    h
}

/// The event for a response, and a check that the rule named in the body is the audited one.
fn audited(h: &Harness, r: &Resp) -> Value {
    let e = h.event_for(r);
    if r.status >= 400 || r.status == 202 {
        let body = r.json();
        assert_eq!(e["code"], body["error"]["code"]);
        assert_eq!(
            e["reasons"].as_array().unwrap().last().unwrap()["rule"],
            body["error"]["rule"]
        );
    }
    e
}

#[tokio::test]
async fn each_rule_kind_decides_and_is_audited() {
    let h = start("").await;
    // String equality, with an agent attribute (entity tag) as the exception.
    let r = h
        .call("deploy.run", Some(FIN_KEY), r#"{"env": "prod", "services": ["web"]}"#)
        .await;
    let body = r.assert_error(403, "rule_denied");
    assert_eq!(body["error"]["rule"], "prod-deploys-are-for-ops");
    assert_eq!(
        body["error"]["message"],
        "Only the ops team's agents may deploy to prod."
    );
    let e = audited(&h, &r);
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["reasons"][0]["stage"], "rules");
    let r = h
        .call("deploy.run", Some(OPS_KEY), r#"{"env": "prod", "services": ["web"]}"#)
        .await;
    assert_eq!(r.status, 200);
    // Sets, and a rule without @reason gets a message that names it.
    let r = h
        .call(
            "deploy.run",
            Some(OPS_KEY),
            r#"{"env": "dev", "services": ["web", "billing"]}"#,
        )
        .await;
    let body = r.assert_error(403, "rule_denied");
    assert_eq!(body["error"]["rule"], "never-deploy-billing");
    assert_eq!(
        body["error"]["message"],
        "Rule 'never-deploy-billing' forbids this call."
    );
    audited(&h, &r);
    // A hard forbid stays a deny even when an approval rule matches too.
    let r = h
        .call("pay.send", Some(OPS_KEY), r#"{"to": "sanctioned-co", "amount": 500}"#)
        .await;
    assert_eq!(
        r.assert_error(403, "rule_denied")["error"]["rule"],
        "no-payments-to-sanctioned"
    );
    assert_eq!(
        h.upstream.count("/deploy"),
        1,
        "only the permitted deploy reached the tool"
    );
    assert_eq!(h.upstream.count("/pay"), 0);
}

#[tokio::test]
async fn a_rule_that_errors_denies_instead_of_being_skipped() {
    let h = start("").await;
    assert_eq!(
        h.call("fraud.check", Some(OPS_KEY), r#"{"order_id": "O-1"}"#)
            .await
            .status,
        200
    );
    let r = h
        .call(
            "refund.issue",
            Some(OPS_KEY),
            r#"{"order_id": "O-1", "amount": 400000000000}"#,
        )
        .await;
    let body = r.assert_error(403, "rule_denied");
    assert_eq!(body["error"]["rule"], "overflow-guard");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be evaluated"),
        "{body}"
    );
    audited(&h, &r);
    // The same rule evaluates normally for an ordinary amount.
    let r = h
        .call("refund.issue", Some(OPS_KEY), r#"{"order_id": "O-1", "amount": 40}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(h.upstream.count("/refunds/"), 1);
}

#[tokio::test]
async fn decimals_cannot_be_dodged_at_the_boundary() {
    let h = start("").await;
    for (amount, expect) in [
        ("100", 200),
        ("100.0", 200),
        ("99.9999", 200),
        ("100.0001", 202),
        ("250.5", 202),
        ("1e3", 202),
    ] {
        let r = h
            .call(
                "pay.send",
                Some(OPS_KEY),
                &format!(r#"{{"to": "acme", "amount": {amount}}}"#),
            )
            .await;
        assert_eq!(r.status, expect, "amount {amount}: {:?}", r.body);
        if expect == 202 {
            assert_eq!(r.json()["error"]["rule"], "payments-over-100-need-finance");
        }
    }
    // More precision than a Cedar decimal holds: refused, never rounded below the threshold.
    let r = h
        .call("pay.send", Some(OPS_KEY), r#"{"to": "acme", "amount": 100.000000001}"#)
        .await;
    let body = r.assert_error(422, "invalid_arguments");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("4 decimal places"),
        "{body}"
    );
    assert_eq!(
        h.upstream.count("/pay"),
        3,
        "only the three amounts at or under 100 were paid"
    );
}

#[tokio::test]
async fn shadow_rules_are_audited_as_would_deny_and_never_enforced() {
    let h = start("").await;
    let r = h
        .call(
            "email.send",
            Some(OPS_KEY),
            r#"{"to": "bob@external.example", "body": "hi"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-toolgate-decision"), Some("allow"));
    let e = h.event_for(&r);
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["would_deny"], json!(["external-email-trial"]));
    assert_eq!(h.upstream.count("/email"), 1);
    let r = h
        .call(
            "email.send",
            Some(OPS_KEY),
            r#"{"to": "bob@internal.example", "body": "hi"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(h.event_for(&r).get("would_deny").is_none());
}

#[tokio::test]
async fn refund_only_after_a_fraud_check_of_the_same_order() {
    let h = start("").await;
    let refund = |order: &str| format!(r#"{{"order_id": "{order}", "amount": 10}}"#);
    let r = h.call("refund.issue", Some(OPS_KEY), &refund("O-1")).await;
    assert_eq!(
        r.assert_error(403, "rule_denied")["error"]["rule"],
        "refund-needs-fraud-check"
    );
    audited(&h, &r);
    assert_eq!(
        h.call("fraud.check", Some(OPS_KEY), r#"{"order_id": "O-2"}"#)
            .await
            .status,
        200
    );
    let r = h.call("refund.issue", Some(OPS_KEY), &refund("O-1")).await;
    r.assert_error(403, "rule_denied"); // another order's check does not count
    // Another agent's check does not count either.
    assert_eq!(
        h.call("fraud.check", Some(FIN_KEY), r#"{"order_id": "O-1"}"#)
            .await
            .status,
        200
    );
    h.call("refund.issue", Some(OPS_KEY), &refund("O-1"))
        .await
        .assert_error(403, "rule_denied");
    assert_eq!(
        h.call("fraud.check", Some(OPS_KEY), r#"{"order_id": "O-1"}"#)
            .await
            .status,
        200
    );
    let r = h.call("refund.issue", Some(OPS_KEY), &refund("O-1")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(h.upstream.count("/refunds/O-1"), 1);
}

#[tokio::test]
async fn at_most_three_refunds_per_hour() {
    let h = start("").await;
    for i in 1..=4 {
        assert_eq!(
            h.call("fraud.check", Some(OPS_KEY), &format!(r#"{{"order_id": "O-{i}"}}"#))
                .await
                .status,
            200
        );
    }
    for i in 1..=3 {
        let r = h
            .call(
                "refund.issue",
                Some(OPS_KEY),
                &format!(r#"{{"order_id": "O-{i}", "amount": 5}}"#),
            )
            .await;
        assert_eq!(r.status, 200, "refund {i}: {:?}", r.body);
    }
    let r = h
        .call("refund.issue", Some(OPS_KEY), r#"{"order_id": "O-4", "amount": 5}"#)
        .await;
    assert_eq!(
        r.assert_error(403, "rule_denied")["error"]["rule"],
        "refunds-at-most-3-per-hour"
    );
    assert_eq!(h.upstream.count("/refunds/"), 3);
    // Per agent: another agent still has its three.
    assert_eq!(
        h.call("fraud.check", Some(FIN_KEY), r#"{"order_id": "O-9"}"#)
            .await
            .status,
        200
    );
    let r = h
        .call("refund.issue", Some(FIN_KEY), r#"{"order_id": "O-9", "amount": 5}"#)
        .await;
    assert_eq!(r.status, 200);
}

/// Count rules hold under concurrency: calls that read history are decided one at a time per
/// agent, each seeing the ones decided before it, so 24 refunds sent at once pass exactly 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refunds_cannot_pass_a_count_rule_together() {
    let h = start("").await;
    for i in 0..24 {
        let r = h
            .call("fraud.check", Some(OPS_KEY), &format!(r#"{{"order_id": "O-{i}"}}"#))
            .await;
        assert_eq!(r.status, 200);
    }
    let calls = (0..24).map(|i| {
        let body = format!(r#"{{"order_id": "O-{i}", "amount": 5}}"#);
        let h = &h;
        async move { h.call("refund.issue", Some(OPS_KEY), &body).await.status }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 21, "{statuses:?}");
    assert_eq!(h.upstream.count("/refunds/"), 3);
}

#[tokio::test]
async fn no_email_after_reading_a_customer_in_the_same_session() {
    let h = start("").await;
    let email = r#"{"to": "team@internal.example", "body": "summary"}"#;
    let s1 = [("x-toolgate-session", "run-1")];
    let s2 = [("x-toolgate-session", "run-2")];
    assert_eq!(h.call_with("email.send", OPS_KEY, email, &s1).await.status, 200);
    let r = h
        .call_with("crm.read_customer", OPS_KEY, r#"{"customer_id": "C-1"}"#, &s1)
        .await;
    assert_eq!(r.status, 200);
    let r = h.call_with("email.send", OPS_KEY, email, &s1).await;
    let body = r.assert_error(403, "rule_denied");
    assert_eq!(body["error"]["rule"], "no-email-after-customer-read");
    let e = audited(&h, &r);
    assert_eq!(e["session"], "run-1");
    // Another session of the same agent is unaffected.
    assert_eq!(h.call_with("email.send", OPS_KEY, email, &s2).await.status, 200);
    assert_eq!(h.upstream.count("/email"), 2);
}

fn payment(amount: u32) -> String {
    format!(r#"{{"to": "acme", "amount": {amount}, "note": "invoice for ada@example.com"}}"#)
}

#[tokio::test]
async fn the_whole_approval_cycle() {
    let hook = TestUpstream::start().await;
    let h = start(&format!(
        "approvals: {{ store: {{{{DIR}}}}/approvals.redb, webhook: {{ url: \"{}/hook\" }} }}\n",
        hook.url
    ))
    .await;
    // Held: 202 with the approval id and where to poll; nothing reaches the tool.
    let r = h.call("pay.send", Some(OPS_KEY), &payment(250)).await;
    let body = r.assert_error(202, "approval_required");
    assert_eq!(r.header("x-toolgate-decision"), Some("approval_required"));
    let id = body["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(body["status_url"], format!("/v1/approvals/{id}"));
    assert_eq!(body["error"]["rule"], "payments-over-100-need-finance");
    let e = audited(&h, &r);
    assert_eq!(e["decision"], "approval_required");
    assert_eq!(e["approval_id"], id.as_str());
    assert_eq!(h.upstream.count("/pay"), 0);

    // The same call again while pending: the same approval, not a second one.
    let again = h.call("pay.send", Some(OPS_KEY), &payment(250)).await;
    assert_eq!(again.assert_error(202, "approval_required")["approval_id"], id.as_str());

    // The approvers were told once, with redacted arguments.
    let mut notified = Vec::new();
    for _ in 0..50 {
        notified = hook.requests();
        if !notified.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(notified.len(), 1, "one notification per approval request");
    let note = notified[0].json();
    assert_eq!(note["approval_id"], id.as_str());
    assert_eq!(note["group"], "finance-leads");
    assert_eq!(note["arguments"]["note"], "[REDACTED:email]");
    assert!(!String::from_utf8_lossy(&notified[0].body).contains("ada@example.com"));

    // The agent polls its own approval; another agent cannot see it.
    let poll = |key: &'static str| {
        let url = format!("{}/v1/approvals/{id}", h.data);
        async move { send("GET", &url, &[("authorization", format!("Bearer {key}"))], Vec::new()).await }
    };
    let p = poll(OPS_KEY).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.json()["status"], "pending");
    poll(FIN_KEY).await.assert_error(404, "not_found");
    // A wrong key is refused, and the attempt is on the trail with where it came from.
    let guess = poll("not-a-key").await;
    guess.assert_error(401, "unauthenticated");
    let e = h.refusal_for(&guess);
    assert_eq!(
        (e["endpoint"].as_str(), e["method"].as_str(), e["source"].as_str()),
        (Some("/v1/approvals/{id}"), Some("GET"), Some("127.0.0.1"))
    );

    // Presenting it before anyone approved: refused.
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(250), &[("x-toolgate-approval", &id)])
        .await;
    assert!(
        r.assert_error(403, "approval_denied")["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pending")
    );

    // Approvers list it; without a credential nobody decides it.
    let list = h.admin("GET", "/admin/approvals?status=pending", true).await;
    assert_eq!(list.json()["approvals"][0]["id"], id.as_str());
    let anon = h.admin("POST", &format!("/admin/approvals/{id}/approve"), false).await;
    anon.assert_error(401, "unauthenticated");
    let ok = h
        .admin_json(
            "POST",
            &format!("/admin/approvals/{id}/approve"),
            &json!({"by": "lee", "comment": "known vendor"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.json()["status"], "approved");
    let twice = h
        .admin_json("POST", &format!("/admin/approvals/{id}/deny"), &json!({"by": "lee"}))
        .await;
    twice.assert_error(409, "conflict");
    let decided: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "approval_decided")
        .collect();
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0]["by"], "admin-token");
    assert_eq!(decided[0]["comment"], "known vendor");
    assert_eq!(decided[0]["status"], "approved");

    // Changed arguments, another agent: refused, and the approval is not spent.
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(251), &[("x-toolgate-approval", &id)])
        .await;
    r.assert_error(403, "approval_denied");
    let r = h
        .call_with("pay.send", FIN_KEY, &payment(250), &[("x-toolgate-approval", &id)])
        .await;
    r.assert_error(403, "approval_denied");
    assert_eq!(h.upstream.count("/pay"), 0);

    // The exact call passes once, and the approval is then used.
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(250), &[("x-toolgate-approval", &id)])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let e = h.event_for(&r);
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["approval_id"], id.as_str());
    assert_eq!(h.upstream.count("/pay"), 1);
    let seen = &h.upstream.requests()[0];
    assert_eq!(seen.json()["amount"], 250);
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(250), &[("x-toolgate-approval", &id)])
        .await;
    assert!(
        r.assert_error(403, "approval_denied")["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
    assert_eq!(h.upstream.count("/pay"), 1);
    assert_eq!(poll(OPS_KEY).await.json()["status"], "used");

    // A denied approval never passes; a hard forbid ignores approvals.
    let r = h.call("pay.send", Some(OPS_KEY), &payment(300)).await;
    let denied_id = r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = h
        .admin_json(
            "POST",
            &format!("/admin/approvals/{denied_id}/deny"),
            &json!({"by": "lee", "comment": "no"}),
        )
        .await;
    assert_eq!(d.json()["status"], "denied");
    let r = h
        .call_with(
            "pay.send",
            OPS_KEY,
            &payment(300),
            &[("x-toolgate-approval", &denied_id)],
        )
        .await;
    r.assert_error(403, "approval_denied");
    let hard = r#"{"to": "sanctioned-co", "amount": 250, "note": "x"}"#;
    let r = h
        .call_with("pay.send", OPS_KEY, hard, &[("x-toolgate-approval", &id)])
        .await;
    r.assert_error(403, "rule_denied");
    assert_eq!(h.upstream.count("/pay"), 1);
}

#[tokio::test]
async fn approvals_expire() {
    // Expiry is in whole seconds: with a 1 s TTL a request made at x.999 s expires 1 ms later,
    // before it can be approved. 2 s leaves at least one whole second to approve in.
    let h = start("approvals: { store: {{DIR}}/approvals.redb, ttl_seconds: 2 }\n").await;
    let r = h.call("pay.send", Some(OPS_KEY), &payment(500)).await;
    let id = r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ok = h
        .admin_json("POST", &format!("/admin/approvals/{id}/approve"), &json!({"by": "lee"}))
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(500), &[("x-toolgate-approval", &id)])
        .await;
    assert!(
        r.assert_error(403, "approval_denied")["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    assert_eq!(h.upstream.count("/pay"), 0);
    let expired = h.admin("GET", "/admin/approvals?status=expired", true).await;
    assert_eq!(expired.json()["approvals"][0]["id"], id.as_str());
    // An expired request no longer holds its place: the same call asks anew.
    let r = h.call("pay.send", Some(OPS_KEY), &payment(500)).await;
    assert_ne!(r.assert_error(202, "approval_required")["approval_id"], id.as_str());
}

#[tokio::test]
async fn an_approval_covers_only_the_rules_that_held_the_call() {
    let h = start("").await;
    let r = h.call("pay.send", Some(OPS_KEY), &payment(500)).await;
    let id = r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ok = h
        .admin_json("POST", &format!("/admin/approvals/{id}/approve"), &json!({"by": "lee"}))
        .await;
    assert_eq!(ok.status, 200);
    // Security adds a second approval rule that this very call now also matches.
    let extra = "@id(\"new-vendor-payments\")\n@approval(\"security\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.to == \"acme\" };\n";
    std::fs::write(h.policy_dir.join("extra.cedar"), extra).unwrap();
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(500), &[("x-toolgate-approval", &id)])
        .await;
    let body = r.assert_error(403, "approval_denied");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not cover every rule"),
        "{body}"
    );
    assert_eq!(h.upstream.count("/pay"), 0);
    // A new request names both rules and both groups; one approval then covers both.
    let r = h.call("pay.send", Some(OPS_KEY), &payment(500)).await;
    let held = r.assert_error(202, "approval_required");
    let both = held["approval_id"].as_str().unwrap().to_owned();
    assert_ne!(both, id);
    let listed = h.admin("GET", &format!("/admin/approvals/{both}"), true).await.json();
    assert_eq!(
        listed["rules"],
        json!(["new-vendor-payments", "payments-over-100-need-finance"])
    );
    assert_eq!(listed["group"], "finance-leads, security");
    let ok = h
        .admin_json(
            "POST",
            &format!("/admin/approvals/{both}/approve"),
            &json!({"by": "lee"}),
        )
        .await;
    assert_eq!(ok.status, 200);
    let r = h
        .call_with("pay.send", OPS_KEY, &payment(500), &[("x-toolgate-approval", &both)])
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(h.upstream.count("/pay"), 1);
}

#[tokio::test]
async fn a_call_refused_by_a_rate_limit_does_not_spend_its_approval() {
    let h = start("").await;
    let r = h.call("pay.send", Some(LIMITED_KEY), &payment(500)).await;
    let id = r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ok = h
        .admin_json("POST", &format!("/admin/approvals/{id}/approve"), &json!({"by": "lee"}))
        .await;
    assert_eq!(ok.status, 200);
    // The agent's one call a minute goes to a small payment...
    assert_eq!(h.call("pay.send", Some(LIMITED_KEY), &payment(5)).await.status, 200);
    // ...so the approved call is refused by the limit, and the approval is still there.
    let r = h
        .call_with("pay.send", LIMITED_KEY, &payment(500), &[("x-toolgate-approval", &id)])
        .await;
    r.assert_error(429, "rate_limited");
    let status = send(
        "GET",
        &format!("{}/v1/approvals/{id}", h.data),
        &[("authorization", format!("Bearer {LIMITED_KEY}"))],
        Vec::new(),
    )
    .await;
    assert_eq!(status.json()["status"], "approved");
    assert_eq!(h.upstream.count("/pay"), 1);
}
