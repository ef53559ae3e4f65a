//! The hardening catalog's cases, tried as an attacker or an unlucky client would: over real
//! sockets, with Python's `http.client` where what the client does is the point.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Harness, SUPPORT_KEY, TestUpstream, send, sha256_hex, write_fixture_policies};

const HANGUP_KEY: &str = "hangup-key";

/// An agent with an hourly budget and a tool that takes 1.5 s to answer (its own deadline is
/// longer), so a client can give up while the tool runs.
fn slow_tool_policy() -> String {
    format!(
        "agents:\n  hangup-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ slow.long ]\n    limits: {{ tokens_per_hour: 100000 }}\ntools:\n  slow.long:\n    upstream: {{ url: \"{{{{UPSTREAM}}}}/slow\", method: POST, timeout_ms: 5000 }}\n",
        sha256_hex(HANGUP_KEY)
    )
}

/// Runs a Python script with `python3`, with `args` as `sys.argv[1:]`; its stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "the Python client failed");
    String::from_utf8(out.stdout).unwrap()
}

/// `http.client` sends one POST and gives up after 0.3 s, closing its connection, as an agent
/// whose own timeout fires does.
const IMPATIENT_CLIENT: &str = r#"
import http.client, socket, sys
host, port = sys.argv[1].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=0.3)
conn.request("POST", sys.argv[2], body=sys.argv[3], headers={
    "Authorization": "Bearer " + sys.argv[4], "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream", "X-Request-Id": sys.argv[5]})
try:
    conn.getresponse().read()
    print("answered")
except (socket.timeout, TimeoutError):
    print("gave up")
conn.close()
"#;

/// The events of `request_id`, once its `tool_call` is there (polled for up to 5 s).
async fn events_once_called(h: &Harness, request_id: &str) -> Vec<Value> {
    for _ in 0..50 {
        let events: Vec<Value> = h
            .audit()
            .into_iter()
            .filter(|e| e["request_id"] == request_id)
            .collect();
        if events.iter().any(|e| e["event"] == "tool_call") {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no tool_call event for {request_id}: {:?}", h.audit());
}

/// A call's work does not belong to the client's connection: an agent that hangs up (or whose
/// timeout fires) while the tool runs still leaves the call's event, counted and settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_the_tool_runs_leaves_the_call_recorded_and_settled() {
    let h = Harness::start_full("", &[("hangup.yaml", &slow_tool_policy())]).await;
    let addr = h.data.trim_start_matches("http://");
    let mcp_call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow.long",
        "arguments": {"q": "x"}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    .to_string();
    let cases = [
        ("/v1/tools/slow.long", r#"{"q": "x"}"#.to_owned(), "hangup-http-1"),
        ("/mcp", mcp_call, "hangup-mcp-1"),
    ];
    for (path, body, id) in &cases {
        let said = python(IMPATIENT_CLIENT, &[addr, path, body, HANGUP_KEY, id]);
        assert_eq!(said.trim(), "gave up", "the client must leave before the tool answers");
    }
    for (_, _, id) in &cases {
        let events = events_once_called(&h, id).await;
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
        assert_eq!(kinds, ["call_forwarding", "tool_call"], "{events:?}");
        let e = &events[1];
        assert_eq!(e["decision"], "allow", "{e}");
        assert_eq!(e["upstream"]["status"], 200, "the tool's answer was read: {e}");
        assert!(e["tokens"]["output"].as_u64().unwrap() > 0, "{e}");
    }
    assert_eq!(h.upstream.count("/slow"), 2);
    // The budget reservation was settled, not left held: nothing reserved, the calls charged.
    let status = h.admin("GET", "/admin/agents/hangup-bot", true).await.json();
    assert_eq!(status["budget"]["reserved"], 0, "{status}");
    assert!(status["budget"]["used"].as_u64().unwrap() > 0, "{status}");
}

/// A log that cannot be written stops a call before its tool acts: the first call after the
/// disk fills is refused, and never reaches the tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_the_disk_fills_never_reaches_the_tool() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let h = Harness::start_with("audit: { file: /dev/full }\n").await;
    let r = h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await;
    let body = r.assert_error(503, "unavailable");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("not sent"),
        "{body}"
    );
    assert_eq!(h.upstream.count("/kb/"), 0, "the tool was called with no record of it");
}

/// The log fails while a call is at its tool (a pipe whose reader goes away, as a disk that
/// fills): the call's `call_forwarding` event is in the log, and the agent is not given an
/// answer that could not be recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_fails_while_the_tool_runs_leaves_the_forwarded_call_on_record() {
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000; // Linux
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("audit.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let config = format!("audit: {{ file: {} }}\n", fifo.display());
    let h = Harness::start_full(&config, &[("hangup.yaml", &slow_tool_policy())]).await;
    let url = format!("{}/v1/tools/slow.long", h.data);
    let call = tokio::spawn(async move {
        let headers = vec![
            ("authorization", format!("Bearer {HANGUP_KEY}")),
            ("x-request-id", "fails-mid-call".to_owned()),
        ];
        send("POST", &url, &headers, br#"{"q": "x"}"#.to_vec()).await
    });
    // While the tool runs (1.5 s), read what was written, then stop reading: the call's own
    // event can no longer be written.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut written = String::new();
    let _ = reader.read_to_string(&mut written);
    drop(reader);
    let r = call.await.unwrap();
    let body = r.assert_error(503, "unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("may have taken effect"), "{message}");
    assert_eq!(h.upstream.count("/slow"), 1);
    let forwarded: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["request_id"] == "fails-mid-call")
        .collect();
    assert_eq!(forwarded.len(), 1, "{written}");
    assert_eq!(forwarded[0]["event"], "call_forwarding");
    assert_eq!(
        (forwarded[0]["agent"].as_str(), forwarded[0]["tool"].as_str()),
        (Some("hangup-bot"), Some("slow.long"))
    );
}

/// A `kill -9` while the tool runs leaves the call on record: its `call_forwarding` event was
/// written before the tool was called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_the_tool_runs_leaves_the_forwarded_call_on_record() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    write_fixture_policies(&policies, &upstream.url);
    std::fs::write(
        policies.join("hangup.yaml"),
        slow_tool_policy().replace("{{UPSTREAM}}", &upstream.url),
    )
    .unwrap();
    let cfg = support::write_serve_config(dir.path(), "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (data, _, _log) = support::listeners(&mut child);
    let url = format!("{data}/v1/tools/slow.long");
    let call = tokio::spawn(async move {
        let headers = vec![
            ("authorization", format!("Bearer {HANGUP_KEY}")),
            ("x-request-id", "killed-mid-call".to_owned()),
        ];
        support::try_send("POST", &url, &headers, br#"{"q": "x"}"#.to_vec()).await
    });
    // Until the tool has the call, then SIGKILL: no shutdown, no flush.
    for _ in 0..100 {
        if upstream.count("/slow") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.count("/slow"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(call.await.unwrap().is_none(), "a killed gateway answered");
    let events: Vec<Value> = support::read_events(&dir.path().join("audit.jsonl"))
        .into_iter()
        .filter(|e| e["request_id"] == "killed-mid-call")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "call_forwarding");
    assert_eq!(events[0]["arguments_sha256"], sha256_hex(r#"{"q":"x"}"#));
}

/// No PII or secret reaches the trail by another door than the arguments: what toolgate
/// records from headers and the path is refused when it is not a safe token (a request id, a
/// session, an approval id), and recorded as its hash when a detector finds something in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_headers_and_the_path_never_carry_pii_into_the_trail() {
    let h = Harness::start().await;
    let card = "4111111111111111";
    let hashed = format!("sha256:{}", sha256_hex(card));
    let call = |tool: &str, extra: Vec<(&'static str, String)>| {
        let mut headers = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
        headers.extend(extra);
        let url = format!("{}/v1/tools/{tool}", h.data);
        async move { send("POST", &url, &headers, br#"{"query": "q"}"#.to_vec()).await }
    };
    // A request id that is a card number: kept out of the trail, as its hash, which the
    // response carries (the caller can compute it to find its call).
    let r = call("kb.search", vec![("x-request-id", card.to_owned())]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.request_id(), hashed);
    assert_eq!(h.event_for(&r)["decision"], "allow");
    // A session that is one: the call is decided (rules see it), the event records its hash.
    let r = call("kb.search", vec![("x-toolgate-session", card.to_owned())]).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["session"], hashed.as_str());
    // An unknown tool named with one, or with an email address.
    let r = call(card, vec![]).await;
    r.assert_error(403, "tool_not_allowed");
    assert_eq!(h.event_for(&r)["tool"], hashed.as_str());
    let r = call("ada@example.com", vec![]).await;
    r.assert_error(403, "tool_not_allowed");
    let tool = h.event_for(&r)["tool"].as_str().unwrap().to_owned();
    assert!(tool.starts_with("sha256:"), "{tool}");
    // An approval id that is not one is refused before it is looked up.
    let r = call(
        "kb.search",
        vec![("x-toolgate-approval", format!("apr_{card}<script>"))],
    )
    .await;
    let body = r.assert_error(400, "invalid_request");
    assert_eq!(body["error"]["rule"], "approval");
    // A request id outside the safe alphabet is refused: nothing of it is written.
    let r = call("kb.search", vec![("x-request-id", "ada@example.com".to_owned())]).await;
    r.assert_error(400, "invalid_request");

    let trail = std::fs::read_to_string(h.dir.path().join("audit.jsonl")).unwrap();
    for raw in [card, "ada@example.com", "<script>"] {
        assert!(!trail.contains(raw), "{raw} reached the audit trail:\n{trail}");
    }
}

/// `http.client` sends a body over the limit whole, then reads: it must get its 413, with the
/// contract's body, not a reset (declared length, and chunked with no length).
const EAGER_CLIENT: &str = r#"
import http.client, json, sys
host, port = sys.argv[1].split(":")
size = int(sys.argv[2])
for chunked in (False, True):
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = b'{"query": "' + b"x" * size + b'"}'
    headers = {"Authorization": "Bearer " + sys.argv[3], "Content-Type": "application/json"}
    if chunked:
        conn.request("POST", "/v1/tools/kb.search", body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                     headers=headers, encode_chunked=True)
    else:
        conn.request("POST", "/v1/tools/kb.search", body=body, headers=headers)
    r = conn.getresponse()
    print(r.status, json.loads(r.read())["error"]["code"])
    conn.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_oversized_body_before_reading_gets_its_413() {
    let h = Harness::start().await;
    let addr = h.data.trim_start_matches("http://");
    // 4 KiB is the limit here; 256 KiB and 8 MiB are far more than the socket buffers hold.
    for size in ["262144", "8388608"] {
        let said = python(EAGER_CLIENT, &[addr, size, SUPPORT_KEY]);
        assert_eq!(
            said.lines().collect::<Vec<_>>(),
            ["413 payload_too_large"; 2],
            "{size} bytes: {said}"
        );
    }
    assert_eq!(h.upstream.count("/kb/"), 0);
}

/// A raw `Expect: 100-continue` request; what comes back first, and then (if told to continue)
/// the final status after the body is sent.
const EXPECTING_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1].split(":")
path, key, body = sys.argv[2], sys.argv[3], sys.argv[4].encode()
s = socket.create_connection((host, int(port)), timeout=5)
head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
s.sendall(head.encode())
first = s.recv(65536).decode().split("\r\n")[0]
print(first)
if " 100 " in first + " ":
    s.sendall(body)
    print(s.recv(65536).decode().split("\r\n")[0])
s.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_refused_on_its_headers_is_never_asked_for_its_body() {
    let h = Harness::start().await;
    let addr = h.data.trim_start_matches("http://");
    let body = r#"{"query": "q"}"#;
    let first = |path: &'static str, key: &'static str| python(EXPECTING_CLIENT, &[addr, path, key, body]);
    // Unknown credentials, a tool not on the allowlist, and MCP without credentials: the final
    // status at once, no `100 Continue`.
    assert_eq!(
        first("/v1/tools/kb.search", "wrong-key").trim(),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        first("/v1/tools/billing.refund", crate::support::ANALYST_KEY).trim(),
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(first("/mcp", "wrong-key").trim(), "HTTP/1.1 401 Unauthorized");
    // A caller the headers admit is told to continue, and its call goes through.
    let allowed = first("/v1/tools/kb.search", SUPPORT_KEY);
    assert_eq!(
        allowed.lines().collect::<Vec<_>>(),
        ["HTTP/1.1 100 Continue", "HTTP/1.1 200 OK"],
        "{allowed}"
    );
    assert_eq!(h.upstream.count("/kb/"), 1);
}

/// A client that stops reading cannot pin its answer: the write that makes no progress times
/// out and the connection is closed; meanwhile the answers held for slow clients count against
/// their allowance, and past it new calls are shed instead of buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_cannot_pin_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let policy = format!(
        "agents:\n  reader-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ huge.read ]\ntools:\n  huge.read:\n    upstream: {{ url: \"{{{{UPSTREAM}}}}/huge\", method: POST }}\n",
        sha256_hex(HANGUP_KEY)
    );
    let limits = "limits: { max_body_bytes: 4096, max_json_depth: 8, upstream_timeout_ms: 5000, max_response_bytes: 33554432, response_write_timeout_ms: 700, max_buffered_response_bytes: 1048576 }\n";
    let h = Harness::start_full(limits, &[("reader.yaml", &policy)]).await;
    let addr: std::net::SocketAddr = h.data.trim_start_matches("http://").parse().unwrap();
    // A client with a tiny receive buffer that asks for a 12 MiB answer and reads none of it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/tools/huge.read HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HANGUP_KEY}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    // Once its answer is held, new calls are shed rather than buffered.
    let mut shed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await;
        if r.status == 503 {
            shed = Some(r);
            break;
        }
    }
    let shed = shed.expect("a call made while a slow client held its answer was not shed");
    shed.assert_error(503, "unavailable");
    // The stalled write times out and its connection is closed: the allowance is back.
    let mut served = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await.status == 200 {
            served = true;
            break;
        }
    }
    assert!(
        served,
        "the allowance was not given back when the slow client was cut off"
    );
    // What the slow client can still read is cut short: the answer was not kept for it.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the stalled connection was not closed");
    assert!(
        got.len() < 12 << 20,
        "the whole answer was kept for a client that did not read"
    );
}

/// Two `Authorization` headers are refused, whichever comes first, on every door that reads
/// one: a tool call, MCP, an agent's approval poll, the admin plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused_not_first_wins() {
    let h = Harness::start().await;
    let good = format!("Bearer {SUPPORT_KEY}");
    let bad = "Bearer someone-elses-key".to_owned();
    let mcp = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}).to_string();
    for pair in [
        [good.clone(), bad.clone()],
        [bad.clone(), good.clone()],
        [good.clone(), good.clone()],
    ] {
        let headers = vec![
            ("authorization", pair[0].clone()),
            ("authorization", pair[1].clone()),
            ("content-type", "application/json".to_owned()),
        ];
        let r = send(
            "POST",
            &format!("{}/v1/tools/kb.search", h.data),
            &headers,
            br#"{"query": "q"}"#.to_vec(),
        )
        .await;
        let body = r.assert_error(401, "unauthenticated");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("exactly one"),
            "{body}"
        );
        let r = send("POST", &format!("{}/mcp", h.data), &headers, mcp.clone().into_bytes()).await;
        assert_eq!(r.status, 401, "{:?}", r.body);
        let r = send(
            "GET",
            &format!("{}/v1/approvals/apr_00000000000000000000000000000000", h.data),
            &headers,
            Vec::new(),
        )
        .await;
        r.assert_error(401, "unauthenticated");
    }
    assert_eq!(h.upstream.count("/kb/"), 0);
    let token = format!("Bearer {}", crate::support::ADMIN_TOKEN);
    let headers = vec![("authorization", token.clone()), ("authorization", token)];
    let r = send("GET", &format!("{}/admin/policy", h.admin), &headers, Vec::new()).await;
    r.assert_error(401, "unauthenticated");
}
