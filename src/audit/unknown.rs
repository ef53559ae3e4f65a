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
use ipnet::IpNet;

use super::RefusalsSummarized;
use crate::config::UnknownCallersConfig;

/// Sources tracked at once, in the limiter and, one by one, in the counts. Beyond, new sources
/// are counted by a wider block (an IPv4 /24, an IPv6 /48), and beyond twice as many keys all
/// together (`source: null`): memory stays bounded under a spread flood, and a source already
/// counted keeps its own line.
const MAX_SOURCES: usize = 10_000;

#[derive(Debug)]
pub struct UnknownCallers {
    per_source: Option<DefaultKeyedRateLimiter<IpNet>>,
    overall: Option<DefaultDirectRateLimiter>,
    counts: Mutex<HashMap<Option<IpNet>, Tally>>,
}

/// What was counted for one source since the last summary.
#[derive(Debug, Default)]
struct Tally {
    count: u64,
    codes: BTreeMap<&'static str, u64>,
    first: String,
    last: String,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        if self.count == 0 || other.first < self.first {
            self.first = other.first;
        }
        if other.last > self.last {
            self.last = other.last;
        }
        self.count += other.count;
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
    }
}

/// A source as the allowance counts it: an IPv4 address, or an IPv6 /64 (one subscriber's
/// usual allocation: per address, one host could pass as millions of sources).
fn source_key(ip: IpAddr) -> IpNet {
    let prefix = if ip.is_ipv4() { 32 } else { 64 };
    IpNet::new(ip, prefix).expect("valid prefix").trunc()
}

/// The wider block a source is counted by once [`MAX_SOURCES`] are.
fn block_key(ip: IpAddr) -> IpNet {
    let prefix = if ip.is_ipv4() { 24 } else { 48 };
    IpNet::new(ip, prefix).expect("valid prefix").trunc()
}

/// How a key is written: a single IPv4 address without its /32.
fn show(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
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
        let key = source_key(ip);
        // With as many sources tracked as allowed, all are summarized until the next summary
        // forgets the quiet ones.
        let per_source = self
            .per_source
            .as_ref()
            .is_none_or(|l| l.len() < MAX_SOURCES && l.check_key(&key).is_ok());
        if per_source && self.overall.as_ref().is_none_or(|l| l.check().is_ok()) {
            return true;
        }
        let now = super::now().to_string();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = if counts.len() < MAX_SOURCES || counts.contains_key(&Some(key)) {
            Some(key)
        } else if counts.len() < 2 * MAX_SOURCES || counts.contains_key(&Some(block_key(ip))) {
            Some(block_key(ip))
        } else {
            None
        };
        counts.entry(key).or_default().add(Tally {
            count: 1,
            codes: BTreeMap::from([(code, 1)]),
            first: now.clone(),
            last: now,
        });
        metrics::counter!("toolgate_audit_refusals_summarized_total").increment(1);
        false
    }

    /// Takes what was counted since the last summary, as events; the counts start again. If
    /// the events cannot be written, [`UnknownCallers::restore`] puts the counts back.
    pub fn take(&self) -> Taken {
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(l) = &self.per_source {
            l.retain_recent();
        }
        Taken(counts)
    }

    /// Counts taken but not written go back, merged with any counted since.
    pub fn restore(&self, taken: Taken) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (key, tally) in taken.0 {
            counts.entry(key).or_default().add(tally);
        }
    }
}

/// Counts taken for a summary.
#[derive(Debug)]
pub struct Taken(HashMap<Option<IpNet>, Tally>);

impl Taken {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One event per source, oldest first.
    pub fn events(&self) -> Vec<RefusalsSummarized> {
        let mut out: Vec<RefusalsSummarized> = self
            .0
            .iter()
            .map(|(key, t)| RefusalsSummarized {
                source: key.map(show),
                count: t.count,
                codes: t.codes.clone(),
                first: t.first.clone(),
                last: t.last.clone(),
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
        let s = g.take().events();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].source.as_deref(), s[0].count), (Some("10.0.0.1"), 8));
        assert_eq!(s[0].codes, BTreeMap::from([("not_found", 1), ("unauthenticated", 7)]));
        assert!(s[0].first <= s[0].last);
        assert!(g.take().is_empty(), "the counts start again");
    }

    #[test]
    fn the_overall_allowance_bounds_many_sources_together() {
        let g = guard(100, 5);
        let written = (0..20u8)
            .filter(|i| g.admit(Some(IpAddr::from([10, 0, 1, *i])), "unauthenticated"))
            .count();
        assert_eq!(written, 5);
        let counted: u64 = g.take().events().iter().map(|s| s.count).sum();
        assert_eq!(counted, 15);
    }

    #[test]
    fn zero_turns_an_allowance_off() {
        let g = guard(0, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| g.admit(Some(ip), "unauthenticated")));
    }

    #[test]
    fn an_ipv6_source_is_its_64_so_one_host_cannot_pass_as_many() {
        let g = guard(2, 1000);
        let written = (1..=10u16)
            .filter(|i| {
                g.admit(
                    Some(IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, *i])),
                    "unauthenticated",
                )
            })
            .count();
        assert_eq!(written, 2);
        let s = g.take().events();
        assert_eq!(s[0].source.as_deref(), Some("2001:db8:0:7::/64"));
        assert_eq!(s[0].count, 8);
    }

    #[test]
    fn counts_that_could_not_be_written_are_put_back_and_merged() {
        let g = guard(1, 1000);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..4 {
            g.admit(Some(ip), "unauthenticated");
        }
        let taken = g.take();
        g.admit(Some(ip), "not_found");
        g.restore(taken);
        let s = g.take().events();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].count, 4);
        assert_eq!(s[0].codes, BTreeMap::from([("not_found", 1), ("unauthenticated", 3)]));
    }
}
