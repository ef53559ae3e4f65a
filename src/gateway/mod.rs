//! The gateway: one tool call from credential to audited outcome, whichever transport brought
//! it. A transport (`server::data` for `POST /v1/tools/{tool}`, `server::mcp` for MCP's
//! `tools/call`) builds a [`CallRequest`], and maps the [`CallOutcome`] to its own wire format,
//! once.
//!
//! [`Gateway::call`] always audits (pingora's logging phase): [`stages`] decides and forwards
//! using `?` freely, and whatever it returns — an answer, a refusal or a failure — becomes
//! exactly one event, written before the outcome is handed back. If the event cannot be
//! written, the outcome is `unavailable`.
//!
//! The rest of the gateway, one job per module: [`forward`] (to the tool, under its AWS role,
//! and its answer back through guardrails and output filters), [`approvals`] (holding calls
//! and people's decisions), [`catalog`] (upstream MCP servers' tools and their pins),
//! [`reload`] (the policy in force) and [`operator`] (quarantine, anomalies, budgets).

mod approvals;
mod catalog;
mod forward;
pub mod keys;
mod notify;
mod operator;
mod reload;
mod stages;

pub use catalog::Catalog;
pub use operator::Quarantined;
pub use reload::{FileStamp, ReloadError};
pub(crate) use stages::two_credentials;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};

use crate::approval::ApprovalStore;
use crate::audit::{AuditError, AuditLog, RecordedArguments, Tokens, ToolCallEvent, UpstreamInfo, recorded};
use crate::config::ServerConfig;
use crate::meters::Meters;
use crate::policy::identity::ClientCertificate;
use crate::policy::{Code, ParseLimits, Policy, Reason, Stage, arguments};
use crate::state::State;
use crate::upstream::TraceContext;
use crate::upstream::aws::Roles;
use crate::upstream::guardrail::Guardrails;
use crate::upstream::mcp::McpClient;
use crate::upstream::{Inbound, Upstream};

/// A tool call as received, before anything is checked. Owned, so the call can run in a task
/// of its own: once it is handed over, the client's connection no longer decides whether it
/// finishes (see `server::request::call_detached`).
#[derive(Debug)]
pub struct CallRequest {
    pub request_id: Arc<str>,
    /// `request_id` as a header value, when the transport already made one (it is forwarded).
    pub request_id_header: Option<HeaderValue>,
    /// Where the call came from (the connection's peer), for the audit event.
    pub source: Option<std::net::IpAddr>,
    pub caller: Caller,
    pub tool: ToolName,
    /// The arguments, or why the transport could not read them (too large, too slow).
    pub arguments: Result<Arguments, Reason>,
    /// `X-Toolgate-Session` (or the MCP session), for session-aware rules.
    pub session: Option<String>,
    /// `X-Toolgate-Approval`: an approval id for a call a rule holds.
    pub approval: Option<String>,
    /// The W3C trace context, checked, as forwarded to HTTP tools.
    pub trace: TraceContext,
}

/// Who is calling, as the transport knows it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The `Authorization` header, if any, and the client certificate the connection
    /// presented, if any: the call authenticates them.
    Credentials {
        authorization: Option<HeaderValue>,
        client: Option<Arc<ClientCertificate>>,
    },
    /// An agent the transport has authenticated already, with this gateway's policy: MCP
    /// checks every message's credentials before it reads the method, so a `tools/call` need
    /// not hash the key (or verify the JWT's signature) a second time. The agent must still be
    /// in the policy the call is decided by (a reload in between may have removed it).
    Agent(Arc<str>),
    /// More than one `Authorization` header: refused, never the first (or last) of them read
    /// as if it were the only one.
    Ambiguous,
}

/// The tool a call names, as the transport has it: a segment of the request's path (shared
/// with the request, not copied) or a name from the transport's own message.
#[derive(Debug, Clone)]
pub struct ToolName(ToolRepr);

#[derive(Debug, Clone)]
enum ToolRepr {
    /// `path[start..]`.
    Path(http::uri::PathAndQuery, usize),
    Name(String),
}

impl ToolName {
    /// The part of `path` after its first `start` bytes (`/v1/tools/` for the HTTP transport).
    pub fn from_path(path: http::uri::PathAndQuery, start: usize) -> Self {
        Self(ToolRepr::Path(path, start))
    }

    pub fn new(name: impl Into<String>) -> Self {
        Self(ToolRepr::Name(name.into()))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            ToolRepr::Path(p, start) => p.path().get(*start..).unwrap_or(""),
            ToolRepr::Name(n) => n,
        }
    }
}

/// A call's arguments, as its transport has them.
#[derive(Debug)]
pub enum Arguments {
    /// The request body, parsed (strictly) by the policy.
    Body(Bytes),
    /// An object the transport parsed from its own message with the same strictness
    /// (`arguments::parse_value`: duplicate keys refused, depth bounded): MCP's `tools/call`.
    /// Not written out and parsed again.
    Parsed(Map<String, Value>),
}

impl Arguments {
    /// SHA-256 of the arguments as received, for the event of a call refused before they were
    /// evaluated: the body's bytes, or a parsed object's canonical form.
    fn sha256(&self) -> String {
        match self {
            Arguments::Body(body) => arguments::sha256_hex(body),
            Arguments::Parsed(args) => arguments::sha256_hex(&arguments::canonical(args)),
        }
    }
}

/// What became of a call. Each transport maps it to its wire format once.
#[derive(Debug)]
pub enum CallOutcome {
    /// The policy allowed the call and the tool answered: its answer, after output filters.
    Answered(Answer),
    /// The policy allowed the call, but the tool could not be used: unreachable, too slow, or
    /// its AWS role refused. The decision stays `allow`; the reason says what went wrong.
    Failed(Reason),
    /// Refused: by a check, a limit or a rule.
    Refused(Reason),
    /// Held for a person's approval (`approval_required`): the reason names the approval to
    /// poll and present when the call is sent again.
    Held(Reason),
}

impl CallOutcome {
    /// The decision as events, metrics and `X-Toolgate-Decision` write it.
    pub fn decision(&self) -> &'static str {
        match self {
            CallOutcome::Answered(_) | CallOutcome::Failed(_) => "allow",
            CallOutcome::Refused(_) => "deny",
            CallOutcome::Held(_) => "approval_required",
        }
    }

    /// Why the call was refused or failed.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            CallOutcome::Answered(_) => None,
            CallOutcome::Failed(r) | CallOutcome::Refused(r) | CallOutcome::Held(r) => Some(r),
        }
    }
}

/// A tool's answer, in the form its kind of tool gives it.
#[derive(Debug)]
pub enum Answer {
    /// An HTTP tool's response: its status, media type and body.
    Http(Inbound),
    /// An upstream MCP server's `CallToolResult`, as the value it is (never written out to be
    /// parsed again by the MCP transport).
    Mcp(Map<String, Value>),
    /// An upstream MCP server refused the call with a JSON-RPC error: the error object shown
    /// to the agent (`{"error": {"code": "upstream_error", "message": …}}`), filtered like any
    /// answer, since its message is the server's text.
    McpError(Value),
}

impl Answer {
    /// The status recorded for the tool in the event (an MCP server's refusal is a 502).
    fn status(&self) -> u16 {
        match self {
            Answer::Http(inbound) => inbound.status,
            Answer::Mcp(_) => 200,
            Answer::McpError(_) => 502,
        }
    }

    /// Whether the tool did what was asked: a 2xx, or an MCP result that is not `isError`.
    fn succeeded(&self) -> bool {
        match self {
            Answer::Http(inbound) => (200..300).contains(&inbound.status),
            Answer::Mcp(result) => result.get("isError") != Some(&Value::Bool(true)),
            Answer::McpError(_) => false,
        }
    }

    /// Its size as sent, which budgets count.
    fn len(&self) -> usize {
        match self {
            Answer::Http(inbound) => inbound.body.len(),
            Answer::Mcp(result) => json_len(result),
            Answer::McpError(error) => json_len(error),
        }
    }
}

/// The length of a value's JSON, without writing it anywhere.
fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("JSON serialises");
    count.0
}

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
    /// The state backend (Redis) did not answer.
    #[error("{0}")]
    State(#[from] crate::state::StateError),
}

/// What the stages learned, for the audit event, whatever the outcome.
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
    /// The shadow policy's decision, when it differs.
    shadow: Option<crate::audit::ShadowVerdict>,
    /// The stages that ran and when, when the call is traced (`telemetry`).
    stages: Option<Vec<crate::telemetry::Stage>>,
}

impl Record<'_> {
    /// Now, if the call is traced: the start of a stage.
    fn clock(&self) -> Option<Instant> {
        self.stages.as_ref().map(|_| Instant::now())
    }

    /// A stage that began at `since` (from [`Record::clock`]) has ended.
    fn ran(&mut self, stage: &'static str, since: Option<Instant>) {
        if let (Some(stages), Some(since)) = (self.stages.as_mut(), since) {
            stages.push((stage, since, Instant::now()));
        }
    }
}

/// This replica's id: `TOOLGATE_REPLICA_ID` if set (a pod name), else the host name and a
/// random suffix, so two processes on one host are told apart.
fn replica_id() -> String {
    if let Ok(id) = std::env::var("TOOLGATE_REPLICA_ID")
        && crate::audit::is_safe_text(&id)
    {
        return id;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::audit::is_safe_text(h))
        .unwrap_or_else(|| "toolgate".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// Shared state of a running gateway.
pub struct Gateway {
    policy: ArcSwap<Policy>,
    /// `shadow_policies`: decided beside `policy` on every call, never enforced.
    shadow: arc_swap::ArcSwapOption<Policy>,
    pub config: ServerConfig,
    pub audit: AuditLog,
    /// Rate limits, budgets, denial counts, quarantines, session history.
    pub state: State,
    /// Calls held for a person's approval, and the pins of upstream MCP tools.
    pub approvals: ApprovalStore,
    /// Set by the demo only; `serve` reads the token from the environment or a file.
    admin_token: Option<String>,
    reload: reload::Reloader,
    catalog: Catalog,
    forwarder: forward::Forwarder,
    webhook: Option<notify::Webhook>,
    /// Held while a decision (an approval, a tool approval, a quarantine or a release) is
    /// recorded and carried out, so two decisions on the same thing cannot both be recorded,
    /// nor one undo another between its record and its effect.
    decisions: tokio::sync::Mutex<()>,
    /// One fetch of the identity provider's keys at a time (`keys`).
    key_fetch: tokio::sync::Mutex<()>,
    /// Calls' traces, when `telemetry:` is configured.
    pub telemetry: Option<crate::telemetry::Telemetry>,
    /// Handles of the metrics every call updates.
    meters: Meters,
    /// This replica's id (`TOOLGATE_REPLICA_ID`, else the host name and a random suffix) and
    /// when it started: what it reports in its heartbeat.
    replica: (String, u64),
}

impl Gateway {
    pub fn new(
        config: ServerConfig,
        policy: Policy,
        policy_dir: Option<std::path::PathBuf>,
        audit: AuditLog,
        approvals: impl Into<ApprovalStore>,
    ) -> Self {
        let region = config.aws.as_ref().and_then(|a| a.region.clone());
        // `serve` and `check` refuse a shadow policy that does not load; embedded, a broken one
        // is logged and the next reload tries again.
        let shadow = config.shadow_policies.as_ref().and_then(|dir| match Policy::load(dir) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::error!("the shadow policy does not load:\n{e}");
                None
            }
        });
        Self {
            policy: ArcSwap::from_pointee(policy),
            shadow: arc_swap::ArcSwapOption::new(shadow),
            reload: reload::Reloader::new(policy_dir),
            catalog: Catalog::new(),
            forwarder: forward::Forwarder {
                upstream: Upstream::new(),
                mcp: McpClient::new(
                    config.limits.max_response_bytes,
                    std::time::Duration::from_millis(config.limits.upstream_idle_timeout_ms),
                ),
                roles: Roles::new(region.clone()),
                guardrails: Guardrails::new(region),
            },
            webhook: config
                .approvals
                .webhook
                .as_ref()
                .map(|w| notify::Webhook::new(w, config.admin.public_url.as_deref())),
            telemetry: config.telemetry.as_ref().map(crate::telemetry::Telemetry::new),
            config,
            audit,
            state: State::default(),
            approvals: approvals.into(),
            admin_token: None,
            decisions: tokio::sync::Mutex::new(()),
            key_fetch: tokio::sync::Mutex::new(()),
            meters: Meters::default(),
            replica: (replica_id(), crate::state::unix_now()),
        }
    }

    /// This replica as it reports itself now.
    pub fn replica(&self) -> crate::state::Replica {
        crate::state::Replica {
            id: self.replica.0.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            policy_version: self.policy().version.clone(),
            started_at: self.replica.1,
            last_seen: crate::state::unix_now(),
        }
    }

    /// Records this replica as alive in the shared state (every few seconds, from upkeep).
    pub async fn heartbeat(&self) {
        if let Err(e) = self.state.heartbeat(&self.replica()).await {
            tracing::warn!("the replica heartbeat could not be written: {e}");
        }
    }

    /// Keeps limits, budgets, denials and quarantines in `state` (Redis, shared by replicas)
    /// instead of this process's memory.
    pub fn with_state(mut self, state: State) -> Self {
        self.state = state;
        self
    }

    /// Decides every call by `shadow` too (`shadow_policies`), without enforcing it.
    pub fn with_shadow(self, shadow: Policy) -> Self {
        self.shadow.store(Some(Arc::new(shadow)));
        self
    }

    /// The shadow policy, if one is configured.
    pub fn shadow_policy(&self) -> Option<Arc<Policy>> {
        self.shadow.load_full()
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

    /// Fetches the identity provider's keys first when a request's bearer token needs keys
    /// the cache lacks (none fetched yet, or not its key id: the provider rotated its keys),
    /// at most once per `auth.jwt.min_refetch_seconds`. Nothing to do for API keys, or keys from
    /// a file. Authentication then decides as usual (503 while no keys were ever fetched).
    pub async fn fetch_keys_for(&self, authorization: Option<&str>) {
        let Some(remote) = self.policy_now().auth.keys_to_fetch(authorization).cloned() else {
            return;
        };
        if let Err(e) = keys::refresh(&remote, &self.key_fetch, remote.min_refetch).await {
            tracing::error!(source = ?remote.source, "cannot fetch the identity provider's keys: {e}");
        }
    }

    /// The periodic fetch of the identity provider's keys, if the policy fetches them: every
    /// `auth.jwt.refresh_seconds`, every `min_refetch_seconds` while none were ever fetched.
    pub async fn refresh_keys(&self) {
        let Some(remote) = self.policy_now().auth.remote_keys().cloned() else {
            return;
        };
        if let Err(e) = keys::refresh(&remote, &self.key_fetch, remote.upkeep_interval()).await {
            tracing::error!(source = ?remote.source, "cannot fetch the identity provider's keys: {e}");
        }
    }

    pub fn parse_limits(&self) -> ParseLimits {
        ParseLimits {
            max_json_depth: self.config.limits.max_json_depth,
        }
    }

    /// Handles one call end to end. Never fails: every outcome is an answer and an event.
    ///
    /// The pipeline's state machine is several KB: a caller that moves it around boxes it
    /// first (the transports do, in `server::request::call_detached`; measured: the unboxed
    /// one cost ≈13k instructions of `memcpy` per call, nearly a third of a bare proxy's
    /// per-request work).
    pub async fn call(&self, mut req: CallRequest) -> CallOutcome {
        let started = Instant::now();
        // Traced: the tool receives this call's span as its parent, in the caller's trace.
        let traced = self.telemetry.as_ref().map(|_| {
            let ids = crate::telemetry::Ids::continuing(req.trace.traceparent());
            req.trace = req.trace.with_parent(ids.outbound());
            (ids, std::time::SystemTime::now())
        });
        // A guard, not an `Arc` clone: the clone and its drop are two writes per call to the
        // policy's reference count, which every core's calls share. The guard borrows one of
        // this thread's debt slots instead (arc-swap falls back to a clone when they run out).
        let policy = self.policy.load();
        let mut rec = Record {
            stages: traced.as_ref().map(|_| Vec::with_capacity(8)),
            ..Record::default()
        };
        let arguments = std::mem::replace(&mut req.arguments, Ok(Arguments::Body(Bytes::new())));
        let result = self.process(&policy, &req, arguments, &mut rec).await;
        let outcome = match result {
            Ok(answer) => CallOutcome::Answered(answer),
            // Failures after an allow (the tool down) keep the decision `allow`: the policy
            // admitted the call; the code says what went wrong.
            Err(reason)
                if rec.upstream.is_some() && matches!(reason.code, Code::UpstreamError | Code::UpstreamTimeout) =>
            {
                CallOutcome::Failed(reason)
            }
            Err(reason) if reason.code == Code::ApprovalRequired => CallOutcome::Held(reason),
            Err(reason) => CallOutcome::Refused(reason),
        };
        let code = outcome.reason().map(|r| r.code);
        let mut reasons = std::mem::take(&mut rec.notes);
        reasons.extend(outcome.reason().cloned());
        // What came from the caller is recorded only if it is safe to keep (else its hash): a
        // session id; a tool name the policy does not define.
        let session = req.session.as_deref().filter(|s| is_valid_session(s)).map(recorded);
        let tool = match rec.known_tool || policy.tools.contains_key(req.tool.as_str()) {
            true => std::borrow::Cow::Borrowed(req.tool.as_str()),
            false => recorded(req.tool.as_str()),
        };
        let event = ToolCallEvent {
            ts: crate::audit::now(),
            request_id: &req.request_id,
            source: req.source,
            session: session.as_deref(),
            agent: rec.agent,
            tool: Some(&tool),
            decision: outcome.decision(),
            code: code.map(Code::as_str),
            reasons: &reasons,
            arguments: rec.arguments.take(),
            arguments_sha256: &rec.arguments_sha256,
            upstream: rec.upstream.take(),
            tokens: rec.tokens,
            approval_id: rec.approval_id.as_deref(),
            would_deny: &rec.would_deny,
            shadow: rec.shadow.as_ref(),
            duration_ms: crate::audit::millis(started.elapsed()),
            policy_version: &policy.version,
        };
        // A refusal that names no agent, beyond its source's allowance, is counted for a summary
        // instead (`audit::unknown`). Shed calls are the gateway's doing, not the caller's.
        // (Only callers that presented credentials: one MCP authenticated already is an agent
        // even if a reload removed it since.)
        let summarized = rec.agent.is_none()
            && matches!(req.caller, Caller::Credentials { .. })
            && code.is_some_and(|c| c != Code::Unavailable && !self.audit.admit_unknown_caller(req.source, c.as_str()));
        if !summarized && let Err(e) = self.audit.emit(&event).await {
            tracing::error!(request_id = &*req.request_id, "audit write failed: {e}");
            return CallOutcome::Refused(unrecorded(outcome, event.upstream.is_some()));
        }
        if let (Some(reason), Some(agent)) = (outcome.reason(), rec.agent) {
            Box::pin(self.watch_for_anomalies(&policy, agent, reason, &req.request_id)).await;
        }
        self.meters.call(
            rec.agent.unwrap_or("(unauthenticated)"),
            if rec.known_tool { req.tool.as_str() } else { "(unknown)" },
            outcome.decision(),
            code.map_or("ok", Code::as_str),
        );
        if let Some(at) = rec.decided_at {
            self.meters.decision_duration(at.duration_since(started).as_secs_f64());
        }
        if let (Some(telemetry), Some((ids, started_at))) = (&self.telemetry, traced) {
            telemetry.record(crate::telemetry::CallTrace {
                ids,
                started_at,
                started,
                ended: Instant::now(),
                stages: rec.stages.take().unwrap_or_default(),
                // The name the event records: a tool the policy does not define only as a hash.
                tool: tool.into_owned(),
                agent: rec.agent.map(str::to_owned),
                mcp: matches!(req.caller, Caller::Agent(_)),
                decision: outcome.decision(),
                code: code.map(Code::as_str),
                upstream_status: rec.upstream.as_ref().and_then(|u| u.status),
            });
        }
        outcome
    }
}

/// The outcome of a call whose `tool_call` event could not be written: refused, and what the
/// agent is told depends on how far the call got.
fn unrecorded(outcome: CallOutcome, forwarded: bool) -> Reason {
    let (rule, message) = match outcome {
        // Refused already because the log failed (the write ahead of the tool): that reason.
        CallOutcome::Refused(r) if r.stage == Stage::Audit => return r,
        _ if forwarded => (
            "audit",
            "The call was sent to its tool, but its outcome could not be recorded in the audit log, so the answer is withheld. The call may have taken effect: check before sending it again.",
        ),
        _ => (
            "audit",
            "The call could not be recorded in the audit log, so it was refused. Try again later.",
        ),
    };
    Reason::new(Code::Unavailable, Stage::Audit, rule, message)
}

/// `X-Toolgate-Session`: 1 to 128 characters, letters, digits, `-`, `_`, `.`, `:`.
pub fn is_valid_session(s: &str) -> bool {
    crate::audit::is_safe_text(s)
}

/// `X-Toolgate-Approval`: an approval's id, `apr_` and 32 lowercase hex digits.
pub fn is_approval_id(s: &str) -> bool {
    s.strip_prefix("apr_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests;
