//! Calls a rule holds for a person's approval: holding one (stage 6, and telling the approvers
//! by webhook), spending an approval on the exact call it was granted for (stage 9), and an
//! approver's decision, recorded before it takes effect.

use super::{ActionError, Gateway, Record};
use crate::approval::{Approval, ApprovalError, Approver, DecideError, HoldRequest, Refused, TooMany};
use crate::audit::{ActionNotDone, ApprovalDecided, By};
use crate::policy::{Code, Reason, Stage};

impl Gateway {
    /// Holds a call for approval (or finds the pending approval for this exact call) and tells
    /// the approvers; the reason for the 202.
    pub(super) async fn hold(&self, held: HoldRequest, reason: Reason, rec: &mut Record<'_>) -> Reason {
        let request_id = held.request_id.clone();
        let (approval, new) = match self.approvals.request(held, crate::state::unix_now()).await {
            Ok(Ok(found)) => found,
            Ok(Err(TooMany)) => {
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
            Err(e) => return store_failed(&request_id, e),
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

    /// Spends the approval `id` on this exact call (checked and marked used in one transaction).
    pub(super) async fn use_approval(&self, held: HoldRequest, id: &str, rec: &mut Record<'_>) -> Result<(), Reason> {
        let request_id = held.request_id.clone();
        let rule = held.rule.clone();
        let outcome = self
            .approvals
            .consume(id.to_owned(), held, crate::state::unix_now())
            .await
            .map_err(|e| store_failed(&request_id, e))?;
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

    /// An approver's decision, audited with who, when and why, then stored. The event is
    /// written first: if it cannot be, the approval stays pending. `who` must be in the
    /// approval's group and may not decide a call their own credentials made (their name is
    /// the agent's, or `credential`, the SHA-256 of the token they signed in with, is one of
    /// the agent's keys); refusals are the caller's to audit (`admin_refused`).
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        who: &Approver,
        credential: Option<[u8; 32]>,
        by: By<'_>,
        comment: &str,
    ) -> Result<Result<Approval, DecideError>, ActionError> {
        let _one = self.decisions.lock().await;
        // One instant for the look and the change: an approval that expires in between is
        // expired for both.
        let now = crate::state::unix_now();
        let Some(a) = self.approvals.get(id.to_owned(), now).await? else {
            return Ok(Err(DecideError::NotFound));
        };
        if credential.is_some_and(|d| self.policy_now().auth.agent_of_key(&d) == Some(a.agent.as_str())) {
            return Ok(Err(DecideError::OwnCall));
        }
        // Decided on a copy first: a refusal writes no `approval_decided`, and the event says
        // where the approval will stand (pending until a quorum is met).
        let mut after = a.clone();
        if let Err(e) = crate::approval::decide(&mut after, approve, who, comment, now) {
            return Ok(Err(e));
        }
        self.audit
            .emit(&ApprovalDecided {
                approval_id: &a.id,
                status: after.status.as_str(),
                decision: if approve { "approve" } else { "deny" },
                by,
                comment,
                decided_at: now,
                agent: &a.agent,
                tool: &a.tool,
                rule: &a.rule,
                group: &a.group,
                quorum: after.quorum,
                approvals: after.votes.len(),
                arguments_sha256: &a.arguments_sha256,
                request_id: &a.request_id,
            })
            .await?;
        let outcome = self
            .approvals
            .decide(id.to_owned(), approve, who.clone(), comment.to_owned(), now)
            .await;
        if let Err(e) = &outcome {
            self.not_done(
                ActionNotDone {
                    recorded_as: "approval_decided",
                    error: e.to_string(),
                    tool: None,
                    approval_id: Some(&a.id),
                },
                e,
            )
            .await;
        }
        let outcome = outcome?;
        if let Ok(a) = &outcome {
            let decision = if approve { "approve" } else { "deny" };
            metrics::counter!("toolgate_approvals_decided_total", "status" => a.status.as_str(), "decision" => decision)
                .increment(1);
            tracing::info!(approval = %a.id, status = a.status.as_str(), by = by.name, "approval decided");
        }
        Ok(outcome)
    }

    /// Records that an action whose event was written did not take effect after all (its
    /// store failed): `action_not_done`, naming the event it takes back.
    pub(super) async fn not_done(&self, event: ActionNotDone<'_>, error: &ApprovalError) {
        tracing::error!(
            event = event.recorded_as,
            "{} was recorded but not carried out: {error}",
            event.recorded_as
        );
        self.audit.emit_or_log(&event).await;
    }
}

fn store_failed(request_id: &str, e: ApprovalError) -> Reason {
    tracing::error!(request_id, "approval store failed: {e}");
    Reason::new(
        Code::Unavailable,
        Stage::Approval,
        "approval",
        "The approval store is unavailable, so the call was refused. Try again later.",
    )
}
