//! The gateway: one tool call from credential to audited response, independent of the transport.
//! The HTTP handler (and later MCP) builds a [`CallRequest`] and sends back the [`CallResponse`].
//!
//! `call` always audits (pingora's logging phase): `process` decides and forwards using `?`
//! freely, and whatever it returns — allow, deny or failure — becomes exactly one event, written
//! before the response exists. If the event cannot be written the caller gets `unavailable`.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Value, json};

use crate::approval::{Approval, Approvals, Hold, Pin, Refused};
use crate::audit::{AuditError, AuditLog, PolicyEvent, RecordedArguments, Tokens, ToolCallEvent, UpstreamInfo};
use crate::config::{AuditArguments, ConfigError, ServerConfig};
use crate::mcp::upstream::{McpClient, RpcOutcome};
use crate::meters::Meters;
use crate::policy::content;
use crate::policy::history::{PastCall, hash_value};
use crate::policy::limits::estimate_tokens;
use crate::policy::tool::{DiscoveredTool, Target};
use crate::policy::{Code, Decision, ParseLimits, Policy, Reason, Stage, ToolCall, arguments};
use crate::state::State;
use crate::upstream::aws::{RoleError, Roles};
use crate::upstream::guardrail::{Guardrails, Source as GuardrailSource, Verdict as GuardrailVerdict};
use crate::upstream::{Inbound, Outbound, Upstream, UpstreamError};

/// A tool call as received, before anything is checked.
#[derive(Debug)]
pub struct CallRequest<'a> {
    pub request_id: &'a str,
    /// `request_id` as a header value, when the transport already made one (it is forwarded).
    pub request_id_header: Option<&'a HeaderValue>,
    /// Where the call came from (the connection's peer), for the audit event.
    pub source: Option<std::net::IpAddr>,
    pub caller: Caller<'a>,
    pub tool: &'a str,
    /// The body, or why the transport could not read it (too large, too slow).
    pub body: Result<Bytes, Reason>,
    pub session: Option<&'a str>,
    /// `X-Toolgate-Approval`: an approval id for a call a rule holds.
    pub approval: Option<&'a str>,
    pub traceparent: Option<&'a HeaderValue>,
    pub tracestate: Option<&'a HeaderValue>,
}

/// Who is calling, as the transport knows it.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// The `Authorization` header's value, if any: the call authenticates it.
    Credentials(Option<&'a str>),
    /// An agent the transport has authenticated already, with this gateway's policy: MCP
    /// checks every message's credentials before it reads the method, so a `tools/call` need
    /// not hash the key (or verify the JWT's signature) a second time. The agent must still be
    /// in the policy the call is decided by (a reload in between may have removed it).
    Agent(&'a str),
}

/// What to send back.
#[derive(Debug)]
pub struct CallResponse {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    pub decision: &'static str,
    /// `Retry-After` seconds, for 429s.
    pub retry_after: Option<u64>,
}

/// An error body, as every block answers: `{"error": {code, message, request_id, rule}}`.
pub fn error_body(reason: &Reason, request_id: &str) -> Bytes {
    let mut error = json!({
        "code": reason.code.as_str(),
        "message": reason.message,
        "request_id": request_id,
    });
    if !reason.rule.is_empty() {
        error["rule"] = Value::from(reason.rule.as_str());
    }
    let mut body = json!({ "error": error });
    if let Some(id) = &reason.approval_id {
        // Top level as well as inside `error`, as the contract shows: what to poll, and how to retry.
        body["approval_id"] = Value::from(id.as_str());
        body["status_url"] = Value::from(format!("/v1/approvals/{id}"));
        body["error"]["approval_id"] = Value::from(id.as_str());
        body["error"]["retry"] = Value::from(format!(
            "Once approved, send the identical call again with the header `X-Toolgate-Approval: {id}`."
        ));
    }
    Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
}

/// What `process` learned, for the audit event, whatever the outcome.
#[derive(Default)]
struct Record<'p> {
    /// Borrowed from the policy the call is decided under (held for the whole call): no write
    /// to the agent id's reference count, which every call of the agent shares.
    agent: Option<&'p str>,
    known_tool: bool,
    arguments: Option<RecordedArguments>,
    arguments_sha256: String,
    notes: Vec<Reason>,
    upstream: Option<UpstreamInfo>,
    decided_at: Option<Instant>,
    tokens: Option<Tokens>,
    /// The approval this call created (held) or used (passed).
    approval_id: Option<String>,
    would_deny: Vec<String>,
}

/// A policy file's size, modification time and identity (device, inode), for the watcher.
pub type FileStamp = (u64, Option<std::time::SystemTime>, Option<(u64, u64)>);

/// Why an operator's action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("the approval store failed: {0}")]
    Store(#[from] crate::approval::ApprovalError),
    /// The action's audit event could not be written, so it was not done: an action that
    /// lets agents do more (a release, an approval, a tool definition) is recorded before it
    /// takes effect.
    #[error("its audit event could not be written: {0}")]
    Unrecorded(#[from] AuditError),
}

/// Why a reload did not put a new policy in force (the last good one stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The new policy is valid, but its `policy_reloaded` event could not be written.
    #[error("policy {version} was not put in force: its audit event could not be written: {source}")]
    Unrecorded { version: String, source: AuditError },
}

/// What a quarantine did. It only closes, so it takes effect even when its event cannot be
/// written (`audited: false`; the failure is logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantined {
    /// False if the agent already was in quarantine.
    pub changed: bool,
    pub audited: bool,
}

/// Shared state of a running gateway.
pub struct Gateway {
    policy: ArcSwap<Policy>,
    policy_dir: Option<PathBuf>,
    pub config: ServerConfig,
    pub audit: AuditLog,
    /// Rate limits, budgets, denial counts, quarantines.
    pub state: State,
    upstream: Upstream,
    /// Calls held for a person's approval.
    pub approvals: Arc<Approvals>,
    webhook: Option<Webhook>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Held while a decision (an approval, a tool approval, a quarantine or a release) is
    /// recorded and carried out, so two decisions on the same thing cannot both be recorded,
    /// nor one undo another between its record and its effect.
    decisions: tokio::sync::Mutex<()>,
    /// Set by the demo only; `serve` reads the token from the environment or a file.
    admin_token: Option<String>,
    /// toolgate's own client to upstream MCP servers.
    mcp_client: McpClient,
    /// AWS role credentials for tools with `aws_role`.
    roles: Roles,
    /// Bedrock guardrail filters.
    guardrails: Guardrails,
    /// The tools upstream MCP servers listed at the last refresh.
    discovered: std::sync::Mutex<Vec<DiscoveredTool>>,
    /// Whether any discovered tool is marked changed: every call asks, almost always "no",
    /// and the answer needs no lock then (a lock both data-plane cores would write per call).
    /// Kept by [`Gateway::update_discovered`].
    any_changed_tool: std::sync::atomic::AtomicBool,
    /// Set when the MCP catalog changed: the next reload swaps the policy in even though the
    /// files (and so the version) are the same.
    force_reload: std::sync::atomic::AtomicBool,
    /// Set when a valid policy was not put in force because its event could not be written:
    /// the watcher tries again (see [`Gateway::take_retry_due`]).
    retry_due: std::sync::atomic::AtomicBool,
    /// Handles of the metrics every call updates.
    meters: Meters,
}

impl Gateway {
    pub fn new(
        config: ServerConfig,
        policy: Policy,
        policy_dir: Option<PathBuf>,
        audit: AuditLog,
        approvals: Approvals,
    ) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            policy_dir,
            webhook: config.approvals.webhook.as_ref().map(Webhook::new),
            mcp_client: McpClient::new(config.limits.max_response_bytes),
            roles: Roles::new(config.aws.as_ref().and_then(|a| a.region.clone())),
            guardrails: Guardrails::new(config.aws.as_ref().and_then(|a| a.region.clone())),
            config,
            audit,
            state: State::default(),
            upstream: Upstream::new(),
            approvals: Arc::new(approvals),
            reload_lock: tokio::sync::Mutex::new(()),
            decisions: tokio::sync::Mutex::new(()),
            admin_token: None,
            discovered: std::sync::Mutex::new(Vec::new()),
            any_changed_tool: std::sync::atomic::AtomicBool::new(false),
            force_reload: std::sync::atomic::AtomicBool::new(false),
            retry_due: std::sync::atomic::AtomicBool::new(false),
            meters: Meters::default(),
        }
    }

    /// Uses a fixed admin token (the demo's), instead of the configured source.
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_owned());
        self
    }

    /// The admin token in force, if any.
    pub fn admin_token(&self) -> Option<String> {
        self.admin_token.clone().or_else(|| self.config.admin.token())
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The policy in force, for a look within one call: a guard on this thread's arc-swap debt
    /// slot, not an `Arc` clone (whose count every core's calls would write).
    pub fn policy_now(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    pub fn parse_limits(&self) -> ParseLimits {
        ParseLimits {
            max_json_depth: self.config.limits.max_json_depth,
        }
    }

    /// A cheap summary of the files the policy is read from: the policy directory's `*.yaml`,
    /// `*.yml` and `*.cedar`, and the JWKS file, each with its size, modification time and
    /// identity, links followed (a Kubernetes ConfigMap swaps a link to a new directory, and
    /// `agents.yaml` is a link into it). The watcher reloads when it changes; other files in
    /// the directory (a log, an editor's swap file) do not count.
    pub fn policy_fingerprint(&self) -> Vec<(std::ffi::OsString, Option<FileStamp>)> {
        let Some(dir) = &self.policy_dir else { return Vec::new() };
        let stamp = |path: &std::path::Path| {
            // A file that cannot be read is a change too (the next load reports it).
            let m = std::fs::metadata(path).ok()?;
            Some((m.len(), m.modified().ok(), crate::file_id(&m)))
        };
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| crate::policy::is_policy_file(p))
            .map(|p| (p.file_name().unwrap_or_default().to_owned(), stamp(&p)))
            .collect();
        out.sort();
        if let Some(jwks) = &self.policy_now().jwks_file {
            out.push((jwks.clone().into_os_string(), stamp(jwks)));
        }
        out
    }

    /// Whether a reload is due again because the last one could not be recorded (and from
    /// now on, not: the caller tries it).
    pub fn take_retry_due(&self) -> bool {
        self.retry_due.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Reloads policies from disk. On failure the last good policy stays in force; either way
    /// the outcome is audited. A new policy takes effect only once its `policy_reloaded` event
    /// is written (`by`: the operator who asked, if one did).
    pub async fn reload(&self, trigger: &str, by: Option<&str>) -> Result<String, ReloadError> {
        let _guard = self.reload_lock.lock().await;
        // This attempt stands for any retry that was due.
        self.retry_due.store(false, std::sync::atomic::Ordering::SeqCst);
        let Some(dir) = self.policy_dir.clone() else {
            return Ok(self.policy().version.clone());
        };
        let discovered = self.discovered.lock().expect("discovered lock").clone();
        let loaded = tokio::task::spawn_blocking(move || Policy::load_with(&dir, &discovered))
            .await
            .expect("policy loading does not panic");
        let previous = self.policy();
        match loaded {
            Ok(policy) => {
                let version = policy.version.clone();
                let forced = self.force_reload.swap(false, std::sync::atomic::Ordering::SeqCst);
                let changed = version != previous.version;
                if changed || forced {
                    let event = PolicyEvent {
                        ts: crate::audit::now(),
                        event: "policy_reloaded",
                        policy_version: &version,
                        previous_version: Some(&previous.version),
                        errors: &[],
                        trigger,
                        by,
                    };
                    if let Err(source) = self.audit.emit(&event).await {
                        // Asked again later (the watcher retries; a forced rebuild stays due).
                        if forced {
                            self.force_reload.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        self.retry_due.store(true, std::sync::atomic::Ordering::SeqCst);
                        tracing::error!(version = %version, kept = %previous.version, trigger, "policy not reloaded: its audit event could not be written: {source}");
                        metrics::counter!("toolgate_policy_reloads_total", "result" => "unrecorded").increment(1);
                        return Err(ReloadError::Unrecorded { version, source });
                    }
                    self.policy.store(Arc::new(policy));
                    tracing::info!(version = %version, previous = %previous.version, trigger, "policy reloaded");
                    metrics::counter!("toolgate_policy_reloads_total", "result" => "ok").increment(1);
                }
                Ok(version)
            }
            Err(err) => {
                let errors: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
                tracing::error!(kept = %previous.version, trigger, "policy reload failed, keeping the last good policy:\n{err}");
                metrics::counter!("toolgate_policy_reloads_total", "result" => "error").increment(1);
                self.audit
                    .emit_or_log(
                        "policy_reload_failed",
                        &PolicyEvent {
                            ts: crate::audit::now(),
                            event: "policy_reload_failed",
                            policy_version: &previous.version,
                            previous_version: None,
                            errors: &errors,
                            trigger,
                            by,
                        },
                    )
                    .await;
                Err(err.into())
            }
        }
    }

    /// Handles one call end to end. Never fails: every outcome is a response and an event.
    ///
    /// The pipeline's state machine is several KB; boxing it here keeps the future that axum's
    /// layers box and move in turn down to a pointer (measured: the unboxed one cost ≈13k
    /// instructions of `memcpy` per call, nearly a third of a bare proxy's per-request work).
    pub async fn call(&self, req: CallRequest<'_>) -> CallResponse {
        Box::pin(self.call_inner(req)).await
    }

    async fn call_inner(&self, req: CallRequest<'_>) -> CallResponse {
        let started = Instant::now();
        // A guard, not an `Arc` clone: the clone and its drop are two writes per call to the
        // policy's reference count, which every core's calls share. The guard borrows one of
        // this thread's debt slots instead (arc-swap falls back to a clone when they run out).
        let policy = self.policy.load();
        let mut rec = Record::default();
        let result = self.process(&policy, &req, &mut rec).await;

        let retry_after = result.as_ref().err().and_then(|r| r.retry_after);
        // Evaluation hashes the canonical arguments; a call refused before it gets the raw body's.
        if rec.arguments_sha256.is_empty()
            && let Ok(body) = &req.body
        {
            rec.arguments_sha256 = arguments::sha256_hex(body);
        }
        let (status, content_type, body, decision, reasons) = match result {
            Ok((inbound, body)) => (
                inbound.status,
                inbound.content_type,
                body,
                Decision::Allow,
                rec.notes.clone(),
            ),
            Err(reason) => {
                let body = error_body(&reason, req.request_id);
                let mut reasons = rec.notes.clone();
                reasons.push(reason.clone());
                let ct = Some(HeaderValue::from_static("application/json"));
                (reason.code.http_status(), ct, body, Decision::Deny(reason), reasons)
            }
        };
        let code = match &decision {
            Decision::Deny(r) => Some(r.code),
            Decision::Allow => None,
        };
        // Failures after an allow (upstream down) keep the decision `allow`: the policy admitted
        // the call; the code says what went wrong.
        let decision_str = match (&decision, rec.upstream.is_some(), code) {
            (Decision::Deny(_), true, Some(Code::UpstreamError | Code::UpstreamTimeout)) => "allow",
            (d, _, _) => d.as_str(),
        };
        let event = ToolCallEvent {
            ts: crate::audit::now(),
            event: "tool_call",
            request_id: req.request_id,
            source: req.source,
            session: req.session.filter(|s| is_valid_session(s)),
            agent: rec.agent,
            tool: Some(truncate(req.tool, 256)),
            decision: decision_str,
            code: code.map(Code::as_str),
            reasons: &reasons,
            arguments: rec.arguments.take(),
            arguments_sha256: &rec.arguments_sha256,
            upstream: rec.upstream.clone(),
            tokens: rec.tokens,
            approval_id: rec.approval_id.as_deref(),
            would_deny: &rec.would_deny,
            duration_ms: crate::audit::millis(started.elapsed()),
            policy_version: &policy.version,
        };
        // A refusal that names no agent, beyond its source's allowance, is counted for a summary
        // instead (`audit::unknown`). Shed calls are the gateway's doing, not the caller's.
        // (Only callers that presented credentials: one MCP authenticated already is an agent
        // even if a reload removed it since.)
        let summarized = rec.agent.is_none()
            && matches!(req.caller, Caller::Credentials(_))
            && code.is_some_and(|c| c != Code::Unavailable && !self.audit.admit_unknown_caller(req.source, c.as_str()));
        if !summarized && let Err(e) = self.audit.emit_line(&event.to_line()).await {
            tracing::error!(
                request_id = req.request_id,
                "audit write failed, refusing the call: {e}"
            );
            let reason = Reason::new(
                Code::Unavailable,
                Stage::Audit,
                "audit",
                "The call could not be recorded in the audit log, so it was refused. Try again later.",
            );
            return CallResponse {
                status: 503,
                content_type: Some(HeaderValue::from_static("application/json")),
                body: error_body(&reason, req.request_id),
                decision: "deny",
                retry_after: None,
            };
        }
        if let (Decision::Deny(reason), Some(agent)) = (&decision, &rec.agent) {
            Box::pin(self.watch_for_anomalies(&policy, agent, reason, req.request_id)).await;
        }

        self.meters.call(
            rec.agent.unwrap_or("(unauthenticated)"),
            if rec.known_tool { req.tool } else { "(unknown)" },
            decision_str,
            code.map_or("ok", Code::as_str),
        );
        if let Some(at) = rec.decided_at {
            self.meters.decision_duration(at.duration_since(started).as_secs_f64());
        }
        CallResponse {
            status,
            content_type,
            body,
            decision: decision_str,
            retry_after,
        }
    }

    /// Counts the agent's denials by kind; crossing a threshold writes an `anomaly` event and,
    /// if the policy says so, quarantines the agent.
    async fn watch_for_anomalies(&self, policy: &Policy, agent: &str, reason: &Reason, request_id: &str) {
        // Output blocks are the tool's doing, not the agent's.
        if reason.stage == Stage::Output {
            return;
        }
        let kind = reason.code.as_str();
        let anomaly = &policy.anomaly;
        let Some(threshold) = anomaly.threshold(kind) else {
            return;
        };
        let Some(count) = self
            .state
            .record_denial(agent, kind, anomaly.window(), threshold as usize)
        else {
            return;
        };
        if self.state.quarantined(agent).is_some() {
            return;
        }
        let action = if anomaly.quarantine { "quarantine" } else { "none" };
        metrics::counter!("toolgate_anomalies_total", "agent" => agent.to_owned(), "kind" => kind).increment(1);
        tracing::warn!(agent, kind, count, "anomaly: threshold crossed");
        self.audit.emit_or_log("anomaly", &json!({
            "ts": crate::audit::now(), "event": "anomaly", "agent": agent, "kind": kind, "count": count,
            "threshold": threshold, "window_seconds": anomaly.window_seconds, "action": action, "request_id": request_id,
        })).await;
        if anomaly.quarantine {
            let duration = (anomaly.quarantine_seconds > 0).then(|| Duration::from_secs(anomaly.quarantine_seconds));
            let why = format!("{count} {kind} denials within {} s", anomaly.window_seconds);
            let _ = self.quarantine(agent, duration, "anomaly", &why).await;
        }
    }

    /// Quarantines an agent and audits it (see [`Quarantined`]).
    pub async fn quarantine(&self, agent: &str, duration: Option<Duration>, by: &str, reason: &str) -> Quarantined {
        // Not while a release is being recorded: it would then remove this quarantine, not
        // the one its event names.
        let _one = self.decisions.lock().await;
        if !self.state.quarantine(agent, duration, by, reason) {
            return Quarantined {
                changed: false,
                audited: true,
            };
        }
        let q = self.state.quarantined(agent);
        metrics::gauge!("toolgate_agent_quarantined", "agent" => agent.to_owned()).set(1.0);
        tracing::warn!(agent, by, reason, "agent quarantined");
        let event = json!({
            "ts": crate::audit::now(), "event": "agent_quarantined", "agent": agent, "by": by, "reason": reason,
            "until": q.and_then(|q| q.until),
        });
        let audited = match self.audit.emit(&event).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    agent,
                    by,
                    "the quarantine is in force, but its audit event could not be written: {e}"
                );
                false
            }
        };
        Quarantined { changed: true, audited }
    }

    /// Releases an agent, once its `agent_released` event (with who did it) is written.
    /// `Ok(false)` if it was not quarantined; an error, and no release, if the event could not
    /// be written.
    pub async fn release(&self, agent: &str, by: &str, comment: &str) -> Result<bool, AuditError> {
        let _one = self.decisions.lock().await;
        let Some(q) = self.state.quarantined(agent) else {
            return Ok(false);
        };
        self.audit
            .emit(&json!({
                "ts": crate::audit::now(), "event": "agent_released", "agent": agent, "by": by, "comment": comment,
                "quarantined_since": q.since, "quarantined_by": q.by,
            }))
            .await?;
        self.state.release(agent);
        metrics::gauge!("toolgate_agent_quarantined", "agent" => agent.to_owned()).set(0.0);
        tracing::info!(agent, by, "agent released from quarantine");
        Ok(true)
    }

    async fn process<'p>(
        &self,
        policy: &'p Policy,
        req: &CallRequest<'_>,
        rec: &mut Record<'p>,
    ) -> Result<(Inbound, Bytes), Reason> {
        let agent: &'p str = match req.caller {
            Caller::Credentials(authorization) => policy.auth.authenticate(authorization)?,
            Caller::Agent(id) => policy
                .agents
                .get_key_value(id)
                .map(|(id, _)| id.as_str())
                .ok_or_else(|| {
                    let message = "The agent is no longer in the policy.";
                    Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", message)
                })?,
        };
        rec.agent = Some(agent);
        if req.session.is_some_and(|s| !is_valid_session(s)) {
            return Err(Reason::new(
                Code::InvalidRequest,
                Stage::Request,
                "session",
                "X-Toolgate-Session must be 1 to 128 characters: letters, digits, `-`, `_`, `.`, `:`.",
            ));
        }
        if let Some(q) = self.state.quarantined(agent) {
            let until = q.until.map_or("until an admin releases it".to_owned(), |u| {
                format!("until {}", crate::audit::format_unix(u))
            });
            return Err(Reason::new(
                Code::AgentQuarantined,
                Stage::Quarantine,
                "quarantine",
                format!(
                    "Agent '{agent}' is quarantined ({}), {until}. Ask an operator to review it: DELETE /admin/agents/{agent}/quarantine.",
                    q.reason
                ),
            ));
        }
        if !self.audit.is_healthy() {
            // The last write failed: refuse before forwarding anything that might go unrecorded.
            // This call's own event is the probe that heals the sink.
            return Err(Reason::new(
                Code::Unavailable,
                Stage::Audit,
                "audit",
                "The audit log is unavailable, so calls are refused. Try again later.",
            ));
        }
        let body = req.body.clone()?;
        let call = ToolCall {
            agent,
            tool: req.tool,
            body: &body,
            session: req.session,
            now: std::time::SystemTime::now(),
        };
        let call_ms = call
            .now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // A pinned MCP tool whose definition changed is refused here too, whatever policy is in
        // force: if the policy rebuilt with the change failed to load, the last good policy
        // would still list the tool as approved.
        if self.is_changed_tool(req.tool) && policy.is_allowed(agent, req.tool) {
            return Err(Reason::new(
                Code::ToolChanged,
                Stage::Allowlist,
                "tool-pinning",
                format!(
                    "The definition of tool '{}' changed on its MCP server since it was approved; it is blocked until an operator reviews it (POST /admin/tools/{}/approve).",
                    req.tool, req.tool
                ),
            ));
        }
        // A call whose rules read history, or that history records, is decided in its agent's
        // turn, from evaluation until it is recorded (or refused): concurrent calls each see
        // the ones decided before them, so together they cannot pass a count rule.
        let touches_history = policy.tools.get(req.tool).is_some_and(|t| t.touches_history);
        let history_turn = if touches_history {
            Some(self.state.history_turn(agent).await)
        } else {
            None
        };
        let eval = policy.evaluate(&call, self.parse_limits(), &self.state);
        rec.decided_at = Some(Instant::now());
        rec.known_tool = eval.tool.is_some();
        rec.arguments_sha256 = eval.arguments_sha256;
        rec.notes = eval.notes;
        // Redacted by every detector: what audit events (in `redacted` mode), approvers and the
        // approval webhook see, whatever the audit mode. When evaluation's content walk found
        // nothing for the redactor, that is the body to forward as it is: no copy, no second pass.
        let body = eval.body.map(Bytes::from);
        let redacted_args = || {
            let mut args = eval.arguments.clone();
            if let Some(a) = args.as_mut().filter(|_| !eval.audit_clean) {
                content::apply(&[&content::AUDIT_REDACTOR], a);
            }
            args
        };
        rec.would_deny = eval.would_deny;
        rec.arguments = match (self.config.audit.arguments, &body) {
            (AuditArguments::Shape, _) => eval
                .arguments
                .as_ref()
                .map(|a| RecordedArguments::Value(arguments::shape(a))),
            (AuditArguments::Redacted, Some(body)) if eval.audit_clean => Some(RecordedArguments::Json(body.clone())),
            (AuditArguments::Redacted, _) => redacted_args().map(RecordedArguments::Value),
        };
        // A held call with an approval presented passes once the limits admit it; the approval
        // is spent only then, so a 429 does not use it up.
        let mut approved: Option<(HoldOwned, String)> = None;
        if let Decision::Deny(reason) = eval.decision {
            if reason.code != Code::ApprovalRequired || eval.approvals.is_empty() {
                return Err(reason);
            }
            let mut groups: Vec<&str> = eval.approvals.iter().map(|(_, g)| g.as_str()).collect();
            groups.sort_unstable();
            groups.dedup();
            let held = HoldOwned {
                agent: agent.to_string(),
                tool: req.tool.to_owned(),
                rule: reason.rule.clone(),
                rules: eval.approvals.iter().map(|(r, _)| r.clone()).collect(),
                group: groups.join(", "),
                reason: reason.message.clone(),
                arguments: redacted_args(),
                arguments_sha256: rec.arguments_sha256.clone(),
                request_id: req.request_id.to_owned(),
                session: req.session.map(str::to_owned),
            };
            match req.approval {
                Some(id) => approved = Some((held, id.to_owned())),
                None => return Err(Box::pin(self.hold(held, reason, rec)).await),
            }
        }
        let tool = eval.tool.expect("an allowed call has a tool");
        let url = eval.url.as_deref().unwrap_or("");
        let mut args = eval
            .arguments
            .as_ref()
            .and_then(Value::as_object)
            .expect("allowed arguments are an object");
        let mut body_bytes = body.unwrap_or_default();

        // Bedrock guardrail filters on the arguments (after every local check: a call the
        // gateway refuses anyway costs no guardrail request).
        let masked_args;
        if let Some(masked) = self.input_guardrails(policy, tool, &body_bytes, rec).await? {
            rec.arguments = Some(RecordedArguments::Value(match self.config.audit.arguments {
                AuditArguments::Shape => arguments::shape(&Value::Object(masked.clone())),
                AuditArguments::Redacted => {
                    let mut v = Value::Object(masked.clone());
                    content::apply(&[&content::AUDIT_REDACTOR], &mut v);
                    v
                }
            }));
            body_bytes = Bytes::from(arguments::canonical(&masked));
            masked_args = masked;
            args = &masked_args;
        }

        // Stateful checks, after every static one: denied calls cost nothing. The budget is
        // reserved first (atomically), then rate allowances are taken, the tighter per-tool one
        // first; a refusal gives the reservation back.
        let input_tokens = estimate_tokens(body_bytes.len());
        let limits = &policy.agents.get(agent).expect("evaluated agents exist").limits;
        let reservation = match limits.tokens_per_hour {
            Some(limit) => Some(self.state.reserve_tokens(agent, limit.get(), input_tokens, call_ms / 1000).map_err(|wait| {
                Reason::new(Code::BudgetExceeded, Stage::Limits, "tokens_per_hour",
                    format!("This call ({input_tokens} tokens, plus what its answer is expected to add) would exceed agent '{agent}''s budget of {limit} tokens for this hour; it resets in {} s.", wait.as_secs()))
                    .retry_after(wait.as_secs())
            })?),
            None => None,
        };
        let give_back = |reservation: Option<crate::state::Reservation>| {
            if let Some(r) = reservation {
                self.state.release_tokens(r);
            }
        };
        let rate_keys = [
            limits.tools.get(&tool.name).map(|t| {
                (
                    Cow::Owned(format!("{agent}|{}", tool.name)),
                    t.calls_per_minute,
                    "tool calls_per_minute",
                )
            }),
            limits
                .calls_per_minute
                .map(|n| (Cow::Borrowed(&*agent), n, "calls_per_minute")),
        ];
        for (key, per_minute, rule) in rate_keys.into_iter().flatten() {
            if let Err(wait) = self.state.take_rate(&key, per_minute) {
                give_back(reservation);
                let secs = wait.as_secs_f64().ceil() as u64;
                return Err(Reason::new(
                    Code::RateLimited,
                    Stage::Limits,
                    rule,
                    format!(
                        "Agent '{agent}' is over its limit of {per_minute} calls per minute{}. Retry in {secs} s.",
                        if rule.starts_with("tool") {
                            format!(" for '{}'", tool.name)
                        } else {
                            String::new()
                        }
                    ),
                )
                .retry_after(secs));
            }
        }
        if let Some((held, id)) = approved
            && let Err(reason) = Box::pin(self.use_approval(held, &id, rec)).await
        {
            give_back(reservation);
            return Err(reason);
        }

        // History records the call when it is decided, not when the tool answers, so calls in
        // flight count for the rules of the calls that follow; a call that fails is taken back.
        let past = policy.recorded.get(&tool.name).map(|fields| PastCall {
            tool: tool.name.as_str().into(),
            at_ms: call_ms,
            session: req.session.map(Into::into),
            values: fields
                .iter()
                .filter_map(|f| args.get(&**f).map(|v| (f.clone(), hash_value(v))))
                .collect(),
        });
        if let Some(p) = &past {
            self.state.record_call(agent, p.clone(), policy.history_retention);
        }
        drop(history_turn);
        let forwarded = self.forward(policy, req, rec, agent, tool, url, args, body_bytes).await;
        let forwarded = match forwarded {
            Ok((inbound, body)) => self
                .output_guardrails(policy, tool, body, rec)
                .await
                .map(|b| (inbound, b)),
            Err(e) => Err(e),
        };
        if let Some(p) = past {
            let succeeded = forwarded
                .as_ref()
                .is_ok_and(|(inbound, body)| (200..300).contains(&inbound.status) && !is_mcp_error_result(tool, body));
            if !succeeded {
                self.state.forget_call(agent, &p);
            }
        }
        let output_tokens = forwarded.as_ref().map_or(0, |(_, body)| estimate_tokens(body.len()));
        rec.tokens = Some(Tokens {
            input: input_tokens,
            output: output_tokens,
        });
        if let Some(r) = reservation {
            self.state.settle_tokens(r, input_tokens, output_tokens);
        }
        forwarded
    }

    /// The Bedrock guardrail filters among `filters` over `body` (`source` says which side of
    /// the call it is): `Some(masked text)` if one anonymised it. Nothing is allocated for a
    /// tool without guardrail filters.
    async fn guardrails(
        &self,
        policy: &Policy,
        filters: &[usize],
        source: GuardrailSource,
        what: &str,
        body: &[u8],
        rec: &mut Record<'_>,
    ) -> Result<Option<String>, Reason> {
        let stage = match source {
            GuardrailSource::Input => Stage::Content,
            GuardrailSource::Output => Stage::Output,
        };
        let mut text: Option<String> = None;
        for f in filters.iter().map(|&i| &policy.filters[i]) {
            let Some(g) = &f.guardrail else { continue };
            let current = text
                .clone()
                .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
            let reason = |code: Code, message: String| Reason::new(code, stage, f.name.clone(), message);
            match Box::pin(self.guardrails.apply(g, source, &current)).await {
                Ok(GuardrailVerdict::Pass) => {}
                Ok(GuardrailVerdict::Masked { text: t, summary }) => {
                    rec.notes.push(reason(
                        Code::ContentBlocked,
                        format!("Guardrail filter '{}' anonymised {what} ({summary}).", f.name),
                    ));
                    text = Some(t);
                }
                Ok(GuardrailVerdict::Blocked { summary }) => {
                    return Err(reason(
                        Code::ContentBlocked,
                        format!("Guardrail filter '{}' blocked {what} ({summary}).", f.name),
                    ));
                }
                Err(e) => {
                    tracing::warn!(filter = %f.name, "guardrail failed: {e}");
                    return Err(reason(
                        Code::Unavailable,
                        format!(
                            "Guardrail filter '{}' could not check {what}, so the call was refused. Try again later.",
                            f.name
                        ),
                    ));
                }
            }
        }
        Ok(text)
    }

    /// Input guardrails over the arguments: `Some(masked)` if one anonymised them.
    async fn input_guardrails(
        &self,
        policy: &Policy,
        tool: &crate::policy::tool::Tool,
        body: &[u8],
        rec: &mut Record<'_>,
    ) -> Result<Option<serde_json::Map<String, Value>>, Reason> {
        let masked = self
            .guardrails(
                policy,
                &tool.input_filters,
                GuardrailSource::Input,
                "the arguments",
                body,
                rec,
            )
            .await?;
        match masked.map(|t| serde_json::from_str::<Value>(&t)) {
            None => Ok(None),
            Some(Ok(Value::Object(m))) => Ok(Some(m)),
            Some(_) => Err(Reason::new(
                Code::ContentBlocked,
                Stage::Content,
                "guardrail",
                "A guardrail anonymised the arguments into something that is no longer a JSON object, so the call was refused.",
            )),
        }
    }

    /// Output guardrails over the response (the tool did run).
    async fn output_guardrails(
        &self,
        policy: &Policy,
        tool: &crate::policy::tool::Tool,
        body: Bytes,
        rec: &mut Record<'_>,
    ) -> Result<Bytes, Reason> {
        if tool
            .output_filters
            .iter()
            .all(|&i| policy.filters[i].guardrail.is_none())
        {
            return Ok(body);
        }
        let what = format!("the response of tool '{}'", tool.name);
        let masked = self
            .guardrails(policy, &tool.output_filters, GuardrailSource::Output, &what, &body, rec)
            .await?;
        Ok(masked.map_or(body, Bytes::from))
    }

    /// Sets `toolgate_budget_remaining_tokens{agent}` for every agent with an hourly budget,
    /// as of now: called when `/metrics` is scraped, not on every call (a gauge written per
    /// call is a line both data-plane cores write, and it went stale when an hour's window
    /// reset with no call to update it).
    pub fn report_budgets(&self) {
        let policy = self.policy.load();
        for (id, agent) in &policy.agents {
            if let Some(limit) = agent.limits.tokens_per_hour {
                let left = self.state.budget(id, limit.get()).remaining;
                self.meters.budget_remaining(id, left as f64);
            }
        }
    }

    /// Whether an upstream MCP tool is currently marked as changed since its pin.
    fn is_changed_tool(&self, name: &str) -> bool {
        if !self.any_changed_tool.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        self.discovered
            .lock()
            .expect("discovered lock")
            .iter()
            .any(|d| d.changed && d.exposed_name() == name)
    }

    /// Changes the discovered tools, and whether any is marked changed, under one lock.
    fn update_discovered(&self, change: impl FnOnce(&mut Vec<DiscoveredTool>)) {
        let mut discovered = self.discovered.lock().expect("discovered lock");
        change(&mut discovered);
        self.any_changed_tool.store(
            discovered.iter().any(|d| d.changed),
            std::sync::atomic::Ordering::Release,
        );
    }

    fn store_failed(request_id: &str, e: crate::approval::ApprovalError) -> Reason {
        tracing::error!(request_id, "approval store failed: {e}");
        Reason::new(
            Code::Unavailable,
            Stage::Approval,
            "approval",
            "The approval store is unavailable, so the call was refused. Try again later.",
        )
    }

    /// Spends the approval `id` on this exact call (checked and marked used in one transaction).
    async fn use_approval(&self, held: HoldOwned, id: &str, rec: &mut Record<'_>) -> Result<(), Reason> {
        let now = crate::state::unix_now();
        let request_id = held.request_id.clone();
        let rule = held.rule.clone();
        let (store, id) = (self.approvals.clone(), id.to_owned());
        let outcome = tokio::task::spawn_blocking(move || store.consume(&id, &held.as_hold(), now))
            .await
            .expect("the approval store does not panic")
            .map_err(|e| Self::store_failed(&request_id, e))?;
        match outcome {
            Ok(approval) => {
                rec.approval_id = Some(approval.id);
                Ok(())
            }
            Err(Refused(why)) => Err(Reason::new(
                Code::ApprovalDenied,
                Stage::Approval,
                rule,
                format!(
                    "The approval presented cannot be used: {why}. Send the call without `X-Toolgate-Approval` to request a new approval."
                ),
            )),
        }
    }

    /// Holds a call for approval (or finds the pending approval for this exact call) and tells
    /// the approvers; the reason for the 202.
    async fn hold(&self, held: HoldOwned, reason: Reason, rec: &mut Record<'_>) -> Reason {
        let now = crate::state::unix_now();
        let request_id = held.request_id.clone();
        let store = self.approvals.clone();
        let outcome = tokio::task::spawn_blocking(move || store.request(held.as_hold(), now))
            .await
            .expect("the approval store does not panic");
        let (approval, new) = match outcome {
            Ok(Ok(found)) => found,
            Ok(Err(crate::approval::TooMany)) => {
                return Reason::new(
                    Code::RateLimited,
                    Stage::Approval,
                    reason.rule,
                    format!(
                        "This agent already has {} approvals pending; wait for them to be decided before asking for more.",
                        crate::approval::MAX_PENDING_PER_AGENT
                    ),
                )
                .retry_after(60);
            }
            Err(e) => return Self::store_failed(&request_id, e),
        };
        rec.approval_id = Some(approval.id.clone());
        if new {
            metrics::counter!("toolgate_approvals_requested_total", "tool" => approval.tool.clone()).increment(1);
            if let Some(hook) = &self.webhook {
                hook.notify(&approval);
            }
        }
        let mut reason = reason;
        reason.message = format!(
            "{} The call is held for approval by '{}' (approval {}); poll its status_url, then send the identical call again with `X-Toolgate-Approval: {}`.",
            reason.message, approval.group, approval.id, approval.id
        );
        reason.approval_id = Some(approval.id);
        reason
    }

    /// The tools upstream MCP servers listed at the last refresh.
    pub fn discovered_tools(&self) -> Vec<DiscoveredTool> {
        self.discovered.lock().expect("discovered lock").clone()
    }

    /// Asks every upstream MCP server for its tools, checks each definition against its pin
    /// (pinning what is seen for the first time), and rebuilds the policy if anything changed.
    /// A server that cannot be reached keeps the tools it had.
    pub async fn refresh_mcp(&self, trigger: &str) {
        let policy = self.policy();
        if policy.mcp_servers.is_empty() && self.discovered.lock().expect("discovered lock").is_empty() {
            return;
        }
        let previous = self.discovered_tools();
        let timeout = Duration::from_millis(self.config.limits.upstream_timeout_ms);
        let mut found = Vec::new();
        for server in policy.mcp_servers.values() {
            // Discovery runs as toolgate itself (agent `toolgate`), under the server's role if any.
            let signing_parts = match &server.aws_role {
                None => None,
                Some(role) => match (
                    self.roles.credentials(role, "toolgate", &server.name, trigger).await,
                    self.roles.region_for(role).await,
                ) {
                    (Ok(c), Some(region)) => Some((c, region, role.sign.clone())),
                    (creds, _) => {
                        tracing::warn!(server = %server.name, "no AWS credentials to ask the MCP server for its tools: {:?}", creds.err());
                        found.extend(previous.iter().filter(|d| d.server == server.name).cloned());
                        continue;
                    }
                },
            };
            let signing = signing_parts
                .as_ref()
                .map(|(credentials, region, service)| crate::upstream::Signing {
                    credentials,
                    region,
                    service,
                });
            match self
                .mcp_client
                .list_tools(server, server.timeout.unwrap_or(timeout), signing.as_ref())
                .await
            {
                Ok(tools) => {
                    for t in tools {
                        let Some(name) = t.get("name").and_then(Value::as_str) else {
                            continue;
                        };
                        found.push(DiscoveredTool {
                            server: server.name.clone(),
                            tool: name.to_owned(),
                            description: t.get("description").and_then(Value::as_str).unwrap_or("").to_owned(),
                            input_schema: t
                                .get("inputSchema")
                                .cloned()
                                .unwrap_or_else(|| json!({"type": "object"})),
                            changed: false,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %server.name, "MCP server tools/list failed, keeping its last known tools: {e}");
                    found.extend(previous.iter().filter(|d| d.server == server.name).cloned());
                }
            }
        }
        for d in &mut found {
            let name = d.exposed_name();
            let sha = d.definition_sha256();
            let (store, n) = (self.approvals.clone(), name.clone());
            let pin = match tokio::task::spawn_blocking(move || store.pin(&n))
                .await
                .expect("no panic")
            {
                Ok(p) => p,
                Err(e) => {
                    // Without the pin store a definition cannot be checked: hide the tool.
                    tracing::error!(tool = %name, "cannot read the tool pin: {e}");
                    d.changed = true;
                    continue;
                }
            };
            match pin {
                Some(p) if p.sha256 == sha => {}
                Some(p) => {
                    d.changed = true;
                    let already = previous
                        .iter()
                        .any(|o| o.exposed_name() == name && o.changed && o.definition_sha256() == sha);
                    if !already {
                        tracing::warn!(tool = %name, "an upstream MCP tool's definition changed; blocked until approved");
                        metrics::counter!("toolgate_tool_definition_changes_total", "tool" => name.clone())
                            .increment(1);
                        self.audit
                            .emit_or_log(
                                "tool_definition_changed",
                                &json!({
                                    "ts": crate::audit::now(), "event": "tool_definition_changed", "tool": name,
                                    "server": d.server, "pinned_sha256": p.sha256, "seen_sha256": sha,
                                    "description_changed": p.description != d.description,
                                    "schema_changed": p.input_schema != d.input_schema, "trigger": trigger,
                                }),
                            )
                            .await;
                    }
                }
                None => {
                    let pin = Pin {
                        sha256: sha.clone(),
                        description: d.description.clone(),
                        input_schema: d.input_schema.clone(),
                        pinned_at: crate::state::unix_now(),
                        pinned_by: "first-seen".to_owned(),
                    };
                    let (store, n, p) = (self.approvals.clone(), name.clone(), pin);
                    if let Err(e) = tokio::task::spawn_blocking(move || store.set_pin(&n, &p))
                        .await
                        .expect("no panic")
                    {
                        tracing::error!(tool = %name, "cannot pin the tool: {e}");
                        d.changed = true;
                        continue;
                    }
                    self.audit
                        .emit_or_log(
                            "tool_pinned",
                            &json!({
                                "ts": crate::audit::now(), "event": "tool_pinned", "tool": name, "server": d.server,
                                "sha256": sha, "by": "first-seen",
                            }),
                        )
                        .await;
                }
            }
        }
        found.sort_by_key(DiscoveredTool::exposed_name);
        if found != previous {
            self.update_discovered(|d| *d = found);
            let _ = self.reload_now(trigger).await;
        }
    }

    /// Approves an upstream MCP tool's definition — the one with hash `reviewed`, which must be
    /// the current one (`Err(Some(current))` otherwise): it is pinned, visible and callable.
    /// The `tool_approved` event is written first; if it cannot be, nothing changes.
    pub async fn approve_tool(
        &self,
        name: &str,
        reviewed: &str,
        by: &str,
        comment: &str,
    ) -> Result<Result<DiscoveredTool, Option<String>>, ActionError> {
        let _one = self.decisions.lock().await;
        let Some(tool) = self.discovered_tools().into_iter().find(|d| d.exposed_name() == name) else {
            return Ok(Err(None));
        };
        let sha = tool.definition_sha256();
        if sha != reviewed {
            return Ok(Err(Some(sha)));
        }
        self.audit
            .emit(&json!({
                "ts": crate::audit::now(), "event": "tool_approved", "tool": name, "server": tool.server,
                "sha256": sha, "by": by, "comment": comment,
            }))
            .await?;
        let pin = Pin {
            sha256: sha.clone(),
            description: tool.description.clone(),
            input_schema: tool.input_schema.clone(),
            pinned_at: crate::state::unix_now(),
            pinned_by: by.to_owned(),
        };
        let (store, n) = (self.approvals.clone(), name.to_owned());
        let pinned = tokio::task::spawn_blocking(move || store.set_pin(&n, &pin))
            .await
            .expect("no panic");
        if let Err(e) = &pinned {
            self.not_done("tool_approved", json!({"tool": name}), e).await;
        }
        pinned?;
        self.update_discovered(|discovered| {
            for d in discovered.iter_mut() {
                if d.exposed_name() == name && d.definition_sha256() == sha {
                    d.changed = false;
                }
            }
        });
        // The decision is made; the rebuild (retried by the watcher if it cannot be recorded)
        // need not hold up other decisions, or an anomaly's quarantine.
        drop(_one);
        let _ = self.reload_now("tool_approved").await;
        Ok(Ok(DiscoveredTool { changed: false, ..tool }))
    }

    /// Records that an action whose event was written did not take effect after all (its
    /// store failed): `action_not_done`, naming the event it takes back.
    async fn not_done(&self, event: &str, mut about: Value, error: &crate::approval::ApprovalError) {
        tracing::error!(event, "{event} was recorded but not carried out: {error}");
        about["ts"] = json!(crate::audit::now());
        about["event"] = json!("action_not_done");
        about["recorded_as"] = json!(event);
        about["error"] = json!(error.to_string());
        self.audit.emit_or_log("action_not_done", &about).await;
    }

    /// Rebuilds the policy with the current MCP catalog, whether or not the files changed.
    async fn reload_now(&self, trigger: &str) -> Result<String, ReloadError> {
        if self.policy_dir.is_none() {
            return Ok(self.policy().version.clone());
        }
        self.force_reload.store(true, std::sync::atomic::Ordering::SeqCst);
        self.reload(trigger, None).await
    }

    /// An approver's decision, audited with who, when and why, then stored. The event is
    /// written first: if it cannot be, the approval stays pending.
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<Result<Approval, crate::approval::DecideError>, ActionError> {
        use crate::approval::{DecideError, Status};
        let _one = self.decisions.lock().await;
        // One instant for the look and the change: an approval that expires in between is
        // expired for both.
        let now = crate::state::unix_now();
        let (store, key) = (self.approvals.clone(), id.to_owned());
        let current = tokio::task::spawn_blocking(move || store.get(&key, now))
            .await
            .expect("the approval store does not panic")?;
        let Some(a) = current else {
            return Ok(Err(DecideError::NotFound));
        };
        if a.status != Status::Pending {
            return Ok(Err(DecideError::NotPending(a.status)));
        }
        let status = if approve { Status::Approved } else { Status::Denied };
        self.audit
            .emit(&json!({
                "ts": crate::audit::now(), "event": "approval_decided", "approval_id": a.id,
                "status": status.as_str(), "by": by, "comment": comment, "decided_at": now,
                "agent": a.agent, "tool": a.tool, "rule": a.rule, "group": a.group,
                "arguments_sha256": a.arguments_sha256, "request_id": a.request_id,
            }))
            .await?;
        let (store, id, by_owned, comment_owned) =
            (self.approvals.clone(), id.to_owned(), by.to_owned(), comment.to_owned());
        let outcome = tokio::task::spawn_blocking(move || store.decide(&id, approve, &by_owned, &comment_owned, now))
            .await
            .expect("the approval store does not panic");
        if let Err(e) = &outcome {
            self.not_done("approval_decided", json!({"approval_id": a.id}), e).await;
        }
        let outcome = outcome?;
        if let Ok(a) = &outcome {
            metrics::counter!("toolgate_approvals_decided_total", "status" => a.status.as_str()).increment(1);
            tracing::info!(approval = %a.id, status = a.status.as_str(), by, "approval decided");
        }
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        policy: &Policy,
        req: &CallRequest<'_>,
        rec: &mut Record<'_>,
        agent: &str,
        tool: &crate::policy::tool::Tool,
        url: &str,
        args: &serde_json::Map<String, Value>,
        body: Bytes,
    ) -> Result<(Inbound, Bytes), Reason> {
        let timeout = tool
            .timeout
            .unwrap_or(Duration::from_millis(self.config.limits.upstream_timeout_ms));
        // Under the tool's own AWS role: credentials first (cached), and never an unsigned call.
        let role_arn = tool.aws_role.as_ref().map(|r| r.arn.clone());
        let mut signing_parts = None;
        if let Some(role) = &tool.aws_role {
            let fail = |code: Code, msg: String, rec: &mut Record| {
                rec.upstream = Some(UpstreamInfo {
                    status: None,
                    duration_ms: 0.0,
                    role_arn: Some(role.arn.clone()),
                });
                Reason::new(code, Stage::Upstream, "aws_role", msg)
            };
            let credentials = match Box::pin(self.roles.credentials(role, agent, &tool.name, req.request_id)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(request_id = req.request_id, tool = %tool.name, "{e}");
                    let (code, msg) = match e {
                        RoleError::Refused { .. } => (
                            Code::UpstreamError,
                            format!(
                                "toolgate could not assume the AWS role of tool '{}' ({}): STS refused. The call was not sent.",
                                tool.name, role.arn
                            ),
                        ),
                        RoleError::Unavailable { .. } => (
                            Code::Unavailable,
                            format!(
                                "toolgate could not get credentials for the AWS role of tool '{}' ({}): STS is unavailable. The call was not sent; try again later.",
                                tool.name, role.arn
                            ),
                        ),
                    };
                    return Err(fail(code, msg, rec));
                }
            };
            let Some(region) = Box::pin(self.roles.region_for(role)).await else {
                let msg = format!(
                    "No AWS region is configured to sign calls to tool '{}': set `aws.region` or the role's `region`.",
                    tool.name
                );
                return Err(fail(Code::Unavailable, msg, rec));
            };
            signing_parts = Some((credentials, region, role.sign.clone()));
        }
        let signing = signing_parts
            .as_ref()
            .map(|(credentials, region, service)| crate::upstream::Signing {
                credentials,
                region,
                service,
            });
        let (method, origin) = match &tool.target {
            Target::Http { method, url: template } => (*method, template.origin()),
            Target::Mcp { server, tool: name } => {
                let server = policy.mcp_servers.get(server).expect("discovered tools have a server");
                let started = Instant::now();
                let result = Box::pin(self.mcp_client.call_tool(
                    server,
                    name,
                    &Value::Object(args.clone()),
                    timeout,
                    signing.as_ref(),
                ))
                .await
                    .map(|outcome| {
                        let (status, body) = match outcome {
                            RpcOutcome::Result(r) => (200, r),
                            RpcOutcome::Error { code, message } => (
                                502,
                                json!({"error": {"code": "upstream_error", "message": format!("The MCP server refused the call ({code}): {message}")}}),
                            ),
                        };
                        Inbound {
                            status,
                            content_type: Some(HeaderValue::from_static("application/json")),
                            body: Bytes::from(serde_json::to_vec(&body).expect("JSON serialises")),
                        }
                    });
                let r = self.finish_forward(policy, req, rec, tool, started, result);
                if let Some(u) = &mut rec.upstream {
                    u.role_arn = role_arn;
                }
                return r;
            }
        };
        let out = Outbound {
            method,
            url,
            origin,
            arguments: args,
            body,
            request_id: req.request_id,
            request_id_header: req.request_id_header,
            agent,
            traceparent: req.traceparent,
            tracestate: req.tracestate,
            timeout,
            started: Instant::now(),
            max_response_bytes: self.config.limits.max_response_bytes,
            headers: &tool.headers,
            signing,
        };
        let started = out.started;
        let result = self.upstream.forward(&out).await;
        if role_arn.is_some() {
            let r = self.finish_forward(policy, req, rec, tool, started, result);
            if let Some(u) = &mut rec.upstream {
                u.role_arn = role_arn;
            }
            return r;
        }
        self.finish_forward(policy, req, rec, tool, started, result)
    }

    /// Metrics, the audit record and error mapping for a forwarded call, then output filters.
    fn finish_forward(
        &self,
        policy: &Policy,
        req: &CallRequest<'_>,
        rec: &mut Record<'_>,
        tool: &crate::policy::tool::Tool,
        started: Instant,
        result: Result<Inbound, UpstreamError>,
    ) -> Result<(Inbound, Bytes), Reason> {
        let elapsed = started.elapsed();
        self.meters.upstream_duration(&tool.name, elapsed.as_secs_f64());
        rec.upstream = Some(UpstreamInfo {
            status: result.as_ref().ok().map(|r| r.status),
            duration_ms: crate::audit::millis(elapsed),
            role_arn: None,
        });
        let inbound = result.map_err(|e| {
            tracing::warn!(request_id = req.request_id, tool = %tool.name, "upstream failed: {e}");
            match e {
                UpstreamError::Timeout(d) => Reason::new(Code::UpstreamTimeout, Stage::Upstream, "upstream",
                    format!("The tool '{}' did not answer within {} ms. The call may or may not have taken effect; it was not retried.", tool.name, d.as_millis())),
                UpstreamError::Unreachable(_) => Reason::new(Code::UpstreamError, Stage::Upstream, "upstream",
                    format!("The tool '{}' could not be reached.", tool.name)),
                UpstreamError::TooLarge(n) => Reason::new(Code::UpstreamError, Stage::Upstream, "upstream",
                    format!("The tool '{}' answered with more than {n} bytes.", tool.name)),
                UpstreamError::Protocol(_) => Reason::new(Code::UpstreamError, Stage::Upstream, "upstream",
                    format!("The tool '{}' sent a malformed response.", tool.name)),
            }
        })?;
        let body = self.filter_output(policy, tool, &inbound, rec)?;
        Ok((inbound, body))
    }

    /// Output filters over the response: JSON at any depth, text line by line. A response the
    /// filters cannot read is blocked, never passed through unseen.
    fn filter_output(
        &self,
        policy: &Policy,
        tool: &crate::policy::tool::Tool,
        inbound: &Inbound,
        rec: &mut Record<'_>,
    ) -> Result<Bytes, Reason> {
        if !policy.has_output_filters(tool) {
            return Ok(inbound.body.clone());
        }
        let unreadable = || {
            Reason::new(
                Code::ContentBlocked,
                Stage::Output,
                "output",
                format!(
                    "The response of tool '{}' could not be read by its output filters, so it was withheld.",
                    tool.name
                ),
            )
        };
        // Media types are case-insensitive. A charset other than UTF-8 (or ASCII) would make the
        // client read other characters than the filters did: withheld.
        // (Compared without allocating: this runs for every answer a filtered tool gives.)
        // A media type that is not visible ASCII cannot be read for its charset: withheld.
        let ct = match inbound.content_type.as_ref().map(HeaderValue::to_str) {
            None => "",
            Some(Ok(ct)) => ct,
            Some(Err(_)) => return Err(unreadable()),
        };
        // Every `charset` parameter, however spaced or quoted (clients differ on which of
        // several they take): all must be UTF-8 or ASCII.
        let foreign_charset = ct
            .split(';')
            .skip(1)
            .filter_map(|p| p.split_once('='))
            .filter(|(name, _)| name.trim().trim_matches('"').eq_ignore_ascii_case("charset"))
            .any(|(_, value)| {
                let value = value.trim().trim_matches('"').trim();
                !["utf-8", "utf8", "us-ascii"]
                    .iter()
                    .any(|c| value.eq_ignore_ascii_case(c))
            });
        if foreign_charset {
            return Err(unreadable());
        }
        // JSON when declared, and also when it looks like JSON whatever the label: the client
        // may well parse it, and escapes (`\u0040`) must be decoded before the filters look.
        let declared = ct.as_bytes().windows(4).any(|w| w.eq_ignore_ascii_case(b"json"));
        let looks_like_json = inbound
            .body
            .strip_prefix(b"\xEF\xBB\xBF")
            .unwrap_or(&inbound.body)
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'));
        let depth = self.config.limits.max_json_depth;
        let as_json = if declared || looks_like_json {
            // Nearly every answer is clean: one pass with the same strictness says so without
            // building the tree, and the answer goes out as it came.
            match policy.output_is_clean(tool, &inbound.body, depth) {
                Ok(true) => return Ok(inbound.body.clone()),
                Ok(false) => true,
                // JSON that lenient clients read one way and the filters cannot vouch for
                // (a repeated key, nesting past the limit), or declared JSON that is not.
                Err(arguments::ArgumentsError::DuplicateKey | arguments::ArgumentsError::TooDeep(_)) => {
                    return Err(unreadable());
                }
                Err(_) if declared => return Err(unreadable()),
                Err(_) => false,
            }
        } else {
            false
        };
        // Text is filtered line by line, each with its JSON escapes (`\u0040`) decoded: JSON
        // lines (NDJSON, a BOM before JSON) are read by clients decoded, so they are filtered so.
        let raw_lines: Vec<&str>;
        let parsed = as_json.then(|| arguments::parse_value(&inbound.body, depth));
        let (mut value, as_text) = if let Some(parsed) = parsed
            && (declared || !matches!(parsed, Err(arguments::ArgumentsError::NotJson { .. })))
        {
            raw_lines = Vec::new();
            (parsed.map_err(|_| unreadable())?, false)
        } else {
            // Not declared JSON and not one JSON value (say, JSON lines): text.
            let text = std::str::from_utf8(&inbound.body).map_err(|_| unreadable())?;
            raw_lines = text.split('\n').collect();
            let decoded = raw_lines.iter().map(|l| Value::from(decode_escapes(l).into_owned()));
            (Value::Array(decoded.collect()), true)
        };
        let outcome = policy.filter_output(tool, &mut value);
        for (filter, kind) in &outcome.redacted {
            rec.notes.push(Reason::new(
                Code::ContentBlocked,
                Stage::Output,
                filter.as_str(),
                format!("Redacted {kind} in the response (filter '{filter}')."),
            ));
        }
        if let Some((filter, kind)) = outcome.blocked {
            return Err(Reason::new(
                Code::ContentBlocked,
                Stage::Output,
                filter.clone(),
                format!(
                    "The response of tool '{}' was blocked by content filter '{filter}' ({kind}).",
                    tool.name
                ),
            ));
        }
        if outcome.redacted.is_empty() {
            return Ok(inbound.body.clone());
        }
        if as_text {
            // A line a filter rewrote goes out rewritten; any other line as the tool wrote it.
            // (A PEM block's lines after its header were redacted by the walk, see
            // `content::walk`.)
            let lines: Vec<&str> = value
                .as_array()
                .expect("text is split into lines")
                .iter()
                .zip(&raw_lines)
                .map(|(v, raw)| match v.as_str() {
                    Some(seen) if seen != decode_escapes(raw) => seen,
                    _ => *raw,
                })
                .collect();
            return Ok(Bytes::from(lines.join("\n")));
        }
        Ok(Bytes::from(serde_json::to_vec(&value).expect("JSON serialises")))
    }
}

/// A call held for approval, owned so it can cross into the store's blocking task.
struct HoldOwned {
    agent: String,
    tool: String,
    rule: String,
    rules: Vec<String>,
    group: String,
    reason: String,
    arguments: Option<Value>,
    arguments_sha256: String,
    request_id: String,
    session: Option<String>,
}

impl HoldOwned {
    fn as_hold(&self) -> Hold<'_> {
        Hold {
            agent: &self.agent,
            tool: &self.tool,
            rule: &self.rule,
            rules: &self.rules,
            group: &self.group,
            reason: &self.reason,
            arguments: self.arguments.clone(),
            arguments_sha256: &self.arguments_sha256,
            request_id: &self.request_id,
            session: self.session.as_deref(),
        }
    }
}

/// Tells approvers about new approval requests: one JSON POST each, fire and forget, at most
/// [`Webhook::MAX_IN_FLIGHT`] at once (beyond that a notification is dropped and logged; the
/// approval itself stands and is listed on the admin plane).
struct Webhook {
    url: String,
    timeout: Duration,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Webhook {
    const MAX_IN_FLIGHT: usize = 64;

    fn new(c: &crate::config::WebhookConfig) -> Self {
        Self {
            url: c.url.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
            client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(Self::MAX_IN_FLIGHT)),
        }
    }

    fn notify(&self, a: &Approval) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(approval = %a.id, "approval webhook: too many notifications in flight, dropped this one");
            return;
        };
        let body = json!({
            "event": "approval_requested", "approval_id": a.id, "agent": a.agent, "tool": a.tool,
            "rule": a.rule, "group": a.group, "reason": a.reason, "arguments": a.arguments,
            "arguments_sha256": a.arguments_sha256, "request_id": a.request_id,
            "requested_at": crate::audit::format_unix(a.requested_at), "expires_at": crate::audit::format_unix(a.expires_at),
            "approve": format!("POST /admin/approvals/{}/approve", a.id), "deny": format!("POST /admin/approvals/{}/deny", a.id),
        });
        let request = http::Request::post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body.to_string())));
        let Ok(request) = request else {
            tracing::warn!("approval webhook: the configured URL is not usable");
            return;
        };
        let (client, timeout, id) = (self.client.clone(), self.timeout, a.id.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, client.request(request)).await {
                Ok(Ok(r)) if r.status().is_success() => {}
                Ok(Ok(r)) => {
                    tracing::warn!(approval = %id, status = r.status().as_u16(), "approval webhook refused the notification")
                }
                Ok(Err(e)) => tracing::warn!(approval = %id, "approval webhook failed: {e}"),
                Err(_) => tracing::warn!(approval = %id, "approval webhook timed out"),
            }
        });
    }
}

/// An upstream MCP server's `CallToolResult` with `isError: true`: the tool ran and failed.
fn is_mcp_error_result(tool: &crate::policy::tool::Tool, body: &[u8]) -> bool {
    matches!(tool.target, Target::Mcp { .. })
        && serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("isError") == Some(&Value::Bool(true)))
}

fn is_valid_session(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `line` with JSON string escapes decoded (`\u0040`, surrogate pairs, `\n`, `\"`…), as a
/// client that parses it reads it; borrowed when it has none. Escapes that do not decode are
/// left as they are.
fn decode_escapes(line: &str) -> Cow<'_, str> {
    if !line.contains('\\') {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let hex = |s: &str| s.get(2..6).and_then(|h| u32::from_str_radix(h, 16).ok());
        let simple = match rest.as_bytes().get(1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &rest[2..];
        } else if let Some(hi) = hex(rest).filter(|_| rest.as_bytes().get(1) == Some(&b'u')) {
            let pair = (0xD800..0xDC00)
                .contains(&hi)
                .then(|| rest.get(6..).filter(|r| r.starts_with("\\u")).and_then(hex))
                .flatten()
                .filter(|lo| (0xDC00..0xE000).contains(lo));
            match pair {
                Some(lo) => {
                    out.extend(char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)));
                    rest = &rest[12..];
                }
                None => {
                    match char::from_u32(hi) {
                        Some(c) => out.push(c),
                        None => out.push_str(&rest[..6]),
                    }
                    rest = &rest[6..];
                }
            }
        } else {
            out.push('\\');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}
