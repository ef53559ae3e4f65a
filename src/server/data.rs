//! The HTTP transport of tool calls: `POST /v1/tools/{tool}` (the body read within its limits,
//! the call handed to the gateway, its [`CallOutcome`] mapped to an HTTP response) and
//! `GET /v1/approvals/{id}` (an agent polls its own approval); everything else answers a JSON
//! 404 or 405, audited.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::Full;

use super::request::{
    Client, HoldsGateway, Refusal, RequestId, Source, authenticate, call_detached, error_body, error_response,
    expects_continue, read_body,
};
use crate::gateway::{Answer, Arguments, CallOutcome, CallRequest, Caller, Gateway, ToolName};
use crate::policy::Code;
use crate::policy::identity::ClientCertificate;
use crate::upstream::TraceContext;

const X_TOOLGATE_SESSION: HeaderName = HeaderName::from_static("x-toolgate-session");
const X_TOOLGATE_APPROVAL: HeaderName = HeaderName::from_static("x-toolgate-approval");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_TOOLGATE_DECISION: HeaderName = HeaderName::from_static("x-toolgate-decision");

pub fn routes(gateway: Arc<Gateway>, mcp: Arc<super::mcp::Mcp>) -> Router {
    Router::new()
        // Taken before the router by `DataPlane` (see `is_tool_call`); routed here too, so a
        // wrong method on it is a 405, not a 404.
        .route(
            "/v1/tools/{tool}",
            post(|State(gw): State<Arc<Gateway>>, req: Request| async move {
                let (id, source) = (RequestId::of(&req), Source::of(&req));
                let client = req.extensions().get::<Client>().map(|c| c.0.clone());
                call_tool(gw, id, None, source, client, req).await
            }),
        )
        .route("/v1/approvals/{id}", get(approval_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway.clone())
        .merge(super::mcp::routes(mcp))
}

async fn not_found(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let message = "No such endpoint. Tool calls are `POST /v1/tools/{tool}`; MCP clients use `/mcp`.";
    let refusal = Refusal {
        endpoint: "(unknown)",
        ..Refusal::of(&req, RequestId::of(&req), Source::of(&req))
    };
    refusal.refuse(&gw, Code::NotFound, message).await
}

async fn method_not_allowed(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let message = "Tool calls use POST; approval status uses GET.";
    let refusal = Refusal::of(&req, RequestId::of(&req), Source::of(&req));
    refusal.refuse(&gw, Code::MethodNotAllowed, message).await
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
    let mut res = Refusal::of(req, id, source)
        .refuse(gw, Code::Unavailable, message)
        .await;
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
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
/// router) to its response (the answer's bytes as they are, unboxed).
pub(super) async fn call_tool<B>(
    owner: impl HoldsGateway,
    id: Arc<str>,
    id_header: Option<&HeaderValue>,
    source: Option<std::net::IpAddr>,
    client: Option<Arc<ClientCertificate>>,
    req: axum::http::Request<B>,
) -> axum::http::Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let (parts, body) = req.into_parts();
    let gw = owner.gateway();
    // The raw path segment, not a percent-decoded one: tool names match exactly, and `%2E` is
    // not a dot.
    let path = parts.uri.into_parts().path_and_query;
    let tool = path.map_or_else(|| ToolName::new(""), |p| ToolName::from_path(p, "/v1/tools/".len()));
    // One pass over the headers for the five the call reads (the first of each name, as
    // `HeaderMap::get` gives): a handful of comparisons instead of five hashed lookups.
    let [
        mut authorization,
        mut session,
        mut approval,
        mut traceparent,
        mut tracestate,
    ] = [None; 5];
    let mut credentials = 0;
    for (name, value) in &parts.headers {
        credentials += usize::from(name == header::AUTHORIZATION);
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
    // A caller waiting to be told to send its body is refused on its headers when they already
    // decide (credentials, quarantine, allowlist): the body is never read, so the client is
    // never asked for it. The gateway decides the call as usual, on an empty body.
    gw.fetch_keys_for(authorization.and_then(|v| v.to_str().ok())).await;
    let refused = |gw| credentials > 1 || refused_on_headers(gw, authorization, client.as_deref(), tool.as_str());
    let body = if expects_continue(&parts.headers) && refused(gw) {
        Ok(Bytes::new())
    } else {
        read_body(gw, &parts.headers, body).await
    };
    let text = |v: &HeaderValue| v.to_str().unwrap_or("\u{fffd}").to_owned();
    let call = CallRequest {
        request_id: id.clone(),
        request_id_header: id_header.cloned(),
        source,
        caller: match credentials {
            0 | 1 => Caller::Credentials {
                authorization: authorization.cloned(),
                client,
            },
            _ => Caller::Ambiguous,
        },
        tool,
        arguments: body.map(Arguments::Body),
        session: session.map(text),
        approval: approval.map(text),
        trace: TraceContext::new(traceparent, tracestate),
    };
    let outcome = call_detached(owner, call).await;
    response(outcome, &id)
}

/// Whether a call would be refused before its body counts: unknown credentials, a quarantined
/// agent, or a tool not on its allowlist.
fn refused_on_headers(
    gw: &Gateway,
    authorization: Option<&HeaderValue>,
    client: Option<&ClientCertificate>,
    tool: &str,
) -> bool {
    let policy = gw.policy_now();
    match policy
        .auth
        .authenticate(authorization.and_then(|v| v.to_str().ok()), client)
    {
        Err(_) => true,
        Ok(agent) => gw.state.quarantined_locally(agent).is_some() || !policy.is_allowed(agent, tool),
    }
}

/// A call's outcome as HTTP: the tool's answer as it came (after filters), or the contract's
/// error body with the reason's status; `X-Toolgate-Decision` either way.
fn response(outcome: CallOutcome, request_id: &str) -> axum::http::Response<Full<Bytes>> {
    let json = || Some(HeaderValue::from_static("application/json"));
    let decision = outcome.decision();
    let (status, content_type, body, retry_after) = match outcome {
        CallOutcome::Answered(Answer::Http(inbound)) => (inbound.status, inbound.content_type, inbound.body, None),
        CallOutcome::Answered(Answer::Mcp(result)) => (200, json(), to_json(&result), None),
        CallOutcome::Answered(Answer::McpError(error)) => (502, json(), to_json(&error), None),
        CallOutcome::Failed(reason) | CallOutcome::Refused(reason) | CallOutcome::Held(reason) => (
            reason.code.http_status(),
            json(),
            error_body(&reason, request_id),
            reason.retry_after,
        ),
    };
    let mut out = axum::http::Response::new(Full::new(body));
    *out.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out.headers_mut()
        .insert(X_TOOLGATE_DECISION, HeaderValue::from_static(decision));
    if let Some(secs) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    out
}

fn to_json<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON serialises"))
}

/// The calling agent's own approval. Another agent's, or an unknown id, is the same 404.
async fn approval_status(State(gw): State<Arc<Gateway>>, Path(approval): Path<String>, req: Request) -> Response {
    let id = RequestId::of(&req);
    let agent = match authenticate(&gw, req.headers(), Client::of(&req)).await {
        Ok(agent) => agent,
        // Audited like any refusal: guessing keys here must leave a trail too.
        Err(reason) => {
            let refusal = Refusal::of(&req, id, Source::of(&req));
            return refusal.refuse(&gw, reason.code, &reason.message).await;
        }
    };
    match gw.approvals.get(approval, crate::state::unix_now()).await {
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
