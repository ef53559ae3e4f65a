//! The per-call pipeline: the stages of one call, in order, in [`Gateway::process`]. The order
//! is the design, and each place says why:
//!
//! 1. **Authentication** first: a caller that is not an agent learns nothing, not even the
//!    body limits.
//! 2. **The request's own headers** (the session id), then **quarantine**: a quarantined agent
//!    is refused before anything else costs, and **the audit log's health**: nothing is decided
//!    that might go unrecorded (this call's own event is the probe that heals the sink).
//! 3. **The body** as the transport read it (too large, too slow): only now, after (1).
//! 4. **Tool pinning**: a pinned MCP tool whose definition changed is refused whatever policy
//!    is in force (a rebuilt policy that failed to load would still list it as approved).
//! 5. **The policy** (`Policy::evaluate`): allowlist before the body is parsed (a caller
//!    learns nothing about tools it may not call), the JSON Schema before content filters
//!    (filters see only well-formed arguments), rules after the filters (an approver is never
//!    asked about a call the filters block, and rules see exactly what will be forwarded). A
//!    call whose rules read session history is decided in its agent's history turn.
//! 6. **Approval**: a call a rule holds is held now (a held call costs no budget), or, with an
//!    approval presented, passes on to the limits.
//! 7. **Bedrock guardrails** on the arguments, after every local check: a call refused anyway
//!    costs no guardrail request.
//! 8. **Budget, then rate limits**, after every static check, so a denied call costs nothing;
//!    a refusal gives the budget reservation back.
//! 9. **The approval is spent** only now, so a 429 does not use it up.
//! 10. **Written ahead**: a `call_forwarding` event is in the audit log before the call reaches
//!     its tool, so a process killed while the tool runs, or a disk that fills meanwhile,
//!     cannot leave a forwarded call with no record; and a log that cannot be written stops the
//!     call here, before the tool acts (the first call after the disk fills included).
//! 11. **History records the call** when it is decided, not when the tool answers, so calls in
//!     flight count for the rules of the calls after them.
//! 12. **Forward**, then the answer through guardrails and output filters (`forward`).
//! 13. **Settle**: a failed call is taken back out of history, and the budget is charged what
//!     flowed.
//!
//! The `tool_call` event is written by the caller, [`Gateway::call`], whatever this returns.

use std::borrow::Cow;
use std::num::NonZeroU32;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{Answer, Arguments, CallRequest, Caller, Gateway, Record, is_approval_id, is_valid_session};
use crate::approval::HoldRequest;
use crate::audit::{CallForwarding, RecordedArguments, Tokens};
use crate::config::AuditArguments;
use crate::policy::history::{History, PastCall, hash_value};
use crate::policy::limits::{BudgetMode, estimate_tokens};
use crate::policy::tool::Tool;
use crate::policy::{Code, Decision, Evaluation, Policy, Reason, Stage, ToolCall, arguments, content};
use crate::state::{Admission, Quarantine, Refusal, Reservation};

/// A budget lease outlives the tool's deadline by this much: the answer's checks and the
/// settling happen after it. A lease that ends before its call is settled only gives its
/// reservation back early; the call is still charged what flowed.
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The policy's evaluation of a call, with its forwarded body taken out (shared with the event's
/// record of the arguments) and the time it was decided at.
struct Decided<'p> {
    eval: Evaluation<'p>,
    body: Option<Bytes>,
    at_ms: u64,
}

/// An evaluated, allowed call on its way to the tool.
struct Admitted<'p> {
    agent: &'p str,
    tool: &'p Tool,
    url: Option<Cow<'p, str>>,
    /// The arguments as they will be forwarded (after redaction).
    args: Map<String, Value>,
    /// Their canonical JSON, the body sent.
    body: Bytes,
    /// An approval presented for a call a rule holds, spent once the limits admit the call.
    approval: Option<(HoldRequest, String)>,
    at_ms: u64,
}

impl Gateway {
    /// The stages of one call, in the order the module doc gives and explains.
    pub(super) async fn process<'p>(
        &self,
        policy: &'p Policy,
        req: &CallRequest,
        arguments: Result<Arguments, Reason>,
        rec: &mut Record<'p>,
    ) -> Result<Answer, Reason> {
        // 1–2. Who, and whether anything may be decided for them now.
        let since = rec.clock();
        let admitted = self.admit(policy, req, rec);
        rec.ran("authentication", since);
        let agent = match admitted {
            Ok(agent) => agent,
            Err(reason) => {
                if let Ok(a) = &arguments {
                    rec.arguments_sha256 = a.sha256();
                }
                return Err(reason);
            }
        };
        // 3. The body, as the transport read it.
        let arguments = arguments?;
        // 4. Tool pinning.
        if let Err(reason) = self.check_pinned(policy, agent, req.tool.as_str()) {
            rec.arguments_sha256 = arguments.sha256();
            return Err(reason);
        }
        // 5. The policy, in the agent's history turn when rules read history (held until the
        //    call is recorded in history at 10, or refused).
        let history_turn = match policy.tools.get(req.tool.as_str()).is_some_and(|t| t.touches_history) {
            true => match self.state.history_turn(agent, policy.history_retention).await {
                Ok(turn) => Some(turn),
                Err(e) => {
                    rec.arguments_sha256 = arguments.sha256();
                    return Err(state_unavailable(agent, req.tool.as_str(), &e));
                }
            },
            false => None,
        };
        let history = history_turn
            .as_ref()
            .map_or(&self.state as &dyn History, |t| t.history(&self.state));
        let since = rec.clock();
        let decided = self.evaluate(policy, agent, req, arguments, history, rec);
        rec.ran("policy", since);
        // 6. Approval.
        let mut call = self.hold_or_pass(agent, req, decided, rec).await?;
        // 7. Guardrails on the arguments.
        self.guard_input(policy, &mut call, rec).await?;
        // 8. Budget and rate limits.
        let input_tokens = estimate_tokens(call.body.len());
        let since = rec.clock();
        let reservation = self.take_limits(policy, &call, input_tokens).await;
        rec.ran("limits", since);
        let reservation = reservation?;
        // 9. The approval, spent.
        if let Some((held, id)) = call.approval.take()
            && let Err(reason) = Box::pin(self.use_approval(held, &id, rec)).await
        {
            self.give_back(reservation).await;
            return Err(reason);
        }
        // 10. Written ahead.
        let since = rec.clock();
        let written = self.write_ahead(policy, req, &call, rec).await;
        rec.ran("audit", since);
        if let Err(reason) = written {
            self.give_back(reservation).await;
            return Err(reason);
        }
        // 11. History.
        let past = match self.record_history(policy, req, &call).await {
            Ok(past) => past,
            Err(reason) => {
                self.give_back(reservation).await;
                return Err(reason);
            }
        };
        drop(history_turn);
        // 12. Forward, and the answer back through guardrails and output filters.
        let answered = self.forward(policy, req, rec, &call.to_forward()).await;
        // 13. Settle.
        if let Some(p) = past
            && !answered.as_ref().is_ok_and(Answer::succeeded)
        {
            self.state.forget_call(agent, &p).await;
        }
        let output_tokens = answered.as_ref().map_or(0, |a| estimate_tokens(a.len()));
        rec.tokens = Some(Tokens {
            input: input_tokens,
            output: output_tokens,
        });
        if let Some(r) = reservation {
            self.state.settle_tokens(r, input_tokens, output_tokens);
        }
        answered
    }

    /// Stages 1–2: the agent (authenticated now, or by the transport with this policy), the
    /// session header, quarantine, and the audit log's health.
    fn admit<'p>(&self, policy: &'p Policy, req: &CallRequest, rec: &mut Record<'p>) -> Result<&'p str, Reason> {
        let agent: &'p str = match &req.caller {
            Caller::Credentials { authorization, client } => policy
                .auth
                .authenticate(authorization.as_ref().and_then(|v| v.to_str().ok()), client.as_deref())?,
            Caller::Agent(id) => policy
                .agents
                .get_key_value(&**id)
                .map(|(id, _)| id.as_str())
                .ok_or_else(|| {
                    let message = "The agent is no longer in the policy.";
                    Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", message)
                })?,
            Caller::Ambiguous => return Err(two_credentials()),
        };
        rec.agent = Some(agent);
        if req.session.as_deref().is_some_and(|s| !is_valid_session(s)) {
            return Err(Reason::new(
                Code::InvalidRequest,
                Stage::Request,
                "session",
                "X-Toolgate-Session must be 1 to 128 characters: letters, digits, `-`, `_`, `.`, `:`.",
            ));
        }
        if req.approval.as_deref().is_some_and(|a| !is_approval_id(a)) {
            return Err(Reason::new(
                Code::InvalidRequest,
                Stage::Request,
                "approval",
                "X-Toolgate-Approval must be an approval id as toolgate gave it: `apr_` and 32 hex digits.",
            ));
        }
        self.check_quarantine(agent)?;
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
        Ok(agent)
    }

    /// Stage 4: a pinned MCP tool whose definition changed is refused, whatever policy is in
    /// force: if the policy rebuilt with the change failed to load, the last good policy would
    /// still list the tool as approved.
    fn check_pinned(&self, policy: &Policy, agent: &str, tool: &str) -> Result<(), Reason> {
        if self.catalog.is_changed(tool) && policy.is_allowed(agent, tool) {
            return Err(Reason::new(
                Code::ToolChanged,
                Stage::Allowlist,
                "tool-pinning",
                format!(
                    "The definition of tool '{tool}' changed on its MCP server since it was approved; it is blocked until an operator reviews it (POST /admin/tools/{tool}/approve)."
                ),
            ));
        }
        Ok(())
    }

    /// Stage 5: the policy's decision, and what the event records of it.
    fn evaluate<'p>(
        &self,
        policy: &'p Policy,
        agent: &'p str,
        req: &CallRequest,
        arguments: Arguments,
        history: &dyn History,
        rec: &mut Record<'p>,
    ) -> Decided<'p> {
        let (body, parsed) = match arguments {
            Arguments::Body(body) => (body, None),
            Arguments::Parsed(args) => (Bytes::new(), Some(args)),
        };
        let call = ToolCall {
            agent,
            tool: req.tool.as_str(),
            body: &body,
            session: req.session.as_deref(),
            now: std::time::SystemTime::now(),
        };
        // A shadow policy decides the same call beside (its arguments cloned first when the
        // transport parsed them). Without one, this is one load of an empty pointer.
        let shadow = self.shadow.load();
        let shadow_args = match (shadow.as_ref(), &parsed) {
            (Some(_), Some(args)) => Some(args.clone()),
            _ => None,
        };
        let mut eval = match parsed {
            None => policy.evaluate(&call, self.parse_limits(), history),
            Some(args) => policy.evaluate_parsed(&call, args, self.parse_limits(), history),
        };
        if let Some(candidate) = shadow.as_ref() {
            let theirs = match shadow_args {
                None => candidate.evaluate(&call, self.parse_limits(), history),
                Some(args) => candidate.evaluate_parsed(&call, args, self.parse_limits(), history),
            };
            rec.shadow = shadow_difference(&eval.decision, &theirs.decision, &candidate.version);
        }
        rec.decided_at = Some(std::time::Instant::now());
        rec.known_tool = eval.tool.is_some();
        rec.arguments_sha256 = std::mem::take(&mut eval.arguments_sha256);
        rec.notes = std::mem::take(&mut eval.notes);
        rec.would_deny = std::mem::take(&mut eval.would_deny);
        let body = eval.body.take().map(Bytes::from);
        rec.arguments = self.recorded_arguments(&eval, body.as_ref());
        let at_ms = call
            .now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Decided { eval, body, at_ms }
    }

    /// The arguments as the event records them (`audit.arguments`): their shape, or redacted
    /// by every detector. When evaluation's content walk found nothing for the redactor, the
    /// body to forward is that record as it is: no copy, no second pass.
    fn recorded_arguments(&self, eval: &Evaluation<'_>, body: Option<&Bytes>) -> Option<RecordedArguments> {
        match (self.config.audit.arguments, body) {
            (AuditArguments::Shape, _) => eval
                .arguments
                .as_ref()
                .map(|a| RecordedArguments::Value(arguments::shape(a))),
            (AuditArguments::Redacted, Some(body)) if eval.audit_clean => Some(RecordedArguments::Json(body.clone())),
            (AuditArguments::Redacted, _) => redacted(eval).map(RecordedArguments::Value),
        }
    }

    /// Stage 6: a call the policy allowed goes on; one a rule holds is held (the `Err` is the
    /// 202's reason) unless it carries an approval, which is checked and spent at stage 9.
    async fn hold_or_pass<'p>(
        &self,
        agent: &'p str,
        req: &CallRequest,
        decided: Decided<'p>,
        rec: &mut Record<'p>,
    ) -> Result<Admitted<'p>, Reason> {
        let Decided { eval, body, at_ms } = decided;
        let mut approval = None;
        if let Decision::Deny(reason) = &eval.decision {
            if reason.code != Code::ApprovalRequired || eval.approvals.is_empty() {
                return Err(reason.clone());
            }
            let mut groups: Vec<&str> = eval.approvals.iter().map(|(_, g)| g.as_str()).collect();
            groups.sort_unstable();
            groups.dedup();
            let held = HoldRequest {
                agent: agent.to_owned(),
                tool: req.tool.as_str().to_owned(),
                rule: reason.rule.clone(),
                rules: eval.approvals.iter().map(|(r, _)| r.clone()).collect(),
                group: groups.join(", "),
                reason: reason.message.clone(),
                arguments: redacted(&eval),
                arguments_sha256: rec.arguments_sha256.clone(),
                request_id: req.request_id.to_string(),
                session: req.session.clone(),
                quorum: eval.quorum,
            };
            match &req.approval {
                Some(id) => approval = Some((held, id.clone())),
                None => {
                    // A quarantined agent's call is never put before an approver. In memory
                    // that was checked at stage 2; with Redis it is read now, for held calls
                    // only (the rest read it with their limits).
                    match self.state.quarantined(agent).await {
                        Ok(None) => {}
                        Ok(Some(q)) => return Err(quarantined(agent, &q)),
                        Err(e) => return Err(state_unavailable(agent, req.tool.as_str(), &e)),
                    }
                    return Err(Box::pin(self.hold(held, reason.clone(), rec)).await);
                }
            }
        }
        let Evaluation {
            tool, url, arguments, ..
        } = eval;
        let Some(Value::Object(args)) = arguments else {
            unreachable!("an allowed call has arguments, an object")
        };
        Ok(Admitted {
            agent,
            tool: tool.expect("an allowed call has a tool"),
            url,
            args,
            body: body.unwrap_or_default(),
            approval,
            at_ms,
        })
    }

    /// Stage 7: Bedrock guardrails over the arguments; arguments one anonymised replace the
    /// call's (and the event's record of them).
    async fn guard_input(&self, policy: &Policy, call: &mut Admitted<'_>, rec: &mut Record<'_>) -> Result<(), Reason> {
        let Some(masked) = self.input_guardrails(policy, call.tool, &call.body, rec).await? else {
            return Ok(());
        };
        rec.arguments = Some(RecordedArguments::Value(match self.config.audit.arguments {
            AuditArguments::Shape => arguments::shape(&Value::Object(masked.clone())),
            AuditArguments::Redacted => {
                let mut v = Value::Object(masked.clone());
                content::apply(&[&content::AUDIT_REDACTOR], &mut v);
                v
            }
        }));
        call.body = Bytes::from(arguments::canonical(&masked));
        call.args = masked;
        Ok(())
    }

    /// Stage 8: the budget reserved first (atomically), then rate allowances taken, the tighter
    /// per-tool one first; nothing is taken unless all admit. With Redis this is one round
    /// trip, which reads the quarantine too; a backend that does not answer refuses the call.
    async fn take_limits(
        &self,
        policy: &Policy,
        call: &Admitted<'_>,
        input_tokens: u64,
    ) -> Result<Option<Reservation>, Reason> {
        let (agent, tool) = (call.agent, &call.tool.name);
        let limits = &policy.agents.get(agent).expect("evaluated agents exist").limits;
        // Strict: the tool's largest answer is reserved beside the arguments, so the budget can
        // never be exceeded; else the state reserves an estimate (see `BudgetMode`).
        let answer = match limits.budget {
            BudgetMode::Strict => Some(estimate_tokens(
                call.tool
                    .max_response_bytes
                    .unwrap_or(self.config.limits.max_response_bytes),
            )),
            BudgetMode::Estimate => None,
        };
        let timeout = call
            .tool
            .timeout
            .unwrap_or(std::time::Duration::from_millis(self.config.limits.upstream_timeout_ms));
        let admission = Admission {
            agent,
            tool,
            budget: limits.tokens_per_hour.map(|l| (l.get(), input_tokens, answer)),
            tool_rate: limits.tools.get(tool).map(|t| t.calls_per_minute),
            agent_rate: limits.calls_per_minute,
            now: call.at_ms / 1000,
            // The tool's deadline, and time for its answer's checks and the settling.
            lease: timeout + LEASE_MARGIN,
        };
        self.state.admit(admission).await.map_err(|refusal| match refusal {
            Refusal::OverBudget(wait) => {
                let limit = limits.tokens_per_hour.map_or(0, |l| l.get());
                Reason::new(Code::BudgetExceeded, Stage::Limits, "tokens_per_hour",
                    format!("This call ({input_tokens} tokens, plus what its answer is expected to add) would exceed agent '{agent}''s budget of {limit} tokens for this hour; it resets in {} s.", wait.as_secs()))
                    .retry_after(wait.as_secs())
            }
            Refusal::ToolRate(wait) | Refusal::AgentRate(wait) => {
                let per_tool = matches!(refusal, Refusal::ToolRate(_));
                let (rule, per_minute, whose) = match per_tool {
                    true => ("tool calls_per_minute", limits.tools.get(tool).map(|t| t.calls_per_minute.get()), format!(" for '{tool}'")),
                    false => ("calls_per_minute", limits.calls_per_minute.map(NonZeroU32::get), String::new()),
                };
                let per_minute = per_minute.unwrap_or(0);
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let message = format!(
                    "Agent '{agent}' is over its limit of {per_minute} calls per minute{whose}. Retry in {secs} s."
                );
                Reason::new(Code::RateLimited, Stage::Limits, rule, message).retry_after(secs)
            }
            Refusal::Quarantined(q) => quarantined(agent, &q),
            Refusal::Unavailable(e) => state_unavailable(agent, tool, &e),
        })
    }

    /// Stage 10: the `call_forwarding` event, written before the call is sent. If it cannot be
    /// written, the call is not sent.
    async fn write_ahead(
        &self,
        policy: &Policy,
        req: &CallRequest,
        call: &Admitted<'_>,
        rec: &Record<'_>,
    ) -> Result<(), Reason> {
        let session = req.session.as_deref().map(crate::audit::recorded);
        let event = CallForwarding {
            request_id: &req.request_id,
            agent: call.agent,
            tool: &call.tool.name,
            arguments_sha256: &rec.arguments_sha256,
            session: session.as_deref(),
            approval_id: rec.approval_id.as_deref(),
            policy_version: &policy.version,
        };
        self.audit.emit(&event).await.map_err(|e| {
            tracing::error!(
                request_id = &*req.request_id,
                "audit write failed, the call was not sent: {e}"
            );
            Reason::new(
                Code::Unavailable,
                Stage::Audit,
                "audit",
                "The call could not be recorded before it was sent to its tool, so it was not sent. Try again later.",
            )
        })
    }

    async fn give_back(&self, reservation: Option<Reservation>) {
        if let Some(r) = reservation {
            self.state.release_tokens(r).await;
        }
    }

    /// Stage 11: the call in its agent's history, if any rule reads calls of this tool; the
    /// entry, to take back if the call fails. A history that cannot be written (Redis) stops
    /// the call: the rules after it would count one call too few.
    async fn record_history(
        &self,
        policy: &Policy,
        req: &CallRequest,
        call: &Admitted<'_>,
    ) -> Result<Option<PastCall>, Reason> {
        let Some(fields) = policy.recorded.get(&call.tool.name) else {
            return Ok(None);
        };
        let past = PastCall {
            tool: call.tool.name.as_str().into(),
            at_ms: call.at_ms,
            session: req.session.as_deref().map(Into::into),
            values: fields
                .iter()
                .filter_map(|f| call.args.get(&**f).map(|v| (f.clone(), hash_value(v))))
                .collect(),
        };
        self.state
            .record_call(call.agent, past.clone(), policy.history_retention)
            .await
            .map_err(|e| state_unavailable(call.agent, &call.tool.name, &e))?;
        Ok(Some(past))
    }

    /// Stage 2: the quarantine, where this process knows it at no cost (memory); with Redis
    /// it is read with the limits, at stage 8.
    fn check_quarantine(&self, agent: &str) -> Result<(), Reason> {
        match self.state.quarantined_locally(agent) {
            Some(q) => Err(quarantined(agent, &q)),
            None => Ok(()),
        }
    }
}

/// The refusal of a call the state backend could not admit.
fn state_unavailable(agent: &str, tool: &str, e: &crate::state::StateError) -> Reason {
    tracing::error!(agent, tool, "the call could not be admitted: {e}");
    Reason::new(
        Code::Unavailable,
        Stage::Limits,
        "state",
        "The shared state that holds this agent's limits did not answer, so the call was refused \
         (never forwarded unchecked). Try again shortly.",
    )
}

/// The refusal of a quarantined agent's call.
fn quarantined(agent: &str, q: &Quarantine) -> Reason {
    let until = q.until.map_or("until an admin releases it".to_owned(), |u| {
        format!("until {}", crate::audit::format_unix(u))
    });
    Reason::new(
        Code::AgentQuarantined,
        Stage::Quarantine,
        "quarantine",
        format!(
            "Agent '{agent}' is quarantined ({}), {until}. Ask an operator to review it: DELETE /admin/agents/{agent}/quarantine.",
            q.reason
        ),
    )
}

impl<'p> Admitted<'p> {
    fn to_forward(&self) -> super::forward::Call<'_> {
        super::forward::Call {
            agent: self.agent,
            tool: self.tool,
            url: self.url.as_deref().unwrap_or(""),
            args: &self.args,
            body: self.body.clone(),
        }
    }
}

/// The refusal of a request with more than one `Authorization` header.
pub(crate) fn two_credentials() -> Reason {
    let message = "Send exactly one Authorization header: this request has more than one.";
    Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", message)
}

/// The evaluated arguments redacted by every detector: what audit events (in `redacted`
/// mode), approvers and the approval webhook see, whatever the audit mode.
fn redacted(eval: &Evaluation<'_>) -> Option<Value> {
    let mut args = eval.arguments.clone();
    if let Some(a) = args.as_mut().filter(|_| !eval.audit_clean) {
        content::apply(&[&content::AUDIT_REDACTOR], a);
    }
    args
}

/// The shadow policy's decision, when it differs from the enforced one (counted per rule).
fn shadow_difference(enforced: &Decision, shadow: &Decision, version: &str) -> Option<crate::audit::ShadowVerdict> {
    let kind = |d: &Decision| match d {
        Decision::Allow => ("allow", None, None),
        Decision::Deny(r) if r.code == Code::ApprovalRequired => {
            ("approval_required", Some(r.code.as_str()), Some(r.rule.clone()))
        }
        Decision::Deny(r) => ("deny", Some(r.code.as_str()), Some(r.rule.clone())),
    };
    let (ours, theirs) = (kind(enforced), kind(shadow));
    if ours == theirs {
        return None;
    }
    let rule = theirs.2.clone().or_else(|| ours.2.clone()).unwrap_or_default();
    metrics::counter!("toolgate_shadow_differences_total", "rule" => rule, "enforced" => ours.0, "shadow" => theirs.0)
        .increment(1);
    Some(crate::audit::ShadowVerdict {
        decision: theirs.0,
        code: theirs.1,
        rule: theirs.2,
        policy_version: version.to_owned(),
    })
}
