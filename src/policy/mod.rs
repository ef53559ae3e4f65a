//! The decision engine: policy files (agents, tools, filters, auth) compiled into a [`Policy`],
//! and [`Policy::evaluate`], a pure function from a [`ToolCall`] to an [`Evaluation`].
//!
//! Nothing here imports the HTTP stack, tokio or AWS: the HTTP handler, `explain`, `demo` and
//! benchmarks all call the same `evaluate`.

pub mod allowlist;
pub mod arguments;
mod compile;
pub mod content;
pub mod decision;
mod evaluate;
pub mod history;
pub mod identity;
pub mod jwks;
pub mod limits;
pub use compile::policy_schema;
pub mod lint;
pub mod output;
pub mod rules;
pub mod tool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use crate::FastMap;
use allowlist::{Allowlist, is_valid_tool_name};
use arguments::ArgumentsError;
use content::Filter;
pub use decision::{Code, Decision, Reason, Stage};
pub use evaluate::Evaluation;
use identity::Authenticator;
use limits::{AgentLimits, AnomalyConfig};
use rules::Rules;
use tool::{McpServer, Tool};

/// `agents.<id>` in a policy file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Exact tool names or trailing `.*` globs; or `{ tool: NAME, mode: shadow }` for a grant
    /// on its way out (still allowed, every call it allows reported). Empty: the agent may
    /// call nothing.
    #[serde(default)]
    pub tools: Vec<ToolGrant>,
    /// Rate limits and token budget.
    #[serde(default)]
    pub limits: AgentLimits,
    /// Free-form string attributes rules can test (`principal.getTag("team")`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// One entry of an agent's `tools`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ToolGrant {
    /// A tool name or a `prefix.*` glob, enforced.
    Tool(String),
    /// A grant with a mode: `{ tool: tickets.reply, mode: shadow }`.
    Mode {
        tool: String,
        #[serde(default)]
        mode: GrantMode,
    },
}

/// `enforce` (the default) or `shadow`: a shadow grant still allows its tools, and every call
/// that only it allows carries `would_deny: ["grant:<entry>"]` on its audit event, so you can
/// see who still relies on a grant before removing it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantMode {
    #[default]
    Enforce,
    Shadow,
}

impl ToolGrant {
    pub fn entry(&self) -> &str {
        match self {
            ToolGrant::Tool(t) | ToolGrant::Mode { tool: t, .. } => t,
        }
    }

    pub fn shadow(&self) -> bool {
        matches!(
            self,
            ToolGrant::Mode {
                mode: GrantMode::Shadow,
                ..
            }
        )
    }
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// SHA-256 (hex) of each API key the agent may present. The key itself is never stored.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// The JWT `sub` that identifies this agent (with `auth.jwt`).
    #[serde(default)]
    pub jwt_subject: Option<String>,
    /// The SPIFFE ID (URI SAN) of the client certificate that identifies this agent, verified
    /// by the data plane's `tls.client_ca_file`.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// The subject common name of the client certificate that identifies this agent.
    #[serde(default)]
    pub certificate_cn: Option<String>,
}

/// A compiled agent.
#[derive(Debug)]
pub struct Agent {
    pub id: Arc<str>,
    pub description: String,
    pub allowlist: Allowlist,
    pub limits: AgentLimits,
    pub attributes: BTreeMap<String, String>,
}

/// Limits the pipeline applies while parsing arguments.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    pub max_json_depth: usize,
}

/// One tool call, as the pipeline sees it: the authenticated agent, the tool name as requested,
/// and the raw body (parsed here, not by the transport, so every entry point parses the same way).
#[derive(Debug, Clone, Copy)]
pub struct ToolCall<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    pub body: &'a [u8],
    /// `X-Toolgate-Session` (or the MCP session), for session-aware rules.
    pub session: Option<&'a str>,
    /// When the call is made (rules see `context.time`; history windows end here).
    pub now: SystemTime,
}

impl<'a> ToolCall<'a> {
    /// A call made now, outside any session.
    pub fn new(agent: &'a str, tool: &'a str, body: &'a [u8]) -> Self {
        Self {
            agent,
            tool,
            body,
            session: None,
            now: SystemTime::now(),
        }
    }
}

/// The loaded, compiled policy. Immutable: a reload builds a new one and swaps it in.
#[derive(Debug)]
pub struct Policy {
    /// A hash of every loaded file (names and contents).
    pub version: String,
    pub files: Vec<String>,
    pub auth: Authenticator,
    pub agents: FastMap<String, Agent>,
    pub tools: BTreeMap<String, Tool>,
    pub filters: Vec<Filter>,
    pub anomaly: AnomalyConfig,
    pub rules: Rules,
    /// Tools whose calls history records, with the argument values facts compare.
    pub recorded: FastMap<String, Vec<Arc<str>>>,
    /// How long history must be kept: the longest fact window.
    pub history_retention: Duration,
    /// Upstream MCP servers; their tools are in `tools` once discovered.
    pub mcp_servers: BTreeMap<String, McpServer>,
    /// The JWKS file `auth.jwt` names, read with the policy files (it may live elsewhere):
    /// a change to it is a change to the policy.
    pub jwks_file: Option<PathBuf>,
}

/// Whether a file in the policy directory is one the policy is read from.
pub fn is_policy_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "cedar")
    )
}

impl Policy {
    /// Whether `agent` may call `tool`: the tool exists and the allowlist names it.
    pub fn is_allowed(&self, agent: &str, tool: &str) -> bool {
        self.tools.contains_key(tool) && self.agents.get(agent).is_some_and(|a| a.allowlist.allows(tool))
    }

    /// Runs a tool's output filters over its response, in place.
    pub fn filter_output(&self, tool: &Tool, response: &mut Value) -> content::Outcome {
        content::apply(&self.output_filters(tool), response)
    }

    /// Whether a JSON response is clean for the tool's output filters, checked in one pass
    /// without building it (`Ok(true)`: forward it as it came). `Ok(false)` means a filter
    /// will act: parse it and run [`Policy::filter_output`]. Unreadable JSON is an error.
    pub fn output_is_clean(&self, tool: &Tool, body: &[u8], max_depth: usize) -> Result<bool, ArgumentsError> {
        let filters = tool.output_filters.iter().map(|&i| &self.filters[i]);
        arguments::any_string(body, max_depth, &mut |s| content::finds_any(filters.clone(), s)).map(|hit| !hit)
    }

    fn output_filters(&self, tool: &Tool) -> Vec<&Filter> {
        tool.output_filters.iter().map(|&i| &self.filters[i]).collect()
    }

    /// Whether a tool has output filters (so a response must be parsed at all).
    pub fn has_output_filters(&self, tool: &Tool) -> bool {
        !tool.output_filters.is_empty()
    }
}

#[cfg(test)]
mod purity {
    /// `policy/` is the pure decision engine: it imports nothing from the transports, the
    /// gateway, the state backends, the audit sinks, the async runtime, the HTTP stack or AWS.
    /// Read from the source files themselves, so a new import anywhere under `src/policy/`
    /// fails here, not in a review.
    #[test]
    fn the_policy_module_imports_nothing_from_io_or_the_layers_above_it() {
        let forbidden = regex::Regex::new(
            r"\b(?:crate|toolgate)::(?:upstream|server|gateway|audit|approval|state|timer|per_thread)\b|\b(?:tokio|hyper|hyper_util|hyper_rustls|axum|tower|tower_http|redb|aws_config|aws_sigv4|aws_credential_types|aws_sdk_\w+|aws_smithy_\w+)::",
        )
        .unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/policy");
        let mut files = vec![root];
        let mut seen = 0;
        let mut found = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                // Comments may name what they do not import.
                let code = line.split("//").next().unwrap_or("");
                if let Some(m) = forbidden.find(code) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, m.as_str()));
                }
            }
        }
        assert!(seen >= 10, "the policy sources were not found ({seen} files)");
        assert!(found.is_empty(), "policy/ must stay pure:\n{}", found.join("\n"));
    }
}
