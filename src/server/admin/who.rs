//! Who is calling the admin plane: a named person or service with roles, from a personal
//! token, the shared admin token, an OIDC JWT, or an auth proxy's identity headers (only from
//! that proxy's addresses; from anyone else the headers are ignored). Tokens are looked up by
//! their SHA-256 and compared in constant time, as agents' keys are.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::approval::Approver;
use crate::audit::By;
use crate::config::Role;
use crate::config::admin::{AdminConfig, AdminOidc, Person, RoleGroups};
use crate::policy::identity::{JwtConfig, JwtVerifier};
use crate::policy::jwks::KeySource;

/// The name the shared `token_env` token acts under in the audit trail.
pub const SHARED_TOKEN_NAME: &str = "admin-token";

/// An authenticated admin caller.
#[derive(Debug, Clone)]
pub struct Admin {
    pub name: String,
    pub roles: Vec<Role>,
    /// The approval groups they decide for; `None`: every group (the shared token).
    pub groups: Option<Vec<String>>,
    /// `token`, `admin_token`, `oidc`, `proxy` (and `session` once signed in on the page).
    pub via: &'static str,
    /// SHA-256 of the token they presented, if they presented one (an admin token that is also
    /// an agent's key must not approve that agent's calls).
    pub credential: Option<[u8; 32]>,
}

impl Admin {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Who acted, in `role`, for the audit trail.
    pub fn by(&self, role: Role) -> By<'_> {
        By {
            name: &self.name,
            role: Some(role.as_str()),
            via: Some(self.via),
        }
    }

    /// As an approver: their groups if they hold the approver role, else none.
    pub fn approver(&self) -> Approver {
        Approver {
            name: self.name.clone(),
            groups: if self.has(Role::Approver) {
                self.groups.clone()
            } else {
                Some(Vec::new())
            },
        }
    }

    /// The roles, comma-separated, for the page.
    pub fn roles_text(&self) -> String {
        self.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Why an admin caller was not authenticated: the message says what to send.
#[derive(Debug)]
pub enum NotAuthenticated {
    /// No credential, or one that is not valid.
    Missing(&'static str),
    /// The identity provider's keys could not be fetched yet.
    KeysUnavailable,
}

/// Authenticates admin callers, built from `admin:` at start.
pub struct AdminAuth {
    people: HashMap<[u8; 32], Arc<Person>>,
    shared: Option<[u8; 32]>,
    oidc: Option<(JwtVerifier, AdminOidc)>,
    key_fetch: tokio::sync::Mutex<()>,
    proxy: Option<(Vec<ipnet::IpNet>, http::HeaderName, http::HeaderName)>,
    roles: RoleGroups,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("people", &self.people.len())
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl AdminAuth {
    /// From a validated config; `shared_token` is the `token_env` token, if set.
    pub fn new(config: &AdminConfig, shared_token: Option<String>) -> Self {
        let people = config
            .people
            .iter()
            .filter_map(|p| {
                let digest = crate::policy::identity::parse_key_digest(&p.token_sha256).ok()?;
                Some((digest, Arc::new(p.clone())))
            })
            .collect();
        let oidc = config.oidc.as_ref().map(|o| {
            let jwt = JwtConfig {
                issuer: o.issuer.clone(),
                audience: o.audience.clone(),
                jwks_file: None,
                jwks_url: o.jwks_url.clone(),
                refresh_seconds: crate::policy::jwks::REFRESH_EVERY,
                min_refetch_seconds: crate::policy::jwks::MIN_REFETCH,
            };
            let source = match &o.jwks_url {
                Some(url) => KeySource::Url(url.clone()),
                None => KeySource::Discovery {
                    issuer: o.issuer.clone(),
                },
            };
            (JwtVerifier::remote(&jwt, source), o.clone())
        });
        let proxy = config.auth_proxy.as_ref().and_then(|p| {
            let user = http::HeaderName::from_bytes(p.user_header.as_bytes()).ok()?;
            let groups = http::HeaderName::from_bytes(p.groups_header.as_bytes()).ok()?;
            Some((config.proxy_addresses(), user, groups))
        });
        Self {
            people,
            shared: shared_token.map(|t| Sha256::digest(t.as_bytes()).into()),
            oidc,
            key_fetch: tokio::sync::Mutex::new(()),
            proxy,
            roles: config.roles.clone(),
        }
    }

    /// Whether anyone at all can sign in (else every admin call is refused, and says why).
    pub fn anyone(&self) -> bool {
        !self.people.is_empty() || self.shared.is_some() || self.oidc.is_some() || self.proxy.is_some()
    }

    /// The caller, from the auth proxy's headers (if `peer` is the proxy) or the bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<Admin, NotAuthenticated> {
        if let Some(admin) = self.by_proxy_headers(headers, peer) {
            return Ok(admin);
        }
        // One Authorization header: with two, neither is taken for the one that counts.
        let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
        let bearer = all
            .next()
            .filter(|_| all.next().is_none())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(NotAuthenticated::Missing("A valid admin bearer token is required."))?;
        if bearer.split('.').count() == 3 && self.oidc.is_some() {
            return self.by_jwt(bearer).await;
        }
        self.by_token(bearer)
            .ok_or(NotAuthenticated::Missing("A valid admin bearer token is required."))
    }

    /// A personal or the shared token.
    pub fn by_token(&self, token: &str) -> Option<Admin> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(person) = self.people.get(&digest) {
            return Some(Admin {
                name: person.name.clone(),
                roles: person.roles.clone(),
                groups: Some(person.approver_groups.clone()),
                via: "token",
                credential: Some(digest),
            });
        }
        // Digests, not tokens, are compared, so neither the length nor the content leaks by timing.
        let shared = self.shared.as_ref()?;
        bool::from(digest[..].ct_eq(&shared[..])).then(|| Admin {
            name: SHARED_TOKEN_NAME.to_owned(),
            roles: vec![Role::Operator, Role::Approver, Role::Auditor],
            groups: None,
            via: "admin_token",
            credential: Some(digest),
        })
    }

    /// The person the auth proxy's headers name, if `peer` is the proxy; `None` otherwise,
    /// whatever the headers say.
    pub fn by_proxy_headers(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<Admin> {
        let (trusted, user, groups) = self.proxy.as_ref()?;
        let peer = peer?;
        if !trusted.iter().any(|n| n.contains(&peer)) {
            return None;
        }
        let name = headers.get(user)?.to_str().ok()?.trim();
        if name.is_empty() || name.len() > 128 {
            return None;
        }
        let list: Vec<String> = headers
            .get_all(groups)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        Some(self.with_groups(name.to_owned(), list, "proxy"))
    }

    async fn by_jwt(&self, token: &str) -> Result<Admin, NotAuthenticated> {
        let (verifier, config) = self.oidc.as_ref().expect("checked by the caller");
        if let Some(remote) = verifier.remote_keys() {
            let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid);
            if remote.lacks(kid.as_deref())
                && let Err(e) = crate::gateway::keys::refresh(remote, &self.key_fetch, remote.min_refetch).await
            {
                tracing::error!(source = ?remote.source, "cannot fetch the admin identity provider's keys: {e}");
            }
        }
        #[derive(Deserialize)]
        struct Claims(serde_json::Map<String, serde_json::Value>);
        let claims = verifier.verify_claims::<Claims>(token).map_err(|r| {
            if r.code == crate::policy::Code::Unavailable {
                NotAuthenticated::KeysUnavailable
            } else {
                NotAuthenticated::Missing("The admin token could not be verified.")
            }
        })?;
        let claims = claims.0;
        let name = claims
            .get(&config.name_claim)
            .or_else(|| claims.get("sub"))
            .and_then(|v| v.as_str())
            .filter(|n| !n.is_empty() && n.len() <= 128)
            .ok_or(NotAuthenticated::Missing("The admin token names nobody."))?;
        let groups = match claims.get(&config.groups_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|g| g.as_str()).map(str::to_owned).collect(),
            Some(serde_json::Value::String(s)) => s.split(',').map(|g| g.trim().to_owned()).collect(),
            _ => Vec::new(),
        };
        Ok(self.with_groups(name.to_owned(), groups, "oidc"))
    }

    /// An identity-provider person: `admin.roles` maps groups to operator and auditor; every
    /// person is an approver for the groups they are in.
    fn with_groups(&self, name: String, groups: Vec<String>, via: &'static str) -> Admin {
        let mut roles = Vec::new();
        if groups.iter().any(|g| self.roles.operator.contains(g)) {
            roles.push(Role::Operator);
        }
        if !groups.is_empty() {
            roles.push(Role::Approver);
        }
        if groups.iter().any(|g| self.roles.auditor.contains(g)) {
            roles.push(Role::Auditor);
        }
        Admin {
            name,
            roles,
            groups: Some(groups),
            via,
            credential: None,
        }
    }
}
