//! toolgate: a reverse proxy between AI agents and their tools.
//!
//! A call's path through the proxy, and the module that owns each step (ARCHITECTURE.md has the
//! map):
//!
//! 1. `server`   — accept on the data plane: request id, source, body and concurrency limits;
//!    `server::data` (`POST /v1/tools/{tool}`) or `server::mcp` (MCP `tools/call`) turns the
//!    request into a `gateway::CallRequest`.
//! 2. `gateway`  — one call end to end, whichever transport brought it; its stages, in order, are
//!    in `gateway::stages`: authenticate, quarantine, evaluate (`policy`), hold for `approval`,
//!    guardrails, budget and rate limits (`state`), forward (`upstream`), output filters.
//! 3. `policy`   — the pure decision engine: allowlist → arguments (JSON Schema) → content
//!    filters → rules (Cedar, with facts from the session's history); output filters.
//! 4. `upstream` — the tool: HTTP under its AWS role, or an upstream MCP server.
//! 5. `audit`    — one event per call, written before the outcome is handed back.
//!
//! `config` loads and validates the files people edit; the admin plane (`server::admin`) serves
//! health, metrics, reload, quarantine and approvals on its own listener.

pub mod approval;
pub mod audit;
pub mod body;
pub mod cases;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod meters;
pub mod per_thread;
pub mod policy;
pub mod read_mostly;
pub mod replay;
pub mod server;
pub mod state;
pub mod telemetry;
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
