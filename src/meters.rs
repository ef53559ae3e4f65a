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
use crate::read_mostly::ReadMostly;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram};

/// One cache: label value → handle.
type Cache<H> = ReadMostly<FastMap<Box<str>, Arc<H>>>;

impl<H> Cache<H> {
    /// Runs `f` on the handle for `label`, made first if need be.
    fn with<R>(&self, label: &str, make: impl FnOnce() -> H, f: impl FnOnce(&H) -> R) -> R {
        let mut f = Some(f);
        self.find_or_add(
            |map| map.get(label).map(|h| f.take().expect("found once")(h)),
            |map| {
                map.insert(label.into(), Arc::new(make()));
            },
        )
    }
}

/// `toolgate_calls_total` handles of one agent and tool: by (decision, code).
type Outcomes = ReadMostly<Vec<(&'static str, &'static str, Counter)>>;

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
            calls: Cache::default(),
            upstream_duration: Cache::default(),
            budget_remaining: Cache::default(),
            decision_duration: std::sync::OnceLock::new(),
        }
    }
}

impl Meters {
    /// Counts one call: `toolgate_calls_total{agent, tool, decision, code}`.
    pub fn call(&self, agent: &str, tool: &str, decision: &'static str, code: &'static str) {
        self.calls.with(agent, Cache::default, |tools| {
            tools.with(tool, Outcomes::default, |outcomes| {
                outcomes.find_or_add(
                    |list| {
                        list.iter()
                            .find(|(d, c, _)| *d == decision && *c == code)
                            .map(|(_, _, counter)| counter.increment(1))
                    },
                    |list| {
                        let counter = metrics::counter!("toolgate_calls_total",
                            "agent" => agent.to_owned(), "tool" => tool.to_owned(), "decision" => decision, "code" => code);
                        list.push((decision, code, counter));
                    },
                )
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
