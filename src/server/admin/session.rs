//! Browser sign-in for the inbox page: a token presented once on the sign-in form becomes a
//! session whose random id travels in an `HttpOnly; Secure; SameSite=Strict` cookie, kept in
//! this process's memory (a replica's sessions are its own: put the admin plane behind sticky
//! routing, or the auth proxy, when replicas share one address). Every form carries a CSRF
//! token, an HMAC of the session id (or of the proxy identity's name) under a key made at
//! start, checked in constant time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::who::Admin;

/// The session cookie's name. `__Host-` makes the browser insist on `Secure`, `Path=/` and no
/// `Domain`, so a sibling host cannot set it.
pub const COOKIE: &str = "__Host-toolgate_session";

/// Sessions held at once; beyond, the oldest is dropped (sign-ins cannot fill the memory).
const MAX_SESSIONS: usize = 10_000;

pub struct Sessions {
    ttl: Duration,
    /// By the SHA-256 of the cookie value: the map never holds what the browser holds.
    live: Mutex<HashMap<[u8; 32], (Admin, Instant)>>,
    csrf_key: [u8; 32],
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("ttl", &self.ttl).finish()
    }
}

fn random_hex() -> String {
    // Two v4 UUIDs: 244 random bits from the OS's generator (uuid's `fast-rng` is seeded by it).
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        let mut csrf_key = [0u8; 32];
        csrf_key.copy_from_slice(&Sha256::digest(random_hex().as_bytes()));
        Self {
            ttl,
            live: Mutex::new(HashMap::new()),
            csrf_key,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session for `admin`; returns the cookie value.
    pub fn start(&self, mut admin: Admin) -> String {
        admin.via = "session";
        let id = random_hex();
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, (_, expires)| *expires > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, (_, e))| *e).map(|(k, _)| *k)
        {
            live.remove(&oldest);
        }
        live.insert(Sha256::digest(id.as_bytes()).into(), (admin, now + self.ttl));
        id
    }

    /// The signed-in person of a cookie value, while the session lasts.
    pub fn get(&self, cookie: &str) -> Option<Admin> {
        let key: [u8; 32] = Sha256::digest(cookie.as_bytes()).into();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(a, _)| a.clone())
    }

    pub fn end(&self, cookie: &str) {
        let key: [u8; 32] = Sha256::digest(cookie.as_bytes()).into();
        self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }

    /// The CSRF token of the forms shown to `subject` (the session's cookie value, or a proxy
    /// identity's name).
    pub fn csrf(&self, subject: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.csrf_key).expect("any key length");
        mac.update(b"toolgate-csrf\0");
        mac.update(subject.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether a form's CSRF token is `subject`'s.
    pub fn csrf_ok(&self, subject: &str, presented: &str) -> bool {
        bool::from(self.csrf(subject).as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// The session cookie's value in a request, if any.
pub fn cookie_of(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}
