//! Session history in Redis, for rules that look back at an agent's earlier calls ("at most 3
//! refunds an hour", "a fraud check before a refund") across every replica.
//!
//! An agent's calls are a sorted set scored by time, each member the call as JSON: its tool,
//! time, session and the hashes of the arguments a rule compares (never the values). A call
//! whose rules read history is decided in its agent's **turn**, a lock in Redis (`SET NX` with
//! an expiry, ended by a compare-and-delete script), held from reading the history to
//! recording the call: concurrent calls on any replicas cannot all pass a count together. A
//! turn whose replica died ends with its expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::RedisState;
use crate::policy::history::{PastCall, Recorded};
use crate::state::StateError;

/// A turn is given up after this long even if its holder never ends it (a replica that died).
const TURN_EXPIRY: Duration = Duration::from_secs(10);
/// How long a call waits for its agent's turn before it is refused as unavailable.
const TURN_WAIT: Duration = Duration::from_secs(10);

/// An agent's history turn, held in Redis; ended when dropped.
pub struct Turn {
    state: Arc<RedisState>,
    key: String,
    token: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (state, key, token) = (
            self.state.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        // Ended off the call's path; if this fails, the expiry ends it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut inv = state.scripts.unlock.prepare_invoke();
                inv.key(&key).arg(&token);
                let _ = state.invoke::<i64>(&inv).await;
            });
        }
    }
}

impl RedisState {
    /// Waits for `agent`'s turn, then reads its calls since `retention` ago.
    pub(in crate::state) async fn history_turn(
        self: &Arc<Self>,
        agent: &str,
        retention: Duration,
    ) -> Result<(Turn, Recorded), StateError> {
        let key = self.key(agent, "history_turn");
        let token = uuid::Uuid::new_v4().simple().to_string();
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let taken: Option<String> = self
                .run(|mut c| {
                    let (key, token) = (&key, &token);
                    async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(token)
                            .arg("NX")
                            .arg("PX")
                            .arg(TURN_EXPIRY.as_millis() as u64)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            if taken.is_some() {
                break;
            }
            if started.elapsed() > TURN_WAIT {
                return Err(StateError::Timeout(TURN_WAIT.as_millis() as u64));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        let turn = Turn {
            state: self.clone(),
            key,
            token,
        };
        let since = crate::state::unix_now_ms().saturating_sub(retention.as_millis() as u64);
        let history = self.key(agent, "history");
        let members: Vec<Vec<u8>> = self
            .run(|mut c| {
                let history = &history;
                async move {
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(history)
                        .arg(since)
                        .arg("+inf")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let calls = members
            .iter()
            .map(|m| from_member(m).map(|c| (agent.to_owned(), c)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((turn, Recorded(calls)))
    }

    pub(in crate::state) async fn record_call(
        &self,
        agent: &str,
        call: &PastCall,
        retention: Duration,
        cap: usize,
    ) -> Result<(), StateError> {
        let mut inv = self.scripts.record.prepare_invoke();
        inv.key(self.key(agent, "history"))
            .arg(call.at_ms)
            .arg(to_member(call))
            .arg(retention.as_millis() as u64)
            .arg(cap);
        self.invoke::<i64>(&inv).await.map(drop)
    }

    /// Takes back a recorded call (its tool failed): the one with its time, tool and session.
    pub(in crate::state) async fn forget_call(&self, agent: &str, call: &PastCall) -> Result<(), StateError> {
        let key = self.key(agent, "history");
        let members: Vec<Vec<u8>> = self
            .run(|mut c| {
                let key = &key;
                async move {
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(key)
                        .arg(call.at_ms)
                        .arg(call.at_ms)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let Some(member) = members.into_iter().rev().find(|m| {
            from_member(m).is_ok_and(|c| c.tool == call.tool && c.session == call.session && c.at_ms == call.at_ms)
        }) else {
            return Ok(());
        };
        self.run(|mut c| {
            let (key, member) = (&key, &member);
            async move { redis::cmd("ZREM").arg(key).arg(member).query_async::<i64>(&mut c).await }
        })
        .await
        .map(drop)
    }
}

/// A call as a history member: JSON, with a random id so two calls alike stay two members.
fn to_member(call: &PastCall) -> String {
    let values: Vec<Value> = call
        .values
        .iter()
        .map(|(name, hash)| json!([&**name, hex::encode(hash)]))
        .collect();
    json!({
        "id": &uuid::Uuid::new_v4().simple().to_string()[..12],
        "tool": &*call.tool,
        "at_ms": call.at_ms,
        "session": call.session.as_deref(),
        "values": values,
    })
    .to_string()
}

fn from_member(member: &[u8]) -> Result<PastCall, StateError> {
    let corrupt = |what: &str| StateError::Corrupt(format!("a history entry {what}"));
    let v: Value = serde_json::from_slice(member).map_err(|_| corrupt("that is not JSON"))?;
    let values = v["values"]
        .as_array()
        .ok_or_else(|| corrupt("without values"))?
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().ok_or_else(|| corrupt("with a nameless value"))?;
            let mut hash = [0u8; 16];
            hex::decode_to_slice(pair[1].as_str().unwrap_or(""), &mut hash).map_err(|_| corrupt("with a bad hash"))?;
            Ok((Arc::from(name), hash))
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    Ok(PastCall {
        tool: v["tool"].as_str().ok_or_else(|| corrupt("without a tool"))?.into(),
        at_ms: v["at_ms"].as_u64().ok_or_else(|| corrupt("without a time"))?,
        session: v["session"].as_str().map(Into::into),
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_survives_the_trip_through_a_member() {
        let call = PastCall {
            tool: "billing.refund".into(),
            at_ms: 1_765_000_000_123,
            session: Some("s-1".into()),
            values: vec![("order_id".into(), [7u8; 16])],
        };
        let back = from_member(to_member(&call).as_bytes()).unwrap();
        assert_eq!(
            (&back.tool, back.at_ms, &back.session, &back.values),
            (&call.tool, call.at_ms, &call.session, &call.values)
        );
        assert_ne!(to_member(&call), to_member(&call), "two calls alike are two members");
        assert!(from_member(b"{\"tool\": 1}").is_err());
    }
}
