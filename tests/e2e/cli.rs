//! The `toolgate` binary itself: check, explain, demo, and serve surviving `kill -9` with its
//! audit events on disk.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::{self, SUPPORT_KEY, TestUpstream, listeners, send, write_fixture_policies, write_serve_config};
use serde_json::{Value, json};

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
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("ok: config/toolgate.yaml and policies/"),
        "{stdout}"
    );
    // What it still says of the bundled policies: words for a reviewer, not errors.
    assert!(
        lines[..lines.len() - 1].iter().all(|l| l.contains(": warning: ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("tool `billing.delete_account`: no agent may call it"),
        "{stdout}"
    );
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
    assert_eq!(
        (&decided[0]["role"], &decided[0]["via"]),
        (&json!("approver"), &json!("token"))
    );
    assert_eq!(calls[18]["decision"], "allow");
    assert_eq!(calls[18]["approval_id"], id);
    assert_eq!(calls[18]["upstream"]["status"], 200);
    assert_eq!(calls[19]["code"], "approval_denied");
}

/// A real upstream, the fixture policies pointing at it, and a `serve` config (plus `extra`
/// lines) in a temporary directory that lives as long as the returned handle.
async fn serve_fixture(extra: &str) -> (TestUpstream, tempfile::TempDir, std::path::PathBuf) {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_policies(&dir.path().join("policies"), &upstream.url);
    let cfg = write_serve_config(dir.path(), extra);
    (upstream, dir, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_survive_kill_9_right_after_the_response() {
    let (_upstream, dir, cfg) = serve_fixture("").await;
    let mut child = toolgate()
        .arg("serve")
        .arg("-c")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (data, _, _log) = listeners(&mut child);
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
        assert!(
            events
                .iter()
                .any(|e| e["request_id"] == id.as_str() && e["event"] == "tool_call"),
            "event {id} lost"
        );
    }
    assert!(Path::new(&dir.path().join("audit.jsonl")).exists());
}

#[test]
fn check_reports_rule_errors_with_file_line_and_column() {
    let out = toolgate()
        .args(["check", "-c", "tests/fixtures/broken-rules/toolgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = "tests/fixtures/broken-rules/policies";
    let expected = [
        format!(
            "{dir}/rules.cedar:4:8: for policy `typo`, attribute `input.amout` in context for Action::\"pay.send\" not found"
        ),
        format!(
            "{dir}/rules.cedar:8:8: for policy `decimal-compared-as-long`, unexpected type: expected Long but saw decimal"
        ),
        format!("{dir}/rules.cedar:10:1: rules may only `forbid`"),
        format!("{dir}/rules.cedar:12:1: every rule needs an `@id"),
        format!("{dir}/rules.cedar:15:30: for policy `unknown-tool`, unrecognized action"),
        format!("{dir}/syntax.cedar:2:49: unexpected token `resource`"),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    for want in &expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stdout}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{stdout}");
}

#[test]
fn policy_tests_pass_on_the_bundled_policies_and_fail_loudly() {
    let out = toolgate().args(["test"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.trim_end().ends_with(" passed, 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");

    // A case whose expectation is wrong: exit 1, the case named with what happened instead.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("wrong.yaml"),
        "cases:\n  - name: a big refund passes straight through\n    agent: support-bot\n    tool: billing.refund\n    args: { order_id: O-1, amount: 500 }\n    history: [ { tool: fraud.check, args: { order_id: O-1 }, ago: 5m } ]\n    expect: { decision: allow }\n  - name: no credentials for an unknown agent\n    agent: nobody\n    tool: kb.search\n    args: { query: x }\n    expect: { decision: deny, code: unauthenticated }\n",
    )
    .unwrap();
    let out = toolgate().arg("test").arg(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL  "), "{stdout}");
    assert!(
        stdout.contains("wrong.yaml:2  a big refund passes straight through"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "expected decision allow, got approval_required (approval_required, rule refund-over-100-needs-approval"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("PASS  "), "{stdout}");
    assert!(stdout.trim_end().ends_with("1 passed, 1 failed"), "{stdout}");

    // A malformed case file is an error with its location, not a silent pass.
    std::fs::write(dir.path().join("wrong.yaml"), "cases:\n  - name: x\n    agnt: a\n").unwrap();
    let out = toolgate().arg("test").arg(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("wrong.yaml:3:5: cases[0].agnt: unknown field `agnt`"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_fail_calls_that_log() {
    let (_upstream, _dir, cfg) = serve_fixture("").await;
    // `serve` reads the log until the listeners are up, then drops its end of the pipe.
    let (mut child, data, _) = serve(&cfg);
    let key = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    // A tool that refuses connections: toolgate logs a warning while serving the call.
    let r = send("POST", &format!("{data}/v1/tools/down.read"), &key, b"{}".to_vec()).await;
    r.assert_error(502, "upstream_error");
    let r = send(
        "POST",
        &format!("{data}/v1/tools/kb.search"),
        &key,
        br#"{"query": "q"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Starts `toolgate serve` on a config; returns the child and its data and admin URLs.
fn serve(cfg: &Path) -> (std::process::Child, String, String) {
    let mut child = toolgate()
        .arg("serve")
        .arg("-c")
        .arg(cfg)
        .env("TOOLGATE_ADMIN_TOKEN", "restart-admin-token")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (data, admin, _) = listeners(&mut child); // the rest of the log is not read: the pipe closes
    (child, data, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_survives_a_restart_between_request_and_decision() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    write_fixture_policies(&policies, &upstream.url);
    std::fs::write(
        policies.join("rules.cedar"),
        "@id(\"big-refunds\")\n@approval(\"billing\")\nforbid (principal, action == Action::\"billing.refund\", resource) when { context.input.amount > 100 };\n",
    )
    .unwrap();
    let cfg = write_serve_config(dir.path(), "");
    let key = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    let refund = br#"{"order_id": "O-7", "amount": 900}"#.to_vec();

    let (mut child, data, _) = serve(&cfg);
    let r = send("POST", &format!("{data}/v1/tools/billing.refund"), &key, refund.clone()).await;
    assert_eq!(r.status, 202);
    let id = r.json()["approval_id"].as_str().unwrap().to_owned();
    child.kill().unwrap(); // no graceful shutdown
    child.wait().unwrap();

    let (mut child, data, admin) = serve(&cfg);
    let admin_auth = vec![
        ("authorization", "Bearer restart-admin-token".to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    let ok = send(
        "POST",
        &format!("{admin}/admin/approvals/{id}/approve"),
        &admin_auth,
        br#"{"by": "kim"}"#.to_vec(),
    )
    .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let mut with_approval = key.clone();
    with_approval.push(("x-toolgate-approval", id.clone()));
    let r = send(
        "POST",
        &format!("{data}/v1/tools/billing.refund"),
        &with_approval,
        refund.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(upstream.count("/refunds/O-7"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_data_plane_on_its_configured_threads_and_stops_them_on_sigterm() {
    let (upstream, dir, cfg) = serve_fixture("workers: 3\n").await;
    let (child, data, _) = serve(&cfg);
    let mut child = KillOnDrop(child);

    // A thread names itself as it starts: look until all three have, or 5 s have passed.
    let threads = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("toolgate-data-"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while threads(child.0.id()).len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut names = threads(child.0.id());
    names.sort();
    assert_eq!(names, ["toolgate-data-0\n", "toolgate-data-1\n", "toolgate-data-2\n"]);

    // Concurrent calls on their own connections, spread over the threads: every one answered
    // and audited, all of them sharing one policy and one audit file.
    let calls = (0..24).map(|i| {
        let url = format!("{data}/v1/tools/kb.search");
        tokio::spawn(async move {
            let key = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
            send("POST", &url, &key, format!("{{\"query\": \"q{i}\"}}").into_bytes()).await
        })
    });
    let mut ids = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        let r = call.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        ids.push(r.request_id());
    }
    assert_eq!(upstream.count("/kb/search"), 24);
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    for id in &ids {
        assert!(
            events
                .iter()
                .any(|e| e["request_id"] == id.as_str() && e["event"] == "tool_call"),
            "event {id} lost"
        );
    }

    // SIGTERM: every thread finishes and the process exits cleanly.
    let term = Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status();
    assert!(term.unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not stop on SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_pauses_and_recovers() {
    let (_upstream, _dir, cfg) = serve_fixture("workers: 1\n").await;
    // 32 descriptors: about twenty are taken at start, so a dozen connections use up the rest.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 32 && exec \"$0\" serve -c \"$1\""])
        .arg(env!("CARGO_BIN_EXE_toolgate"))
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (data, _, log) = listeners(&mut child);
    let child = KillOnDrop(child);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || log.map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l)));

    let addr = data.strip_prefix("http://").unwrap().to_owned();
    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let errors = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    // One error line per pause of 100 ms; a loop retrying at once would write thousands.
    let allowed = 20 * started.elapsed().as_secs() as usize + 20;
    assert!(errors >= 1, "the exhausted descriptors were never reported");
    assert!(errors <= allowed, "{errors} accept errors: the accept loop spins");

    // The idle connections go; the descriptors come back, and calls are served again.
    drop(idle);
    let key = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    let mut answered = None;
    for _ in 0..100 {
        let url = format!("{data}/v1/tools/kb.search");
        if let Some(r) = support::try_send("POST", &url, &key, br#"{"query": "q"}"#.to_vec()).await
            && r.status == 200
        {
            answered = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        answered.is_some(),
        "no call was served after the descriptors were freed"
    );
    drop(child);
}

/// A spawned `toolgate serve` that is killed when the test ends, passed or failed (a child left
/// running would keep the test's output pipes open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_warns_about_grants_tools_and_rules_that_do_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    write_fixture_policies(&policies, &support::refused_url());
    std::fs::write(
        policies.join("lint.yaml"),
        "agents:\n  idle-bot:\n    credentials: { api_key_sha256: [ \"ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12\" ] }\n    tools: [ nope.* ]\ntools:\n  vault.open:\n    upstream: { url: \"http://127.0.0.1:1/vault\" }\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("lint.cedar"),
        "@id(\"vault-after-hours\")\nforbid (principal, action == Action::\"vault.open\", resource);\n",
    )
    .unwrap();
    let cfg = write_serve_config(dir.path(), "");
    let out = toolgate().arg("check").arg("-c").arg(&cfg).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "warnings do not fail check: {said}");
    for expected in [
        "agent `idle-bot` may call no tool",
        "agent `idle-bot`: `nope.*` grants nothing",
        "tool `vault.open`: no agent may call it",
        "rule `vault-after-hours` (",
        "can never apply",
        "`kb.*` is broader than the tools that exist",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
    assert!(!said.contains("tool `kb.search`: no agent"), "{said}");
}

/// `--log-format json` keeps stderr all JSON, the listeners' addresses and a failed start
/// included: a log collector parses every line (the text lines are for people and scripts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_log_is_json_on_every_line_from_the_listeners_to_a_failed_start() {
    use std::io::BufRead;
    let (_upstream, dir, cfg) = serve_fixture("").await;
    let mut child = support::Serving(
        toolgate()
            .args(["--log-format", "json", "serve", "-c"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut urls = std::collections::HashMap::new();
    for line in lines {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let f = &v["fields"];
        if f["message"] == "listening" {
            urls.insert(
                f["plane"].as_str().unwrap().to_owned(),
                f["url"].as_str().unwrap().to_owned(),
            );
        }
        if f["message"] == "serving" {
            break;
        }
    }
    let admin = &urls["admin"];
    assert!(urls["data"].starts_with("http://127.0.0.1:"), "{urls:?}");
    assert_eq!(send("GET", &format!("{admin}/healthz"), &[], vec![]).await.status, 200);
    drop(child);

    // A start that fails (the policy directory is gone) says why, as JSON too.
    std::fs::remove_dir_all(dir.path().join("policies")).unwrap();
    let out = toolgate()
        .args(["--log-format", "json", "serve", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = lines.last().expect("a line says why");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert_eq!(last["fields"]["message"], "toolgate stopped", "{stderr}");
    assert!(
        last["fields"]["error"].as_str().unwrap().contains("policies"),
        "{stderr}"
    );
}
