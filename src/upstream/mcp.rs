//! toolgate as an MCP *client* of upstream MCP servers (`mcp_servers:`): one handshake session
//! per server (2025-11-25, falling back to whatever 2025 revision the server counter-offers),
//! `tools/list` to discover their tools, `tools/call` to forward allowed calls. Responses may
//! be JSON or an SSE stream; both are read within the response size limit.
//!
//! A `404` on a session means the server forgot it (restart, expiry): the session is opened
//! again and the request sent once more — safe even for `tools/call`, because a server that
//! does not know the session did not run the call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::policy::tool::McpServer;
use crate::upstream::{Signing, UpstreamError};

const OFFERED: &str = "2025-11-25";
/// Pages of `tools/list` followed at most (a server listing more is cut off there).
const MAX_PAGES: usize = 20;

/// What a JSON-RPC exchange gave back.
#[derive(Debug)]
pub enum RpcOutcome {
    Result(Value),
    /// The server answered with a JSON-RPC error.
    Error {
        code: i64,
        message: String,
    },
}

struct Session {
    id: Option<String>,
    version: String,
}

pub struct McpClient {
    /// `http://` and `https://` servers, TLS verified as for tools (`upstream::connector`).
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    sessions: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
    max_response_bytes: usize,
}

impl McpClient {
    /// `idle_timeout`: how long a kept-alive connection to a server may sit idle and be reused
    /// (below the servers' own keep-alive timeout, so none closes one as a request goes out).
    pub fn new(max_response_bytes: usize, idle_timeout: Duration) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle_timeout)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(crate::upstream::connector()),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            max_response_bytes,
        }
    }

    /// Every tool the server lists (following `nextCursor`).
    pub async fn list_tools(
        &self,
        server: &McpServer,
        timeout: Duration,
        signing: Option<&Signing<'_>>,
    ) -> Result<Vec<Value>, UpstreamError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let result = match self.request(server, "tools/list", params, timeout, signing).await? {
                RpcOutcome::Result(r) => r,
                RpcOutcome::Error { code, message } => {
                    return Err(UpstreamError::Protocol(format!("tools/list failed: {code} {message}")));
                }
            };
            if let Some(list) = result.get("tools").and_then(Value::as_array) {
                tools.extend(list.iter().cloned());
            }
            cursor = result.get("nextCursor").and_then(Value::as_str).map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(tools)
    }

    /// `tools/call`; the server's `CallToolResult`, or its JSON-RPC error.
    pub async fn call_tool(
        &self,
        server: &McpServer,
        tool: &str,
        arguments: &Value,
        timeout: Duration,
        signing: Option<&Signing<'_>>,
    ) -> Result<RpcOutcome, UpstreamError> {
        self.request(
            server,
            "tools/call",
            json!({"name": tool, "arguments": arguments}),
            timeout,
            signing,
        )
        .await
    }

    async fn request(
        &self,
        server: &McpServer,
        method: &str,
        params: Value,
        timeout: Duration,
        signing: Option<&Signing<'_>>,
    ) -> Result<RpcOutcome, UpstreamError> {
        tokio::time::timeout(timeout, async {
            for attempt in 0..2 {
                let (session, version) = self.session(server, signing).await?;
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
                let (status, headers, body) = self
                    .post(&server.url, &msg, session.as_deref(), Some(&version), signing)
                    .await?;
                if status == 404 && session.is_some() && attempt == 0 {
                    self.sessions.lock().expect("sessions lock").remove(&server.name);
                    continue;
                }
                if !(200..300).contains(&status) && !is_json_rpc(&headers, &body) {
                    return Err(UpstreamError::Protocol(format!(
                        "the MCP server answered HTTP {status}"
                    )));
                }
                return read_reply(&headers, &body, id);
            }
            Err(UpstreamError::Protocol(
                "the MCP server kept forgetting its session".to_owned(),
            ))
        })
        .await
        .map_err(|_| UpstreamError::Timeout(timeout))?
    }

    /// The session for `server`, opened if needed: `(session id, negotiated revision)`.
    async fn session(
        &self,
        server: &McpServer,
        signing: Option<&Signing<'_>>,
    ) -> Result<(Option<String>, String), UpstreamError> {
        if let Some(s) = self.sessions.lock().expect("sessions lock").get(&server.name) {
            return Ok((s.id.clone(), s.version.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let init = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": OFFERED, "capabilities": {},
            "clientInfo": {"name": "toolgate", "version": env!("CARGO_PKG_VERSION")}}});
        let (status, headers, body) = self.post(&server.url, &init, None, None, signing).await?;
        if !(200..300).contains(&status) {
            return Err(UpstreamError::Protocol(format!("initialize answered HTTP {status}")));
        }
        let result = match read_reply(&headers, &body, id)? {
            RpcOutcome::Result(r) => r,
            RpcOutcome::Error { code, message } => {
                return Err(UpstreamError::Protocol(format!("initialize failed: {code} {message}")));
            }
        };
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(OFFERED)
            .to_owned();
        let session = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(&server.url, &note, session.as_deref(), Some(&version), signing)
            .await?;
        self.sessions.lock().expect("sessions lock").insert(
            server.name.clone(),
            Session {
                id: session.clone(),
                version: version.clone(),
            },
        );
        Ok((session, version))
    }

    async fn post(
        &self,
        url: &str,
        msg: &Value,
        session: Option<&str>,
        version: Option<&str>,
        signing: Option<&Signing<'_>>,
    ) -> Result<(u16, http::HeaderMap, Bytes), UpstreamError> {
        let mut req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .header(
                http::header::USER_AGENT,
                concat!("toolgate/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
        }
        if let Some(v) = version {
            req = req.header("mcp-protocol-version", v);
        }
        let body = Bytes::from(msg.to_string());
        let mut req = req
            .body(Full::new(body.clone()))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        if let Some(s) = signing {
            crate::upstream::aws::sign_request(&mut req, &body, s.credentials, s.region, s.service)
                .map_err(|e| UpstreamError::Protocol(format!("cannot sign the request: {e}")))?;
        }
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = crate::body::read_all(res.into_body(), self.max_response_bytes)
            .await
            .map_err(|e| match e {
                crate::body::BodyError::TooLarge(limit) => UpstreamError::TooLarge(limit),
                crate::body::BodyError::Read(e) => UpstreamError::Protocol(e.to_string()),
            })?;
        Ok((status, headers, body))
    }
}

fn is_json_rpc(headers: &http::HeaderMap, body: &[u8]) -> bool {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ct.contains("json") && serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("jsonrpc").is_some())
}

/// The JSON-RPC response with `id`, from a JSON body or an SSE stream.
fn read_reply(headers: &http::HeaderMap, body: &[u8], id: u64) -> Result<RpcOutcome, UpstreamError> {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let text = std::str::from_utf8(body).map_err(|_| UpstreamError::Protocol("not UTF-8".to_owned()))?;
    let candidates: Vec<Value> = if ct.starts_with("text/event-stream") {
        // Each event's data lines joined; server notifications in between are skipped.
        let mut out = Vec::new();
        for event in text.split("\n\n") {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(|d| d.strip_prefix(' ').unwrap_or(d)))
                .collect();
            if let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) {
                out.push(v);
            }
        }
        out
    } else {
        vec![serde_json::from_str(text).map_err(|e| UpstreamError::Protocol(format!("not JSON: {e}")))?]
    };
    for v in candidates {
        if v.get("id").and_then(Value::as_u64) != Some(id) {
            continue;
        }
        if let Some(r) = v.get("result") {
            return Ok(RpcOutcome::Result(r.clone()));
        }
        if let Some(e) = v.get("error") {
            return Ok(RpcOutcome::Error {
                code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
    }
    Err(UpstreamError::Protocol(
        "no response to the request in the MCP server's answer".to_owned(),
    ))
}
