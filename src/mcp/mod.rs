//! MCP over Streamable HTTP at `/mcp`: agents point their MCP client at toolgate and see exactly
//! the tools their allowlist permits; every `tools/call` becomes the same [`CallRequest`] as
//! `POST /v1/tools/{tool}` and runs the same pipeline, audit event included.
//!
//! Two revisions are spoken:
//! - **2026-07-28**, stateless: no handshake and no session id; each request carries its
//!   protocol version in the `MCP-Protocol-Version` header or `params._meta`, `server/discover`
//!   describes the server, and results carry `resultType`.
//! - **2025-11-25 / 2025-06-18**, for older clients: `initialize` opens a session
//!   (`Mcp-Session-Id`) bound to the agent that opened it; another agent's credential with that
//!   id is refused; `DELETE /mcp` ends it.
//!
//! A blocked call is a JSON-RPC error with code [`BLOCKED`] whose `data` is the contract's error
//! object (`code`, `message`, `request_id`, `rule`, and for approvals `approval_id`,
//! `status_url`, `retry`). A call that was allowed but whose tool failed is a `CallToolResult`
//! with `isError: true`: the agent sees the tool's failure, as MCP intends.
//! JSON-RPC batches are refused: they left the protocol in 2025-06-18 and have been used to slip
//! calls past other gateways.

pub mod sessions;
pub mod upstream;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::gateway::{CallRequest, Caller, Gateway};
use crate::policy::Code;
use crate::server::RequestId;
use sessions::{SessionError, Sessions};

/// The stateless revision.
pub const STATELESS: &str = "2026-07-28";
/// Handshake revisions, newest first.
pub const HANDSHAKE: [&str; 2] = ["2025-11-25", "2025-06-18"];

/// JSON-RPC error code for a call the gateway blocked (the server-defined range).
pub const BLOCKED: i64 = -32001;
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const UNSUPPORTED_VERSION: i64 = -32022;

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// toolgate's own `_meta` keys: the session for session-aware rules, and an approval id.
const META_SESSION: &str = "io.toolgate/session";
const META_APPROVAL: &str = "io.toolgate/approval";

/// The `/mcp` endpoint's state.
pub struct Mcp {
    gateway: Arc<Gateway>,
    sessions: Sessions,
}

impl Mcp {
    pub fn new(gateway: Arc<Gateway>) -> Arc<Mcp> {
        let sessions = Sessions::new(gateway.config.mcp.max_sessions, gateway.config.mcp.session_idle());
        Arc::new(Mcp { gateway, sessions })
    }
}

/// `/mcp`'s routes. The data plane also calls [`post`] directly for `POST /mcp` (as it does
/// for tool calls), with the same `Mcp`, so both see the same sessions.
pub fn routes(mcp: Arc<Mcp>) -> Router {
    Router::new()
        .route("/mcp", axum::routing::post(handle).delete(end_session).get(no_stream))
        .with_state(mcp)
}

/// `POST /mcp`: one JSON-RPC message. The request carries its [`RequestId`] extension.
pub async fn post(mcp: &Mcp, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let mut asked = Asked {
        source: parts.extensions.get::<crate::server::Source>().map(|s| s.0),
        ..Asked::default()
    };
    let reply = dispatch(mcp, &headers, body, &rid, &mut asked).await;
    // Refused at the protocol level (tool calls the policy blocks answer 200 with a JSON-RPC
    // error and have their own `tool_call` event): a `request_refused` event, so probing with
    // batches, foreign origins, stolen sessions or bad credentials leaves a trail too.
    if reply.status.is_client_error() || reply.status.is_server_error() {
        let error = reply.body.as_ref().and_then(Message::tree).map(|b| &b["error"]);
        let message = error.and_then(|e| e["message"].as_str()).unwrap_or("");
        // The code the caller was given (the contract's, in `data`), else the status's.
        let code = error
            .and_then(|e| Code::deserialize(&e["data"]["code"]).ok())
            .unwrap_or_else(|| refusal_code(reply.status));
        audit_refusal(mcp, &rid, &asked, reply.status, code, message).await;
    }
    reply.into_response(&headers)
}

/// What the request is speaking.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Revision {
    Stateless,
    /// A handshake revision, with its session id (none only for `initialize`).
    Session(&'static str, Option<String>),
}

/// One JSON-RPC exchange's outcome: the HTTP status and the JSON-RPC message (or nothing, 202).
struct Reply {
    status: StatusCode,
    body: Option<Message>,
    session_id: Option<String>,
}

/// A reply's JSON-RPC message: a tree, or already written out (a tool's answer, serialised
/// straight from its bytes rather than parsed into a tree and written back).
enum Message {
    Tree(Value),
    Json(Vec<u8>),
}

impl Message {
    fn tree(&self) -> Option<&Value> {
        match self {
            Message::Tree(v) => Some(v),
            Message::Json(_) => None,
        }
    }
}

/// A `tools/call` result for a tool's plain answer, written as it is sent (field order too).
#[derive(Serialize)]
struct ToolAnswer<'a> {
    jsonrpc: &'static str,
    id: &'a Value,
    result: CallToolResult<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallToolResult<'a> {
    content: [TextContent<'a>; 1],
    is_error: bool,
    /// The answer itself when it is JSON, as the tool wrote it (validated, not re-encoded).
    #[serde(skip_serializing_if = "Option::is_none")]
    structured_content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_type: Option<&'static str>,
}

#[derive(Serialize)]
struct TextContent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

impl Reply {
    fn result(id: &Value, result: Value) -> Reply {
        // Built as a map: `json!` would serialise `result` into a copy of itself (the tool's
        // whole answer, twice over for a structured one).
        let mut body = Map::with_capacity(3);
        body.insert("jsonrpc".to_owned(), Value::from("2.0"));
        body.insert("id".to_owned(), id.clone());
        body.insert("result".to_owned(), result);
        Reply {
            status: StatusCode::OK,
            body: Some(Message::Tree(Value::Object(body))),
            session_id: None,
        }
    }

    fn error(status: StatusCode, id: &Value, code: i64, message: impl Into<String>, data: Option<Value>) -> Reply {
        let mut error = json!({"code": code, "message": message.into()});
        if let Some(d) = data {
            error["data"] = d;
        }
        Reply {
            status,
            body: Some(Message::Tree(json!({"jsonrpc": "2.0", "id": id, "error": error}))),
            session_id: None,
        }
    }

    fn accepted() -> Reply {
        Reply {
            status: StatusCode::ACCEPTED,
            body: None,
            session_id: None,
        }
    }

    /// As JSON, or as one SSE event when the client accepts only `text/event-stream`.
    fn into_response(self, headers: &HeaderMap) -> Response {
        let json = |m: Message| match m {
            Message::Tree(v) => serde_json::to_vec(&v).expect("JSON serialises"),
            Message::Json(bytes) => bytes,
        };
        let mut res = match self.body {
            None => Response::new(Body::empty()),
            Some(body) if wants_sse(headers) => {
                // A tool's answer is embedded as the tool wrote it, so it may have line breaks
                // between its tokens (JSON allows them nowhere else): each line is its own
                // `data:` line, which the client joins back with `\n`.
                let mut event = b"event: message".to_vec();
                for line in json(body).split(|&b| b == b'\n' || b == b'\r') {
                    event.extend_from_slice(b"\ndata: ");
                    event.extend_from_slice(line);
                }
                event.extend_from_slice(b"\n\n");
                let mut r = Response::new(Body::from(event));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
            Some(body) => {
                // Straight into bytes: `to_string` goes through `fmt` a piece at a time.
                let mut r = Response::new(Body::from(json(body)));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
        };
        *res.status_mut() = self.status;
        if let Some(id) = self.session_id.and_then(|s| HeaderValue::from_str(&s).ok()) {
            res.headers_mut().insert("mcp-session-id", id);
        }
        res
    }
}

fn wants_sse(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    accept.contains("text/event-stream") && !accept.contains("application/json") && !accept.contains("*/*")
}

fn request_id(req: &Request) -> Arc<str> {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| "".into())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The contract's error object, as `error.data`.
fn contract_error(code: Code, message: &str, request_id: &str) -> Value {
    json!({"code": code.as_str(), "message": message, "request_id": request_id})
}

/// Origin, as the transport spec asks: a browser page must not reach the gateway by DNS
/// rebinding. Requests without `Origin` (agents, servers) pass; with one, it must be listed.
fn origin_allowed(mcp: &Mcp, headers: &HeaderMap) -> bool {
    match header_str(headers, "origin") {
        None => true,
        Some(o) => mcp.gateway.config.mcp.allowed_origins.iter().any(|a| a == o),
    }
}

async fn no_stream(State(mcp): State<Arc<Mcp>>, req: Request) -> Response {
    let rid = request_id(&req);
    let message = "toolgate sends no server-initiated messages: there is no stream to open. POST requests to /mcp.";
    let asked = Asked {
        method: Some("GET"),
        agent: None,
        source: req.extensions().get::<crate::server::Source>().map(|s| s.0),
    };
    audit_refusal(
        &mcp,
        &rid,
        &asked,
        StatusCode::METHOD_NOT_ALLOWED,
        Code::MethodNotAllowed,
        message,
    )
    .await;
    let mut r = crate::server::error_response(Code::MethodNotAllowed, message, &rid);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
    r
}

/// `DELETE /mcp`: the session's own agent ends it. A refusal is audited as on `POST`.
async fn end_session(State(mcp): State<Arc<Mcp>>, req: Request) -> Response {
    let rid = request_id(&req);
    let headers = req.headers().clone();
    let mut asked = Asked {
        method: Some("DELETE"),
        agent: None,
        source: req.extensions().get::<crate::server::Source>().map(|s| s.0),
    };
    let refused = match end(&mcp, &headers, &mut asked) {
        Ok(()) => return StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused,
    };
    let status = StatusCode::from_u16(refused.0.http_status()).expect("contract statuses are valid");
    audit_refusal(&mcp, &rid, &asked, status, refused.0, &refused.1).await;
    crate::server::error_response(refused.0, refused.1, &rid)
}

fn end(mcp: &Mcp, headers: &HeaderMap, asked: &mut Asked) -> Result<(), (Code, String)> {
    let refuse = |code: Code, message: &str| Err((code, message.to_owned()));
    if !origin_allowed(mcp, headers) {
        return refuse(Code::ToolNotAllowed, "This Origin may not use the MCP endpoint.");
    }
    let agent = mcp
        .gateway
        .policy()
        .auth
        .authenticate(header_str(headers, "authorization"))
        .cloned()
        .map_err(|r| (r.code, r.message))?;
    asked.agent = Some(agent.clone());
    let Some(id) = header_str(headers, "mcp-session-id") else {
        return refuse(Code::InvalidRequest, "DELETE /mcp needs the Mcp-Session-Id header.");
    };
    match mcp.sessions.end(id, &agent) {
        Ok(()) => Ok(()),
        Err(SessionError::Unknown) => refuse(Code::NotFound, "No such MCP session (it may have expired)."),
        Err(SessionError::OtherAgent) => refuse(Code::ToolNotAllowed, "This MCP session belongs to another agent."),
        Err(SessionError::Full) => unreachable!("ending a session never needs room"),
    }
}

async fn handle(State(mcp): State<Arc<Mcp>>, req: Request) -> Response {
    post(&mcp, req).await
}

async fn audit_refusal(mcp: &Mcp, rid: &str, asked: &Asked, status: StatusCode, code: Code, message: &str) {
    let event = crate::audit::RefusalEvent {
        ts: crate::audit::now(),
        event: "request_refused",
        request_id: rid,
        endpoint: "/mcp",
        method: asked.method,
        source: asked.source,
        agent: asked.agent.as_deref(),
        status: status.as_u16(),
        code: code.as_str(),
        message,
    };
    if asked.agent.is_some() || mcp.gateway.audit.admit_unknown_caller(asked.source, code.as_str()) {
        mcp.gateway.audit.emit_or_log("request_refused", &event).await;
    }
}

/// What a refused request got as far as saying.
#[derive(Default)]
struct Asked {
    /// The JSON-RPC method, if it is one toolgate serves (never the caller's text otherwise).
    method: Option<&'static str>,
    /// The agent, once its credentials were checked.
    agent: Option<Arc<str>>,
    /// Where the request came from (the connection's peer).
    source: Option<std::net::IpAddr>,
}

fn known_method(method: &str) -> &'static str {
    match method {
        "initialize" => "initialize",
        "server/discover" => "server/discover",
        "ping" => "ping",
        "tools/list" => "tools/list",
        "tools/call" => "tools/call",
        m if m.starts_with("notifications/") => "notifications/*",
        _ => "(other)",
    }
}

/// The contract code for a protocol-level refusal's HTTP status, for replies that carry none
/// (batches, unparseable bodies, messages that are not JSON-RPC: all 400).
fn refusal_code(status: StatusCode) -> Code {
    match status.as_u16() {
        401 => Code::Unauthenticated,
        403 => Code::ToolNotAllowed,
        404 => Code::NotFound,
        413 => Code::PayloadTooLarge,
        429 => Code::RateLimited,
        s if s >= 500 => Code::Unavailable,
        _ => Code::InvalidRequest,
    }
}

async fn dispatch(mcp: &Mcp, headers: &HeaderMap, body: Body, rid: &str, asked: &mut Asked) -> Reply {
    let null = Value::Null;
    if !origin_allowed(mcp, headers) {
        let data = contract_error(Code::ToolNotAllowed, "This Origin may not use the MCP endpoint.", rid);
        return Reply::error(StatusCode::FORBIDDEN, &null, BLOCKED, "origin not allowed", Some(data));
    }
    let bytes = match crate::server::data::read_body(&mcp.gateway, headers, body).await {
        Ok(b) => b,
        Err(reason) => {
            let status = StatusCode::from_u16(reason.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            let data = contract_error(reason.code, &reason.message, rid);
            return Reply::error(status, &null, INVALID_REQUEST, reason.message.clone(), Some(data));
        }
    };
    let limits = mcp.gateway.parse_limits();
    let message = match crate::policy::arguments::parse_value(&bytes, limits.max_json_depth) {
        Ok(v) => v,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                &null,
                PARSE_ERROR,
                format!("The body is not valid JSON: {e}"),
                None,
            );
        }
    };
    let Value::Object(message) = message else {
        let what = if message.is_array() {
            "JSON-RPC batches are not accepted (they were removed from MCP in 2025-06-18): send one request per POST."
        } else {
            "The body must be one JSON-RPC message (an object)."
        };
        tracing::warn!(request_id = rid, "mcp: refused a non-object body (batch or scalar)");
        return Reply::error(StatusCode::BAD_REQUEST, &null, INVALID_REQUEST, what, None);
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str).unwrap_or("");
    asked.method = (!method.is_empty()).then(|| known_method(method));
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || method.is_empty() {
        if id.is_some() && (message.contains_key("result") || message.contains_key("error")) {
            // A response to a server request: toolgate sends none, so there is nothing to match.
            return Reply::accepted();
        }
        return Reply::error(
            StatusCode::BAD_REQUEST,
            id.as_ref().unwrap_or(&null),
            INVALID_REQUEST,
            "Not a JSON-RPC 2.0 request: it needs \"jsonrpc\": \"2.0\" and a \"method\".",
            None,
        );
    }
    let empty = Map::new();
    let params = message.get("params").and_then(Value::as_object).unwrap_or(&empty);

    // Who is asking: every request authenticates, in both revisions.
    let agent = match mcp
        .gateway
        .policy_now()
        .auth
        .authenticate(header_str(headers, "authorization"))
        .cloned()
    {
        Ok(a) => {
            asked.agent = Some(a.clone());
            a
        }
        Err(reason) => {
            let data = contract_error(reason.code, &reason.message, rid);
            return Reply::error(
                StatusCode::UNAUTHORIZED,
                id.as_ref().unwrap_or(&null),
                BLOCKED,
                reason.message.clone(),
                Some(data),
            );
        }
    };

    let revision = match revision(mcp, headers, method, params, &agent) {
        Ok(r) => r,
        Err(reply) => return reply.with_id(id.as_ref().unwrap_or(&null)),
    };
    let Some(id) = id else {
        // Notifications (`notifications/initialized`, `notifications/cancelled`, …): nothing
        // to answer.
        return Reply::accepted();
    };

    match method {
        "initialize" => initialize(mcp, &id, params, &agent),
        "server/discover" => Reply::result(&id, discover()),
        "ping" if revision != Revision::Stateless => Reply::result(&id, json!({})),
        "tools/list" => tools_list(mcp, &id, &agent, &revision),
        "tools/call" => tools_call(mcp, headers, &agent, &id, params, &revision, (rid, asked.source)).await,
        _ => Reply::error(
            StatusCode::OK,
            &id,
            METHOD_NOT_FOUND,
            "This method is not supported by toolgate (it serves tools): use initialize, tools/list or tools/call.",
            None,
        ),
    }
}

impl Reply {
    fn with_id(mut self, id: &Value) -> Reply {
        if let Some(Message::Tree(body)) = &mut self.body {
            body["id"] = id.clone();
        }
        self
    }
}

/// Which revision a request speaks, and for handshake revisions, its (checked) session.
fn revision(
    mcp: &Mcp,
    headers: &HeaderMap,
    method: &str,
    params: &Map<String, Value>,
    agent: &str,
) -> Result<Revision, Reply> {
    let null = Value::Null;
    let meta_version = params
        .get("_meta")
        .and_then(|m| m.get(META_VERSION))
        .and_then(Value::as_str);
    let header_version = header_str(headers, "mcp-protocol-version");
    let session = header_str(headers, "mcp-session-id");
    if method == "initialize" {
        return Ok(Revision::Session(HANDSHAKE[0], None));
    }
    if let Some(id) = session {
        let version = match mcp.sessions.check(id, agent) {
            Ok(v) => v,
            Err(SessionError::Unknown) => {
                return Err(Reply::error(
                    StatusCode::NOT_FOUND,
                    &null,
                    INVALID_REQUEST,
                    "No such MCP session (it may have expired or been deleted): initialize again.",
                    None,
                ));
            }
            Err(_) => {
                tracing::warn!(agent, "mcp: a session id was presented with another agent's credential");
                return Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    &null,
                    BLOCKED,
                    "This MCP session belongs to another agent.",
                    None,
                ));
            }
        };
        if let Some(v) = header_version
            && v != version
        {
            return Err(Reply::error(
                StatusCode::BAD_REQUEST,
                &null,
                INVALID_REQUEST,
                format!("The MCP-Protocol-Version header does not match the session's {version}."),
                None,
            ));
        }
        return Ok(Revision::Session(version, Some(id.to_owned())));
    }
    let requested = meta_version.or(header_version);
    match requested {
        Some(STATELESS) => Ok(Revision::Stateless),
        Some(other) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            &null,
            UNSUPPORTED_VERSION,
            format!(
                "This protocol version is not supported without a session: use {STATELESS}, or initialize a session for {}.",
                HANDSHAKE.join(" or ")
            ),
            Some(json!({"supported": [STATELESS], "requested": other})),
        )),
        None if method.starts_with("notifications/") => Ok(Revision::Stateless),
        None => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            &null,
            INVALID_REQUEST,
            format!(
                "Bad Request: no protocol version and no session. Send `_meta` with \"{META_VERSION}\": \"{STATELESS}\", or initialize a session first."
            ),
            None,
        )),
    }
}

fn initialize(mcp: &Mcp, id: &Value, params: &Map<String, Value>, agent: &Arc<str>) -> Reply {
    let offered = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("");
    // Echo a revision we speak; otherwise counter-offer the newest handshake revision.
    let version = HANDSHAKE
        .iter()
        .find(|v| **v == offered)
        .copied()
        .unwrap_or(HANDSHAKE[0]);
    let session = match mcp.sessions.open(agent.clone(), version) {
        Ok(s) => s,
        Err(_) => {
            return Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                INVALID_REQUEST,
                "Too many open MCP sessions; try again later, or use the stateless revision 2026-07-28.",
                None,
            );
        }
    };
    tracing::info!(agent = &**agent, version, "mcp: session opened");
    let mut reply = Reply::result(
        id,
        json!({
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
        }),
    );
    reply.session_id = Some(session);
    reply
}

const INSTRUCTIONS: &str = "toolgate checks every tool call (allowlist, argument schema, content filters, budgets, rules) and audits it. A blocked call is a JSON-RPC error whose data says why and what to do.";

fn server_info() -> Value {
    json!({"name": "toolgate", "version": env!("CARGO_PKG_VERSION")})
}

fn discover() -> Value {
    json!({
        "supportedVersions": [STATELESS],
        "capabilities": {"tools": {"listChanged": false}},
        "instructions": INSTRUCTIONS,
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {"io.modelcontextprotocol/serverInfo": server_info()},
    })
}

/// The tools this agent may call: no other tool is visible, or even named.
fn tools_list(mcp: &Mcp, id: &Value, agent: &str, revision: &Revision) -> Reply {
    let policy = mcp.gateway.policy();
    let Some(a) = policy.agents.get(agent) else {
        return Reply::result(id, json!({"tools": []}));
    };
    let tools: Vec<Value> = policy
        .tools
        .values()
        .filter(|t| a.allowlist.allows(&t.name) && !t.changed)
        .map(|t| {
            let mut schema = t.schema_source.clone().unwrap_or_else(|| json!({"type": "object"}));
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("type").or_insert_with(|| json!("object"));
            }
            let mut tool = json!({"name": t.name, "inputSchema": schema});
            if !t.description.is_empty() {
                tool["description"] = json!(t.description);
            }
            tool
        })
        .collect();
    let mut result = json!({"tools": tools});
    if *revision == Revision::Stateless {
        result["resultType"] = json!("complete");
        result["ttlMs"] = json!(0);
        result["cacheScope"] = json!("private");
    }
    Reply::result(id, result)
}

async fn tools_call(
    mcp: &Mcp,
    headers: &HeaderMap,
    agent: &str,
    id: &Value,
    params: &Map<String, Value>,
    revision: &Revision,
    (rid, source): (&str, Option<std::net::IpAddr>),
) -> Reply {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Reply::error(
            StatusCode::OK,
            id,
            INVALID_PARAMS,
            "tools/call needs `params.name`.",
            None,
        );
    };
    let meta = params.get("_meta").and_then(Value::as_object);
    let meta_str = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    // The session for session-aware rules: the explicit header, else the MCP session, else
    // toolgate's `_meta` key (stateless clients).
    let session = header_str(headers, "x-toolgate-session")
        .map(str::to_owned)
        .or_else(|| match revision {
            Revision::Session(_, Some(s)) => Some(s.clone()),
            _ => None,
        })
        .or_else(|| meta_str(META_SESSION).map(str::to_owned));
    let approval = header_str(headers, "x-toolgate-approval").or_else(|| meta_str(META_APPROVAL));
    // The pipeline takes the arguments as a body and parses them strictly; written in the
    // canonical form's writer (no byte-by-byte escaping of plain strings, no copy of the value).
    let body = match params.get("arguments") {
        None | Some(Value::Null) => Bytes::from_static(b"{}"),
        Some(Value::Object(args)) => Bytes::from(crate::policy::arguments::canonical(args)),
        Some(other) => Bytes::from(serde_json::to_vec(other).expect("JSON serialises")),
    };
    let resp = mcp
        .gateway
        .call(CallRequest {
            request_id: rid,
            request_id_header: None,
            source,
            caller: Caller::Agent(agent),
            tool: name,
            body: Ok(body),
            session: session.as_deref(),
            approval,
            traceparent: headers.get("traceparent"),
            tracestate: headers.get("tracestate"),
        })
        .await;

    if resp.decision != "allow" {
        // Blocked (or held): the contract's error object, as JSON-RPC error data.
        let parsed: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        let mut data = parsed
            .get("error")
            .cloned()
            .unwrap_or_else(|| json!({"request_id": rid}));
        for key in ["approval_id", "status_url"] {
            if let Some(v) = parsed.get(key) {
                data[key] = v.clone();
            }
        }
        if data.get("approval_id").is_some() {
            data["retry"] = json!(format!(
                "Once approved, call the tool again with the same arguments and `_meta` {{\"{META_APPROVAL}\": \"{}\"}} (or the header X-Toolgate-Approval).",
                data["approval_id"].as_str().unwrap_or_default()
            ));
        }
        if let Some(secs) = resp.retry_after {
            data["retry_after_seconds"] = json!(secs);
        }
        let message = data["message"].as_str().unwrap_or("The call was blocked.").to_owned();
        return Reply::error(StatusCode::OK, id, BLOCKED, message, Some(data));
    }

    // Allowed: the tool ran (or failed trying). Its answer becomes a CallToolResult; an
    // upstream MCP server's own CallToolResult passes through (after output filters).
    let ok = (200..300).contains(&resp.status);
    let from_mcp_server = matches!(
        mcp.gateway.policy_now().tools.get(name).map(|t| &t.target),
        Some(crate::policy::tool::Target::Mcp { .. })
    );
    if ok
        && from_mcp_server
        && let Ok(Value::Object(mut result)) = serde_json::from_slice::<Value>(&resp.body)
    {
        if *revision == Revision::Stateless {
            result.insert("resultType".into(), json!("complete"));
        } else {
            result.remove("resultType");
            if result.get("structuredContent").is_some_and(|v| !v.is_object()) {
                result.remove("structuredContent");
            }
        }
        return Reply::result(id, Value::Object(result));
    }
    let is_json = resp
        .content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    // Handshake revisions require an object; 2026-07-28 takes any JSON value.
    let structured = (ok && is_json)
        .then(|| serde_json::from_slice::<&RawValue>(&resp.body).ok())
        .flatten()
        .filter(|v| v.get().starts_with('{') || *revision == Revision::Stateless);
    let answer = ToolAnswer {
        jsonrpc: "2.0",
        id,
        result: CallToolResult {
            content: [TextContent {
                kind: "text",
                text: &String::from_utf8_lossy(&resp.body),
            }],
            is_error: !ok,
            structured_content: structured,
            result_type: (*revision == Revision::Stateless).then_some("complete"),
        },
    };
    Reply {
        status: StatusCode::OK,
        body: Some(Message::Json(serde_json::to_vec(&answer).expect("JSON serialises"))),
        session_id: None,
    }
}
