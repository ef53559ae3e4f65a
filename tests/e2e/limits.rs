//! Rate limits, token budgets and quarantine over real HTTP, including races: concurrent calls
//! counted at the upstream can never exceed what a limit admits.

use crate::support::{self, Harness, send, sha256_hex};
use futures_util::future::join_all;
use serde_json::Value;

fn agents() -> String {
    format!(
        r#"
agents:
  limited-bot:
    credentials: {{ api_key_sha256: [ "{}" ] }}
    tools: [ kb.*, billing.refund ]
    limits: {{ calls_per_minute: 5 }}
  budget-bot:
    credentials: {{ api_key_sha256: [ "{}" ] }}
    tools: [ kb.*, billing.refund ]
    limits: {{ tokens_per_hour: 1000 }}
  tooled-bot:
    credentials: {{ api_key_sha256: [ "{}" ] }}
    tools: [ kb.*, billing.refund ]
    limits: {{ calls_per_minute: 100, tools: {{ billing.refund: {{ calls_per_minute: 2 }} }} }}
  watched-bot:
    credentials: {{ api_key_sha256: [ "{}" ] }}
    tools: [ kb.* ]
anomaly:
  window_seconds: 60
  quarantine: true
  quarantine_seconds: 0
  thresholds: {{ tool_not_allowed: 3, content_blocked: 2, rate_limited: 0 }}
"#,
        sha256_hex("limited-key"),
        sha256_hex("budget-key"),
        sha256_hex("tooled-key"),
        sha256_hex("watched-key")
    )
}

async fn harness() -> Harness {
    let a = agents();
    Harness::start_full("", &[("limits.yaml", a.as_str())]).await
}

async fn burst(h: &Harness, key: &str, tool: &str, body: &str, n: usize) -> Vec<support::Resp> {
    join_all((0..n).map(|_| h.call(tool, Some(key), body))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_calls_never_pass_a_rate_limit_of_five() {
    let h = harness().await;
    let results = burst(&h, "limited-key", "kb.search", r#"{"query":"q"}"#, 64).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 5);
    assert_eq!(
        h.upstream.count("/kb/search"),
        5,
        "the upstream saw more calls than the limit admits"
    );
    for r in results.iter().filter(|r| r.status != 200) {
        r.assert_error(429, "rate_limited");
        let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tool_limits_are_tighter_than_the_agents() {
    let h = harness().await;
    let results = burst(
        &h,
        "tooled-key",
        "billing.refund",
        r#"{"order_id":"O-1","amount":1}"#,
        10,
    )
    .await;
    assert_eq!(results.iter().filter(|r| r.status == 200).count(), 2);
    let denied = results.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(h.event_for(denied)["reasons"][0]["rule"], "tool calls_per_minute");
    // Other tools still have the agent's allowance.
    assert_eq!(
        h.call("kb.search", Some("tooled-key"), r#"{"query":"q"}"#).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_spend_more_than_the_token_budget() {
    let h = harness().await;
    // ~400 bytes of arguments: 100 tokens each against a budget of 1000.
    let body = format!(r#"{{"query":"{}"}}"#, "x".repeat(388));
    assert_eq!(body.len(), 400);
    let results = burst(&h, "budget-key", "kb.search", &body, 64).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert!(
        (1..=10).contains(&ok),
        "{ok} calls passed a budget that admits at most 10"
    );
    assert_eq!(h.upstream.count("/kb/search"), ok);
    let denied = results.iter().find(|r| r.status == 429).unwrap();
    denied.assert_error(429, "budget_exceeded");
    assert!(denied.header("retry-after").unwrap().parse::<u64>().unwrap() <= 3600);

    let status = h.admin("GET", "/admin/agents/budget-bot", true).await.json();
    let used = status["budget"]["used"].as_u64().unwrap();
    let event = h.event_for(results.iter().find(|r| r.status == 200).unwrap());
    let per_call = event["tokens"]["input"].as_u64().unwrap() + event["tokens"]["output"].as_u64().unwrap();
    assert_eq!(event["tokens"]["input"], 100);
    assert_eq!(used, per_call * ok as u64, "{status}");
    assert_eq!(status["budget"]["reserved"], 0);
    assert!(status["budget"]["resets_at"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_calls_cost_no_budget() {
    let h = harness().await;
    for body in [r#"{"order_id": 5}"#, "not json", r#"{"order_id":"O-1","amount":0}"#] {
        h.call("billing.refund", Some("budget-key"), body)
            .await
            .assert_error(422, "invalid_arguments");
    }
    h.call("tickets.read", Some("budget-key"), "{}")
        .await
        .assert_error(403, "tool_not_allowed");
    let status = h.admin("GET", "/admin/agents/budget-bot", true).await.json();
    assert_eq!(status["budget"]["used"], 0, "{status}");
    assert_eq!(status["budget"]["remaining"], 1000);
    assert_eq!(status["recent_denials"]["invalid_arguments"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_attempts_on_forbidden_tools_quarantine_the_agent_until_released() {
    let h = harness().await;
    for tool in ["tickets.read", "billing.refund", "admin.shell"] {
        h.call(tool, Some("watched-key"), "{}")
            .await
            .assert_error(403, "tool_not_allowed");
    }
    // Now even an allowed call is refused.
    let r = h.call("kb.search", Some("watched-key"), r#"{"query":"q"}"#).await;
    let body = r.assert_error(403, "agent_quarantined");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/admin/agents/watched-bot/quarantine")
    );
    assert_eq!(h.upstream.count("/kb/search"), 0);

    let events = h.audit();
    let anomaly: Vec<&Value> = events.iter().filter(|e| e["event"] == "anomaly").collect();
    assert_eq!(anomaly.len(), 1);
    assert_eq!(anomaly[0]["kind"], "tool_not_allowed");
    assert_eq!(anomaly[0]["count"], 3);
    assert_eq!(anomaly[0]["action"], "quarantine");
    let q = events.iter().find(|e| e["event"] == "agent_quarantined").unwrap();
    assert_eq!(
        (q["agent"].as_str(), q["by"].as_str()),
        (Some("watched-bot"), Some("anomaly"))
    );
    let status = h.admin("GET", "/admin/agents/watched-bot", true).await.json();
    assert_eq!(status["quarantine"]["by"], "anomaly");

    // Released by an operator; then calls flow again and the release is audited.
    let url = format!("{}/admin/agents/watched-bot/quarantine", h.admin);
    let auth = ("authorization", format!("Bearer {}", support::ADMIN_TOKEN));
    let r = send(
        "DELETE",
        &url,
        &[auth],
        br#"{"by": "alice", "comment": "false positive"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.call("kb.search", Some("watched-key"), r#"{"query":"q"}"#)
            .await
            .status,
        200
    );
    let released = h.audit().into_iter().find(|e| e["event"] == "agent_released").unwrap();
    assert_eq!(released["by"], "admin-token");
    assert_eq!(released["comment"], "false positive");

    // Released within the window, the agent is not let off: the next run of denials crosses
    // the threshold again (it counts anew from the last crossing).
    for (i, tool) in ["tickets.read", "billing.refund", "admin.shell"].iter().enumerate() {
        h.call(tool, Some("watched-key"), "{}")
            .await
            .assert_error(403, "tool_not_allowed");
        let quarantined = h.call("kb.search", Some("watched-key"), r#"{"query":"q"}"#).await;
        assert_eq!(
            quarantined.status,
            if i < 2 { 200 } else { 403 },
            "after {} denials",
            i + 1
        );
    }
    let anomalies = h.audit().into_iter().filter(|e| e["event"] == "anomaly").count();
    assert_eq!(anomalies, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_quarantine_by_hand_and_it_is_audited() {
    let h = harness().await;
    let url = format!("{}/admin/agents/limited-bot/quarantine", h.admin);
    let auth = vec![("authorization", format!("Bearer {}", support::ADMIN_TOKEN))];
    send("POST", &url, &[], br#"{"by":"bob"}"#.to_vec())
        .await
        .assert_error(401, "unauthenticated");
    let r = send(
        "POST",
        &url,
        &auth,
        br#"{"by": "bob", "comment": "investigating", "duration_seconds": 600}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["quarantine"]["until"].as_u64().is_some());
    h.call("kb.search", Some("limited-key"), r#"{"query":"q"}"#)
        .await
        .assert_error(403, "agent_quarantined");
    let q = h
        .audit()
        .into_iter()
        .find(|e| e["event"] == "agent_quarantined")
        .unwrap();
    assert_eq!(
        (q["by"].as_str(), q["reason"].as_str()),
        (Some("admin-token"), Some("investigating"))
    );
    let missing = send(
        "POST",
        &format!("{}/admin/agents/nobody/quarantine", h.admin),
        &auth,
        br#"{"by":"bob"}"#.to_vec(),
    )
    .await;
    missing.assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_quarantine_show_on_metrics() {
    let h = harness().await;
    let remaining = |text: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with("toolgate_budget_remaining_tokens{agent=\"budget-bot\"}"))
            .unwrap_or_else(|| panic!("no budget gauge for budget-bot: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // Reported as of the scrape: the whole hour's budget before any call, less after one.
    let text = String::from_utf8(h.admin("GET", "/metrics", false).await.body.to_vec()).unwrap();
    assert_eq!(remaining(&text), 1000.0, "{text}");
    let r = h.call("kb.search", Some("budget-key"), r#"{"query":"q"}"#).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(h.admin("GET", "/metrics", false).await.body.to_vec()).unwrap();
    let after = remaining(&text);
    let budget = h.admin("GET", "/admin/agents/budget-bot", true).await.json();
    assert_eq!(after, budget["budget"]["remaining"].as_f64().unwrap(), "{text}");
    assert!(after < 1000.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rate_limit_counts_the_calls_already_made() {
    let h = harness().await;
    let call = || h.call("kb.search", Some("limited-key"), r#"{"query":"q"}"#);
    for _ in 0..4 {
        assert_eq!(call().await.status, 200);
    }
    let reload_with = |per_minute: u32| {
        let text = agents().replace("calls_per_minute: 5 }", &format!("calls_per_minute: {per_minute} }}"));
        std::fs::write(h.policy_dir.join("limits.yaml"), text).unwrap();
        h.admin("POST", "/admin/reload", true)
    };
    // Lowered to 3 after 4 calls: nothing left, not a fresh burst of 3.
    assert_eq!(reload_with(3).await.json()["status"], "reloaded");
    call().await.assert_error(429, "rate_limited");
    // Raised to 10: what the limit in force counted (all of its 3) still counts; the refused
    // call does not.
    assert_eq!(reload_with(10).await.json()["status"], "reloaded");
    let results = burst(&h, "limited-key", "kb.search", r#"{"query":"q"}"#, 10).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 7, "10 a minute, 3 counted already");
    assert_eq!(h.upstream.count("/kb/search"), 4 + 7);
}

/// `budget: strict` reserves each call's largest possible answer (the tool's
/// `max_response_bytes`): however many calls arrive at once, the hour's budget is never
/// exceeded, even by answers far larger than the agent's earlier ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_budget_is_never_exceeded_by_concurrent_large_answers() {
    let policy = format!(
        r#"
agents:
  strict-bot:
    credentials: {{ api_key_sha256: [ "{}" ] }}
    tools: [ big.capped ]
    limits: {{ tokens_per_hour: 60000, budget: strict }}
tools:
  big.capped:
    upstream: {{ url: "{{{{UPSTREAM}}}}/big", method: POST, max_response_bytes: 110000 }}
"#,
        sha256_hex("strict-key")
    );
    let h = Harness::start_full("", &[("strict.yaml", policy.as_str())]).await;
    // Each answer is ~100 KB (~25k tokens): two fit in the hour, not sixteen.
    let results = burst(&h, "strict-key", "big.capped", "{}", 16).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert!(
        (1..=2).contains(&ok),
        "{ok} calls of ~25k tokens passed a budget of 60k"
    );
    for r in results.iter().filter(|r| r.status != 200) {
        r.assert_error(429, "budget_exceeded");
    }
    let status = h.admin("GET", "/admin/agents/strict-bot", true).await.json();
    let used = status["budget"]["used"].as_u64().unwrap();
    assert!(used <= 60000, "the budget was exceeded: {status}");
    assert_eq!(status["budget"]["reserved"], 0, "{status}");
    assert_eq!(h.upstream.count("/big"), ok);
}
