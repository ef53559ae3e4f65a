//! Data-plane routes: `POST /v1/tools/{tool}` (reads the body within its limits and hands the
//! call to the gateway) and `GET /v1/approvals/{id}` (an agent polls its own approval);
//! everything else answers a JSON 404 or 405.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;

use super::{RequestId, Source, error_response};
use crate::audit::RefusalEvent;
use crate::gateway::{CallRequest, Caller, Gateway};
use crate::policy::{Code, Reason, Stage};

const X_TOOLGATE_SESSION: HeaderName = HeaderName::from_static("x-toolgate-session");
const X_TOOLGATE_APPROVAL: HeaderName = HeaderName::from_static("x-toolgate-approval");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_TOOLGATE_DECISION: HeaderName = HeaderName::from_static("x-toolgate-decision");

pub fn routes(gateway: Arc<Gateway>, mcp: Arc<crate::mcp::Mcp>) -> Router {
    Router::new()
        // Taken before the router by `DataPlane` (see `is_tool_call`); routed here too, so a
        // wrong method on it is a 405, not a 404.
        .route(
            "/v1/tools/{tool}",
            post(|State(gw): State<Arc<Gateway>>, req: Request| async move {
                let id = req
                    .extensions()
                    .get::<RequestId>()
                    .map(|r| r.0.clone())
                    .unwrap_or_default();
                let source = req.extensions().get::<Source>().map(|s| s.0);
                call_tool(&gw, id, None, source, req).await
            }),
        )
        .route("/v1/approvals/{id}", get(approval_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway.clone())
        .merge(crate::mcp::routes(mcp))
}

async fn not_found(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let message = "No such endpoint. Tool calls are `POST /v1/tools/{tool}`; MCP clients use `/mcp`.";
    let refused = Refused {
        endpoint: "(unknown)",
        ..Refused::of(&req)
    };
    refuse(&gw, refused, Code::NotFound, message).await
}

async fn method_not_allowed(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let message = "Tool calls use POST; approval status uses GET.";
    refuse(&gw, Refused::of(&req), Code::MethodNotAllowed, message).await
}

/// A call over the concurrency limit: 503 at once with `Retry-After: 1`, never queued, and
/// audited like any other refusal (a gateway's trail should show that it turned calls away,
/// and when; Envoy logs its overload replies the same way). The event is one short line,
/// group-committed with the others: a small cost next to the call it turns away.
pub(super) async fn shed<B>(
    gw: &Gateway,
    id: Arc<str>,
    source: Option<std::net::IpAddr>,
    req: &axum::http::Request<B>,
) -> Response {
    let message = "The gateway is at its concurrency limit. Retry shortly.";
    let refused = Refused {
        source,
        ..Refused::with_id(req, id)
    };
    let mut res = refuse(gw, refused, Code::Unavailable, message).await;
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// What a refused request's event may say about it: the route it hit, never its path.
struct Refused {
    id: Arc<str>,
    endpoint: &'static str,
    method: &'static str,
    source: Option<std::net::IpAddr>,
}

impl Refused {
    fn of(req: &Request) -> Self {
        let id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        Self {
            source: req.extensions().get::<Source>().map(|s| s.0),
            ..Self::with_id(req, id)
        }
    }

    fn with_id<B>(req: &axum::http::Request<B>, id: Arc<str>) -> Self {
        let path = req.uri().path();
        Self {
            id,
            endpoint: match () {
                _ if path.starts_with("/v1/tools/") => "/v1/tools/{tool}",
                _ if path.starts_with("/v1/approvals/") => "/v1/approvals/{id}",
                _ if path == "/mcp" => "/mcp",
                _ => "(unknown)",
            },
            method: match req.method().as_str() {
                "GET" => "GET",
                "HEAD" => "HEAD",
                "POST" => "POST",
                "PUT" => "PUT",
                "PATCH" => "PATCH",
                "DELETE" => "DELETE",
                "OPTIONS" => "OPTIONS",
                _ => "(other)",
            },
            source: None,
        }
    }
}

/// Unknown endpoints and wrong methods are refused and audited (`request_refused`), so probing
/// the data plane leaves a trail.
async fn refuse(gw: &Gateway, r: Refused, code: Code, message: &str) -> Response {
    let event = RefusalEvent {
        ts: crate::audit::now(),
        event: "request_refused",
        request_id: &r.id,
        endpoint: r.endpoint,
        method: Some(r.method),
        source: r.source,
        agent: None,
        status: code.http_status(),
        code: code.as_str(),
        message,
    };
    // Shed calls are the gateway's doing; any other refusal here names no agent.
    if code == Code::Unavailable || gw.audit.admit_unknown_caller(r.source, code.as_str()) {
        gw.audit.emit_or_log("request_refused", &event).await;
    }
    error_response(code, message, &r.id)
}

/// Whether `req` is a tool call, `POST /v1/tools/{tool}` with `{tool}` one non-empty segment:
/// exactly what the router's route matches.
pub(super) fn is_tool_call<B>(req: &axum::http::Request<B>) -> bool {
    req.method() == axum::http::Method::POST
        && req
            .uri()
            .path()
            .strip_prefix("/v1/tools/")
            .is_some_and(|tool| !tool.is_empty() && !tool.contains('/'))
}

/// A tool call, from its request (hyper's body straight from the data plane, or axum's from the
/// router) to its response (the bytes the gateway produced, unboxed).
pub(super) async fn call_tool<B>(
    gw: &Gateway,
    id: Arc<str>,
    id_header: Option<&HeaderValue>,
    source: Option<std::net::IpAddr>,
    req: axum::http::Request<B>,
) -> axum::http::Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let (parts, body) = req.into_parts();
    // The raw path segment, not a percent-decoded one: tool names match exactly, and `%2E` is
    // not a dot.
    let tool = parts.uri.path().strip_prefix("/v1/tools/").unwrap_or_default();
    let body = read_body(gw, &parts.headers, body).await;
    // One pass over the headers for the five the call reads (the first of each name, as
    // `HeaderMap::get` gives): a handful of comparisons instead of five hashed lookups.
    let [
        mut authorization,
        mut session,
        mut approval,
        mut traceparent,
        mut tracestate,
    ] = [None; 5];
    for (name, value) in &parts.headers {
        let slot = match name {
            n if n == header::AUTHORIZATION => &mut authorization,
            n if n == X_TOOLGATE_SESSION => &mut session,
            n if n == X_TOOLGATE_APPROVAL => &mut approval,
            n if n == TRACEPARENT => &mut traceparent,
            n if n == TRACESTATE => &mut tracestate,
            _ => continue,
        };
        slot.get_or_insert(value);
    }
    let resp = gw
        .call(CallRequest {
            request_id: &id,
            request_id_header: id_header,
            source,
            caller: Caller::Credentials(authorization.and_then(|v| v.to_str().ok())),
            tool,
            body,
            session: session.map(|v| v.to_str().unwrap_or("\u{fffd}")),
            approval: approval.map(|v| v.to_str().unwrap_or("\u{fffd}")),
            traceparent: traceparent.filter(|v| is_traceparent(v)),
            tracestate: tracestate.filter(|v| v.len() <= 512),
        })
        .await;
    let mut out = axum::http::Response::new(Full::new(resp.body));
    *out.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(ct) = resp.content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out.headers_mut()
        .insert(X_TOOLGATE_DECISION, HeaderValue::from_static(resp.decision));
    if let Some(secs) = resp.retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    out
}

/// The calling agent's own approval. Another agent's, or an unknown id, is the same 404.
async fn approval_status(State(gw): State<Arc<Gateway>>, Path(approval): Path<String>, req: Request) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let agent = match gw.policy().auth.authenticate(authorization).cloned() {
        Ok(agent) => agent,
        // Audited like any refusal: guessing keys here must leave a trail too.
        Err(reason) => return refuse(&gw, Refused::of(&req), reason.code, &reason.message).await,
    };
    let store = gw.approvals.clone();
    let now = crate::state::unix_now();
    let found = tokio::task::spawn_blocking(move || store.get(&approval, now))
        .await
        .expect("the approval store does not panic");
    match found {
        Ok(Some(a)) if *a.agent == *agent => axum::Json(serde_json::json!({
            "approval_id": a.id, "status": a.status.as_str(), "tool": a.tool, "rule": a.rule,
            "reason": a.reason, "group": a.group, "arguments_sha256": a.arguments_sha256,
            "requested_at": crate::audit::format_unix(a.requested_at),
            "expires_at": crate::audit::format_unix(a.expires_at),
            "comment": a.comment,
        }))
        .into_response(),
        Ok(_) => error_response(Code::NotFound, "No approval with this id exists for this agent.", &id),
        Err(e) => {
            tracing::error!(request_id = &*id, "approval store failed: {e}");
            error_response(
                Code::Unavailable,
                "The approval store is unavailable. Try again later.",
                &id,
            )
        }
    }
}

pub(crate) async fn read_body<B>(gw: &Gateway, headers: &axum::http::HeaderMap, body: B) -> Result<Bytes, Reason>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let limit = gw.config.limits.max_body_bytes;
    let too_large = || {
        Reason::new(
            Code::PayloadTooLarge,
            Stage::Request,
            "limits",
            format!("The body is larger than the limit of {limit} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = Duration::from_millis(gw.config.limits.request_read_timeout_ms);
    let mut collect = std::pin::pin!(crate::body::read_all(body, limit));
    // Usually the body came with the headers: then it is read without arming a timer.
    let read = match (&mut collect).now_or_never() {
        Some(read) => Ok(read),
        None => tokio::time::timeout(timeout, collect).await,
    };
    match read {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(crate::body::BodyError::TooLarge(_))) => Err(too_large()),
        Ok(Err(crate::body::BodyError::Read(_))) => Err(Reason::new(
            Code::InvalidRequest,
            Stage::Request,
            "transport",
            "The request body could not be read.",
        )),
        Err(_) => Err(Reason::new(
            Code::RequestTimeout,
            Stage::Request,
            "limits",
            "The request body was not received in time.",
        )),
    }
}

/// W3C `traceparent`: `vv-<32 hex>-<16 hex>-ff`. Anything else is dropped, not forwarded.
fn is_traceparent(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.len() == 55
        && b.iter().enumerate().all(|(i, c)| match i {
            2 | 35 | 52 => *c == b'-',
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
}
