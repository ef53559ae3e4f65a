//! The admin plane, on its own listener: health, readiness and metrics for anyone who can reach
//! it; `/admin/*` (the JSON API) and `/ui/` (the approvals inbox page) for authenticated people
//! and services, each route open to the roles it names:
//!
//! | route | roles |
//! |---|---|
//! | `GET /admin/policy`, `/admin/agents/{id}`, `/admin/replicas`, `/admin/tools` | operator, auditor |
//! | `GET /admin/approvals`, `/admin/approvals/{id}` | operator, auditor, approver (their groups) |
//! | `POST /admin/approvals/{id}/approve`, `…/deny` | approver in the approval's group |
//! | `POST /admin/reload`, `/admin/audit/rotate`, quarantine, release, tool approvals | operator |
//!
//! A caller refused for its role gets 403 `forbidden` and an `admin_refused` event; one with no
//! valid credential gets 401 and no event (anyone can knock).

mod api;
mod inbox;
mod session;
pub mod who;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::request::{RequestId, Source, error_response};
use crate::audit::AdminRefused;
use crate::config::Role;
use crate::gateway::Gateway;
use crate::policy::Code;
use session::Sessions;
use who::{Admin, AdminAuth, NotAuthenticated};

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

/// What the admin plane's handlers share: the gateway, who may sign in, the page's sessions.
pub struct AdminPlane {
    pub gw: Arc<Gateway>,
    pub auth: AdminAuth,
    pub sessions: Sessions,
}

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Operator or auditor.
    Read,
    /// Operator, auditor, or approver.
    ReadApprovals,
    /// An approver (the approval's group is checked when deciding).
    Decide,
    /// Operator.
    Operate,
}

impl Need {
    fn allows(self, a: &Admin) -> bool {
        match self {
            Need::Read => a.has(Role::Operator) || a.has(Role::Auditor),
            Need::ReadApprovals => a.has(Role::Operator) || a.has(Role::Auditor) || a.has(Role::Approver),
            Need::Decide => a.has(Role::Approver),
            Need::Operate => a.has(Role::Operator),
        }
    }

    fn refusal(self) -> &'static str {
        match self {
            Need::Read => "This needs the operator or auditor role.",
            Need::ReadApprovals => "This needs the operator, auditor or approver role.",
            Need::Decide => "Deciding approvals needs the approver role in the approval's group.",
            Need::Operate => "This needs the operator role.",
        }
    }

    /// The role recorded for a refusal.
    fn role(self) -> Role {
        match self {
            Need::Read | Need::ReadApprovals => Role::Auditor,
            Need::Decide => Role::Approver,
            Need::Operate => Role::Operator,
        }
    }
}

pub fn routes(gateway: Arc<Gateway>) -> Router {
    let plane = Arc::new(AdminPlane {
        auth: AdminAuth::new(&gateway.config.admin, gateway.admin_token()),
        sessions: Sessions::new(std::time::Duration::from_secs(gateway.config.admin.session_seconds)),
        gw: gateway.clone(),
    });
    let guarded = |need: Need, router: Router<Arc<Gateway>>| {
        let plane = plane.clone();
        router.route_layer(middleware::from_fn(move |req: Request, next: Next| {
            let plane = plane.clone();
            async move { require(&plane, need, req, next).await }
        }))
    };
    let read = guarded(
        Need::Read,
        Router::new()
            .route("/admin/policy", get(api::policy))
            .route("/admin/replicas", get(api::replicas))
            .route("/admin/agents/{id}", get(api::agent_status))
            .route("/admin/tools", get(api::list_mcp_tools)),
    );
    let approvals = guarded(
        Need::ReadApprovals,
        Router::new()
            .route("/admin/approvals", get(api::list_approvals))
            .route("/admin/approvals/{id}", get(api::get_approval)),
    );
    let decide = guarded(
        Need::Decide,
        Router::new()
            .route("/admin/approvals/{id}/approve", post(api::approve))
            .route("/admin/approvals/{id}/deny", post(api::deny)),
    );
    let operate = guarded(
        Need::Operate,
        Router::new()
            .route("/admin/reload", post(api::reload))
            .route("/admin/audit/rotate", post(api::rotate_audit))
            .route(
                "/admin/agents/{id}/quarantine",
                post(api::quarantine).delete(api::release),
            )
            .route("/admin/tools/{name}/approve", post(api::approve_tool)),
    );
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(api::ready))
        .route("/metrics", get(api::render_metrics))
        .merge(read)
        .merge(approvals)
        .merge(decide)
        .merge(operate)
        .with_state(gateway)
        .merge(inbox::routes(plane))
        .fallback(
            |req: Request| async move { error_response(Code::NotFound, "No such admin endpoint.", &request_id(&req)) },
        )
}

fn request_id(req: &Request) -> Arc<str> {
    RequestId::of(req)
}

/// Authenticates the caller and checks `need`; the caller's [`Admin`] goes into the request's
/// extensions for the handler.
async fn require(plane: &AdminPlane, need: Need, mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    if !plane.auth.anyone() {
        return error_response(
            Code::Unauthenticated,
            "No admin identity is configured: set the variable named by `admin.token_env`, or `admin.people`, `admin.oidc` or `admin.auth_proxy`.",
            &id,
        );
    }
    let peer = req.extensions().get::<Source>().map(|s| s.0);
    let admin = match plane.auth.authenticate(req.headers(), peer).await {
        Ok(a) => a,
        Err(NotAuthenticated::Missing(why)) => return error_response(Code::Unauthenticated, why, &id),
        Err(NotAuthenticated::KeysUnavailable) => {
            return error_response(
                Code::Unavailable,
                "The identity provider's keys could not be fetched yet, so no admin token can be verified. Try again later.",
                &id,
            );
        }
    };
    if !need.allows(&admin) {
        let action = format!("{} {}", req.method(), req.uri().path());
        return refuse(&plane.gw, &admin, need.role(), &action, need.refusal(), None, &id).await;
    }
    req.extensions_mut().insert(admin);
    next.run(req).await
}

/// 403 `forbidden` for an authenticated caller, after its `admin_refused` event.
async fn refuse(
    gw: &Gateway,
    admin: &Admin,
    role: Role,
    action: &str,
    why: &str,
    approval_id: Option<&str>,
    request_id: &str,
) -> Response {
    tracing::warn!(by = %admin.name, action, request_id, "admin action refused: {why}");
    gw.audit
        .emit_or_log(&AdminRefused {
            by: admin.by(role),
            action,
            reason: why,
            approval_id,
            request_id,
        })
        .await;
    error_response(Code::Forbidden, why, request_id)
}
