//! The cache of an identity provider's signing keys (`auth.jwt.jwks_url`, or the `jwks_uri` of
//! the issuer's OpenID Connect discovery document): what is cached, when a fetch is due, and
//! whether a token's key id is known. Fetching is the gateway's (`gateway::keys`): this module
//! stays pure.
//!
//! Keys are fetched every `refresh_seconds` (5 minutes), sooner while none were ever fetched,
//! and when a token names a key id the cache does not hold (the provider rotated its keys) — at
//! most once per `min_refetch_seconds` (10 s), so tokens with made-up key ids cannot turn the
//! gateway into a fetcher. Until keys were fetched once, a JWT is refused with 503
//! `unavailable`, never let through; keys fetched once are kept while the provider is
//! unreachable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often cached keys are fetched again, by default (`auth.jwt.refresh_seconds`).
pub const REFRESH_EVERY: u64 = 300;
/// The least time between two fetches a call or an empty cache asks for, by default
/// (`auth.jwt.min_refetch_seconds`).
pub const MIN_REFETCH: u64 = 10;

/// One verification key: its id, the algorithm bound to it, the key.
pub type Key = (Option<String>, Algorithm, DecodingKey);

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `auth.jwt.jwks_url`.
    Url(String),
    /// The issuer's `/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery { issuer: String },
}

/// The cached keys of one provider, shared by the policies that name the same source (a
/// reload keeps the cache).
pub struct RemoteKeys {
    pub source: KeySource,
    /// How often the keys are fetched again.
    pub refresh_every: Duration,
    /// The least time between two fetches that calls, or an empty cache, ask for.
    pub min_refetch: Duration,
    keys: ArcSwapOption<Vec<Key>>,
    /// When the last fetch began.
    last: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("source", &self.source)
            .field("keys", &self.keys.load().as_ref().map(|k| k.len()))
            .finish()
    }
}

impl RemoteKeys {
    pub fn new(source: KeySource, refresh_every: Duration, min_refetch: Duration) -> Self {
        Self {
            source,
            refresh_every,
            min_refetch,
            keys: ArcSwapOption::empty(),
            last: Mutex::new(None),
        }
    }

    /// The keys fetched last, or `None` if none ever were.
    pub fn keys(&self) -> Option<Arc<Vec<Key>>> {
        self.keys.load_full()
    }

    /// Puts freshly fetched keys in use.
    pub fn store(&self, keys: Vec<Key>) {
        self.keys.store(Some(Arc::new(keys)));
    }

    /// Whether a token naming `kid` needs a fetch first: no keys yet, or none with that id.
    pub fn lacks(&self, kid: Option<&str>) -> bool {
        match (self.keys.load().as_ref(), kid) {
            (None, _) => true,
            (Some(keys), Some(kid)) => !keys.iter().any(|(id, _, _)| id.as_deref() == Some(kid)),
            (Some(_), None) => false,
        }
    }

    /// Claims the next fetch if the last one began at least `min_interval` ago.
    pub fn claim_fetch(&self, min_interval: Duration) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// The interval of the periodic refresh: `refresh_every`, or `min_refetch` while no keys
    /// were ever fetched.
    pub fn upkeep_interval(&self) -> Duration {
        if self.keys.load().is_some() {
            self.refresh_every
        } else {
            self.min_refetch
        }
    }

    /// Whether `other` fetches the same keys the same way (a reload may keep this cache).
    pub fn same_as(&self, other: &RemoteKeys) -> bool {
        (&self.source, self.refresh_every, self.min_refetch) == (&other.source, other.refresh_every, other.min_refetch)
    }
}
