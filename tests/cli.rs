//! The `toolgate` binary itself: check, explain, demo, and serve surviving `kill -9` with its
//! audit events on disk.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{SUPPORT_KEY, TestUpstream, send, write_fixture_policies};

fn toolgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR")).env("RUST_LOG", "warn");
    c
}

#[test]
fn check_accepts_the_bundled_config_and_policies() {
    let out = toolgate().args(["check"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: config/toolgate.yaml and policies/"), "{stdout}");
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let out = toolgate()
        .args(["check", "-c", "tests/fixtures/broken/toolgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let expected = [
        "tests/fixtures/broken/policies/a.yaml:5:5: agents.bot.tols: unknown field `tols`",
        "tests/fixtures/broken/policies/a.yaml:9:22: agents.other.tools[1]: `*` is not a valid tool name",
        "tests/fixtures/broken/policies/a.yaml:9:27: agents.other.tools[2]: no tool named `ghost.tool` is defined",
        "tests/fixtures/broken/policies/b.yaml:4:46: tools[\"x.read\"].upstream.method: must be one of GET, POST, PUT, PATCH, DELETE",
        "tests/fixtures/broken/policies/b.yaml:6:26: tools[\"x.read\"].filters.input[1]: no filter named `missing` is defined",
        "tests/fixtures/broken/policies/b.yaml:9:7: tools[\"y.write\"].upstream.url: placeholder `{id}` must be a required argument",
        "tests/fixtures/broken/policies/b.yaml:12:22: filters.bad.deny_patterns[0]: invalid regex: unclosed group",
    ];
    for want in expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in:\n{stdout}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{stdout}");
}

#[test]
fn check_reports_config_errors_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "listen: 127.0.0.1:1\nlimits:\n  max_body_byte: 5\n").unwrap();
    let out = toolgate().arg("check").arg("-c").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("c.yaml:3:3: limits.max_body_byte: unknown field `max_body_byte`"),
        "{stdout}"
    );
}

fn explain(tool: &str, args: &str) -> Value {
    let out = toolgate()
        .args(["explain", "--agent", "support-bot", "--tool", tool, "--args", args])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn explain_prints_the_decision_and_its_reason_without_calling_anything() {
    let allow = explain("fraud.check", r#"{"order_id": "O-1"}"#);
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["upstream"]["url"], "http://127.0.0.1:9001/fraud/O-1");
    // A rule decided: explain names it, and the hard forbid outranks the approval rule.
    let rule = explain("billing.refund", r#"{"order_id": "O-1", "amount": 250}"#);
    assert_eq!(rule["decision"], "deny");
    assert_eq!(rule["code"], "rule_denied");
    assert_eq!(rule["reasons"][0]["stage"], "rules");
    assert_eq!(rule["reasons"][0]["rule"], "refund-needs-fraud-check");
    assert_eq!(rule["would_deny"], serde_json::json!(["refund-over-50-trial"]));
    let deny = explain("billing.delete_account", r#"{"account_id": "A"}"#);
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["code"], "tool_not_allowed");
    assert_eq!(deny["reasons"][0]["stage"], "allowlist");
    let schema = explain("billing.refund", r#"{"order_id": "nope", "amount": 3}"#);
    assert_eq!(schema["code"], "invalid_arguments");
    assert_eq!(
        schema["reasons"][0]["message"],
        "Argument '/order_id' does not match the required format."
    );
    let redacted = explain("tickets.reply", r#"{"ticket_id": "T-1", "body": "call +14155550123"}"#);
    assert_eq!(redacted["decision"], "allow");
    assert_eq!(redacted["arguments"]["body"], "[REDACTED:phone]");
    assert_eq!(redacted["reasons"][0]["stage"], "content");
}

#[test]
fn demo_plays_its_script_and_shows_every_kind_of_decision() {
    let dir = tempfile::tempdir().unwrap();
    let out = toolgate()
        .current_dir(dir.path())
        .args([
            "demo",
            "--once",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tools-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for code in [
        "allow",
        "tool_not_allowed",
        "invalid_arguments",
        "content_blocked",
        "unauthenticated",
        "[REDACTED:email]",
        "rule_denied",
        "budget_exceeded",
        "rate_limited",
        "approval_required",
        "approval_denied",
    ] {
        assert!(stdout.contains(code), "{code} missing from the demo table:\n{stdout}");
    }
    let events = support::read_events(&dir.path().join("var/demo-audit.jsonl"));
    let calls: Vec<&Value> = events.iter().filter(|e| e["event"] == "tool_call").collect();
    assert_eq!(calls.len(), 20);
    // The held refund, approved by a person, then passed exactly once with the approval.
    let held = calls[17];
    assert_eq!(held["decision"], "approval_required");
    let id = held["approval_id"].as_str().unwrap();
    let decided: Vec<&Value> = events.iter().filter(|e| e["event"] == "approval_decided").collect();
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0]["approval_id"], id);
    assert_eq!(decided[0]["by"], "dana@billing");
    assert_eq!(calls[18]["decision"], "allow");
    assert_eq!(calls[18]["approval_id"], id);
    assert_eq!(calls[18]["upstream"]["status"], 200);
    assert_eq!(calls[19]["code"], "approval_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_survive_kill_9_right_after_the_response() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_policies(&dir.path().join("policies"), &upstream.url);
    let cfg = dir.path().join("toolgate.yaml");
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\npolicies: {}/policies\naudit: {{ file: {}/audit.jsonl }}\n", dir.path().display(), dir.path().display()),
    )
    .unwrap();
    let mut child = toolgate()
        .arg("serve")
        .arg("-c")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut data = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("toolgate: data plane listening on ") {
            data = Some(addr.to_owned());
        }
        if line.contains("admin plane listening") {
            break;
        }
    }
    let data = data.expect("serve prints its data-plane address");
    let mut ids = Vec::new();
    for i in 0..5 {
        let headers = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
        let r = send(
            "POST",
            &format!("{data}/v1/tools/kb.search"),
            &headers,
            format!("{{\"query\":\"q{i}\"}}").into_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
        ids.push(r.request_id());
    }
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    child.wait().unwrap();
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    for id in ids {
        assert!(events.iter().any(|e| e["request_id"] == id.as_str()), "event {id} lost");
    }
    assert!(Path::new(&dir.path().join("audit.jsonl")).exists());
}
