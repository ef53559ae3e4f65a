//! `state: redis://…`: the state that replicas share, in Redis.
//!
//! Why it is shaped this way:
//! - **One round trip admits a call.** Quarantine, the token budget and the rate allowances
//!   are checked and taken by one Lua script (`lua/admit.lua`), atomically: concurrent calls on
//!   any number of replicas can never together pass a limit that admits fewer. Scripts run by
//!   `EVALSHA` (loaded once; reloaded if Redis forgets them). Redis's clock, not the
//!   replicas', decides rate cells and hourly windows.
//! - **A reservation is a lease.** A budget reservation is a member of the agent's lease set
//!   with an end; the admission that finds a lease past its end gives its tokens back, so a
//!   replica that dies mid-call holds the budget only until the lease ends.
//! - **Every key carries the agent's hash tag** (`PREFIX:{agent}:…`): a script touches one
//!   agent's keys only, so a Redis Cluster could shard them by agent.
//! - **A connection per data-plane thread**, multiplexed and reconnecting on its own
//!   (redis-rs's `ConnectionManager`), made on that thread's event loop the first time it is
//!   needed: a call's round trip never wakes another core.
//! - **Every call has a deadline** (`redis.timeout_ms`); past it, or on any error, the caller
//!   fails closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod history;
mod sessions;

pub use history::Turn;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
pub use sessions::Found;

use super::{Quarantine, StateError};
use crate::config::RedisConfig;
use crate::per_thread;

/// What one admission asks of the backend.
pub(super) struct Ask<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    /// `(tokens_per_hour, the call's tokens, the answer's tokens to reserve (None: estimate))`.
    pub budget: Option<(u64, u64, Option<u64>)>,
    pub tool_rate: u32,
    pub agent_rate: u32,
    pub lease: Duration,
}

/// What the admission script answered.
pub(super) enum Answer {
    Admitted(Option<Lease>),
    Quarantined(Quarantine),
    OverBudget(Duration),
    ToolRate(Duration),
    AgentRate(Duration),
}

/// A budget lease: its member in the agent's lease set, and its tokens.
#[derive(Debug, Clone)]
pub struct Lease {
    agent: String,
    member: String,
    tokens: u64,
}

struct Scripts {
    admit: Script,
    settle: Script,
    denial: Script,
    quarantine: Script,
    record: Script,
    unlock: Script,
    release: Script,
    session: Script,
    approval: Script,
}

pub struct RedisState {
    client: redis::Client,
    manager: ConnectionManagerConfig,
    conns: Box<[per_thread::Shard<OnceLock<ConnectionManager>>]>,
    timeout: Duration,
    prefix: String,
    server: String,
    scripts: Scripts,
    /// Settles waiting to be sent, one queue per thread.
    settles: Box<[per_thread::Shard<Mutex<Settles>>]>,
    /// False after a call failed or timed out, until one succeeds: the log says so once per
    /// change, not once per call. (Readiness pings instead: it must find Redis back with no
    /// calls flowing.)
    reachable: AtomicBool,
}

/// How long a thread's queued settles wait for an admission to carry them.
const SETTLE_DELAY: Duration = Duration::from_millis(2);

/// A thread's settles not yet sent, and whether a task is sending them.
#[derive(Default)]
struct Settles {
    items: Vec<(Lease, u64, u64)>,
    flushing: bool,
}

/// Why the backend cannot be used at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the Redis settings are not usable: {0}")]
    Settings(String),
    #[error("cannot reach Redis at {server} within {ms} ms: {reason}")]
    Unreachable { server: String, ms: u64, reason: String },
    #[error(
        "Redis at {server} refused the credentials ({reason}): check the user in `state`, and the password \
         in the environment variable {env} or the file `redis.password_file`"
    )]
    Credentials {
        server: String,
        reason: String,
        env: String,
    },
    #[error(
        "Redis at {0} does not persist writes (`appendonly no`): quarantines, approvals and tool pins would be lost with a Redis \
         restart. Turn on AOF (`appendonly yes`), or set `redis.require_persistence: false` if that loss is \
         acceptable"
    )]
    NotPersistent(String),
    #[error(
        "Redis at {server} may evict keys (maxmemory {maxmemory} bytes, maxmemory-policy {policy}): under \
         memory pressure it could drop a quarantine or a budget and let an agent do more. Set \
         `maxmemory-policy noeviction` (or no maxmemory)"
    )]
    Evicts {
        server: String,
        maxmemory: u64,
        policy: String,
    },
    #[error(
        "Redis at {0} is a Cluster node: toolgate speaks to one standalone server (or a primary with \
         replicas and failover). Point `state` at a standalone Redis"
    )]
    Cluster(String),
}

impl RedisState {
    /// Connects, checks the server (it answers, the credentials work, it persists writes if
    /// required) and loads the scripts. Errors say what to fix.
    pub async fn connect(config: &RedisConfig) -> Result<RedisState, ConnectError> {
        let info = config.connection_info().map_err(ConnectError::Settings)?;
        let client = redis::Client::open(info).map_err(|e| ConnectError::Settings(e.to_string()))?;
        let timeout = config.timeout();
        let server = config.server();
        let unreachable = |e: redis::RedisError| match e.kind() {
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                ConnectError::Credentials {
                    server: server.clone(),
                    reason: e.to_string(),
                    env: config.options.password_env.clone(),
                }
            }
            _ => ConnectError::Unreachable {
                server: server.clone(),
                ms: config.options.timeout_ms,
                reason: e.to_string(),
            },
        };
        let scripts = Scripts {
            admit: Script::new(include_str!("lua/admit.lua")),
            settle: Script::new(include_str!("lua/settle.lua")),
            denial: Script::new(include_str!("lua/denial.lua")),
            quarantine: Script::new(include_str!("lua/quarantine.lua")),
            record: Script::new(include_str!("lua/record.lua")),
            unlock: Script::new(include_str!("lua/unlock.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            session: Script::new(include_str!("lua/session.lua")),
            approval: Script::new(include_str!("lua/approval.lua")),
        };
        let check = async {
            let mut c = client.get_multiplexed_async_connection().await.map_err(unreachable)?;
            let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(unreachable)?;
            // What the server is, from INFO (which managed services that disable CONFIG keep).
            let info: String = redis::cmd("INFO")
                .arg("everything")
                .query_async(&mut c)
                .await
                .map_err(unreachable)?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                    .unwrap_or("")
                    .to_owned()
            };
            if field("cluster_enabled") == "1" {
                return Err(ConnectError::Cluster(server.clone()));
            }
            let maxmemory: u64 = field("maxmemory").parse().unwrap_or(0);
            let policy = field("maxmemory_policy");
            if maxmemory > 0 && policy != "noeviction" {
                return Err(ConnectError::Evicts {
                    server: server.clone(),
                    maxmemory,
                    policy,
                });
            }
            if config.options.require_persistence && field("aof_enabled") != "1" {
                return Err(ConnectError::NotPersistent(server.clone()));
            }
            for s in [
                &scripts.admit,
                &scripts.settle,
                &scripts.denial,
                &scripts.quarantine,
                &scripts.record,
                &scripts.unlock,
                &scripts.release,
                &scripts.session,
                &scripts.approval,
            ] {
                s.load_async(&mut c).await.map_err(unreachable)?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout * 4, check)
            .await
            .map_err(|_| ConnectError::Unreachable {
                server: server.clone(),
                ms: config.options.timeout_ms * 4,
                reason: "no answer".to_owned(),
            })??;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            // No deadline of the client's own per request: `run` puts one around each exchange
            // (retry included), and a second timer per request costs for nothing.
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(timeout);
        Ok(RedisState {
            client,
            manager,
            conns: per_thread::shards(),
            timeout,
            prefix: config.options.key_prefix.clone(),
            server,
            scripts,
            settles: per_thread::shards(),
            reachable: AtomicBool::new(true),
        })
    }

    /// This thread's connection, made on its event loop the first time.
    fn conn(&self) -> Result<ConnectionManager, StateError> {
        let slot = &self.conns[per_thread::index()].0;
        if let Some(c) = slot.get() {
            return Ok(c.clone());
        }
        let made = ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone())?;
        Ok(slot.get_or_init(|| made).clone())
    }

    /// Runs one Redis exchange under the deadline, and records whether Redis answered. An
    /// exchange on a connection found broken (Redis restarted, a failover) is tried once more
    /// on the new one the manager makes: if the first had taken effect unseen, the second can
    /// only count a call twice, which makes limits stricter, never looser.
    async fn run<T, F, Fut>(&self, mut exchange: F) -> Result<T, StateError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            match exchange(self.conn()?).await {
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
                    Ok(exchange(self.conn()?).await?)
                }
                other => Ok(other?),
            }
        };
        let result = match tokio::time::timeout(self.timeout, attempts).await {
            Ok(r) => r,
            Err(_) => Err(StateError::Timeout(self.timeout.as_millis() as u64)),
        };
        if self.reachable.load(Ordering::Relaxed) != result.is_ok() {
            self.reachable.store(result.is_ok(), Ordering::Relaxed);
            match &result {
                Ok(_) => tracing::info!(server = %self.server, "the state backend answers again"),
                Err(e) => tracing::error!(server = %self.server, "the state backend failed: {e}"),
            }
        }
        if result.is_err() {
            metrics::counter!("toolgate_state_errors_total").increment(1);
        }
        result
    }

    /// Runs one script invocation under the deadline.
    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, StateError> {
        self.run(|mut c| async move { inv.invoke_async(&mut c).await }).await
    }

    fn key(&self, agent: &str, rest: &str) -> String {
        format!("{}:{{{agent}}}:{rest}", self.prefix)
    }

    /// Whether Redis answers a `PING` now (readiness asks on every probe, so it recovers with
    /// no traffic: a load balancer sends none to a replica it finds not ready).
    pub async fn ping(&self) -> bool {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .is_ok()
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub(super) async fn admit(&self, ask: Ask<'_>) -> Result<Answer, StateError> {
        let lease_id = uuid::Uuid::new_v4().simple().to_string();
        let (limit, tokens, answer) = ask.budget.unwrap_or((0, 0, None));
        let mut admit = redis::cmd("EVALSHA");
        admit
            .arg(self.scripts.admit.get_hash())
            .arg(5)
            .arg(self.key(ask.agent, "quarantine"))
            .arg(self.key(ask.agent, "budget"))
            .arg(self.key(ask.agent, "leases"))
            .arg(self.key(ask.agent, &format!("rate:tool:{}", ask.tool)))
            .arg(self.key(ask.agent, "rate"))
            .arg(limit)
            .arg(tokens)
            .arg(answer.map_or(-1, |a| a as i64))
            .arg(&lease_id)
            .arg(ask.lease.as_millis() as u64)
            .arg(ask.tool_rate)
            .arg(ask.agent_rate);
        // The settles this thread has queued ride along, ahead of the admission: under load a
        // call's settling then costs no round trip of its own.
        let shard = per_thread::index();
        let settles = std::mem::take(&mut self.settles[shard].0.lock().unwrap_or_else(|p| p.into_inner()).items);
        let mut pipe = redis::pipe();
        self.push_settles(&mut pipe, &settles);
        pipe.add_command(admit);
        let send = || {
            self.run(|mut c| {
                let pipe = &pipe;
                async move { pipe.query_async::<(Vec<Value>,)>(&mut c).await }
            })
        };
        let reply = match send().await {
            Err(StateError::Redis(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis forgot the scripts (a restart): loaded again, and sent again.
                self.reload_scripts().await?;
                send().await
            }
            other => other,
        };
        let reply = match reply {
            Ok((reply,)) => reply,
            Err(e) => {
                if !settles.is_empty() {
                    tracing::error!(
                        settles = settles.len(),
                        "budget reservations could not be settled (their leases will end on their own): {e}"
                    );
                }
                return Err(e);
            }
        };
        let int = |i: usize| match reply.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(StateError::Corrupt(format!("the admission script answered {other:?}"))),
        };
        let wait = || int(1).map(|ms| Duration::from_millis(ms.max(0) as u64));
        Ok(match int(0)? {
            0 => Answer::Admitted(match ask.budget {
                Some(_) => {
                    let tokens = int(1)?.max(0) as u64;
                    Some(Lease {
                        agent: ask.agent.to_owned(),
                        member: format!("{lease_id}|{tokens}"),
                        tokens,
                    })
                }
                None => None,
            }),
            1 => match reply.get(1) {
                Some(Value::BulkString(text)) => Answer::Quarantined(parse_quarantine(text)?),
                other => return Err(StateError::Corrupt(format!("a quarantine read as {other:?}"))),
            },
            2 => Answer::OverBudget(wait()?),
            3 => Answer::ToolRate(wait()?),
            4 => Answer::AgentRate(wait()?),
            other => return Err(StateError::Corrupt(format!("the admission script answered {other}"))),
        })
    }

    /// Settles a lease after the call's answer went out: queued on this thread and sent with
    /// the others queued meanwhile, one pipelined round trip for the lot (under load, a call's
    /// settling costs a fraction of a round trip, and never delays its answer). Until it is
    /// sent, the lease still holds its reservation, which errs strict; if it cannot be sent,
    /// the lease ends on its own.
    pub(super) fn settle_later(self: &Arc<Self>, lease: Lease, input: u64, output: u64) {
        let shard = per_thread::index();
        let lead = {
            let mut q = self.settles[shard].0.lock().unwrap_or_else(|p| p.into_inner());
            q.items.push((lease, input, output));
            !std::mem::replace(&mut q.flushing, true)
        };
        if lead {
            let me = self.clone();
            tokio::spawn(async move {
                // Under load the next admission on this thread carries the queue long before
                // this wakes; a quiet thread sends it itself, a moment later.
                tokio::time::sleep(SETTLE_DELAY).await;
                me.flush_settles(shard).await;
            });
        }
    }

    async fn flush_settles(&self, shard: usize) {
        loop {
            let items = {
                let mut q = self.settles[shard].0.lock().unwrap_or_else(|p| p.into_inner());
                if q.items.is_empty() {
                    q.flushing = false;
                    return;
                }
                std::mem::take(&mut q.items)
            };
            let mut pipe = redis::pipe();
            self.push_settles(&mut pipe, &items);
            let send = || {
                self.run(|mut c| {
                    let pipe = &pipe;
                    async move { pipe.query_async::<()>(&mut c).await }
                })
            };
            let mut sent = send().await;
            if let Err(StateError::Redis(e)) = &sent
                && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            {
                // Redis forgot the script (a restart): loaded again, and the batch sent again.
                if self.reload_scripts().await.is_ok() {
                    sent = send().await;
                }
            }
            if let Err(e) = sent {
                tracing::error!(
                    settles = items.len(),
                    "budget reservations could not be settled (their leases will end on their own): {e}"
                );
            }
        }
    }

    /// Adds one `EVALSHA settle` per queued settle to `pipe`, their replies ignored.
    fn push_settles(&self, pipe: &mut redis::Pipeline, settles: &[(Lease, u64, u64)]) {
        for (lease, input, output) in settles {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.settle.get_hash())
                .arg(2)
                .arg(self.key(&lease.agent, "budget"))
                .arg(self.key(&lease.agent, "leases"))
                .arg(&lease.member)
                .arg(lease.tokens)
                .arg(input)
                .arg(output)
                .ignore();
        }
    }

    /// Loads the admission and settle scripts again (Redis restarted and forgot them).
    async fn reload_scripts(&self) -> Result<(), StateError> {
        self.run(|mut c| async move {
            self.scripts.admit.load_async(&mut c).await?;
            self.scripts.settle.load_async(&mut c).await
        })
        .await
        .map(drop)
    }

    /// Settles a lease (`input`, `output`: what flowed) or gives it back (both 0).
    pub(super) async fn settle(&self, lease: &Lease, input: u64, output: u64) -> Result<(), StateError> {
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.key(self.key(&lease.agent, "budget"))
            .key(self.key(&lease.agent, "leases"))
            .arg(&lease.member)
            .arg(lease.tokens)
            .arg(input)
            .arg(output);
        self.invoke::<i64>(&inv).await.map(drop)
    }

    /// `(used, reserved)` in the current hour.
    pub(super) async fn budget(&self, agent: &str) -> Result<(u64, u64), StateError> {
        let key = self.key(agent, "budget");
        let window = super::unix_now() / super::HOUR;
        let (w, used, reserved): (Option<u64>, Option<u64>, Option<u64>) = self
            .run(|mut c| {
                let key = &key;
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(&["window", "used", "reserved"])
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(match w == Some(window) {
            true => (used.unwrap_or(0), reserved.unwrap_or(0)),
            false => (0, reserved.unwrap_or(0)),
        })
    }

    pub(super) async fn record_denial(
        &self,
        agent: &str,
        kind: &str,
        window: Duration,
        threshold: usize,
    ) -> Result<Option<usize>, StateError> {
        let mut inv = self.scripts.denial.prepare_invoke();
        inv.key(self.key(agent, &format!("denials:{kind}")))
            .arg(window.as_millis() as u64)
            .arg(threshold)
            .arg(uuid::Uuid::new_v4().simple().to_string());
        let n: usize = self.invoke(&inv).await?;
        Ok((n > 0).then_some(n))
    }

    pub(super) async fn denials(
        &self,
        agent: &str,
        kinds: &[&'static str],
        window: Duration,
    ) -> Result<HashMap<&'static str, usize>, StateError> {
        let since = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(window))
        .as_millis() as u64;
        let mut pipe = redis::pipe();
        for kind in kinds {
            pipe.cmd("ZCOUNT")
                .arg(self.key(agent, &format!("denials:{kind}")))
                .arg(since)
                .arg("+inf");
        }
        let counts: Vec<usize> = self
            .run(|mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(kinds
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (*k, n))
            .collect())
    }

    pub(super) async fn quarantine(&self, agent: &str, q: &Quarantine) -> Result<bool, StateError> {
        let mut inv = self.scripts.quarantine.prepare_invoke();
        let text = serde_json::to_string(q).map_err(|e| StateError::Corrupt(e.to_string()))?;
        inv.key(self.key(agent, "quarantine"))
            .arg(text)
            .arg(q.until.map_or(0, |u| u.saturating_mul(1000)));
        let n: i64 = self.invoke(&inv).await?;
        Ok(n == 1)
    }

    pub(super) async fn quarantined(&self, agent: &str) -> Result<Option<Quarantine>, StateError> {
        let key = self.key(agent, "quarantine");
        let text: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(key).clone()).await?;
        text.map(|t| parse_quarantine(&t)).transpose()
    }

    /// Releases the agent from quarantine `q` (as read and recorded by the caller), and only
    /// from that one: a quarantine another replica put in force since is kept. True if `q`
    /// was released.
    pub(super) async fn release(&self, agent: &str, q: &Quarantine) -> Result<bool, StateError> {
        let mut inv = self.scripts.release.prepare_invoke();
        let text = serde_json::to_string(q).map_err(|e| StateError::Corrupt(e.to_string()))?;
        inv.key(self.key(agent, "quarantine")).arg(text);
        let n: i64 = self.invoke(&inv).await?;
        Ok(n == 1)
    }
}

/// One compare-and-set of an approval (see `lua/approval.lua`).
pub struct ApprovalWrite<'a> {
    pub id: &'a str,
    pub agent: &'a str,
    /// The approval as read (`None`: it must not exist yet), and as to be written.
    pub expected: Option<&'a [u8]>,
    pub new: &'a [u8],
    pub forget_at_ms: u64,
    pub call_key: &'a str,
    /// `Some(previous)`: a new pending request, its call key still pointing at `previous`
    /// (`""`: none); `None` with `settled`: no longer pending.
    pub pending: Option<&'a str>,
    pub settled: bool,
    pub requested_at: u64,
}

impl RedisState {
    /// Every key starts with this (`redis.key_prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One command under the deadline (for stores kept in Redis, like approvals).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StateError> {
        self.run(|mut c| {
            let cmd = &cmd;
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    /// Writes an approval if it is still as read: false if another replica changed it first.
    pub async fn write_approval(&self, w: ApprovalWrite<'_>) -> Result<bool, StateError> {
        let mut inv = self.scripts.approval.prepare_invoke();
        let op = match (w.pending, w.settled) {
            (Some(_), _) => "set",
            (None, true) => "del",
            (None, false) => "",
        };
        inv.key(format!("{}:approval:{{{}}}", self.prefix, w.id))
            .key(self.key(w.agent, "approvals_pending"))
            .key(format!("{}:approvals", self.prefix))
            .arg(w.expected.unwrap_or(b""))
            .arg(w.new)
            .arg(w.forget_at_ms)
            .arg(w.call_key)
            .arg(op)
            .arg(w.id)
            .arg(w.pending.unwrap_or(""))
            .arg(w.requested_at);
        let n: i64 = self.invoke(&inv).await?;
        Ok(n == 1)
    }

    /// The key of approval `id`, and of `agent`'s pending requests.
    pub fn approval_key(&self, id: &str) -> String {
        format!("{}:approval:{{{id}}}", self.prefix)
    }

    pub fn pending_key(&self, agent: &str) -> String {
        self.key(agent, "approvals_pending")
    }

    /// Records this replica as alive (`replicas`: one hash for the gateway, a field per
    /// replica; a replica silent for [`super::REPLICA_STALE_SECONDS`] is dropped by the next
    /// listing).
    pub(super) async fn heartbeat(&self, replica: &super::Replica) -> Result<(), StateError> {
        let key = format!("{}:replicas", self.prefix);
        let value = serde_json::to_string(replica).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.run(|mut c| {
            let (key, value) = (&key, &value);
            async move {
                redis::pipe()
                    .cmd("HSET")
                    .arg(key)
                    .arg(&replica.id)
                    .arg(value)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(key)
                    .arg(3_600_000)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await
    }

    /// The replicas heard from lately.
    pub(super) async fn replicas(&self) -> Result<Vec<super::Replica>, StateError> {
        let key = format!("{}:replicas", self.prefix);
        let all: HashMap<String, String> = self
            .run(|mut c| {
                let key = &key;
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await?;
        let now = super::unix_now();
        let (alive, stale): (Vec<_>, Vec<_>) = all
            .into_iter()
            .map(|(id, v)| (id, serde_json::from_str::<super::Replica>(&v).ok()))
            .partition(|(_, r)| {
                r.as_ref()
                    .is_some_and(|r| r.last_seen + super::REPLICA_STALE_SECONDS >= now)
            });
        if !stale.is_empty() {
            let ids: Vec<String> = stale.into_iter().map(|(id, _)| id).collect();
            let _ = self
                .run(|mut c| {
                    let (key, ids) = (&key, &ids);
                    async move { redis::cmd("HDEL").arg(key).arg(ids).query_async::<i64>(&mut c).await }
                })
                .await;
        }
        Ok(alive.into_iter().filter_map(|(_, r)| r).collect())
    }
}

fn parse_quarantine(text: &[u8]) -> Result<Quarantine, StateError> {
    serde_json::from_slice(text).map_err(|e| StateError::Corrupt(format!("a quarantine that does not parse: {e}")))
}
