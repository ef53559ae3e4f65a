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
                tokio::spawn(t.clone().serve(stream, close_after_each));
            }
        });
        tool
    }

    async fn serve(self, mut stream: tokio::net::TcpStream, close_after_each: bool) {
        let mut buf = Vec::new();
        loop {
            // The head, then as many body bytes as it declares.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0; 4096];
                match stream.read(&mut chunk).await {
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
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
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
