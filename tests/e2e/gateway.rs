//! End to end over real HTTP: the gateway in front of a real upstream, every row of the error
//! table this issue owns, and the audit event each call leaves.

use crate::support::{self, ANALYST_KEY, Harness, SUPPORT_KEY, send};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_an_allowed_call_with_only_the_headers_toolgate_chooses() {
    let h = Harness::start().await;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let headers = vec![
        ("authorization", format!("Bearer {SUPPORT_KEY}")),
        ("content-type", "application/json".to_owned()),
        ("x-request-id", "req-abc-123".to_owned()),
        ("traceparent", trace.to_owned()),
        ("cookie", "session=secret".to_owned()),
        ("x-toolgate-agent", "admin-bot".to_owned()),
        ("connection", "keep-alive, x-custom".to_owned()),
        ("x-custom", "hop".to_owned()),
    ];
    let body = br#"{ "order_id": "O-17",   "amount": 5 }"#.to_vec();
    let r = send("POST", &format!("{}/v1/tools/billing.refund", h.data), &headers, body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-toolgate-decision"), Some("allow"));
    assert_eq!(r.request_id(), "req-abc-123");
    assert_eq!(r.json()["path"], "/refunds/O-17");

    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    // The re-serialised, validated JSON, not the caller's bytes.
    assert_eq!(&s.body[..], br#"{"amount":5,"order_id":"O-17"}"#);
    assert_eq!(s.headers.get("x-request-id").unwrap(), "req-abc-123");
    assert_eq!(s.headers.get("traceparent").unwrap(), trace);
    // `Host` is the tool URL's authority, once (toolgate sets it, not the client).
    let host: Vec<_> = s.headers.get_all("host").iter().collect();
    assert_eq!(host, [h.upstream.url.trim_start_matches("http://")]);
    // Identity comes from the credential, never from the caller's headers.
    assert_eq!(s.headers.get("x-toolgate-agent").unwrap(), "support-bot");
    for never in ["authorization", "cookie", "x-custom"] {
        assert!(s.headers.get(never).is_none(), "{never} was forwarded");
    }

    let e = h.event_for(&r);
    assert_eq!(e["event"], "tool_call");
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["source"], "127.0.0.1", "the connection's peer");
    assert_eq!(e["agent"], "support-bot");
    assert_eq!(e["tool"], "billing.refund");
    assert_eq!(e["upstream"]["status"], 200);
    assert_eq!(e["arguments"], json!({"amount": 5, "order_id": "O-17"}));
    assert_eq!(
        e["arguments_sha256"],
        support::sha256_hex(r#"{"amount":5,"order_id":"O-17"}"#)
    );
    assert_eq!(e["policy_version"].as_str().unwrap().len(), 16);
    assert!(e["ts"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tools_receive_arguments_as_a_query_string() {
    let h = Harness::start().await;
    let r = h.call("echo.get", Some(SUPPORT_KEY), r#"{"q": "a b&c", "n": 2}"#).await;
    assert_eq!(r.status, 200);
    let s = &h.upstream.requests()[0];
    assert_eq!(s.method, "GET");
    assert_eq!(s.uri, "/echo?n=2&q=a%20b%26c");
    assert!(s.body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_missing_wrong_and_malformed_credentials() {
    let h = Harness::start().await;
    for (auth, what) in [
        (None, "no header"),
        (Some("Bearer wrong-key".to_owned()), "unknown key"),
        (Some(SUPPORT_KEY.to_owned()), "no scheme"),
        (Some(format!("Basic {SUPPORT_KEY}")), "wrong scheme"),
        (Some(format!("Bearer {SUPPORT_KEY}x")), "key with a suffix"),
    ] {
        let mut headers = vec![
            ("x-toolgate-agent", "support-bot".to_owned()),
            ("x-agent-id", "support-bot".to_owned()),
        ];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let r = send(
            "POST",
            &format!("{}/v1/tools/kb.search", h.data),
            &headers,
            b"{}".to_vec(),
        )
        .await;
        let body = r.assert_error(401, "unauthenticated");
        assert!(!body.to_string().contains(SUPPORT_KEY), "{what}: the key is echoed");
        let e = h.event_for(&r);
        assert_eq!(e["decision"], "deny", "{what}");
        assert_eq!(e["code"], "unauthenticated");
        assert_eq!(
            e["source"], "127.0.0.1",
            "{what}: an unknown caller is known by its address"
        );
        assert_eq!(
            e["agent"],
            Value::Null,
            "{what}: a spoofed identity header was believed"
        );
    }
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agents_key_gets_that_agents_allowlist() {
    let h = Harness::start().await;
    let r = h
        .call("tickets.read", Some(ANALYST_KEY), r#"{"ticket_id": "T-1"}"#)
        .await;
    r.assert_error(403, "tool_not_allowed");
    assert_eq!(h.event_for(&r)["agent"], "analyst-bot");
    let r = h.call("kb.search", Some(ANALYST_KEY), r#"{"query": "x"}"#).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_not_allowed_tools_get_the_same_answer() {
    let h = Harness::start().await;
    let not_allowed = h
        .call("billing.delete_account", Some(SUPPORT_KEY), r#"{"account_id": "A"}"#)
        .await;
    let unknown = h
        .call("billing.delete_everything", Some(SUPPORT_KEY), r#"{"account_id": "A"}"#)
        .await;
    let a = not_allowed.assert_error(403, "tool_not_allowed");
    let b = unknown.assert_error(403, "tool_not_allowed");
    assert_eq!(a["error"]["rule"], b["error"]["rule"]);
    assert_eq!(
        a["error"]["message"].as_str().unwrap().replace("delete_account", "X"),
        b["error"]["message"]
            .as_str()
            .unwrap()
            .replace("delete_everything", "X")
    );
    // The allowlist runs before the body is read: a bad body on a forbidden tool says nothing more.
    let r = h.call("billing.delete_account", Some(SUPPORT_KEY), "not json").await;
    r.assert_error(403, "tool_not_allowed");
    assert_eq!(h.event_for(&r)["reasons"][0]["stage"], "allowlist");
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_names_match_exactly_without_decoding_or_case_folding() {
    let h = Harness::start().await;
    for tool in [
        "KB.search",
        "kb.Search",
        "kb%2Esearch",
        "kb.search%00",
        "kb.search%20",
        "kb%2esearch",
        "%6bb.search",
        "kb.search.",
    ] {
        let r = h.call(tool, Some(SUPPORT_KEY), r#"{"query": "x"}"#).await;
        r.assert_error(403, "tool_not_allowed");
        assert_eq!(h.event_for(&r)["code"], "tool_not_allowed", "{tool}");
    }
    // A glob does not match its own prefix.
    let r = h.call("kb", Some(SUPPORT_KEY), "{}").await;
    r.assert_error(403, "tool_not_allowed");
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_extra_path_never_reach_another_route() {
    let h = Harness::start().await;
    let auth = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    for path in [
        "/v1/tools/../../admin/reload",
        "/v1/tools/kb.search/../billing.delete_account",
        "/v1/tools/kb.search/extra",
        "/admin/reload",
        "/admin/policy",
        "/metrics",
    ] {
        let r = send("POST", &format!("{}{path}", h.data), &auth, b"{}".to_vec()).await;
        r.assert_error(404, "not_found");
        // Audited, without the path the caller made up.
        let e = h.refusal_for(&r);
        assert_eq!(
            (e["endpoint"].as_str(), e["code"].as_str()),
            (Some("(unknown)"), Some("not_found"))
        );
        assert!(
            !e.to_string().contains("admin") && !e.to_string().contains("extra"),
            "{e}"
        );
    }
    let r = send("POST", &format!("{}/v1/tools/..", h.data), &auth, b"{}".to_vec()).await;
    r.assert_error(403, "tool_not_allowed");
    let r = send("GET", &format!("{}/v1/tools/kb.search", h.data), &auth, Vec::new()).await;
    r.assert_error(405, "method_not_allowed");
    let e = h.refusal_for(&r);
    assert_eq!(e["endpoint"], "/v1/tools/{tool}");
    assert_eq!(e["source"], "127.0.0.1");
    assert_eq!(e["method"], "GET");
    assert_eq!(e["status"], 405);
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_values_cannot_traverse_the_upstream_path() {
    let h = Harness::start().await;
    let r = h
        .call(
            "billing.refund",
            Some(SUPPORT_KEY),
            r#"{"order_id": "../admin", "amount": 1}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.upstream.requests()[0].uri, "/refunds/%2E%2E%2Fadmin");
    let r = h
        .call(
            "billing.refund",
            Some(SUPPORT_KEY),
            r#"{"order_id": "O-1/../../admin?x=1#y", "amount": 1}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.upstream.requests()[1].uri,
        "/refunds/O-1%2F%2E%2E%2F%2E%2E%2Fadmin%3Fx%3D1%23y"
    );
    for dots in ["..", "."] {
        let r = h
            .call(
                "billing.refund",
                Some(SUPPORT_KEY),
                &json!({"order_id": dots, "amount": 1}).to_string(),
            )
            .await;
        r.assert_error(422, "invalid_arguments");
        assert_eq!(h.event_for(&r)["reasons"][0]["rule"], "url");
    }
    assert_eq!(h.upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_are_refused_with_a_reason_and_never_forwarded() {
    let h = Harness::start().await;
    let deep = format!("{{\"query\":{}1{}}}", "[".repeat(20), "]".repeat(20));
    for (body, rule, needle) in [
        ("not json", "json", "not valid JSON"),
        ("[1,2]", "json", "JSON object"),
        (
            r#"{"order_id": "O-1", "amount": 1, "amount": 1000}"#,
            "json",
            "same key twice",
        ),
        (
            r#"{"order_id": "O-1"}"#,
            "schema",
            "Missing required argument '/amount'",
        ),
        (r#"{"order_id": "O-1", "amount": 0}"#, "schema", "must be at least 1"),
        (
            r#"{"order_id": "O-1", "amount": "5"}"#,
            "schema",
            "must be of type integer",
        ),
        (
            r#"{"order_id": "O-1", "amount": 5, "card_4111111111111111": 1}"#,
            "schema",
            "accepts only",
        ),
    ] {
        let r = h.call("billing.refund", Some(SUPPORT_KEY), body).await;
        let err = r.assert_error(422, "invalid_arguments");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
        assert!(!message.contains("4111"), "the message echoes input: {message}");
        let e = h.event_for(&r);
        assert_eq!(e["reasons"][0]["rule"], rule, "{body}");
        assert_eq!(e["code"], "invalid_arguments");
    }
    let r = h.call("kb.search", Some(SUPPORT_KEY), &deep).await;
    let err = r.assert_error(422, "invalid_arguments");
    assert!(err["error"]["message"].as_str().unwrap().contains("nested deeper"));
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_whether_declared_or_streamed() {
    let h = Harness::start().await;
    let big = format!("{{\"query\": \"{}\"}}", "a".repeat(5000));
    let r = h.call("kb.search", Some(SUPPORT_KEY), &big).await;
    r.assert_error(413, "payload_too_large");
    assert_eq!(h.event_for(&r)["code"], "payload_too_large");
    // Unauthenticated callers learn nothing about limits.
    let r = h.call("kb.search", None, &big).await;
    r.assert_error(401, "unauthenticated");
    assert_eq!(h.upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_headers_are_refused_before_anything_runs() {
    let h = Harness::start().await;
    let url = format!("{}/v1/tools/kb.search", h.data);
    let names: Vec<String> = (0..110).map(|i| format!("x-filler-{i}")).collect();
    let with_fillers = |n: usize| {
        let mut headers: Vec<(&str, String)> = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
        headers.extend(names[..n].iter().map(|name| (name.as_str(), "1".to_owned())));
        headers
    };
    let r = send("POST", &url, &with_fillers(110), br#"{"query": "q"}"#.to_vec()).await;
    assert_eq!(r.status, 431, "110 headers");
    assert_eq!(h.upstream.requests().len(), 0);
    let r = send("POST", &url, &with_fillers(90), br#"{"query": "q"}"#.to_vec()).await;
    assert_eq!(r.status, 200, "90 headers: {:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_stop_arriving_are_cut_off_on_new_and_reused_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with(
        "limits: { max_body_bytes: 4096, request_read_timeout_ms: 300, upstream_timeout_ms: 2000 }\n",
    )
    .await;
    // Half a request head, then nothing: the connection is closed, without an answer.
    let started = std::time::Instant::now();
    let reply = support::send_stalled(&h.data, "POST /v1/tools/kb.search HTTP/1.1\r\nhost: x\r\n").await;
    assert_eq!(reply, "", "no answer to a head that never ended");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));

    // A kept-alive connection: a whole call is answered, then the next head stalls and is cut
    // off by the same deadline (its timer is re-armed for every request).
    let mut conn = tokio::net::TcpStream::connect(h.data.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = r#"{"query": "q"}"#;
    let call = format!(
        "POST /v1/tools/kb.search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SUPPORT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..3 {
        conn.write_all(call.as_bytes()).await.unwrap();
        let reply = support::read_response(&mut conn).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // idle, under the limit
    }
    conn.write_all(b"POST /v1/tools/kb.search HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("the stalled connection is closed")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
    assert_eq!(h.upstream.count("/kb/search"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408_and_is_never_forwarded() {
    let h = Harness::start_with(
        "limits: { max_body_bytes: 4096, request_read_timeout_ms: 300, upstream_timeout_ms: 2000 }\n",
    )
    .await;
    // Headers, and a third of the declared body; then nothing.
    let head = format!(
        "POST /v1/tools/kb.search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SUPPORT_KEY}\r\ncontent-type: application/json\r\ncontent-length: 30\r\n\r\n{{\"query\": "
    );
    let reply = support::send_stalled(&h.data, &head).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
    assert_eq!(h.upstream.requests().len(), 0);
    let events: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["code"] == "request_timeout")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tool_times_out_once_and_is_never_retried() {
    let h = Harness::start().await;
    let r = h.call("slow.create", Some(SUPPORT_KEY), r#"{"x": 1}"#).await;
    let err = r.assert_error(504, "upstream_timeout");
    assert!(err["error"]["message"].as_str().unwrap().contains("not retried"));
    let e = h.event_for(&r);
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["code"], "upstream_timeout");
    assert!(e["upstream"]["duration_ms"].as_f64().unwrap() >= 300.0);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(h.upstream.count("/slow"), 1, "a POST that timed out was sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_concurrency_limit_are_shed_at_once_and_their_places_come_back() {
    // Two calls held at a slow tool fill `max_concurrent_requests: 2`; a third is answered 503
    // at once (never queued) and audited, and once the two are answered there is room again.
    let h = Harness::start_full(
        "limits: { max_body_bytes: 4096, upstream_timeout_ms: 5000, max_concurrent_requests: 2 }\n",
        &[(
            "hold.yaml",
            "tools:\n  kb.hold:\n    upstream: { url: \"{{UPSTREAM}}/slow\", method: POST, timeout_ms: 5000 }\n",
        )],
    )
    .await;
    let shed = async {
        while h.upstream.count("/slow") < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await
    };
    let (a, b, over) = tokio::join!(
        h.call("kb.hold", Some(SUPPORT_KEY), "{}"),
        h.call("kb.hold", Some(SUPPORT_KEY), "{}"),
        shed,
    );
    let err = over.assert_error(503, "unavailable");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("concurrency limit"),
        "{err}"
    );
    assert_eq!(over.header("retry-after"), Some("1"));
    // Shed, but not silently: the refusal is in the audit trail like any other.
    let e = h.refusal_for(&over);
    assert_eq!(e["source"], "127.0.0.1");
    assert_eq!(
        (
            e["endpoint"].as_str(),
            e["method"].as_str(),
            e["status"].as_u64(),
            e["code"].as_str()
        ),
        (Some("/v1/tools/{tool}"), Some("POST"), Some(503), Some("unavailable"))
    );
    assert_eq!((a.status, b.status), (200, 200), "the calls in flight are unaffected");
    assert_eq!(a.json()["late"], true);
    assert_eq!(h.upstream.count("/kb/"), 0, "a shed call never reaches the tool");
    let metrics = String::from_utf8(h.admin("GET", "/metrics", false).await.body.to_vec()).unwrap();
    assert!(metrics.lines().any(|l| l == "toolgate_shed_total 1"), "{metrics}");
    // Both places were given back: two calls at once fit again.
    let (c, d) = tokio::join!(
        h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#),
        h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#),
    );
    assert_eq!((c.status, d.status), (200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_calls_in_flight_and_closes_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::start().await;
    let running = h.running.take().expect("the harness runs the gateway");
    let addr = h.data.trim_start_matches("http://").to_owned();
    // A kept-alive connection, idle after one call.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"query": "q"}"#;
    let call = format!(
        "POST /v1/tools/kb.search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SUPPORT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    idle.write_all(call.as_bytes()).await.unwrap();
    assert!(support::read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    // A call in flight (its tool answers after its 300 ms timeout).
    let url = format!("{}/v1/tools/slow.create", h.data);
    let auth = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    let in_flight = tokio::spawn(async move { send("POST", &url, &auth, br#"{"x": 1}"#.to_vec()).await });
    while h.upstream.count("/slow") == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let started = std::time::Instant::now();
    running.shutdown().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "shutdown waited for the idle connection"
    );
    // The call in flight got its whole answer, not a cut connection.
    in_flight.await.unwrap().assert_error(504, "upstream_timeout");
    // The idle connection was closed, and nothing new is accepted.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_an_upstream_error() {
    let h = Harness::start().await;
    let r = h.call("down.read", Some(SUPPORT_KEY), "{}").await;
    r.assert_error(502, "upstream_error");
    let e = h.event_for(&r);
    assert_eq!(e["code"], "upstream_error");
    assert_eq!(e["upstream"]["status"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_larger_than_the_limit_are_not_relayed() {
    let h = Harness::start().await;
    let r = h.call("big.read", Some(SUPPORT_KEY), "{}").await;
    r.assert_error(502, "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_with_their_status() {
    let h = Harness::start().await;
    let r = h.call("flaky.create", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["err"], "boom");
    assert_eq!(r.header("x-toolgate-decision"), Some("allow"));
    assert_eq!(h.event_for(&r)["upstream"]["status"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_content_names_the_filter_but_not_the_text() {
    let h = Harness::start().await;
    let r = h
        .call(
            "kb.search",
            Some(SUPPORT_KEY),
            r#"{"query": "news on \u0050roject\u00a0FALCON?"}"#,
        )
        .await;
    let err = r.assert_error(403, "content_blocked");
    let m = err["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("internal-terms") && !m.to_lowercase().contains("falcon"),
        "{m}"
    );
    assert_eq!(h.event_for(&r)["reasons"][0]["rule"], "internal-terms");
    assert_eq!(h.upstream.requests().len(), 0);
}

/// A tool whose own filters do not redact PII still never puts it in the audit trail: the
/// event's arguments pass every detector (values and keys, at any depth), while a call with
/// nothing to redact records exactly the canonical body that was forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_redact_pii_the_tools_own_filters_let_through() {
    let h = Harness::start().await;
    let args = r#"{"query": "mail ada@example.com", "ada@example.com": 1, "more": [{"ssn": "123-45-6789"}]}"#;
    let r = h.call("kb.search", Some(SUPPORT_KEY), args).await;
    assert_eq!(r.status, 200);
    // kb.search only blocks internal terms: the tool gets the arguments as they were sent.
    let seen = h.upstream.requests()[0].json();
    assert_eq!(seen["query"], "mail ada@example.com");
    assert_eq!(seen["more"][0]["ssn"], "123-45-6789");
    let e = h.event_for(&r);
    assert_nothing_raw(&e, &["ada@example.com", "123-45-6789"]);
    assert_eq!(e["arguments"]["query"], "[REDACTED:email]");
    assert_eq!(e["arguments"]["[REDACTED:email]"], 1);
    assert_eq!(e["arguments"]["more"][0]["ssn"], "[REDACTED:ssn]");

    // Nothing to redact: the event records the forwarded body, keys sorted.
    let r = h
        .call(
            "kb.search",
            Some(SUPPORT_KEY),
            r#"{"query": "reset password", "limit": 3}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let e = h.event_for(&r);
    assert_eq!(e["arguments"], json!({"limit": 3, "query": "reset password"}));
    assert_eq!(e["arguments"], h.upstream.requests()[1].json());
    // A tool without any filter: the event is still redacted.
    let r = h
        .call(
            "billing.refund",
            Some(SUPPORT_KEY),
            r#"{"order_id": "ada@example.com", "amount": 5}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["arguments"]["order_id"], "[REDACTED:email]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_is_redacted_before_the_tool_sees_it_and_in_the_audit_event() {
    let h = Harness::start().await;
    let r = h
        .call(
            "tickets.reply",
            Some(SUPPORT_KEY),
            r#"{"ticket_id": "T-1", "body": "mail ada@example.com", "meta": {"ssn": "123-45-6789"}}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = h.upstream.requests()[0].json();
    assert_eq!(seen["body"], "[REDACTED:email]");
    assert_eq!(seen["meta"]["ssn"], "[REDACTED:ssn]");
    let e = h.event_for(&r);
    assert_nothing_raw(&e, &["ada@example.com", "123-45-6789"]);
    assert_eq!(e["arguments"]["body"], "[REDACTED:email]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_filters_redact_json_and_text_and_block_secrets() {
    let h = Harness::start().await;
    let r = h
        .call("tickets.read", Some(SUPPORT_KEY), r#"{"ticket_id": "T-9"}"#)
        .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["customer"]["email"], "[REDACTED:email]");
    assert_eq!(body["customer"]["card"], "[REDACTED:credit_card]");
    assert_eq!(body["status"], "open");

    let r = h.call("text.read", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), "hello\n[REDACTED:email]\nbye");

    let r = h.call("secret.read", Some(SUPPORT_KEY), "{}").await;
    let err = r.assert_error(403, "content_blocked");
    assert!(!err.to_string().contains("AKIA"));
    let e = h.event_for(&r);
    assert_eq!(e["upstream"]["status"], 200, "the event must show the tool did run");
    assert_eq!(e["reasons"][0]["stage"], "output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_filters_pass_clean_json_as_it_came_and_withhold_json_they_cannot_vouch_for() {
    let tools: String = ["clean", "pii", "dup", "deep", "broken"]
        .iter()
        .map(|a| format!("  kb.answer_{a}:\n    upstream: {{ url: \"{{{{UPSTREAM}}}}/answer/{a}\", method: POST }}\n    filters: {{ output: [ pii ] }}\n"))
        .collect();
    let h = Harness::start_full("", &[("answers.yaml", &format!("tools:\n{tools}"))]).await;

    // Clean: byte for byte what the tool sent.
    let r = h.call("kb.answer_clean", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"b": [1, {"note": "all fine", "x": null}],  "a": "plain text"}"#
    );
    // PII at depth: redacted, the rest kept.
    let r = h.call("kb.answer_pii", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"k": [{"z": "[REDACTED:email]"}], "n": 1}));
    // Duplicate keys, nesting past `max_json_depth` (8 here), a truncated body: withheld.
    for a in ["dup", "deep", "broken"] {
        let r = h.call(&format!("kb.answer_{a}"), Some(SUPPORT_KEY), "{}").await;
        let err = r.assert_error(403, "content_blocked");
        assert!(
            err["error"]["message"].as_str().unwrap().contains("could not be read"),
            "{a}: {err}"
        );
        assert_eq!(h.event_for(&r)["upstream"]["status"], 200, "{a}: the tool did run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_filters_are_not_fooled_by_labels_charsets_or_multi_line_keys() {
    let tools: String = ["upper", "labelled_text", "utf16", "pem", "pem_lines", "ndjson", "dup_text", "bom", "utf7"]
        .iter()
        .map(|a| format!("  kb.answer_{a}:\n    upstream: {{ url: \"{{{{UPSTREAM}}}}/answer/{a}\", method: POST }}\n    filters: {{ output: [ pii, keys ] }}\n"))
        .collect();
    let filters = "filters:\n  keys: { detect: [ private_key ], action: redact }\n";
    let h = Harness::start_full("", &[("answers.yaml", &format!("{filters}tools:\n{tools}"))]).await;
    // JSON with an escaped `@`, labelled `Application/JSON` or `text/plain`: decoded, found.
    for a in ["upper", "labelled_text"] {
        let r = h.call(&format!("kb.answer_{a}"), Some(SUPPORT_KEY), "{}").await;
        assert_eq!(r.status, 200, "{a}");
        assert_eq!(r.json(), json!({"to": "[REDACTED:email]"}), "{a}");
    }
    // A charset the filters do not read (however it is spaced), or JSON with a repeated key
    // that a lenient client would read: withheld, not passed unseen.
    for a in ["utf16", "utf7", "dup_text"] {
        let r = h.call(&format!("kb.answer_{a}"), Some(SUPPORT_KEY), "{}").await;
        r.assert_error(403, "content_blocked");
    }
    // JSON lines, or JSON after a byte-order mark, under a text label: escapes decoded, found.
    for a in ["ndjson", "bom"] {
        let r = h.call(&format!("kb.answer_{a}"), Some(SUPPORT_KEY), "{}").await;
        assert_eq!(r.status, 200, "{a}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("example.com") && text.contains("[REDACTED:email]"),
            "{a}: {text}"
        );
    }
    let r = h.call("kb.answer_ndjson", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        "[REDACTED:email]\n{\"n\": 1}",
        "other lines as they came"
    );
    // A private key in text: the whole PEM block goes, not only its first line.
    let r = h.call("kb.answer_pem", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(r.status, 200);
    let text = std::str::from_utf8(&r.body).unwrap();
    assert!(!text.contains("MIIE") && !text.contains("b3Bl"), "{text}");
    // A header redacted for the email before it on the same line still takes its key along.
    assert!(!text.contains("MHcC") && !text.contains("ops@"), "{text}");
    assert!(text.starts_with("key:\n") && text.ends_with("\ndone"), "{text}");
    // The same key as a JSON array of lines: every line of the block goes, and only those.
    let r = h.call("kb.answer_pem_lines", Some(SUPPORT_KEY), "{}").await;
    assert_eq!(r.status, 200);
    let gone = "[REDACTED:private_key]";
    assert_eq!(
        r.json(),
        json!({"file": "id_rsa", "lines": [gone, gone, gone, gone, "after"]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_ids_are_refused_and_sessions_are_recorded() {
    let h = Harness::start().await;
    let headers = vec![
        ("authorization", format!("Bearer {SUPPORT_KEY}")),
        ("x-request-id", "bad id with spaces".to_owned()),
        ("x-toolgate-session", "run-42".to_owned()),
    ];
    let r = send(
        "POST",
        &format!("{}/v1/tools/kb.search", h.data),
        &headers,
        br#"{"query":"q"}"#.to_vec(),
    )
    .await;
    r.assert_error(400, "invalid_request");
    assert_ne!(r.request_id(), "bad id with spaces", "the refusal has an id of its own");
    assert_eq!(h.upstream.count("/kb/"), 0);
    assert_eq!(h.refusal_for(&r)["code"], "invalid_request");

    let headers = vec![
        ("authorization", format!("Bearer {SUPPORT_KEY}")),
        ("x-toolgate-session", "run-42".to_owned()),
    ];
    let r = send(
        "POST",
        &format!("{}/v1/tools/kb.search", h.data),
        &headers,
        br#"{"query":"q"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["session"], "run-42");

    let headers = vec![
        ("authorization", format!("Bearer {SUPPORT_KEY}")),
        ("x-toolgate-session", "x".repeat(200)),
    ];
    let r = send(
        "POST",
        &format!("{}/v1/tools/kb.search", h.data),
        &headers,
        br#"{"query":"q"}"#.to_vec(),
    )
    .await;
    r.assert_error(400, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_fails_calls_closed() {
    let h = Harness::start().await;
    // Replace the audit file with a directory-less path by making the file read-only is not
    // enough as root; instead fill the slot with a full device when available.
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let mut config = toolgate::config::ServerConfig::parse(
        "c.yaml",
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\naudit: { file: /dev/full }\n",
    )
    .unwrap();
    config.policies = h.policy_dir.clone();
    let policy = toolgate::policy::Policy::load(&h.policy_dir).unwrap();
    let audit = toolgate::audit::AuditLog::open(&config.audit).unwrap();
    let approvals =
        toolgate::approval::Approvals::open(&h.dir.path().join("full.redb"), std::time::Duration::from_secs(60))
            .unwrap();
    let gw = std::sync::Arc::new(toolgate::gateway::Gateway::new(config, policy, None, audit, approvals));
    let running = toolgate::server::start(gw).await.unwrap();
    let url = format!("http://{}/v1/tools/kb.search", running.data_addr);
    let auth = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    let r = send("POST", &url, &auth, br#"{"query":"q"}"#.to_vec()).await;
    r.assert_error(503, "unavailable");
    // The sink is now known to be failing: the next call is refused before it is forwarded.
    let before = h.upstream.requests().len();
    let r = send("POST", &url, &auth, br#"{"query":"q"}"#.to_vec()).await;
    r.assert_error(503, "unavailable");
    assert_eq!(
        h.upstream.requests().len(),
        before,
        "a call was forwarded while the audit log was failing"
    );
    let ready = send("GET", &format!("http://{}/readyz", running.admin_addr), &[], Vec::new()).await;
    assert_eq!(ready.status, 503);
    running.shutdown().await;
}

/// No raw value of `secrets` anywhere in an audit event.
fn assert_nothing_raw(event: &Value, secrets: &[&str]) {
    let text = event.to_string();
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} is in the event: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_unknown_callers_past_their_allowance_are_summarized_not_lost() {
    let h = Harness::start_with(
        "audit: { unknown_callers: { per_source_per_minute: 3, per_minute: 1000, summary_seconds: 1 } }\n",
    )
    .await;
    let mut refused = Vec::new();
    for _ in 0..8 {
        let r = h.call("kb.search", Some("not-a-key"), r#"{"query": "q"}"#).await;
        // The answer does not change: the allowance is about the trail, not the caller.
        r.assert_error(401, "unauthenticated");
        refused.push(r.request_id());
    }
    for _ in 0..2 {
        let r = send("POST", &format!("{}/no/such/endpoint", h.data), &[], b"{}".to_vec()).await;
        r.assert_error(404, "not_found");
    }
    // MCP, refused before any agent is known: the same allowance.
    let mcp = send(
        "POST",
        &format!("{}/mcp", h.data),
        &[
            ("authorization", "Bearer not-a-key".to_owned()),
            ("content-type", "application/json".to_owned()),
            ("accept", "application/json, text/event-stream".to_owned()),
        ],
        br#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}"#.to_vec(),
    )
    .await;
    assert_eq!(mcp.status, 401);
    // A known agent from the same address is not affected, nor counted.
    let ok = h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await;
    assert_eq!(ok.status, 200);
    assert_eq!(h.event_for(&ok)["decision"], "allow");

    let written: Vec<Value> = h
        .audit()
        .into_iter()
        .filter(|e| e["code"] == "unauthenticated")
        .collect();
    assert_eq!(written.len(), 3, "the allowance, one event each");
    let ids: Vec<&str> = written.iter().map(|e| e["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids, refused[..3].iter().map(String::as_str).collect::<Vec<_>>());

    // Within a second or two, the rest in events for the source (one per summary: the calls
    // may straddle two), with exact counts.
    let mut total = (0, json!({}));
    for _ in 0..50 {
        let summaries: Vec<Value> = h
            .audit()
            .into_iter()
            .filter(|e| e["event"] == "refusals_summarized")
            .collect();
        let mut codes = serde_json::Map::new();
        for s in &summaries {
            assert_eq!(s["source"], "127.0.0.1");
            assert!(s["first"].as_str().unwrap() <= s["last"].as_str().unwrap());
            for (code, n) in s["codes"].as_object().unwrap() {
                let sum = codes.get(code).and_then(Value::as_u64).unwrap_or(0) + n.as_u64().unwrap();
                codes.insert(code.clone(), sum.into());
            }
        }
        total = (
            summaries.iter().map(|s| s["count"].as_u64().unwrap()).sum::<u64>(),
            Value::Object(codes),
        );
        if total.0 >= 8 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(total, (8, json!({"unauthenticated": 6, "not_found": 2})));
    let metrics = String::from_utf8(h.admin("GET", "/metrics", false).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("toolgate_audit_refusals_summarized_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_names_the_source_only_behind_a_trusted_proxy() {
    let spoof = |h: &Harness, key: &'static str| {
        let url = format!("{}/v1/tools/kb.search", h.data);
        async move {
            let headers = [
                ("authorization", format!("Bearer {key}")),
                ("x-forwarded-for", "198.51.100.1, 203.0.113.9".to_owned()),
            ];
            send("POST", &url, &headers, br#"{"query": "q"}"#.to_vec()).await
        }
    };
    // No trusted proxies (the default): the header is the caller's claim, not evidence.
    let h = Harness::start().await;
    let r = spoof(&h, SUPPORT_KEY).await;
    assert_eq!(h.event_for(&r)["source"], "127.0.0.1");

    // Behind a trusted proxy (here the test itself, on 127.0.0.1): the entry it appended.
    let h = Harness::start_with("trusted_proxies: [ 127.0.0.1 ]\n").await;
    let r = spoof(&h, SUPPORT_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.event_for(&r)["source"], "203.0.113.9");
    // And the unknown caller's allowance is kept per that address.
    let r = spoof(&h, "not-a-key").await;
    r.assert_error(401, "unauthenticated");
    assert_eq!(h.event_for(&r)["source"], "203.0.113.9");
}

/// The HTTP transport's half of the trace-context rule the MCP test holds too: a malformed
/// `traceparent` or an oversized `tracestate` is dropped, a well-formed one forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_trace_context_is_not_forwarded() {
    let h = Harness::start().await;
    let long_state = format!("vendor={}", "x".repeat(600));
    for (traceparent, tracestate) in [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=1"),
        (
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            long_state.as_str(),
        ),
        ("not-a-traceparent", long_state.as_str()),
    ] {
        let extra = [("traceparent", traceparent), ("tracestate", tracestate)];
        let r = h.call_with("kb.search", SUPPORT_KEY, r#"{"query": "q"}"#, &extra).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].headers.get("traceparent").unwrap(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen[0].headers.get("tracestate").unwrap(), "vendor=1");
    for s in &seen[1..] {
        assert!(s.headers.get("traceparent").is_none());
        assert!(s.headers.get("tracestate").is_none());
    }
}
