//! Policy files compiled into a [`Policy`]: YAML files decoded entry by entry (one mistake hides
//! no other), each section compiled in the order its references need — filters, tools, MCP
//! servers and what they discovered, auth, agents, anomaly, history, rules — and every problem
//! collected with its `FILE:LINE:COL` before the compile fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::allowlist::{Allowlist, ToolPattern, is_valid_tool_name};
use super::arguments::ArgumentSchema;
use super::content::{Filter, FilterConfig};
use super::identity::{Authenticator, JwtConfig, JwtVerifier, parse_key_digest};
use super::jwks::KeySource;
use super::limits::AnomalyConfig;
use super::rules::Rules;
use super::tool::{
    DiscoveredTool, McpServer, McpServerConfig, Target, Tool, ToolConfig, UrlTemplate, compile_tool, resolve_filters,
};
use super::{Agent, AgentConfig, Policy, is_policy_file};
use crate::FastMap;
use crate::config::yaml::{Document, KeyPath};
use crate::config::{ConfigError, Problem, Problems};

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

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AuthConfig {
    #[serde(default)]
    jwt: Option<JwtConfig>,
}

/// A toolgate policy file: agents, tools, content filters, identity-provider settings,
/// anomaly detection and upstream MCP servers. Rules are separate `.cedar` files.
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // described, never built
struct PolicyFileSchema {
    /// Agents by id: who they are (credentials), what they may call, their limits.
    #[serde(default)]
    agents: BTreeMap<String, AgentConfig>,
    /// Tools by name: where each lives, its arguments' JSON Schema, its filters.
    #[serde(default)]
    tools: BTreeMap<String, ToolConfig>,
    /// Content filters by name.
    #[serde(default)]
    filters: BTreeMap<String, FilterConfig>,
    #[serde(default)]
    auth: Option<AuthConfig>,
    #[serde(default)]
    anomaly: Option<AnomalyConfig>,
    /// Upstream MCP servers by name.
    #[serde(default)]
    mcp_servers: BTreeMap<String, McpServerConfig>,
}

/// The JSON Schema of a policy file (YAML), for editors and CI.
pub fn policy_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(PolicyFileSchema)).expect("a schema is JSON");
    schema["title"] = "toolgate policy file".into();
    schema
}

/// The decoded files, in order.
type RawFiles<'d> = [(&'d Document, PolicyFileRaw)];

/// What a compile has found wrong so far, and where each name was first defined (a second
/// definition is a problem at its own place, naming the first).
#[derive(Default)]
struct Checks {
    problems: Problems,
    seen: HashMap<(&'static str, String), Problem>,
}

impl Checks {
    fn push(&mut self, p: Problem) {
        self.problems.push(p);
    }

    /// Whether `name` is defined here first in its `section`; if not, the problem is noted.
    fn first_definition(&mut self, section: &'static str, name: &str, doc: &Document, path: &KeyPath) -> bool {
        if let Some(prev) = self.seen.get(&(section, name.to_owned())) {
            let message = format!(
                "`{name}` is already defined at {}:{}:{}",
                prev.file, prev.line, prev.col
            );
            self.problems.push(doc.problem(path, message));
            return false;
        }
        self.seen.insert((section, name.to_owned()), doc.problem(path, ""));
        true
    }
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
        let mut checks = Checks::default();
        let mut hasher = Sha256::new();
        let (docs, rule_sources) = parse_sources(sources, &mut hasher, &mut checks);
        let mut raw_files = Vec::new();
        for doc in &docs {
            match doc.decode::<PolicyFileRaw>(&KeyPath::root(), &doc.value) {
                Ok(raw) => raw_files.push((doc, raw)),
                Err(p) => checks.push(p),
            }
        }
        // Filters and tools first: agents and tools refer to them.
        let (filter_index, filters) = compile_filters(&raw_files, &mut checks);
        // Every tool name written down, compiled or not, so a broken tool is reported once and
        // not again as "no tool named" wherever an allowlist mentions it.
        let defined_tools: HashSet<&str> = raw_files
            .iter()
            .flat_map(|(_, raw)| raw.tools.keys().map(String::as_str))
            .collect();
        let mut tools = compile_tools(&raw_files, &filter_index, &mut checks);
        let mcp_servers = compile_mcp_servers(&raw_files, &filter_index, &defined_tools, &mut checks);
        add_discovered(&mut tools, &mcp_servers, discovered, &mut hasher);
        let (jwt, jwks_file) = compile_auth(&raw_files, &read, &mut hasher, &mut checks);
        let mut auth = Authenticator::new(jwt);
        let agents = compile_agents(&raw_files, &defined_tools, &mut auth, &mut checks);
        let anomaly = compile_anomaly(&raw_files, &mut checks);
        let (recorded, history_retention) = check_history(&tools, &raw_files, &mut checks);
        for (name, tool) in tools.iter_mut() {
            tool.touches_history = !tool.facts.is_empty() || recorded.contains_key(name);
        }
        // Rules are validated against the tools as compiled; with broken tools they would only
        // report knock-on errors, so they wait for a clean pass.
        let rules = if checks.problems.is_empty() {
            let mut found = Vec::new();
            let rules = Rules::compile(&rule_sources, &tools, &agents, &mut found);
            found.into_iter().for_each(|p| checks.push(p));
            rules
        } else {
            Rules::empty()
        };
        let digest = hex::encode(hasher.finalize());
        checks.problems.finish(Policy {
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
}

/// Every source hashed into the version; YAML files parsed, Cedar files set aside for the rules.
fn parse_sources(
    sources: &[(String, String)],
    hasher: &mut Sha256,
    checks: &mut Checks,
) -> (Vec<Document>, Vec<(String, String)>) {
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
            Err(e) => checks.problems.extend(e),
        }
    }
    (docs, rule_sources)
}

/// `filters:`, compiled, and each name's index.
fn compile_filters(raw_files: &RawFiles<'_>, checks: &mut Checks) -> (HashMap<String, usize>, Vec<Filter>) {
    let mut filter_index: HashMap<String, usize> = HashMap::new();
    let mut filters = Vec::new();
    for (doc, raw) in raw_files {
        for (name, value) in &raw.filters {
            let path = KeyPath::root().key("filters").key(name);
            if !checks.first_definition("filters", name, doc, &path) {
                continue;
            }
            let Ok(config) = doc.decode::<FilterConfig>(&path, value).map_err(|p| checks.push(p)) else {
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
                        checks.push(doc.problem(&at, msg));
                    }
                }
            }
        }
    }
    (filter_index, filters)
}

/// `tools:`, compiled.
fn compile_tools(
    raw_files: &RawFiles<'_>,
    filter_index: &HashMap<String, usize>,
    checks: &mut Checks,
) -> BTreeMap<String, Tool> {
    let mut tools = BTreeMap::new();
    for (doc, raw) in raw_files {
        for (name, value) in &raw.tools {
            let path = KeyPath::root().key("tools").key(name);
            if !is_valid_tool_name(name) {
                checks.push(doc.problem(&path, "tool names must match ^[A-Za-z0-9_.-]{1,128}$"));
                continue;
            }
            if !checks.first_definition("tools", name, doc, &path) {
                continue;
            }
            match doc.decode::<ToolConfig>(&path, value) {
                Ok(config) => {
                    if let Some(tool) = compile_tool(name, config, doc, &path, filter_index, &mut checks.problems) {
                        tools.insert(name.clone(), tool);
                    }
                }
                Err(p) => checks.push(p),
            }
        }
    }
    tools
}

/// `mcp_servers:`, compiled. Their tools come later, from discovery.
fn compile_mcp_servers(
    raw_files: &RawFiles<'_>,
    filter_index: &HashMap<String, usize>,
    defined_tools: &HashSet<&str>,
    checks: &mut Checks,
) -> BTreeMap<String, McpServer> {
    let mut mcp_servers = BTreeMap::new();
    for (doc, raw) in raw_files {
        for (name, value) in &raw.mcp_servers {
            let path = KeyPath::root().key("mcp_servers").key(name);
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                checks.push(doc.problem(
                    &path,
                    "MCP server names are 1 to 64 letters, digits, `_` or `-` (its tools are `<name>.<tool>`)",
                ));
                continue;
            }
            if !checks.first_definition("mcp_servers", name, doc, &path) {
                continue;
            }
            let Ok(c) = doc.decode::<McpServerConfig>(&path, value).map_err(|p| checks.push(p)) else {
                continue;
            };
            if let Err(e) = UrlTemplate::parse(&c.url).and_then(|t| match t.placeholders().next() {
                Some(_) => Err("must not have placeholders".to_owned()),
                None => Ok(()),
            }) {
                checks.push(doc.problem(&path.key("url"), e));
            }
            if c.timeout_ms == Some(0) {
                checks.push(doc.problem(&path.key("timeout_ms"), "must be greater than 0"));
            }
            if let Some(role) = &c.aws_role {
                for (key, msg) in role.check() {
                    checks.push(doc.problem(&path.key("aws_role").key(key), msg));
                }
            }
            let prefix = format!("{name}.");
            for tool in defined_tools.iter().filter(|t| t.starts_with(&prefix)) {
                checks.push(doc.problem(&path, format!("the tool `{tool}` is also defined in `tools:`; names under `{prefix}` belong to this MCP server")));
            }
            let (input_filters, output_filters) =
                resolve_filters(&c.filters, filter_index, doc, &path, &mut checks.problems);
            mcp_servers.insert(
                name.clone(),
                McpServer {
                    name: name.clone(),
                    url: c.url,
                    timeout: c.timeout_ms.map(Duration::from_millis),
                    input_filters,
                    output_filters,
                    aws_role: c.aws_role,
                    new_tools: c.new_tools,
                },
            );
        }
    }
    mcp_servers
}

/// The tools upstream MCP servers listed, as tools of the policy (hashed into its version: a
/// decision records the catalog too). One the gateway cannot name or validate is not exposed.
fn add_discovered(
    tools: &mut BTreeMap<String, Tool>,
    mcp_servers: &BTreeMap<String, McpServer>,
    discovered: &[DiscoveredTool],
    hasher: &mut Sha256,
) {
    for d in discovered {
        let Some(server) = mcp_servers.get(&d.server) else {
            continue;
        };
        hasher.update(d.exposed_name().as_bytes());
        hasher.update(d.definition_sha256().as_bytes());
        hasher.update([u8::from(d.changed)]);
        let name = d.exposed_name();
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
                idle_timeout: None,
                max_response_bytes: None,
                headers: Vec::new(),
                aws_role: server.aws_role.clone(),
                schema: Some(schema),
                schema_source: Some(d.input_schema.clone()),
                input_filters: server.input_filters.clone(),
                output_filters: server.output_filters.clone(),
                facts: Vec::new(),
                touches_history: false,
                changed: d.changed,
                unreviewed: d.unreviewed,
            },
        );
    }
}

/// `auth:`: the JWT verifier and the JWKS file it was read from (hashed into the version).
fn compile_auth(
    raw_files: &RawFiles<'_>,
    read: &impl Fn(&Path) -> std::io::Result<String>,
    hasher: &mut Sha256,
    checks: &mut Checks,
) -> (Option<JwtVerifier>, Option<std::path::PathBuf>) {
    let (mut jwt, mut jwks_file) = (None, None);
    for (doc, raw) in raw_files {
        let Some(auth) = &raw.auth else { continue };
        let path = KeyPath::root().key("auth");
        if !checks.first_definition("auth", "auth", doc, &path) {
            continue;
        }
        let Ok(auth) = doc.decode::<AuthConfig>(&path, auth).map_err(|p| checks.push(p)) else {
            continue;
        };
        let Some(cfg) = auth.jwt else { continue };
        let at = path.key("jwt");
        if cfg.refresh_seconds == 0 || cfg.min_refetch_seconds == 0 || cfg.min_refetch_seconds > cfg.refresh_seconds {
            let why =
                "`refresh_seconds` and `min_refetch_seconds` must be greater than 0, and the second at most the first";
            checks.push(doc.problem(&at, why));
        }
        match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(_), Some(_)) => checks.push(doc.problem(&at, "give `jwks_file` or `jwks_url`, not both")),
            (Some(file), None) => {
                let at = at.key("jwks_file");
                jwks_file = Some(file.clone());
                match read(file) {
                    Ok(text) => {
                        hasher.update(text.as_bytes());
                        match JwtVerifier::new(&cfg, &text) {
                            Ok(v) => jwt = Some(v),
                            Err(e) => checks.push(doc.problem(&at, e)),
                        }
                    }
                    Err(e) => checks.push(doc.problem(&at, format!("cannot read {}: {e}", file.display()))),
                }
            }
            // Keys fetched over the network: only over https, where they cannot be swapped on
            // the way.
            (None, Some(url)) if !is_https_url(url) => {
                checks.push(doc.problem(&at.key("jwks_url"), "must be an https:// URL"))
            }
            (None, Some(url)) => jwt = Some(JwtVerifier::remote(&cfg, KeySource::Url(url.clone()))),
            (None, None) if !is_https_url(&cfg.issuer) => checks.push(doc.problem(
                &at.key("issuer"),
                "with neither `jwks_file` nor `jwks_url`, the keys are found by OpenID Connect discovery \
                 at the issuer, which must then be an https:// URL",
            )),
            (None, None) => {
                let issuer = cfg.issuer.clone();
                jwt = Some(JwtVerifier::remote(&cfg, KeySource::Discovery { issuer }));
            }
        }
    }
    (jwt, jwks_file)
}

/// `agents:`, compiled; their credentials registered with `auth`.
fn compile_agents(
    raw_files: &RawFiles<'_>,
    defined_tools: &HashSet<&str>,
    auth: &mut Authenticator,
    checks: &mut Checks,
) -> FastMap<String, Agent> {
    let mut agents = FastMap::default();
    for (doc, raw) in raw_files {
        for (id, value) in &raw.agents {
            let path = KeyPath::root().key("agents").key(id);
            if !is_valid_tool_name(id) {
                checks.push(doc.problem(&path, "agent ids must match ^[A-Za-z0-9_.-]{1,128}$"));
                continue;
            }
            if !checks.first_definition("agents", id, doc, &path) {
                continue;
            }
            let Ok(config) = doc.decode::<AgentConfig>(&path, value).map_err(|p| checks.push(p)) else {
                continue;
            };
            let agent_id: Arc<str> = id.as_str().into();
            let (patterns, shadow) = allowlist_of(&config, raw_files, defined_tools, doc, &path, checks);
            register_credentials(&config, &agent_id, auth, doc, &path, checks);
            agents.insert(
                id.clone(),
                Agent {
                    id: agent_id,
                    description: config.description,
                    allowlist: Allowlist::with_shadow(patterns, shadow),
                    limits: config.limits,
                    attributes: config.attributes,
                },
            );
        }
    }
    agents
}

/// An agent's `tools:` as patterns (an exact name must be a defined tool, or under an MCP
/// server), and its per-tool limits checked against them.
fn allowlist_of(
    config: &AgentConfig,
    raw_files: &RawFiles<'_>,
    defined_tools: &HashSet<&str>,
    doc: &Document,
    path: &KeyPath,
    checks: &mut Checks,
) -> (Vec<ToolPattern>, Vec<ToolPattern>) {
    let mut patterns = Vec::new();
    let mut shadow = Vec::new();
    for (i, grant) in config.tools.iter().enumerate() {
        let at = path.key("tools").index(i);
        let entry = grant.entry();
        match ToolPattern::parse(entry) {
            Ok(ToolPattern::Exact(name))
                if !defined_tools.contains(name.as_str())
                    && !raw_files
                        .iter()
                        .any(|(_, r)| r.mcp_servers.keys().any(|s| name.starts_with(&format!("{s}.")))) =>
            {
                checks.push(doc.problem(&at, format!("no tool named `{name}` is defined")));
            }
            Ok(p) if grant.shadow() => shadow.push(p),
            Ok(p) => patterns.push(p),
            Err(e) => checks.push(doc.problem(&at, e)),
        }
    }
    for tool in config.limits.tools.keys() {
        let at = path.key("limits").key("tools").key(tool);
        if !defined_tools.contains(tool.as_str()) {
            checks.push(doc.problem(&at, format!("no tool named `{tool}` is defined")));
        } else if !patterns.iter().chain(&shadow).any(|p| p.matches(tool)) {
            checks.push(doc.problem(&at, format!("`{tool}` is not on this agent's allowlist")));
        }
    }
    (patterns, shadow)
}

/// An agent's API key digests and JWT subject, each owned by one agent only.
fn register_credentials(
    config: &AgentConfig,
    agent_id: &Arc<str>,
    auth: &mut Authenticator,
    doc: &Document,
    path: &KeyPath,
    checks: &mut Checks,
) {
    let creds = path.key("credentials");
    for (i, digest) in config.credentials.api_key_sha256.iter().enumerate() {
        let at = creds.key("api_key_sha256").index(i);
        match parse_key_digest(digest) {
            Ok(d) => {
                if let Err(other) = auth.add_api_key(d, agent_id.clone()) {
                    checks.push(doc.problem(&at, format!("this key is already agent `{other}`'s")));
                }
            }
            Err(e) => checks.push(doc.problem(&at, e)),
        }
    }
    if let Some(sub) = &config.credentials.jwt_subject {
        let at = creds.key("jwt_subject");
        if !auth.has_jwt() {
            checks.push(doc.problem(&at, "needs `auth.jwt` in a policy file"));
        } else if let Err(other) = auth.add_jwt_subject(sub.clone(), agent_id.clone()) {
            checks.push(doc.problem(&at, format!("this subject is already agent `{other}`'s")));
        }
    }
    if let Some(id) = &config.credentials.spiffe_id {
        let at = creds.key("spiffe_id");
        if !is_spiffe_id(id) {
            checks.push(doc.problem(
                &at,
                "must be a SPIFFE ID: `spiffe://trust-domain/path` (lower-case trust domain, a path)",
            ));
        } else if let Err(other) = auth.add_spiffe_id(id.clone(), agent_id.clone()) {
            checks.push(doc.problem(&at, format!("this SPIFFE ID is already agent `{other}`'s")));
        }
    }
    if let Some(cn) = &config.credentials.certificate_cn {
        let at = creds.key("certificate_cn");
        if cn.trim().is_empty() || cn.trim() != cn {
            checks.push(doc.problem(&at, "must be a certificate's subject CN, without surrounding spaces"));
        } else if let Err(other) = auth.add_common_name(cn.clone(), agent_id.clone()) {
            checks.push(doc.problem(&at, format!("this certificate CN is already agent `{other}`'s")));
        }
    }
}

fn is_https_url(url: &str) -> bool {
    url.strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some()))
}

/// `spiffe://trust-domain/path`, as the SPIFFE ID standard spells it: a trust domain of
/// lower-case letters, digits, `.`, `-` and `_`, and a non-empty path with no empty, `.` or
/// `..` segment. (Certificates are matched exactly, so a malformed ID would match nothing.)
fn is_spiffe_id(id: &str) -> bool {
    let Some((domain, path)) = id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')) else {
        return false;
    };
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
    let path_ok = path.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    });
    domain_ok && path_ok
}

/// `anomaly:` (one file at most).
fn compile_anomaly(raw_files: &RawFiles<'_>, checks: &mut Checks) -> AnomalyConfig {
    let mut anomaly = AnomalyConfig::default();
    for (doc, raw) in raw_files {
        let Some(value) = &raw.anomaly else { continue };
        let path = KeyPath::root().key("anomaly");
        if !checks.first_definition("anomaly", "anomaly", doc, &path) {
            continue;
        }
        match doc.decode::<AnomalyConfig>(&path, value) {
            Ok(a) if a.window_seconds == 0 => {
                checks.push(doc.problem(&path.key("window_seconds"), "must be greater than 0"))
            }
            Ok(a) => anomaly = a,
            Err(p) => checks.push(p),
        }
    }
    anomaly
}

/// Checks what history facts refer to (the earlier tool exists; `match` names an argument of
/// each side, required on this side so a call cannot dodge the match by leaving it out), and
/// derives what history must record and for how long.
fn check_history(
    tools: &BTreeMap<String, Tool>,
    raw_files: &RawFiles<'_>,
    checks: &mut Checks,
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
                checks.push(doc.problem(&at.key("tool"), format!("no tool named `{}` is defined", fact.tool)));
                continue;
            };
            let mut ok = true;
            for (theirs, ours) in &fact.matches {
                let m = at.key("match").key(theirs);
                if !properties(earlier).iter().any(|p| p == &**theirs) {
                    checks.push(doc.problem(&m, format!("`{}` has no argument `{theirs}`", fact.tool)));
                    ok = false;
                }
                if !required(tool).iter().any(|p| p == ours) {
                    checks.push(doc.problem(
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

#[cfg(test)]
mod tests {
    use super::is_spiffe_id;

    #[test]
    fn spiffe_ids_are_checked_as_the_standard_spells_them() {
        for ok in ["spiffe://example.org/ns/agents/sa/bot", "spiffe://prod-1.example_org/a"] {
            assert!(is_spiffe_id(ok), "{ok}");
        }
        for bad in [
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/a",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "https://example.org/a",
            "spiffe:///a",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
    }
}
