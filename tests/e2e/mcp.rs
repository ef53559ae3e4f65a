//! MCP at `/mcp` with a real MCP client — the official Python SDK (`mcp` 2.x), in each protocol
//! revision — plus raw HTTP for what a well-behaved client never sends (batches, hijacked
//! sessions, foreign origins).
//!
//! The SDK lives in a virtualenv the tests create on first use (`target/tmp/mcp-venv`, `pip
//! install mcp==2.3.0`), or the interpreter named by `TOOLGATE_TEST_PYTHON`.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::support::{self, ADMIN_TOKEN, ANALYST_KEY, Harness, SUPPORT_KEY, send};
use serde_json::{Value, json};

const MCP_SDK: &str = "mcp==2.3.0";

/// A Python interpreter that can `import mcp`, set up once per test run.
fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| support::python_venv("mcp-venv", &[MCP_SDK], "import mcp, mcp_types"))
        .clone()
}

/// Runs the SDK client with a plan; returns its JSON report.
async fn client(url: String, key: &str, plan: Value) -> Value {
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client.py");
        let out = std::process::Command::new(python())
            .arg(script)
            .arg(&url)
            .arg(&key)
            .arg(plan.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "MCP client failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    })
    .await
    .unwrap()
}

fn names(report: &Value) -> Vec<String> {
    report["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {report}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

const REVISIONS: [&str; 3] = ["2026-07-28", "2025-11-25", "2025-06-18"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_sees_only_its_own_tools_in_every_revision() {
    let h = Harness::start().await;
    let url = format!("{}/mcp", h.data);
    for mode in REVISIONS {
        let support = client(url.clone(), SUPPORT_KEY, json!({"mode": mode})).await;
        assert_eq!(support["negotiated"], mode, "{support}");
        let expected: Vec<String> = [
            "big.read",
            "billing.refund",
            "down.read",
            "echo.get",
            "flaky.create",
            "kb.search",
            "secret.read",
            "slow.create",
            "text.read",
            "tickets.read",
            "tickets.reply",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(names(&support), expected, "{mode}");
        let refund = support["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "billing.refund")
            .unwrap();
        assert_eq!(refund["inputSchema"]["required"], json!(["order_id", "amount"]));
        let analyst = client(url.clone(), ANALYST_KEY, json!({"mode": mode})).await;
        assert_eq!(
            names(&analyst),
            ["kb.search"],
            "{mode}: a tool the agent may not call is invisible"
        );
    }
    // Auto-negotiation lands on the stateless revision.
    let auto = client(url, SUPPORT_KEY, json!({"mode": "auto"})).await;
    assert_eq!(auto["negotiated"], "2026-07-28");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_call_runs_the_same_pipeline_with_the_same_audit_events() {
    let h = Harness::start().await;
    let url = format!("{}/mcp", h.data);
    for mode in ["2026-07-28", "2025-06-18"] {
        let before = h.upstream.requests().len();
        let plan = json!({"mode": mode, "calls": [
            {"tool": "tickets.reply", "args": {"ticket_id": "T-1", "body": "mail ada@example.com"}},
            {"tool": "billing.delete_account", "args": {"account_id": "A-1"}},
            {"tool": "admin.shell", "args": {"cmd": "id"}},
            {"tool": "billing.refund", "args": {"order_id": "O-1", "amount": -3}},
            {"tool": "kb.search", "args": {"query": "the ｐroject FALCON plan"}},
            {"tool": "flaky.create", "args": {}},
        ]});
        let report = client(url.clone(), SUPPORT_KEY, plan).await;
        let calls = report["calls"].as_array().unwrap();

        // Allowed: a CallToolResult with text and structured content, redacted on the way in.
        let ok = &calls[0]["result"];
        assert_eq!(ok["isError"], false, "{mode}: {report}");
        assert_eq!(ok["structuredContent"]["ok"], true);
        assert!(ok["content"][0]["text"].as_str().unwrap().contains("\"ok\":true"));
        let seen = h.upstream.requests();
        assert_eq!(
            seen.len(),
            before + 2,
            "{mode}: the reply and the flaky tool were forwarded, nothing else"
        );
        assert_eq!(seen[before].json()["body"], "[REDACTED:email]");

        // Blocked: JSON-RPC error -32001 whose data is the contract's error object.
        for (i, code, rule) in [
            (1, "tool_not_allowed", "allowlist"),
            (2, "tool_not_allowed", "allowlist"),
            (3, "invalid_arguments", "schema"),
            (4, "content_blocked", "internal-terms"),
        ] {
            let e = &calls[i]["error"];
            assert_eq!(e["code"], -32001, "{mode} call {i}: {report}");
            assert_eq!(e["data"]["code"], code, "{mode} call {i}");
            assert_eq!(e["data"]["rule"], rule, "{mode} call {i}");
            assert_eq!(e["message"], e["data"]["message"]);
            let rid = e["data"]["request_id"].as_str().unwrap();
            let events: Vec<Value> = h
                .audit()
                .into_iter()
                .filter(|ev| ev["event"] == "tool_call" && ev["request_id"] == rid)
                .collect();
            assert_eq!(events.len(), 1, "{mode} call {i}: one audit event per call");
            assert_eq!(events[0]["code"], code);
            assert_eq!(events[0]["agent"], "support-bot");
        }
        // Allowed, but the tool failed: the agent sees a tool error, not a protocol error.
        let failed = &calls[5]["result"];
        assert_eq!(failed["isError"], true, "{mode}: {report}");
    }
    let allowed: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "tool_call" && e["tool"] == "tickets.reply" && e["decision"] == "allow")
        .collect();
    assert_eq!(allowed.len(), 2);
    assert_eq!(allowed[0]["arguments"]["body"], "[REDACTED:email]");
}

async fn post_mcp(h: &Harness, key: &str, extra: &[(&str, &str)], body: &str) -> support::Resp {
    let mut headers = vec![
        ("authorization", format!("Bearer {key}")),
        ("content-type", "application/json".to_owned()),
        ("accept", "application/json, text/event-stream".to_owned()),
    ];
    headers.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    send("POST", &format!("{}/mcp", h.data), &headers, body.as_bytes().to_vec()).await
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

#[tokio::test]
async fn a_session_cannot_be_used_by_another_agent() {
    let h = Harness::start().await;
    let r = post_mcp(&h, SUPPORT_KEY, &[], INIT).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["protocolVersion"], "2025-06-18");
    let session = r.header("mcp-session-id").unwrap().to_owned();
    let call =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"kb.search","arguments":{"query":"x"}}}"#;
    let own = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    let ok = post_mcp(&h, SUPPORT_KEY, &own, call).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["result"]["isError"], false);
    assert_eq!(h.upstream.count("/kb/search"), 1);
    // The MCP session is the session session-aware rules and the audit event see.
    assert_eq!(h.event_for(&ok)["session"], session.as_str());
    assert_eq!(h.event_for(&ok)["source"], "127.0.0.1");

    // The analyst's credential with the support bot's session: refused, nothing forwarded.
    let hijack = post_mcp(&h, ANALYST_KEY, &own, call).await;
    assert_eq!(hijack.status, 403);
    assert_eq!(hijack.json()["error"]["code"], -32001);
    // The attempt is on the audit trail: who tried what.
    let e = h.refusal_for(&hijack);
    assert_eq!(e["agent"], "analyst-bot");
    assert_eq!(e["source"], "127.0.0.1");
    assert_eq!(e["method"], "tools/call");
    assert_eq!(e["code"], "tool_not_allowed");
    assert_eq!(e["status"], 403);
    assert_eq!(e["endpoint"], "/mcp");
    let r = post_mcp(
        &h,
        ANALYST_KEY,
        &own,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(h.upstream.count("/kb/search"), 1);
    // Nor may it end the session.
    let del = send(
        "DELETE",
        &format!("{}/mcp", h.data),
        &[
            ("authorization", format!("Bearer {ANALYST_KEY}")),
            ("mcp-session-id", session.clone()),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(del.status, 403);
    assert_eq!(h.refusal_for(&del)["method"], "DELETE");
    assert_eq!(h.refusal_for(&del)["source"], "127.0.0.1");
    // Its owner may; afterwards the id is unknown.
    let del = send(
        "DELETE",
        &format!("{}/mcp", h.data),
        &[
            ("authorization", format!("Bearer {SUPPORT_KEY}")),
            ("mcp-session-id", session.clone()),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(del.status, 204);
    let ended = post_mcp(&h, SUPPORT_KEY, &own, call).await;
    assert_eq!(ended.status, 404);
    // A made-up session id is unknown, too; no credentials at all is 401. Both are on the
    // trail: an unknown session is what a guessed or replayed id looks like.
    let fake = [("mcp-session-id", "0123456789abcdef0123456789abcdef")];
    let guessed = post_mcp(&h, SUPPORT_KEY, &fake, call).await;
    assert_eq!(guessed.status, 404);
    for r in [&ended, &guessed] {
        let e = h.refusal_for(r);
        assert_eq!(
            (e["agent"].as_str(), e["status"].as_u64()),
            (Some("support-bot"), Some(404)),
            "{e}"
        );
        assert_eq!(e["method"], "tools/call");
    }
    let anon = send(
        "POST",
        &format!("{}/mcp", h.data),
        &[("content-type", "application/json".to_owned())],
        INIT.into(),
    )
    .await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.json()["error"]["data"]["code"], "unauthenticated");
    let e = h.refusal_for(&anon);
    assert_eq!(e["code"], "unauthenticated");
    assert_eq!(e["method"], "initialize");
    assert!(e["agent"].is_null());
    // Asking for a server stream (there is none) is a refusal on the trail too.
    let get = send("GET", &format!("{}/mcp", h.data), &[], Vec::new()).await;
    get.assert_error(405, "method_not_allowed");
    assert_eq!(get.header("allow"), Some("POST, DELETE"));
    let e = h.refusal_for(&get);
    assert_eq!((e["method"].as_str(), e["status"].as_u64()), (Some("GET"), Some(405)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_refused_and_audited_with_its_own_code() {
    let h = Harness::start_with(
        "limits: { max_body_bytes: 4096, request_read_timeout_ms: 300, upstream_timeout_ms: 2000 }\n",
    )
    .await;
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SUPPORT_KEY}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nx-request-id: slow-mcp-1\r\ncontent-length: 60\r\n\r\n{{\"jsonrpc\": "
    );
    let reply = support::send_stalled(&h.data, &head).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
    let events: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["request_id"] == "slow-mcp-1")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "request_refused");
    assert_eq!(events[0]["status"], 408);
    assert_eq!(
        events[0]["code"], "request_timeout",
        "the code the caller got, not one guessed from the status"
    );
}

#[tokio::test]
async fn batches_foreign_origins_and_unversioned_requests_are_refused() {
    let h = Harness::start().await;
    let call = |id: u32| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "kb.search", "arguments": {"query": "q"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    };
    let batch = json!([call(1), call(2)]).to_string();
    let r = post_mcp(&h, SUPPORT_KEY, &[], &batch).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("batches"));
    assert_eq!(h.upstream.count("/kb/search"), 0, "no call of a batch is forwarded");
    // Refused before anyone was identified: the event has the reason, not the body.
    let e = h.refusal_for(&r);
    assert_eq!(e["code"], "invalid_request");
    assert!(e["message"].as_str().unwrap().contains("batches"));
    assert!(!e.to_string().contains("kb.search"), "{e}");

    let single = call(3).to_string();
    let r = post_mcp(&h, SUPPORT_KEY, &[("origin", "http://evil.example")], &single).await;
    assert_eq!(r.status, 403);
    assert_eq!(h.upstream.count("/kb/search"), 0);
    assert_eq!(h.refusal_for(&r)["code"], "tool_not_allowed");

    // Neither a session nor a protocol version: the client is told what to send.
    let bare = r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#;
    let r = post_mcp(&h, SUPPORT_KEY, &[], bare).await;
    assert_eq!(r.status, 400);
    // An unsupported version names the supported one.
    let old = r#"{"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2024-01-01"}}}"#;
    let r = post_mcp(&h, SUPPORT_KEY, &[], old).await;
    assert_eq!(r.json()["error"]["code"], -32022);
    let e = h.refusal_for(&r);
    assert_eq!(
        (e["agent"].as_str(), e["method"].as_str()),
        (Some("support-bot"), Some("tools/list"))
    );
    assert!(
        !e.to_string().contains("2024-01-01"),
        "the caller's text is not recorded: {e}"
    );
    assert_eq!(r.json()["error"]["data"]["supported"], json!(["2026-07-28"]));

    // The stateless call itself works, and so does SSE for a client that only takes streams.
    let r = send(
        "POST",
        &format!("{}/mcp", h.data),
        &[
            ("authorization", format!("Bearer {SUPPORT_KEY}")),
            ("content-type", "application/json".to_owned()),
            ("accept", "text/event-stream".to_owned()),
        ],
        single.into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let data = text
        .strip_prefix("event: message\ndata: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .unwrap();
    let msg: Value = serde_json::from_str(data).unwrap();
    assert_eq!(msg["result"]["resultType"], "complete");
    assert_eq!(msg["result"]["isError"], false);
    assert_eq!(h.upstream.count("/kb/search"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_required_call_says_how_to_approve_and_retry() {
    let rule = "@id(\"big-refunds\")\n@approval(\"billing\")\nforbid (principal, action == Action::\"billing.refund\", resource) when { context.input.amount > 100 };\n";
    let h = Harness::start_full("", &[("rules.cedar", rule)]).await;
    let url = format!("{}/mcp", h.data);
    let refund = json!({"order_id": "O-1", "amount": 500});
    let report = client(
        url.clone(),
        SUPPORT_KEY,
        json!({"mode": "2026-07-28", "calls": [{"tool": "billing.refund", "args": refund}]}),
    )
    .await;
    let e = &report["calls"][0]["error"];
    assert_eq!(e["data"]["code"], "approval_required", "{report}");
    let id = e["data"]["approval_id"].as_str().unwrap().to_owned();
    assert!(e["data"]["retry"].as_str().unwrap().contains("io.toolgate/approval"));
    assert_eq!(h.upstream.count("/refunds/"), 0);
    let ok = send(
        "POST",
        &format!("{}/admin/approvals/{id}/approve", h.admin),
        &[("authorization", format!("Bearer {ADMIN_TOKEN}"))],
        br#"{"by": "lee"}"#.to_vec(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let plan = json!({"mode": "2026-07-28", "calls": [
        {"tool": "billing.refund", "args": refund, "meta": {"io.toolgate/approval": id}},
        {"tool": "billing.refund", "args": refund, "meta": {"io.toolgate/approval": id}},
    ]});
    let report = client(url, SUPPORT_KEY, plan).await;
    assert_eq!(report["calls"][0]["result"]["isError"], false, "{report}");
    assert_eq!(report["calls"][1]["error"]["data"]["code"], "approval_denied");
    assert_eq!(h.upstream.count("/refunds/O-1"), 1);
}

/// A real upstream MCP server (the SDK's own), killed when dropped.
pub(crate) struct UpstreamMcp {
    child: std::process::Child,
    pub(crate) port: u16,
}

impl Drop for UpstreamMcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn upstream_mcp(rug_pull: &std::path::Path) -> UpstreamMcp {
    upstream_mcp_with(rug_pull, &[]).await
}

/// As [`upstream_mcp`], with extra arguments for the server (`extras`).
pub(crate) async fn upstream_mcp_with(rug_pull: &std::path::Path, extra: &[&str]) -> UpstreamMcp {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/upstream_server.py");
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let child = std::process::Command::new(python)
        .arg(script)
        .arg(port.to_string())
        .arg(rug_pull)
        .args(extra)
        .spawn()
        .unwrap();
    let server = UpstreamMcp { child, port };
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return server;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the upstream MCP server did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mcp_tools_are_exposed_filtered_and_pinned_against_rug_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("rug-pull");
    let crm = upstream_mcp(&trigger).await;
    let policy = format!(
        "mcp_servers:\n  crm: {{ url: \"http://127.0.0.1:{}/mcp\", filters: {{ output: [ pii ] }} }}\nagents:\n  crm-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ crm.* ]\n",
        crm.port,
        support::sha256_hex("crm-key")
    );
    let h = Harness::start_full("mcp: { refresh_seconds: 3600 }\n", &[("crm.yaml", &policy)]).await;
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let listed = h.admin("GET", "/admin/tools", true).await.json();
    assert_eq!(listed["tools"].as_array().unwrap().len(), 2, "{listed}");
    assert!(
        listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "approved")
    );
    let url = format!("{}/mcp", h.data);

    // Exposed under the server's prefix, to the agents whose allowlist names them.
    let plan = json!({"mode": "2026-07-28", "calls": [
        {"tool": "crm.lookup", "args": {"customer_id": "C-1"}},
        {"tool": "crm.notes", "args": {"customer_id": "C-1"}},
    ]});
    let report = client(url.clone(), "crm-key", plan.clone()).await;
    assert_eq!(names(&report), ["crm.lookup", "crm.notes"]);
    let result = &report["calls"][0]["result"];
    assert_eq!(result["isError"], false, "{report}");
    // The server's output went through the output filter before the agent saw it.
    let text = result.to_string();
    assert!(!text.contains("ada@example.com"), "{text}");
    assert!(text.contains("[REDACTED:email]"), "{text}");
    // The server's own CallToolResult passes through.
    assert_eq!(
        report["calls"][1]["result"]["content"][0]["text"],
        "Customer C-1 prefers email."
    );
    let support = client(url.clone(), SUPPORT_KEY, json!({"mode": "2026-07-28"})).await;
    assert!(!names(&support).iter().any(|n| n.starts_with("crm.")));
    let event = h
        .audit()
        .into_iter()
        .find(|e| e["event"] == "tool_call" && e["tool"] == "crm.lookup")
        .unwrap();
    assert_eq!(event["decision"], "allow");
    assert_eq!(event["agent"], "crm-bot");

    // The rug pull: the server changes the tool's description. It is hidden and refused.
    std::fs::write(&trigger, "now").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let report = client(url.clone(), "crm-key", plan.clone()).await;
    assert_eq!(names(&report), ["crm.notes"], "a changed tool is invisible");
    let e = &report["calls"][0]["error"];
    assert_eq!(e["data"]["code"], "tool_changed", "{report}");
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap()
            .contains("/admin/tools/crm.lookup/approve")
    );
    let changed: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "tool_definition_changed")
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["tool"], "crm.lookup");
    assert_eq!(changed[0]["description_changed"], true);
    assert_eq!(changed[0]["schema_changed"], false);
    // Asking again does not re-announce the same change.
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    assert_eq!(
        h.audit()
            .iter()
            .filter(|e| e["event"] == "tool_definition_changed")
            .count(),
        1
    );
    let listed = h.admin("GET", "/admin/tools", true).await.json();
    let lookup = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "crm.lookup")
        .unwrap()
        .clone();
    assert_eq!(lookup["state"], "changed");

    // An operator reviews the new definition and approves that very definition (by its hash):
    // visible and callable again.
    let stale = h
        .admin_json(
            "POST",
            "/admin/tools/crm.lookup/approve",
            &json!({"by": "sam", "sha256": "0".repeat(64)}),
        )
        .await;
    stale.assert_error(409, "conflict");
    let ok = h
        .admin_json(
            "POST",
            "/admin/tools/crm.lookup/approve",
            &json!({"by": "sam", "comment": "reviewed", "sha256": lookup["sha256"]}),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let report = client(url, "crm-key", plan).await;
    assert_eq!(names(&report), ["crm.lookup", "crm.notes"]);
    assert_eq!(report["calls"][0]["result"]["isError"], false, "{report}");
    let approved: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "tool_approved")
        .collect();
    assert_eq!(approved[0]["by"], "admin-token");
}

/// MCP authenticates each message once, before its method, and hands the agent to the call
/// (`Caller::Agent`). The call still checks that the agent is in the policy it is decided by:
/// one a reload removed in between is refused and audited, never let through unauthenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_for_an_agent_no_longer_in_the_policy_is_refused() {
    use toolgate::gateway::{Answer, Arguments, CallOutcome, CallRequest, Caller, ToolName};
    let h = Harness::start().await;
    let gateway = &h.running.as_ref().expect("in-process gateway").gateway;
    let call = |rid: &'static str, agent: &'static str| {
        gateway.call(CallRequest {
            request_id: rid.into(),
            request_id_header: None,
            source: None,
            caller: Caller::Agent(agent.into()),
            tool: ToolName::new("kb.search"),
            arguments: Ok(Arguments::Body(bytes::Bytes::from_static(br#"{"query": "q"}"#))),
            session: None,
            approval: None,
            trace: Default::default(),
        })
    };
    let gone = call("agent-gone-1", "removed-bot").await;
    assert_eq!(gone.decision(), "deny");
    let CallOutcome::Refused(reason) = &gone else {
        panic!("refused: {gone:?}")
    };
    assert_eq!(
        (reason.code.as_str(), reason.code.http_status()),
        ("unauthenticated", 401)
    );
    assert_eq!(h.upstream.count("/kb/"), 0);
    let e = h
        .audit()
        .into_iter()
        .find(|e| e["request_id"] == "agent-gone-1")
        .expect("the refusal is audited");
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("tool_call"), Some("unauthenticated"))
    );

    // An agent the policy has is decided as usual, with no second look at its credentials.
    let known = call("agent-known-1", "support-bot").await;
    assert_eq!(known.decision(), "allow");
    assert!(
        matches!(&known, CallOutcome::Answered(Answer::Http(inbound)) if inbound.status == 200),
        "{known:?}"
    );
    assert_eq!(h.upstream.count("/kb/"), 1);
}

/// A tool's plain answer becomes a CallToolResult: its bytes as text, and, when they are JSON,
/// the value itself as `structuredContent` — any value in 2026-07-28, only an object in the
/// handshake revisions — byte for byte as the tool wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_answer_is_text_and_structured_content_as_each_revision_allows() {
    let tools = "tools:\n  kb.list:\n    upstream: { url: \"{{UPSTREAM}}/answer/list\", method: POST }\n  kb.text:\n    upstream: { url: \"{{UPSTREAM}}/text\", method: POST }\n  kb.fails:\n    upstream: { url: \"{{UPSTREAM}}/status500\", method: POST }\n";
    let h = Harness::start_full("", &[("answers.yaml", tools)]).await;
    let stateless = |tool: &str| {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool, "arguments": {},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
        .to_string()
    };
    let list = post_mcp(&h, SUPPORT_KEY, &[], &stateless("kb.list")).await;
    assert_eq!(list.status, 200);
    let raw = String::from_utf8(list.body.to_vec()).unwrap();
    // The tool's JSON as it wrote it (its spacing and `\u00e9` escape), not re-encoded.
    assert!(raw.contains(r#""structuredContent":[1, {"a": "\u00e9"}]"#), "{raw}");
    let msg = list.json();
    assert_eq!(msg["id"], 7);
    assert_eq!(msg["result"]["content"][0]["type"], "text");
    assert_eq!(msg["result"]["content"][0]["text"], "[1, {\"a\": \"\\u00e9\"}]\n");
    assert_eq!(msg["result"]["structuredContent"], json!([1, {"a": "é"}]));
    assert_eq!(
        (msg["result"]["isError"].as_bool(), msg["result"]["resultType"].as_str()),
        (Some(false), Some("complete"))
    );

    let text = post_mcp(&h, SUPPORT_KEY, &[], &stateless("kb.text")).await.json();
    assert_eq!(
        text["result"]["content"][0]["text"],
        "hello\ncontact ada@example.com please\nbye"
    );
    assert!(text["result"].get("structuredContent").is_none(), "{text}");

    let failed = post_mcp(&h, SUPPORT_KEY, &[], &stateless("kb.fails")).await.json();
    assert_eq!(failed["result"]["isError"], true);
    assert_eq!(failed["result"]["content"][0]["text"], r#"{"err":"boom"}"#);
    assert!(failed["result"].get("structuredContent").is_none(), "{failed}");

    // A handshake revision takes only an object as structured content, and has no `resultType`.
    let init = post_mcp(&h, SUPPORT_KEY, &[], INIT).await;
    let session = init.header("mcp-session-id").unwrap().to_owned();
    let own = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    let call = r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"kb.list","arguments":{}}}"#;
    let msg = post_mcp(&h, SUPPORT_KEY, &own, call).await.json();
    assert_eq!(msg["id"], "x");
    assert_eq!(msg["result"]["content"][0]["text"], "[1, {\"a\": \"\\u00e9\"}]\n");
    assert_eq!(msg["result"]["isError"], false);
    assert!(msg["result"].get("structuredContent").is_none(), "{msg}");
    assert!(msg["result"].get("resultType").is_none(), "{msg}");
}

/// A tool's answer with line breaks between its tokens (pretty-printed JSON) is embedded as it
/// is; over SSE each line becomes its own `data:` line, so the event still carries the whole
/// message (a client joins the lines with `\n`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretty_printed_answer_survives_sse_framing() {
    let tools = "tools:\n  kb.pretty:\n    upstream: { url: \"{{UPSTREAM}}/answer/pretty\", method: POST }\n";
    let h = Harness::start_full("", &[("pretty.yaml", tools)]).await;
    let call =
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "kb.pretty", "arguments": {},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
        .to_string();
    let headers = [
        ("authorization", format!("Bearer {SUPPORT_KEY}")),
        ("content-type", "application/json".to_owned()),
        ("accept", "text/event-stream".to_owned()),
    ];
    let r = send("POST", &format!("{}/mcp", h.data), &headers, call.into_bytes()).await;
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let event = text.strip_suffix("\n\n").expect("one event, ended by a blank line");
    let mut lines = event.split('\n');
    assert_eq!(lines.next(), Some("event: message"));
    let data: Vec<&str> = lines
        .map(|l| {
            l.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {l:?} in {text:?}"))
        })
        .collect();
    assert!(data.len() > 1, "the answer's line breaks became data lines: {text:?}");
    let msg: Value = serde_json::from_str(&data.join("\n")).unwrap();
    assert_eq!(msg["result"]["structuredContent"], json!({"a": [1, 2], "b": "x"}));
    assert_eq!(
        msg["result"]["content"][0]["text"],
        "{\n  \"a\": [1,\r\n    2],\r  \"b\": \"x\"\n}\n"
    );
}

/// A `tools/call` forwards the W3C trace context exactly as `POST /v1/tools/{tool}` does: a
/// well-formed `traceparent` and `tracestate` reach the tool; a malformed `traceparent` or an
/// oversized `tracestate` is dropped, not passed on (both transports share one check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_call_forwards_the_trace_context_only_when_it_is_well_formed() {
    let h = Harness::start().await;
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "kb.search",
        "arguments": {"query": "q"}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    .to_string();
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = post_mcp(
        &h,
        SUPPORT_KEY,
        &[("traceparent", good), ("tracestate", "vendor=1")],
        &call,
    )
    .await;
    assert_eq!(r.json()["result"]["isError"], false, "{:?}", r.body);
    let long_state = format!("vendor={}", "x".repeat(600));
    for bad in [
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "not-a-traceparent",
    ] {
        let r = post_mcp(
            &h,
            SUPPORT_KEY,
            &[("traceparent", bad), ("tracestate", &long_state)],
            &call,
        )
        .await;
        assert_eq!(r.json()["result"]["isError"], false, "{:?}", r.body);
    }
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers.get("traceparent").unwrap(), good);
    assert_eq!(seen[0].headers.get("tracestate").unwrap(), "vendor=1");
    for s in &seen[1..] {
        assert!(
            s.headers.get("traceparent").is_none(),
            "a malformed traceparent was forwarded"
        );
        assert!(
            s.headers.get("tracestate").is_none(),
            "an oversized tracestate was forwarded"
        );
    }
}

/// An upstream tool whose definition hides instructions for the model is held the first time
/// it is seen (blocked for every agent); a tool a known server adds later is held as new
/// (callable only by agents that name it exactly); an operator's approval releases either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspicious_and_new_upstream_tools_are_held_for_review() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("changes");
    let crm = upstream_mcp_with(&trigger, &["extras"]).await;
    let policy = format!(
        "mcp_servers:\n  crm: {{ url: \"http://127.0.0.1:{}/mcp\" }}\nagents:\n  crm-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ crm.* ]\n  export-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ crm.export ]\n",
        crm.port,
        support::sha256_hex("crm-key"),
        support::sha256_hex("export-key")
    );
    let h = Harness::start_full("mcp: { refresh_seconds: 3600 }\n", &[("crm.yaml", &policy)]).await;
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let tools = || async {
        let listed = h.admin("GET", "/admin/tools", true).await.json();
        listed["tools"].as_array().unwrap().clone()
    };
    let state = |all: &[Value], name: &str| all.iter().find(|t| t["name"] == name).cloned().unwrap_or(Value::Null);
    let first = tools().await;
    assert_eq!(state(&first, "crm.lookup")["state"], "approved");
    let sync = state(&first, "crm.sync");
    assert_eq!(sync["state"], "flagged", "{sync}");
    let findings = sync["findings"].to_string();
    assert!(
        findings.contains("invisible") && findings.contains("instructions"),
        "{findings}"
    );
    let call = |tool: &'static str, key: &'static str| h.call(tool, Some(key), r#"{"customer_id": "C-1"}"#);
    call("crm.sync", "crm-key").await.assert_error(403, "tool_changed");

    // A tool the (already listed) server adds later: held as new.
    std::fs::write(dir.path().join("changes.new"), b"").unwrap();
    let mut export = Value::Null;
    for _ in 0..50 {
        assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
        export = state(&tools().await, "crm.export");
        if !export.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(export["state"], "new", "{export}");
    call("crm.export", "crm-key").await.assert_error(403, "tool_changed");
    assert_eq!(
        call("crm.export", "export-key").await.status,
        200,
        "an exact grant may call a new tool"
    );
    let held: Vec<Value> = h.audit().into_iter().filter(|e| e["event"] == "tool_held").collect();
    let reasons: Vec<(&str, &str)> = held
        .iter()
        .map(|e| (e["tool"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(reasons, [("crm.sync", "suspicious"), ("crm.export", "new")], "{held:?}");

    // Approved (the definition reviewed, by its hash): callable through the glob grant.
    for (name, t) in [("crm.export", &export), ("crm.sync", &sync)] {
        let r = h
            .admin_json(
                "POST",
                &format!("/admin/tools/{name}/approve"),
                &json!({"by": "sam", "sha256": t["sha256"]}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(call("crm.export", "crm-key").await.status, 200);
    assert_eq!(call("crm.sync", "crm-key").await.status, 200);
}
