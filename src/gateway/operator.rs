//! What operators (and the anomaly watch) do to agents: quarantine and release, anomalies
//! counted from denials, and the budgets `/metrics` reports. A release lets an agent do more,
//! so it is recorded before it takes effect; a quarantine only closes, so it takes effect even
//! when its event cannot be written.

use std::time::Duration;

use super::{ActionError, Gateway};
use crate::audit::{AgentQuarantined, AgentReleased, Anomaly, By};
use crate::policy::{Policy, Reason, Stage};
use crate::state::StateError;

/// What a quarantine did. It only closes, so it takes effect even when its event cannot be
/// written (`audited: false`; the failure is logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantined {
    /// False if the agent already was in quarantine.
    pub changed: bool,
    pub audited: bool,
}

impl Gateway {
    /// Counts the agent's denials by kind; crossing a threshold writes an `anomaly` event and,
    /// if the policy says so, quarantines the agent.
    pub(super) async fn watch_for_anomalies(&self, policy: &Policy, agent: &str, reason: &Reason, request_id: &str) {
        // Output blocks are the tool's doing, not the agent's.
        if reason.stage == Stage::Output {
            return;
        }
        let kind = reason.code.as_str();
        let anomaly = &policy.anomaly;
        let Some(threshold) = anomaly.threshold(kind) else {
            return;
        };
        let count = match self
            .state
            .record_denial(agent, kind, anomaly.window(), threshold as usize)
            .await
        {
            Ok(Some(count)) => count,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(agent, kind, "a denial could not be counted: {e}");
                return;
            }
        };
        if let Ok(Some(_)) = self.state.quarantined(agent).await {
            return;
        }
        let action = if anomaly.quarantine { "quarantine" } else { "none" };
        metrics::counter!("toolgate_anomalies_total", "agent" => agent.to_owned(), "kind" => kind).increment(1);
        tracing::warn!(agent, kind, count, "anomaly: threshold crossed");
        let event = Anomaly {
            agent,
            kind,
            count,
            threshold,
            window_seconds: anomaly.window_seconds,
            action,
            request_id,
        };
        self.audit.emit_or_log(&event).await;
        if anomaly.quarantine {
            let duration = (anomaly.quarantine_seconds > 0).then(|| Duration::from_secs(anomaly.quarantine_seconds));
            let why = format!("{count} {kind} denials within {} s", anomaly.window_seconds);
            if let Err(e) = self.quarantine(agent, duration, By::gateway("anomaly"), &why).await {
                tracing::error!(agent, "the anomaly's quarantine could not be put in force: {e}");
            }
        }
    }

    /// Quarantines an agent and audits it (see [`Quarantined`]). An error if the state backend
    /// could not put it in force (then nothing is recorded).
    pub async fn quarantine(
        &self,
        agent: &str,
        duration: Option<Duration>,
        by: By<'_>,
        reason: &str,
    ) -> Result<Quarantined, StateError> {
        // Not while a release is being recorded: it would then remove this quarantine, not
        // the one its event names.
        let _one = self.decisions.lock().await;
        if !self.state.quarantine(agent, duration, by.name, reason).await? {
            return Ok(Quarantined {
                changed: false,
                audited: true,
            });
        }
        let until = self.state.quarantined(agent).await.ok().flatten().and_then(|q| q.until);
        metrics::gauge!("toolgate_agent_quarantined", "agent" => agent.to_owned()).set(1.0);
        tracing::warn!(agent, by = by.name, reason, "agent quarantined");
        let event = AgentQuarantined {
            agent,
            by,
            reason,
            until,
        };
        let audited = match self.audit.emit(&event).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    agent,
                    by = by.name,
                    "the quarantine is in force, but its audit event could not be written: {e}"
                );
                false
            }
        };
        Ok(Quarantined { changed: true, audited })
    }

    /// Releases an agent, once its `agent_released` event (with who did it) is written.
    /// `Ok(false)` if it was not quarantined; an error, and no release, if the event could not
    /// be written or the state backend did not answer.
    pub async fn release(&self, agent: &str, by: By<'_>, comment: &str) -> Result<bool, ActionError> {
        let _one = self.decisions.lock().await;
        let Some(q) = self.state.quarantined(agent).await? else {
            return Ok(false);
        };
        let event = AgentReleased {
            agent,
            by,
            comment,
            quarantined_since: q.since,
            quarantined_by: &q.by,
        };
        self.audit.emit(&event).await?;
        // The quarantine the event names, not one another replica put in force since.
        self.state.release(agent, &q).await?;
        metrics::gauge!("toolgate_agent_quarantined", "agent" => agent.to_owned()).set(0.0);
        tracing::info!(agent, by = by.name, "agent released from quarantine");
        Ok(true)
    }

    /// Sets `toolgate_budget_remaining_tokens{agent}` for every agent with an hourly budget,
    /// as of now: called when `/metrics` is scraped, not on every call (a gauge written per
    /// call is a line both data-plane cores write, and it went stale when an hour's window
    /// reset with no call to update it).
    ///
    /// With Redis, the agents are read at once: a Redis that does not answer costs the scrape
    /// one deadline, not one per agent.
    pub async fn report_budgets(&self) {
        let policy = self.policy.load_full();
        let reads = policy.agents.iter().filter_map(|(id, agent)| {
            let limit = agent.limits.tokens_per_hour?;
            Some(async move { (id, self.state.budget(id, limit.get()).await) })
        });
        for (id, read) in futures_util::future::join_all(reads).await {
            if let Ok(b) = read {
                self.meters.budget_remaining(id, b.remaining as f64);
            }
        }
    }
}
