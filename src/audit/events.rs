//! Every audit event as a type: its name ([`Event::NAME`]) and its fields, in one place. An
//! event is written as one JSON line, `{"ts": "…", "event": "<name>", …its fields}`; the
//! reference (docs/audit.md) lists them all.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use crate::policy::Reason;

/// A value toolgate records from a request's headers or path (a session id, an unknown tool's
/// name) as the trail may hold it: as it is if it is 1 to 128 characters of letters, digits,
/// `-`, `_`, `.`, `:` and no detector finds anything in it; otherwise `sha256:` and the hex
/// SHA-256 of it, so no PII or secret reaches the trail by that door, and the value can still
/// be matched by whoever knows it.
pub fn recorded(value: &str) -> std::borrow::Cow<'_, str> {
    if is_safe_text(value) && !crate::policy::content::holds_finding(value) {
        return std::borrow::Cow::Borrowed(value);
    }
    std::borrow::Cow::Owned(format!(
        "sha256:{}",
        crate::policy::arguments::sha256_hex(value.as_bytes())
    ))
}

/// 1 to 128 characters: letters, digits, `-`, `_`, `.`, `:`.
pub fn is_safe_text(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// An audit event: one kind of record, with its name.
pub trait Event: Serialize {
    /// The `event` field of its lines.
    const NAME: &'static str;

    /// The event as one newline-terminated JSON line, stamped now.
    fn to_line(&self) -> Vec<u8> {
        stamped(now(), self)
    }
}

/// `event` as a JSON line with `ts` and its name first.
pub(super) fn stamped<E: Event + ?Sized>(ts: Timestamp, event: &E) -> Vec<u8> {
    #[derive(Serialize)]
    struct Stamped<'a, E: ?Sized> {
        ts: Timestamp,
        event: &'static str,
        #[serde(flatten)]
        body: &'a E,
    }
    let mut line = serde_json::to_vec(&Stamped {
        ts,
        event: E::NAME,
        body: event,
    })
    .expect("audit events always serialise");
    line.push(b'\n');
    line
}

/// RFC 3339 UTC with milliseconds, as every event's `ts`.
pub fn now() -> Timestamp {
    rfc3339_millis(SystemTime::now())
}

/// An event's `ts`, `2026-11-30T12:00:00.123Z`: always 24 ASCII bytes, kept inline (every
/// event has one; a `String` would be an allocation per call).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp([u8; 24]);

impl Timestamp {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("RFC 3339 is ASCII")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `t` as `2026-11-30T12:00:00.123Z`. The date and time of day change once a second: each
/// thread formats them once per second and reuses them (every event has a timestamp, and
/// calendar arithmetic plus `fmt` cost more than the rest of the line's plain fields).
pub(super) fn rfc3339_millis(t: SystemTime) -> Timestamp {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let prefix = SECOND.with(|cell| {
        let (cached, prefix) = cell.get();
        if cached == secs {
            return prefix;
        }
        let mut prefix = [0; 19];
        let text =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string();
        prefix.copy_from_slice(&text.as_bytes()[..19]);
        cell.set((secs, prefix));
        prefix
    });
    let ms = since.subsec_millis();
    let mut out = [0u8; 24];
    out[..19].copy_from_slice(&prefix);
    out[19] = b'.';
    for (at, digit) in [ms / 100, ms / 10 % 10, ms % 10].into_iter().enumerate() {
        out[20 + at] = b'0' + digit as u8;
    }
    out[23] = b'Z';
    Timestamp(out)
}

/// A duration as the events' `duration_ms`: milliseconds, to the microsecond.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Unix seconds as RFC 3339 UTC.
pub fn format_unix(secs: u64) -> String {
    // Beyond year 9999 RFC 3339 has no form (and far beyond, `SystemTime` overflows).
    let secs = secs.min(253_402_300_799);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// `tokens` in a tool-call event: what flowed through the gateway, as budgets count it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

/// `upstream` in a tool-call event: what the tool did.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
}

/// `arguments` in a tool-call event.
#[derive(Debug)]
pub enum RecordedArguments {
    /// Built for the event: the shape, or a redacted copy.
    Value(Value),
    /// JSON text already serialised: the canonical body that was forwarded, when the audit
    /// redactor had nothing to change in it. Spliced in as it is instead of serialised again.
    Json(bytes::Bytes),
}

impl Serialize for RecordedArguments {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Value(v) => v.serialize(s),
            Self::Json(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(serde::ser::Error::custom)?;
                let raw: &serde_json::value::RawValue =
                    serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
                raw.serialize(s)
            }
        }
    }
}

/// `tool_call`: one decision on one tool call. Written by hand (`line.rs`), the same JSON
/// serde writes for it.
#[derive(Debug, Serialize)]
pub struct ToolCallEvent<'a> {
    /// When the call was decided (kept here: the line is written by hand).
    #[serde(skip)]
    pub ts: Timestamp,
    pub request_id: &'a str,
    /// The address the call came from (the connection's peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    pub session: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub decision: &'static str,
    pub code: Option<&'static str>,
    pub reasons: &'a [Reason],
    /// The arguments as forwarded (after redaction), or their shape: never raw caller values
    /// that no filter has seen.
    pub arguments: Option<RecordedArguments>,
    pub arguments_sha256: &'a str,
    pub upstream: Option<UpstreamInfo>,
    pub tokens: Option<Tokens>,
    /// The approval this call was held for, or passed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
    /// Shadow-mode rules that would have denied this call (not enforced).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub would_deny: &'a [String],
    /// What the shadow policy (`shadow_policies`) decided, when it differs from the enforced
    /// decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<&'a ShadowVerdict>,
    pub duration_ms: f64,
    pub policy_version: &'a str,
}

/// `request_refused`: a request refused before it became a tool call: an unknown endpoint, a
/// wrong method, a shed call, or a refusal at the MCP protocol level (origin, body, batch, not
/// JSON-RPC, credentials, session, protocol version). `message` is toolgate's own text, never
/// the caller's.
#[derive(Debug, Serialize)]
pub struct RequestRefused<'a> {
    pub request_id: &'a str,
    pub endpoint: &'static str,
    pub method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    pub agent: Option<&'a str>,
    pub status: u16,
    pub code: &'static str,
    pub message: &'a str,
}

impl Event for ToolCallEvent<'_> {
    const NAME: &'static str = "tool_call";

    fn to_line(&self) -> Vec<u8> {
        self.write_line()
    }
}

/// The shadow policy's decision on a call, when it differs from the one enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowVerdict {
    /// `allow`, `deny` or `approval_required`.
    pub decision: &'static str,
    pub code: Option<&'static str>,
    pub rule: Option<String>,
    /// The shadow policy's version.
    pub policy_version: String,
}

/// `call_forwarding`: a call every check admitted, recorded before it is sent to its tool. Its
/// outcome follows in the `tool_call` event with the same `request_id`; one without the other
/// means toolgate could not record how the call ended (it was killed, or the log failed, while
/// the tool ran): the tool may have acted. Written by hand (`line.rs`), as serde would.
#[derive(Debug, Serialize)]
pub struct CallForwarding<'a> {
    pub request_id: &'a str,
    pub agent: &'a str,
    pub tool: &'a str,
    pub arguments_sha256: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    /// The approval the call passes with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
    pub policy_version: &'a str,
}

impl Event for CallForwarding<'_> {
    const NAME: &'static str = "call_forwarding";

    fn to_line(&self) -> Vec<u8> {
        self.write_line(now())
    }
}

impl Event for RequestRefused<'_> {
    const NAME: &'static str = "request_refused";
}

/// Who did an admin action: the authenticated identity's name (`by`), the role it acted in,
/// and how it signed in (`via`). Flattened into the action's event.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct By<'a> {
    #[serde(rename = "by")]
    pub name: &'a str,
    /// `operator`, `approver`, `auditor`; absent for the gateway's own actions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    /// `token` (a personal token), `admin_token` (the shared `token_env` token), `oidc`,
    /// `proxy`, or `session` (signed in on the inbox page with one of those).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'a str>,
}

impl<'a> By<'a> {
    /// The gateway itself (an anomaly's quarantine, a first-seen pin).
    pub fn gateway(name: &'a str) -> Self {
        Self {
            name,
            role: None,
            via: None,
        }
    }
}

/// `policy_reloaded`: a new policy is in force. Written before it takes effect.
#[derive(Debug, Serialize)]
pub struct PolicyReloaded<'a> {
    pub policy_version: &'a str,
    pub previous_version: &'a str,
    /// `file_change`, `admin`, `refresh`, `tool_approved`, `retry`…
    pub trigger: &'a str,
    /// The operator who asked for the reload (`POST /admin/reload`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub by: Option<By<'a>>,
    /// The shadow policy (`shadow_policies`), decided beside the enforced one, was reloaded.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

impl Event for PolicyReloaded<'_> {
    const NAME: &'static str = "policy_reloaded";
}

/// `policy_reload_failed`: the files do not compile; the last good policy stays in force.
#[derive(Debug, Serialize)]
pub struct PolicyReloadFailed<'a> {
    /// The version still in force.
    pub policy_version: &'a str,
    pub errors: &'a [String],
    pub trigger: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub by: Option<By<'a>>,
    /// The shadow policy failed to load (the last good shadow policy is still decided beside).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

impl Event for PolicyReloadFailed<'_> {
    const NAME: &'static str = "policy_reload_failed";
}

/// `anomaly`: an agent's denials of one kind crossed their threshold within the window.
#[derive(Debug, Serialize)]
pub struct Anomaly<'a> {
    pub agent: &'a str,
    /// The denial code counted.
    pub kind: &'a str,
    pub count: usize,
    pub threshold: u32,
    pub window_seconds: u64,
    /// `quarantine` or `none`.
    pub action: &'static str,
    /// The call that crossed the threshold.
    pub request_id: &'a str,
}

impl Event for Anomaly<'_> {
    const NAME: &'static str = "anomaly";
}

/// `agent_quarantined`: every call of the agent is refused until `until`, or until released.
#[derive(Debug, Serialize)]
pub struct AgentQuarantined<'a> {
    pub agent: &'a str,
    /// The operator, or `anomaly`.
    #[serde(flatten)]
    pub by: By<'a>,
    pub reason: &'a str,
    /// Unix seconds; `null`: until an operator releases it.
    pub until: Option<u64>,
}

impl Event for AgentQuarantined<'_> {
    const NAME: &'static str = "agent_quarantined";
}

/// `agent_released`: an operator lifted a quarantine. Written before it takes effect.
#[derive(Debug, Serialize)]
pub struct AgentReleased<'a> {
    pub agent: &'a str,
    #[serde(flatten)]
    pub by: By<'a>,
    pub comment: &'a str,
    /// Unix seconds.
    pub quarantined_since: u64,
    pub quarantined_by: &'a str,
}

impl Event for AgentReleased<'_> {
    const NAME: &'static str = "agent_released";
}

/// `tool_definition_changed`: an upstream MCP tool no longer matches its pinned definition;
/// it is blocked until an operator approves the new one.
#[derive(Debug, Serialize)]
pub struct ToolDefinitionChanged<'a> {
    pub tool: &'a str,
    pub server: &'a str,
    pub pinned_sha256: &'a str,
    pub seen_sha256: &'a str,
    pub description_changed: bool,
    pub schema_changed: bool,
    pub trigger: &'a str,
}

impl Event for ToolDefinitionChanged<'_> {
    const NAME: &'static str = "tool_definition_changed";
}

/// `tool_pinned`: an upstream MCP tool seen for the first time; its definition is pinned.
#[derive(Debug, Serialize)]
pub struct ToolPinned<'a> {
    pub tool: &'a str,
    pub server: &'a str,
    pub sha256: &'a str,
    /// `first-seen`.
    pub by: &'a str,
}

impl Event for ToolPinned<'_> {
    const NAME: &'static str = "tool_pinned";
}

/// `tool_held`: an upstream MCP tool seen for the first time is held for an operator's review
/// instead of pinned: its definition looks like it hides instructions (`suspicious`: blocked
/// for every agent), or it is new on a server toolgate had listed before (`new`: callable only
/// by agents whose allowlist names it exactly).
#[derive(Debug, Serialize)]
pub struct ToolHeld<'a> {
    pub tool: &'a str,
    pub server: &'a str,
    pub sha256: &'a str,
    /// `suspicious` or `new`.
    pub reason: &'static str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub findings: &'a [String],
    pub trigger: &'a str,
}

impl Event for ToolHeld<'_> {
    const NAME: &'static str = "tool_held";
}

/// `tool_approved`: an operator approved an upstream MCP tool's current definition. Written
/// before it takes effect.
#[derive(Debug, Serialize)]
pub struct ToolApproved<'a> {
    pub tool: &'a str,
    pub server: &'a str,
    pub sha256: &'a str,
    #[serde(flatten)]
    pub by: By<'a>,
    pub comment: &'a str,
}

impl Event for ToolApproved<'_> {
    const NAME: &'static str = "tool_approved";
}

/// `approval_decided`: an approver approved or denied a held call. Written before the store
/// records it. With a quorum, each approver's approval is one event; `status` says where the
/// approval stands after it (`pending` until the quorum and every group are met).
#[derive(Debug, Serialize)]
pub struct ApprovalDecided<'a> {
    pub approval_id: &'a str,
    /// Where the approval stands after this decision: `approved`, `denied` or `pending`.
    pub status: &'static str,
    /// What this approver decided: `approve` or `deny`.
    pub decision: &'static str,
    #[serde(flatten)]
    pub by: By<'a>,
    pub comment: &'a str,
    /// Unix seconds.
    pub decided_at: u64,
    pub agent: &'a str,
    pub tool: &'a str,
    pub rule: &'a str,
    pub group: &'a str,
    /// Different people who must approve, and how many have (this one included).
    pub quorum: u32,
    pub approvals: usize,
    pub arguments_sha256: &'a str,
    /// The held call's request.
    pub request_id: &'a str,
}

impl Event for ApprovalDecided<'_> {
    const NAME: &'static str = "approval_decided";
}

/// `admin_signed_in`: someone signed in on the inbox page with a token (a session began).
#[derive(Debug, Serialize)]
pub struct AdminSignedIn<'a> {
    #[serde(flatten)]
    pub by: By<'a>,
    pub roles: &'a [&'a str],
    /// Unix seconds.
    pub expires_at: u64,
}

impl Event for AdminSignedIn<'_> {
    const NAME: &'static str = "admin_signed_in";
}

/// `admin_refused`: an authenticated admin caller asked for something its roles or groups do
/// not allow (an approver outside the approval's group, an auditor asking for a reload), or
/// a form without its CSRF token. Nothing was done.
#[derive(Debug, Serialize)]
pub struct AdminRefused<'a> {
    #[serde(flatten)]
    pub by: By<'a>,
    /// `METHOD /path` as asked.
    pub action: &'a str,
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
    pub request_id: &'a str,
}

impl Event for AdminRefused<'_> {
    const NAME: &'static str = "admin_refused";
}

/// `action_not_done`: an action whose event was written did not take effect after all (its
/// store failed): this takes the earlier event back.
#[derive(Debug, Serialize)]
pub struct ActionNotDone<'a> {
    /// The event it takes back.
    pub recorded_as: &'static str,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
}

impl Event for ActionNotDone<'_> {
    const NAME: &'static str = "action_not_done";
}

/// `audit_rotated`: the first line of a rotated-to file: which file holds the events before
/// it, and its size, so a reader can tell the chain of files is whole.
#[derive(Debug, Serialize)]
pub struct AuditRotated<'a> {
    pub previous_file: &'a str,
    pub previous_bytes: u64,
    /// `size` or `admin`.
    pub trigger: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub by: Option<By<'a>>,
}

impl Event for AuditRotated<'_> {
    const NAME: &'static str = "audit_rotated";
}

/// `refusals_summarized`: refusals of callers with no known agent, beyond their allowance,
/// counted per source and written once per `audit.unknown_callers.summary_seconds`.
#[derive(Debug, Clone, Serialize)]
pub struct RefusalsSummarized {
    /// The address (IPv4), its /64 (IPv6), or a wider block once too many are counted;
    /// `null`: every source beyond those.
    pub source: Option<String>,
    pub count: u64,
    pub codes: std::collections::BTreeMap<&'static str, u64>,
    pub first: String,
    pub last: String,
}

impl Event for RefusalsSummarized {
    const NAME: &'static str = "refusals_summarized";
}
