//! The decision engine: policy files (agents, tools, filters, auth) compiled into a [`Policy`],
//! and [`Policy::evaluate`], a pure function from a [`ToolCall`] to an [`Evaluation`].
//!
//! Nothing here imports the HTTP stack, tokio or AWS: the HTTP handler, `explain`, `demo` and
//! benchmarks all call the same `evaluate`.

pub mod allowlist;
pub mod arguments;
pub mod content;
pub mod decision;
pub mod history;
pub mod identity;
pub mod limits;
pub mod rules;
pub mod tool;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::FastMap;
use crate::config::yaml::{Document, KeyPath};
use crate::config::{ConfigError, Problem, Problems};
use allowlist::{Allowlist, ToolPattern, is_valid_tool_name};
use arguments::{ArgumentSchema, ArgumentsError};
use content::{Filter, FilterConfig};
pub use decision::{Code, Decision, Reason, Stage};
use history::{Fact, History};
use identity::{Authenticator, JwtConfig, JwtVerifier, parse_key_digest};
use limits::{AgentLimits, AnomalyConfig};
use rules::Rules;
use tool::{DiscoveredTool, McpServer, McpServerConfig, Method, Target, Tool, ToolConfig, UrlTemplate};

/// One policy file as written. Each entry is decoded on its own so one mistake hides no other.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFileRaw {
    #[serde(default)]
    agents: Map<String, Value>,
    #[serde(default)]
    tools: Map<String, Value>,
    #[serde(default)]
    filters: Map<String, Value>,
    #[serde(default)]
    auth: Option<Value>,
    #[serde(default)]
    anomaly: Option<Value>,
    #[serde(default)]
    mcp_servers: Map<String, Value>,
}

/// `agents.<id>` in a policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Exact tool names or trailing `.*` globs. Empty: the agent may call nothing.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Rate limits and token budget.
    #[serde(default)]
    pub limits: AgentLimits,
    /// Free-form string attributes rules can test (`principal.getTag("team")`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// SHA-256 (hex) of each API key the agent may present. The key itself is never stored.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// The JWT `sub` that identifies this agent (with `auth.jwt`).
    #[serde(default)]
    pub jwt_subject: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthConfig {
    #[serde(default)]
    jwt: Option<JwtConfig>,
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

/// What the pipeline decided, plus what forwarding and audit need.
#[derive(Debug)]
pub struct Evaluation<'p> {
    pub decision: Decision,
    /// The tool, once the allowlist has passed.
    pub tool: Option<&'p Tool>,
    /// The parsed arguments, after input filters when they ran. Forwarded only on `Allow`; on a
    /// deny they are what the audit event records (redacted again there).
    pub arguments: Option<Value>,
    /// SHA-256 of the arguments as received (canonical form; the raw bytes if unparseable).
    pub arguments_sha256: String,
    /// The canonical JSON of `arguments` as forwarded (keys sorted, redactions applied).
    pub body: Option<Vec<u8>>,
    /// The upstream URL with placeholders filled.
    pub url: Option<std::borrow::Cow<'p, str>>,
    /// Non-blocking findings (redactions), for the audit event.
    pub notes: Vec<Reason>,
    /// When the decision is `approval_required`: the approval rules that matched, `(id, group)`.
    pub approvals: Vec<(String, String)>,
    /// Shadow-mode rules that would have denied the call.
    pub would_deny: Vec<String>,
    /// The audit redactor would change nothing in `arguments` (the content walk asked it), so
    /// `body` is also what audit events, approvers and webhooks may see. False whenever that
    /// walk did not finish: then `arguments` need their own redaction pass.
    pub audit_clean: bool,
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
    /// Loads every `*.yaml`/`*.yml` and `*.cedar` file in `dir` (not subdirectories: test cases
    /// live in `dir/tests/`).
    pub fn load(dir: &Path) -> Result<Policy, ConfigError> {
        Self::load_with(dir, &[])
    }

    /// [`Policy::load`], with the tools discovered on upstream MCP servers.
    pub fn load_with(dir: &Path, discovered: &[DiscoveredTool]) -> Result<Policy, ConfigError> {
        let shown = dir.display().to_string();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| ConfigError::file(&shown, format!("cannot read the policy directory: {e}")))?;
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        let mut sources = Vec::new();
        let mut problems = Problems::default();
        for path in paths {
            let name = path.display().to_string();
            if is_policy_file(&path) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => sources.push((name, text)),
                    Err(e) => problems.push(ConfigError::file(&name, format!("cannot read: {e}")).problems.remove(0)),
                }
            }
        }
        if sources.is_empty() && problems.is_empty() {
            problems.push(
                ConfigError::file(&shown, "no policy files (*.yaml) found")
                    .problems
                    .remove(0),
            );
        }
        match Self::compile_with(&sources, |p| std::fs::read_to_string(p), discovered) {
            Ok(policy) => problems.finish(policy),
            Err(e) => {
                problems.extend(e);
                problems.finish(Self::empty())
            }
        }
    }

    fn empty() -> Policy {
        Policy {
            version: String::new(),
            files: Vec::new(),
            auth: Authenticator::default(),
            agents: FastMap::default(),
            tools: BTreeMap::new(),
            filters: Vec::new(),
            anomaly: AnomalyConfig::default(),
            rules: Rules::empty(),
            recorded: FastMap::default(),
            history_retention: Duration::ZERO,
            mcp_servers: BTreeMap::new(),
            jwks_file: None,
        }
    }

    /// Compiles policy sources `(file name, text)`: YAML files, and Cedar rule files (`*.cedar`);
    /// `read` loads files they reference (JWKS).
    pub fn compile(
        sources: &[(String, String)],
        read: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Policy, ConfigError> {
        Self::compile_with(sources, read, &[])
    }

    /// [`Policy::compile`], with the tools discovered on upstream MCP servers (exposed as
    /// `<server>.<tool>`, with the server's filters; a tool whose definition changed since it
    /// was pinned is marked `changed`).
    pub fn compile_with(
        sources: &[(String, String)],
        read: impl Fn(&Path) -> std::io::Result<String>,
        discovered: &[DiscoveredTool],
    ) -> Result<Policy, ConfigError> {
        let mut problems = Problems::default();
        let mut hasher = Sha256::new();
        let mut docs = Vec::new();
        let mut rule_sources = Vec::new();
        for (name, text) in sources {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            if name.ends_with(".cedar") {
                rule_sources.push((name.clone(), text.clone()));
                continue;
            }
            match Document::parse(name, text) {
                Ok(doc) => docs.push(doc),
                Err(e) => problems.extend(e),
            }
        }
        let mut raw_files = Vec::new();
        for doc in &docs {
            match doc.decode::<PolicyFileRaw>(&KeyPath::root(), &doc.value) {
                Ok(raw) => raw_files.push((doc, raw)),
                Err(p) => problems.push(p),
            }
        }

        // Filters and tools first: agents and tools refer to them.
        let mut filter_index: HashMap<String, usize> = HashMap::new();
        let mut filters = Vec::new();
        let mut seen: HashMap<(&str, String), Problem> = HashMap::new();
        let mut first_definition =
            |section: &'static str, name: &str, doc: &Document, path: &KeyPath, problems: &mut Problems| {
                let here = doc.problem(path, "");
                if let Some(prev) = seen.get(&(section, name.to_owned())) {
                    problems.push(doc.problem(
                        path,
                        format!(
                            "`{name}` is already defined at {}:{}:{}",
                            prev.file, prev.line, prev.col
                        ),
                    ));
                    return false;
                }
                seen.insert((section, name.to_owned()), here);
                true
            };
        for (doc, raw) in &raw_files {
            for (name, value) in &raw.filters {
                let path = KeyPath::root().key("filters").key(name);
                if !first_definition("filters", name, doc, &path, &mut problems) {
                    continue;
                }
                let Ok(config) = doc.decode::<FilterConfig>(&path, value).map_err(|p| problems.push(p)) else {
                    continue;
                };
                match Filter::compile(name, &config) {
                    Ok(f) => {
                        filter_index.insert(name.clone(), filters.len());
                        filters.push(f);
                    }
                    Err(errs) => {
                        for (sub, msg) in errs {
                            let at = sub
                                .split(['[', ']'])
                                .filter(|s| !s.is_empty())
                                .fold(path.clone(), |p, s| match s.parse() {
                                    Ok(i) => p.index(i),
                                    Err(_) => p.key(s),
                                });
                            problems.push(doc.problem(&at, msg));
                        }
                    }
                }
            }
        }

        let mut tools = BTreeMap::new();
        // Every tool name written down, compiled or not, so a broken tool is reported once and
        // not again as "no tool named" wherever an allowlist mentions it.
        let defined_tools: std::collections::HashSet<&str> = raw_files
            .iter()
            .flat_map(|(_, raw)| raw.tools.keys().map(String::as_str))
            .collect();
        for (doc, raw) in &raw_files {
            for (name, value) in &raw.tools {
                let path = KeyPath::root().key("tools").key(name);
                if !is_valid_tool_name(name) {
                    problems.push(doc.problem(&path, "tool names must match ^[A-Za-z0-9_.-]{1,128}$"));
                    continue;
                }
                if !first_definition("tools", name, doc, &path, &mut problems) {
                    continue;
                }
                match doc.decode::<ToolConfig>(&path, value) {
                    Ok(config) => {
                        if let Some(tool) = compile_tool(name, config, doc, &path, &filter_index, &mut problems) {
                            tools.insert(name.clone(), tool);
                        }
                    }
                    Err(p) => problems.push(p),
                }
            }
        }

        let mut mcp_servers = BTreeMap::new();
        for (doc, raw) in &raw_files {
            for (name, value) in &raw.mcp_servers {
                let path = KeyPath::root().key("mcp_servers").key(name);
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    problems.push(doc.problem(
                        &path,
                        "MCP server names are 1 to 64 letters, digits, `_` or `-` (its tools are `<name>.<tool>`)",
                    ));
                    continue;
                }
                if !first_definition("mcp_servers", name, doc, &path, &mut problems) {
                    continue;
                }
                let Ok(c) = doc
                    .decode::<McpServerConfig>(&path, value)
                    .map_err(|p| problems.push(p))
                else {
                    continue;
                };
                if let Err(e) = UrlTemplate::parse(&c.url).and_then(|t| match t.placeholders().next() {
                    Some(_) => Err("must not have placeholders".to_owned()),
                    None => Ok(()),
                }) {
                    problems.push(doc.problem(&path.key("url"), e));
                }
                if c.timeout_ms == Some(0) {
                    problems.push(doc.problem(&path.key("timeout_ms"), "must be greater than 0"));
                }
                if let Some(role) = &c.aws_role {
                    for (key, msg) in role.check() {
                        problems.push(doc.problem(&path.key("aws_role").key(key), msg));
                    }
                }
                let prefix = format!("{name}.");
                for tool in defined_tools.iter().filter(|t| t.starts_with(&prefix)) {
                    problems.push(doc.problem(&path, format!("the tool `{tool}` is also defined in `tools:`; names under `{prefix}` belong to this MCP server")));
                }
                let (input_filters, output_filters) =
                    resolve_filters(&c.filters, &filter_index, doc, &path, &mut problems);
                mcp_servers.insert(
                    name.clone(),
                    McpServer {
                        name: name.clone(),
                        url: c.url,
                        timeout: c.timeout_ms.map(Duration::from_millis),
                        input_filters,
                        output_filters,
                        aws_role: c.aws_role,
                    },
                );
            }
        }
        for d in discovered {
            let Some(server) = mcp_servers.get(&d.server) else {
                continue;
            };
            // The version covers what the servers listed: a decision records the catalog too.
            hasher.update(d.exposed_name().as_bytes());
            hasher.update(d.definition_sha256().as_bytes());
            hasher.update([u8::from(d.changed)]);
            let name = d.exposed_name();
            // A tool the gateway cannot name or validate is not exposed at all.
            if !is_valid_tool_name(&name) || tools.contains_key(&name) || !d.input_schema.is_object() {
                continue;
            }
            let Ok(schema) = ArgumentSchema::compile(&d.input_schema) else {
                continue;
            };
            tools.insert(
                name.clone(),
                Tool {
                    name,
                    description: d.description.clone(),
                    target: Target::Mcp {
                        server: d.server.clone(),
                        tool: d.tool.clone(),
                    },
                    timeout: server.timeout,
                    headers: Vec::new(),
                    aws_role: server.aws_role.clone(),
                    schema: Some(schema),
                    schema_source: Some(d.input_schema.clone()),
                    input_filters: server.input_filters.clone(),
                    output_filters: server.output_filters.clone(),
                    facts: Vec::new(),
                    touches_history: false,
                    changed: d.changed,
                },
            );
        }

        let (mut jwt, mut jwks_file) = (None, None);
        for (doc, raw) in &raw_files {
            let Some(auth) = &raw.auth else { continue };
            let path = KeyPath::root().key("auth");
            if !first_definition("auth", "auth", doc, &path, &mut problems) {
                continue;
            }
            let Ok(auth) = doc.decode::<AuthConfig>(&path, auth).map_err(|p| problems.push(p)) else {
                continue;
            };
            if let Some(cfg) = auth.jwt {
                let at = path.key("jwt").key("jwks_file");
                jwks_file = Some(cfg.jwks_file.clone());
                match read(&cfg.jwks_file) {
                    Ok(text) => {
                        hasher.update(text.as_bytes());
                        match JwtVerifier::new(&cfg, &text) {
                            Ok(v) => jwt = Some(v),
                            Err(e) => problems.push(doc.problem(&at, e)),
                        }
                    }
                    Err(e) => problems.push(doc.problem(&at, format!("cannot read {}: {e}", cfg.jwks_file.display()))),
                }
            }
        }

        let mut auth = Authenticator::new(jwt);
        let mut agents = FastMap::default();
        for (doc, raw) in &raw_files {
            for (id, value) in &raw.agents {
                let path = KeyPath::root().key("agents").key(id);
                if !is_valid_tool_name(id) {
                    problems.push(doc.problem(&path, "agent ids must match ^[A-Za-z0-9_.-]{1,128}$"));
                    continue;
                }
                if !first_definition("agents", id, doc, &path, &mut problems) {
                    continue;
                }
                let Ok(config) = doc.decode::<AgentConfig>(&path, value).map_err(|p| problems.push(p)) else {
                    continue;
                };
                let agent_id: Arc<str> = id.as_str().into();
                let mut patterns = Vec::new();
                for (i, entry) in config.tools.iter().enumerate() {
                    let at = path.key("tools").index(i);
                    match ToolPattern::parse(entry) {
                        Ok(ToolPattern::Exact(name))
                            if !defined_tools.contains(name.as_str())
                                && !raw_files
                                    .iter()
                                    .any(|(_, r)| r.mcp_servers.keys().any(|s| name.starts_with(&format!("{s}.")))) =>
                        {
                            problems.push(doc.problem(&at, format!("no tool named `{name}` is defined")));
                        }
                        Ok(p) => patterns.push(p),
                        Err(e) => problems.push(doc.problem(&at, e)),
                    }
                }
                for tool in config.limits.tools.keys() {
                    let at = path.key("limits").key("tools").key(tool);
                    if !defined_tools.contains(tool.as_str()) {
                        problems.push(doc.problem(&at, format!("no tool named `{tool}` is defined")));
                    } else if !patterns.iter().any(|p| p.matches(tool)) {
                        problems.push(doc.problem(&at, format!("`{tool}` is not on this agent's allowlist")));
                    }
                }
                let creds = path.key("credentials");
                for (i, digest) in config.credentials.api_key_sha256.iter().enumerate() {
                    let at = creds.key("api_key_sha256").index(i);
                    match parse_key_digest(digest) {
                        Ok(d) => {
                            if let Err(other) = auth.add_api_key(d, agent_id.clone()) {
                                problems.push(doc.problem(&at, format!("this key is already agent `{other}`'s")));
                            }
                        }
                        Err(e) => problems.push(doc.problem(&at, e)),
                    }
                }
                if let Some(sub) = &config.credentials.jwt_subject {
                    let at = creds.key("jwt_subject");
                    if !auth.has_jwt() {
                        problems.push(doc.problem(&at, "needs `auth.jwt` in a policy file"));
                    } else if let Err(other) = auth.add_jwt_subject(sub.clone(), agent_id.clone()) {
                        problems.push(doc.problem(&at, format!("this subject is already agent `{other}`'s")));
                    }
                }
                agents.insert(
                    id.clone(),
                    Agent {
                        id: agent_id,
                        description: config.description,
                        allowlist: Allowlist::new(patterns),
                        limits: config.limits,
                        attributes: config.attributes,
                    },
                );
            }
        }

        let mut anomaly = AnomalyConfig::default();
        for (doc, raw) in &raw_files {
            let Some(value) = &raw.anomaly else { continue };
            let path = KeyPath::root().key("anomaly");
            if !first_definition("anomaly", "anomaly", doc, &path, &mut problems) {
                continue;
            }
            match doc.decode::<AnomalyConfig>(&path, value) {
                Ok(a) if a.window_seconds == 0 => {
                    problems.push(doc.problem(&path.key("window_seconds"), "must be greater than 0"))
                }
                Ok(a) => anomaly = a,
                Err(p) => problems.push(p),
            }
        }

        let (recorded, history_retention) = check_history(&tools, &raw_files, &mut problems);
        for (name, tool) in tools.iter_mut() {
            tool.touches_history = !tool.facts.is_empty() || recorded.contains_key(name);
        }
        // Rules are validated against the tools as compiled; with broken tools they would only
        // report knock-on errors, so they wait for a clean pass.
        let rules = if problems.is_empty() {
            let mut found = Vec::new();
            let rules = Rules::compile(&rule_sources, &tools, &agents, &mut found);
            found.into_iter().for_each(|p| problems.push(p));
            rules
        } else {
            Rules::empty()
        };

        let digest = hex::encode(hasher.finalize());
        problems.finish(Policy {
            version: digest[..16].to_owned(),
            files: sources.iter().map(|(n, _)| n.clone()).collect(),
            auth,
            agents,
            tools,
            filters,
            anomaly,
            rules,
            recorded,
            history_retention,
            mcp_servers,
            jwks_file,
        })
    }

    /// Whether `agent` may call `tool`: the tool exists and the allowlist names it.
    pub fn is_allowed(&self, agent: &str, tool: &str) -> bool {
        self.tools.contains_key(tool) && self.agents.get(agent).is_some_and(|a| a.allowlist.allows(tool))
    }

    /// Runs the pipeline. The order is fixed and cheap-to-expensive, and each stage only sees
    /// calls the previous ones admitted:
    /// 1. agent — known (the caller authenticated it; `explain` names it);
    /// 2. allowlist — before the body is even parsed, so a caller learns nothing about tools it
    ///    may not call (unknown and not-allowed tools get the same answer);
    /// 3. arguments — strict JSON, the tool's schema, URL placeholders;
    /// 4. content — input filters over every string value and key; redactions rewrite the
    ///    arguments that are forwarded;
    /// 5. rules — Cedar forbids over the arguments as they will be forwarded, with facts from
    ///    `history` for session-aware rules. A forbid with `@approval` holds the call instead.
    pub fn evaluate<'p>(&'p self, call: &ToolCall<'_>, limits: ParseLimits, history: &dyn History) -> Evaluation<'p> {
        let mut eval = Evaluation {
            decision: Decision::Allow,
            tool: None,
            arguments: None,
            arguments_sha256: String::new(),
            body: None,
            url: None,
            notes: Vec::new(),
            approvals: Vec::new(),
            would_deny: Vec::new(),
            audit_clean: false,
        };
        let deny = |mut eval: Evaluation<'p>, reason: Reason| {
            eval.decision = Decision::Deny(reason);
            eval
        };

        let Some(agent) = self.agents.get(call.agent) else {
            eval.arguments_sha256 = arguments::sha256_hex(call.body);
            let r = Reason::new(
                Code::Unauthenticated,
                Stage::Authentication,
                "authentication",
                format!("Unknown agent '{}'.", call.agent),
            );
            return deny(eval, r);
        };
        let tool = self.tools.get(call.tool).filter(|_| agent.allowlist.allows(call.tool));
        let Some(tool) = tool else {
            eval.arguments_sha256 = arguments::sha256_hex(call.body);
            let message = if is_valid_tool_name(call.tool) {
                format!("Agent '{}' may not call '{}'.", agent.id, call.tool)
            } else {
                format!(
                    "Agent '{}' may not call this tool: the name is not a valid tool name.",
                    agent.id
                )
            };
            return deny(
                eval,
                Reason::new(Code::ToolNotAllowed, Stage::Allowlist, "allowlist", message),
            );
        };
        eval.tool = Some(tool);
        if tool.changed {
            eval.arguments_sha256 = arguments::sha256_hex(call.body);
            let msg = format!(
                "The definition of tool '{}' changed on its MCP server since it was approved; it is blocked until an operator reviews it (POST /admin/tools/{}/approve).",
                tool.name, tool.name
            );
            return deny(
                eval,
                Reason::new(Code::ToolChanged, Stage::Allowlist, "tool-pinning", msg),
            );
        }

        let args = match arguments::parse(call.body, limits.max_json_depth) {
            Ok(args) => args,
            Err(e) => {
                eval.arguments_sha256 = arguments::sha256_hex(call.body);
                return deny(
                    eval,
                    Reason::new(Code::InvalidArguments, Stage::Arguments, "json", e.to_string()),
                );
            }
        };
        let canonical = arguments::canonical(&args);
        eval.arguments_sha256 = arguments::sha256_hex(&canonical);
        let args = eval.arguments.insert(Value::Object(args));
        if let Some(schema) = &tool.schema
            && let Err(message) = schema.validate(args)
        {
            return deny(
                eval,
                Reason::new(Code::InvalidArguments, Stage::Arguments, "schema", message),
            );
        }
        // Placeholders are filled (and their values checked) from the arguments as validated;
        // filled again below if a filter redacted any argument, so the path never carries a
        // value the body and the audit event show redacted.
        if let Target::Http { url, .. } = &tool.target {
            match url.fill(args.as_object().expect("parsed as an object")) {
                Ok(url) => eval.url = Some(url),
                Err(message) => {
                    return deny(
                        eval,
                        Reason::new(Code::InvalidArguments, Stage::Arguments, "url", message),
                    );
                }
            }
        }

        {
            // One walk for the tool's input filters and the audit redactor's detectors.
            let filters = tool.input_filters.iter().map(|&i| &self.filters[i]);
            let outcome = content::apply_audited(filters, Some(&content::AUDIT_REDACTOR), args);
            eval.audit_clean = !outcome.audit_hit;
            for (filter, kind) in outcome.redacted {
                let msg = format!("Redacted {kind} found by filter '{filter}'.");
                eval.notes
                    .push(Reason::new(Code::ContentBlocked, Stage::Content, filter, msg));
            }
            if let Some((filter, kind)) = outcome.blocked {
                eval.audit_clean = false;
                let msg = format!("The arguments were blocked by content filter '{filter}' ({kind}).");
                return deny(eval, Reason::new(Code::ContentBlocked, Stage::Content, filter, msg));
            }
        }
        if !eval.notes.is_empty()
            && let Target::Http { url, .. } = &tool.target
        {
            let args = eval.arguments.as_ref().and_then(Value::as_object).expect("set above");
            match url.fill(args) {
                Ok(url) => eval.url = Some(url),
                Err(message) => {
                    return deny(
                        eval,
                        Reason::new(Code::InvalidArguments, Stage::Arguments, "url", message),
                    );
                }
            }
        }
        // Serialise once: unchanged arguments reuse the canonical bytes already hashed.
        eval.body = Some(if eval.notes.is_empty() {
            canonical
        } else {
            arguments::canonical(eval.arguments.as_ref().and_then(Value::as_object).expect("set above"))
        });
        if self.rules.applies_to(&tool.name) {
            let args = eval
                .arguments
                .as_ref()
                .and_then(Value::as_object)
                .expect("parsed as an object");
            match self
                .rules
                .evaluate(call.agent, &tool.name, call.session, call.now, args, history)
            {
                Ok(verdict) => {
                    eval.would_deny = verdict.would_deny;
                    eval.approvals = verdict.approvals;
                    if let Some(reason) = verdict.blocked {
                        return deny(eval, reason);
                    }
                }
                Err(message) => {
                    return deny(
                        eval,
                        Reason::new(Code::InvalidArguments, Stage::Arguments, "rules", message),
                    );
                }
            }
        }
        eval
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

fn compile_tool(
    name: &str,
    c: ToolConfig,
    doc: &Document,
    path: &KeyPath,
    filter_index: &HashMap<String, usize>,
    problems: &mut Problems,
) -> Option<Tool> {
    let before = problems.len();
    let up = path.key("upstream");
    let url = UrlTemplate::parse(&c.upstream.url)
        .map_err(|e| problems.push(doc.problem(&up.key("url"), e)))
        .ok();
    let method = Method::parse(&c.upstream.method);
    if method.is_none() {
        problems.push(doc.problem(&up.key("method"), "must be one of GET, POST, PUT, PATCH, DELETE"));
    }
    if c.upstream.timeout_ms == Some(0) {
        problems.push(doc.problem(&up.key("timeout_ms"), "must be greater than 0"));
    }
    if let Some(role) = &c.aws_role {
        for (key, msg) in role.check() {
            problems.push(doc.problem(&path.key("aws_role").key(key), msg));
        }
    }
    let mut headers = Vec::new();
    for (name, value) in &c.upstream.headers {
        let at = up.key("headers").key(name);
        if !tool::is_settable_header(name) {
            problems.push(doc.problem(
                &at,
                "this header cannot be set here (toolgate or SigV4 sets it, or it is hop-by-hop or a credential)",
            ));
            continue;
        }
        match (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => problems.push(doc.problem(&at, "not a valid header value")),
        }
    }
    let schema = c.arguments.as_ref().and_then(|s| {
        ArgumentSchema::compile(s)
            .map_err(|e| problems.push(doc.problem(&path.key("arguments"), e)))
            .ok()
    });
    if let Some(url) = &url {
        let required: Vec<&str> = c
            .arguments
            .as_ref()
            .and_then(|s| s.get("required"))
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for p in url.placeholders() {
            if !required.contains(&p) {
                problems.push(doc.problem(
                    &up.key("url"),
                    format!("placeholder `{{{p}}}` must be a required argument in `arguments.required`"),
                ));
            }
        }
    }
    let (input_filters, output_filters) = resolve_filters(&c.filters, filter_index, doc, path, problems);
    let mut facts = Vec::new();
    for (fact, config) in &c.history {
        let at = path.key("history").key(fact);
        if !is_cedar_identifier(fact) {
            problems.push(doc.problem(
                &at,
                "fact names must be identifiers (letters, digits, `_`), to use as `context.history.<name>`",
            ));
            continue;
        }
        match Fact::compile(fact, config) {
            Ok(f) => facts.push(f),
            Err((key, msg)) => problems.push(doc.problem(&at.key(key), msg)),
        }
    }
    if problems.len() != before {
        return None;
    }
    Some(Tool {
        name: name.to_owned(),
        description: c.description,
        target: Target::Http {
            url: url?,
            method: method?,
        },
        headers,
        aws_role: c.aws_role,
        timeout: c.upstream.timeout_ms.map(std::time::Duration::from_millis),
        schema,
        schema_source: c.arguments,
        input_filters,
        output_filters,
        facts,
        touches_history: false,
        changed: false,
    })
}

/// A tool's (or MCP server's) `filters:` names, as indexes into the compiled filters; a name
/// that is not defined is a problem at its place.
fn resolve_filters(
    refs: &tool::FilterRefs,
    filter_index: &HashMap<String, usize>,
    doc: &Document,
    path: &KeyPath,
    problems: &mut Problems,
) -> (Vec<usize>, Vec<usize>) {
    let mut resolve = |list: &[String], key: &str| -> Vec<usize> {
        list.iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let idx = filter_index.get(f).copied();
                if idx.is_none() {
                    problems.push(doc.problem(
                        &path.key("filters").key(key).index(i),
                        format!("no filter named `{f}` is defined"),
                    ));
                }
                idx
            })
            .collect()
    };
    (resolve(&refs.input, "input"), resolve(&refs.output, "output"))
}

fn is_cedar_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks what history facts refer to (the earlier tool exists; `match` names an argument of
/// each side, required on this side so a call cannot dodge the match by leaving it out), and
/// derives what history must record and for how long.
fn check_history(
    tools: &BTreeMap<String, Tool>,
    raw_files: &[(&Document, PolicyFileRaw)],
    problems: &mut Problems,
) -> (FastMap<String, Vec<Arc<str>>>, Duration) {
    let mut recorded: FastMap<String, Vec<Arc<str>>> = FastMap::default();
    let mut retention = Duration::ZERO;
    let properties = |t: &Tool| -> Vec<String> {
        t.schema_source
            .as_ref()
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    };
    let required = |t: &Tool| -> Vec<String> {
        t.schema_source
            .as_ref()
            .and_then(|s| s.get("required"))
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    for (name, tool) in tools {
        let Some((doc, _)) = raw_files.iter().find(|(_, raw)| raw.tools.contains_key(name)) else {
            continue;
        };
        for fact in &tool.facts {
            let at = KeyPath::root().key("tools").key(name).key("history").key(&fact.name);
            let Some(earlier) = tools.get(&*fact.tool) else {
                problems.push(doc.problem(&at.key("tool"), format!("no tool named `{}` is defined", fact.tool)));
                continue;
            };
            let mut ok = true;
            for (theirs, ours) in &fact.matches {
                let m = at.key("match").key(theirs);
                if !properties(earlier).iter().any(|p| p == &**theirs) {
                    problems.push(doc.problem(&m, format!("`{}` has no argument `{theirs}`", fact.tool)));
                    ok = false;
                }
                if !required(tool).iter().any(|p| p == ours) {
                    problems.push(doc.problem(
                        &m,
                        format!("`{ours}` must be a required argument of `{name}` (in `arguments.required`)"),
                    ));
                    ok = false;
                }
            }
            if !ok {
                continue;
            }
            retention = retention.max(fact.within);
            let fields = recorded.entry(fact.tool.to_string()).or_default();
            for (theirs, _) in &fact.matches {
                if !fields.contains(theirs) {
                    fields.push(theirs.clone());
                }
            }
        }
    }
    (recorded, retention)
}
