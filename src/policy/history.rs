//! Session-aware rules: facts about an agent's earlier calls, computed before the rules run and
//! handed to Cedar as `context.history.<name>`.
//!
//! A tool declares the facts its rules need (`tools.<name>.history`), for example
//!
//! ```yaml
//! history:
//!   fraud_checked: { tool: fraud.check, within: 1h, match: { order_id: order_id } }
//!   refunds_last_hour: { tool: billing.refund, within: 1h, value: count }
//!   read_customer: { tool: crm.read_customer, scope: session }
//! ```
//!
//! and rules use them as plain Cedar (`unless { context.history.fraud_checked }`). Only tools
//! that a fact names are recorded, only the argument values a `match` compares are kept (as
//! hashes, never raw), and history older than the longest `within` is pruned: a tool without
//! facts pays nothing. Why not Dogwood (Cedar with temporal operators): see docs/rules.md.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest window a fact may look back; also the default `within`.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// `tools.<name>.history.<fact>` as written.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FactConfig {
    /// The earlier call: an exact tool name.
    pub tool: String,
    /// How far back to look, e.g. `1h`, `30m` (default and maximum 24h).
    #[serde(default)]
    pub within: Option<String>,
    /// `agent` (default): any of the agent's calls; `session`: only calls in this call's session.
    #[serde(default)]
    pub scope: Scope,
    /// `{ <earlier call's argument>: <this call's argument> }`: only earlier calls whose argument
    /// equals this call's count.
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// `exists` (default, a Cedar `Bool`) or `count` (a `Long`).
    #[serde(default)]
    pub value: FactValue,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Agent,
    Session,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FactValue {
    #[default]
    Exists,
    Count,
}

/// A compiled fact.
#[derive(Debug, Clone)]
pub struct Fact {
    pub name: String,
    pub tool: Arc<str>,
    pub within: Duration,
    pub scope: Scope,
    /// `(earlier call's argument, this call's argument)`.
    pub matches: Vec<(Arc<str>, String)>,
    pub value: FactValue,
}

impl Fact {
    pub fn compile(name: &str, c: &FactConfig) -> Result<Fact, (&'static str, String)> {
        let within = match &c.within {
            None => MAX_WINDOW,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| ("within", format!("not a duration like `1h` or `30m`: {e}")))?,
        };
        if within.is_zero() || within > MAX_WINDOW {
            return Err(("within", "must be more than 0 and at most 24h".to_owned()));
        }
        Ok(Fact {
            name: name.to_owned(),
            tool: c.tool.as_str().into(),
            within,
            scope: c.scope,
            matches: c
                .matches
                .iter()
                .map(|(earlier, this)| (earlier.as_str().into(), this.clone()))
                .collect(),
            value: c.value,
        })
    }
}

/// A hash of one argument value (its canonical JSON), so history never keeps raw values.
pub type ValueHash = [u8; 16];

pub fn hash_value(v: &Value) -> ValueHash {
    let canonical = match v {
        Value::Object(m) => super::arguments::canonical(m),
        // `123`, `123.0` and `1.23e2` are one number: one hash.
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15) => {
            format!("{}", n.as_f64().unwrap_or_default() as i64).into_bytes()
        }
        other => serde_json::to_vec(other).expect("JSON serialises"),
    };
    let digest = Sha256::digest(&canonical);
    digest[..16].try_into().expect("16 of 32 bytes")
}

/// One earlier call, as history keeps it.
#[derive(Debug, Clone)]
pub struct PastCall {
    pub tool: Arc<str>,
    /// Unix milliseconds.
    pub at_ms: u64,
    pub session: Option<Arc<str>>,
    /// Hashes of the arguments that some fact compares.
    pub values: Vec<(Arc<str>, ValueHash)>,
}

/// Read access to an agent's recorded calls. The gateway's state implements it; `toolgate test`
/// and `explain` use a [`Recorded`] list.
pub trait History: Sync {
    /// Calls `visit` with each of `agent`'s recorded calls made at or after `since_ms`.
    fn visit(&self, agent: &str, since_ms: u64, visit: &mut dyn FnMut(&PastCall));
}

/// No history at all.
pub struct NoHistory;

impl History for NoHistory {
    fn visit(&self, _: &str, _: u64, _: &mut dyn FnMut(&PastCall)) {}
}

/// A fixed list of `(agent, call)`: test cases and `explain`.
#[derive(Debug, Default)]
pub struct Recorded(pub Vec<(String, PastCall)>);

impl History for Recorded {
    fn visit(&self, agent: &str, since_ms: u64, visit: &mut dyn FnMut(&PastCall)) {
        for (a, call) in &self.0 {
            if a == agent && call.at_ms >= since_ms {
                visit(call);
            }
        }
    }
}

/// The computed value of a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactResult {
    Exists(bool),
    Count(i64),
}

/// Computes `facts` for a call in one pass over the agent's history.
pub fn compute(
    facts: &[Fact],
    history: &dyn History,
    agent: &str,
    session: Option<&str>,
    now_ms: u64,
    args: &Map<String, Value>,
) -> Vec<FactResult> {
    // What each match must equal, from this call's arguments. A missing argument matches nothing.
    let wanted: Vec<Vec<Option<(&str, ValueHash)>>> = facts
        .iter()
        .map(|f| {
            f.matches
                .iter()
                .map(|(earlier, this)| args.get(this).map(|v| (&**earlier, hash_value(v))))
                .collect()
        })
        .collect();
    let longest = facts.iter().map(|f| f.within).max().unwrap_or_default();
    let mut counts = vec![0i64; facts.len()];
    history.visit(agent, now_ms.saturating_sub(longest.as_millis() as u64), &mut |call| {
        for (i, f) in facts.iter().enumerate() {
            if call.tool != f.tool || call.at_ms < now_ms.saturating_sub(f.within.as_millis() as u64) {
                continue;
            }
            if f.scope == Scope::Session && call.session.as_deref() != session {
                continue;
            }
            let matched = wanted[i]
                .iter()
                .all(|w| w.is_some_and(|(name, hash)| call.values.iter().any(|(n, h)| &**n == name && *h == hash)));
            if matched {
                counts[i] += 1;
            }
        }
    });
    facts
        .iter()
        .zip(counts)
        .map(|(f, n)| match f.value {
            FactValue::Exists => FactResult::Exists(n > 0),
            FactValue::Count => FactResult::Count(n),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fact(tool: &str, within: &str, scope: Scope, matches: &[(&str, &str)], value: FactValue) -> Fact {
        Fact {
            name: "f".into(),
            tool: tool.into(),
            within: humantime::parse_duration(within).unwrap(),
            scope,
            matches: matches.iter().map(|(a, b)| ((*a).into(), (*b).to_owned())).collect(),
            value,
        }
    }

    fn call(tool: &str, at_ms: u64, session: Option<&str>, values: &[(&str, Value)]) -> (String, PastCall) {
        (
            "a".into(),
            PastCall {
                tool: tool.into(),
                at_ms,
                session: session.map(Into::into),
                values: values.iter().map(|(n, v)| ((*n).into(), hash_value(v))).collect(),
            },
        )
    }

    #[test]
    fn one_number_one_hash() {
        assert_eq!(hash_value(&json!(123)), hash_value(&json!(123.0)));
        assert_eq!(
            hash_value(&json!(123)),
            hash_value(&serde_json::from_str::<Value>("1.23e2").unwrap())
        );
        assert_ne!(hash_value(&json!(123)), hash_value(&json!("123")));
        assert_ne!(hash_value(&json!(123.5)), hash_value(&json!(123)));
    }

    #[test]
    fn exists_count_window_session_and_match() {
        let now = 10_000_000;
        let h = Recorded(vec![
            call("fraud.check", now - 1000, None, &[("order_id", json!("O-1"))]),
            call("fraud.check", now - 7_200_000, None, &[("order_id", json!("O-2"))]),
            call("billing.refund", now - 10, Some("s1"), &[]),
            call("billing.refund", now - 20, Some("s2"), &[]),
        ]);
        let args = json!({"order_id": "O-1"});
        let args = args.as_object().unwrap();
        let facts = [
            fact(
                "fraud.check",
                "1h",
                Scope::Agent,
                &[("order_id", "order_id")],
                FactValue::Exists,
            ),
            fact("billing.refund", "1h", Scope::Agent, &[], FactValue::Count),
            fact("billing.refund", "1h", Scope::Session, &[], FactValue::Count),
            fact(
                "fraud.check",
                "1h",
                Scope::Agent,
                &[("order_id", "missing")],
                FactValue::Exists,
            ),
        ];
        let got = compute(&facts, &h, "a", Some("s1"), now, args);
        assert_eq!(
            got,
            [
                FactResult::Exists(true),
                FactResult::Count(2),
                FactResult::Count(1),
                FactResult::Exists(false)
            ]
        );
        // Another order: the O-2 check is out of the window as well as for another order.
        let other = json!({"order_id": "O-2"});
        let got = compute(&facts[..1], &h, "a", None, now, other.as_object().unwrap());
        assert_eq!(got, [FactResult::Exists(false)]);
        // Another agent sees nothing.
        assert_eq!(compute(&facts[1..2], &h, "b", None, now, args), [FactResult::Count(0)]);
    }
}
