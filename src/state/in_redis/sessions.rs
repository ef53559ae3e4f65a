//! MCP sessions of the handshake revisions in Redis, so any replica serves any session: a
//! session is a key (its agent and revision) that expires when idle, and each agent's open
//! sessions a sorted set, which bounds how many it may hold.

use std::time::Duration;

use redis::Value;

use super::RedisState;
use crate::state::StateError;

/// What Redis knows of a session id, for an agent.
pub enum Found {
    /// A live session of this agent, of this revision.
    Live(String),
    Unknown,
    /// A live session of another agent.
    OtherAgent,
}

impl RedisState {
    async fn session_op(
        &self,
        op: &str,
        agent: &str,
        id: &str,
        idle: Duration,
        version: &str,
        most: usize,
    ) -> Result<Value, StateError> {
        let mut inv = self.scripts.session.prepare_invoke();
        inv.key(format!("{}:mcp_session:{{{id}}}", self.prefix))
            .key(self.key(agent, "mcp_sessions"))
            .arg(op)
            .arg(agent)
            .arg(id)
            .arg(idle.as_millis() as u64)
            .arg(version)
            .arg(most);
        self.invoke::<Value>(&inv).await
    }

    /// Opens session `id`; false if the agent already holds `most`.
    pub async fn open_session(
        &self,
        agent: &str,
        id: &str,
        version: &str,
        idle: Duration,
        most: usize,
    ) -> Result<bool, StateError> {
        let v = self.session_op("open", agent, id, idle, version, most).await?;
        Ok(matches!(v, Value::Int(1)))
    }

    /// Looks session `id` up for `agent`, and keeps it alive if it is the agent's.
    pub async fn check_session(&self, agent: &str, id: &str, idle: Duration) -> Result<Found, StateError> {
        let v = self.session_op("check", agent, id, idle, "", 0).await?;
        Ok(found(v))
    }

    /// Ends `agent`'s session `id`.
    pub async fn end_session(&self, agent: &str, id: &str) -> Result<Found, StateError> {
        let v = self.session_op("end", agent, id, Duration::ZERO, "", 0).await?;
        Ok(match v {
            Value::Int(1) => Found::Live(String::new()),
            other => found(other),
        })
    }
}

fn found(v: Value) -> Found {
    match v {
        Value::BulkString(b) if b == b"!" => Found::OtherAgent,
        Value::BulkString(b) if !b.is_empty() => Found::Live(String::from_utf8_lossy(&b).into_owned()),
        _ => Found::Unknown,
    }
}
