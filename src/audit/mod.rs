//! Audit events and their sinks. An event is in the file (written to the kernel; optionally
//! `fdatasync`ed) before the response it describes is sent, so a process killed right after
//! answering has already recorded it. A write that fails makes the call fail closed.
//!
//! Writes are group-committed without a lock held across the syscall: a caller appends its line
//! to its thread's buffer; if nobody is writing that buffer, it becomes the writer, yields once
//! (so the calls already runnable on its thread append theirs), and writes everything buffered
//! with one `write`, again until the buffer is empty; the others wait (as tasks, not blocked
//! threads) until their line is written. Uncontended, that is one `write` per event; under
//! load, one per several, and no buffer's lock is held across a syscall.
//!
//! The buffer is per thread (`per_thread`): with one buffer for the process, a data-plane
//! thread's calls waited on the other thread's write, and each was woken across threads (a
//! syscall to unpark the other event loop). The file's own lock is held for one batch's
//! `write`, so batches from different threads interleave in the file but never tear a line
//! (the kernel serialises appends to one file the same way).

pub mod cloudwatch;
mod line;
mod unknown;

pub use unknown::SummaryEvent;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use crate::config::AuditConfig;
use crate::per_thread;
use crate::policy::Reason;

/// Bytes waiting to be written; beyond this, calls fail closed rather than buffer without bound.
const MAX_BUFFERED: usize = 64 * 1024 * 1024;
/// Failed batches remembered so each waiter can learn whether its own line failed.
const FAILURES_KEPT: usize = 256;
/// A batch buffer up to this size is kept for the next batch; a larger one (a burst) is freed.
const SPARE_KEPT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot write the audit event: {0}")]
    Write(Arc<std::io::Error>),
    #[error("more than {0} bytes of audit events are waiting to be written; refusing rather than buffering more")]
    Backlog(usize),
}

/// RFC 3339 UTC with milliseconds, as every event's `ts`.
pub fn now() -> Timestamp {
    rfc3339_millis(SystemTime::now())
}

/// An event's `ts`, `2026-11-30T12:00:00.123Z`: always 24 ASCII bytes, kept inline (every
/// event has one; a `String` would be an allocation per call).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp([u8; 24]);

impl Timestamp {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("RFC 3339 is ASCII")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `t` as `2026-11-30T12:00:00.123Z`. The date and time of day change once a second: each
/// thread formats them once per second and reuses them (every event has a timestamp, and
/// calendar arithmetic plus `fmt` cost more than the rest of the line's plain fields).
fn rfc3339_millis(t: SystemTime) -> Timestamp {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let prefix = SECOND.with(|cell| {
        let (cached, prefix) = cell.get();
        if cached == secs {
            return prefix;
        }
        let mut prefix = [0; 19];
        let text =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string();
        prefix.copy_from_slice(&text.as_bytes()[..19]);
        cell.set((secs, prefix));
        prefix
    });
    let ms = since.subsec_millis();
    let mut out = [0u8; 24];
    out[..19].copy_from_slice(&prefix);
    out[19] = b'.';
    for (at, digit) in [ms / 100, ms / 10 % 10, ms % 10].into_iter().enumerate() {
        out[20 + at] = b'0' + digit as u8;
    }
    out[23] = b'Z';
    Timestamp(out)
}

/// A duration as the events' `duration_ms`: milliseconds, to the microsecond.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Unix seconds as RFC 3339 UTC.
pub fn format_unix(secs: u64) -> String {
    // Beyond year 9999 RFC 3339 has no form (and far beyond, `SystemTime` overflows).
    let secs = secs.min(253_402_300_799);
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

/// `arguments` in a tool-call event.
#[derive(Debug)]
pub enum RecordedArguments {
    /// Built for the event: the shape, or a redacted copy.
    Value(Value),
    /// JSON text already serialised: the canonical body that was forwarded, when the audit
    /// redactor had nothing to change in it. Spliced in as it is instead of serialised again.
    Json(bytes::Bytes),
}

impl Serialize for RecordedArguments {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Value(v) => v.serialize(s),
            Self::Json(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(serde::ser::Error::custom)?;
                let raw: &serde_json::value::RawValue =
                    serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
                raw.serialize(s)
            }
        }
    }
}

/// One decision on one tool call.
#[derive(Debug, Serialize)]
pub struct ToolCallEvent<'a> {
    pub ts: Timestamp,
    pub event: &'static str,
    pub request_id: &'a str,
    /// The address the call came from (the connection's peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    pub session: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub decision: &'static str,
    pub code: Option<&'static str>,
    pub reasons: &'a [Reason],
    /// The arguments as forwarded (after redaction), or their shape: never raw caller values
    /// that no filter has seen.
    pub arguments: Option<RecordedArguments>,
    pub arguments_sha256: &'a str,
    pub upstream: Option<UpstreamInfo>,
    pub tokens: Option<Tokens>,
    /// The approval this call was held for, or passed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
    /// Shadow-mode rules that would have denied this call (not enforced).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub would_deny: &'a [String],
    pub duration_ms: f64,
    pub policy_version: &'a str,
}

/// A request refused before it became a tool call: at the MCP protocol level (origin, body,
/// batch, not JSON-RPC, credentials, session, protocol version). `message` is toolgate's own
/// text, never the caller's.
#[derive(Debug, Serialize)]
pub struct RefusalEvent<'a> {
    pub ts: Timestamp,
    pub event: &'static str,
    pub request_id: &'a str,
    pub endpoint: &'static str,
    pub method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    pub agent: Option<&'a str>,
    pub status: u16,
    pub code: &'static str,
    pub message: &'a str,
}

/// A policy (re)load, good or bad.
#[derive(Debug, Serialize)]
pub struct PolicyEvent<'a> {
    pub ts: Timestamp,
    pub event: &'static str,
    pub policy_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub errors: &'a [String],
    pub trigger: &'a str,
    /// The operator who asked for the reload (`POST /admin/reload` with `{"by": ...}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<&'a str>,
}

/// Lines appended but not yet taken by a writer, and what became of those that were.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// The last batch's buffer, emptied, for the next batch: no regrowing it from nothing.
    spare: Vec<u8>,
    /// Sequence number of the last line appended.
    last: u64,
    /// Whether some caller is writing now.
    writing: bool,
    progress: Progress,
    /// Callers waiting for their line's batch: (its sequence number, who to wake).
    waiters: Vec<(u64, Waker)>,
}

/// What has been written: everything up to `done`, except the failed ranges.
#[derive(Debug, Default)]
struct Progress {
    done: u64,
    failed: VecDeque<(u64, u64)>,
    /// Lines at or below this whose outcome was forgotten count as failed (fail closed).
    forgotten: u64,
}

impl Progress {
    fn has_failed(&self, seq: u64) -> bool {
        seq <= self.forgotten || self.failed.iter().any(|&(a, b)| (a..=b).contains(&seq))
    }
}

/// Resolves once the batch holding line `seq` was written: `true` if that write failed.
///
/// A waker list under the lock the lines are appended under, rather than a `watch` channel:
/// every call waits here once, and the channel's subscription, sharded notifier and budget
/// accounting cost ~2k instructions per call (docs/benchmarks.md).
struct Written<'a> {
    pending: &'a Mutex<Pending>,
    seq: u64,
    registered: bool,
}

impl Future for Written<'_> {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let seq = self.seq;
        let mut p = lock(self.pending);
        if p.progress.done >= seq {
            return Poll::Ready(p.progress.has_failed(seq));
        }
        if !self.registered {
            p.waiters.push((seq, cx.waker().clone()));
            drop(p);
            self.registered = true;
        } else if let Some((_, w)) = p.waiters.iter_mut().find(|(s, _)| *s == seq) {
            // Polled again before its batch was written (by whatever else its task awaits).
            w.clone_from(cx.waker());
        }
        Poll::Pending
    }
}

#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    file: Mutex<Active>,
    /// Lines waiting to be written, one buffer per thread.
    pending: Box<[per_thread::Shard<Mutex<Pending>>]>,
    sync: bool,
    /// Rotate once the file holds this many bytes (0: never).
    rotate_bytes: u64,
}

/// The file being appended to, and what rotation needs to know of it.
#[derive(Debug)]
struct Active {
    file: File,
    /// Its length, as written by this process (and found at open).
    len: u64,
    /// The next rotation is tried at this length (later than `rotate_bytes` after a failure).
    rotate_at: u64,
    /// The newest rotated file's suffix: a new one must sort after it (looked up at the first
    /// rotation).
    newest: Option<String>,
}

/// Where events go: an append-only file, and optionally stdout.
#[derive(Debug)]
pub struct AuditLog {
    file: Option<FileSink>,
    stdout: bool,
    healthy: AtomicBool,
    /// Refusals of callers with no known agent beyond their allowance, counted.
    unknown: unknown::UnknownCallers,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuditLog {
    /// Opens the sinks, creating the file and its directory.
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
                let open_error = |source| AuditError::Open {
                    path: path.clone(),
                    source,
                };
                let len = f.metadata().map_err(open_error)?.len();
                Some(FileSink {
                    path: path.clone(),
                    file: Mutex::new(Active {
                        file: f,
                        len,
                        rotate_at: config.rotate_bytes,
                        newest: None,
                    }),
                    pending: per_thread::shards(),
                    sync: config.fsync,
                    rotate_bytes: config.rotate_bytes,
                })
            }
            None => None,
        };
        Ok(Self {
            file,
            stdout: config.stdout,
            healthy: AtomicBool::new(true),
            unknown: unknown::UnknownCallers::new(&config.unknown_callers),
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
        self.emit_line(&line).await
    }

    /// Writes one event already serialised as one newline-terminated JSON line (see
    /// [`ToolCallEvent::to_line`]). Returns only after the line is in the file.
    pub async fn emit_line(&self, line: &[u8]) -> Result<(), AuditError> {
        if self.stdout {
            let _ = std::io::stdout().lock().write_all(line);
        }
        let result = match &self.file {
            Some(sink) => sink.append(line).await,
            None => Ok(()),
        };
        // Stored only on a change: a store on every call would make both data-plane cores
        // write this line on every call.
        if self.healthy.load(Ordering::Relaxed) != result.is_ok() {
            self.healthy.store(result.is_ok(), Ordering::Relaxed);
        }
        if result.is_err() {
            metrics::counter!("toolgate_audit_write_failures_total").increment(1);
        }
        result
    }

    /// Whether the refusal of a caller with no known agent, from `source`, gets its own event;
    /// if not, it is counted for the next `refusals_summarized` event (see `unknown`).
    pub fn admit_unknown_caller(&self, source: Option<std::net::IpAddr>, code: &'static str) -> bool {
        self.unknown.admit(source, code)
    }

    /// Writes the `refusals_summarized` events due (every `audit.unknown_callers.summary_seconds`,
    /// and once more at shutdown).
    ///
    /// All in one write. If it fails, the counts are put back for the next try: nothing counted
    /// is lost while the process lives. Returns false then (at shutdown, the caller says what
    /// could not be written, as a last resort).
    pub async fn write_summaries(&self) -> bool {
        let taken = self.unknown.take();
        if taken.is_empty() {
            return true;
        }
        let mut lines = Vec::new();
        for event in taken.events() {
            serde_json::to_writer(&mut lines, &event).expect("audit events always serialise");
            lines.push(b'\n');
        }
        match self.emit_line(&lines).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("refusals_summarized events could not be written, kept for the next try: {e}");
                self.unknown.restore(taken);
                false
            }
        }
    }

    /// The summaries not yet written, as text (for a last log line when they cannot be).
    pub fn pending_summaries(&self) -> Vec<String> {
        let taken = self.unknown.take();
        let events = taken.events();
        self.unknown.restore(taken);
        events
            .iter()
            .map(|e| serde_json::to_string(e).expect("audit events always serialise"))
            .collect()
    }

    /// Rotates the file now (`POST /admin/audit/rotate`), whatever its size: between two
    /// batches, as a size rotation. `Ok(None)` if there is no file.
    pub fn rotate_now(&self, by: &str) -> std::io::Result<Option<Rotated>> {
        let Some(sink) = &self.file else { return Ok(None) };
        let mut active = lock(&sink.file);
        sink.try_rotate(&mut active, Trigger::Admin { by }).map(Some)
    }

    /// For events whose writer cannot refuse anything (reloads, anomalies, admin actions): a
    /// failure is logged as an error with the event kind, never dropped silently.
    pub async fn emit_or_log<E: Serialize>(&self, kind: &str, event: &E) {
        if let Err(e) = self.emit(event).await {
            tracing::error!(event = kind, "audit event could not be written: {e}");
        }
    }
}

/// The writer's duty for one buffer, done when dropped: after yielding, or if cancelled while
/// yielding.
struct Writer<'a>(&'a FileSink, &'a Mutex<Pending>);

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        self.0.write_pending(self.1);
    }
}

impl FileSink {
    async fn append(&self, line: &[u8]) -> Result<(), AuditError> {
        // This thread's buffer; the task keeps it even if a work-stealing runtime moves it.
        let pending = &self.pending[per_thread::index()].0;
        let (seq, lead) = {
            let mut p = lock(pending);
            if p.buf.len() + line.len() > MAX_BUFFERED {
                return Err(AuditError::Backlog(MAX_BUFFERED));
            }
            p.buf.extend_from_slice(line);
            p.last += 1;
            let lead = !p.writing;
            p.writing = true;
            (p.last, lead)
        };
        if lead {
            // Let the tasks already runnable on this thread append their lines first, so one
            // `write` carries them all (under load, ~10 lines per `write` instead of one). With
            // nothing else runnable this returns at once. The guard writes if this task is
            // dropped while it yields: a writer that never writes would wedge the log.
            let writer = Writer(self, pending);
            tokio::task::yield_now().await;
            drop(writer);
        }
        let written = Written {
            pending,
            seq,
            registered: false,
        };
        if written.await {
            return Err(AuditError::Write(Arc::new(std::io::Error::other(
                "the batch holding this event failed to write",
            ))));
        }
        Ok(())
    }

    /// Writes `pending`'s batches until it is empty, then steps down. Only one caller at a time
    /// per buffer.
    fn write_pending(&self, pending: &Mutex<Pending>) {
        loop {
            let (mut batch, upto) = {
                let mut p = lock(pending);
                if p.buf.is_empty() {
                    p.writing = false;
                    return;
                }
                let spare = std::mem::take(&mut p.spare);
                (std::mem::replace(&mut p.buf, spare), p.last)
            };
            let write = || {
                let mut active = lock(&self.file);
                let written = active.file.write_all(&batch);
                // A failed write may have written part of the batch: the length is read again.
                active.len = match written {
                    Ok(()) => active.len + batch.len() as u64,
                    Err(_) => active.file.metadata().map_or(active.len, |m| m.len()),
                };
                written?;
                if self.sync {
                    active.file.sync_data()?;
                }
                if self.rotate_bytes > 0 && active.len >= active.rotate_at {
                    self.rotate(&mut active);
                }
                Ok::<(), std::io::Error>(())
            };
            // A sync can take milliseconds: on a work-stealing runtime, let it move other tasks
            // off this thread. A data-plane thread runs its own loop and has nowhere to move
            // them: its calls wait for the sync (one per batch, which the batching amortises).
            let work_stealing = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let result = if self.sync && work_stealing {
                tokio::task::block_in_place(write)
            } else {
                write()
            };
            if let Err(e) = &result {
                tracing::error!(path = %self.path.display(), "audit write failed: {e}");
            }
            let mut p = lock(pending);
            let progress = &mut p.progress;
            if result.is_err() {
                progress.failed.push_back((progress.done + 1, upto));
                while progress.failed.len() > FAILURES_KEPT {
                    if let Some((_, b)) = progress.failed.pop_front() {
                        progress.forgotten = b;
                    }
                }
            }
            progress.done = upto;
            // Waking only schedules the waiters; none runs while the lock is held.
            p.waiters.retain(|(seq, waker)| {
                let done = *seq <= upto;
                if done {
                    waker.wake_by_ref();
                }
                !done
            });
            if batch.capacity() <= SPARE_KEPT {
                batch.clear();
                p.spare = batch;
            }
        }
    }
}

impl FileSink {
    /// Starts a new file; the full one keeps its events under a name that sorts after every
    /// earlier one. Runs under the file's lock, between whole batches, so no line is split and
    /// none lands in the wrong file. A failure keeps the current file (nothing is lost) and is
    /// tried again after another eighth of `rotate_bytes`.
    fn rotate(&self, active: &mut Active) {
        match self.try_rotate(active, Trigger::Size) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %self.path.display(), "audit file rotation failed, still writing to the current file: {e}");
                active.rotate_at = active.len + (self.rotate_bytes / 8).max(1);
            }
        }
    }

    fn try_rotate(&self, active: &mut Active, trigger: Trigger<'_>) -> std::io::Result<Rotated> {
        if active.newest.is_none() {
            active.newest = newest_rotation(&self.path)?;
        }
        let suffix = next_suffix(&self.path, active.newest.as_deref());
        let rotated = with_suffix(&self.path, &suffix);
        // The new file is created first, so a failure before the first rename leaves everything
        // as it was. (A `.rotating` file left by a crash holds no event: it was never renamed
        // into place.)
        let fresh = with_suffix(&self.path, "rotating");
        let _ = std::fs::remove_file(&fresh);
        let mut next = OpenOptions::new().create_new(true).append(true).open(&fresh)?;
        if let Err(e) = std::fs::rename(&self.path, &rotated) {
            let _ = std::fs::remove_file(&fresh);
            return Err(e);
        }
        // From here the full file has its new name: the writer must never append to it again
        // (a shipper may already have read it to the end and moved on), so every path below
        // ends with the writer on a file named `path`.
        if let Err(e) = std::fs::rename(&fresh, &self.path) {
            let _ = std::fs::remove_file(&fresh);
            if std::fs::rename(&rotated, &self.path).is_ok() {
                return Err(e);
            }
            // Neither way round: a new file in place, opened directly.
            next = OpenOptions::new().create(true).append(true).open(&self.path)?;
        }
        if self.sync
            && let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = File::open(dir).and_then(|d| d.sync_all())
        {
            tracing::error!(path = %self.path.display(), "audit file rotated, but its directory could not be synced: {e}");
        }
        let previous_bytes = active.len;
        active.file = next;
        active.len = 0;
        active.rotate_at = self.rotate_bytes;
        active.newest = Some(suffix);
        metrics::counter!("toolgate_audit_rotations_total").increment(1);
        let previous_file = rotated
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (trigger, by) = match trigger {
            Trigger::Size => ("size", None),
            Trigger::Admin { by } => ("admin", Some(by)),
        };
        let mut line = serde_json::to_vec(&RotatedEvent {
            ts: now().to_string(),
            event: "audit_rotated",
            previous_file: &previous_file,
            previous_bytes,
            trigger,
            by,
        })
        .expect("audit events always serialise");
        line.push(b'\n');
        // The rotation is done either way; a failed first line is the next batch's failure too.
        let written = active.file.write_all(&line);
        let written = written.and_then(|()| if self.sync { active.file.sync_data() } else { Ok(()) });
        active.len = match written {
            Ok(()) => line.len() as u64,
            Err(e) => {
                tracing::error!(path = %self.path.display(), "audit file rotated, but its first event could not be written: {e}");
                active.file.metadata().map_or(0, |m| m.len())
            }
        };
        Ok(Rotated {
            previous_file,
            previous_bytes,
        })
    }
}

/// The newest rotation's suffix: the newest rotated file, or the one the current file's first
/// line names if that is newer (rotated files are deleted once shipped; a new name must still
/// sort after every name a shipper has seen).
fn newest_rotation(active: &Path) -> std::io::Result<Option<String>> {
    let listed = rotated_files(active)?
        .pop()
        .and_then(|p| rotation_suffix(active, &p).map(str::to_owned));
    let named = File::open(active).ok().and_then(|f| {
        let mut head = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, 4096), &mut head).ok()?;
        let first = head.split(|b| *b == b'\n').next()?;
        let event: Value = serde_json::from_slice(first).ok()?;
        let previous = event.get("previous_file")?.as_str()?;
        (event.get("event")? == "audit_rotated")
            .then(|| rotation_suffix(active, &active.with_file_name(previous)).map(str::to_owned))?
    });
    Ok(listed.max(named))
}

/// What started a rotation.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// The file reached `audit.rotate_bytes`.
    Size,
    /// `POST /admin/audit/rotate`, by this operator.
    Admin { by: &'a str },
}

/// A rotation done: the file that now holds the events before it.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    pub previous_file: String,
    pub previous_bytes: u64,
}

/// The first line of a rotated-to file: which file holds the events before it, and its size,
/// so a reader can tell the chain of files is whole.
#[derive(Serialize)]
struct RotatedEvent<'a> {
    ts: String,
    event: &'static str,
    previous_file: &'a str,
    previous_bytes: u64,
    /// `size` or `admin`.
    trigger: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
}

/// `path` with `.suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".");
    p.push(suffix);
    PathBuf::from(p)
}

/// The rotation suffix of `candidate` if it is one of `active`'s rotated files: the UTC time
/// of its rotation as `20261201T021828.123Z`.
pub fn rotation_suffix<'a>(active: &Path, candidate: &'a Path) -> Option<&'a str> {
    let base = active.file_name()?.to_str()?;
    let name = candidate.file_name()?.to_str()?;
    let suffix = name.strip_prefix(base)?.strip_prefix('.')?;
    let b = suffix.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shaped = b.len() == 20
        && digits(0..8)
        && b[8] == b'T'
        && digits(9..15)
        && b[15] == b'.'
        && digits(16..19)
        && b[19] == b'Z';
    (shaped && suffix_time(suffix).is_some()).then_some(suffix)
}

/// The time a rotation suffix names (`20261201T021828.123Z`).
fn suffix_time(suffix: &str) -> Option<SystemTime> {
    let b = suffix.get(..20)?;
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &b[0..4],
        &b[4..6],
        &b[6..8],
        &b[9..11],
        &b[11..13],
        &b[13..19]
    );
    humantime::parse_rfc3339(&text).ok()
}

/// `active`'s rotated files, oldest first (their names sort in the order they were written).
pub fn rotated_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = active
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| rotation_suffix(active, p).is_some())
        .collect();
    files.sort();
    Ok(files)
}

/// A suffix for the file rotated now: the current UTC time, or a millisecond after `newest`
/// if that is not earlier (two rotations in one millisecond, or a clock set back), moved on
/// until it names no existing file.
fn next_suffix(active: &Path, newest: Option<&str>) -> String {
    let after_newest = newest
        .and_then(suffix_time)
        .map(|t| t + std::time::Duration::from_millis(1));
    let mut t = SystemTime::now().max(after_newest.unwrap_or(std::time::UNIX_EPOCH));
    loop {
        let suffix: String = rfc3339_millis(t)
            .as_str()
            .chars()
            .filter(|c| !matches!(c, '-' | ':'))
            .collect();
        if newest.is_none_or(|n| suffix.as_str() > n) && !with_suffix(active, &suffix).exists() {
            return suffix;
        }
        t += std::time::Duration::from_millis(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::time::Duration;

    fn log_in(dir: &std::path::Path) -> AuditLog {
        let config: AuditConfig =
            serde_json::from_value(serde_json::json!({ "file": dir.join("audit.jsonl") })).unwrap();
        AuditLog::open(&config).unwrap()
    }

    #[tokio::test]
    async fn a_writer_dropped_before_it_writes_does_not_wedge_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path());
        let mut first = Box::pin(log.emit_line(b"{\"n\":1}\n"));
        // One poll: the line is appended, this caller becomes the writer and yields.
        assert!((&mut first).now_or_never().is_none());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), log.emit_line(b"{\"n\":2}\n"));
        second
            .await
            .expect("the next event is written, not stuck behind a writer that left")
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(
            text, "{\"n\":1}\n{\"n\":2}\n",
            "the dropped caller's line is written too"
        );
    }

    #[test]
    fn each_thread_writes_its_own_lines_without_waiting_on_another_threads_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(log_in(dir.path()));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        // This thread's caller becomes its buffer's writer and stops at its yield, unpolled.
        let mut stalled = Box::pin(log.emit_line(b"{\"n\":0}\n"));
        assert!((&mut stalled).now_or_never().is_none());
        // Another thread's events do not wait for it (with one buffer they would, forever).
        let other = log.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                for i in 1..=3 {
                    let line = format!("{{\"n\":{i}}}\n");
                    tokio::time::timeout(Duration::from_secs(5), other.emit_line(line.as_bytes()))
                        .await
                        .expect("written without the other thread's writer")
                        .unwrap();
                }
            })
        })
        .join()
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
        // The stalled writer finishes its own buffer when it runs.
        runtime().block_on(stalled).unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(text.ends_with("{\"n\":0}\n"), "{text}");
    }

    #[test]
    fn timestamps_match_humantime_across_seconds() {
        let start = std::time::UNIX_EPOCH + Duration::from_millis(1_795_000_000_000);
        // Steps that stay within a second, cross one, and go back (the cache is per second).
        for ms in [
            0,
            1,
            999,
            1000,
            1001,
            59_999,
            60_000,
            86_399_999,
            5,
            86_400_000,
            123_456_789,
        ] {
            let t = start + Duration::from_millis(ms);
            assert_eq!(
                rfc3339_millis(t).to_string(),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
        assert_eq!(now().as_str().len(), "2026-11-30T12:00:00.123Z".len());
    }

    /// `n` tasks each emitting `{"n":i}` at once.
    fn emit_concurrently(log: &Arc<AuditLog>, n: u64) -> Vec<tokio::task::JoinHandle<Result<(), AuditError>>> {
        (0..n)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.emit_line(format!("{{\"n\":{i}}}\n").as_bytes()).await })
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_in_a_failed_batch_is_told() {
        if !std::path::Path::new("/dev/full").exists() {
            return;
        }
        let config: AuditConfig = serde_json::from_value(serde_json::json!({ "file": "/dev/full" })).unwrap();
        let log = Arc::new(AuditLog::open(&config).unwrap());
        for t in emit_concurrently(&log, 50) {
            let result = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("no caller waits forever");
            assert!(matches!(result.unwrap(), Err(AuditError::Write(_))));
        }
        assert!(!log.is_healthy());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_events_are_each_written_once_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(log_in(dir.path()));
        for t in emit_concurrently(&log, 200) {
            t.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let mut seen: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["n"].as_u64().unwrap())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn rotated_files_are_recognised_by_their_time_suffix_only() {
        let active = Path::new("/var/log/audit.jsonl");
        let suffix = |name: &str| rotation_suffix(active, Path::new(name)).map(str::to_owned);
        assert_eq!(
            suffix("/var/log/audit.jsonl.20261201T021828.123Z").as_deref(),
            Some("20261201T021828.123Z")
        );
        for other in [
            "/var/log/audit.jsonl",
            "/var/log/audit.jsonl.cloudwatch",
            "/var/log/audit.jsonl.rotating",
            "/var/log/audit.jsonl.20261201T021828.123",
            "/var/log/audit.jsonl.20261201T02182x.123Z",
            "/var/log/audit.jsonl.20261399T021828.123Z",
            "/var/log/audit.jsonlx.20261201T021828.123Z",
            "/var/log/other.jsonl.20261201T021828.123Z",
        ] {
            assert_eq!(suffix(other), None, "{other}");
        }
    }

    #[test]
    fn a_new_suffix_sorts_after_the_newest_even_one_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        let first = next_suffix(&active, None);
        assert!(
            rotation_suffix(&active, &with_suffix(&active, &first)).is_some(),
            "{first}"
        );
        assert!(next_suffix(&active, Some(&first)) > first);
        // A file rotated by a clock far ahead: the next name is a millisecond after it.
        assert_eq!(
            next_suffix(&active, Some("29991231T235959.998Z")),
            "29991231T235959.999Z"
        );
        std::fs::write(with_suffix(&active, "29991231T235959.999Z"), b"").unwrap();
        assert_eq!(
            next_suffix(&active, Some("29991231T235959.998Z")),
            "30000101T000000.000Z"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_splits_the_log_between_batches_and_chains_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        let config: AuditConfig =
            serde_json::from_value(serde_json::json!({ "file": active, "rotate_bytes": 300 })).unwrap();
        let log = Arc::new(AuditLog::open(&config).unwrap());
        for t in emit_concurrently(&log, 400) {
            t.await.unwrap().unwrap();
        }
        let mut files = rotated_files(&active).unwrap();
        assert!(files.len() >= 5, "{} rotated files", files.len());
        files.push(active.clone());
        let mut seen = Vec::new();
        let mut previous: Option<(String, u64)> = None;
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.ends_with('\n'), "{} ends with a whole line", f.display());
            let mut lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
            if let Some((name, bytes)) = previous.take() {
                let head = lines.next().unwrap();
                assert_eq!(head["event"], "audit_rotated");
                assert_eq!(head["previous_file"], name.as_str());
                assert_eq!(head["previous_bytes"], bytes);
            }
            seen.extend(lines.map(|v| v["n"].as_u64().unwrap()));
            let len = text.len() as u64;
            if f != &active {
                assert!(len >= 300, "{} rotated at {len} bytes", f.display());
            }
            previous = Some((f.file_name().unwrap().to_string_lossy().into_owned(), len));
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..400).collect::<Vec<_>>(), "every event once, in some file");
        // A restart continues the chain after the newest file.
        drop(log);
        let log = AuditLog::open(&config).unwrap();
        log.emit_line(b"{\"n\":400}\n").await.unwrap();
        let newest = rotated_files(&active).unwrap().pop().unwrap();
        assert_eq!(newest, files[files.len() - 2], "no rotation yet: the file is small");
        let size_before = std::fs::metadata(&active).unwrap().len();
        for i in 401..440 {
            log.emit_line(format!("{{\"n\":{i}}}\n").as_bytes()).await.unwrap();
        }
        let after = rotated_files(&active).unwrap();
        assert!(after.len() > files.len() - 1 && after.last().unwrap() > &newest);
        assert!(size_before < 300);
    }

    #[tokio::test]
    async fn a_rotation_that_fails_keeps_every_event_in_the_current_file_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        // The new file cannot be created: a directory has its name.
        std::fs::create_dir(with_suffix(&active, "rotating")).unwrap();
        let config: AuditConfig =
            serde_json::from_value(serde_json::json!({ "file": active, "rotate_bytes": 80 })).unwrap();
        let log = AuditLog::open(&config).unwrap();
        for i in 0..30 {
            log.emit_line(format!("{{\"n\":{i}}}\n").as_bytes()).await.unwrap();
        }
        assert!(rotated_files(&active).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&active).unwrap().lines().count(), 30);
        assert!(log.is_healthy(), "a failed rotation is not a failed write");
        std::fs::remove_dir(with_suffix(&active, "rotating")).unwrap();
        // Tried again once another eighth of `rotate_bytes` (10 bytes: two lines) is written.
        log.emit_line(b"{\"n\":30}\n").await.unwrap();
        log.emit_line(b"{\"n\":31}\n").await.unwrap();
        let rotated = rotated_files(&active).unwrap();
        assert_eq!(rotated.len(), 1);
        assert_eq!(std::fs::read_to_string(&rotated[0]).unwrap().lines().count(), 32);
    }

    #[tokio::test]
    async fn a_new_name_sorts_after_the_one_the_current_file_names_even_once_that_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        // The files before were shipped and deleted; the current file still says which came last
        // (here from a clock that ran far ahead).
        std::fs::write(
            &active,
            "{\"ts\":\"2999-12-31T23:59:59.998Z\",\"event\":\"audit_rotated\",\"previous_file\":\"audit.jsonl.29991231T235959.998Z\",\"previous_bytes\":10,\"trigger\":\"size\"}\n",
        )
        .unwrap();
        let config: AuditConfig = serde_json::from_value(serde_json::json!({ "file": active })).unwrap();
        let log = AuditLog::open(&config).unwrap();
        let r = log.rotate_now("test").unwrap().unwrap();
        assert_eq!(r.previous_file, "audit.jsonl.29991231T235959.999Z");
    }
}
