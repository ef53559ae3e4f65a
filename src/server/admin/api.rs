//! The admin plane's JSON API (`/admin/*`), and its health, readiness and metrics. Who may call
//! which route is decided before a handler runs (`super::require`); a handler reads the
//! caller from the request ([`caller`]) and records them as `by`. A `by` in a body is ignored.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::who::Admin;
use super::{metrics_handle, request_id};
use crate::approval::{DecideError, Status};
use crate::config::Role;
use crate::gateway::{ActionError, Gateway, ReloadError};
use crate::policy::Code;
use crate::server::request::error_response;

/// The authenticated caller, put there by `super::require`.
pub(super) fn caller(req: &Request) -> Admin {
    req.extensions()
        .get::<Admin>()
        .cloned()
        .expect("admin routes are behind `require`")
}

pub(super) async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    let audit_ok = gw.audit.is_healthy();
    // Asked on every probe: a replica found not ready gets no traffic, so only the probe can
    // find the state backend back.
    let state_ok = gw.state.is_reachable().await;
    let ready = audit_ok && state_ok;
    let body = json!({
        "ready": ready,
        "policy_version": gw.policy().version,
        "audit": if audit_ok { "ok" } else { "failing" },
        "state": if state_ok { "ok" } else { "unreachable" },
        "state_backend": gw.state.describe(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

pub(super) async fn render_metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.report_budgets().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_handle().render(),
    )
        .into_response()
}

/// Reloads the policy now; the `policy_reloaded` event names the caller.
pub(super) async fn reload(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let id = request_id(&req);
    let admin = caller(&req);
    if let Err(r) = read_action(req).await {
        return r;
    }
    let before = gw.policy().version.clone();
    let reloaded = {
        let gw = gw.clone();
        to_the_end(async move {
            let reloaded = gw.reload("admin", Some(admin.by(Role::Operator))).await;
            // Upstream MCP servers are asked again too (their tools are part of the policy).
            gw.refresh_mcp("admin").await;
            reloaded
        })
        .await
    };
    let reloaded = reloaded.map(|v| {
        if gw.policy().version != v {
            gw.policy().version.clone()
        } else {
            v
        }
    });
    match reloaded {
        Ok(version) => axum::Json(json!({
            "status": if version == before { "unchanged" } else { "reloaded" },
            "policy_version": version,
            "previous_version": before,
        }))
        .into_response(),
        Err(ReloadError::Unrecorded { version, .. }) => error_response(
            Code::Unavailable,
            format!(
                "The new policy ({version}) is valid but was not put in force: its audit event could not be written. \
                 The last good policy ({before}) stays in force; try again once GET /readyz reports the audit log ok."
            ),
            &id,
        ),
        Err(ReloadError::Invalid(err)) => {
            let errors: Vec<Value> = err.problems.iter().map(|p| json!({"file": p.file, "line": p.line, "col": p.col, "path": p.path, "message": p.message, "text": p.to_string()})).collect();
            let body = json!({"error": {
                "code": "policy_invalid",
                "message": format!("The new policy has {} error(s); the last good policy ({before}) stays in force.", errors.len()),
                "request_id": &*id,
                "policy_version": before,
                "errors": errors,
            }});
            (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
        }
    }
}

/// Starts a new audit file now (for rotation by time: a daily cron, or before an archive run).
pub(super) async fn rotate_audit(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let id = request_id(&req);
    let admin = caller(&req);
    if let Err(r) = read_action(req).await {
        return r;
    }
    match gw.audit.rotate_now(admin.by(Role::Operator)) {
        Ok(Some(r)) => axum::Json(json!({
            "rotated": true,
            "previous_file": r.previous_file,
            "previous_bytes": r.previous_bytes,
        }))
        .into_response(),
        Ok(None) => error_response(
            Code::InvalidRequest,
            "There is no audit file to rotate: `audit.file` is not set.",
            &id,
        ),
        Err(e) => {
            tracing::error!(request_id = &*id, "audit file rotation failed: {e}");
            error_response(
                Code::Unavailable,
                format!("The audit file could not be rotated ({e}); events still go to the current file."),
                &id,
            )
        }
    }
}

pub(super) async fn policy(State(gw): State<Arc<Gateway>>) -> Response {
    let p = gw.policy();
    let mut agents: Vec<Value> = p
        .agents
        .values()
        .map(|a| {
            let tools: Vec<&str> = p
                .tools
                .keys()
                .filter(|t| a.allowlist.allows(t))
                .map(String::as_str)
                .collect();
            json!({"id": &*a.id, "description": a.description, "tools": tools})
        })
        .collect();
    agents.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let tools: Vec<Value> = p
        .tools
        .values()
        .map(|t| json!({"name": t.name, "description": t.description, "method": t.target.kind(), "changed": t.changed, "has_schema": t.schema.is_some(),
            "input_filters": t.input_filters.iter().map(|&i| &p.filters[i].name).collect::<Vec<_>>(),
            "output_filters": t.output_filters.iter().map(|&i| &p.filters[i].name).collect::<Vec<_>>()}))
        .collect();
    let mut rules: Vec<Value> = p
        .rules
        .list()
        .map(|r| json!({"id": r.id, "file": r.file, "mode": if r.shadow { "shadow" } else { "enforce" }, "approval": r.approval, "reason": r.reason}))
        .collect();
    rules.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    axum::Json(json!({"version": p.version, "files": p.files, "agents": agents, "tools": tools, "filters": p.filters.iter().map(|f| &f.name).collect::<Vec<_>>(), "rules": rules})).into_response()
}

/// `{"comment": "...", "duration_seconds": N}`: why, and for how long. Who acts is the
/// authenticated caller; a `by` field (from before identities) is accepted and ignored.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminAction {
    #[serde(rename = "by")]
    _by: Option<serde::de::IgnoredAny>,
    /// For `POST /admin/tools/{name}/approve`: the definition hash the operator reviewed.
    sha256: Option<String>,
    #[serde(alias = "reason")]
    comment: Option<String>,
    duration_seconds: Option<u64>,
}

/// Reads an admin action body (an empty one is an action with no fields).
async fn read_action(req: Request) -> Result<AdminAction, Response> {
    let id = request_id(&req);
    let bytes = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(AdminAction::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error_response(
            Code::InvalidRequest,
            format!("The body must be JSON like {{\"comment\": \"why\"}}: {e}"),
            &id,
        )
    })
}

/// The replicas sharing this gateway's state, and whether they serve the same policy: a skew
/// means a reload reached some replicas and not others.
pub(super) async fn replicas(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let rid = request_id(&req);
    let me = gw.replica();
    let id = me.id.clone();
    match gw.state.replicas(me).await {
        Ok(all) => {
            let mut versions: Vec<&str> = all.iter().map(|r| r.policy_version.as_str()).collect();
            versions.sort_unstable();
            versions.dedup();
            axum::Json(json!({
                "self": id,
                "state_backend": gw.state.describe(),
                "replicas": all,
                "policy_versions": versions,
                "policy_skew": versions.len() > 1,
            }))
            .into_response()
        }
        Err(e) => not_done(ActionError::State(e), "The replicas were not listed", &rid),
    }
}

fn unknown_agent(id: &str, rid: &str) -> Response {
    error_response(Code::NotFound, format!("No agent '{id}' in the policy in force."), rid)
}

pub(super) async fn agent_status(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let p = gw.policy();
    let Some(agent) = p.agents.get(&id) else {
        return unknown_agent(&id, &request_id(&req));
    };
    let limits = &agent.limits;
    let rid = request_id(&req);
    let read = async {
        let budget = match limits.tokens_per_hour {
            Some(l) => Some(gw.state.budget(&id, l.get()).await?),
            None => None,
        };
        let quarantine = gw.state.quarantined(&id).await?;
        let denials = gw.state.denials(&id, p.anomaly.window()).await?;
        Ok::<_, crate::state::StateError>((budget, quarantine, denials))
    };
    let (budget, quarantine, denials) = match read.await {
        Ok(r) => r,
        Err(e) => {
            return not_done(
                ActionError::State(e),
                &format!("Agent '{id}''s state was not read"),
                &rid,
            );
        }
    };
    let tools: Vec<&str> = p
        .tools
        .keys()
        .filter(|t| agent.allowlist.allows(t))
        .map(String::as_str)
        .collect();
    let per_tool: serde_json::Map<String, Value> = limits
        .tools
        .iter()
        .map(|(t, l)| (t.clone(), json!({"calls_per_minute": l.calls_per_minute})))
        .collect();
    axum::Json(json!({
        "id": id,
        "description": agent.description,
        "tools": tools,
        "limits": {"calls_per_minute": limits.calls_per_minute, "tokens_per_hour": limits.tokens_per_hour, "tools": per_tool},
        "budget": budget,
        "quarantine": quarantine,
        "recent_denials": denials,
        "policy_version": p.version,
    }))
    .into_response()
}

/// The agent named in the path, if the policy in force has it, and the action's body.
async fn agent_action(gw: &Gateway, id: &str, req: Request) -> Result<AdminAction, Response> {
    if !gw.policy().agents.contains_key(id) {
        return Err(unknown_agent(id, &request_id(&req)));
    }
    read_action(req).await
}

pub(super) async fn quarantine(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let admin = caller(&req);
    let a = match agent_action(&gw, &id, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let comment = a.comment.unwrap_or_else(|| "quarantined by an operator".to_owned());
    let duration = a.duration_seconds.map(std::time::Duration::from_secs);
    let done = {
        let (gw, id) = (gw.clone(), id.clone());
        to_the_end(async move { gw.quarantine(&id, duration, admin.by(Role::Operator), &comment).await }).await
    };
    let done = match done {
        Ok(done) => done,
        Err(e) => {
            return not_done(
                ActionError::State(e),
                &format!("Agent '{id}' was not quarantined"),
                &rid,
            );
        }
    };
    let now = gw.state.quarantined(&id).await.ok().flatten();
    axum::Json(
        json!({"agent": id, "quarantined": true, "changed": done.changed, "audited": done.audited,
        "quarantine": now}),
    )
    .into_response()
}

pub(super) async fn release(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let admin = caller(&req);
    let a = match agent_action(&gw, &id, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let released = {
        let (gw, id) = (gw.clone(), id.clone());
        let comment = a.comment.unwrap_or_default();
        to_the_end(async move { gw.release(&id, admin.by(Role::Operator), &comment).await }).await
    };
    match released {
        Ok(changed) => axum::Json(json!({"agent": id, "quarantined": false, "changed": changed})).into_response(),
        Err(e) => not_done(e, &format!("Agent '{id}' was not released"), &rid),
    }
}

/// Runs an action to its end even if the admin's connection drops meanwhile (hyper then
/// drops the handler): once its event is written, what the event records must happen.
pub(super) async fn to_the_end<T: Send + 'static>(action: impl Future<Output = T> + Send + 'static) -> T {
    tokio::spawn(action).await.expect("admin actions do not panic")
}

/// The answer for an action that was not carried out: `what` says what did not happen.
pub(super) fn not_done(e: ActionError, what: &str, rid: &str) -> Response {
    match e {
        ActionError::Store(e) => {
            tracing::error!(request_id = rid, "approval store failed: {e}");
            error_response(
                Code::Unavailable,
                format!("{what}: the approval store is unavailable. Try again later."),
                rid,
            )
        }
        ActionError::State(e) => {
            tracing::error!(request_id = rid, "{what}: {e}");
            error_response(
                Code::Unavailable,
                format!("{what}: the shared state (Redis) did not answer. Try again once GET /readyz reports it ok."),
                rid,
            )
        }
        ActionError::Unrecorded(e) => {
            tracing::error!(request_id = rid, "{what}: its audit event could not be written: {e}");
            error_response(
                Code::Unavailable,
                format!(
                    "{what}: its audit event could not be written, and an action that lets agents do more is \
                     recorded before it takes effect. Try again once GET /readyz reports the audit log ok."
                ),
                rid,
            )
        }
    }
}

#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    status: Option<String>,
}

pub(super) async fn list_approvals(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
    req: Request,
) -> Response {
    let rid = request_id(&req);
    let status = match q.status.as_deref() {
        None | Some("all") => None,
        Some(s) => match Status::parse(s) {
            Some(s) => Some(s),
            None => {
                return error_response(
                    Code::InvalidRequest,
                    "`status` must be one of pending, approved, denied, used, expired, all.",
                    &rid,
                );
            }
        },
    };
    let admin = caller(&req);
    match gw.approvals.list(status, crate::state::unix_now()).await {
        Ok(mut list) => {
            // An approver who is neither operator nor auditor sees their groups' approvals only.
            if !(admin.has(Role::Operator) || admin.has(Role::Auditor)) {
                let me = admin.approver();
                list.retain(|a| me.may_decide(a));
            }
            axum::Json(json!({"approvals": list})).into_response()
        }
        Err(e) => not_done(e.into(), "The approvals could not be listed", &rid),
    }
}

pub(super) async fn get_approval(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let admin = caller(&req);
    let sees_all = admin.has(Role::Operator) || admin.has(Role::Auditor);
    match gw.approvals.get(id, crate::state::unix_now()).await {
        Ok(Some(a)) if sees_all || admin.approver().may_decide(&a) => axum::Json(a).into_response(),
        Ok(Some(_)) => error_response(Code::NotFound, "No such approval.", &rid),
        Ok(None) => error_response(Code::NotFound, "No such approval.", &rid),
        Err(e) => not_done(e.into(), "The approval could not be read", &rid),
    }
}

pub(super) async fn approve(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    decide_by_api(gw, id, true, req).await
}

pub(super) async fn deny(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    decide_by_api(gw, id, false, req).await
}

/// `{"comment": "..."}`: the caller decides, as themselves; the decision is audited.
async fn decide_by_api(gw: Arc<Gateway>, id: String, approve: bool, req: Request) -> Response {
    let rid = request_id(&req);
    let admin = caller(&req);
    let action = format!("{} {}", req.method(), req.uri().path());
    let a = match read_action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let comment = a.comment.unwrap_or_default();
    match decide(&gw, &admin, &id, approve, &comment, &action, &rid).await {
        Ok(approval) => axum::Json(approval).into_response(),
        Err(r) => r,
    }
}

/// One approver's decision, from the API or the page: the approval as it stands after it, or
/// the answer that says why not (403 `forbidden` with an `admin_refused` event when the
/// caller may not decide it).
pub(super) async fn decide(
    gw: &Arc<Gateway>,
    admin: &Admin,
    id: &str,
    approve: bool,
    comment: &str,
    action: &str,
    rid: &str,
) -> Result<crate::approval::Approval, Response> {
    if comment.len() > 2000 {
        return Err(error_response(
            Code::InvalidRequest,
            "The comment must be at most 2000 bytes.",
            rid,
        ));
    }
    let outcome = {
        let (gw, id, who, admin, comment) = (
            gw.clone(),
            id.to_owned(),
            admin.approver(),
            admin.clone(),
            comment.to_owned(),
        );
        to_the_end(async move {
            gw.decide_approval(&id, approve, &who, admin.credential, admin.by(Role::Approver), &comment)
                .await
        })
        .await
    };
    match outcome {
        Ok(Ok(approval)) => Ok(approval),
        Ok(Err(DecideError::NotFound)) => Err(error_response(Code::NotFound, "No such approval.", rid)),
        Ok(Err(e @ DecideError::NotPending(_))) => Err(error_response(Code::Conflict, e.message(), rid)),
        Ok(Err(e)) => Err(super::refuse(gw, admin, Role::Approver, action, &e.message(), Some(id), rid).await),
        Err(e) => Err(not_done(e, "The approval was not decided", rid)),
    }
}

/// The tools upstream MCP servers listed, and whether each matches its pinned definition.
pub(super) async fn list_mcp_tools(State(gw): State<Arc<Gateway>>) -> Response {
    let tools: Vec<Value> = gw
        .discovered_tools()
        .iter()
        .map(|d| {
            let state = match (d.changed, d.findings.is_empty(), d.unreviewed) {
                (true, false, _) => "flagged",
                (true, true, _) => "changed",
                (false, _, true) => "new",
                (false, _, false) => "approved",
            };
            json!({"name": d.exposed_name(), "server": d.server, "description": d.description,
                "sha256": d.definition_sha256(), "input_schema": d.input_schema,
                "state": state, "findings": d.findings})
        })
        .collect();
    axum::Json(json!({"tools": tools})).into_response()
}

/// Approves an upstream MCP tool's definition: `{"sha256": "<reviewed>", "comment": "..."}`.
pub(super) async fn approve_tool(State(gw): State<Arc<Gateway>>, Path(name): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let admin = caller(&req);
    let a = match read_action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(sha) = a.sha256.filter(|s| !s.is_empty()) else {
        return error_response(
            Code::InvalidRequest,
            "Say which definition you reviewed: the body needs `sha256` (from GET /admin/tools).",
            &rid,
        );
    };
    let comment = a.comment.unwrap_or_default();
    match to_the_end(async move { gw.approve_tool(&name, &sha, admin.by(Role::Operator), &comment).await }).await {
        Ok(Ok(t)) => {
            axum::Json(json!({"name": t.exposed_name(), "sha256": t.definition_sha256(), "state": "approved"}))
                .into_response()
        }
        Ok(Err(None)) => error_response(
            Code::NotFound,
            "No upstream MCP tool by that name was discovered.",
            &rid,
        ),
        Ok(Err(Some(current))) => error_response(
            Code::Conflict,
            format!(
                "The tool's definition is now {current}, not the one reviewed: review it again (GET /admin/tools)."
            ),
            &rid,
        ),
        Err(e) => not_done(e, "The tool was not approved", &rid),
    }
}
