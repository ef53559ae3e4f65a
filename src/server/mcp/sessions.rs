//! MCP sessions of the handshake revisions (2025-11-25 / 2025-06-18): a random id bound to the
//! agent that opened it and the revision it negotiated. Bounded in number; idle ones expire.
//! The stateless revision needs none of this. With `state: redis://…` sessions are in Redis,
//! so any replica serves any session; in memory, only the replica that opened it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::state::{Found, RedisState};

struct Session {
    agent: Arc<str>,
    version: &'static str,
    last_seen: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SessionError {
    Unknown,
    /// The id exists but another agent opened it: a hijack attempt, or a leaked id.
    OtherAgent,
    Full,
    /// Redis did not answer.
    Unavailable,
}

/// The sessions, in this process or in Redis.
pub enum Sessions {
    Local(LocalSessions),
    Shared {
        state: Arc<RedisState>,
        idle: Duration,
        /// The most sessions one agent may hold: a tenth of `mcp.max_sessions`, as in memory.
        per_agent: usize,
    },
}

impl Sessions {
    pub fn new(max: usize, idle: Duration, shared: Option<Arc<RedisState>>) -> Self {
        match shared {
            None => Sessions::Local(LocalSessions::new(max, idle)),
            Some(state) => Sessions::Shared {
                state,
                idle,
                per_agent: (max / 10).max(1),
            },
        }
    }

    pub async fn open(&self, agent: Arc<str>, version: &'static str) -> Result<String, SessionError> {
        match self {
            Sessions::Local(l) => l.open(agent, version),
            Sessions::Shared { state, idle, per_agent } => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                match state.open_session(&agent, &id, version, *idle, *per_agent).await {
                    Ok(true) => Ok(id),
                    Ok(false) => Err(SessionError::Full),
                    Err(_) => Err(SessionError::Unavailable),
                }
            }
        }
    }

    /// The session's revision (one of `known`), if `id` is a live session of `agent`.
    pub async fn check(&self, id: &str, agent: &str, known: &[&'static str]) -> Result<&'static str, SessionError> {
        match self {
            Sessions::Local(l) => l.check(id, agent),
            Sessions::Shared { state, idle, .. } => match state.check_session(agent, id, *idle).await {
                Ok(Found::Live(v)) => known.iter().find(|k| **k == v).copied().ok_or(SessionError::Unknown),
                Ok(Found::Unknown) => Err(SessionError::Unknown),
                Ok(Found::OtherAgent) => Err(SessionError::OtherAgent),
                Err(_) => Err(SessionError::Unavailable),
            },
        }
    }

    /// Ends `agent`'s session `id`.
    pub async fn end(&self, id: &str, agent: &str) -> Result<(), SessionError> {
        match self {
            Sessions::Local(l) => l.end(id, agent),
            Sessions::Shared { state, .. } => match state.end_session(agent, id).await {
                Ok(Found::Live(_)) => Ok(()),
                Ok(Found::Unknown) => Err(SessionError::Unknown),
                Ok(Found::OtherAgent) => Err(SessionError::OtherAgent),
                Err(_) => Err(SessionError::Unavailable),
            },
        }
    }
}

pub struct LocalSessions {
    map: Mutex<HashMap<String, Session>>,
    max: usize,
    idle: Duration,
}

impl LocalSessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max,
            idle,
        }
    }

    /// Opens a session for `agent`; its id is 128 random bits. One agent may hold at most a
    /// tenth of all sessions, so it cannot lock the others out.
    pub fn open(&self, agent: Arc<str>, version: &'static str) -> Result<String, SessionError> {
        let mut map = self.map.lock().expect("sessions lock");
        let per_agent = (self.max / 10).max(1);
        let full = |map: &HashMap<String, Session>| {
            map.len() >= self.max || map.values().filter(|s| s.agent == agent).count() >= per_agent
        };
        if full(&map) {
            let idle = self.idle;
            map.retain(|_, s| s.last_seen.elapsed() < idle);
            if full(&map) {
                return Err(SessionError::Full);
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        map.insert(
            id.clone(),
            Session {
                agent,
                version,
                last_seen: Instant::now(),
            },
        );
        Ok(id)
    }

    /// The session's revision, if `id` is a live session of `agent`.
    pub fn check(&self, id: &str, agent: &str) -> Result<&'static str, SessionError> {
        let mut map = self.map.lock().expect("sessions lock");
        let Some(s) = map.get_mut(id) else {
            return Err(SessionError::Unknown);
        };
        if s.last_seen.elapsed() >= self.idle {
            map.remove(id);
            return Err(SessionError::Unknown);
        }
        if &*s.agent != agent {
            return Err(SessionError::OtherAgent);
        }
        s.last_seen = Instant::now();
        Ok(s.version)
    }

    /// Ends `agent`'s session `id`.
    pub fn end(&self, id: &str, agent: &str) -> Result<(), SessionError> {
        self.check(id, agent)?;
        self.map.lock().expect("sessions lock").remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bound_to_their_agent_bounded_and_expire() {
        let s = LocalSessions::new(20, Duration::from_millis(50));
        let a = s.open("a".into(), "2025-06-18").unwrap();
        assert_eq!(s.check(&a, "a"), Ok("2025-06-18"));
        assert_eq!(s.check(&a, "b"), Err(SessionError::OtherAgent));
        assert_eq!(s.check("nope", "a"), Err(SessionError::Unknown));
        s.open("a".into(), "2025-11-25").unwrap();
        assert_eq!(
            s.open("a".into(), "2025-11-25"),
            Err(SessionError::Full),
            "2 of 20 per agent"
        );
        assert!(
            s.open("b".into(), "2025-11-25").is_ok(),
            "another agent is not locked out"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.check(&a, "a"), Err(SessionError::Unknown));
        assert!(s.open("a".into(), "2025-11-25").is_ok(), "idle sessions make room");
        assert_eq!(s.end(&a, "a"), Err(SessionError::Unknown));
    }
}
