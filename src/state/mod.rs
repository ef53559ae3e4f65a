//! Shared, mutable state behind one small interface: rate limits, token budgets, denial counts
//! for anomaly detection, quarantines and session history. Checks never hold their own global
//! maps, so the backend is a choice of config: `memory` (this process, [`memory`]) or Redis
//! (shared by replicas, [`in_redis`]).
//!
//! A call is admitted by one operation ([`State::admit`]: quarantine, budget, rates), which is
//! one round trip to Redis, and settled by one more after its answer. Every operation that can
//! reach Redis is async and fallible: its caller fails closed on an error.

mod in_redis;
mod memory;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use in_redis::{ApprovalWrite, ConnectError, Found, RedisState};
pub use memory::{MAX_HISTORY_PER_AGENT, MemoryState};

use crate::policy::history::{History, PastCall, Recorded};

/// Why an agent is quarantined, and until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quarantine {
    /// Unix seconds.
    pub since: u64,
    /// Unix seconds; `None` until an admin releases it.
    pub until: Option<u64>,
    pub by: String,
    pub reason: String,
}

impl Quarantine {
    fn new(duration: Option<Duration>, by: &str, reason: &str) -> Self {
        let now = unix_now();
        Quarantine {
            since: now,
            // A duration meant as "forever" must not wrap into the past, nor pass the last
            // second a timestamp can be written for (9999-12-31).
            until: duration.map(|d| now.saturating_add(d.as_secs()).min(LAST_WRITABLE_SECOND)),
            by: by.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// A held token reservation; settle it once the call is over.
#[derive(Debug, Clone)]
pub enum Reservation {
    Memory(memory::Reservation),
    Redis(in_redis::Lease),
}

/// An agent's budget as of now.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    pub limit: u64,
    pub used: u64,
    pub reserved: u64,
    pub remaining: u64,
    /// Unix seconds when the hourly window resets.
    pub resets_at: u64,
}

impl BudgetStatus {
    fn new(limit: u64, used: u64, reserved: u64, window: u64) -> Self {
        BudgetStatus {
            limit,
            used,
            reserved,
            remaining: limit.saturating_sub(used + reserved),
            resets_at: (window + 1) * HOUR,
        }
    }
}

/// What went wrong with the state backend. The caller fails closed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state backend did not answer within {0} ms")]
    Timeout(u64),
    #[error("the state backend failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the state backend holds unexpected data: {0}")]
    Corrupt(String),
}

/// What admitting one call asks: its agent's limits, as the policy in force sets them.
pub struct Admission<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    /// `(tokens_per_hour, the call's tokens, the answer's tokens to reserve)`; the answer's
    /// `None` reserves the state's estimate.
    pub budget: Option<(u64, u64, Option<u64>)>,
    pub tool_rate: Option<NonZeroU32>,
    pub agent_rate: Option<NonZeroU32>,
    /// The call's time (Unix seconds), read once for all of its checks.
    pub now: u64,
    /// How long a reservation may be held before it is given back on its own (a replica that
    /// dies mid-call): longer than the call can take.
    pub lease: Duration,
}

/// Why a call was not admitted.
#[derive(Debug)]
pub enum Refusal {
    Quarantined(Quarantine),
    OverBudget(Duration),
    ToolRate(Duration),
    AgentRate(Duration),
    Unavailable(StateError),
}

/// One replica of the gateway, as it reports itself (`GET /admin/replicas`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub version: String,
    pub policy_version: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds: its last heartbeat.
    pub last_seen: u64,
}

/// A replica reports itself this often...
pub const HEARTBEAT_SECONDS: u64 = 5;
/// ...and is taken for gone after this long without a word.
pub const REPLICA_STALE_SECONDS: u64 = 15;

/// 9999-12-31T23:59:59Z: the last time RFC 3339 (and so an audit event) can say.
const LAST_WRITABLE_SECOND: u64 = 253_402_300_799;

const HOUR: u64 = 3600;

/// The denial kinds the anomaly watch counts (`anomaly.thresholds`).
const DENIAL_KINDS: [&str; 4] = [
    "tool_not_allowed",
    "content_blocked",
    "invalid_arguments",
    "rate_limited",
];

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An agent's turn to decide a call whose rules read history or that history records (see
/// [`State::history_turn`]); over when dropped.
pub enum HistoryTurn {
    Local(tokio::sync::OwnedMutexGuard<()>),
    /// A turn held in Redis, and the agent's calls as read once the turn was taken.
    Shared(in_redis::Turn, Recorded),
}

impl HistoryTurn {
    /// The history the call is decided on: read with the turn (Redis), or the state itself.
    pub fn history<'a>(&'a self, state: &'a State) -> &'a dyn History {
        match self {
            HistoryTurn::Local(_) => state,
            HistoryTurn::Shared(_, calls) => calls,
        }
    }
}

/// The state backends. A closed set, dispatched with `match`.
pub enum State {
    Memory(MemoryState),
    /// Limits, budgets, denials, quarantines and session history in Redis; `local` keeps
    /// nothing shared (it answers the memory-only questions as "nothing").
    Redis {
        shared: std::sync::Arc<RedisState>,
        local: MemoryState,
    },
}

impl Default for State {
    fn default() -> Self {
        State::Memory(MemoryState::default())
    }
}

impl State {
    pub fn redis(shared: std::sync::Arc<RedisState>) -> Self {
        State::Redis {
            shared,
            local: MemoryState::default(),
        }
    }

    /// The Redis backend, for what keeps its own shape there (MCP sessions).
    pub fn shared(&self) -> Option<std::sync::Arc<RedisState>> {
        match self {
            State::Memory(_) => None,
            State::Redis { shared, .. } => Some(shared.clone()),
        }
    }

    /// The process-local part: all of it in memory mode; nothing shared with Redis.
    fn local(&self) -> &MemoryState {
        match self {
            State::Memory(m) => m,
            State::Redis { local, .. } => local,
        }
    }

    /// Whether the backend answers now: memory always; Redis if a `PING` is answered within
    /// its deadline.
    pub async fn is_reachable(&self) -> bool {
        match self {
            State::Memory(_) => true,
            State::Redis { shared, .. } => shared.ping().await,
        }
    }

    /// The backend, for `/readyz` and logs: `memory`, or Redis's host and port.
    pub fn describe(&self) -> String {
        match self {
            State::Memory(_) => "memory".to_owned(),
            State::Redis { shared, .. } => format!("redis {}", shared.server()),
        }
    }

    /// Admits one call: quarantine (Redis only: in memory it is read earlier, for free), the
    /// budget reserved, then the rate allowances taken, the tighter per-tool one first;
    /// nothing is taken unless everything admits.
    pub async fn admit(&self, a: Admission<'_>) -> Result<Option<Reservation>, Refusal> {
        match self {
            State::Memory(m) => {
                let reservation = match a.budget {
                    Some((limit, tokens, answer)) => Some(
                        m.reserve_tokens(a.agent, limit, tokens, answer, a.now)
                            .map_err(Refusal::OverBudget)?,
                    ),
                    None => None,
                };
                let tool = a
                    .tool_rate
                    .and_then(|n| m.take_rate(&format!("{}|{}", a.agent, a.tool), n).err());
                let refused = match tool {
                    Some(wait) => Some(Refusal::ToolRate(wait)),
                    None => a
                        .agent_rate
                        .and_then(|n| m.take_rate(a.agent, n).err())
                        .map(Refusal::AgentRate),
                };
                match refused {
                    Some(r) => {
                        if let Some(res) = reservation {
                            m.release_tokens(res);
                        }
                        Err(r)
                    }
                    None => Ok(reservation.map(Reservation::Memory)),
                }
            }
            State::Redis { shared, .. } => {
                let ask = in_redis::Ask {
                    agent: a.agent,
                    tool: a.tool,
                    budget: a.budget,
                    tool_rate: a.tool_rate.map_or(0, NonZeroU32::get),
                    agent_rate: a.agent_rate.map_or(0, NonZeroU32::get),
                    lease: a.lease,
                };
                match shared.admit(ask).await.map_err(Refusal::Unavailable)? {
                    in_redis::Answer::Admitted(lease) => Ok(lease.map(Reservation::Redis)),
                    in_redis::Answer::Quarantined(q) => Err(Refusal::Quarantined(q)),
                    in_redis::Answer::OverBudget(w) => Err(Refusal::OverBudget(w)),
                    in_redis::Answer::ToolRate(w) => Err(Refusal::ToolRate(w)),
                    in_redis::Answer::AgentRate(w) => Err(Refusal::AgentRate(w)),
                }
            }
        }
    }

    /// Settles a reservation with what flowed (see [`MemoryState::settle_tokens`]). With Redis
    /// it is sent after the answer, batched with the thread's others; a failure is logged: the
    /// call already happened, and its lease ends on its own.
    pub fn settle_tokens(&self, r: Reservation, input: u64, output: u64) {
        match (self, r) {
            (State::Memory(m), Reservation::Memory(r)) => m.settle_tokens(r, input, output),
            (State::Redis { shared, .. }, Reservation::Redis(lease)) => shared.settle_later(lease, input, output),
            _ => {}
        }
    }

    /// Gives a reservation back unused (the call was refused after reserving).
    pub async fn release_tokens(&self, r: Reservation) {
        match (self, r) {
            (State::Memory(m), Reservation::Memory(r)) => m.release_tokens(r),
            (State::Redis { shared, .. }, Reservation::Redis(lease)) => {
                if let Err(e) = shared.settle(&lease, 0, 0).await {
                    tracing::error!(
                        "a budget reservation could not be given back (its lease will end on its own): {e}"
                    );
                }
            }
            _ => {}
        }
    }

    pub async fn budget(&self, agent: &str, limit: u64) -> Result<BudgetStatus, StateError> {
        match self {
            State::Memory(m) => Ok(m.budget(agent, limit)),
            State::Redis { shared, .. } => {
                let (used, reserved) = shared.budget(agent).await?;
                Ok(BudgetStatus::new(limit, used, reserved, unix_now() / HOUR))
            }
        }
    }

    /// Records a denial (see [`MemoryState::record_denial`]).
    pub async fn record_denial(
        &self,
        agent: &str,
        kind: &'static str,
        window: Duration,
        threshold: usize,
    ) -> Result<Option<usize>, StateError> {
        match self {
            State::Memory(m) => Ok(m.record_denial(agent, kind, window, threshold)),
            State::Redis { shared, .. } => shared.record_denial(agent, kind, window, threshold).await,
        }
    }

    /// Recent denials per kind, for `GET /admin/agents/{id}`.
    pub async fn denials(&self, agent: &str, window: Duration) -> Result<HashMap<&'static str, usize>, StateError> {
        match self {
            State::Memory(m) => Ok(m.denials(agent, window)),
            State::Redis { shared, .. } => shared.denials(agent, &DENIAL_KINDS, window).await,
        }
    }

    /// Quarantines an agent. `Ok(false)` if it already was.
    pub async fn quarantine(
        &self,
        agent: &str,
        duration: Option<Duration>,
        by: &str,
        reason: &str,
    ) -> Result<bool, StateError> {
        match self {
            State::Memory(m) => Ok(m.quarantine(agent, duration, by, reason)),
            State::Redis { shared, .. } => shared.quarantine(agent, &Quarantine::new(duration, by, reason)).await,
        }
    }

    /// Releases the agent from quarantine `q`, the one the caller read (and recorded the
    /// release of): a quarantine put in force since, by another replica, is kept. True if `q`
    /// was released.
    pub async fn release(&self, agent: &str, q: &Quarantine) -> Result<bool, StateError> {
        match self {
            State::Memory(m) => Ok(m.release_if(agent, q)),
            State::Redis { shared, .. } => shared.release(agent, q).await,
        }
    }

    /// The agent's quarantine, if one is in force.
    pub async fn quarantined(&self, agent: &str) -> Result<Option<Quarantine>, StateError> {
        match self {
            State::Memory(m) => Ok(m.quarantined(agent)),
            State::Redis { shared, .. } => shared.quarantined(agent).await,
        }
    }

    /// Records this replica as alive, with the policy version it serves (Redis; nothing to
    /// record in memory).
    pub async fn heartbeat(&self, me: &Replica) -> Result<(), StateError> {
        match self {
            State::Memory(_) => Ok(()),
            State::Redis { shared, .. } => shared.heartbeat(me).await,
        }
    }

    /// The replicas sharing this state, `me` included, by id.
    pub async fn replicas(&self, me: Replica) -> Result<Vec<Replica>, StateError> {
        let mut all = match self {
            State::Memory(_) => Vec::new(),
            State::Redis { shared, .. } => shared.replicas().await?,
        };
        all.retain(|r| r.id != me.id);
        all.push(me);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// The agent's quarantine if this process can tell at no cost: in memory, always; with
    /// Redis, never (the admission reads it, in the same round trip as the limits).
    pub fn quarantined_locally(&self, agent: &str) -> Option<Quarantine> {
        match self {
            State::Memory(m) => m.quarantined(agent),
            State::Redis { .. } => None,
        }
    }

    /// Waits for this agent's turn to decide a call whose rules read history or that history
    /// records, and holds it until the turn drops: from evaluation to recording, so that
    /// concurrent calls cannot all pass a count ("at most 3 refunds an hour") together. With
    /// Redis the turn is shared by every replica, and the history read with it.
    pub async fn history_turn(&self, agent: &str, retention: Duration) -> Result<HistoryTurn, StateError> {
        match self {
            State::Memory(m) => Ok(HistoryTurn::Local(m.history_turn(agent).await)),
            State::Redis { shared, .. } => {
                let (turn, calls) = shared.history_turn(agent, retention).await?;
                Ok(HistoryTurn::Shared(turn, calls))
            }
        }
    }

    /// Records a call that rules may look back at; drops what is older than `retention`.
    pub async fn record_call(&self, agent: &str, call: PastCall, retention: Duration) -> Result<(), StateError> {
        match self {
            State::Memory(m) => {
                m.record_call(agent, call, retention);
                Ok(())
            }
            State::Redis { shared, .. } => shared.record_call(agent, &call, retention, MAX_HISTORY_PER_AGENT).await,
        }
    }

    /// Takes back a recorded call (its tool failed). With Redis, a failure is logged: the call
    /// then counts as made, the stricter error.
    pub async fn forget_call(&self, agent: &str, call: &PastCall) {
        match self {
            State::Memory(m) => m.forget_call(agent, call),
            State::Redis { shared, .. } => {
                if let Err(e) = shared.forget_call(agent, call).await {
                    tracing::error!(agent, "a failed call could not be taken out of history: {e}");
                }
            }
        }
    }
}

impl History for State {
    fn visit(&self, agent: &str, since_ms: u64, visit: &mut dyn FnMut(&PastCall)) {
        self.local().visit(agent, since_ms, visit)
    }
}
