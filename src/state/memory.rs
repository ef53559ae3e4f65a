//! `state: memory`: state in this process. The default, and what one replica needs.
//!
//! Every operation that admits a call is atomic: a rate-limit cell is taken with a
//! compare-and-swap (governor's GCRA), a budget reservation under one lock that checks and
//! reserves together, so concurrent calls can never together pass a limit that admits fewer.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::{BudgetStatus, HOUR, Quarantine, unix_now};
use crate::FastMap;
use crate::policy::history::{History, PastCall};
use crate::read_mostly::ReadMostly;

/// A held token reservation; settle it once the call is over.
#[derive(Debug, Clone)]
pub struct Reservation {
    budget: Arc<Mutex<Budget>>,
    window: u64,
    tokens: u64,
}

#[derive(Default, Debug)]
pub struct Budget {
    window: u64,
    used: u64,
    reserved: u64,
    /// What this agent's answers have brought back lately (a moving average, in tokens):
    /// reserved with each call's arguments, so calls in flight together count their answers
    /// too (not only the first call's answer can take the budget past its limit).
    expected_output: u64,
}

impl Budget {
    /// A new hour's window starts empty (the expected answer size carries over).
    fn start_window(&mut self, window: u64) {
        if self.window != window {
            self.window = window;
            self.used = 0;
            self.reserved = 0;
        }
    }
}

/// Process-local state (`state: memory`).
///
/// The maps every call reads are copy-on-write and hold `Arc`s, so concurrent calls contend
/// only on their own agent's entry (a short `Mutex` for a budget, a lock-free compare-and-swap
/// for a rate limiter); the rest are behind locks that calls take only when there is something
/// to record (a denial, a quarantine, history).
#[derive(Default)]
pub struct MemoryState {
    /// Read on every call, added to once per key: copy-on-write (`read_mostly`), so reading
    /// writes nothing both data-plane cores share.
    limiters: ReadMostly<FastMap<String, (u32, Arc<Limiter>)>>,
    budgets: ReadMostly<FastMap<String, Arc<Mutex<Budget>>>>,
    denials: Mutex<HashMap<(String, &'static str), VecDeque<Instant>>>,
    quarantines: RwLock<FastMap<String, Quarantine>>,
    /// Whether `quarantines` has any entry: every call asks, and almost always none is. Set
    /// under its write lock, so the common answer needs no lock (whose reader count both cores
    /// would write on every call).
    any_quarantined: AtomicBool,
    /// Recorded calls per agent, oldest first, for session-aware rules.
    history: RwLock<FastMap<String, Arc<Mutex<VecDeque<PastCall>>>>>,
    /// Per agent: whose turn it is to decide a call that reads or writes history.
    history_turns: RwLock<FastMap<String, Arc<tokio::sync::Mutex<()>>>>,
    clock: DefaultClock,
}

/// A rate limiter that can say how much of its burst is left (for a quota changed by a reload).
type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// How many calls of `quota` the limiter counts as made (it is being replaced: asking takes
/// one more).
fn used(limiter: &Limiter, quota: u32) -> u32 {
    match limiter.check() {
        Ok(snapshot) => quota.saturating_sub(snapshot.remaining_burst_capacity() + 1),
        Err(_) => quota,
    }
}

/// At most this many recorded calls per agent; the oldest go first. With a 1 h window that is
/// over one call a second, sustained, to a tool some rule looks back at.
pub const MAX_HISTORY_PER_AGENT: usize = 4096;

impl MemoryState {
    /// Takes one call from `key`'s allowance. A new key starts a full one; a quota changed by
    /// a reload starts from the calls the old one had let through (a lowered limit does not
    /// hand an agent a fresh burst).
    fn take(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Duration> {
        let n = per_minute.get();
        let checked = self.limiters.find_or_add(
            |map| map.get(key).filter(|(quota, _)| *quota == n).map(|(_, l)| l.check()),
            |map| {
                let limiter =
                    RateLimiter::direct(Quota::per_minute(per_minute)).with_middleware::<StateInformationMiddleware>();
                if let Some(used) = map
                    .get(key)
                    .and_then(|(quota, old)| NonZeroU32::new(used(old, *quota).min(n)))
                {
                    let _ = limiter.check_n(used);
                }
                map.insert(key.to_owned(), (n, Arc::new(limiter)));
            },
        );
        checked
            .map(|_| ())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn budget_cell(&self, agent: &str) -> Arc<Mutex<Budget>> {
        self.budgets.find_or_add(
            |map| map.get(agent).cloned(),
            |map| {
                map.insert(agent.to_owned(), Arc::default());
            },
        )
    }

    pub(super) fn record_call(&self, agent: &str, call: PastCall, retention: Duration) {
        let existing = read(&self.history).get(agent).cloned();
        let list = existing.unwrap_or_else(|| write(&self.history).entry(agent.to_owned()).or_default().clone());
        let mut list = list.lock().expect("history lock");
        let horizon = call.at_ms.saturating_sub(retention.as_millis() as u64);
        while list.front().is_some_and(|c| c.at_ms < horizon) || list.len() >= MAX_HISTORY_PER_AGENT {
            list.pop_front();
        }
        list.push_back(call);
    }

    pub(super) fn forget_call(&self, agent: &str, call: &PastCall) {
        let Some(list) = read(&self.history).get(agent).cloned() else {
            return;
        };
        let mut list = list.lock().expect("history lock");
        if let Some(i) = list
            .iter()
            .rposition(|c| c.at_ms == call.at_ms && c.tool == call.tool && c.session == call.session)
        {
            list.remove(i);
        }
    }

    pub(super) async fn history_turn(&self, agent: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let existing = read(&self.history_turns).get(agent).cloned();
        let turn = existing.unwrap_or_else(|| write(&self.history_turns).entry(agent.to_owned()).or_default().clone());
        turn.lock_owned().await
    }

    /// Takes one call from the `key`'s per-minute allowance, or says how long to wait.
    pub fn take_rate(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Duration> {
        self.take(key, per_minute)
    }

    /// Reserves `tokens` of the agent's hourly budget, and its answer (`answer`: the most it can
    /// be, strict; else the state's estimate), if they fit; or says how long until the window
    /// resets. Checking and reserving happen under one lock. `now` is the call's time (Unix
    /// seconds), read once for all of its checks.
    pub fn reserve_tokens(
        &self,
        agent: &str,
        limit: u64,
        tokens: u64,
        answer: Option<u64>,
        now: u64,
    ) -> Result<Reservation, Duration> {
        let window = now / HOUR;
        let budget = self.budget_cell(agent);
        let mut b = lock(&budget);
        b.start_window(window);
        // The expected answer counts while other calls are in flight (that is when answers
        // add up unseen); a call alone needs only its arguments to fit, so a large estimate
        // can never lock the agent out.
        let tokens = match answer {
            Some(most) => tokens + most,
            None if b.reserved == 0 => tokens,
            None => tokens + b.expected_output,
        };
        if b.used + b.reserved + tokens > limit {
            return Err(Duration::from_secs((window + 1) * HOUR - now));
        }
        b.reserved += tokens;
        drop(b);
        Ok(Reservation { budget, window, tokens })
    }

    /// Settles a reservation: the call's arguments and answer become `used` tokens in the
    /// window the answer came in (a call that straddles the hour is charged to the new one,
    /// never dropped), and the answer updates the expected size of the next ones. A response
    /// larger than expected may take the budget past its limit (the call already happened);
    /// the next call then waits for the window to reset.
    pub fn settle_tokens(&self, r: Reservation, input: u64, output: u64) {
        let mut b = lock(&r.budget);
        if b.window == r.window {
            b.reserved = b.reserved.saturating_sub(r.tokens);
        }
        b.start_window(unix_now() / HOUR);
        b.used += input + output;
        // Only answers teach the estimate: a call that failed before answering says nothing
        // about the size of the next answer.
        if output > 0 {
            b.expected_output = (b.expected_output * 3 + output).div_ceil(4);
        }
    }

    /// Gives a reservation back unused (the call was refused after reserving).
    pub fn release_tokens(&self, r: Reservation) {
        let mut b = lock(&r.budget);
        if b.window == r.window {
            b.reserved = b.reserved.saturating_sub(r.tokens);
        }
    }

    pub fn budget(&self, agent: &str, limit: u64) -> BudgetStatus {
        let now = unix_now();
        let window = now / HOUR;
        let b = self.budget_cell(agent);
        let b = lock(&b);
        let (used, reserved) = match b.window == window {
            true => (b.used, b.reserved),
            false => (0, 0),
        };
        BudgetStatus::new(limit, used, reserved, window)
    }

    /// Records a denial of `kind` for `agent`. If that makes `threshold` or more in the last
    /// `window`, returns how many and starts the count again, under the same lock: one caller
    /// among concurrent ones sees the crossing, and the next crossing needs `threshold` new
    /// denials (so an agent released from quarantine, or one not quarantined, is caught again
    /// by the next run of denials, not by none). Memory is bounded: at most `threshold`
    /// timestamps are kept per agent and kind.
    pub fn record_denial(&self, agent: &str, kind: &'static str, window: Duration, threshold: usize) -> Option<usize> {
        let now = Instant::now();
        let mut denials = lock(&self.denials);
        let q = denials.entry((agent.to_owned(), kind)).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() >= threshold.max(1) {
            let count = q.len();
            q.clear();
            return Some(count);
        }
        None
    }

    /// Recent denials per kind, for `GET /admin/agents/{id}`.
    pub fn denials(&self, agent: &str, window: Duration) -> HashMap<&'static str, usize> {
        let now = Instant::now();
        lock(&self.denials)
            .iter()
            .filter(|((a, _), _)| a == agent)
            .map(|((_, kind), q)| (*kind, q.iter().filter(|t| now.duration_since(**t) <= window).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Quarantines an agent. Returns false if it already was.
    pub fn quarantine(&self, agent: &str, duration: Option<Duration>, by: &str, reason: &str) -> bool {
        let q = Quarantine::new(duration, by, reason);
        let mut map = write(&self.quarantines);
        if map
            .get(agent)
            .is_some_and(|existing| existing.until.is_none_or(|u| u > q.since))
        {
            return false;
        }
        map.insert(agent.to_owned(), q);
        self.any_quarantined.store(true, Ordering::Release);
        true
    }

    /// Releases an agent. Returns the quarantine it was under, if any.
    pub fn release(&self, agent: &str) -> Option<Quarantine> {
        let mut map = write(&self.quarantines);
        let q = map.remove(agent);
        self.any_quarantined.store(!map.is_empty(), Ordering::Release);
        q
    }

    /// Releases the agent from quarantine `q` only (see [`super::State::release`]).
    pub fn release_if(&self, agent: &str, q: &Quarantine) -> bool {
        let mut map = write(&self.quarantines);
        if map.get(agent) != Some(q) {
            return false;
        }
        map.remove(agent);
        self.any_quarantined.store(!map.is_empty(), Ordering::Release);
        true
    }

    /// The agent's quarantine, if one is in force (an expired one is dropped).
    pub fn quarantined(&self, agent: &str) -> Option<Quarantine> {
        if !self.any_quarantined.load(Ordering::Acquire) {
            return None;
        }
        let found = read(&self.quarantines).get(agent).cloned();
        match found {
            Some(q) if q.until.is_some_and(|u| u <= unix_now()) => {
                // Expired: dropped, unless it was renewed meanwhile.
                let now = unix_now();
                let mut map = write(&self.quarantines);
                if map.get(agent).is_some_and(|q| q.until.is_some_and(|u| u <= now)) {
                    map.remove(agent);
                }
                self.any_quarantined.store(!map.is_empty(), Ordering::Release);
                None
            }
            other => other,
        }
    }
}

impl History for MemoryState {
    fn visit(&self, agent: &str, since_ms: u64, visit: &mut dyn FnMut(&PastCall)) {
        let Some(list) = read(&self.history).get(agent).cloned() else {
            return;
        };
        let list = list.lock().expect("history lock");
        // Newest last: walk back until the window starts.
        for call in list.iter().rev().take_while(|c| c.at_ms >= since_ms) {
            visit(call);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_admit_exactly_the_quota_then_say_how_long_to_wait() {
        let s = MemoryState::default();
        let q = NonZeroU32::new(3).unwrap();
        assert!((0..3).all(|_| s.take_rate("a", q).is_ok()));
        let wait = s.take_rate("a", q).unwrap_err();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(s.take_rate("b", q).is_ok(), "keys are independent");
        // A reloaded policy with another quota carries over the calls made: 3 of 5 leaves 2.
        let q5 = NonZeroU32::new(5).unwrap();
        assert!((0..2).all(|_| s.take_rate("a", q5).is_ok()));
        assert!(s.take_rate("a", q5).is_err());
        assert!(s.take_rate("b", q).is_ok() && s.take_rate("b", q).is_ok() && s.take_rate("b", q).is_err());
    }

    #[test]
    fn budgets_reserve_settle_and_release() {
        let s = MemoryState::default();
        let r1 = s.reserve_tokens("a", 100, 60, None, unix_now()).unwrap();
        assert!(
            s.reserve_tokens("a", 100, 50, None, unix_now()).is_err(),
            "reserved tokens count"
        );
        s.settle_tokens(r1, 60, 0);
        assert_eq!(s.budget("a", 100).remaining, 40);
        let r2 = s.reserve_tokens("a", 100, 30, None, unix_now()).unwrap();
        s.release_tokens(r2);
        assert_eq!(s.budget("a", 100).used, 60);
        let wait = s.reserve_tokens("a", 100, 41, None, unix_now()).unwrap_err();
        assert!(wait <= Duration::from_secs(HOUR));
    }

    #[test]
    fn calls_in_flight_reserve_the_answers_earlier_calls_brought_back() {
        let s = MemoryState::default();
        // One call with a 10-token request and a 400-token answer teaches the estimate.
        let r = s.reserve_tokens("a", 10_000, 10, None, unix_now()).unwrap();
        s.settle_tokens(r, 10, 400);
        let expected = s.budget("a", 10_000).remaining;
        assert_eq!(expected, 10_000 - 410);
        // Now calls in flight together each hold their arguments and an expected answer: far
        // fewer fit than if only their 10-token arguments counted (959 of them).
        let mut held = Vec::new();
        while let Ok(r) = s.reserve_tokens("a", 10_000, 10, None, unix_now()) {
            held.push(r);
        }
        assert!(held.len() < 100, "{} calls in flight", held.len());
        for r in held {
            s.release_tokens(r);
        }
        assert_eq!(s.budget("a", 10_000).reserved, 0);
    }

    #[test]
    fn a_threshold_is_crossed_once_per_run_of_denials() {
        let s = MemoryState::default();
        let deny = || s.record_denial("a", "tool_not_allowed", Duration::from_secs(60), 3);
        assert_eq!((deny(), deny()), (None, None));
        assert_eq!(s.denials("a", Duration::from_secs(60))["tool_not_allowed"], 2);
        assert_eq!(deny(), Some(3), "the third crosses");
        // The count starts again: the next crossing takes three new denials, not one.
        assert_eq!((deny(), deny(), deny()), (None, None, Some(3)));
        assert_eq!(
            s.record_denial("a", "other", Duration::from_secs(60), 3),
            None,
            "kinds apart"
        );
    }

    #[test]
    fn quarantines_hold_until_released_or_expired() {
        let s = MemoryState::default();
        assert!(s.quarantine("a", None, "alice", "manual"));
        assert!(!s.quarantine("a", None, "bob", "again"));
        assert_eq!(s.quarantined("a").unwrap().by, "alice");
        assert!(s.release("a").is_some());
        assert!(s.quarantined("a").is_none());
        assert!(s.quarantine("b", Some(Duration::ZERO), "anomaly", "x"));
        assert!(s.quarantined("b").is_none(), "a zero-length quarantine has ended");
        // The longest duration means a long time, not a time in the past.
        assert!(s.quarantine("f", Some(Duration::from_secs(u64::MAX)), "alice", "forever"));
        assert!(s.quarantined("f").is_some());
        // Releasing or expiring one agent leaves the others' quarantines in force.
        assert!(s.quarantine("c", None, "alice", "manual"));
        assert!(s.quarantine("d", None, "alice", "manual"));
        assert!(s.quarantine("e", Some(Duration::ZERO), "anomaly", "x"));
        assert!(s.quarantined("e").is_none());
        assert!(s.release("c").is_some());
        assert!(s.quarantined("c").is_none());
        assert_eq!(s.quarantined("d").unwrap().by, "alice");
        assert!(s.release("d").is_some());
        assert!(
            s.quarantine("c", None, "bob", "again"),
            "quarantined again after release"
        );
        assert_eq!(s.quarantined("c").unwrap().by, "bob");
    }

    #[test]
    fn a_release_ends_only_the_quarantine_it_names() {
        let s = MemoryState::default();
        assert!(s.quarantine("a", None, "anomaly", "first"));
        let first = s.quarantined("a").unwrap();
        assert!(s.release_if("a", &first));
        assert!(s.quarantine("a", None, "bob", "second"));
        assert!(!s.release_if("a", &first), "a newer quarantine is not the one released");
        assert_eq!(s.quarantined("a").unwrap().by, "bob");
    }
}
