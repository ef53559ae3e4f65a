//! toolgate: a reverse proxy between AI agents and their tools.
//!
//! A call's path through the proxy, and the module that owns each step:
//!
//! 1. `server`    — accept on the data plane; request id, body and concurrency limits.
//! 2. `gateway`   — authenticate the agent (`policy::identity`), then evaluate the call.
//! 3. `policy`    — pure decision pipeline: allowlist → arguments (JSON Schema) → content filters
//!    → rules (Cedar, with facts from the session's history); a rule may hold the call for
//!    `approval`; then `state`: quarantine, token budget reservation, rate limits (atomic,
//!    after the static checks).
//! 4. `upstream`  — forward an allowed call: URL template, method, timeout, bounded response.
//! 5. `policy`    — output filters over the tool's response.
//! 6. `audit`     — one event per decision, written before the response is sent.
//!
//! `config` loads and validates the files people edit; the admin plane (`server::admin`) serves
//! health, metrics and reload on its own listener.

pub mod approval;
pub mod audit;
pub mod body;
pub mod cases;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod mcp;
pub mod meters;
pub mod per_thread;
pub mod policy;
pub mod read_mostly;
pub mod server;
pub mod state;
pub mod timer;
pub mod upstream;

/// A hash map with foldhash instead of SipHash, for the maps every call looks up (agents, keys,
/// limits, budgets, metric handles): a fraction of SipHash's cost per lookup. Still randomly
/// seeded per process; and nothing a caller sends inserts keys into these maps (they are keyed
/// by the policy's agents and tools).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A file's identity (device and inode), which a rename keeps and a replacement changes.
pub(crate) fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        None
    }
}
