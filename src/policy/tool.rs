//! A tool as the security team declares it (`tools:` in a policy file) and as the gateway runs
//! it: upstream URL template, method, timeout, argument schema and filters, compiled at load.

use std::borrow::Cow;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Map, Value};

use std::collections::HashMap;

use super::arguments::ArgumentSchema;
use super::history::Fact;
use crate::config::Problems;
use crate::config::yaml::{Document, KeyPath};

/// `tools.<name>` in a policy file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// Shown to agents (MCP `tools/list`) and in `explain`.
    #[serde(default)]
    pub description: String,
    pub upstream: UpstreamConfig,
    /// Call the tool under this AWS role: credentials from STS AssumeRole, request signed with
    /// SigV4.
    #[serde(default)]
    pub aws_role: Option<AwsRoleConfig>,
    /// JSON Schema for the arguments object. Without one, any JSON object is accepted.
    #[serde(default)]
    pub arguments: Option<Value>,
    #[serde(default)]
    pub filters: FilterRefs,
    /// Facts about earlier calls that this tool's rules use (`context.history.<name>`).
    #[serde(default)]
    pub history: std::collections::BTreeMap<String, super::history::FactConfig>,
}

/// `tools.<name>.aws_role` as written.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsRoleConfig {
    /// `arn:aws:iam::<account>:role/<name>`.
    pub arn: String,
    /// The role's trust policy may require it (`sts:ExternalId`).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Credential lifetime, 900–43200 s (default 900).
    #[serde(default = "default_session_seconds")]
    pub session_seconds: u32,
    /// The SigV4 service the upstream expects: `execute-api` (API Gateway), `lambda` (function
    /// URLs), or any AWS service name.
    pub sign: String,
    /// Signing region (default: `aws.region`, else the SDK's region chain).
    #[serde(default)]
    pub region: Option<String>,
}

fn default_session_seconds() -> u32 {
    900
}

impl AwsRoleConfig {
    /// Problems with the values, as `(key, message)`.
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let parts: Vec<&str> = self.arn.split(':').collect();
        if parts.len() != 6 || parts[0] != "arn" || parts[2] != "iam" || !parts[5].starts_with("role/") {
            out.push((
                "arn",
                "must be an IAM role ARN: arn:aws:iam::<account>:role/<name>".to_owned(),
            ));
        }
        if !(900..=43_200).contains(&self.session_seconds) {
            out.push(("session_seconds", "must be between 900 and 43200".to_owned()));
        }
        if self.sign.is_empty()
            || !self
                .sign
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            out.push((
                "sign",
                "must be a SigV4 service name such as execute-api or lambda".to_owned(),
            ));
        }
        out
    }
}

/// `tools.<name>.upstream`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port/path/{placeholder}`; placeholders only in the path, filled from arguments.
    pub url: String,
    /// HTTP method (default POST).
    #[serde(default = "default_method")]
    #[schemars(schema_with = "http_method")]
    pub method: String,
    /// Overrides `limits.upstream_timeout_ms` for this tool.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Overrides `limits.upstream_idle_timeout_ms`: how long a kept-alive connection to the
    /// tool may sit idle and still be reused. Set it below the tool's own keep-alive timeout.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// Overrides `limits.max_response_bytes`: the largest answer relayed from this tool (and
    /// what a `budget: strict` agent reserves for it).
    #[serde(default)]
    pub max_response_bytes: Option<usize>,
    /// Fixed headers sent with every call (e.g. `X-Amz-Target` and `Content-Type` for an AWS
    /// JSON API; a `Content-Type` here replaces toolgate's `application/json`). Never
    /// `Authorization`, `Host`, hop-by-hop headers or what toolgate or SigV4 sets itself.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The methods a tool may be called with (what `check` accepts), for the schema.
fn http_method(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "HTTP method (default POST).",
        "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"],
    })
}

/// Whether a fixed upstream header may be configured.
pub fn is_settable_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !matches!(
        lower.as_str(),
        "authorization"
            | "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "cookie"
            | "x-request-id"
            | "traceparent"
            | "tracestate"
            | "user-agent"
            | "x-amz-date"
            | "x-amz-security-token"
            | "x-amz-content-sha256"
    ) && !lower.starts_with("x-toolgate-")
        && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
}

fn default_method() -> String {
    "POST".to_owned()
}

/// `tools.<name>.filters`: names from the `filters:` section.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterRefs {
    #[serde(default)]
    pub input: Vec<String>,
    #[serde(default)]
    pub output: Vec<String>,
}

/// The upstream HTTP method. Arguments travel as a JSON body for methods with a body, and as a
/// query string (scalars; other values JSON-encoded) for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    pub fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }

    pub fn as_http(self) -> http::Method {
        match self {
            Method::Get => http::Method::GET,
            Method::Post => http::Method::POST,
            Method::Put => http::Method::PUT,
            Method::Patch => http::Method::PATCH,
            Method::Delete => http::Method::DELETE,
        }
    }
}

/// Characters left as they are in a path segment: RFC 3986 unreserved. Everything else, `/`, `?`,
/// `#`, `%` and `.` included, is percent-encoded, so a value can never add a segment or a query.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(String),
}

/// An upstream URL with `{name}` placeholders in its path.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    parts: Vec<Part>,
    origin: Origin,
}

/// A tool URL's scheme, host and port, parsed once at load: every forwarded call's URI and
/// `Host` header are made from it without parsing it again.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The authority without the scheme's default port, as the `Host` header.
    pub host: http::HeaderValue,
}

impl Origin {
    /// `http://` or `https://`: what a filled URL starts with, before the authority.
    pub fn prefix(&self) -> &'static str {
        if self.scheme == http::uri::Scheme::HTTPS {
            "https://"
        } else {
            "http://"
        }
    }
}

impl UrlTemplate {
    /// Parses and checks a template: `http://` or `https://`, a host, placeholders only in the
    /// path.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
            (http::uri::Scheme::HTTP, rest, ":80")
        } else if let Some(rest) = url.strip_prefix("https://") {
            (http::uri::Scheme::HTTPS, rest, ":443")
        } else {
            return Err("must start with http:// or https://".to_owned());
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if authority.is_empty() || authority.contains(['{', '}', '@']) {
            return Err("must name a host (no placeholders or user info in the host)".to_owned());
        }
        let invalid = || format!("`{authority}` is not a valid host[:port]");
        let parsed: http::uri::Authority = authority.parse().map_err(|_| invalid())?;
        // `http` accepts any text after the colon; only a number is a port (IPv6 in brackets).
        let after_host = authority.rsplit(']').next().unwrap_or(authority);
        if after_host.contains(':') && parsed.port().is_none() {
            return Err(invalid());
        }
        let origin = Origin {
            scheme,
            authority: parsed,
            host: http::HeaderValue::from_str(authority.strip_suffix(default_port).unwrap_or(authority))
                .map_err(|_| invalid())?,
        };
        if url.contains('#') {
            return Err("must not have a fragment".to_owned());
        }
        let query_start = url.find('?').unwrap_or(url.len());
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = url.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' => {
                    if i > query_start {
                        return Err("placeholders are allowed only in the path".to_owned());
                    }
                    let close = url[i..].find('}').ok_or("has an unclosed `{`")? + i;
                    let name = &url[i + 1..close];
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(format!("placeholder `{{{name}}}` must be a plain argument name"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(name.to_owned()));
                    while chars.peek().is_some_and(|(j, _)| *j <= close) {
                        chars.next();
                    }
                }
                '}' => return Err("has a `}` without `{`".to_owned()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts, origin })
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The argument names the template needs.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The URL with placeholders filled, each value percent-encoded as one path segment.
    pub fn fill(&self, args: &Map<String, Value>) -> Result<Cow<'_, str>, String> {
        // A URL without placeholders (most tools) is the same for every call.
        if let [Part::Literal(url)] = self.parts.as_slice() {
            return Ok(Cow::Borrowed(url));
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Placeholder(name) => {
                    let value = match args.get(name) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                        Some(_) => return Err(format!("Argument '/{name}' must be a string or an integer.")),
                        None => return Err(format!("Missing required argument '/{name}'.")),
                    };
                    // A segment that is empty or a dot segment would change the path's shape once
                    // the upstream normalises it, whatever its encoding.
                    if value.is_empty() || value == "." || value == ".." {
                        return Err(format!("Argument '/{name}' must not be empty, '.' or '..'."));
                    }
                    out.extend(utf8_percent_encode(&value, SEGMENT));
                }
            }
        }
        Ok(Cow::Owned(out))
    }
}

/// A compiled tool.
#[derive(Debug)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub target: Target,
    pub timeout: Option<Duration>,
    /// How long an idle kept-alive connection to it may be reused (default: the limits').
    pub idle_timeout: Option<Duration>,
    /// Its largest answer (default: the limits').
    pub max_response_bytes: Option<usize>,
    /// Fixed headers for every call.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The AWS role calls run under.
    pub aws_role: Option<AwsRoleConfig>,
    pub schema: Option<ArgumentSchema>,
    /// The schema as written, for `tools/list` and `explain`.
    pub schema_source: Option<Value>,
    pub input_filters: Vec<usize>,
    pub output_filters: Vec<usize>,
    /// Facts about earlier calls, computed for this tool's rules.
    pub facts: Vec<super::history::Fact>,
    /// Whether its calls are decided in their agent's history turn: history records them, or
    /// its rules read history facts. Set once the whole policy is known.
    pub touches_history: bool,
    /// An upstream MCP tool whose definition differs from the one pinned: hidden from
    /// `tools/list` and refused (`tool_changed`) until an admin approves the new definition.
    pub changed: bool,
    /// An upstream MCP tool new on its server and not yet approved: only agents whose
    /// allowlist names it exactly may see and call it.
    pub unreviewed: bool,
}

/// Where an allowed call goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An HTTP tool: the URL template and method from `upstream:`.
    Http { url: UrlTemplate, method: Method },
    /// A tool of an upstream MCP server (`mcp_servers:`), called with `tools/call`.
    Mcp { server: String, tool: String },
}

impl Target {
    /// For summaries: the HTTP method, or `MCP`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Http { method, .. } => method.as_str(),
            Target::Mcp { .. } => "MCP",
        }
    }
}

/// `mcp_servers.<name>` in a policy file: an upstream MCP server whose tools are exposed as
/// `<name>.<tool>`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// Its Streamable HTTP endpoint, `http://host:port/mcp`.
    pub url: String,
    #[serde(default)]
    pub description: String,
    /// Per call (default `limits.upstream_timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Filters for every tool of this server (input: arguments; output: results).
    #[serde(default)]
    pub filters: FilterRefs,
    /// Call the server under this AWS role, every request SigV4-signed (as for HTTP tools).
    #[serde(default)]
    pub aws_role: Option<AwsRoleConfig>,
    /// Tools the server starts listing after toolgate first listed it: `review` (default: held
    /// until an operator approves them, callable meanwhile only by agents that name them
    /// exactly) or `allow` (pinned as first seen, callable through glob grants at once).
    #[serde(default)]
    pub new_tools: NewTools,
}

/// What becomes of a tool an upstream MCP server adds after toolgate first listed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NewTools {
    #[default]
    Review,
    Allow,
}

/// A compiled upstream MCP server.
#[derive(Debug, Clone)]
pub struct McpServer {
    pub name: String,
    pub url: String,
    pub timeout: Option<Duration>,
    pub input_filters: Vec<usize>,
    pub output_filters: Vec<usize>,
    pub aws_role: Option<AwsRoleConfig>,
    pub new_tools: NewTools,
}

/// A tool an upstream MCP server listed, as the gateway discovered it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredTool {
    pub server: String,
    /// The upstream's own name for it (the exposed name is `<server>.<tool>`).
    pub tool: String,
    pub description: String,
    pub input_schema: Value,
    /// Blocked until an operator approves it: the definition differs from the pinned one, or
    /// was flagged when first seen (see [`DiscoveredTool::suspicious`]).
    pub changed: bool,
    /// New on its server since toolgate first listed it, and not yet approved: callable only
    /// by agents whose allowlist names it exactly (see [`NewTools`]).
    pub unreviewed: bool,
    /// What [`DiscoveredTool::suspicious`] found when it was first seen (it is held then).
    pub findings: Vec<String>,
}

impl DiscoveredTool {
    pub fn exposed_name(&self) -> String {
        format!("{}.{}", self.server, self.tool)
    }

    /// What in the definition looks like instructions hidden from the people who approve it:
    /// characters that render as nothing (zero-width, bidi controls, tag characters), and text
    /// addressed to the model rather than describing the tool (`ignore previous
    /// instructions`...), in the description or any string of the input schema. Empty: none.
    pub fn suspicious(&self) -> Vec<&'static str> {
        let mut texts = vec![self.description.as_str()];
        let mut stack = vec![&self.input_schema];
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) => texts.push(s),
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => {
                    texts.extend(map.keys().map(String::as_str));
                    stack.extend(map.values());
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        if texts.iter().any(|t| super::content::has_invisible(t)) {
            found.push("invisible characters");
        }
        if texts
            .iter()
            .any(|t| super::content::INSTRUCTION_TERMS.scan(t).is_some())
        {
            found.push("instructions addressed to the model");
        }
        found
    }

    /// SHA-256 over name, description and input schema (canonical): the pinned identity.
    pub fn definition_sha256(&self) -> String {
        let mut def = Map::new();
        def.insert("name".into(), Value::from(self.tool.clone()));
        def.insert("description".into(), Value::from(self.description.clone()));
        def.insert("inputSchema".into(), self.input_schema.clone());
        super::arguments::sha256_hex(&super::arguments::canonical(&def))
    }
}

/// `tools.<name>`, compiled: every problem with its place, `None` if there was one.
pub(super) fn compile_tool(
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
    if c.upstream.idle_timeout_ms == Some(0) {
        problems.push(doc.problem(&up.key("idle_timeout_ms"), "must be greater than 0"));
    }
    if c.upstream.max_response_bytes == Some(0) {
        problems.push(doc.problem(&up.key("max_response_bytes"), "must be greater than 0"));
    }
    if let Some(role) = &c.aws_role {
        for (key, msg) in role.check() {
            problems.push(doc.problem(&path.key("aws_role").key(key), msg));
        }
    }
    let mut headers = Vec::new();
    for (name, value) in &c.upstream.headers {
        let at = up.key("headers").key(name);
        if !is_settable_header(name) {
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
        idle_timeout: c.upstream.idle_timeout_ms.map(std::time::Duration::from_millis),
        max_response_bytes: c.upstream.max_response_bytes,
        schema,
        schema_source: c.arguments,
        input_filters,
        output_filters,
        facts,
        touches_history: false,
        changed: false,
        unreviewed: false,
    })
}

/// A tool's (or MCP server's) `filters:` names, as indexes into the compiled filters; a name
/// that is not defined is a problem at its place.
pub(super) fn resolve_filters(
    refs: &FilterRefs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fill(t: &str, args: Value) -> Result<String, String> {
        UrlTemplate::parse(t)
            .unwrap()
            .fill(args.as_object().unwrap())
            .map(Cow::into_owned)
    }

    #[test]
    fn fills_placeholders_as_single_encoded_segments() {
        let t = "http://127.0.0.1:9001/refunds/{order_id}/x";
        assert_eq!(
            fill(t, json!({"order_id": "O-17"})).unwrap(),
            "http://127.0.0.1:9001/refunds/O-17/x"
        );
        assert_eq!(
            fill(t, json!({"order_id": 17})).unwrap(),
            "http://127.0.0.1:9001/refunds/17/x"
        );
        assert_eq!(
            fill(t, json!({"order_id": "../admin?x=1#f"})).unwrap(),
            "http://127.0.0.1:9001/refunds/%2E%2E%2Fadmin%3Fx%3D1%23f/x"
        );
        assert_eq!(
            fill(t, json!({"order_id": "a b%2F"})).unwrap(),
            "http://127.0.0.1:9001/refunds/a%20b%252F/x"
        );
    }

    #[test]
    fn refuses_dot_segments_empty_values_and_non_scalars() {
        let t = "http://h/r/{id}";
        for bad in [
            json!({"id": ".."}),
            json!({"id": "."}),
            json!({"id": ""}),
            json!({"id": {"a": 1}}),
            json!({"id": true}),
            json!({}),
        ] {
            assert!(fill(t, bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_templates_that_could_move_the_host() {
        for bad in [
            "http://{host}/x",
            "ftp://h/x",
            "http:///x",
            "http://h/x?q={v}",
            "http://h/{a",
            "http://u@h/x",
            "http://h/{a-b}",
            "http://exa mple/x",
            "http://h:port/x",
        ] {
            assert!(UrlTemplate::parse(bad).is_err(), "{bad}");
        }
        let t = UrlTemplate::parse("http://h:1/a/{x}/b/{y}?q=1").unwrap();
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(t.origin().authority.as_str(), "h:1");
        assert_eq!(t.origin().host, "h:1");
        assert_eq!(UrlTemplate::parse("http://h:80/x").unwrap().origin().host, "h");
        let tls = UrlTemplate::parse("https://h:443/x/{id}").unwrap();
        assert_eq!(tls.origin().host, "h");
        assert_eq!(tls.origin().prefix(), "https://");
        assert_eq!(UrlTemplate::parse("https://h:8443/x").unwrap().origin().host, "h:8443");
        assert_eq!(UrlTemplate::parse("https://h:80/x").unwrap().origin().host, "h:80");
        assert!(UrlTemplate::parse("ftp://h/x").is_err());
    }

    #[test]
    fn role_config_is_checked() {
        let c = AwsRoleConfig {
            arn: "arn:aws:iam::123456789012:role/refunds".into(),
            external_id: None,
            session_seconds: 900,
            sign: "execute-api".into(),
            region: None,
        };
        assert!(c.check().is_empty());
        let bad = AwsRoleConfig {
            arn: "arn:aws:iam::123:user/x".into(),
            session_seconds: 60,
            sign: "Execute API".into(),
            ..c
        };
        assert_eq!(bad.check().len(), 3);
    }
}
