//! MCP over Streamable HTTP at `/mcp`, the second transport of tool calls: agents point their MCP
//! client at toolgate and see exactly the tools their allowlist permits; every `tools/call`
//! becomes the same `CallRequest` as `POST /v1/tools/{tool}` and runs the same pipeline, audit
//! event included (`tools`).
//!
//! Two revisions are spoken:
//! - **2026-07-28**, stateless: no handshake and no session id; each request carries its
//!   protocol version in the `MCP-Protocol-Version` header or `params._meta`, `server/discover`
//!   describes the server, and results carry `resultType`.
//! - **2025-11-25 / 2025-06-18**, for older clients: `initialize` opens a session
//!   (`Mcp-Session-Id`) bound to the agent that opened it; another agent's credential with that
//!   id is refused; `DELETE /mcp` ends it.
//!
//! JSON-RPC batches are refused: they left the protocol in 2025-06-18 and have been used to slip
//! calls past other gateways. A request refused at the protocol level leaves a
//! `request_refused` event.

mod reply;
pub mod sessions;
mod tools;

pub use reply::BLOCKED;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::request::{Client, HoldsGateway, Refusal, RequestId, Source, authenticate, expects_continue, read_body};
use crate::gateway::Gateway;
use crate::policy::Code;
use crate::policy::identity::ClientCertificate;
use reply::{INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, Reply, UNSUPPORTED_VERSION};
use sessions::{SessionError, Sessions};

/// The stateless revision.
pub const STATELESS: &str = "2026-07-28";
/// Handshake revisions, newest first.
pub const HANDSHAKE: [&str; 2] = ["2025-11-25", "2025-06-18"];

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// toolgate's own `_meta` keys: the session for session-aware rules, and an approval id.
const META_SESSION: &str = "io.toolgate/session";
const META_APPROVAL: &str = "io.toolgate/approval";

/// The `/mcp` endpoint's state.
/// What a session request is told when Redis, which holds the sessions, does not answer.
const SESSIONS_UNAVAILABLE: &str = "MCP sessions are unavailable (the shared state did not answer); try again shortly, or use the stateless revision 2026-07-28.";

pub struct Mcp {
    gateway: Arc<Gateway>,
    sessions: Sessions,
}

impl Mcp {
    pub fn new(gateway: Arc<Gateway>) -> Arc<Mcp> {
        let sessions = Sessions::new(
            gateway.config.mcp.max_sessions,
            gateway.config.mcp.session_idle(),
            gateway.state.shared(),
        );
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

/// What the request is speaking.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Revision {
    Stateless,
    /// A handshake revision, with its session id (none only for `initialize`).
    Session(&'static str, Option<String>),
}

async fn handle(State(mcp): State<Arc<Mcp>>, req: Request) -> Response {
    post(&mcp, mcp.gateway.clone(), req).await
}

/// `POST /mcp`: one JSON-RPC message. The request carries its [`RequestId`] extension; `owner`
/// is what a `tools/call` holds the gateway by while it runs (see `request::call_detached`).
pub async fn post(mcp: &Mcp, owner: impl HoldsGateway, req: Request) -> Response {
    let mut refusal = Refusal {
        method: None,
        endpoint: "/mcp",
        ..Refusal::of(&req, RequestId::of(&req), Source::of(&req))
    };
    let (parts, body) = req.into_parts();
    let client = parts.extensions.get::<Client>().map(|c| &*c.0);
    let headers = &parts.headers;
    let reply = dispatch(mcp, owner, headers, client, body, &mut refusal).await;
    // Refused at the protocol level (tool calls the policy blocks answer 200 with a JSON-RPC
    // error and have their own `tool_call` event): a `request_refused` event, so probing with
    // batches, foreign origins, stolen sessions or bad credentials leaves a trail too.
    if reply.status.is_client_error() || reply.status.is_server_error() {
        // The code the caller was given (the contract's, in `data`), else the status's.
        let code = reply.code.unwrap_or_else(|| refusal_code(reply.status));
        let status = reply.status.as_u16();
        refusal.audit(&mcp.gateway, status, code, reply.error_message()).await;
    }
    reply.into_response(headers)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
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
    let message = "toolgate sends no server-initiated messages: there is no stream to open. POST requests to /mcp.";
    let refusal = Refusal {
        endpoint: "/mcp",
        ..Refusal::of(&req, RequestId::of(&req), Source::of(&req))
    };
    let mut r = refusal.refuse(&mcp.gateway, Code::MethodNotAllowed, message).await;
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
    r
}

/// `DELETE /mcp`: the session's own agent ends it. A refusal is audited as on `POST`.
async fn end_session(State(mcp): State<Arc<Mcp>>, req: Request) -> Response {
    let mut refusal = Refusal {
        endpoint: "/mcp",
        ..Refusal::of(&req, RequestId::of(&req), Source::of(&req))
    };
    match end(&mcp, req.headers(), Client::of(&req), &mut refusal).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err((code, message)) => refusal.refuse(&mcp.gateway, code, &message).await,
    }
}

async fn end(
    mcp: &Mcp,
    headers: &HeaderMap,
    client: Option<&ClientCertificate>,
    refusal: &mut Refusal,
) -> Result<(), (Code, String)> {
    let refuse = |code: Code, message: &str| Err((code, message.to_owned()));
    if !origin_allowed(mcp, headers) {
        return refuse(Code::ToolNotAllowed, "This Origin may not use the MCP endpoint.");
    }
    let agent = authenticate(&mcp.gateway, headers, client)
        .await
        .map_err(|r| (r.code, r.message))?;
    refusal.agent = Some(agent.clone());
    let Some(id) = header_str(headers, "mcp-session-id") else {
        return refuse(Code::InvalidRequest, "DELETE /mcp needs the Mcp-Session-Id header.");
    };
    match mcp.sessions.end(id, &agent).await {
        Ok(()) => Ok(()),
        Err(SessionError::Unknown) => refuse(Code::NotFound, "No such MCP session (it may have expired)."),
        Err(SessionError::OtherAgent) => refuse(Code::ToolNotAllowed, "This MCP session belongs to another agent."),
        Err(SessionError::Unavailable) => refuse(Code::Unavailable, SESSIONS_UNAVAILABLE),
        Err(SessionError::Full) => unreachable!("ending a session never needs room"),
    }
}

/// The method as events and dispatch name it: one toolgate serves, never the caller's text.
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

/// One message, from its bytes to its reply: origin, body, JSON-RPC shape, credentials,
/// revision and session, then the method.
async fn dispatch(
    mcp: &Mcp,
    owner: impl HoldsGateway,
    headers: &HeaderMap,
    client: Option<&ClientCertificate>,
    body: Body,
    refusal: &mut Refusal,
) -> Reply {
    let null = Value::Null;
    let rid = refusal.id.clone();
    if !origin_allowed(mcp, headers) {
        let why = (Code::ToolNotAllowed, "This Origin may not use the MCP endpoint.");
        return Reply::refused(
            StatusCode::FORBIDDEN,
            &null,
            reply::BLOCKED,
            "origin not allowed",
            why,
            &rid,
        );
    }
    // A client waiting for `100 Continue` is refused on its credentials before it is asked for
    // its body (see `request::expects_continue`).
    if expects_continue(headers)
        && let Err(reason) = authenticate(&mcp.gateway, headers, client).await
    {
        let why = (reason.code, reason.message.as_str());
        return Reply::refused(
            StatusCode::UNAUTHORIZED,
            &null,
            reply::BLOCKED,
            reason.message.clone(),
            why,
            &rid,
        );
    }
    let mut message = match read_message(mcp, headers, body, &rid).await {
        Ok(message) => message,
        Err(reply) => return reply,
    };
    let id = message.remove("id");
    let method = message.get("method").and_then(Value::as_str).filter(|m| !m.is_empty());
    let method = method.map(known_method);
    refusal.method = method;
    let (Some(method), true) = (method, message.get("jsonrpc").and_then(Value::as_str) == Some("2.0")) else {
        if id.is_some() && (message.contains_key("result") || message.contains_key("error")) {
            // A response to a server request: toolgate sends none, so there is nothing to match.
            return Reply::accepted();
        }
        let what = "Not a JSON-RPC 2.0 request: it needs \"jsonrpc\": \"2.0\" and a \"method\".";
        return Reply::error(
            StatusCode::BAD_REQUEST,
            id.as_ref().unwrap_or(&null),
            INVALID_REQUEST,
            what,
            None,
        );
    };
    let params = match message.remove("params") {
        Some(Value::Object(params)) => params,
        _ => Map::new(),
    };
    // Who is asking: every request authenticates, in both revisions.
    let agent = match authenticate(&mcp.gateway, headers, client).await {
        Ok(a) => a,
        Err(reason) => {
            let (id, why) = (id.as_ref().unwrap_or(&null), (reason.code, reason.message.as_str()));
            let status = StatusCode::UNAUTHORIZED;
            return Reply::refused(status, id, reply::BLOCKED, reason.message.clone(), why, &rid);
        }
    };
    refusal.agent = Some(agent.clone());
    let revision = match revision(mcp, headers, method, &params, &agent).await {
        Ok(r) => r,
        Err(reply) => return reply.with_id(id.as_ref().unwrap_or(&null)),
    };
    let Some(id) = id else {
        // Notifications (`notifications/initialized`, `notifications/cancelled`, …): nothing
        // to answer.
        return Reply::accepted();
    };
    match method {
        "initialize" => initialize(mcp, &id, &params, &agent).await,
        "server/discover" => Reply::result(&id, discover()),
        "ping" if revision != Revision::Stateless => Reply::result(&id, json!({})),
        "tools/list" => tools::list(mcp, &id, &agent, &revision),
        "tools/call" => {
            let call = tools::Call {
                headers,
                agent: &agent,
                id: &id,
                revision: &revision,
                request_id: &rid,
                source: refusal.source,
            };
            tools::call(owner, call, params).await
        }
        _ => Reply::error(
            StatusCode::OK,
            &id,
            METHOD_NOT_FOUND,
            "This method is not supported by toolgate (it serves tools): use initialize, tools/list or tools/call.",
            None,
        ),
    }
}

/// The body, within its limits, as one JSON-RPC message (an object), parsed with the strictness
/// the policy parses arguments with: its `tools/call` arguments go to the policy as they are.
async fn read_message(mcp: &Mcp, headers: &HeaderMap, body: Body, rid: &str) -> Result<Map<String, Value>, Reply> {
    let null = Value::Null;
    let bytes = read_body(&mcp.gateway, headers, body).await.map_err(|reason| {
        let status = StatusCode::from_u16(reason.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        let why = (reason.code, reason.message.as_str());
        Reply::refused(status, &null, INVALID_REQUEST, reason.message.clone(), why, rid)
    })?;
    let limits = mcp.gateway.parse_limits();
    let message = crate::policy::arguments::parse_value(&bytes, limits.max_json_depth).map_err(|e| {
        let what = format!("The body is not valid JSON: {e}");
        Reply::error(StatusCode::BAD_REQUEST, &null, PARSE_ERROR, what, None)
    })?;
    match message {
        Value::Object(message) => Ok(message),
        other => {
            let what = if other.is_array() {
                "JSON-RPC batches are not accepted (they were removed from MCP in 2025-06-18): send one request per POST."
            } else {
                "The body must be one JSON-RPC message (an object)."
            };
            tracing::warn!(request_id = rid, "mcp: refused a non-object body (batch or scalar)");
            Err(Reply::error(
                StatusCode::BAD_REQUEST,
                &null,
                INVALID_REQUEST,
                what,
                None,
            ))
        }
    }
}

/// Which revision a request speaks, and for handshake revisions, its (checked) session.
async fn revision(
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
    if method == "initialize" {
        return Ok(Revision::Session(HANDSHAKE[0], None));
    }
    if let Some(id) = header_str(headers, "mcp-session-id") {
        let version = match mcp.sessions.check(id, agent, &HANDSHAKE).await {
            Ok(v) => v,
            Err(SessionError::Unknown) => {
                let what = "No such MCP session (it may have expired or been deleted): initialize again.";
                return Err(Reply::error(StatusCode::NOT_FOUND, &null, INVALID_REQUEST, what, None));
            }
            Err(SessionError::Unavailable) => {
                return Err(Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &null,
                    INVALID_REQUEST,
                    SESSIONS_UNAVAILABLE,
                    None,
                ));
            }
            Err(_) => {
                tracing::warn!(agent, "mcp: a session id was presented with another agent's credential");
                let what = "This MCP session belongs to another agent.";
                return Err(Reply::error(StatusCode::FORBIDDEN, &null, reply::BLOCKED, what, None));
            }
        };
        if let Some(v) = header_version
            && v != version
        {
            let what = format!("The MCP-Protocol-Version header does not match the session's {version}.");
            return Err(Reply::error(
                StatusCode::BAD_REQUEST,
                &null,
                INVALID_REQUEST,
                what,
                None,
            ));
        }
        return Ok(Revision::Session(version, Some(id.to_owned())));
    }
    match meta_version.or(header_version) {
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
        None if method == "notifications/*" => Ok(Revision::Stateless),
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

async fn initialize(mcp: &Mcp, id: &Value, params: &Map<String, Value>, agent: &Arc<str>) -> Reply {
    let offered = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("");
    // Echo a revision we speak; otherwise counter-offer the newest handshake revision.
    let version = HANDSHAKE
        .iter()
        .find(|v| **v == offered)
        .copied()
        .unwrap_or(HANDSHAKE[0]);
    let session = match mcp.sessions.open(agent.clone(), version).await {
        Ok(session) => session,
        Err(SessionError::Unavailable) => {
            return Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                INVALID_REQUEST,
                SESSIONS_UNAVAILABLE,
                None,
            );
        }
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
