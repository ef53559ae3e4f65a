//! `admin:`: the admin plane's listener and who may use it. Each caller is a named person or
//! service with roles — `operator` (reload, quarantine, release, tool approvals, audit
//! rotation), `approver` (decides held calls of named approval groups), `auditor` (reads) —
//! authenticated by a personal token (its SHA-256 here), an OIDC JWT (its groups claim), or
//! the identity headers of an auth proxy in front of the admin plane (only from that proxy's
//! addresses). The shared `token_env` token keeps working as an operator in every group, so
//! setups from before identities do not break; `check` says so.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Problems;
use super::tls::TlsConfig;
use super::yaml::{Document, KeyPath};

/// The admin plane: health, metrics, reload, approvals, the inbox page. Never served on the
/// data-plane port.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin plane listens (default `127.0.0.1:9090`).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Environment variable holding the shared admin token (default `TOOLGATE_ADMIN_TOKEN`): an
    /// operator in every approval group, named `admin-token` in the audit trail.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Alternatively, a file holding the token (first line). The environment variable wins.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// TLS on the admin plane (default none: plain HTTP, on loopback only unless `allow_plaintext`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Plain HTTP on an admin address other than loopback.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// People and services with personal tokens.
    #[serde(default)]
    pub people: Vec<Person>,
    /// Admin callers signed in by the organisation's identity provider (bearer JWTs).
    #[serde(default)]
    pub oidc: Option<AdminOidc>,
    /// An authenticating proxy (oauth2-proxy style) in front of the admin plane.
    #[serde(default)]
    pub auth_proxy: Option<AuthProxy>,
    /// For OIDC and proxy identities: which of their groups make them operators or auditors.
    /// Their other groups are approval groups (`@approval("billing-leads")`).
    #[serde(default)]
    pub roles: RoleGroups,
    /// How long a sign-in on the inbox page lasts (default 28800: eight hours).
    #[serde(default = "default_session_seconds")]
    pub session_seconds: u64,
    /// The admin plane's address as people reach it (e.g. `https://toolgate-admin.example.com`):
    /// links to the inbox in notifications.
    #[serde(default)]
    pub public_url: Option<String>,
}

fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:9090".parse().unwrap()
}
fn default_token_env() -> String {
    "TOOLGATE_ADMIN_TOKEN".to_owned()
}
fn default_session_seconds() -> u64 {
    8 * 3600
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_env: default_token_env(),
            token_file: None,
            tls: None,
            allow_plaintext: false,
            people: Vec::new(),
            oidc: None,
            auth_proxy: None,
            roles: RoleGroups::default(),
            session_seconds: default_session_seconds(),
            public_url: None,
        }
    }
}

/// What an admin caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reload, quarantine and release agents, approve upstream tools, rotate the audit file.
    Operator,
    /// Decide held calls of their `approver_groups`.
    Approver,
    /// Read policy, agents, approvals, replicas; change nothing.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
        }
    }
}

/// `admin.people[]`: one person or service with a personal token.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Person {
    /// Recorded as `by` in the audit trail (e.g. an email address).
    pub name: String,
    /// SHA-256 of the token, 64 hex digits (`printf %s TOKEN | sha256sum`): the token itself is
    /// never in the config.
    pub token_sha256: String,
    pub roles: Vec<Role>,
    /// With the `approver` role: the approval groups this person decides for.
    #[serde(default)]
    pub approver_groups: Vec<String>,
}

/// `admin.oidc`: bearer JWTs from the identity provider.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminOidc {
    /// Required `iss`; with no `jwks_url`, keys are found by OpenID Connect discovery.
    pub issuer: String,
    /// Required `aud` (the admin plane's client id).
    pub audience: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The claim naming the person (default `email`; `sub` when the token has no `email`).
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// The claim listing their groups (default `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
}

fn default_name_claim() -> String {
    "email".to_owned()
}
fn default_groups_claim() -> String {
    "groups".to_owned()
}

/// `admin.auth_proxy`: identity headers set by a proxy that authenticated the person.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthProxy {
    /// Addresses or CIDR blocks of the proxy: the headers of anyone else are ignored.
    pub trusted_proxies: Vec<String>,
    /// The header naming the person (default `X-Forwarded-Email`).
    #[serde(default = "default_user_header")]
    pub user_header: String,
    /// The header listing their groups, comma-separated (default `X-Forwarded-Groups`).
    #[serde(default = "default_groups_header")]
    pub groups_header: String,
}

fn default_user_header() -> String {
    "X-Forwarded-Email".to_owned()
}
fn default_groups_header() -> String {
    "X-Forwarded-Groups".to_owned()
}

/// `admin.roles`: identity-provider groups that give a role.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleGroups {
    #[serde(default)]
    pub operator: Vec<String>,
    #[serde(default)]
    pub auditor: Vec<String>,
}

impl AdminConfig {
    /// The shared admin token, if one is configured.
    pub fn token(&self) -> Option<String> {
        if let Ok(t) = std::env::var(&self.token_env) {
            let t = t.trim().to_owned();
            if !t.is_empty() {
                return Some(t);
            }
        }
        let file = self.token_file.as_ref()?;
        let text = std::fs::read_to_string(file).ok()?;
        let t = text.lines().next()?.trim().to_owned();
        (!t.is_empty()).then_some(t)
    }

    /// The auth proxy's addresses, parsed (validated at load).
    pub fn proxy_addresses(&self) -> Vec<ipnet::IpNet> {
        let Some(p) = &self.auth_proxy else { return Vec::new() };
        p.trusted_proxies.iter().filter_map(|t| parse_net(t)).collect()
    }

    /// What `check` says about a valid admin section.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.token().is_some() {
            out.push(format!(
                "admin: the shared token (`{}`) acts as an operator in every approval group, named `admin-token` in the audit trail; give people their own tokens (`admin.people`) or sign-in (`admin.oidc`, `admin.auth_proxy`) so decisions name who made them",
                self.token_env
            ));
        }
        out
    }

    pub(super) fn check(&self, doc: &Document, problems: &mut Problems) {
        let at = KeyPath::root().key("admin");
        if self.token_env.is_empty() {
            problems.push(doc.problem(&at.key("token_env"), "must name an environment variable"));
        }
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        for (i, p) in self.people.iter().enumerate() {
            let here = at.key("people").index(i);
            if p.name.trim().is_empty() || p.name.len() > 128 || p.name.chars().any(char::is_control) {
                problems.push(doc.problem(&here.key("name"), "must be 1 to 128 printable characters"));
            } else if p.name == "admin-token" || !names.insert(p.name.as_str()) {
                problems.push(doc.problem(
                    &here.key("name"),
                    format!("`{}` is already taken: every person needs their own name", p.name),
                ));
            }
            match crate::policy::identity::parse_key_digest(&p.token_sha256) {
                Ok(d) if !digests.insert(d) => {
                    problems.push(doc.problem(&here.key("token_sha256"), "is another person's token"));
                }
                Ok(_) => {}
                Err(e) => problems.push(doc.problem(&here.key("token_sha256"), e)),
            }
            if p.roles.is_empty() {
                problems.push(doc.problem(
                    &here.key("roles"),
                    "needs at least one role: operator, approver or auditor",
                ));
            }
            let approver = p.roles.contains(&Role::Approver);
            if approver && p.approver_groups.is_empty() {
                problems.push(doc.problem(
                    &here.key("approver_groups"),
                    "an approver needs the approval groups they decide for (the groups rules name in @approval)",
                ));
            }
            if !approver && !p.approver_groups.is_empty() {
                problems.push(doc.problem(&here.key("approver_groups"), "needs the `approver` role"));
            }
            for (j, g) in p.approver_groups.iter().enumerate() {
                if g.trim().is_empty() || g.contains(',') || g.trim() != g {
                    problems.push(doc.problem(
                        &here.key("approver_groups").index(j),
                        "must be a group name without commas or surrounding spaces",
                    ));
                }
            }
        }
        if let Some(o) = &self.oidc {
            let here = at.key("oidc");
            let url = o.jwks_url.as_deref().unwrap_or(&o.issuer);
            if !url.starts_with("https://") {
                let key = if o.jwks_url.is_some() { "jwks_url" } else { "issuer" };
                problems.push(doc.problem(
                    &here.key(key),
                    "must be an https:// URL: keys are fetched over TLS only",
                ));
            }
            if o.audience.is_empty() {
                problems.push(doc.problem(&here.key("audience"), "must not be empty"));
            }
        }
        if let Some(p) = &self.auth_proxy {
            let here = at.key("auth_proxy");
            if p.trusted_proxies.is_empty() {
                problems.push(doc.problem(
                    &here.key("trusted_proxies"),
                    "must name the proxy's addresses: identity headers from anyone else are ignored",
                ));
            }
            for (i, t) in p.trusted_proxies.iter().enumerate() {
                if parse_net(t).is_none() {
                    problems.push(doc.problem(
                        &here.key("trusted_proxies").index(i),
                        "must be an IP address or a CIDR block",
                    ));
                }
            }
            for (key, h) in [("user_header", &p.user_header), ("groups_header", &p.groups_header)] {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    problems.push(doc.problem(&here.key(key), "must be a valid header name"));
                }
            }
        }
        if self.session_seconds == 0 || self.session_seconds > 7 * 24 * 3600 {
            problems.push(doc.problem(&at.key("session_seconds"), "must be between 1 and 604800 (a week)"));
        }
        if let Some(u) = &self.public_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            problems.push(doc.problem(&at.key("public_url"), "must be an http:// or https:// URL"));
        }
    }
}

pub(super) fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .ok()
        .map(|n| n.trunc())
}
