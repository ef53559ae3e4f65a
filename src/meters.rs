//! Metric handles for the per-call metrics, cached by their label values.
//!
//! The `metrics` macros build a key with owned label strings, hash it and look it up in the
//! recorder's registry on every call: several allocations and a few thousand instructions per
//! call, for metrics that every call updates. The label values here come from the policy (agent
//! ids, tool names, decisions and codes), so the caches stay as small as the policy; a tool name
//! the policy does not know is recorded as `(unknown)`, never as what the caller sent.
//!
//! A handle is made on first use, after the server has installed the Prometheus recorder.

use crate::FastMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, Histogram};

/// One cache: label value → handle. Read on every call by both workers, written once per new
/// label: a copy-on-write map behind `ArcSwap`, whose reads write nothing shared (a `RwLock`'s
/// read lock is an atomic write to a line both workers then pass back and forth).
struct Cache<H> {
    map: ArcSwap<FastMap<Box<str>, Arc<H>>>,
    /// Serialises the rare writers, so none loses another's insert.
    write: Mutex<()>,
}

impl<H> Cache<H> {
    fn new() -> Self {
        Self {
            map: ArcSwap::from_pointee(FastMap::default()),
            write: Mutex::new(()),
        }
    }

    /// Runs `f` on the handle for `label`, made first if need be.
    fn with<R>(&self, label: &str, make: impl FnOnce() -> H, f: impl FnOnce(&H) -> R) -> R {
        if let Some(h) = self.map.load().get(label) {
            return f(h);
        }
        let _writing = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.map.load_full();
        if let Some(h) = current.get(label) {
            return f(h);
        }
        let handle = Arc::new(make());
        let mut next = (*current).clone();
        next.insert(label.into(), handle.clone());
        self.map.store(Arc::new(next));
        f(&handle)
    }
}

/// `toolgate_calls_total` handles of one agent and tool: by (decision, code), copy-on-write as
/// [`Cache`] is.
#[derive(Default)]
struct Outcomes {
    list: ArcSwap<Vec<(&'static str, &'static str, Counter)>>,
    write: Mutex<()>,
}

/// The handles of the metrics every call updates.
pub struct Meters {
    /// agent → tool → (decision, code) → `toolgate_calls_total`.
    calls: Cache<Cache<Outcomes>>,
    upstream_duration: Cache<Histogram>,
    budget_remaining: Cache<Gauge>,
    decision_duration: std::sync::OnceLock<Histogram>,
}

impl Default for Meters {
    fn default() -> Self {
        Self {
            calls: Cache::new(),
            upstream_duration: Cache::new(),
            budget_remaining: Cache::new(),
            decision_duration: std::sync::OnceLock::new(),
        }
    }
}

impl Meters {
    /// Counts one call: `toolgate_calls_total{agent, tool, decision, code}`.
    pub fn call(&self, agent: &str, tool: &str, decision: &'static str, code: &'static str) {
        let find = |list: &[(&str, &str, Counter)]| {
            list.iter()
                .find(|(d, c, _)| *d == decision && *c == code)
                .map(|(_, _, counter)| counter.increment(1))
        };
        self.calls.with(agent, Cache::new, |tools| {
            tools.with(tool, Outcomes::default, |outcomes| {
                if find(&outcomes.list.load()).is_some() {
                    return;
                }
                let _writing = outcomes.write.lock().unwrap_or_else(|p| p.into_inner());
                let current = outcomes.list.load_full();
                if find(&current).is_some() {
                    return;
                }
                let counter = metrics::counter!("toolgate_calls_total",
                    "agent" => agent.to_owned(), "tool" => tool.to_owned(), "decision" => decision, "code" => code);
                counter.increment(1);
                let mut next = (*current).clone();
                next.push((decision, code, counter));
                outcomes.list.store(Arc::new(next));
            })
        });
    }

    /// `toolgate_decision_duration_seconds`.
    pub fn decision_duration(&self, seconds: f64) {
        self.decision_duration
            .get_or_init(|| metrics::histogram!("toolgate_decision_duration_seconds"))
            .record(seconds);
    }

    /// `toolgate_upstream_duration_seconds{tool}`.
    pub fn upstream_duration(&self, tool: &str, seconds: f64) {
        self.upstream_duration.with(
            tool,
            || metrics::histogram!("toolgate_upstream_duration_seconds", "tool" => tool.to_owned()),
            |h| h.record(seconds),
        );
    }

    /// `toolgate_budget_remaining_tokens{agent}`.
    pub fn budget_remaining(&self, agent: &str, tokens: f64) {
        self.budget_remaining.with(
            agent,
            || metrics::gauge!("toolgate_budget_remaining_tokens", "agent" => agent.to_owned()),
            |g| g.set(tokens),
        );
    }
}
