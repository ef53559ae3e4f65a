//! The server config (`config/toolgate.yaml`, a platform team's file): raw serde types, validated
//! into [`ServerConfig`] at load. Unknown keys are errors; every value has a default.
//!
//! Relative paths (policies, audit file) are taken from the working directory, as the contract's
//! defaults (`config/toolgate.yaml` next to `policies/`) assume.

pub mod admin;
pub mod error;
pub mod state;
pub mod tls;
pub mod yaml;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use admin::{AdminConfig, Role};
pub use error::{ConfigError, Problem, Problems};
pub use state::{RedisConfig, RedisOptions, StateBackend};
pub use tls::{ClientCertificates, Scheme, TlsConfig};

use yaml::{Document, KeyPath};

/// The deepest JSON nesting a config may allow: serde_json refuses deeper input on its own.
const MAX_JSON_DEPTH_CEILING: usize = 128;
/// More data-plane threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ServerConfigRaw {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    /// TLS on the data plane (default none: plain HTTP, on loopback only unless `allow_plaintext`).
    #[serde(default)]
    tls: Option<TlsConfig>,
    /// Plain HTTP on a data-plane address other than loopback (TLS ended in front of toolgate).
    #[serde(default)]
    allow_plaintext: bool,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default = "default_policies")]
    policies: PathBuf,
    /// A candidate policy directory decided beside the enforced one: every call is decided by
    /// both, the enforced decision applies, and a difference is on the call's audit event and
    /// in `/metrics` (default none).
    #[serde(default)]
    shadow_policies: Option<PathBuf>,
    #[serde(default)]
    limits: Limits,
    #[serde(default = "default_state")]
    state: String,
    /// How to reach Redis, when `state` is a Redis URL.
    #[serde(default)]
    redis: Option<RedisOptions>,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    aws: Option<AwsConfig>,
    #[serde(default)]
    approvals: ApprovalsConfig,
    #[serde(default)]
    mcp: McpConfig,
    /// Data-plane threads, each its own event loop (default: one per CPU the process may use).
    #[serde(default)]
    workers: Option<usize>,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDR blocks; default none).
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// OpenTelemetry traces over OTLP/HTTP (default: off).
    #[serde(default)]
    telemetry: Option<TelemetryConfig>,
}

/// The JSON Schema of the server config (`config/toolgate.yaml`), for editors and CI.
pub fn config_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(ServerConfigRaw)).expect("a schema is JSON");
    schema["title"] = "toolgate server config".into();
    schema
}

/// `telemetry:`: where the traces of tool calls go.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP traces endpoint, used as given (e.g.
    /// `http://otel-collector:4318/v1/traces`); protobuf.
    pub otlp_endpoint: String,
    /// `service.name` of the spans (default `toolgate`).
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// One export's deadline (default 5000).
    #[serde(default = "default_telemetry_timeout")]
    pub timeout_ms: u64,
    /// Calls' traces waiting to be exported; beyond, new ones are dropped and counted (default 4096).
    #[serde(default = "default_telemetry_queue")]
    pub max_queue: usize,
}

fn default_service_name() -> String {
    "toolgate".to_owned()
}
fn default_telemetry_timeout() -> u64 {
    5000
}
fn default_telemetry_queue() -> usize {
    4096
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().unwrap()
}
fn default_policies() -> PathBuf {
    PathBuf::from("policies/")
}
fn default_state() -> String {
    "memory".to_owned()
}

/// Bounds on everything a caller or a tool can send.
#[derive(Debug, Clone, Copy, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (default 1 MiB); larger gets 413 `payload_too_large`.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted in arguments (default 64, at most 128).
    #[serde(default = "default_max_depth")]
    pub max_json_depth: usize,
    /// Default upstream timeout; a tool's own `timeout_ms` overrides it (default 10 000).
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout_ms: u64,
    /// Largest tool response relayed (default 8 MiB); larger gets 502 `upstream_error`.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Time allowed to receive a request's headers and body (default 10 000).
    #[serde(default = "default_request_read_timeout")]
    pub request_read_timeout_ms: u64,
    /// Calls in flight at once; more get 503 `unavailable` at once rather than queueing (default 4096).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// How long a kept-alive connection to a tool may sit idle and still be reused (default
    /// 900): below the keep-alive timeout of the tools, so a tool never closes a connection as
    /// a call is sent on it. A tool's `upstream.idle_timeout_ms` overrides it.
    #[serde(default = "default_upstream_idle")]
    pub upstream_idle_timeout_ms: u64,
    /// A response write that makes no progress for this long closes the connection, so a
    /// client that stops reading cannot hold its answer in memory (default 10 000).
    #[serde(default = "default_write_timeout")]
    pub response_write_timeout_ms: u64,
    /// Answers held for clients still reading them, in all (default 256 MiB): beyond it, new
    /// calls get 503 `unavailable` until clients read (or time out), instead of more memory.
    #[serde(default = "default_max_buffered")]
    pub max_buffered_response_bytes: usize,
}

fn default_max_body() -> usize {
    1024 * 1024
}
fn default_max_depth() -> usize {
    64
}
fn default_upstream_timeout() -> u64 {
    10_000
}
fn default_max_response() -> usize {
    8 * 1024 * 1024
}
fn default_request_read_timeout() -> u64 {
    10_000
}
fn default_max_concurrent() -> usize {
    4096
}
fn default_upstream_idle() -> u64 {
    900
}
fn default_write_timeout() -> u64 {
    10_000
}
fn default_max_buffered() -> usize {
    256 * 1024 * 1024
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_json_depth: default_max_depth(),
            upstream_timeout_ms: default_upstream_timeout(),
            max_response_bytes: default_max_response(),
            request_read_timeout_ms: default_request_read_timeout(),
            max_concurrent_requests: default_max_concurrent(),
            upstream_idle_timeout_ms: default_upstream_idle(),
            response_write_timeout_ms: default_write_timeout(),
            max_buffered_response_bytes: default_max_buffered(),
        }
    }
}

/// Where audit events go. The file is the durable record; stdout is a convenience copy.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Also print every event to stdout (default false).
    #[serde(default)]
    pub stdout: bool,
    /// Append-only JSON-lines file (default `var/audit.jsonl`); written before each response.
    #[serde(default = "default_audit_file")]
    pub file: Option<PathBuf>,
    /// `fdatasync` each batch of events before answering (default false: events survive a crash
    /// of the process, not of the machine).
    #[serde(default)]
    pub fsync: bool,
    /// Start a new file once the current one holds this many bytes (default 0: never). The full
    /// file is renamed `<file>.<UTC time>` (e.g. `audit.jsonl.20261201T021828.123Z`), so names
    /// sort in the order written, and the new file opens with an `audit_rotated` event naming
    /// it. toolgate never deletes a file.
    #[serde(default)]
    pub rotate_bytes: u64,
    /// What an event records of the arguments: `redacted` (default: the forwarded arguments with
    /// every built-in PII/secret detector applied) or `shape` (keys and value types only).
    #[serde(default)]
    pub arguments: AuditArguments,
    /// Signs the chain's head in an `audit_checkpoint` line at intervals and at shutdown: a
    /// file holding the key (at least 32 bytes; e.g. `openssl rand -hex 32`). Default none.
    #[serde(default)]
    pub checkpoint_key_file: Option<PathBuf>,
    /// How often a checkpoint is written (default 300).
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_seconds: u64,
    /// Ship the audit file's events to CloudWatch Logs (the file is the spool).
    #[serde(default)]
    pub cloudwatch: Option<CloudWatchConfig>,
    /// How many refusals of callers with no known agent are written one by one; the rest are
    /// summarized (`refusals_summarized`).
    #[serde(default)]
    pub unknown_callers: UnknownCallersConfig,
}

/// `audit.unknown_callers`: the allowance of individual events for refusals that name no agent.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnknownCallersConfig {
    /// Per source address (default 600, with bursts as large; 0: no per-source limit).
    #[serde(default = "default_unknown_per_source")]
    pub per_source_per_minute: u32,
    /// For all sources together (default 6000; 0: no overall limit).
    #[serde(default = "default_unknown_overall")]
    pub per_minute: u32,
    /// How often the counted refusals are written, one event per source (default 60).
    #[serde(default = "default_summary_seconds")]
    pub summary_seconds: u64,
}

fn default_unknown_per_source() -> u32 {
    600
}
fn default_unknown_overall() -> u32 {
    6000
}
fn default_summary_seconds() -> u64 {
    60
}

impl Default for UnknownCallersConfig {
    fn default() -> Self {
        Self {
            per_source_per_minute: default_unknown_per_source(),
            per_minute: default_unknown_overall(),
            summary_seconds: default_summary_seconds(),
        }
    }
}

fn default_audit_file() -> Option<PathBuf> {
    Some(PathBuf::from("var/audit.jsonl"))
}

fn default_checkpoint_seconds() -> u64 {
    300
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            stdout: false,
            file: default_audit_file(),
            fsync: false,
            rotate_bytes: 0,
            arguments: AuditArguments::default(),
            unknown_callers: UnknownCallersConfig::default(),
            cloudwatch: None,
            checkpoint_key_file: None,
            checkpoint_seconds: default_checkpoint_seconds(),
        }
    }
}

/// `audit.cloudwatch`: where the shipper puts the events.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudWatchConfig {
    /// Created if missing.
    pub log_group: String,
    /// Created if missing; `{hostname}` is replaced by the machine's host name (default
    /// `{hostname}`).
    #[serde(default = "default_log_stream")]
    pub log_stream: String,
    /// Events per PutLogEvents (default and maximum 10000).
    #[serde(default = "default_cw_events")]
    pub batch_max_events: usize,
    /// Bytes per PutLogEvents, counted as the service does (message + 26 per event); default
    /// and maximum 1048576.
    #[serde(default = "default_cw_bytes")]
    pub batch_max_bytes: usize,
    /// How long to gather events before shipping a partial batch (default 1000).
    #[serde(default = "default_cw_flush")]
    pub flush_interval_ms: u64,
    /// Where the shipped offset is kept (default: the audit file's path + `.cloudwatch`).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
}

fn default_log_stream() -> String {
    "{hostname}".to_owned()
}
fn default_cw_events() -> usize {
    10_000
}
fn default_cw_bytes() -> usize {
    1_048_576
}
fn default_cw_flush() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditArguments {
    #[default]
    Redacted,
    Shape,
}

/// AWS settings; endpoints come from the standard AWS environment.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub region: Option<String>,
}

/// Human approval of calls held by an `@approval` rule.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// The embedded approval store (default `var/approvals.redb`); approvals survive restarts.
    #[serde(default = "default_approvals_store")]
    pub store: PathBuf,
    /// How long an approval request stays valid, pending or approved (default 3600).
    #[serde(default = "default_approval_ttl")]
    pub ttl_seconds: u64,
    /// Told about every new approval request (optional).
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
}

/// `approvals.webhook`: a POST per approval request, with the call summary (redacted), signed.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://…` endpoint (chat, ticketing, paging); `http://` only to a local relay.
    pub url: String,
    /// Environment variable holding the signing secret: each POST carries
    /// `X-Toolgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// `toolgate` (the default: the approval as JSON) or `slack` (an incoming-webhook message
    /// with a link to the inbox entry).
    #[serde(default)]
    pub format: WebhookFormat,
    /// Per attempt (default 2000).
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Attempts in all, for a notification that failed (a connection error, a timeout, 429 or
    /// 5xx) before it is logged and dropped; the approval stands either way (default 5).
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// The wait before the first retry, doubled for each next one up to 60 s (default 1000).
    #[serde(default = "default_webhook_backoff")]
    pub backoff_ms: u64,
}

impl WebhookConfig {
    /// What `check` says about a webhook that is plain HTTP or unsigned.
    fn warning(&self) -> Option<String> {
        let mut said = Vec::new();
        if self.url.starts_with("http://") {
            said.push("is plain http (the arguments it carries cross the network in clear)");
        }
        if self.secret_env.is_none() {
            said.push("is not signed (set `secret_env`, so the receiver can tell it came from toolgate)");
        }
        (!said.is_empty()).then(|| format!("approvals.webhook {}", said.join(" and ")))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Toolgate,
    Slack,
}

fn default_webhook_attempts() -> u32 {
    5
}
fn default_webhook_backoff() -> u64 {
    1000
}

fn default_approvals_store() -> PathBuf {
    PathBuf::from("var/approvals.redb")
}
fn default_approval_ttl() -> u64 {
    3600
}
fn default_webhook_timeout() -> u64 {
    2000
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            store: default_approvals_store(),
            ttl_seconds: default_approval_ttl(),
            webhook: None,
        }
    }
}

/// The MCP endpoint (`/mcp` on the data plane).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// `Origin` values allowed to call `/mcp` (browsers send one; agents usually do not).
    /// Requests without `Origin` are allowed; with one not listed, refused (default: none listed).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Open handshake-revision sessions at most (default 10000).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// A session unused this long ends (default 3600).
    #[serde(default = "default_session_idle")]
    pub session_idle_seconds: u64,
    /// How often upstream MCP servers (`mcp_servers:` in policy) are asked for their tools
    /// (default 60; also at start and on `POST /admin/reload`).
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,
}

fn default_refresh() -> u64 {
    60
}

fn default_max_sessions() -> usize {
    10_000
}
fn default_session_idle() -> u64 {
    3600
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_sessions: default_max_sessions(),
            session_idle_seconds: default_session_idle(),
            refresh_seconds: default_refresh(),
        }
    }
}

impl McpConfig {
    pub fn session_idle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.session_idle_seconds)
    }
}

/// The validated server config.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// TLS on the data plane.
    pub tls: Option<TlsConfig>,
    /// Data-plane threads (`server::workers`): `workers`, else one per available CPU.
    pub workers: usize,
    pub admin: AdminConfig,
    pub policies: PathBuf,
    /// A candidate policy decided beside the enforced one, never enforced.
    pub shadow_policies: Option<PathBuf>,
    pub limits: Limits,
    pub state: StateBackend,
    pub audit: AuditConfig,
    pub aws: Option<AwsConfig>,
    pub approvals: ApprovalsConfig,
    pub mcp: McpConfig,
    /// Proxies in front of toolgate whose `X-Forwarded-For` names the caller (`trusted_proxies`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Traces of tool calls, exported over OTLP.
    pub telemetry: Option<TelemetryConfig>,
}

impl ServerConfig {
    /// What a valid config still deserves a word about (`toolgate check` prints these).
    pub fn warnings(&self) -> Vec<String> {
        [
            tls::plaintext_warning("data", self.listen, self.tls.as_ref()),
            tls::plaintext_warning("admin", self.admin.listen, self.admin.tls.as_ref()),
            self.approvals.webhook.as_ref().and_then(WebhookConfig::warning),
        ]
        .into_iter()
        .flatten()
        .chain(self.admin.warnings())
        .collect()
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(&file, format!("cannot read the config file: {e}")))?;
        Self::parse(&file, &text)
    }

    /// Validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let doc = Document::parse(file, text)?;
        let root = KeyPath::root();
        let raw: ServerConfigRaw = doc.decode(&root, &doc.value).map_err(ConfigError::one)?;
        let mut problems = Problems::default();
        check_limits(&doc, &raw.limits, &mut problems);
        let state = state::check_state(&doc, &raw.state, raw.redis, &mut problems);
        check_audit(&doc, &raw.audit, &mut problems);
        if raw.listen == raw.admin.listen && raw.listen.port() != 0 {
            problems.push(doc.problem(
                &root.key("admin").key("listen"),
                "the admin plane must not share the data plane's address",
            ));
        }
        check_approvals(&doc, &raw.approvals, &mut problems);
        tls::check_listener(
            &doc,
            &root,
            raw.listen,
            raw.tls.as_ref(),
            raw.allow_plaintext,
            true,
            &mut problems,
        );
        tls::check_listener(
            &doc,
            &root.key("admin"),
            raw.admin.listen,
            raw.admin.tls.as_ref(),
            raw.admin.allow_plaintext,
            false,
            &mut problems,
        );
        for (key, zero) in [
            ("max_sessions", raw.mcp.max_sessions == 0),
            ("session_idle_seconds", raw.mcp.session_idle_seconds == 0),
            ("refresh_seconds", raw.mcp.refresh_seconds == 0),
        ] {
            if zero {
                problems.push(doc.problem(&root.key("mcp").key(key), "must be greater than 0"));
            }
        }
        if raw.workers.is_some_and(|w| !(1..=MAX_WORKERS).contains(&w)) {
            problems.push(doc.problem(&root.key("workers"), format!("must be between 1 and {MAX_WORKERS}")));
        }
        let workers = raw
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        raw.admin.check(&doc, &mut problems);
        let trusted_proxies = parse_trusted_proxies(&doc, &raw.trusted_proxies, &mut problems);
        if let Some(t) = &raw.telemetry {
            let at = root.key("telemetry");
            let url_ok = t
                .otlp_endpoint
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !url_ok {
                problems.push(doc.problem(&at.key("otlp_endpoint"), "must be an http:// or https:// URL"));
            }
            if t.timeout_ms == 0 {
                problems.push(doc.problem(&at.key("timeout_ms"), "must be greater than 0"));
            }
            if !(1..=1_000_000).contains(&t.max_queue) {
                problems.push(doc.problem(&at.key("max_queue"), "must be between 1 and 1000000"));
            }
        }
        problems.finish(ServerConfig {
            trusted_proxies,
            telemetry: raw.telemetry,
            listen: raw.listen,
            tls: raw.tls,
            workers,
            admin: raw.admin,
            policies: raw.policies,
            shadow_policies: raw.shadow_policies,
            limits: raw.limits,
            state,
            audit: raw.audit,
            aws: raw.aws,
            approvals: raw.approvals,
            mcp: raw.mcp,
        })
    }
}

fn check_limits(doc: &Document, l: &Limits, problems: &mut Problems) {
    let limits = KeyPath::root().key("limits");
    if l.max_json_depth == 0 || l.max_json_depth > MAX_JSON_DEPTH_CEILING {
        problems.push(doc.problem(
            &limits.key("max_json_depth"),
            format!("must be between 1 and {MAX_JSON_DEPTH_CEILING}"),
        ));
    }
    for (key, value) in [
        ("max_body_bytes", l.max_body_bytes as u64),
        ("upstream_timeout_ms", l.upstream_timeout_ms),
        ("max_response_bytes", l.max_response_bytes as u64),
        ("request_read_timeout_ms", l.request_read_timeout_ms),
        ("max_concurrent_requests", l.max_concurrent_requests as u64),
        ("response_write_timeout_ms", l.response_write_timeout_ms),
        ("upstream_idle_timeout_ms", l.upstream_idle_timeout_ms),
        ("max_buffered_response_bytes", l.max_buffered_response_bytes as u64),
    ] {
        if value == 0 {
            problems.push(doc.problem(&limits.key(key), "must be greater than 0"));
        }
    }
}

fn check_audit(doc: &Document, audit: &AuditConfig, problems: &mut Problems) {
    if !(1..=3600).contains(&audit.unknown_callers.summary_seconds) {
        problems.push(
            doc.problem(
                &KeyPath::root()
                    .key("audit")
                    .key("unknown_callers")
                    .key("summary_seconds"),
                "must be between 1 and 3600",
            ),
        );
    }
    if let Some(key) = &audit.checkpoint_key_file {
        let at = KeyPath::root().key("audit").key("checkpoint_key_file");
        if audit.file.is_none() {
            problems.push(doc.problem(&at, "needs `audit.file`: checkpoints sign the file's chain"));
        }
        if let Err(e) = crate::audit::chain::CheckpointKey::read(key) {
            problems.push(doc.problem(&at, e));
        }
    }
    if audit.checkpoint_seconds == 0 || audit.checkpoint_seconds > 86_400 {
        problems.push(doc.problem(
            &KeyPath::root().key("audit").key("checkpoint_seconds"),
            "must be between 1 and 86400",
        ));
    }
    if audit.rotate_bytes > 0 && audit.file.is_none() {
        problems.push(doc.problem(
            &KeyPath::root().key("audit").key("rotate_bytes"),
            "needs `audit.file`: only the file is rotated",
        ));
    }
    if let Some(cw) = &audit.cloudwatch {
        let at = KeyPath::root().key("audit").key("cloudwatch");
        if audit.file.is_none() {
            problems.push(doc.problem(
                &at,
                "needs `audit.file`: events are shipped from the file, which is the spool",
            ));
        }
        if cw.log_group.is_empty() || cw.log_group.len() > 512 {
            problems.push(doc.problem(&at.key("log_group"), "must be 1 to 512 characters"));
        }
        if cw.log_stream.is_empty() || cw.log_stream.contains(':') || cw.log_stream.contains('*') {
            problems.push(doc.problem(&at.key("log_stream"), "must be non-empty, without `:` or `*`"));
        }
        if !(1..=10_000).contains(&cw.batch_max_events) {
            problems.push(doc.problem(&at.key("batch_max_events"), "must be between 1 and 10000"));
        }
        if !(1024..=1_048_576).contains(&cw.batch_max_bytes) {
            problems.push(doc.problem(&at.key("batch_max_bytes"), "must be between 1024 and 1048576"));
        }
        if cw.flush_interval_ms == 0 {
            problems.push(doc.problem(&at.key("flush_interval_ms"), "must be greater than 0"));
        }
    }
}

fn check_approvals(doc: &Document, approvals: &ApprovalsConfig, problems: &mut Problems) {
    let at = KeyPath::root().key("approvals");
    if approvals.ttl_seconds == 0 {
        problems.push(doc.problem(&at.key("ttl_seconds"), "must be greater than 0"));
    }
    if let Some(w) = &approvals.webhook {
        let at = at.key("webhook");
        let url_ok = w
            .url
            .parse::<http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !url_ok {
            problems.push(doc.problem(&at.key("url"), "must be an https:// (or http://) URL"));
        }
        if w.secret_env.as_deref().is_some_and(str::is_empty) {
            problems.push(doc.problem(&at.key("secret_env"), "must name an environment variable"));
        }
        if w.timeout_ms == 0 {
            problems.push(doc.problem(&at.key("timeout_ms"), "must be greater than 0"));
        }
        if !(1..=20).contains(&w.max_attempts) {
            problems.push(doc.problem(&at.key("max_attempts"), "must be between 1 and 20"));
        }
        if w.backoff_ms == 0 || w.backoff_ms > 60_000 {
            problems.push(doc.problem(&at.key("backoff_ms"), "must be between 1 and 60000"));
        }
    }
}

fn parse_trusted_proxies(doc: &Document, texts: &[String], problems: &mut Problems) -> Vec<ipnet::IpNet> {
    let mut trusted_proxies = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        match admin::parse_net(text) {
            Some(net) => trusted_proxies.push(net),
            None => problems.push(doc.problem(
                &KeyPath::root().key("trusted_proxies").index(i),
                format!("`{text}` is not an IP address or a CIDR block like 10.0.0.0/8"),
            )),
        }
    }
    trusted_proxies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_every_default() {
        let c = ServerConfig::parse("c.yaml", "").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.limits.max_body_bytes, 1024 * 1024);
        assert_eq!(c.audit.file.as_deref(), Some(Path::new("var/audit.jsonl")));
        assert_eq!(
            c.workers,
            std::thread::available_parallelism().unwrap().get(),
            "one data-plane thread per CPU"
        );
    }

    #[test]
    fn workers_are_one_or_more() {
        assert_eq!(ServerConfig::parse("c.yaml", "workers: 3\n").unwrap().workers, 3);
        for bad in ["0", "1025"] {
            let err = ServerConfig::parse("c.yaml", &format!("listen: 127.0.0.1:1\nworkers: {bad}\n")).unwrap_err();
            assert_eq!(
                err.to_string(),
                "c.yaml:2:1: workers: must be between 1 and 1024",
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let err = ServerConfig::parse("c.yaml", "listen: 127.0.0.1:1\nlimitz: {}\n").unwrap_err();
        assert_eq!(err.to_string().lines().count(), 1);
        assert!(
            err.to_string()
                .starts_with("c.yaml:2:1: limitz: unknown field `limitz`"),
            "{err}"
        );
    }

    #[test]
    fn rotation_needs_the_file_it_rotates() {
        let c = ServerConfig::parse("c.yaml", "audit: { rotate_bytes: 1048576 }\n").unwrap();
        assert_eq!(c.audit.rotate_bytes, 1_048_576);
        let err = ServerConfig::parse("c.yaml", "audit: { file: null, rotate_bytes: 4096 }\n").unwrap_err();
        assert!(
            err.to_string().contains("audit.rotate_bytes: needs `audit.file`"),
            "{err}"
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_cidr_blocks() {
        let c = ServerConfig::parse(
            "c.yaml",
            "trusted_proxies: [ 10.0.0.0/8, 192.0.2.7, \"2001:db8::/32\" ]\n",
        )
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
        let err = ServerConfig::parse("c.yaml", "trusted_proxies: [ 10.0.0.0/8, lb.internal ]\n").unwrap_err();
        assert!(err.to_string().contains("trusted_proxies[1]"), "{err}");
        assert!(err.to_string().contains("`lb.internal` is not an IP address"), "{err}");
    }

    #[test]
    fn reports_every_semantic_problem_at_once() {
        let text = "limits: { max_json_depth: 500, max_body_bytes: 0 }\nstate: redis://:secret@x:1\n";
        let err = ServerConfig::parse("c.yaml", text).unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(err.to_string().contains("must not hold the password"), "{err}");
        assert!(
            !err.to_string().contains("secret"),
            "the password is not repeated: {err}"
        );
    }
}
