//! toolgate's upstream connection pool, seen from a raw TCP tool that counts its connections
//! and every request it reads: keep-alive reuse, a connection the tool closed while it sat
//! idle, and a connection left mid-exchange by a timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::Harness;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "pool-key";

/// An HTTP/1.1 tool written on a bare socket, so the test sees connections, not just requests.
/// `GET`/`POST /ok` answers `{"ok":true}` and keeps the connection open unless the tool was
/// started with `close_after_each`; `/hang` reads the request and never answers.
#[derive(Clone)]
struct RawTool {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl RawTool {
    async fn start(close_after_each: bool) -> Self {
        Self::start_with(close_after_each, None).await
    }

    /// As `start`; with `idle`, a kept-alive connection that brings no new request within it
    /// is closed by the tool, as servers' keep-alive timeouts do.
    async fn start_with(close_after_each: bool, idle: Option<Duration>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tool = Self {
            url: format!("http://{}", listener.local_addr().unwrap()),
            connections: Arc::default(),
            requests: Arc::default(),
        };
        let t = tool.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                t.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(t.clone().serve(stream, close_after_each, idle));
            }
        });
        tool
    }

    async fn serve(self, mut stream: tokio::net::TcpStream, close_after_each: bool, idle: Option<Duration>) {
        let mut buf = Vec::new();
        loop {
            // The head, then as many body bytes as it declares.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0; 4096];
                let read = match idle.filter(|_| buf.is_empty()) {
                    Some(idle) => match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                        Ok(read) => read,
                        Err(_) => return, // idle too long: the tool closes the connection
                    },
                    None => stream.read(&mut chunk).await,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < head_end + length {
                let mut chunk = [0; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let request_line = head.lines().next().unwrap_or_default().to_owned();
            buf.drain(..head_end + length);
            self.requests.lock().unwrap().push(request_line.clone());
            if request_line.contains("/hang") {
                tokio::time::sleep(Duration::from_secs(5)).await;
                return;
            }
            let body = r#"{"ok":true}"#;
            let response = if let Some(status) = request_line
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.strip_prefix("/status/"))
            {
                format!(
                    "HTTP/1.1 {status} Odd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else if request_line.contains("/both") {
                // Both framings: chunked (which wins) and a length that disagrees.
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            if stream.write_all(response.as_bytes()).await.is_err() || close_after_each {
                return;
            }
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Call `i` of a test: `raw.ok` with `{"n": i}`, answered 200 by the tool.
async fn call_ok(h: &Harness, i: usize) {
    let r = h.call("raw.ok", Some(KEY), &format!(r#"{{"n": {i}}}"#)).await;
    assert_eq!(r.status, 200, "call {i}: {:?}", r.body);
    assert_eq!(r.json()["ok"], true);
}

/// A gateway in front of `tool` whose data plane runs on `workers` threads.
async fn gateway_for(tool: &RawTool, workers: usize) -> Harness {
    let policy = format!(
        r#"
agents:
  pool-bot:
    credentials: {{ api_key_sha256: [ "{digest}" ] }}
    tools: [ raw.* ]
tools:
  raw.ok:
    upstream: {{ url: "{url}/ok", method: POST }}
  raw.hang:
    upstream: {{ url: "{url}/hang", method: POST, timeout_ms: 300 }}
  raw.both:
    upstream: {{ url: "{url}/both", method: POST }}
  raw.s101:
    upstream: {{ url: "{url}/status/101", method: POST }}
  raw.s600:
    upstream: {{ url: "{url}/status/600", method: POST }}
  raw.s999:
    upstream: {{ url: "{url}/status/999", method: POST }}
"#,
        digest = hex::encode(Sha256::digest(KEY)),
        url = tool.url,
    );
    Harness::start_full(&format!("workers: {workers}\n"), &[("pool.yaml", &policy)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_reuse_one_upstream_connection() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 1).await;
    for i in 0..5 {
        call_ok(&h, i).await;
    }
    assert_eq!(
        tool.requests(),
        vec!["POST /ok HTTP/1.1"; 5],
        "origin form, each call once"
    );
    assert_eq!(tool.connections(), 1, "keep-alive connections are pooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_data_plane_thread_reuses_its_own_connections() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 2).await;
    // Each call comes on a new client connection, accepted by either thread; each thread opens
    // at most one connection to the tool and reuses it.
    for i in 0..12 {
        call_ok(&h, i).await;
    }
    assert_eq!(tool.requests().len(), 12, "each call sent once");
    assert!(
        (1..=2).contains(&tool.connections()),
        "one pooled connection per thread, not one per call: {}",
        tool.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_tool_closed_while_idle_is_not_used_again() {
    let tool = RawTool::start(true).await;
    let h = gateway_for(&tool, 1).await;
    for i in 0..3 {
        call_ok(&h, i).await;
        // The tool hangs up after each response (as an idle timeout would); give toolgate's
        // connection task the moment it needs to see it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tool.requests().len(), 3, "each call sent once: {:?}", tool.requests());
    assert_eq!(tool.connections(), 3, "a closed connection was not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_exchange_leaves_its_connection_out_of_the_pool() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 1).await;
    let r = h.call("raw.hang", Some(KEY), "{}").await;
    r.assert_error(504, "upstream_timeout");
    // The hung connection still waits for its answer: the next call must not queue behind it.
    let r = h.call("raw.ok", Some(KEY), "{}").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(tool.requests(), ["POST /hang HTTP/1.1", "POST /ok HTTP/1.1"]);
    assert_eq!(tool.connections(), 2);
}

/// A tool answers with a status no answer may have (101 to a request that asked for no
/// upgrade, or past 599): the agent gets 502, not the odd status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusual_upstream_status_is_an_upstream_error() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 1).await;
    for tool in ["raw.s101", "raw.s600", "raw.s999"] {
        let r = h.call(tool, Some(KEY), "{}").await;
        r.assert_error(502, "upstream_error");
    }
    call_ok(&h, 0).await;
}

/// A connection that answered with both `Content-Length` and `Transfer-Encoding` is read by
/// the chunks and closed: the next call opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_answered_with_both_framings_is_never_reused() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 1).await;
    let r = h.call("raw.both", Some(KEY), "{}").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["ok"], true, "read by its chunks");
    call_ok(&h, 1).await;
    call_ok(&h, 2).await;
    assert_eq!(tool.connections(), 2, "the ambiguous connection was reused");
}

/// A tool that closes kept-alive connections after 1 s idle: calls spaced around that second
/// never meet a connection the tool is closing (toolgate lets a connection idle less than the
/// tool does) and never see a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_closes_idle_connections_at_one_second_never_causes_a_502() {
    let tool = RawTool::start_with(false, Some(Duration::from_secs(1))).await;
    let h = gateway_for(&tool, 1).await;
    call_ok(&h, 0).await;
    for (i, gap) in [980, 1000, 1010, 990, 850, 1000, 995].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(gap)).await;
        call_ok(&h, i + 1).await;
    }
    assert_eq!(tool.requests().len(), 8, "each call sent once: {:?}", tool.requests());
}

/// A connection idle longer than `limits.upstream_idle_timeout_ms` (900 ms by default, below
/// the usual keep-alive timeouts of servers) is not reused; one idle less is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_the_idle_timeout_is_not_reused() {
    let tool = RawTool::start(false).await;
    let h = gateway_for(&tool, 1).await;
    call_ok(&h, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    call_ok(&h, 1).await;
    assert_eq!(tool.connections(), 1, "a connection idle 300 ms is reused");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    call_ok(&h, 2).await;
    assert_eq!(tool.connections(), 2, "a connection idle past 900 ms was reused");
}
