//! Business rules: Cedar `forbid`s over the call, compiled once per policy load.
//!
//! The allowlist is the permit; rules only take away. Each tool gets its own policy set (an
//! internal `permit` plus the forbids whose action scope can match it), so a call only pays for
//! the rules that could apply to it, and a tool without rules skips Cedar entirely.
//!
//! Cedar skips a policy whose evaluation errors; for a `forbid` that would let the call through.
//! Here any evaluation error denies (fail closed), and load-time validation against a schema
//! generated from the tools' argument schemas catches most such rules before they ship.
//!
//! Annotations: `@id` (required, unique: named in errors and audit events), `@reason` (the
//! message the agent sees), `@approval("group")` (the forbid holds the call for approval instead
//! of denying it), `@mode("shadow")` (evaluated and audited as `would_deny`, never enforced).

pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use cedar_policy::{
    ActionConstraint, AuthorizationError, Authorizer, Context, Effect, Entities, Entity, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde_json::{Map, Value, json};

use super::history::{self, Fact, FactResult, FactValue, History};
use super::{Agent, Code, Reason, Stage, tool::Tool};
use crate::FastMap;
use crate::config::Problem;
use schema::ArgType;

/// What a rule says about itself.
#[derive(Debug, Clone)]
pub struct RuleMeta {
    pub id: String,
    pub reason: Option<String>,
    pub approval: Option<String>,
    /// `@quorum("2")` on an approval rule: different people who must approve (default 1).
    pub quorum: u32,
    pub shadow: bool,
    pub file: String,
}

/// The rules that can apply to one tool.
struct ToolRules {
    action: EntityUid,
    resource: EntityUid,
    input: ArgType,
    facts: Vec<Fact>,
    /// Whether any of the tool's rules reads `context.time` / `context.session` (by their text:
    /// a false positive only costs the attribute). Absent attributes a rule did read would be
    /// an evaluation error, which denies.
    needs_time: bool,
    needs_session: bool,
    /// Every forbid that can apply, shadow ones included: one `is_authorized` answers for both.
    /// There is no permit (the allowlist already permitted the call), so Cedar's decision is
    /// always deny; what counts is its diagnostics: the forbids that matched, and the errors.
    policies: PolicySet,
}

/// Every rule file, compiled.
pub struct Rules {
    tools: FastMap<String, ToolRules>,
    agents: HashMap<String, EntityUid>,
    entities: Entities,
    meta: HashMap<String, RuleMeta>,
    authorizer: Authorizer,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").field("rules", &self.meta.len()).finish()
    }
}

/// The rules' verdict on one call.
#[derive(Debug, Default)]
pub struct Verdict {
    /// `rule_denied`, or `approval_required` when every forbid that matched asks for approval.
    pub blocked: Option<Reason>,
    /// When `blocked` is `approval_required`: every approval rule that matched, `(id, group)`,
    /// sorted. One approval must cover all of them.
    pub approvals: Vec<(String, String)>,
    /// The largest `@quorum` of those rules (1 when none says).
    pub quorum: u32,
    /// Shadow rules that would have denied.
    pub would_deny: Vec<String>,
}

impl Rules {
    pub fn empty() -> Rules {
        Rules {
            tools: FastMap::default(),
            agents: HashMap::new(),
            entities: Entities::empty(),
            meta: HashMap::new(),
            authorizer: Authorizer::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// The rules in force, for `/admin/policy` and `explain`.
    pub fn list(&self) -> impl Iterator<Item = &RuleMeta> {
        self.meta.values()
    }

    /// Whether the rule `id` can match calls to `tool` (its action scope names the tool).
    pub fn rule_applies(&self, id: &str, tool: &str) -> bool {
        self.tools
            .get(tool)
            .is_some_and(|t| t.policies.policy(&PolicyId::new(id)).is_some())
    }

    /// Whether calls to `tool` consult rules at all.
    pub fn applies_to(&self, tool: &str) -> bool {
        self.tools.contains_key(tool)
    }

    /// Compiles rule files `(name, text)` against the compiled tools and agents. Every problem is
    /// located at `FILE:LINE:COL`.
    pub fn compile(
        sources: &[(String, String)],
        tools: &BTreeMap<String, Tool>,
        agents: &FastMap<String, Agent>,
        problems: &mut Vec<Problem>,
    ) -> Rules {
        let before = problems.len();
        let inputs: BTreeMap<&str, ArgType> = tools
            .iter()
            .map(|(name, t)| (name.as_str(), ArgType::of_arguments(t.schema_source.as_ref())))
            .collect();
        let schema = match Schema::from_json_value(cedar_schema(tools, &inputs)) {
            Ok(s) => s,
            Err(e) => {
                // Generated from validated tools; a failure is a bug, reported where it can be seen.
                let file = sources.first().map_or("policies", |(n, _)| n.as_str());
                problems.push(problem(file, "", 0, format!("cannot build the rule schema: {e}")));
                return Rules::empty();
            }
        };

        let (all, meta, located) = parse_rules(sources, problems);
        let validation = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
        for e in validation.validation_errors() {
            let id = e.policy_id().to_string();
            let (file, offset) = located.get(&id).cloned().unwrap_or_default();
            let text = sources.iter().find(|(n, _)| *n == file).map_or("", |(_, t)| t.as_str());
            let offset = first_offset(e).max(offset).min(text.len());
            let mut msg = e.to_string();
            if let Some(help) = e.help() {
                msg.push_str(&format!(" ({help})"));
            } else if msg.contains("decimal") {
                msg.push_str(" (arguments of `type: number` are decimals: compare them with methods, e.g. `context.input.amount.greaterThan(decimal(\"100.0\"))`)");
            }
            problems.push(problem(&file, text, offset, msg));
        }

        let (agent_uids, entities) = build_entities(tools, agents, &schema, problems);
        if problems.len() != before {
            return Rules::empty();
        }

        let per_tool = rules_per_tool(&all, tools, &inputs);
        Rules {
            tools: per_tool,
            agents: agent_uids,
            entities,
            meta,
            authorizer: Authorizer::new(),
        }
    }

    /// The rules' verdict on a call whose arguments passed every static check. `Err` is a safe
    /// message for `invalid_arguments` (a number rules cannot compare exactly).
    pub fn evaluate(
        &self,
        agent: &str,
        tool: &str,
        session: Option<&str>,
        now: SystemTime,
        args: &Map<String, Value>,
        history: &dyn History,
    ) -> Result<Verdict, String> {
        let Some(t) = self.tools.get(tool) else {
            return Ok(Verdict::default());
        };
        let Some(principal) = self.agents.get(agent) else {
            return Ok(Verdict::default());
        };
        let context = context(t, agent, session, now, args, history)?;
        let request = Request::new(principal.clone(), t.action.clone(), t.resource.clone(), context, None)
            .map_err(|_| "the arguments cannot be compared by rules".to_owned())?;

        let response = self.authorizer.is_authorized(&request, &t.policies, &self.entities);
        Ok(self.verdict(&response))
    }

    /// What the forbids that matched (and those that could not be evaluated) make of a call:
    /// an error denies; a hard forbid outranks any approval; shadow rules only report.
    fn verdict(&self, r: &cedar_policy::Response) -> Verdict {
        let mut verdict = Verdict::default();
        let mut errored: Vec<&RuleMeta> = Vec::new();
        for id in r.diagnostics().errors().map(failed_policy) {
            let m = &self.meta[id.as_ref() as &str];
            if m.shadow {
                verdict.would_deny.push(m.id.clone());
            } else {
                errored.push(m);
            }
        }
        let mut fired: Vec<&RuleMeta> = Vec::new();
        for id in r.diagnostics().reason() {
            let Some(m) = self.meta.get(id.as_ref() as &str) else {
                continue;
            };
            if m.shadow {
                verdict.would_deny.push(m.id.clone());
            } else {
                fired.push(m);
            }
        }
        verdict.would_deny.sort();
        verdict.would_deny.dedup();
        errored.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(m) = errored.first() {
            verdict.blocked = Some(Reason::new(
                Code::RuleDenied,
                Stage::Rules,
                m.id.clone(),
                format!(
                    "Rule '{}' could not be evaluated for this call, so the call was denied.",
                    m.id
                ),
            ));
            return verdict;
        }
        // A hard forbid outranks any approval; among equals, the first id decides (stable).
        fired.sort_by(|a, b| (a.approval.is_some(), &a.id).cmp(&(b.approval.is_some(), &b.id)));
        let Some(m) = fired.first() else {
            return verdict;
        };
        verdict.blocked = Some(match &m.approval {
            Some(group) => {
                verdict.approvals = fired
                    .iter()
                    .filter_map(|r| r.approval.as_ref().map(|g| (r.id.clone(), g.clone())))
                    .collect();
                verdict.quorum = fired
                    .iter()
                    .filter(|r| r.approval.is_some())
                    .map(|r| r.quorum)
                    .max()
                    .unwrap_or(1);
                Reason::new(
                    Code::ApprovalRequired,
                    Stage::Rules,
                    m.id.clone(),
                    m.reason
                        .clone()
                        .unwrap_or_else(|| format!("This call needs approval from '{group}'.")),
                )
            }
            None => Reason::new(
                Code::RuleDenied,
                Stage::Rules,
                m.id.clone(),
                m.reason
                    .clone()
                    .unwrap_or_else(|| format!("Rule '{}' forbids this call.", m.id)),
            ),
        });
        verdict
    }
}

fn failed_policy(e: &AuthorizationError) -> &PolicyId {
    match e {
        AuthorizationError::PolicyEvaluationError(e) => e.policy_id(),
    }
}

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(kind.parse().expect("a valid type name"), id.parse().expect("any id"))
}

/// Cedar's JSON schema: `Agent` (string tags from `attributes`), `Tool`, and one action per
/// tool whose context is `{input, session, time, history?}`.
fn cedar_schema(tools: &BTreeMap<String, Tool>, inputs: &BTreeMap<&str, ArgType>) -> Value {
    let time = json!({"type": "Record", "attributes": {
        "unix": {"type": "Long"}, "hour": {"type": "Long"}, "weekday": {"type": "Long"}}});
    let actions: Map<String, Value> = tools
        .iter()
        .map(|(name, tool)| {
            let mut attrs = json!({
                "input": inputs[name.as_str()].to_cedar(),
                "session": {"type": "String"},
                "time": time,
            });
            if !tool.facts.is_empty() {
                let facts: Map<String, Value> = tool
                    .facts
                    .iter()
                    .map(|f| {
                        let t = match f.value {
                            FactValue::Exists => "Boolean",
                            FactValue::Count => "Long",
                        };
                        (f.name.clone(), json!({"type": t}))
                    })
                    .collect();
                attrs["history"] = json!({"type": "Record", "attributes": facts});
            }
            let applies = json!({"principalTypes": ["Agent"], "resourceTypes": ["Tool"],
                "context": {"type": "Record", "attributes": attrs}});
            (name.clone(), json!({"appliesTo": applies}))
        })
        .collect();
    json!({"": {
        "entityTypes": {
            "Agent": {"shape": {"type": "Record", "attributes": {}}, "tags": {"type": "String"}},
            "Tool": {"shape": {"type": "Record", "attributes": {}}}
        },
        "actions": actions
    }})
}

fn first_offset(d: &dyn Diagnostic) -> usize {
    d.labels().and_then(|mut l| l.next()).map_or(0, |l| l.offset())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
        + 1;
    (line, col)
}

fn problem(file: &str, text: &str, offset: usize, message: impl Into<String>) -> Problem {
    let (line, col) = line_col(text, offset);
    Problem {
        file: file.to_owned(),
        line,
        col,
        path: String::new(),
        message: message.into(),
    }
}

/// The context a tool's rules see: its arguments (`context.input`), and as the rules need them
/// the session, the time and the facts about earlier calls (`context.history`).
fn context(
    t: &ToolRules,
    agent: &str,
    session: Option<&str>,
    now: SystemTime,
    args: &Map<String, Value>,
    history: &dyn History,
) -> Result<Context, String> {
    let input = t.input.to_record_expr(args)?;
    let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let secs = (now_ms / 1000) as i64;
    let mut pairs = Vec::with_capacity(4);
    pairs.push(("input".to_owned(), input));
    if t.needs_session {
        let session = RestrictedExpression::new_string(session.unwrap_or("").to_owned());
        pairs.push(("session".to_owned(), session));
    }
    if t.needs_time {
        let time = RestrictedExpression::new_record([
            ("unix".to_owned(), RestrictedExpression::new_long(secs)),
            (
                "hour".to_owned(),
                RestrictedExpression::new_long(secs.rem_euclid(86_400) / 3600),
            ),
            // 1970-01-01 was a Thursday; ISO weekday, Monday = 1.
            (
                "weekday".to_owned(),
                RestrictedExpression::new_long((secs.div_euclid(86_400) + 3).rem_euclid(7) + 1),
            ),
        ])
        .expect("distinct keys");
        pairs.push(("time".to_owned(), time));
    }
    if !t.facts.is_empty() {
        let results = history::compute(&t.facts, history, agent, session, now_ms, args);
        let fields = t.facts.iter().zip(results).map(|(f, r)| {
            let v = match r {
                FactResult::Exists(b) => RestrictedExpression::new_bool(b),
                FactResult::Count(n) => RestrictedExpression::new_long(n),
            };
            (f.name.clone(), v)
        });
        pairs.push((
            "history".to_owned(),
            RestrictedExpression::new_record(fields).expect("fact names are unique"),
        ));
    }
    Context::from_pairs(pairs).map_err(|_| "the arguments cannot be compared by rules".to_owned())
}

/// Every rule file parsed, and each rule checked: a `forbid`, with a unique `@id`, known
/// annotations and valid values. The rules (renamed to their ids), what each says about itself,
/// and where each id was defined.
#[allow(clippy::type_complexity)]
fn parse_rules(
    sources: &[(String, String)],
    problems: &mut Vec<Problem>,
) -> (PolicySet, HashMap<String, RuleMeta>, HashMap<String, (String, usize)>) {
    let mut all = PolicySet::new();
    let mut meta: HashMap<String, RuleMeta> = HashMap::new();
    let mut located: HashMap<String, (String, usize)> = HashMap::new();
    for (file, text) in sources {
        let set = match PolicySet::from_str(text) {
            Ok(set) => set,
            Err(errs) => {
                for e in errs.iter() {
                    problems.push(problem(file, text, first_offset(e), e.to_string()));
                }
                continue;
            }
        };
        if set.templates().next().is_some() {
            problems.push(problem(
                file,
                text,
                0,
                "templates (`?principal`, `?resource`) are not supported in rule files",
            ));
        }
        let mut search_from = 0;
        let mut ordered: Vec<&Policy> = set.policies().collect();
        ordered.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(0)
        });
        for p in ordered {
            let src = p.to_string();
            let at = text[search_from..]
                .find(src.as_str())
                .map_or(search_from, |i| search_from + i);
            search_from = at + src.len().min(text.len() - at);
            let mut here = |msg: String| problems.push(problem(file, text, at, msg));
            if p.effect() == Effect::Permit {
                here("rules may only `forbid`: the agents' allowlists are the permits".to_owned());
                continue;
            }
            let Some(id) = p.annotation("id").filter(|id| !id.trim().is_empty()) else {
                here("every rule needs an `@id(\"…\")`: it names the rule in errors and audit events".to_owned());
                continue;
            };
            if let Some((prev_file, prev_at)) = located.get(id) {
                let prev_text = sources
                    .iter()
                    .find(|(n, _)| n == prev_file)
                    .map_or("", |(_, t)| t.as_str());
                let (line, col) = line_col(prev_text, *prev_at);
                here(format!("rule id `{id}` is already used at {prev_file}:{line}:{col}"));
                continue;
            }
            let shadow = match p.annotation("mode") {
                None | Some("enforce") => false,
                Some("shadow") => true,
                Some(other) => {
                    here(format!("@mode must be \"enforce\" or \"shadow\", not \"{other}\""));
                    continue;
                }
            };
            let approval = p.annotation("approval").map(str::to_owned);
            if approval.as_deref().is_some_and(|g| g.trim().is_empty()) {
                here("@approval needs the approver group, e.g. @approval(\"billing-leads\")".to_owned());
                continue;
            }
            if approval.as_deref().is_some_and(|g| g.contains(',') || g.trim() != g) {
                here("@approval names one approver group, without commas or surrounding spaces".to_owned());
                continue;
            }
            let quorum = match p.annotation("quorum") {
                None => 1,
                Some(_) if approval.is_none() => {
                    here("@quorum applies to an @approval rule only".to_owned());
                    continue;
                }
                Some(q) => match q.parse::<u32>() {
                    Ok(n @ 1..=10) => n,
                    _ => {
                        here(format!("@quorum must be a number of people from 1 to 10, not \"{q}\""));
                        continue;
                    }
                },
            };
            for (key, _) in p.annotations() {
                if !matches!(key, "id" | "reason" | "approval" | "mode" | "quorum") {
                    here(format!(
                        "unknown annotation `@{key}` (known: @id, @reason, @approval, @quorum, @mode)"
                    ));
                }
            }
            located.insert(id.to_owned(), (file.clone(), at));
            meta.insert(
                id.to_owned(),
                RuleMeta {
                    id: id.to_owned(),
                    reason: p.annotation("reason").map(str::to_owned),
                    approval,
                    quorum,
                    shadow,
                    file: file.clone(),
                },
            );
            let renamed = p.new_id(PolicyId::new(id));
            all.add(renamed).expect("ids are unique");
        }
    }
    (all, meta, located)
}

/// The agents (with their attributes as tags) and tools as Cedar entities.
fn build_entities(
    tools: &BTreeMap<String, Tool>,
    agents: &FastMap<String, Agent>,
    schema: &Schema,
    problems: &mut Vec<Problem>,
) -> (HashMap<String, EntityUid>, Entities) {
    let mut agent_uids = HashMap::new();
    let mut entities = Vec::new();
    for (id, agent) in agents {
        let uid = uid("Agent", id);
        let tags = agent
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone())));
        match Entity::new_with_tags(uid.clone(), [], [], tags) {
            Ok(e) => entities.push(e),
            Err(e) => problems.push(problem("policies", "", 0, format!("agent `{id}`: {e}"))),
        }
        agent_uids.insert(id.clone(), uid);
    }
    for name in tools.keys() {
        entities.push(Entity::new_no_attrs(uid("Tool", name), Default::default()));
    }
    let entities = match Entities::from_entities(entities, Some(schema)) {
        Ok(e) => e,
        Err(e) => {
            problems.push(problem("policies", "", 0, format!("cannot build rule entities: {e}")));
            Entities::empty()
        }
    };
    (agent_uids, entities)
}

/// Each tool's own policy set: the forbids whose action scope can match it. A tool no rule can
/// match has none, and skips Cedar.
fn rules_per_tool(
    all: &PolicySet,
    tools: &BTreeMap<String, Tool>,
    inputs: &BTreeMap<&str, ArgType>,
) -> FastMap<String, ToolRules> {
    let mut per_tool = FastMap::default();
    for (name, tool) in tools {
        let action = uid("Action", name);
        let applicable: Vec<&Policy> = all
            .policies()
            .filter(|p| match p.action_constraint() {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(a) => a == action,
                ActionConstraint::In(list) => list.contains(&action),
            })
            .collect();
        if applicable.is_empty() {
            continue;
        }
        let texts: Vec<String> = applicable.iter().map(|p| p.to_string()).collect();
        let needs_time = texts.iter().any(|t| t.contains("time"));
        let needs_session = texts.iter().any(|t| t.contains("session"));
        let mut policies = PolicySet::new();
        for p in applicable {
            policies.add(p.clone()).expect("unique");
        }
        per_tool.insert(
            name.clone(),
            ToolRules {
                action,
                resource: uid("Tool", name),
                input: inputs[name.as_str()].clone(),
                facts: tool.facts.clone(),
                needs_time,
                needs_session,
                policies,
            },
        );
    }
    per_tool
}

#[cfg(test)]
mod tests {
    //! The rules compiler, through `Policy::compile` (the tools and agents it checks rules
    //! against come from the same files): what it refuses, where it says so, and what the
    //! compiled rules decide.

    use super::*;
    use crate::policy::Policy;
    use crate::policy::history::NoHistory;

    const FILES: &str = r#"
agents:
  ops:
    tools: [ pay.send, deploy.run ]
    attributes: { team: ops }
tools:
  pay.send:
    upstream: { url: "http://tools.internal/pay" }
    arguments: { type: object, required: [ to, amount ], properties: { to: { type: string }, amount: { type: integer } } }
  deploy.run:
    upstream: { url: "http://tools.internal/deploy" }
    arguments: { type: object, required: [ env ], properties: { env: { type: string } } }
"#;

    fn compile(rules: &str) -> Result<Policy, Vec<Problem>> {
        let sources = [
            ("policy.yaml".to_owned(), FILES.to_owned()),
            ("rules.cedar".to_owned(), rules.to_owned()),
        ];
        Policy::compile(&sources, |_| Err(std::io::Error::other("none"))).map_err(|e| e.problems)
    }

    /// The one problem a broken rule file gives: its line and message.
    fn refused(rules: &str) -> (usize, String) {
        let problems = compile(rules).expect_err("refused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].file, "rules.cedar");
        (problems[0].line, problems[0].message.clone())
    }

    #[test]
    fn refuses_what_a_rule_file_must_not_say_at_its_line() {
        let ok = "@id(\"a\")\nforbid (principal, action == Action::\"pay.send\", resource);\n";
        let cases: &[(String, usize, &str)] = &[
            ("\npermit (principal, action, resource);".into(), 2, "may only `forbid`"),
            ("\n\nforbid (principal, action, resource);".into(), 3, "needs an `@id"),
            (format!("{ok}@id(\"a\")\nforbid (principal, action, resource);"), 3, "already used at rules.cedar:1:1"),
            ("@id(\"m\")\n@mode(\"audit\")\nforbid (principal, action, resource);".into(), 1, "@mode must be"),
            ("@id(\"g\")\n@approval(\" \")\nforbid (principal, action, resource);".into(), 1, "@approval needs the approver group"),
            ("@id(\"u\")\n@owner(\"me\")\nforbid (principal, action, resource);".into(), 1, "unknown annotation `@owner`"),
            ("@id(\"t\")\nforbid (principal == ?principal, action, resource);".into(), 1, "templates"),
            ("@id(\"s\")\nforbid (principal, action, resource) when { context.input.to == };".into(), 2, "unexpected"),
            (
                "@id(\"v\")\nforbid (principal, action == Action::\"pay.send\", resource)\nwhen { context.input.nope == 1 };".into(),
                3,
                "nope",
            ),
        ];
        for (rules, line, message) in cases {
            let (at, said) = refused(rules);
            assert!(said.contains(message), "{rules:?}: {said}");
            assert_eq!(at, *line, "{rules:?}: {said}");
        }
    }

    #[test]
    fn compiled_rules_apply_only_to_the_tools_their_scope_names() {
        let policy = compile(
            "@id(\"a\")\n@reason(\"No.\")\n@approval(\"finance\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.amount > 100 };\n\
             @id(\"b\")\n@mode(\"shadow\")\nforbid (principal, action in [Action::\"pay.send\"], resource) when { context.input.to == \"x\" };\n",
        )
        .unwrap();
        let rules = &policy.rules;
        assert!(rules.applies_to("pay.send"));
        assert!(!rules.applies_to("deploy.run"), "a tool no rule names skips Cedar");
        let mut meta: Vec<&RuleMeta> = rules.list().collect();
        meta.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            (meta[0].reason.as_deref(), meta[0].approval.as_deref(), meta[0].shadow),
            (Some("No."), Some("finance"), false)
        );
        assert!(meta[1].shadow);
    }

    #[test]
    fn a_verdict_denies_holds_or_only_reports_and_an_evaluation_error_denies() {
        let policy = compile(
            "@id(\"no-x\")\n@reason(\"Not to x.\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.to == \"x\" };\n\
             @id(\"big\")\n@approval(\"finance\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.amount > 100 };\n\
             @id(\"huge\")\n@approval(\"board\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.amount > 1000 };\n\
             @id(\"trial\")\n@mode(\"shadow\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.to == \"y\" };\n\
             @id(\"overflow\")\nforbid (principal, action == Action::\"deploy.run\", resource) when { 9223372036854775807 + 1 > 0 };\n\
             @id(\"not-ops\")\nforbid (principal, action == Action::\"deploy.run\", resource) when { context.input.env == \"prod\" } unless { principal.hasTag(\"team\") && principal.getTag(\"team\") == \"ops\" };\n",
        )
        .unwrap();
        let rules = &policy.rules;
        let verdict = |tool: &str, args: serde_json::Value| {
            let args = args.as_object().unwrap().clone();
            rules.evaluate("ops", tool, None, SystemTime::now(), &args, &NoHistory)
        };
        let denied = verdict("pay.send", json!({"to": "x", "amount": 5000})).unwrap();
        let reason = denied.blocked.unwrap();
        assert_eq!(
            (reason.code, reason.rule.as_str(), reason.message.as_str()),
            (Code::RuleDenied, "no-x", "Not to x.")
        );

        let held = verdict("pay.send", json!({"to": "a", "amount": 5000})).unwrap();
        assert_eq!(held.blocked.unwrap().code, Code::ApprovalRequired);
        let both = [
            ("big".to_owned(), "finance".to_owned()),
            ("huge".to_owned(), "board".to_owned()),
        ];
        assert_eq!(
            held.approvals, both,
            "one approval must cover every approval rule that matched"
        );

        let shadowed = verdict("pay.send", json!({"to": "y", "amount": 5})).unwrap();
        assert!(shadowed.blocked.is_none());
        assert_eq!(shadowed.would_deny, ["trial"]);

        let fail_closed = verdict("deploy.run", json!({"env": "dev"})).unwrap();
        assert_eq!(
            fail_closed.blocked.unwrap().rule,
            "overflow",
            "a rule Cedar cannot evaluate denies"
        );
    }
}
