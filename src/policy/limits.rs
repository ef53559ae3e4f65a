//! Per-agent limits (calls per minute, tokens per hour, per-tool call limits) and the anomaly
//! thresholds that lead to automatic quarantine, as policy declares them. The counting itself
//! lives in `state`; this module only says what the limits are.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use serde::Deserialize;

/// `agents.<id>.limits`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    /// Calls forwarded per minute (GCRA: a burst of this many, then one every 60/N s).
    #[serde(default)]
    pub calls_per_minute: Option<NonZeroU32>,
    /// Tokens (arguments in, responses out; see [`estimate_tokens`]) per clock hour.
    #[serde(default)]
    pub tokens_per_hour: Option<NonZeroU64>,
    /// Tighter per-tool call limits, e.g. `{ billing.refund: { calls_per_minute: 5 } }`.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolLimits>,
    /// How a call's answer is reserved against `tokens_per_hour` before it is known.
    #[serde(default)]
    pub budget: BudgetMode,
}

/// How the hourly token budget reserves a call's answer before the tool has given it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// The answer the agent's recent answers suggest (a moving average), reserved while other
    /// calls are in flight. Answers larger than expected can take the budget past its limit,
    /// by at most the calls in flight times what each answer exceeds its estimate by (each
    /// bounded by the tool's largest answer); the next call then waits for the hour to reset.
    #[default]
    Estimate,
    /// The tool's largest answer (`upstream.max_response_bytes`, else
    /// `limits.max_response_bytes`): the budget is never exceeded, at the price of admitting
    /// fewer calls at once.
    Strict,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolLimits {
    pub calls_per_minute: NonZeroU32,
}

/// Tokens in a piece of text that flows into the model's context: one token per 4 bytes,
/// rounded up (the usual English average for BPE tokenizers such as o200k; it over-counts
/// dense non-English text slightly, which errs on the side of the budget). Cheap enough to run
/// on every call; a real tokenizer costs tens of microseconds per KiB.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// The `anomaly:` section: per-agent counts of denied calls in a sliding window, and what
/// crossing a threshold does. Defaults apply when the section is absent.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// The sliding window, in seconds (default 300).
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    /// Quarantine the agent when a threshold is crossed (default false: only an `anomaly` event).
    #[serde(default)]
    pub quarantine: bool,
    /// How long an automatic quarantine lasts, in seconds (default 900; 0: until released).
    #[serde(default = "default_quarantine_seconds")]
    pub quarantine_seconds: u64,
    #[serde(default)]
    pub thresholds: Thresholds,
}

/// Denials of each kind within the window that count as anomalous.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Attempts on tools not on the allowlist (default 10).
    #[serde(default = "t10")]
    pub tool_not_allowed: u32,
    /// Input content blocks (default 5).
    #[serde(default = "t5")]
    pub content_blocked: u32,
    /// Schema violations and malformed arguments (default 20).
    #[serde(default = "t20")]
    pub invalid_arguments: u32,
    /// Calls refused by rate limits: bursts (default 20).
    #[serde(default = "t20")]
    pub rate_limited: u32,
}

fn default_window() -> u64 {
    300
}
fn default_quarantine_seconds() -> u64 {
    900
}
fn t5() -> u32 {
    5
}
fn t10() -> u32 {
    10
}
fn t20() -> u32 {
    20
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            tool_not_allowed: t10(),
            content_blocked: t5(),
            invalid_arguments: t20(),
            rate_limited: t20(),
        }
    }
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            window_seconds: default_window(),
            quarantine: false,
            quarantine_seconds: default_quarantine_seconds(),
            thresholds: Thresholds::default(),
        }
    }
}

impl AnomalyConfig {
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_seconds)
    }

    /// The threshold for a denial code, if that kind of denial is watched.
    pub fn threshold(&self, kind: &str) -> Option<u32> {
        let t = &self.thresholds;
        let n = match kind {
            "tool_not_allowed" => t.tool_not_allowed,
            "content_blocked" => t.content_blocked,
            "invalid_arguments" => t.invalid_arguments,
            "rate_limited" => t.rate_limited,
            _ => return None,
        };
        (n > 0).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_rounds_up_and_is_never_zero() {
        assert_eq!(estimate_tokens(0), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
        assert_eq!(estimate_tokens(2048), 512);
    }

    #[test]
    fn anomaly_defaults_watch_every_kind_and_zero_disables_one() {
        let mut a = AnomalyConfig::default();
        assert_eq!(a.threshold("content_blocked"), Some(5));
        assert_eq!(a.threshold("upstream_error"), None);
        a.thresholds.content_blocked = 0;
        assert_eq!(a.threshold("content_blocked"), None);
    }
}
