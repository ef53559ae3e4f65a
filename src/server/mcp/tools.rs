//! `tools/list` (the agent's allowlist, and nothing else) and `tools/call`: the call handed to
//! the gateway as the same [`CallRequest`] as `POST /v1/tools/{tool}`, and its [`CallOutcome`]
//! mapped to JSON-RPC once. A refused or held call is a JSON-RPC error with code [`BLOCKED`]
//! whose `data` is the contract's error object; a call that was allowed but whose tool failed is
//! a `CallToolResult` with `isError: true`: the agent sees the tool's failure, as MCP intends.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::super::request::{HoldsGateway, call_detached};
use super::reply::{BLOCKED, INVALID_PARAMS, Message, Reply};
use super::{META_APPROVAL, META_SESSION, Mcp, Revision, header_str};
use crate::gateway::{Answer, Arguments, CallOutcome, CallRequest, Caller, ToolName};
use crate::policy::Reason;
use crate::upstream::{Inbound, TraceContext};

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

/// The tools this agent may call: no other tool is visible, or even named.
pub(super) fn list(mcp: &Mcp, id: &Value, agent: &str, revision: &Revision) -> Reply {
    let policy = mcp.gateway.policy();
    let Some(a) = policy.agents.get(agent) else {
        return Reply::result(id, json!({"tools": []}));
    };
    let tools: Vec<Value> = policy
        .tools
        .values()
        .filter(|t| a.allowlist.allows(&t.name) && !t.changed && (!t.unreviewed || a.allowlist.names(&t.name)))
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

/// What a `tools/call` came with, besides the agent and the arguments.
pub(super) struct Call<'a> {
    pub headers: &'a HeaderMap,
    pub agent: &'a Arc<str>,
    pub id: &'a Value,
    pub revision: &'a Revision,
    pub request_id: &'a Arc<str>,
    pub source: Option<std::net::IpAddr>,
}

pub(super) async fn call(owner: impl HoldsGateway, c: Call<'_>, mut params: Map<String, Value>) -> Reply {
    let Some(Value::String(name)) = params.remove("name") else {
        return Reply::error(
            StatusCode::OK,
            c.id,
            INVALID_PARAMS,
            "tools/call needs `params.name`.",
            None,
        );
    };
    let arguments = params.remove("arguments");
    let meta = params.get("_meta").and_then(Value::as_object);
    let meta_str = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    // The session for session-aware rules: the explicit header, else the MCP session, else
    // toolgate's `_meta` key (stateless clients).
    let session = header_str(c.headers, "x-toolgate-session")
        .or(match c.revision {
            Revision::Session(_, Some(s)) => Some(s.as_str()),
            _ => None,
        })
        .or_else(|| meta_str(META_SESSION));
    let approval = header_str(c.headers, "x-toolgate-approval").or_else(|| meta_str(META_APPROVAL));
    // The arguments as parsed with the message (the same strictness the policy parses a body
    // with): an object goes to the policy as it is, not written out and parsed again.
    let arguments = match arguments {
        None | Some(Value::Null) => Arguments::Body(Bytes::from_static(b"{}")),
        Some(Value::Object(args)) => Arguments::Parsed(args),
        Some(other) => Arguments::Body(Bytes::from(serde_json::to_vec(&other).expect("JSON serialises"))),
    };
    let call = CallRequest {
        request_id: c.request_id.clone(),
        request_id_header: None,
        source: c.source,
        caller: Caller::Agent(c.agent.clone()),
        tool: ToolName::new(name),
        arguments: Ok(arguments),
        session: session.map(str::to_owned),
        approval: approval.map(str::to_owned),
        trace: TraceContext::new(c.headers.get("traceparent"), c.headers.get("tracestate")),
    };
    let outcome = call_detached(owner, call).await;
    reply(outcome, &c)
}

/// A call's outcome as JSON-RPC.
fn reply(outcome: CallOutcome, c: &Call<'_>) -> Reply {
    let stateless = *c.revision == Revision::Stateless;
    match outcome {
        CallOutcome::Refused(reason) | CallOutcome::Held(reason) => blocked(&reason, c),
        // An upstream MCP server's own CallToolResult passes through (after output filters).
        CallOutcome::Answered(Answer::Mcp(mut result)) => {
            if stateless {
                result.insert("resultType".into(), json!("complete"));
            } else {
                result.remove("resultType");
                if result.get("structuredContent").is_some_and(|v| !v.is_object()) {
                    result.remove("structuredContent");
                }
            }
            Reply::result(c.id, Value::Object(result))
        }
        CallOutcome::Answered(Answer::Http(inbound)) => tool_answer(&inbound, c),
        CallOutcome::Answered(Answer::McpError(error)) => {
            let text = serde_json::to_vec(&error).expect("JSON serialises");
            text_answer(c, &String::from_utf8_lossy(&text), true, None)
        }
        // Allowed, but the tool could not be used: the contract's error body, as the tool's
        // failed answer.
        CallOutcome::Failed(reason) => {
            let text = super::super::request::error_body(&reason, c.request_id);
            text_answer(c, &String::from_utf8_lossy(&text), true, None)
        }
    }
}

/// Blocked (or held): the contract's error object, as JSON-RPC error data.
fn blocked(reason: &Reason, c: &Call<'_>) -> Reply {
    let mut data = super::super::request::error_object(reason, c.request_id);
    if let Some(id) = &reason.approval_id {
        data["status_url"] = json!(format!("/v1/approvals/{id}"));
        data["retry"] = json!(format!(
            "Once approved, call the tool again with the same arguments and `_meta` {{\"{META_APPROVAL}\": \"{id}\"}} (or the header X-Toolgate-Approval)."
        ));
    }
    if let Some(secs) = reason.retry_after {
        data["retry_after_seconds"] = json!(secs);
    }
    Reply::error(StatusCode::OK, c.id, BLOCKED, reason.message.clone(), Some(data))
}

/// An HTTP tool's answer as a CallToolResult: its bytes as text, and when they are JSON the
/// value itself as `structuredContent` (any value in 2026-07-28; only an object in the
/// handshake revisions, which require one).
fn tool_answer(inbound: &Inbound, c: &Call<'_>) -> Reply {
    let ok = (200..300).contains(&inbound.status);
    let is_json = inbound
        .content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    let structured = (ok && is_json)
        .then(|| serde_json::from_slice::<&RawValue>(&inbound.body).ok())
        .flatten()
        .filter(|v| v.get().starts_with('{') || *c.revision == Revision::Stateless);
    text_answer(c, &String::from_utf8_lossy(&inbound.body), !ok, structured)
}

fn text_answer(c: &Call<'_>, text: &str, is_error: bool, structured: Option<&RawValue>) -> Reply {
    let answer = ToolAnswer {
        jsonrpc: "2.0",
        id: c.id,
        result: CallToolResult {
            content: [TextContent { kind: "text", text }],
            is_error,
            structured_content: structured,
            result_type: (*c.revision == Revision::Stateless).then_some("complete"),
        },
    };
    Reply::message(Message::Json(serde_json::to_vec(&answer).expect("JSON serialises")))
}
