//! `toolgate replay`: a day of calls recorded through the real gateway, replayed by the real
//! binary against candidate policies — the same policy (nothing changes, the history the
//! recording implies included), and one that narrows an agent's allowlist and tightens a rule
//! (exactly the calls that change, exit 1), with redacted arguments reported apart.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::rules::{OPS_KEY, rule_files};
use crate::support::{Harness, Resp};

const FIN_KEY: &str = "fin-key";

fn replay(h: &Harness, candidate: &Path) -> (i32, Value) {
    let mut files: Vec<_> = std::fs::read_dir(h.audit_path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("audit.jsonl"))
        .collect();
    files.reverse(); // any order: replay orders them as written
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["replay", "--format", "json", "-c"])
        .arg(h.dir.path().join("toolgate.yaml"))
        .arg("--policies")
        .arg(candidate)
        .arg("--audit")
        .args(&files)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

fn ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["request_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_lists_exactly_the_calls_a_candidate_decides_differently() {
    // Rotation on, so the day spans several files.
    let h = Harness::start_with("audit: { rotate_bytes: 6000 }\n").await;
    for (name, text) in rule_files(&h.upstream.url) {
        std::fs::write(h.policy_dir.join(name), text).unwrap();
    }
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let call = |key: &'static str, tool: &'static str, body: String| {
        let h = &h;
        async move { h.call(tool, Some(key), &body).await }
    };
    let pay = |amount: u32| format!(r#"{{"to": "acme", "amount": {amount}}}"#);
    let deploy = r#"{"env": "staging", "services": ["web"]}"#.to_owned();
    let id = |r: &Resp| r.request_id();

    // The day: what each call got, and whether the candidate will change it.
    let mut changes = Vec::new();
    for amount in [20, 50, 70] {
        assert_eq!(call(OPS_KEY, "pay.send", pay(amount)).await.status, 200);
    }
    // Tightened rule (over 75 needs approval): these were allowed.
    for (key, amount) in [(OPS_KEY, 80), (FIN_KEY, 90), (FIN_KEY, 95)] {
        let r = call(key, "pay.send", pay(amount)).await;
        assert_eq!(r.status, 200);
        changes.push(id(&r));
    }
    assert_eq!(call(OPS_KEY, "pay.send", pay(500)).await.status, 202, "held either way");
    // Narrowed allowlist (fin-bot may no longer deploy): these were allowed.
    for _ in 0..2 {
        let r = call(FIN_KEY, "deploy.run", deploy.clone()).await;
        assert_eq!(r.status, 200);
        changes.push(id(&r));
    }
    assert_eq!(call(OPS_KEY, "deploy.run", deploy.clone()).await.status, 200);
    // History: a refund after its fraud check passes, one without is refused; the replay must
    // imply the same history to agree.
    assert_eq!(
        call(OPS_KEY, "fraud.check", r#"{"order_id": "O-1"}"#.into())
            .await
            .status,
        200
    );
    assert_eq!(
        call(OPS_KEY, "refund.issue", r#"{"order_id": "O-1", "amount": 5}"#.into())
            .await
            .status,
        200
    );
    let r = call(OPS_KEY, "refund.issue", r#"{"order_id": "O-2", "amount": 5}"#.into()).await;
    r.assert_error(403, "rule_denied");
    // A payment whose note was redacted in the trail: the candidate's verdict on it rests on
    // arguments the trail does not have whole, so it is reported apart.
    let r = call(
        OPS_KEY,
        "pay.send",
        r#"{"to": "acme", "amount": 85, "note": "for ada@example.com"}"#.into(),
    )
    .await;
    assert_eq!(r.status, 200);
    let redacted = id(&r);
    // Refused before the policy, not replayed.
    call("nobody", "pay.send", pay(1))
        .await
        .assert_error(401, "unauthenticated");
    assert!(
        toolgate::audit::rotated_files(&h.audit_path).unwrap().len() >= 2,
        "the day spans rotated files"
    );

    // The policy in force, as a candidate: nothing changes.
    let (code, report) = replay(&h, &h.policy_dir);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["changed"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["uncertain"], serde_json::json!([]));
    assert_eq!(report["replayed"], 14);
    assert_eq!(report["skipped"], 1);

    // The candidate: fin-bot loses deploy.run; payments over 75 need approval.
    let candidate = h.dir.path().join("candidate");
    copy_dir(&h.policy_dir, &candidate);
    let tools = std::fs::read_to_string(candidate.join("rules-tools.yaml")).unwrap();
    let narrowed = tools.replace(
        "tools: [ pay.send, deploy.run, refund.issue, fraud.check ]",
        "tools: [ pay.send, refund.issue, fraud.check ]",
    );
    assert_ne!(narrowed, tools);
    std::fs::write(candidate.join("rules-tools.yaml"), narrowed).unwrap();
    let rules = std::fs::read_to_string(candidate.join("rules.cedar")).unwrap();
    let tightened = rules.replace("greaterThan(decimal(\"100.0\"))", "greaterThan(decimal(\"75.0\"))");
    assert_ne!(tightened, rules);
    std::fs::write(candidate.join("rules.cedar"), tightened).unwrap();

    let (code, report) = replay(&h, &candidate);
    assert_eq!(code, 1, "{report:#}");
    changes.sort();
    assert_eq!(ids(&report["changed"]), changes, "{report:#}");
    assert_eq!(ids(&report["uncertain"]), [redacted], "{report:#}");
    let by = |c: &Value| {
        (
            c["before"]["decision"].clone(),
            c["after"]["decision"].clone(),
            c["after"]["code"].clone(),
        )
    };
    let deploys: Vec<_> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["tool"] == "deploy.run")
        .map(by)
        .collect();
    assert_eq!(deploys.len(), 2);
    assert!(
        deploys
            .iter()
            .all(|d| d == &("allow".into(), "deny".into(), "tool_not_allowed".into()))
    );
    assert_eq!(report["by_agent"], serde_json::json!({"fin-bot": 4, "ops-bot": 1}));
    assert_eq!(report["by_rule"]["payments-over-100-need-finance"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_become_regression_cases() {
    let h = Harness::start().await;
    for (name, text) in rule_files(&h.upstream.url) {
        std::fs::write(h.policy_dir.join(name), text).unwrap();
    }
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let checked = h.call("fraud.check", Some(OPS_KEY), r#"{"order_id": "O-1"}"#).await;
    assert_eq!(checked.status, 200);
    let passed = h
        .call("refund.issue", Some(OPS_KEY), r#"{"order_id": "O-1", "amount": 5}"#)
        .await;
    assert_eq!(passed.status, 200);
    let refused = h
        .call("refund.issue", Some(OPS_KEY), r#"{"order_id": "O-2", "amount": 5}"#)
        .await;
    refused.assert_error(403, "rule_denied");
    let held = h
        .call(
            "pay.send",
            Some(OPS_KEY),
            r#"{"to": "acme", "amount": 500, "note": "for ada@example.com"}"#,
        )
        .await;
    assert_eq!(held.status, 202);

    let cases = h.policy_dir.join("tests/recorded.yaml");
    std::fs::create_dir_all(cases.parent().unwrap()).unwrap();
    let cfg = h.dir.path().join("toolgate.yaml");
    let toolgate = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_toolgate"));
        c.arg("test").arg("-c").arg(&cfg);
        c
    };
    let out = toolgate()
        .arg("--record")
        .arg(&cases)
        .arg("--audit")
        .arg(&h.audit_path)
        .arg("--request-id")
        .args([passed.request_id(), refused.request_id(), held.request_id()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("recorded 3 case(s)"), "{said}");
    let text = std::fs::read_to_string(&cases).unwrap();
    assert!(
        text.contains("fraud.check"),
        "the refund's earlier fraud check is its history: {text}"
    );
    assert!(
        !text.contains("ada@example.com") && text.contains("[REDACTED:email]"),
        "{text}"
    );

    // The cases pass on the policy that decided them…
    let out = toolgate().output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("3 passed, 0 failed"), "{said}");
    // …and catch a change that would decide one differently.
    let rules = h.policy_dir.join("rules.cedar");
    let text = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, text.replace("unless { context.history.fraud_checked }", "")).unwrap();
    let out = toolgate().output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && said.contains("2 passed, 1 failed"), "{said}");
    assert!(said.contains(&format!("FAIL  {}", cases.display())), "{said}");
}
