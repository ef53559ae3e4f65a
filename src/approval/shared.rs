//! The approval store in Redis (`state: redis://…`), so a call held on one replica can be
//! approved through any replica's admin plane and passed once on any replica.
//!
//! An approval is one key (JSON) that Redis forgets a week after it stopped mattering. Every
//! change reads it, applies the same decision functions the file store applies
//! ([`super::decide`], [`super::consume`]), and writes it back only if it is still as read
//! (a compare-and-set script, retried on a conflict): of two replicas using one approval at
//! once, one wins and the other reads it used. An agent's pending requests are a hash from the
//! exact call (tool and arguments) to its approval, kept in step by the same script. The pins of
//! upstream MCP tools are one hash.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Approval, ApprovalError, Approver, DecideError, Hold, KEEP_FOR_SECS, MAX_PENDING_PER_AGENT, Pin, Refused, Status,
    TooMany, pending_key,
};
use crate::state::{ApprovalWrite, RedisState, StateError};

/// Conflicting writers retry this often before the operation fails as unavailable.
const ATTEMPTS: usize = 8;

impl From<StateError> for ApprovalError {
    fn from(e: StateError) -> Self {
        ApprovalError::Store(e.to_string())
    }
}

pub struct SharedApprovals {
    pub(super) redis: Arc<RedisState>,
    pub(super) ttl: Duration,
}

impl SharedApprovals {
    async fn read(&self, id: &str) -> Result<Option<(Vec<u8>, Approval)>, ApprovalError> {
        let bytes: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(self.redis.approval_key(id)).clone())
            .await?;
        match bytes {
            None => Ok(None),
            Some(b) => {
                let a = serde_json::from_slice(&b)?;
                Ok(Some((b, a)))
            }
        }
    }

    pub(super) async fn request(
        &self,
        hold: Hold<'_>,
        now: u64,
    ) -> Result<Result<(Approval, bool), TooMany>, ApprovalError> {
        let call_key = pending_key(hold.agent, hold.tool, hold.arguments_sha256);
        let pending_hash = self.redis.pending_key(hold.agent);
        for _ in 0..ATTEMPTS {
            let pointing: Option<String> = self
                .redis
                .query(redis::cmd("HGET").arg(&pending_hash).arg(&call_key).clone())
                .await?;
            if let Some(id) = &pointing
                && let Some((_, a)) = self.read(id).await?
            {
                let a = a.settle(now);
                if a.status == Status::Pending {
                    return Ok(Ok((a, false)));
                }
            }
            let count: usize = self.redis.query(redis::cmd("HLEN").arg(&pending_hash).clone()).await?;
            if count >= MAX_PENDING_PER_AGENT && self.live_pending(&pending_hash, now).await? >= MAX_PENDING_PER_AGENT {
                return Ok(Err(TooMany));
            }
            let a = super::new_approval(hold.clone(), now, self.ttl);
            let json = serde_json::to_vec(&a)?;
            let written = self
                .redis
                .write_approval(ApprovalWrite {
                    id: &a.id,
                    agent: &a.agent,
                    expected: None,
                    new: &json,
                    forget_at_ms: forget_at_ms(&a),
                    call_key: &call_key,
                    pending: Some(pointing.as_deref().unwrap_or("")),
                    settled: false,
                    requested_at: a.requested_at,
                })
                .await?;
            if written {
                return Ok(Ok((a, true)));
            }
        }
        Err(ApprovalError::Store(
            "too many concurrent changes to this agent's approvals".to_owned(),
        ))
    }

    /// The agent's requests still pending at `now`; entries for approvals that are not (or
    /// are gone) are dropped, so requests nobody answered do not lock the agent out.
    async fn live_pending(&self, pending_hash: &str, now: u64) -> Result<usize, ApprovalError> {
        let entries: HashMap<String, String> = self
            .redis
            .query(redis::cmd("HGETALL").arg(pending_hash).clone())
            .await?;
        let mut live = 0;
        for (call_key, id) in entries {
            let still = self
                .read(&id)
                .await?
                .is_some_and(|(_, a)| a.settle(now).status == Status::Pending);
            if still {
                live += 1;
            } else {
                let _: i64 = self
                    .redis
                    .query(redis::cmd("HDEL").arg(pending_hash).arg(&call_key).clone())
                    .await?;
            }
        }
        Ok(live)
    }

    /// Reads approval `id`, applies `change`, and writes it back if no one changed it
    /// meanwhile (else again). `Err(None)`: not found.
    async fn update<E>(
        &self,
        id: &str,
        now: u64,
        mut change: impl FnMut(&mut Approval) -> Result<(), E>,
    ) -> Result<Result<Approval, Option<E>>, ApprovalError> {
        for _ in 0..ATTEMPTS {
            let Some((bytes, a)) = self.read(id).await? else {
                return Ok(Err(None));
            };
            let mut a = a.settle(now);
            if let Err(e) = change(&mut a) {
                return Ok(Err(Some(e)));
            }
            let json = serde_json::to_vec(&a)?;
            let call_key = pending_key(&a.agent, &a.tool, &a.arguments_sha256);
            let written = self
                .redis
                .write_approval(ApprovalWrite {
                    id,
                    agent: &a.agent,
                    expected: Some(&bytes),
                    new: &json,
                    forget_at_ms: forget_at_ms(&a),
                    call_key: &call_key,
                    pending: None,
                    settled: a.status != Status::Pending,
                    requested_at: a.requested_at,
                })
                .await?;
            if written {
                return Ok(Ok(a));
            }
        }
        Err(ApprovalError::Store(
            "too many concurrent changes to this approval".to_owned(),
        ))
    }

    pub(super) async fn decide(
        &self,
        id: &str,
        approve: bool,
        who: &Approver,
        comment: &str,
        now: u64,
    ) -> Result<Result<Approval, DecideError>, ApprovalError> {
        self.update(id, now, |a| super::decide(a, approve, who, comment, now))
            .await
            .map(|r| r.map_err(|e| e.unwrap_or(DecideError::NotFound)))
    }

    pub(super) async fn consume(
        &self,
        id: &str,
        call: &Hold<'_>,
        now: u64,
    ) -> Result<Result<Approval, Refused>, ApprovalError> {
        let outcome = self.update(id, now, |a| super::consume(a, call, now)).await?;
        Ok(outcome.map_err(|e| e.unwrap_or(Refused("no approval with this id exists for this agent"))))
    }

    pub(super) async fn get(&self, id: &str, now: u64) -> Result<Option<Approval>, ApprovalError> {
        Ok(self.read(id).await?.map(|(_, a)| a.settle(now)))
    }

    /// Every approval Redis still keeps (optionally of one status), newest first.
    pub(super) async fn list(&self, status: Option<Status>, now: u64) -> Result<Vec<Approval>, ApprovalError> {
        let index = format!("{}:approvals", self.redis.prefix());
        let ids: Vec<String> = self
            .redis
            .query(redis::cmd("ZREVRANGE").arg(&index).arg(0).arg(-1).clone())
            .await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for chunk in ids.chunks(256) {
            let keys: Vec<String> = chunk.iter().map(|id| self.redis.approval_key(id)).collect();
            let values: Vec<Option<Vec<u8>>> = self.redis.query(redis::cmd("MGET").arg(&keys).clone()).await?;
            for (id, v) in chunk.iter().zip(values) {
                match v {
                    Some(b) => {
                        let a: Approval = serde_json::from_slice(&b)?;
                        let a = a.settle(now);
                        if status.is_none_or(|s| s == a.status) {
                            out.push(a);
                        }
                    }
                    None => gone.push(id.clone()),
                }
            }
        }
        if !gone.is_empty() {
            let _: i64 = self
                .redis
                .query(redis::cmd("ZREM").arg(&index).arg(&gone).clone())
                .await?;
        }
        out.sort_by(|a, b| b.requested_at.cmp(&a.requested_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    fn pins_key(&self) -> String {
        format!("{}:tool_pins", self.redis.prefix())
    }

    pub(super) async fn pin(&self, tool: &str) -> Result<Option<Pin>, ApprovalError> {
        let v: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("HGET").arg(self.pins_key()).arg(tool).clone())
            .await?;
        Ok(v.map(|b| serde_json::from_slice(&b)).transpose()?)
    }

    pub(super) async fn has_pins(&self, server: &str) -> Result<bool, ApprovalError> {
        let tools: Vec<String> = self
            .redis
            .query(redis::cmd("HKEYS").arg(self.pins_key()).clone())
            .await?;
        let prefix = format!("{server}.");
        Ok(tools.iter().any(|t| t.starts_with(&prefix)))
    }

    pub(super) async fn set_pin(&self, tool: &str, pin: &Pin) -> Result<(), ApprovalError> {
        let json = serde_json::to_vec(pin)?;
        let _: i64 = self
            .redis
            .query(redis::cmd("HSET").arg(self.pins_key()).arg(tool).arg(json).clone())
            .await?;
        Ok(())
    }

    /// Approvals expire in Redis on their own; the listing's index forgets what is older than
    /// any approval can be kept.
    pub(super) async fn prune(&self, now: u64) -> Result<(), ApprovalError> {
        let oldest = now.saturating_sub(KEEP_FOR_SECS + self.ttl.as_secs() + 24 * 3600);
        let index = format!("{}:approvals", self.redis.prefix());
        let _: i64 = self
            .redis
            .query(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(index)
                    .arg("-inf")
                    .arg(oldest)
                    .clone(),
            )
            .await?;
        Ok(())
    }
}

/// When Redis may forget an approval: a week after it stopped mattering.
fn forget_at_ms(a: &Approval) -> u64 {
    (super::settled_at(a) + KEEP_FOR_SECS).saturating_mul(1000)
}
