//! Audit volume from callers toolgate does not know: requests refused before any agent was
//! known (bad or missing credentials, unknown endpoints, MCP requests that never authenticated).
//!
//! Why: each such refusal writes an event, and anyone who can reach the port can send them at
//! line rate. A flood would fill the audit disk, and then every call, the good ones too, fails
//! closed with 503: an unauthenticated denial of service. So refusals of unknown callers are
//! written one by one up to an allowance per source address and one for all sources together
//! (`audit.unknown_callers`, GCRA with governor); beyond it they are counted, and every
//! `summary_seconds` each source's count is written as one `refusals_summarized` event, with
//! the codes and the first and last time. Nothing is dropped unseen: the count is exact. What
//! a summary cannot give is each refused request's id. Callers with a known agent are never
//! summarized: their refusals count toward anomalies and quarantine instead.
//!
//! The answers do not change (a 401 stays a 401): this bounds what the trail costs, not who
//! may ask.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use crate::config::UnknownCallersConfig;

/// Sources tracked at once, in the limiter and in the counts; beyond, new sources share one
/// allowance and one summary (`source: null`), so memory stays bounded under a spread flood.
const MAX_SOURCES: usize = 10_000;

#[derive(Debug)]
pub struct UnknownCallers {
    per_source: Option<DefaultKeyedRateLimiter<IpAddr>>,
    overall: Option<DefaultDirectRateLimiter>,
    counts: Mutex<HashMap<Option<IpAddr>, Tally>>,
}

/// What was counted for one source since the last summary.
#[derive(Debug, Default)]
struct Tally {
    count: u64,
    codes: BTreeMap<&'static str, u64>,
    first: String,
    last: String,
}

/// One source's refusals not written one by one.
#[derive(Debug, Serialize)]
pub struct SummaryEvent {
    pub ts: String,
    pub event: &'static str,
    /// `null`: sources beyond the ones tracked, together.
    pub source: Option<IpAddr>,
    pub count: u64,
    pub codes: BTreeMap<&'static str, u64>,
    pub first: String,
    pub last: String,
}

impl UnknownCallers {
    pub fn new(cfg: &UnknownCallersConfig) -> Self {
        let quota = |n: u32| NonZeroU32::new(n).map(Quota::per_minute);
        Self {
            per_source: quota(cfg.per_source_per_minute).map(RateLimiter::keyed),
            overall: quota(cfg.per_minute).map(RateLimiter::direct),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a refusal of an unknown caller from `source` is written as its own event; if
    /// not, it is counted for the next summary. A refusal with no known source (a call made
    /// through the library, not over a connection) is always written.
    pub fn admit(&self, source: Option<IpAddr>, code: &'static str) -> bool {
        let Some(ip) = source else { return true };
        // With as many sources tracked as allowed, all are summarized until the next summary
        // forgets the quiet ones.
        let per_source = self
            .per_source
            .as_ref()
            .is_none_or(|l| l.len() < MAX_SOURCES && l.check_key(&ip).is_ok());
        if per_source && self.overall.as_ref().is_none_or(|l| l.check().is_ok()) {
            return true;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = if counts.len() < MAX_SOURCES || counts.contains_key(&Some(ip)) {
            Some(ip)
        } else {
            None
        };
        let now = super::now();
        let tally = counts.entry(key).or_default();
        if tally.count == 0 {
            tally.first.clone_from(&now);
        }
        tally.count += 1;
        *tally.codes.entry(code).or_default() += 1;
        tally.last = now;
        metrics::counter!("toolgate_audit_refusals_summarized_total").increment(1);
        false
    }

    /// The summaries due, one per source counted since the last call; the counts start again.
    pub fn take_summaries(&self) -> Vec<SummaryEvent> {
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(l) = &self.per_source {
            l.retain_recent();
        }
        let ts = super::now();
        let mut out: Vec<SummaryEvent> = counts
            .into_iter()
            .map(|(source, t)| SummaryEvent {
                ts: ts.clone(),
                event: "refusals_summarized",
                source,
                count: t.count,
                codes: t.codes,
                first: t.first,
                last: t.last,
            })
            .collect();
        out.sort_by(|a, b| a.first.cmp(&b.first));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(per_source: u32, overall: u32) -> UnknownCallers {
        UnknownCallers::new(&UnknownCallersConfig {
            per_source_per_minute: per_source,
            per_minute: overall,
            summary_seconds: 60,
        })
    }

    #[test]
    fn each_source_has_its_allowance_and_the_rest_is_counted_exactly() {
        let g = guard(3, 1000);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let written = (0..10).filter(|_| g.admit(Some(a), "unauthenticated")).count();
        assert_eq!(written, 3);
        assert!(!g.admit(Some(a), "not_found"));
        assert!(
            g.admit(Some(b), "unauthenticated"),
            "another source has its own allowance"
        );
        assert!(g.admit(None, "unauthenticated"), "no source: always written");
        let s = g.take_summaries();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].source, s[0].count), (Some(a), 8));
        assert_eq!(s[0].codes, BTreeMap::from([("not_found", 1), ("unauthenticated", 7)]));
        assert!(s[0].first <= s[0].last);
        assert!(g.take_summaries().is_empty(), "the counts start again");
    }

    #[test]
    fn the_overall_allowance_bounds_many_sources_together() {
        let g = guard(100, 5);
        let written = (0..20u8)
            .filter(|i| g.admit(Some(IpAddr::from([10, 0, 1, *i])), "unauthenticated"))
            .count();
        assert_eq!(written, 5);
        let counted: u64 = g.take_summaries().iter().map(|s| s.count).sum();
        assert_eq!(counted, 15);
    }

    #[test]
    fn zero_turns_an_allowance_off() {
        let g = guard(0, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| g.admit(Some(ip), "unauthenticated")));
    }
}
