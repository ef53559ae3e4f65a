//! `toolgate test`: policy test cases, so a security team can try a change before it ships.
//!
//! A case file (`policies/tests/*.yaml` by default) lists calls and the decision each must get:
//!
//! ```yaml
//! cases:
//!   - name: a refund needs a fraud check first
//!     agent: support-bot
//!     tool: billing.refund
//!     args: { order_id: O-1, amount: 20 }
//!     session: s-1                        # optional
//!     history:                            # optional: the agent's earlier calls, oldest first
//!       - { tool: fraud.check, args: { order_id: O-1 }, ago: 10m, session: s-1 }
//!     expect: { decision: deny, code: rule_denied, rule: refund-needs-fraud-check }
//! ```
//!
//! Each case runs the same `Policy::evaluate` as the gateway (allowlist, schema, filters, rules
//! with the given history). Live state — rate limits, budgets, quarantine — is not part of a
//! case: it depends on traffic, not on the policy.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::yaml::{Document, KeyPath};
use crate::config::{ConfigError, Problem, Problems};
use crate::policy::history::{PastCall, Recorded, hash_value};
use crate::policy::{Decision, ParseLimits, Policy, ToolCall};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    cases: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    agent: String,
    tool: String,
    #[serde(default)]
    args: Map<String, Value>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    history: Vec<PriorCall>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorCall {
    tool: String,
    #[serde(default)]
    args: Map<String, Value>,
    /// How long before the case's call, e.g. `10m` (default 1s).
    #[serde(default)]
    ago: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `allow`, `deny` or `approval_required`.
    decision: String,
    #[serde(default)]
    code: Option<String>,
    /// The rule, filter or check that decided (`allowlist`, `schema`, a rule's `@id`…).
    #[serde(default)]
    rule: Option<String>,
    /// Shadow rules expected to report `would_deny` (exactly these, when given).
    #[serde(default)]
    would_deny: Option<Vec<String>>,
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub file: String,
    pub line: usize,
    pub name: String,
    /// Empty when the case passed.
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The case files in `dir` (`*.yaml`, `*.yml`), sorted.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let shown = dir.display().to_string();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(&shown, format!("cannot read the test directory: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::file(&shown, "no test case files (*.yaml) found"));
    }
    Ok(files)
}

/// Runs every case in `files` against `policy`. A malformed case file is an error (located),
/// not a failed case.
pub fn run(policy: &Policy, limits: ParseLimits, files: &[PathBuf]) -> Result<Vec<Outcome>, ConfigError> {
    let mut problems = Problems::default();
    let mut outcomes = Vec::new();
    for path in files {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                problems.extend(ConfigError::file(&name, format!("cannot read: {e}")));
                continue;
            }
        };
        let doc = match Document::parse(&name, &text) {
            Ok(d) => d,
            Err(e) => {
                problems.extend(e);
                continue;
            }
        };
        let file: CaseFile = match doc.decode(&KeyPath::root(), &doc.value) {
            Ok(f) => f,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        for (i, raw) in file.cases.iter().enumerate() {
            let at = KeyPath::root().key("cases").index(i);
            let case: Case = match doc.decode(&at, raw) {
                Ok(c) => c,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            match run_case(policy, limits, &case, &doc, &at) {
                Ok(failures) => {
                    let line = doc.problem(&at, "").line;
                    outcomes.push(Outcome {
                        file: name.clone(),
                        line,
                        name: case.name,
                        failures,
                    });
                }
                Err(p) => problems.push(p),
            }
        }
    }
    problems.finish(outcomes)
}

fn run_case(
    policy: &Policy,
    limits: ParseLimits,
    case: &Case,
    doc: &Document,
    at: &KeyPath,
) -> Result<Vec<String>, Problem> {
    if !matches!(case.expect.decision.as_str(), "allow" | "deny" | "approval_required") {
        return Err(doc.problem(
            &at.key("expect").key("decision"),
            "must be `allow`, `deny` or `approval_required`",
        ));
    }
    let now = SystemTime::now();
    let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut history = Recorded::default();
    for (j, prior) in case.history.iter().enumerate() {
        let ago = match &prior.ago {
            None => Duration::from_secs(1),
            Some(s) => humantime::parse_duration(s).map_err(|e| {
                doc.problem(
                    &at.key("history").index(j).key("ago"),
                    format!("not a duration like `10m`: {e}"),
                )
            })?,
        };
        // Kept as the gateway keeps it: only the values some fact compares, hashed.
        let fields = policy.recorded.get(&prior.tool).cloned().unwrap_or_default();
        let values = fields
            .iter()
            .filter_map(|f| prior.args.get(&**f).map(|v| (f.clone(), hash_value(v))))
            .collect();
        history.0.push((
            case.agent.clone(),
            PastCall {
                tool: prior.tool.as_str().into(),
                at_ms: now_ms.saturating_sub(ago.as_millis() as u64),
                session: prior.session.as_deref().map(Into::into),
                values,
            },
        ));
    }
    let body = serde_json::to_vec(&case.args).expect("JSON serialises");
    let call = ToolCall {
        session: case.session.as_deref(),
        now,
        ..ToolCall::new(&case.agent, &case.tool, &body)
    };
    let eval = policy.evaluate(&call, limits, &history);
    let (code, rule) = match &eval.decision {
        Decision::Allow => (None, None),
        Decision::Deny(r) => (Some(r.code.as_str()), Some(r.rule.as_str())),
    };
    let said = match &eval.decision {
        Decision::Allow => "allow".to_owned(),
        Decision::Deny(r) => format!(
            "{} ({}, rule {}: {})",
            eval.decision.as_str(),
            r.code.as_str(),
            r.rule,
            r.message
        ),
    };
    let mut failures = Vec::new();
    if eval.decision.as_str() != case.expect.decision {
        failures.push(format!("expected decision {}, got {said}", case.expect.decision));
    }
    if let Some(want) = &case.expect.code
        && code != Some(want.as_str())
    {
        failures.push(format!(
            "expected code {want}, got {}",
            code.unwrap_or("none (allowed)")
        ));
    }
    if let Some(want) = &case.expect.rule
        && rule != Some(want.as_str())
    {
        failures.push(format!(
            "expected rule {want}, got {}",
            rule.unwrap_or("none (allowed)")
        ));
    }
    if let Some(want) = &case.expect.would_deny {
        let mut want = want.clone();
        want.sort();
        if want != eval.would_deny {
            failures.push(format!("expected would_deny {want:?}, got {:?}", eval.would_deny));
        }
    }
    Ok(failures)
}

/// An earlier call of an agent: when (Unix ms), the tool, its arguments, its session.
type Earlier = (u64, String, Value, Option<String>);

/// `toolgate test --record`: the audit events with the given request ids as test cases, each
/// the call as recorded (its arguments as the audit kept them, redacted), the agent's earlier
/// calls that went through within the policy's history retention, and the decision it got.
/// Returns the cases, in the order of the trail, and the ids not found.
pub fn record(policy: &Policy, audit: &[PathBuf], ids: &[String]) -> std::io::Result<(Vec<Value>, Vec<String>)> {
    use serde_json::json;
    let retention = policy.history_retention.as_millis() as u64;
    // Per agent: (at_ms, tool, arguments, session) of the calls that went through.
    let mut earlier: std::collections::HashMap<String, Vec<Earlier>> = std::collections::HashMap::new();
    let mut cases = Vec::new();
    let mut found = std::collections::HashSet::new();
    for path in audit {
        crate::replay::tool_calls(path, |_, e| {
            let (Some(agent), Some(tool), Some(verdict)) = (e.agent.clone(), e.tool.clone(), e.verdict()) else {
                return;
            };
            let at = e.at_ms();
            let args = e
                .arguments
                .clone()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            let past = earlier.entry(agent.clone()).or_default();
            past.retain(|(t, ..)| at.saturating_sub(*t) <= retention);
            if ids.contains(&e.request_id) && found.insert(e.request_id.clone()) {
                let history: Vec<Value> = past
                    .iter()
                    .map(|(t, tool, args, session)| {
                        json!({"tool": tool, "args": args, "ago": format!("{}ms", at.saturating_sub(*t).max(1)), "session": session})
                    })
                    .collect();
                let mut expect = json!({"decision": verdict.decision});
                if let Some(code) = &verdict.code {
                    expect["code"] = json!(code);
                }
                if let Some(rule) = verdict.rule.as_ref().filter(|r| !r.is_empty()) {
                    expect["rule"] = json!(rule);
                }
                let mut case = json!({
                    "name": format!("recorded: {tool} by {agent} at {} (request {})", e.ts, e.request_id),
                    "agent": agent, "tool": tool, "args": args, "expect": expect,
                });
                if let Some(s) = &e.session {
                    case["session"] = json!(s);
                }
                if !history.is_empty() {
                    case["history"] = json!(history);
                }
                cases.push(case);
            }
            // As the gateway keeps history: the calls that went through, of the tools some rule
            // looks back at.
            let went_through = verdict.decision == "allow" || (e.approval_id.is_some() && e.decision == "allow");
            if went_through && policy.recorded.contains_key(&tool) {
                past.push((at, tool, args, e.session.clone()));
            }
        })?;
    }
    let missing = ids.iter().filter(|id| !found.contains(*id)).cloned().collect();
    Ok((cases, missing))
}

/// Appends `cases` to the case file `path` (created with its header if missing). Each case is
/// one line of JSON, which is YAML too.
pub fn append_cases(path: &Path, cases: &[Value]) -> std::io::Result<()> {
    use std::io::Write;
    let exists = path.exists();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if !exists {
        writeln!(
            f,
            "# Recorded from the audit trail by `toolgate test --record`: real calls and the decisions\n# they got (arguments as the audit kept them, redacted). Edit `expect` to the decision you want.\ncases:"
        )?;
    }
    for case in cases {
        writeln!(f, "  - {case}")?;
    }
    Ok(())
}
