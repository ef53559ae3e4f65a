//! Replicas sharing state through Redis: a real `redis-server` (each test its own, on a free
//! port, in its own directory) and two or more real `toolgate serve` processes in front of one
//! upstream, as a platform team runs them behind a load balancer.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, ADMIN_TOKEN, Resp, TestUpstream, send, sha256_hex, write_fixture_policies};

const BOT_KEY: &str = "replica-bot-key";

/// A `redis-server` of the test's own. Killed when dropped.
struct Redis {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    /// With AOF on, as `redis.require_persistence` (the default) asks.
    fn start(dir: &Path) -> Redis {
        Self::start_with(dir, &["--appendonly", "yes"])
    }

    fn start_with(dir: &Path, args: &[&str]) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package) is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .command("PING")
                .is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// One inline command, its first reply line (`None`: not reachable).
    fn command(&self, cmd: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).ok()?;
        Some(line)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL: no shutdown, as when the server or its host dies.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The same server again (same port and directory: what AOF kept comes back).
    fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `toolgate serve` process. Killed when dropped.
struct Replica {
    data: String,
    admin: String,
    child: Child,
    _log: std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
}

impl Replica {
    /// A replica named `name` (its own config, audit file and approval store in `dir/name`),
    /// on the shared policies and Redis.
    fn start(dir: &Path, name: &str, state: &str) -> Replica {
        Self::start_with_policies(dir, name, state, &dir.join("policies"))
    }

    fn start_with_policies(dir: &Path, name: &str, state: &str, policies: &Path) -> Replica {
        let own = dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("admin-token"), ADMIN_TOKEN).unwrap();
        let cfg = own.join("toolgate.yaml");
        std::fs::write(
            &cfg,
            format!(
                "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, token_env: TOOLGATE_TEST_UNSET_TOKEN, token_file: {o}/admin-token }}\n\
                 policies: {p}\naudit: {{ file: {o}/audit.jsonl }}\napprovals: {{ store: {o}/approvals.redb }}\n\
                 limits: {{ upstream_timeout_ms: 2000 }}\nstate: {state}\n",
                o = own.display(),
                p = policies.display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
            .args(["serve", "-c"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (data, admin, log) = support::listeners(&mut child);
        Replica {
            data,
            admin,
            child,
            _log: log,
        }
    }

    async fn call(&self, tool: &str, request_id: &str) -> Option<Resp> {
        let headers = vec![
            ("authorization", format!("Bearer {BOT_KEY}")),
            ("x-request-id", request_id.to_owned()),
        ];
        support::try_send(
            "POST",
            &format!("{}/v1/tools/{tool}", self.data),
            &headers,
            br#"{"query": "q"}"#.to_vec(),
        )
        .await
    }

    async fn call_as(&self, key: &str, tool: &str, body: &str) -> Resp {
        let headers = vec![("authorization", format!("Bearer {key}"))];
        send(
            "POST",
            &format!("{}/v1/tools/{tool}", self.data),
            &headers,
            body.as_bytes().to_vec(),
        )
        .await
    }

    async fn admin(&self, method: &str, path: &str, body: Value) -> Resp {
        let headers = vec![
            ("authorization", format!("Bearer {ADMIN_TOKEN}")),
            ("content-type", "application/json".to_owned()),
        ];
        send(
            method,
            &format!("{}{path}", self.admin),
            &headers,
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn ready(&self) -> Resp {
        send("GET", &format!("{}/readyz", self.admin), &[], Vec::new()).await
    }

    fn events(&self, dir: &Path, name: &str) -> Vec<Value> {
        support::read_events(&dir.join(name).join("audit.jsonl"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fixture policies plus `replica-bot`, with `limits`, allowed `kb.*`, and `kb.metered`:
/// `kb.search` with a largest answer of 100 bytes (25 tokens), for strict budgets.
fn policies(dir: &Path, upstream: &str, limits: &str) {
    let p = dir.join("policies");
    write_fixture_policies(&p, upstream);
    std::fs::write(
        p.join("replicas.yaml"),
        format!(
            "agents:\n  replica-bot:\n    credentials: {{ api_key_sha256: [ \"{}\" ] }}\n    tools: [ kb.*, slow.*, billing.refund ]\n    limits: {limits}\n\
             tools:\n  kb.metered:\n    upstream: {{ url: \"{upstream}/kb/search\", max_response_bytes: 100 }}\n\
             \x20 slow.metered:\n    upstream: {{ url: \"{upstream}/slow\", timeout_ms: 2000, max_response_bytes: 100 }}\n",
            sha256_hex(BOT_KEY)
        ),
    )
    .unwrap();
}

/// Two replicas on one Redis in front of one upstream: the fixture policies, `replica-bot`
/// with `limits`, and `extra` policy files (`(name, text)`, `{{UPSTREAM}}` filled in).
struct Pair {
    upstream: TestUpstream,
    dir: tempfile::TempDir,
    redis: Redis,
    a: Replica,
    b: Replica,
}

impl Pair {
    async fn start(limits: &str, extra: &[(&str, String)]) -> Pair {
        let upstream = TestUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start(dir.path());
        policies(dir.path(), &upstream.url, limits);
        for (name, text) in extra {
            std::fs::write(
                dir.path().join("policies").join(name),
                text.replace("{{UPSTREAM}}", &upstream.url),
            )
            .unwrap();
        }
        let a = Replica::start(dir.path(), "a", &redis.url());
        let b = Replica::start(dir.path(), "b", &redis.url());
        Pair {
            upstream,
            dir,
            redis,
            a,
            b,
        }
    }
}

/// 64 calls at once, every other one to each replica; the statuses.
async fn burst(a: &Replica, b: &Replica, tool: &str) -> Vec<u16> {
    let calls = (0..64).map(|i| {
        let r = if i % 2 == 0 { a } else { b };
        let id = format!("burst-{i}");
        async move { r.call(tool, &id).await.map_or(0, |r| r.status) }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_replicas() {
    let Pair {
        upstream,
        dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ calls_per_minute: 10 }", &[]).await;
    let statuses = burst(&a, &b, "kb.search").await;
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // One minute's allowance between them, not one each (a call comes back every 6 s: the
    // burst may see one more).
    assert!((10..=11).contains(&passed), "{statuses:?}");
    assert_eq!(passed + limited, 64, "{statuses:?}");
    assert_eq!(upstream.count("/kb/search"), passed);
    // Both replicas refused some, each with its own audit event.
    for name in ["a", "b"] {
        let events = a.events(dir.path(), name);
        assert!(
            events.iter().any(|e| e["code"] == "rate_limited"),
            "replica {name} refused none"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_holds_across_two_replicas() {
    // Strict: each call reserves its arguments (4 tokens) and its largest answer (25), and is
    // charged what flowed (4 + 8): 240 tokens are 20 calls at most, whatever the concurrency.
    let Pair {
        upstream,
        dir: _dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ tokens_per_hour: 240, budget: strict }", &[]).await;
    let statuses = burst(&a, &b, "kb.metered").await;
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(upstream.count("/kb/search"), passed);
    assert!((1..=20).contains(&passed), "{passed} calls passed: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    // Both replicas see one budget: what every call that passed was charged (settled just
    // after each answer, so it may take a moment to show).
    for r in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            let status = r.admin("GET", "/admin/agents/replica-bot", json!({})).await.json();
            if status["budget"]["reserved"] == 0 || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status["budget"]["used"], json!(passed * 12), "{status}");
        assert_eq!(status["budget"]["reserved"], 0, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_on_one_replica_holds_on_the_other() {
    let Pair {
        upstream,
        dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ calls_per_minute: 1000 }", &[]).await;
    assert_eq!(b.call("kb.search", "before").await.unwrap().status, 200);
    let q = a
        .admin(
            "POST",
            "/admin/agents/replica-bot/quarantine",
            json!({"by": "alice", "comment": "investigating"}),
        )
        .await;
    assert_eq!(q.status, 200, "{}", q.json());
    assert_eq!(q.json()["changed"], true);
    let r = b.call("kb.search", "on-b").await.unwrap();
    let body = r.assert_error(403, "agent_quarantined");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("investigating"),
        "{body}"
    );
    let refused: Vec<Value> = b
        .events(dir.path(), "b")
        .into_iter()
        .filter(|e| e["request_id"] == "on-b")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["code"], "agent_quarantined");
    // B reports it, and B releases it: A lets the agent through again.
    let status = b.admin("GET", "/admin/agents/replica-bot", json!({})).await.json();
    assert_eq!(status["quarantine"]["by"], "admin-token", "{status}");
    let released = b
        .admin(
            "DELETE",
            "/admin/agents/replica-bot/quarantine",
            json!({"by": "bob", "comment": "cleared"}),
        )
        .await;
    assert_eq!(released.json()["changed"], true, "{}", released.json());
    assert_eq!(a.call("kb.search", "after").await.unwrap().status, 200);
    assert_eq!(upstream.count("/kb/search"), 2);
}

/// Session-aware rules read one history across replicas: a fraud check made through A
/// counts for a refund through B, and a count rule holds for calls sent to both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_rule_holds_across_replicas() {
    const OPS_KEY: &str = "ops-key";
    let tools = std::fs::read_to_string(support::fixture("rules/tools.yaml"))
        .unwrap()
        .replace("OPS_DIGEST", &sha256_hex(OPS_KEY))
        .replace("FIN_DIGEST", &sha256_hex("fin-key"))
        .replace("LIMITED_DIGEST", &sha256_hex("limited-key"));
    let rules = std::fs::read_to_string(support::fixture("rules/rules.cedar")).unwrap();
    let extra = [("rules-tools.yaml", tools), ("rules.cedar", rules)];
    let Pair {
        upstream,
        dir: _dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ calls_per_minute: 1000 }", &extra).await;
    let refund = |order: &str| format!(r#"{{"order_id": "{order}", "amount": 5}}"#);
    let r = b.call_as(OPS_KEY, "refund.issue", &refund("O-1")).await;
    assert_eq!(
        r.assert_error(403, "rule_denied")["error"]["rule"],
        "refund-needs-fraud-check"
    );
    assert_eq!(
        a.call_as(OPS_KEY, "fraud.check", r#"{"order_id": "O-1"}"#).await.status,
        200
    );
    let r = b.call_as(OPS_KEY, "refund.issue", &refund("O-1")).await;
    assert_eq!(r.status, 200, "{}", r.json());
    // 23 more checked orders, then refunds for all of them at once, split between the
    // replicas: two more pass the three-an-hour rule, not two more per replica.
    for i in 2..=24 {
        let r = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            r.call_as(OPS_KEY, "fraud.check", &format!(r#"{{"order_id": "O-{i}"}}"#))
                .await
                .status,
            200
        );
    }
    let calls = (2..=24).map(|i| {
        let r = if i % 2 == 0 { &a } else { &b };
        let body = refund(&format!("O-{i}"));
        async move { r.call_as(OPS_KEY, "refund.issue", &body).await.status }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    assert_eq!(upstream.count("/refunds/"), 3);
}

/// An MCP session of a handshake revision opened through A is served by B, still bound to
/// its agent, and ended through B it is gone on A too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_opened_on_one_replica_is_served_by_another() {
    let Pair {
        upstream,
        dir: _dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ calls_per_minute: 1000 }", &[]).await;
    let mcp = |r: &Replica, key: &str, session: Option<&str>, body: &str| {
        let mut headers = vec![
            ("authorization", format!("Bearer {key}")),
            ("content-type", "application/json".to_owned()),
            ("accept", "application/json, text/event-stream".to_owned()),
        ];
        if let Some(s) = session {
            headers.push(("mcp-session-id", s.to_owned()));
            headers.push(("mcp-protocol-version", "2025-06-18".to_owned()));
        }
        let (url, body) = (format!("{}/mcp", r.data), body.as_bytes().to_vec());
        async move { send("POST", &url, &headers, body).await }
    };
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let opened = mcp(&a, BOT_KEY, None, init).await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    let session = opened.header("mcp-session-id").unwrap().to_owned();
    let call =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"kb.search","arguments":{"query":"x"}}}"#;
    let r = mcp(&b, BOT_KEY, Some(&session), call).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["result"]["isError"], false, "{}", r.json());
    assert_eq!(upstream.count("/kb/search"), 1);
    // Another agent's credential with it, on either replica: refused.
    let hijack = mcp(&b, support::SUPPORT_KEY, Some(&session), call).await;
    assert_eq!(hijack.status, 403);
    // Ended through B: unknown on A.
    let headers = vec![
        ("authorization", format!("Bearer {BOT_KEY}")),
        ("mcp-session-id", session.clone()),
    ];
    let del = send("DELETE", &format!("{}/mcp", b.data), &headers, Vec::new()).await;
    assert_eq!(del.status, 204);
    assert_eq!(mcp(&a, BOT_KEY, Some(&session), call).await.status, 404);
    assert_eq!(upstream.count("/kb/search"), 1);
}

/// A call held for approval on replica A, approved through A's admin plane, passes once on
/// replica B; a second use, on either replica, is refused. Listing and polling work anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_granted_on_one_replica_is_used_once_on_any() {
    let rule = "@id(\"big-refunds\")\n@approval(\"billing\")\nforbid (principal, action == Action::\"billing.refund\", resource) when { context.input.amount > 100 };\n";
    let extra = [("rules.cedar", rule.to_owned())];
    let Pair {
        upstream,
        dir: _dir,
        redis: _redis,
        a,
        b,
    } = Pair::start("{ calls_per_minute: 1000 }", &extra).await;
    let refund = r#"{"order_id": "O-7", "amount": 500}"#;
    let held = a.call_as(BOT_KEY, "billing.refund", refund).await;
    let id = held.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same call again, through B: the same pending request, not a second one.
    let again = b.call_as(BOT_KEY, "billing.refund", refund).await;
    assert_eq!(again.assert_error(202, "approval_required")["approval_id"], id.as_str());
    let pending = b
        .admin("GET", "/admin/approvals?status=pending", json!({}))
        .await
        .json();
    assert_eq!(pending["approvals"].as_array().unwrap().len(), 1, "{pending}");
    assert_eq!(pending["approvals"][0]["id"], id.as_str());
    let ok = a
        .admin("POST", &format!("/admin/approvals/{id}/approve"), json!({"by": "lee"}))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.json());
    // The agent polls B and sees it approved.
    let poll = send(
        "GET",
        &format!("{}/v1/approvals/{id}", b.data),
        &[("authorization", format!("Bearer {BOT_KEY}"))],
        Vec::new(),
    )
    .await;
    assert_eq!(poll.json()["status"], "approved", "{}", poll.json());
    let with = |r: &Replica| {
        let headers = vec![
            ("authorization", format!("Bearer {BOT_KEY}")),
            ("x-toolgate-approval", id.clone()),
        ];
        let url = format!("{}/v1/tools/billing.refund", r.data);
        async move { send("POST", &url, &headers, refund.as_bytes().to_vec()).await }
    };
    // Both replicas at once: exactly one passes.
    let (on_a, on_b) = tokio::join!(with(&a), with(&b));
    let mut statuses = [on_a.status, on_b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 403], "{:?} {:?}", on_a.body, on_b.body);
    let refused = if on_a.status == 403 { &on_a } else { &on_b };
    let msg = refused.assert_error(403, "approval_denied")["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("already used"), "{msg}");
    assert_eq!(upstream.count("/refunds/O-7"), 1);
    // And again later, on either: refused.
    with(&b).await.assert_error(403, "approval_denied");
    assert_eq!(upstream.count("/refunds/O-7"), 1);
    let used = a
        .admin("GET", &format!("/admin/approvals/{id}"), json!({}))
        .await
        .json();
    assert_eq!(used["status"], "used", "{used}");
}

/// Pins of upstream MCP tools are one set for every replica: a replica started after a
/// server changed a tool finds the change (it does not pin the new definition as first seen),
/// and an operator approves it once, through any replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_pins_are_one_set_for_every_replica() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("rug-pull");
    let crm = crate::mcp::upstream_mcp(&trigger).await;
    let redis = Redis::start(dir.path());
    policies(dir.path(), &upstream.url, "{ calls_per_minute: 1000 }");
    std::fs::write(
        dir.path().join("policies/crm.yaml"),
        format!(
            "mcp_servers:\n  crm: {{ url: \"http://127.0.0.1:{}/mcp\" }}\n",
            crm.port
        ),
    )
    .unwrap();
    let tools = |r: &Replica| {
        let url = format!("{}/admin/tools", r.admin);
        async move {
            let headers = vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))];
            send("GET", &url, &headers, Vec::new()).await.json()
        }
    };
    let state_of = |listed: &Value, name: &str| {
        listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["state"].as_str().unwrap().to_owned())
    };
    let a = Replica::start(dir.path(), "a", &redis.url());
    let deadline = Instant::now() + Duration::from_secs(15);
    while state_of(&tools(&a).await, "crm.lookup").as_deref() != Some("approved") {
        assert!(Instant::now() < deadline, "A never pinned crm.lookup");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The server changes a tool's description; then B starts.
    std::fs::write(&trigger, "now").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = Replica::start(dir.path(), "b", &redis.url());
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let listed = tools(&b).await;
        if state_of(&listed, "crm.lookup").is_some() {
            break listed;
        }
        assert!(Instant::now() < deadline, "B never listed crm.lookup");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state_of(&listed, "crm.lookup").as_deref(), Some("changed"), "{listed}");
    assert_eq!(state_of(&listed, "crm.notes").as_deref(), Some("approved"), "{listed}");
    // Approved once, through B: A takes the new definition at its next look.
    let sha = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "crm.lookup")
        .unwrap()["sha256"]
        .clone();
    let ok = b
        .admin(
            "POST",
            "/admin/tools/crm.lookup/approve",
            json!({"by": "sam", "sha256": sha}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.json());
    assert_eq!(a.admin("POST", "/admin/reload", json!({"by": "sam"})).await.status, 200);
    assert_eq!(state_of(&tools(&a).await, "crm.lookup").as_deref(), Some("approved"));
}

/// Each replica reports itself with the policy version it serves, so an operator sees them
/// all from any one, and sees a policy skew between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_is_listed_with_its_policy_version() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    policies(dir.path(), &upstream.url, "{ calls_per_minute: 10 }");
    let a = Replica::start(dir.path(), "a", &redis.url());
    // B serves another policy: the same files and one more tool.
    let other = dir.path().join("b-policies");
    policies(&other, &upstream.url, "{ calls_per_minute: 10 }");
    std::fs::write(
        other.join("policies/extra.yaml"),
        format!(
            "tools:\n  kb.extra:\n    upstream: {{ url: \"{}/kb/extra\" }}\n",
            upstream.url
        ),
    )
    .unwrap();
    let b = Replica::start_with_policies(dir.path(), "b", &redis.url(), &other.join("policies"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let listing = loop {
        let r = a.admin("GET", "/admin/replicas", json!({})).await;
        assert_eq!(r.status, 200);
        let listing = r.json();
        if listing["replicas"].as_array().unwrap().len() == 2 {
            break listing;
        }
        assert!(Instant::now() < deadline, "B never showed up: {listing}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let versions: Vec<&str> = listing["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["policy_version"].as_str().unwrap())
        .collect();
    assert_ne!(versions[0], versions[1], "{listing}");
    assert_eq!(listing["policy_skew"], true, "{listing}");
    let b_id = b.admin("GET", "/admin/replicas", json!({})).await.json()["self"].clone();
    assert_ne!(listing["self"], b_id);
    assert!(
        listing["replicas"].as_array().unwrap().iter().any(|r| r["id"] == b_id),
        "{listing}"
    );
}

/// Redis dies while calls are in flight: each call either completed or was refused with 503
/// and audited, none reached the tool unchecked, readiness failed; Redis back, calls flow
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_calls_are_refused_and_audited_then_flow_again() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    policies(
        dir.path(),
        &upstream.url,
        "{ calls_per_minute: 100000, tokens_per_hour: 10000000 }",
    );
    let a = Replica::start(dir.path(), "a", &redis.url());
    let b = Replica::start(dir.path(), "b", &redis.url());
    assert_eq!(a.ready().await.status, 200);
    let mut statuses = Vec::new();
    for round in 0..6 {
        if round == 3 {
            redis.kill();
        }
        let calls = (0..8).map(|i| {
            let r = if i % 2 == 0 { &a } else { &b };
            let id = format!("r{round}-{i}");
            async move { (id.clone(), r.call("kb.search", &id).await) }
        });
        for (id, resp) in futures_util::future::join_all(calls).await {
            let resp = resp.expect("every call is answered");
            if round >= 3 {
                resp.assert_error(503, "unavailable");
            }
            statuses.push((id, resp.status));
        }
    }
    let passed = statuses.iter().filter(|(_, s)| *s == 200).count();
    assert_eq!(passed, 24, "{statuses:?}");
    assert_eq!(
        upstream.count("/kb/search"),
        passed,
        "nothing unchecked reached the tool"
    );
    // Every refusal is on the trail, as a refusal.
    let events: Vec<Value> = [a.events(dir.path(), "a"), b.events(dir.path(), "b")].concat();
    for (id, status) in &statuses {
        let e: Vec<&Value> = events
            .iter()
            .filter(|e| e["request_id"] == id.as_str() && e["event"] == "tool_call")
            .collect();
        assert_eq!(e.len(), 1, "{id}: {e:?}");
        if *status == 503 {
            assert_eq!(
                (e[0]["decision"].as_str(), e[0]["code"].as_str()),
                (Some("deny"), Some("unavailable")),
                "{id}"
            );
        }
    }
    for r in [&a, &b] {
        let ready = r.ready().await;
        assert_eq!(ready.status, 503);
        assert_eq!(ready.json()["state"], "unreachable");
    }
    // Back: readiness and calls recover on their own.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.ready().await.status != 200 || b.ready().await.status != 200 {
        assert!(Instant::now() < deadline, "readiness did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.call("kb.search", "back-a").await.unwrap().status, 200);
    assert_eq!(b.call("kb.search", "back-b").await.unwrap().status, 200);
}

/// A replica killed while it holds a budget reservation: the reservation is a lease, and the
/// budget is whole again once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_of_a_killed_replica_ends_with_its_lease() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    // One call's reservation (4 + 25 tokens) fits; two do not.
    policies(dir.path(), &upstream.url, "{ tokens_per_hour: 40, budget: strict }");
    let mut a = Replica::start(dir.path(), "a", &redis.url());
    let b = Replica::start(dir.path(), "b", &redis.url());
    let data = a.data.clone();
    let held = tokio::spawn(async move {
        let headers = vec![("authorization", format!("Bearer {BOT_KEY}"))];
        support::try_send(
            "POST",
            &format!("{data}/v1/tools/slow.metered"),
            &headers,
            br#"{"q": 1}"#.to_vec(),
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count("/slow") == 0 {
        assert!(Instant::now() < deadline, "the slow call never reached the tool");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(held.await.unwrap().is_none(), "a killed replica answered");
    let started = Instant::now();
    // The dead replica's reservation still counts...
    b.call("kb.metered", "while-leased")
        .await
        .unwrap()
        .assert_error(429, "budget_exceeded");
    // ...until its lease (the tool's 2 s deadline and a margin) ends.
    let mut passed = false;
    while started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if b.call("kb.metered", "after-lease").await.unwrap().status == 200 {
            passed = true;
            break;
        }
    }
    assert!(passed, "the budget never came back");
    assert!(started.elapsed() >= Duration::from_secs(1), "the lease ended at once");
}

/// What an operator gets wrong first: a URL that is not one, a password in the YAML, a wrong
/// password, a Redis that does not persist. Each stops the start with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_settings_that_cannot_work_stop_the_start_with_a_clear_error() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    policies(dir.path(), &upstream.url, "{ calls_per_minute: 10 }");
    let locked = Redis::start_with(dir.path(), &["--appendonly", "yes", "--requirepass", "s3cret-pw"]);
    let volatile = Redis::start_with(&dir.path().join("v"), &["--appendonly", "no"]);
    let serve = |state: &str, env: &[(&str, &str)]| {
        let own = dir.path().join("bad");
        std::fs::create_dir_all(&own).unwrap();
        let cfg = support::write_serve_config(&own, &format!("state: {state}\n"));
        std::fs::create_dir_all(own.join("policies")).unwrap();
        for f in std::fs::read_dir(dir.path().join("policies")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, own.join("policies").join(f.file_name().unwrap())).unwrap();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolgate"));
        cmd.args(["serve", "-c"])
            .arg(&cfg)
            .env_remove("TOOLGATE_REDIS_PASSWORD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{state} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = serve("redis://127.0.0.1:notaport/0", &[]);
    assert!(err.contains("state") && err.contains("not a Redis URL"), "{err}");
    let err = serve(&format!("redis://:s3cret-pw@127.0.0.1:{}/0", locked.port), &[]);
    assert!(err.contains("must not hold the password"), "{err}");
    assert!(!err.contains("s3cret-pw"), "the password is not repeated: {err}");
    let err = serve(&locked.url(), &[("TOOLGATE_REDIS_PASSWORD", "wrong")]);
    assert!(
        err.contains(&format!("Redis at 127.0.0.1:{} refused the credentials", locked.port)),
        "{err}"
    );
    assert!(err.contains("TOOLGATE_REDIS_PASSWORD"), "{err}");
    assert!(!err.contains("wrong\"") && !err.contains("s3cret"), "{err}");
    let err = serve(&volatile.url(), &[]);
    assert!(
        err.contains("does not persist writes") && err.contains("appendonly yes"),
        "{err}"
    );
    // The right password from the environment: `toolgate check` says the backend is fine.
    let own = dir.path().join("bad");
    std::fs::write(
        own.join("toolgate.yaml"),
        std::fs::read_to_string(own.join("toolgate.yaml"))
            .unwrap()
            .replace(&volatile.url(), &locked.url()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["check", "-c"])
        .arg(own.join("toolgate.yaml"))
        .env("TOOLGATE_REDIS_PASSWORD", "s3cret-pw")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("state backend redis at 127.0.0.1:{}", locked.port)),
        "{stdout}"
    );
}
