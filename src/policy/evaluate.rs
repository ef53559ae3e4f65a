//! [`Policy::evaluate`]: one call through the policy's stages, in a fixed order from cheap to
//! expensive, each seeing only calls the ones before it admitted. A pure function of the call
//! (and, for rules over earlier calls, of the history it is given).

use serde_json::{Map, Value};

use super::history::History;
use super::tool::{Target, Tool};
use super::{Code, Decision, ParseLimits, Policy, Reason, Stage, ToolCall, arguments, content, is_valid_tool_name};

/// What the pipeline decided, plus what forwarding and audit need.
#[derive(Debug)]
pub struct Evaluation<'p> {
    pub decision: Decision,
    /// The tool, once the allowlist has passed.
    pub tool: Option<&'p Tool>,
    /// The parsed arguments, after input filters when they ran. Forwarded only on `Allow`; on a
    /// deny they are what the audit event records (redacted again there).
    pub arguments: Option<Value>,
    /// SHA-256 of the arguments as received (canonical form; the raw bytes if unparseable).
    pub arguments_sha256: String,
    /// The canonical JSON of `arguments` as forwarded (keys sorted, redactions applied).
    pub body: Option<Vec<u8>>,
    /// The upstream URL with placeholders filled.
    pub url: Option<std::borrow::Cow<'p, str>>,
    /// Non-blocking findings (redactions), for the audit event.
    pub notes: Vec<Reason>,
    /// When the decision is `approval_required`: the approval rules that matched, `(id, group)`.
    pub approvals: Vec<(String, String)>,
    /// Different people who must approve a held call (the rules' largest `@quorum`).
    pub quorum: u32,
    /// Shadow-mode rules that would have denied the call.
    pub would_deny: Vec<String>,
    /// The audit redactor would change nothing in `arguments` (the content walk asked it), so
    /// `body` is also what audit events, approvers and webhooks may see. False whenever that
    /// walk did not finish: then `arguments` need their own redaction pass.
    pub audit_clean: bool,
}

impl<'p> Evaluation<'p> {
    fn new() -> Self {
        Evaluation {
            decision: Decision::Allow,
            tool: None,
            arguments: None,
            arguments_sha256: String::new(),
            body: None,
            url: None,
            notes: Vec::new(),
            approvals: Vec::new(),
            quorum: 1,
            would_deny: Vec::new(),
            audit_clean: false,
        }
    }

    fn deny(mut self, reason: Reason) -> Self {
        self.decision = Decision::Deny(reason);
        self
    }

    /// The arguments, once parsed.
    fn object(&self) -> &Map<String, Value> {
        self.arguments
            .as_ref()
            .and_then(Value::as_object)
            .expect("parsed as an object")
    }

    /// The HTTP tool's URL with its placeholders filled from the arguments as they are now.
    fn fill_url(&mut self, tool: &'p Tool) -> Result<(), Reason> {
        if let Target::Http { url, .. } = &tool.target {
            let filled = url
                .fill(self.object())
                .map_err(|message| Reason::new(Code::InvalidArguments, Stage::Arguments, "url", message))?;
            self.url = Some(filled);
        }
        Ok(())
    }
}

impl Policy {
    /// Runs the pipeline. The order is fixed and cheap-to-expensive, and each stage only sees
    /// calls the previous ones admitted:
    /// 1. agent — known (the caller authenticated it; `explain` names it);
    /// 2. allowlist — before the body is even parsed, so a caller learns nothing about tools it
    ///    may not call (unknown and not-allowed tools get the same answer);
    /// 3. arguments — strict JSON, the tool's schema, URL placeholders;
    /// 4. content — input filters over every string value and key; redactions rewrite the
    ///    arguments that are forwarded;
    /// 5. rules — Cedar forbids over the arguments as they will be forwarded, with facts from
    ///    `history` for session-aware rules. A forbid with `@approval` holds the call instead.
    pub fn evaluate<'p>(&'p self, call: &ToolCall<'_>, limits: ParseLimits, history: &dyn History) -> Evaluation<'p> {
        self.decide(call, None, limits, history)
    }

    /// [`Policy::evaluate`], with the arguments already parsed by the transport from its own
    /// message with [`arguments::parse_value`]'s strictness (MCP's `tools/call`); `call.body`
    /// is not read. Decided exactly as the same arguments sent as a body would be.
    pub fn evaluate_parsed<'p>(
        &'p self,
        call: &ToolCall<'_>,
        args: Map<String, Value>,
        limits: ParseLimits,
        history: &dyn History,
    ) -> Evaluation<'p> {
        self.decide(call, Some(args), limits, history)
    }

    fn decide<'p>(
        &'p self,
        call: &ToolCall<'_>,
        parsed: Option<Map<String, Value>>,
        limits: ParseLimits,
        history: &dyn History,
    ) -> Evaluation<'p> {
        let mut eval = Evaluation::new();
        // 1–2. Agent and allowlist, and a pinned MCP tool whose definition changed; refused
        // here, the arguments are only hashed.
        let input_sha256 = |parsed: &Option<Map<String, Value>>| match parsed {
            Some(args) => arguments::sha256_hex(&arguments::canonical(args)),
            None => arguments::sha256_hex(call.body),
        };
        let tool = match self.allowed_tool(call) {
            Ok(tool) => tool,
            Err(reason) => {
                eval.arguments_sha256 = input_sha256(&parsed);
                return eval.deny(reason);
            }
        };
        eval.tool = Some(tool);
        // A grant in shadow mode that alone lets this call through: reported, not enforced.
        if let Some(grant) = self
            .agents
            .get(call.agent)
            .and_then(|a| a.allowlist.only_shadow(call.tool))
        {
            eval.would_deny.push(format!("grant:{grant}"));
        }
        if tool.unreviewed
            && !self
                .agents
                .get(call.agent)
                .is_some_and(|a| a.allowlist.names(call.tool))
        {
            eval.arguments_sha256 = input_sha256(&parsed);
            let msg = format!(
                "Tool '{}' is new on its MCP server and not yet approved: until an operator approves it (POST /admin/tools/{}/approve), only agents whose allowlist names it exactly may call it.",
                tool.name, tool.name
            );
            return eval.deny(Reason::new(Code::ToolChanged, Stage::Allowlist, "tool-review", msg));
        }
        if tool.changed {
            eval.arguments_sha256 = input_sha256(&parsed);
            let msg = format!(
                "The definition of tool '{}' changed on its MCP server since it was approved; it is blocked until an operator reviews it (POST /admin/tools/{}/approve).",
                tool.name, tool.name
            );
            return eval.deny(Reason::new(Code::ToolChanged, Stage::Allowlist, "tool-pinning", msg));
        }
        // 3. Arguments: strict JSON (hashed in canonical form), the schema, URL placeholders.
        let args = match parsed.map_or_else(|| arguments::parse(call.body, limits.max_json_depth), Ok) {
            Ok(args) => args,
            Err(e) => {
                eval.arguments_sha256 = arguments::sha256_hex(call.body);
                return eval.deny(Reason::new(
                    Code::InvalidArguments,
                    Stage::Arguments,
                    "json",
                    e.to_string(),
                ));
            }
        };
        let canonical = arguments::canonical(&args);
        eval.arguments_sha256 = arguments::sha256_hex(&canonical);
        let args = eval.arguments.insert(Value::Object(args));
        if let Some(schema) = &tool.schema
            && let Err(message) = schema.validate(args)
        {
            return eval.deny(Reason::new(Code::InvalidArguments, Stage::Arguments, "schema", message));
        }
        // Placeholders are filled (and their values checked) from the arguments as validated;
        // filled again after the filters if one redacted any argument, so the path never
        // carries a value the body and the audit event show redacted.
        if let Err(reason) = eval.fill_url(tool) {
            return eval.deny(reason);
        }
        // 4. Content filters, which may rewrite the arguments.
        if let Err(reason) = self.filter_input(tool, &mut eval) {
            return eval.deny(reason);
        }
        if !eval.notes.is_empty()
            && let Err(reason) = eval.fill_url(tool)
        {
            return eval.deny(reason);
        }
        // Serialise once: unchanged arguments reuse the canonical bytes already hashed.
        eval.body = Some(if eval.notes.is_empty() {
            canonical
        } else {
            arguments::canonical(eval.object())
        });
        // 5. Rules, over the arguments as they will be forwarded.
        if self.rules.applies_to(&tool.name) {
            let verdict = self
                .rules
                .evaluate(call.agent, &tool.name, call.session, call.now, eval.object(), history);
            match verdict {
                Ok(verdict) => {
                    // After the shadow filters' and grants' entries.
                    eval.would_deny.extend(verdict.would_deny);
                    eval.approvals = verdict.approvals;
                    eval.quorum = verdict.quorum;
                    if let Some(reason) = verdict.blocked {
                        return eval.deny(reason);
                    }
                }
                Err(message) => {
                    return eval.deny(Reason::new(Code::InvalidArguments, Stage::Arguments, "rules", message));
                }
            }
        }
        eval
    }

    /// Stages 1–2: the agent is known, and the tool exists and is on its allowlist.
    fn allowed_tool(&self, call: &ToolCall<'_>) -> Result<&Tool, Reason> {
        let Some(agent) = self.agents.get(call.agent) else {
            let message = format!("Unknown agent '{}'.", call.agent);
            return Err(Reason::new(
                Code::Unauthenticated,
                Stage::Authentication,
                "authentication",
                message,
            ));
        };
        let Some(tool) = self.tools.get(call.tool).filter(|_| agent.allowlist.allows(call.tool)) else {
            // The name is the caller's: repeated only if it is one and holds no finding, since
            // the message goes into the audit event too.
            let message = if !is_valid_tool_name(call.tool) {
                format!(
                    "Agent '{}' may not call this tool: the name is not a valid tool name.",
                    agent.id
                )
            } else if content::holds_finding(call.tool) {
                format!(
                    "Agent '{}' may not call this tool (its name is not repeated: it looks like personal data or a secret).",
                    agent.id
                )
            } else {
                format!("Agent '{}' may not call '{}'.", agent.id, call.tool)
            };
            return Err(Reason::new(
                Code::ToolNotAllowed,
                Stage::Allowlist,
                "allowlist",
                message,
            ));
        };
        Ok(tool)
    }

    /// Stage 4: one walk for the tool's input filters and the audit redactor's detectors.
    /// Redactions become notes; a block is the reason.
    fn filter_input(&self, tool: &Tool, eval: &mut Evaluation<'_>) -> Result<(), Reason> {
        let filters = tool.input_filters.iter().map(|&i| &self.filters[i]);
        let args = eval.arguments.as_mut().expect("set before the filters");
        let outcome = content::apply_audited(filters, Some(&content::AUDIT_REDACTOR), args);
        eval.audit_clean = !outcome.audit_hit;
        for (filter, ..) in &outcome.shadowed {
            let name = format!("filter:{filter}");
            if !eval.would_deny.contains(&name) {
                eval.would_deny.push(name);
            }
        }
        for (filter, kind) in outcome.redacted {
            let msg = format!("Redacted {kind} found by filter '{filter}'.");
            eval.notes
                .push(Reason::new(Code::ContentBlocked, Stage::Content, filter, msg));
        }
        if let Some((filter, kind)) = outcome.blocked {
            eval.audit_clean = false;
            let msg = format!("The arguments were blocked by content filter '{filter}' ({kind}).");
            return Err(Reason::new(Code::ContentBlocked, Stage::Content, filter, msg));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! `Policy::evaluate`, stage by stage: for each, a call it refuses (with the code, stage and
    //! rule the agent is told) and a call it lets through to the next. A stage that stops
    //! checking, or checks out of order, fails a row here.

    use super::super::history::NoHistory;
    use super::super::tool::DiscoveredTool;
    use super::*;
    use serde_json::json;
    use std::path::Path;

    const FILES: &str = r#"
agents:
  bot:
    tools: [ kb.search, tickets.*, pay.send, mail.send, crm.* ]
  narrow:
    tools: [ kb.search ]
tools:
  kb.search:
    upstream: { url: "http://tools.internal/kb/search" }
    filters: { input: [ terms ] }
  tickets.read:
    upstream: { url: "http://tools.internal/tickets/{id}", method: GET }
    arguments: { type: object, required: [ id ], properties: { id: { type: string, pattern: "^T-[0-9]+$" } } }
  tickets.reply:
    upstream: { url: "http://tools.internal/tickets/{id}/replies", method: POST }
    arguments: { type: object, required: [ id, body ], properties: { id: { type: string }, body: { type: string } } }
    filters: { input: [ pii ] }
  pay.send:
    upstream: { url: "http://tools.internal/pay" }
    arguments: { type: object, required: [ to, amount ], properties: { to: { type: string }, amount: { type: integer } } }
  mail.send:
    upstream: { url: "http://tools.internal/mail" }
    arguments: { type: object, required: [ to ], properties: { to: { type: string } } }
filters:
  terms: { deny_terms: [ "project falcon" ], action: block }
  pii: { detect: [ email ], action: redact }
mcp_servers:
  crm: { url: "http://crm.internal/mcp" }
"#;

    const RULES: &str = r#"
@id("no-sanctioned")
@reason("No payments to sanctioned parties.")
forbid (principal, action == Action::"pay.send", resource) when { context.input.to == "sanctioned-co" };

@id("big-payments")
@approval("finance")
forbid (principal, action == Action::"pay.send", resource) when { context.input.amount > 100 };

@id("external-mail-trial")
@mode("shadow")
forbid (principal, action == Action::"mail.send", resource) when { context.input.to like "*@external.example" };
"#;

    fn policy() -> Policy {
        let sources = [
            ("policy.yaml".to_owned(), FILES.to_owned()),
            ("rules.cedar".to_owned(), RULES.to_owned()),
        ];
        let changed = DiscoveredTool {
            server: "crm".into(),
            tool: "lookup".into(),
            description: "Look a customer up.".into(),
            input_schema: json!({"type": "object"}),
            changed: true,
            unreviewed: false,
            findings: Vec::new(),
        };
        let unreadable = |_: &Path| Err(std::io::Error::other("no files here"));
        Policy::compile_with(&sources, unreadable, &[changed]).unwrap()
    }

    const LIMITS: ParseLimits = ParseLimits { max_json_depth: 8 };

    fn evaluate<'p>(p: &'p Policy, agent: &str, tool: &str, body: &str) -> Evaluation<'p> {
        p.evaluate(&ToolCall::new(agent, tool, body.as_bytes()), LIMITS, &NoHistory)
    }

    #[test]
    fn each_stage_refuses_what_it_owns_with_its_code_stage_and_rule() {
        let p = policy();
        let deep = format!("{{\"q\": {}1{}}}", "[".repeat(9), "]".repeat(9));
        let rows: &[(&str, &str, &str, Code, Stage, &str)] = &[
            // Authentication: an agent the policy does not have.
            (
                "ghost",
                "kb.search",
                "{}",
                Code::Unauthenticated,
                Stage::Authentication,
                "authentication",
            ),
            // Allowlist: not on this agent's list, or no such tool; before the body is parsed.
            (
                "narrow",
                "tickets.read",
                "{}",
                Code::ToolNotAllowed,
                Stage::Allowlist,
                "allowlist",
            ),
            (
                "narrow",
                "tickets.read",
                "not json",
                Code::ToolNotAllowed,
                Stage::Allowlist,
                "allowlist",
            ),
            (
                "bot",
                "no.such",
                "{}",
                Code::ToolNotAllowed,
                Stage::Allowlist,
                "allowlist",
            ),
            (
                "bot",
                "bad name!",
                "{}",
                Code::ToolNotAllowed,
                Stage::Allowlist,
                "allowlist",
            ),
            // Pinning: an MCP tool whose definition changed since it was approved.
            (
                "bot",
                "crm.lookup",
                "{}",
                Code::ToolChanged,
                Stage::Allowlist,
                "tool-pinning",
            ),
            // Arguments: strict JSON, an object, no repeated key, bounded depth.
            (
                "bot",
                "tickets.read",
                "not json",
                Code::InvalidArguments,
                Stage::Arguments,
                "json",
            ),
            (
                "bot",
                "tickets.read",
                "[1]",
                Code::InvalidArguments,
                Stage::Arguments,
                "json",
            ),
            (
                "bot",
                "tickets.read",
                r#"{"id": "T-1", "id": "T-2"}"#,
                Code::InvalidArguments,
                Stage::Arguments,
                "json",
            ),
            (
                "bot",
                "kb.search",
                &deep,
                Code::InvalidArguments,
                Stage::Arguments,
                "json",
            ),
            // The tool's schema.
            (
                "bot",
                "tickets.read",
                r#"{"id": "X-1"}"#,
                Code::InvalidArguments,
                Stage::Arguments,
                "schema",
            ),
            (
                "bot",
                "tickets.read",
                "{}",
                Code::InvalidArguments,
                Stage::Arguments,
                "schema",
            ),
            // URL placeholders: no value may change the path's shape.
            (
                "bot",
                "tickets.reply",
                r#"{"id": "..", "body": "b"}"#,
                Code::InvalidArguments,
                Stage::Arguments,
                "url",
            ),
            // Content filters, after the schema (a deny term, however it is spaced or cased).
            (
                "bot",
                "kb.search",
                r#"{"query": "about PROJECT   falcon"}"#,
                Code::ContentBlocked,
                Stage::Content,
                "terms",
            ),
            // Rules: a forbid, and a forbid that holds the call for approval.
            (
                "bot",
                "pay.send",
                r#"{"to": "sanctioned-co", "amount": 5}"#,
                Code::RuleDenied,
                Stage::Rules,
                "no-sanctioned",
            ),
            (
                "bot",
                "pay.send",
                r#"{"to": "acme", "amount": 500}"#,
                Code::ApprovalRequired,
                Stage::Rules,
                "big-payments",
            ),
        ];
        for (agent, tool, body, code, stage, rule) in rows {
            let eval = evaluate(&p, agent, tool, body);
            let Decision::Deny(reason) = &eval.decision else {
                panic!("{agent} {tool} {body}: allowed, expected {code:?}")
            };
            assert_eq!(
                (reason.code, reason.stage, reason.rule.as_str()),
                (*code, *stage, *rule),
                "{agent} {tool} {body}: {}",
                reason.message
            );
            assert_eq!(eval.arguments_sha256.len(), 64, "every call is hashed, refused or not");
        }
    }

    #[test]
    fn a_call_every_stage_admits_is_allowed_with_what_forwarding_needs() {
        let p = policy();
        let eval = evaluate(&p, "bot", "tickets.read", r#"{ "id": "T-42" }"#);
        assert!(eval.decision.is_allow(), "{:?}", eval.decision);
        assert_eq!(eval.tool.map(|t| t.name.as_str()), Some("tickets.read"));
        assert_eq!(eval.url.as_deref(), Some("http://tools.internal/tickets/T-42"));
        assert_eq!(eval.body.as_deref(), Some(&br#"{"id":"T-42"}"#[..]));
        assert_eq!(eval.arguments_sha256, arguments::sha256_hex(br#"{"id":"T-42"}"#));
        assert!(eval.notes.is_empty() && eval.would_deny.is_empty() && eval.audit_clean);

        // A rule below its threshold lets the call through.
        let eval = evaluate(&p, "bot", "pay.send", r#"{"to": "acme", "amount": 5}"#);
        assert!(eval.decision.is_allow(), "{:?}", eval.decision);
    }

    #[test]
    fn a_redacting_filter_rewrites_what_is_forwarded_and_notes_it() {
        let p = policy();
        let eval = evaluate(
            &p,
            "bot",
            "tickets.reply",
            r#"{"id": "T-1", "body": "write to a@b.example"}"#,
        );
        assert!(eval.decision.is_allow(), "{:?}", eval.decision);
        let body = String::from_utf8(eval.body.clone().unwrap()).unwrap();
        assert_eq!(body, r#"{"body":"[REDACTED:email]","id":"T-1"}"#);
        assert_eq!(eval.notes.len(), 1);
        assert_eq!(
            (eval.notes[0].stage, eval.notes[0].rule.as_str()),
            (Stage::Content, "pii")
        );
        // The hash is of the arguments as received, not as redacted.
        let received = br#"{"body":"write to a@b.example","id":"T-1"}"#;
        assert_eq!(eval.arguments_sha256, arguments::sha256_hex(received));
    }

    #[test]
    fn an_approval_rule_names_its_group_and_a_shadow_rule_only_reports() {
        let p = policy();
        let held = evaluate(&p, "bot", "pay.send", r#"{"to": "acme", "amount": 500}"#);
        assert_eq!(held.approvals, [("big-payments".to_owned(), "finance".to_owned())]);
        let shadowed = evaluate(&p, "bot", "mail.send", r#"{"to": "x@external.example"}"#);
        assert!(shadowed.decision.is_allow(), "{:?}", shadowed.decision);
        assert_eq!(shadowed.would_deny, ["external-mail-trial"]);
    }

    #[test]
    fn parsed_arguments_are_decided_exactly_as_the_same_body() {
        let p = policy();
        let bodies = [
            (r#"{"id": "T-42"}"#, "tickets.read"),
            (r#"{"id": "X-1"}"#, "tickets.read"),
            (r#"{"id": "T-1", "body": "write to a@b.example"}"#, "tickets.reply"),
            (r#"{"query": "project falcon"}"#, "kb.search"),
            (r#"{"to": "acme", "amount": 500}"#, "pay.send"),
            (r#"{"to": "acme", "amount": 1.5e3}"#, "pay.send"),
            (r#"{}"#, "narrow.tool"),
        ];
        for (body, tool) in bodies {
            let call = ToolCall::new("bot", tool, body.as_bytes());
            let a = p.evaluate(&call, LIMITS, &NoHistory);
            let parsed = arguments::parse(body.as_bytes(), LIMITS.max_json_depth).unwrap();
            let b = p.evaluate_parsed(&call, parsed, LIMITS, &NoHistory);
            assert_eq!(format!("{:?}", a.decision), format!("{:?}", b.decision), "{body}");
            assert_eq!(a.arguments_sha256, b.arguments_sha256, "{body}");
            assert_eq!(a.body, b.body, "{body}");
            assert_eq!(a.url, b.url, "{body}");
            assert_eq!(a.notes.len(), b.notes.len(), "{body}");
        }
    }
}
