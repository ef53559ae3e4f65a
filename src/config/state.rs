//! Where shared state lives (`state`, and `redis` when it is a Redis URL), validated at load.
//!
//! The Redis password never sits in the YAML: a config file is read by more people, and
//! copied to more places, than a secret should be. The URL names the server, the user and the
//! database; the password comes from an environment variable or a file, as the admin token
//! does.

use std::path::PathBuf;
use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::Deserialize;

use super::Problems;
use super::yaml::{Document, KeyPath};

/// Where shared state lives.
#[derive(Debug, Clone)]
pub enum StateBackend {
    /// In this process (the default): one replica, or state that need not be shared.
    Memory,
    /// In Redis, shared by every replica that names the same server and `key_prefix`.
    Redis(RedisConfig),
}

/// A Redis state backend, validated.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The server, as written (`redis://` or `rediss://`, never with a password).
    pub url: String,
    pub options: RedisOptions,
}

/// The `redis` section: how to reach the server named by `state`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisOptions {
    /// Environment variable holding the password (default `TOOLGATE_REDIS_PASSWORD`).
    #[serde(default = "default_password_env")]
    pub password_env: String,
    /// Alternatively, a file holding it (first line). The environment variable wins.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Deadline of every Redis call, connecting included (default 250 ms). A call that
    /// cannot be admitted within it is refused with 503 `unavailable`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Every key starts with this, then the agent's hash tag (default `toolgate`): replicas
    /// of one gateway share a prefix; two gateways on one Redis use two.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Refuse to start when the server does not persist writes (AOF off), since quarantines
    /// would then be lost with a Redis restart (default true).
    #[serde(default = "yes")]
    pub require_persistence: bool,
}

fn default_password_env() -> String {
    "TOOLGATE_REDIS_PASSWORD".to_owned()
}
fn default_timeout_ms() -> u64 {
    250
}
fn default_key_prefix() -> String {
    "toolgate".to_owned()
}
fn yes() -> bool {
    true
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            password_env: default_password_env(),
            password_file: None,
            timeout_ms: default_timeout_ms(),
            key_prefix: default_key_prefix(),
            require_persistence: true,
        }
    }
}

/// What cannot be read of the Redis password.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the Redis password from {path}: {source}")]
pub struct PasswordError {
    path: String,
    source: std::io::Error,
}

impl RedisConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.options.timeout_ms)
    }

    /// The password: the environment variable's value if set, else the file's first line,
    /// else none (a Redis without `requirepass` or ACL password).
    pub fn password(&self) -> Result<Option<String>, PasswordError> {
        if let Ok(p) = std::env::var(&self.options.password_env)
            && !p.trim().is_empty()
        {
            return Ok(Some(p.trim().to_owned()));
        }
        let Some(file) = &self.options.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file).map_err(|source| PasswordError {
            path: file.display().to_string(),
            source,
        })?;
        Ok(text
            .lines()
            .next()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned))
    }

    /// The URL with the password from the environment or the file.
    pub fn connection_info(&self) -> Result<redis::ConnectionInfo, String> {
        let info = self.url.as_str().into_connection_info().map_err(|e| e.to_string())?;
        let password = self.password().map_err(|e| e.to_string())?;
        Ok(match password {
            Some(p) => {
                let settings = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    }

    /// The server, for messages: host and port, never a credential.
    pub fn server(&self) -> String {
        match self.url.as_str().into_connection_info() {
            Ok(info) => info.addr().to_string(),
            Err(_) => "the configured server".to_owned(),
        }
    }
}

pub(super) fn check_state(
    doc: &Document,
    state: &str,
    options: Option<RedisOptions>,
    problems: &mut Problems,
) -> StateBackend {
    let at = KeyPath::root().key("state");
    if state == "memory" {
        if options.is_some() {
            problems.push(doc.problem(
                &KeyPath::root().key("redis"),
                "is only read when `state` is a Redis URL (`redis://HOST:PORT/DB`); `state` is `memory`",
            ));
        }
        return StateBackend::Memory;
    }
    if !(state.starts_with("redis://") || state.starts_with("rediss://")) {
        problems.push(doc.problem(
            &at,
            "must be `memory` or a Redis URL: `redis://[USER@]HOST:PORT/DB` (`rediss://` for TLS)",
        ));
        return StateBackend::Memory;
    }
    match state.into_connection_info() {
        Err(e) => problems.push(doc.problem(&at, format!("is not a Redis URL: {e}"))),
        Ok(info) if info.redis_settings().password().is_some() => problems.push(doc.problem(
            &at,
            "must not hold the password: set it in the environment variable named by \
             `redis.password_env` (default TOOLGATE_REDIS_PASSWORD) or the file `redis.password_file`",
        )),
        Ok(_) => {}
    }
    let options = options.unwrap_or_default();
    let section = KeyPath::root().key("redis");
    if !(1..=60_000).contains(&options.timeout_ms) {
        problems.push(doc.problem(&section.key("timeout_ms"), "must be between 1 and 60000"));
    }
    let prefix_ok = !options.key_prefix.is_empty()
        && options.key_prefix.len() <= 64
        && options
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !prefix_ok {
        problems.push(doc.problem(
            &section.key("key_prefix"),
            "must be 1 to 64 characters: letters, digits, `-`, `_`, `.`, `:`",
        ));
    }
    if options.password_env.is_empty() {
        problems.push(doc.problem(&section.key("password_env"), "must name an environment variable"));
    }
    StateBackend::Redis(RedisConfig {
        url: state.to_owned(),
        options,
    })
}
