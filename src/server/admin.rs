//! The admin plane, on its own listener: health, readiness and metrics without a token;
//! `/admin/*` (reload, policy summary, agents, approvals) behind a bearer token compared in
//! constant time.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::request::{RequestId, error_response};
use crate::approval::{DecideError, Status};
use crate::gateway::{ActionError, Gateway, ReloadError};
use crate::policy::Code;

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".to_owned()), &buckets)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests, embedding): then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!("toolgate_calls_total", "Tool calls by agent, tool, decision and code.");
            metrics::describe_histogram!(
                "toolgate_decision_duration_seconds",
                "Time to decide a call, before forwarding."
            );
            metrics::describe_histogram!(
                "toolgate_upstream_duration_seconds",
                "Time the tool took to answer, by tool."
            );
            metrics::describe_counter!("toolgate_policy_reloads_total", "Policy reloads by result.");
            metrics::describe_counter!(
                "toolgate_audit_write_failures_total",
                "Audit events that could not be written."
            );
            handle
        })
        .clone()
}

pub fn routes(gateway: Arc<Gateway>) -> Router {
    let token: Option<[u8; 32]> = gateway.admin_token().map(|t| Sha256::digest(t.as_bytes()).into());
    let protected = Router::new()
        .route("/admin/reload", post(reload))
        .route("/admin/audit/rotate", post(rotate_audit))
        .route("/admin/policy", get(policy))
        .route("/admin/replicas", get(replicas))
        .route("/admin/agents/{id}", get(agent_status))
        .route("/admin/agents/{id}/quarantine", post(quarantine).delete(release))
        .route("/admin/tools", get(list_mcp_tools))
        .route("/admin/tools/{name}/approve", post(approve_tool))
        .route("/admin/approvals", get(list_approvals))
        .route("/admin/approvals/{id}", get(get_approval))
        .route("/admin/approvals/{id}/approve", post(approve))
        .route("/admin/approvals/{id}/deny", post(deny))
        .route_layer(middleware::from_fn(move |req: Request, next: Next| {
            let token = token;
            async move { check_token(token.as_ref().map(|t| &t[..]), req, next).await }
        }));
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .merge(protected)
        .fallback(
            |req: Request| async move { error_response(Code::NotFound, "No such admin endpoint.", &request_id(&req)) },
        )
        .with_state(gateway)
}

fn request_id(req: &Request) -> Arc<str> {
    RequestId::of(req)
}

async fn check_token(expected: Option<&[u8]>, req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let Some(expected) = expected else {
        return error_response(
            Code::Unauthenticated,
            "No admin token is configured: set the variable named by `admin.token_env`.",
            &id,
        );
    };
    // One Authorization header: with two, neither is taken for the one that counts.
    let mut all = req.headers().get_all(header::AUTHORIZATION).iter();
    let presented = all
        .next()
        .filter(|_| all.next().is_none())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
    // Digests, not tokens, are compared, so neither the length nor the content leaks by timing.
    match presented {
        Some(p) if bool::from(p[..].ct_eq(expected)) => next.run(req).await,
        _ => error_response(Code::Unauthenticated, "A valid admin bearer token is required.", &id),
    }
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
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

async fn render_metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.report_budgets().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_handle().render(),
    )
        .into_response()
}

/// Reloads the policy now. The body is optional: `{"by": "alice"}` names who asked, in the
/// `policy_reloaded` event.
async fn reload(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let id = request_id(&req);
    let by = match read_action(req).await {
        Ok(a) if names_who_acts(&a, false) => a.by,
        Ok(_) => return who_acts_missing(&id),
        Err(r) => return r,
    };
    let before = gw.policy().version.clone();
    let reloaded = {
        let gw = gw.clone();
        to_the_end(async move {
            let reloaded = gw.reload("admin", by.as_deref()).await;
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
async fn rotate_audit(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let id = request_id(&req);
    let a = match action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    match gw.audit.rotate_now(&a.by.unwrap_or_default()) {
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

async fn policy(State(gw): State<Arc<Gateway>>) -> Response {
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

/// `{"by": "...", "comment": "...", "duration_seconds": N}`: who acts, why, and for how long.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminAction {
    by: Option<String>,
    /// For `POST /admin/tools/{name}/approve`: the definition hash the operator reviewed.
    sha256: Option<String>,
    #[serde(alias = "reason")]
    comment: Option<String>,
    duration_seconds: Option<u64>,
}

/// Reads an admin action body; `by` is required so every quarantine and release names a person.
async fn action(req: Request) -> Result<AdminAction, Response> {
    let id = request_id(&req);
    let action = read_action(req).await?;
    if !names_who_acts(&action, true) {
        return Err(who_acts_missing(&id));
    }
    Ok(action)
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
            format!("The body must be JSON like {{\"by\": \"alice\", \"comment\": \"why\"}}: {e}"),
            &id,
        )
    })
}

/// Whether `by`, if given (or if `required`), names someone in 1 to 128 characters.
fn names_who_acts(action: &AdminAction, required: bool) -> bool {
    match &action.by {
        Some(by) => !by.trim().is_empty() && by.len() <= 128,
        None => !required,
    }
}

/// The replicas sharing this gateway's state, and whether they serve the same policy: a skew
/// means a reload reached some replicas and not others.
async fn replicas(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
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

fn who_acts_missing(rid: &str) -> Response {
    error_response(
        Code::InvalidRequest,
        "Say who acts: the body needs `by` (1 to 128 characters).",
        rid,
    )
}

fn unknown_agent(id: &str, rid: &str) -> Response {
    error_response(Code::NotFound, format!("No agent '{id}' in the policy in force."), rid)
}

async fn agent_status(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
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
    action(req).await
}

async fn quarantine(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let a = match agent_action(&gw, &id, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let by = a.by.unwrap_or_default();
    let comment = a.comment.unwrap_or_else(|| "quarantined by an operator".to_owned());
    let duration = a.duration_seconds.map(std::time::Duration::from_secs);
    let done = {
        let (gw, id) = (gw.clone(), id.clone());
        to_the_end(async move { gw.quarantine(&id, duration, &by, &comment).await }).await
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

async fn release(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let a = match agent_action(&gw, &id, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let released = {
        let (gw, id) = (gw.clone(), id.clone());
        let (by, comment) = (a.by.unwrap_or_default(), a.comment.unwrap_or_default());
        to_the_end(async move { gw.release(&id, &by, &comment).await }).await
    };
    match released {
        Ok(changed) => axum::Json(json!({"agent": id, "quarantined": false, "changed": changed})).into_response(),
        Err(e) => not_done(e, &format!("Agent '{id}' was not released"), &rid),
    }
}

/// Runs an action to its end even if the admin's connection drops meanwhile (hyper then
/// drops the handler): once its event is written, what the event records must happen.
async fn to_the_end<T: Send + 'static>(action: impl Future<Output = T> + Send + 'static) -> T {
    tokio::spawn(action).await.expect("admin actions do not panic")
}

/// The answer for an action that was not carried out: `what` says what did not happen.
fn not_done(e: ActionError, what: &str, rid: &str) -> Response {
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
struct ListQuery {
    status: Option<String>,
}

async fn list_approvals(
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
    match gw.approvals.list(status, crate::state::unix_now()).await {
        Ok(list) => axum::Json(json!({"approvals": list})).into_response(),
        Err(e) => not_done(e.into(), "The approvals could not be listed", &rid),
    }
}

async fn get_approval(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    match gw.approvals.get(id, crate::state::unix_now()).await {
        Ok(Some(a)) => axum::Json(a).into_response(),
        Ok(None) => error_response(Code::NotFound, "No such approval.", &rid),
        Err(e) => not_done(e.into(), "The approval could not be read", &rid),
    }
}

async fn approve(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    decide(gw, id, true, req).await
}

async fn deny(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, req: Request) -> Response {
    decide(gw, id, false, req).await
}

/// `{"by": "...", "comment": "..."}`: `by` is required; the decision is audited.
async fn decide(gw: Arc<Gateway>, id: String, approve: bool, req: Request) -> Response {
    let rid = request_id(&req);
    let a = match action(req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let (by, comment) = (a.by.unwrap_or_default(), a.comment.unwrap_or_default());
    match to_the_end(async move { gw.decide_approval(&id, approve, &by, &comment).await }).await {
        Ok(Ok(approval)) => axum::Json(approval).into_response(),
        Ok(Err(DecideError::NotFound)) => error_response(Code::NotFound, "No such approval.", &rid),
        Ok(Err(DecideError::NotPending(status))) => error_response(
            Code::Conflict,
            format!(
                "This approval is {}: only a pending approval can be decided.",
                status.as_str()
            ),
            &rid,
        ),
        Err(e) => not_done(e, "The approval was not decided", &rid),
    }
}

/// The tools upstream MCP servers listed, and whether each matches its pinned definition.
async fn list_mcp_tools(State(gw): State<Arc<Gateway>>) -> Response {
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

/// Approves an upstream MCP tool's definition: `{"by": "...", "sha256": "<reviewed>", "comment": "..."}`.
async fn approve_tool(State(gw): State<Arc<Gateway>>, Path(name): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let a = match action(req).await {
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
    let (by, comment) = (a.by.unwrap_or_default(), a.comment.unwrap_or_default());
    match to_the_end(async move { gw.approve_tool(&name, &sha, &by, &comment).await }).await {
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
