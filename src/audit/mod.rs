//! Audit events and their sinks. An event is in the file (written to the kernel; optionally
//! `fdatasync`ed) before the response it describes is sent, so a process killed right after
//! answering has already recorded it. A write that fails makes the call fail closed.
//!
//! Writes are group-committed: callers hand their line to one writer thread over a bounded
//! queue and wait for it; the writer takes everything queued and writes it with one `write`
//! call. Under load that is one syscall (and one optional sync) for many events instead of one
//! each behind a contended lock, which cost more than every check together.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::config::AuditConfig;
use crate::policy::Reason;

/// Events waiting for the writer; beyond this, calls fail closed rather than queue without bound.
const QUEUE_CAPACITY: usize = 65_536;
/// Events written per `write` call at most.
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot write the audit event: {0}")]
    Write(Arc<std::io::Error>),
    #[error("the audit writer is {0} events behind; refusing rather than queueing more")]
    Backlog(usize),
    #[error("the audit writer has stopped")]
    Stopped,
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

/// One line waiting for the writer, and who to tell when it is written.
struct Pending {
    line: Vec<u8>,
    done: oneshot::Sender<Result<(), Arc<std::io::Error>>>,
}

#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    queue: SyncSender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// Where events go: an append-only file, and optionally stdout.
#[derive(Debug)]
pub struct AuditLog {
    file: Option<FileSink>,
    stdout: bool,
    healthy: AtomicBool,
}

impl AuditLog {
    /// Opens the sinks (creating the file and its directory) and starts the writer thread.
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
                let (queue, rx) = sync_channel(QUEUE_CAPACITY);
                let sync = config.fsync;
                std::thread::Builder::new()
                    .name("toolgate-audit".to_owned())
                    .spawn(move || write_batches(f, rx, sync))
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Some(FileSink {
                    path: path.clone(),
                    queue,
                })
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
        self.file.as_ref().map(|s| &s.path)
    }

    /// Writes one event as one line. Returns only after the line is in the file.
    pub async fn emit<E: Serialize>(&self, event: &E) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(event).expect("audit events always serialise");
        line.push(b'\n');
        if self.stdout {
            let _ = std::io::stdout().lock().write_all(&line);
        }
        let result = match &self.file {
            Some(sink) => {
                let (done, written) = oneshot::channel();
                match sink.queue.try_send(Pending { line, done }) {
                    Ok(()) => match written.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(AuditError::Write(e)),
                        Err(_) => Err(AuditError::Stopped),
                    },
                    Err(TrySendError::Full(_)) => Err(AuditError::Backlog(QUEUE_CAPACITY)),
                    Err(TrySendError::Disconnected(_)) => Err(AuditError::Stopped),
                }
            }
            None => Ok(()),
        };
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            metrics::counter!("toolgate_audit_write_failures_total").increment(1);
        }
        result
    }

    /// For events whose writer cannot refuse anything (reloads, anomalies, admin actions): a
    /// failure is logged as an error with the event kind, never dropped silently.
    pub async fn emit_or_log<E: Serialize>(&self, kind: &str, event: &E) {
        if let Err(e) = self.emit(event).await {
            tracing::error!(event = kind, "audit event could not be written: {e}");
        }
    }
}

/// The writer thread: take everything queued, write it with one call, tell every caller.
fn write_batches(mut file: File, rx: Receiver<Pending>, sync: bool) {
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        buf.clear();
        for p in &batch {
            buf.extend_from_slice(&p.line);
        }
        let mut result = file.write_all(&buf);
        if sync && result.is_ok() {
            result = file.sync_data();
        }
        let result = result.map_err(Arc::new);
        for p in batch.drain(..) {
            let _ = p.done.send(result.clone());
        }
    }
}
