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

/// A value read on every call by both workers and changed rarely (a new label): copy-on-write
/// behind `ArcSwap`, whose reads write nothing shared (a `RwLock`'s read lock is an atomic
/// write to a line both workers then pass back and forth).
struct Shared<T> {
    current: ArcSwap<T>,
    /// Serialises the rare writers, so none loses another's change.
    write: Mutex<()>,
}

impl<T: Clone + Default> Default for Shared<T> {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(T::default()),
            write: Mutex::new(()),
        }
    }
}

impl<T: Clone> Shared<T> {
    /// `find` in the current value; if it finds nothing, `add` to a copy, publish the copy and
    /// `find` in it (it must find then). `find` returns `Some` at most once.
    fn find_or_add<R>(&self, mut find: impl FnMut(&T) -> Option<R>, add: impl FnOnce(&mut T)) -> R {
        if let Some(r) = find(&self.current.load()) {
            return r;
        }
        let _writing = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = T::clone(&self.current.load());
        if let Some(r) = find(&next) {
            return r;
        }
        add(&mut next);
        let r = find(&next).expect("what was just added is found");
        self.current.store(Arc::new(next));
        r
    }
}

/// One cache: label value → handle.
type Cache<H> = Shared<FastMap<Box<str>, Arc<H>>>;

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
type Outcomes = Shared<Vec<(&'static str, &'static str, Counter)>>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_adds_are_all_kept_and_each_found_once() {
        let shared: Arc<Shared<Vec<u32>>> = Arc::default();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let v = (i % 50) * 4 + t;
                        let mut calls = 0;
                        let found = shared.find_or_add(
                            |list| {
                                calls += 1;
                                list.contains(&v).then_some(v)
                            },
                            |list| list.push(v),
                        );
                        assert_eq!(found, v);
                        assert!(calls <= 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = Vec::clone(&shared.current.load());
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>(), "no insert lost, none twice");
    }
}
