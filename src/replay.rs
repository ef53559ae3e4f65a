//! `toolgate replay`: the recorded `tool_call` events of audit files run through a candidate
//! policy, to see which real calls a change would have decided differently before it ships.
//!
//! Each event is decided again by the same `Policy::evaluate` the gateway runs (allowlist,
//! schema, filters, rules), at the time it was made, with the history the recording implies:
//! the agent's earlier calls that went through in the recording. What the policy does not
//! decide — rate limits, budgets, quarantine, the tool's own failures — is not replayed: an
//! event refused for those is compared on what the policy said before them (it passed).
//!
//! A recorded event's arguments are what the audit kept: redacted where a detector found
//! something. An event whose decision would change and whose arguments carry a redaction (or
//! were not recorded) is reported apart as *uncertain*, never counted as decided either way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::history::{History, PastCall, hash_value};
use crate::policy::{Code, Decision, ParseLimits, Policy, ToolCall};

/// How a call was decided, as far as the policy goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `allow`, `deny` or `approval_required`.
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl Verdict {
    fn allow() -> Self {
        Self {
            decision: "allow".to_owned(),
            code: None,
            stage: None,
            rule: None,
        }
    }

    fn text(&self) -> String {
        match (&self.code, &self.rule) {
            (None, _) => self.decision.clone(),
            (Some(c), Some(r)) if !r.is_empty() && r != c => format!("{} ({c}, rule {r})", self.decision),
            (Some(c), _) => format!("{} ({c})", self.decision),
        }
    }
}

/// One call the candidate decides differently.
#[derive(Debug, Serialize)]
pub struct Change {
    pub file: String,
    pub line: u64,
    pub ts: String,
    pub request_id: String,
    pub agent: String,
    pub tool: String,
    pub before: Verdict,
    pub after: Verdict,
    /// Why the change is not certain (redacted or unrecorded arguments), if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncertain: Option<&'static str>,
}

/// What a replay found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub policy_version: String,
    pub files: Vec<String>,
    /// `tool_call` events decided again.
    pub replayed: u64,
    /// Events not replayed: no agent (unauthenticated), or not a policy decision.
    pub skipped: u64,
    /// Calls whose decision changes (allow, deny, held): what gates a change.
    pub changed: Vec<Change>,
    /// Same decision, another code or rule.
    pub reason_changed: Vec<Change>,
    /// Would change, but the recorded arguments cannot say for sure.
    pub uncertain: Vec<Change>,
    pub by_agent: BTreeMap<String, u64>,
    pub by_tool: BTreeMap<String, u64>,
    pub by_rule: BTreeMap<String, u64>,
}

/// The agents' earlier calls as the recording implies them, within the policy's retention.
struct Replayed {
    calls: HashMap<String, VecDeque<PastCall>>,
    retention_ms: u64,
}

impl History for Replayed {
    fn visit(&self, agent: &str, since_ms: u64, visit: &mut dyn FnMut(&PastCall)) {
        if let Some(calls) = self.calls.get(agent) {
            calls.iter().filter(|c| c.at_ms >= since_ms).for_each(visit);
        }
    }
}

impl Replayed {
    fn record(&mut self, agent: &str, call: PastCall) {
        let calls = self.calls.entry(agent.to_owned()).or_default();
        let oldest = call.at_ms.saturating_sub(self.retention_ms);
        while calls.front().is_some_and(|c| c.at_ms < oldest) {
            calls.pop_front();
        }
        calls.push_back(call);
    }
}

/// The fields of a `tool_call` event that replay and `test --record` read.
#[derive(Deserialize)]
pub(crate) struct Event {
    event: String,
    #[serde(default)]
    pub ts: String,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub decision: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    reasons: Vec<RecordedReason>,
    #[serde(default)]
    pub arguments: Option<Value>,
    #[serde(default)]
    pub approval_id: Option<String>,
}

#[derive(Deserialize)]
struct RecordedReason {
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    rule: Option<String>,
}

impl Event {
    /// The policy's verdict as recorded, or `None` when the event is not a policy decision.
    pub(crate) fn verdict(&self) -> Option<Verdict> {
        recorded(self)
    }

    /// When the call was made, Unix milliseconds.
    pub(crate) fn at_ms(&self) -> u64 {
        unix_ms(&self.ts).unwrap_or(0)
    }
}

/// Calls `each` with every `tool_call` event of `path` and its line number (1-based).
pub(crate) fn tool_calls(path: &Path, mut each: impl FnMut(u64, Event)) -> std::io::Result<()> {
    let text = std::fs::read(path)?;
    for (n, line) in text.split(|b| *b == b'\n').enumerate() {
        // Cheap first look: most lines of a busy trail are tool calls, but not all.
        if line.is_empty() || !contains(line, b"\"event\":\"tool_call\"") {
            continue;
        }
        if let Ok(e) = serde_json::from_slice::<Event>(line)
            && e.event == "tool_call"
        {
            each(n as u64 + 1, e);
        }
    }
    Ok(())
}

/// The codes the policy itself gives; any other refusal came after the policy allowed the call.
const POLICY_CODES: [&str; 6] = [
    "tool_not_allowed",
    "invalid_arguments",
    "content_blocked",
    "rule_denied",
    "approval_required",
    "tool_changed",
];

/// The policy's verdict as recorded, or `None` when the event is not a policy decision.
fn recorded(e: &Event) -> Option<Verdict> {
    let last = e.reasons.last();
    match e.code.as_deref() {
        // A call sent with an approval: the policy held it (its approval was then spent or
        // refused).
        _ if (e.approval_id.is_some() && e.decision != "approval_required")
            || e.code.as_deref() == Some("approval_denied") =>
        {
            Some(Verdict {
                decision: "approval_required".to_owned(),
                code: Some("approval_required".to_owned()),
                stage: Some("rules".to_owned()),
                rule: None,
            })
        }
        None => Some(Verdict::allow()),
        Some(code) if POLICY_CODES.contains(&code) => Some(Verdict {
            decision: if code == "approval_required" { code } else { "deny" }.to_owned(),
            code: Some(code.to_owned()),
            stage: last.and_then(|r| r.stage.clone()),
            rule: last.and_then(|r| r.rule.clone()),
        }),
        // Unauthenticated, malformed: decided before the policy; nothing to replay.
        Some("unauthenticated" | "invalid_request" | "payload_too_large" | "request_timeout") => None,
        // Limits, quarantine, the tool's failures: the policy had allowed it.
        Some(_) => Some(Verdict::allow()),
    }
}

fn verdict(decision: &Decision) -> Verdict {
    match decision {
        Decision::Allow => Verdict::allow(),
        Decision::Deny(r) => Verdict {
            decision: if r.code == Code::ApprovalRequired {
                "approval_required"
            } else {
                "deny"
            }
            .to_owned(),
            code: Some(r.code.as_str().to_owned()),
            stage: serde_json::to_value(r.stage)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
            rule: Some(r.rule.clone()),
        },
    }
}

fn has_redaction(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("[REDACTED"),
        Value::Array(a) => a.iter().any(has_redaction),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains("[REDACTED") || has_redaction(v)),
        _ => false,
    }
}

fn unix_ms(ts: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(ts).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// Replays every `tool_call` event of `files` (in the order given) through `policy`.
pub fn replay(policy: &Policy, limits: ParseLimits, files: &[PathBuf]) -> std::io::Result<Report> {
    let mut report = Report {
        policy_version: policy.version.clone(),
        ..Report::default()
    };
    let mut history = Replayed {
        calls: HashMap::new(),
        retention_ms: policy.history_retention.as_millis() as u64,
    };
    for path in files {
        report.files.push(path.display().to_string());
        replay_file(policy, limits, path, &mut history, &mut report)?;
    }
    Ok(report)
}

fn replay_file(
    policy: &Policy,
    limits: ParseLimits,
    path: &Path,
    history: &mut Replayed,
    report: &mut Report,
) -> std::io::Result<()> {
    let name = path.display().to_string();
    tool_calls(path, |n, e| replay_one(policy, limits, &name, n, e, history, report))
}

fn replay_one(
    policy: &Policy,
    limits: ParseLimits,
    name: &str,
    n: u64,
    e: Event,
    history: &mut Replayed,
    report: &mut Report,
) {
    {
        let (Some(agent), Some(tool), Some(before)) = (e.agent.as_deref(), e.tool.as_deref(), recorded(&e)) else {
            report.skipped += 1;
            return;
        };
        report.replayed += 1;
        let at_ms = unix_ms(&e.ts).unwrap_or(0);
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms);
        let arguments = e.arguments.as_ref().filter(|a| a.is_object());
        let call = ToolCall {
            session: e.session.as_deref(),
            now,
            ..ToolCall::new(agent, tool, b"")
        };
        // Already parsed: decided as the same arguments sent as a body would be, without
        // writing them out and reading them again.
        let args = match arguments {
            Some(Value::Object(m)) => m.clone(),
            _ => serde_json::Map::new(),
        };
        let after = verdict(&policy.evaluate_parsed(&call, args, limits, history).decision);
        // What went through in the recording is what later rules look back at — of the tools
        // some rule looks back at, as the gateway keeps it.
        let went_through = before.decision == "allow" || e.approval_id.is_some() && e.decision == "allow";
        if let Some(fields) = policy.recorded.get(tool).filter(|_| went_through) {
            let values = match arguments {
                Some(Value::Object(m)) => fields
                    .iter()
                    .filter_map(|f| m.get(&**f).map(|v| (f.clone(), hash_value(v))))
                    .collect(),
                _ => Vec::new(),
            };
            history.record(
                agent,
                PastCall {
                    tool: Arc::from(tool),
                    at_ms,
                    session: e.session.as_deref().map(Arc::from),
                    values,
                },
            );
        }
        // A rule the recording does not name (a held call let through by its approval) is
        // not a difference.
        let same = after.decision == before.decision
            && after.code == before.code
            && (before.rule.is_none() || after.rule == before.rule);
        if same {
            return;
        }
        // The candidate's decision rests on the arguments unless it refused before reading
        // them (the allowlist): only then can redacted or missing arguments leave it in doubt.
        let read_arguments = !matches!(after.stage.as_deref(), Some("authentication" | "allowlist"));
        let uncertain = match arguments {
            _ if !read_arguments => None,
            None => Some("the arguments were not recorded"),
            Some(a) if has_redaction(a) => Some("the recorded arguments are redacted"),
            Some(_) => None,
        };
        let kind_changed = after.decision != before.decision;
        let change = Change {
            file: name.to_owned(),
            line: n,
            ts: e.ts.clone(),
            request_id: e.request_id.clone(),
            agent: agent.to_owned(),
            tool: tool.to_owned(),
            before,
            after,
            uncertain,
        };
        if uncertain.is_some() && kind_changed {
            report.uncertain.push(change);
        } else if kind_changed {
            *report.by_agent.entry(change.agent.clone()).or_default() += 1;
            *report.by_tool.entry(change.tool.clone()).or_default() += 1;
            let rule = change
                .after
                .rule
                .clone()
                .or_else(|| change.before.rule.clone())
                .unwrap_or_else(|| "(none)".to_owned());
            *report.by_rule.entry(rule).or_default() += 1;
            report.changed.push(change);
        } else {
            report.reason_changed.push(change);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// The report as text: the changes, then the counts.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} tool call(s) from {} file(s) against policy {} ({} skipped: unauthenticated or refused before the policy)",
        report.replayed,
        report.files.len(),
        report.policy_version,
        report.skipped
    );
    let line = |out: &mut String, c: &Change| {
        let _ = writeln!(
            out,
            "  {}  {}  {} → {}  {}  {}  [{}:{}]",
            c.ts,
            c.request_id,
            c.before.text(),
            c.after.text(),
            c.agent,
            c.tool,
            c.file,
            c.line
        );
    };
    let _ = writeln!(out, "\n{} call(s) would be decided differently:", report.changed.len());
    for c in &report.changed {
        line(&mut out, c);
    }
    if !report.changed.is_empty() {
        for (what, counts) in [
            ("agent", &report.by_agent),
            ("tool", &report.by_tool),
            ("rule", &report.by_rule),
        ] {
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "  by {what}: {}", list.join(", "));
        }
    }
    if !report.uncertain.is_empty() {
        let _ = writeln!(
            out,
            "\n{} call(s) might change, but their recorded arguments cannot tell (not counted above):",
            report.uncertain.len()
        );
        for c in &report.uncertain {
            line(&mut out, c);
            let _ = writeln!(out, "      {}", c.uncertain.unwrap_or_default());
        }
    }
    if !report.reason_changed.is_empty() {
        let _ = writeln!(
            out,
            "\n{} call(s) keep their decision for another reason:",
            report.reason_changed.len()
        );
        for c in &report.reason_changed {
            line(&mut out, c);
        }
    }
    out
}
