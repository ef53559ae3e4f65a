//! Audit events and their sinks. An event is written (to the kernel, with one `write` call per
//! line on an `O_APPEND` file) before the response it describes is sent, so a process killed right
//! after answering has already recorded it. A write that fails makes the call fail closed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use crate::config::AuditConfig;
use crate::policy::Reason;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot write the audit event: {0}")]
    Write(std::io::Error),
}

/// RFC 3339 UTC with milliseconds, as every event's `ts`.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Unix seconds as RFC 3339 UTC.
pub fn format_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// `tokens` in a tool-call event: what flowed through the gateway, as budgets count it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

/// `upstream` in a tool-call event: what the tool did.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
}

/// One decision on one tool call.
#[derive(Debug, Serialize)]
pub struct ToolCallEvent<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub session: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub decision: &'static str,
    pub code: Option<&'static str>,
    pub reasons: &'a [Reason],
    /// The arguments as forwarded (after redaction), or their shape: never raw caller values
    /// that no filter has seen.
    pub arguments: Option<Value>,
    pub arguments_sha256: &'a str,
    pub upstream: Option<UpstreamInfo>,
    pub tokens: Option<Tokens>,
    pub duration_ms: f64,
    pub policy_version: &'a str,
}

/// A policy (re)load, good or bad.
#[derive(Debug, Serialize)]
pub struct PolicyEvent<'a> {
    pub ts: String,
    pub event: &'static str,
    pub policy_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub errors: &'a [String],
    pub trigger: &'a str,
}

/// Where events go: an append-only file, and optionally stdout.
#[derive(Debug)]
pub struct AuditLog {
    file: Option<(PathBuf, Mutex<File>)>,
    stdout: bool,
    healthy: AtomicBool,
}

impl AuditLog {
    /// Opens the sinks (creating the file and its directory).
    pub fn open(config: &AuditConfig) -> Result<Self, AuditError> {
        let file = match &config.file {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                }
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Some((path.clone(), Mutex::new(f)))
            }
            None => None,
        };
        Ok(Self {
            file,
            stdout: config.stdout,
            healthy: AtomicBool::new(true),
        })
    }

    /// False after a failed write, until a write succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> Option<&PathBuf> {
        self.file.as_ref().map(|(p, _)| p)
    }

    /// Writes one event as one line. Only returns after the line is in the file.
    pub fn emit<E: Serialize>(&self, event: &E) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(event).expect("audit events always serialise");
        line.push(b'\n');
        let result = match &self.file {
            Some((_, file)) => {
                let mut f = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                f.write_all(&line).map_err(AuditError::Write)
            }
            None => Ok(()),
        };
        if self.stdout {
            let _ = std::io::stdout().lock().write_all(&line);
        }
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            metrics::counter!("toolgate_audit_write_failures_total").increment(1);
        }
        result
    }
}
