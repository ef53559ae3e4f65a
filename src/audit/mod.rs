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

pub mod chain;
pub mod cloudwatch;
mod events;
mod file;
mod line;
mod rotation;
mod unknown;

pub use events::{
    ActionNotDone, AdminRefused, AdminSignedIn, AgentQuarantined, AgentReleased, Anomaly, ApprovalDecided,
    AuditRotated, By, CallForwarding, Event, PolicyReloadFailed, PolicyReloaded, RecordedArguments, RefusalsSummarized,
    RequestRefused, ShadowVerdict, Timestamp, Tokens, ToolApproved, ToolCallEvent, ToolDefinitionChanged, ToolHeld,
    ToolPinned, UpstreamInfo, format_unix, is_safe_text, millis, now, recorded,
};
pub use rotation::{Rotated, Trigger, rotated_files, rotation_suffix};

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::AuditConfig;
use file::{FileSink, lock};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot write the audit event: {0}")]
    Write(Arc<std::io::Error>),
    #[error("more than {0} bytes of audit events are waiting to be written; refusing rather than buffering more")]
    Backlog(usize),
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

impl AuditLog {
    /// Opens the sinks, creating the file and its directory.
    pub fn open(config: &AuditConfig) -> Result<Self, AuditError> {
        let file = config
            .file
            .as_ref()
            .map(|path| FileSink::open(path, config))
            .transpose()?;
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
    pub async fn emit<E: Event>(&self, event: &E) -> Result<(), AuditError> {
        self.emit_line(&event.to_line()).await
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
            lines.extend_from_slice(&event.to_line());
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
            .map(|e| String::from_utf8_lossy(e.to_line().trim_ascii_end()).into_owned())
            .collect()
    }

    /// Rotates the file now (`POST /admin/audit/rotate`), whatever its size: between two
    /// batches, as a size rotation. `Ok(None)` if there is no file.
    pub fn rotate_now(&self, by: By<'_>) -> std::io::Result<Option<Rotated>> {
        let Some(sink) = &self.file else { return Ok(None) };
        let mut active = lock(&sink.file);
        sink.try_rotate(&mut active, Trigger::Admin { by }).map(Some)
    }

    /// Writes a signed `audit_checkpoint` of the chain's head (`interval` or `shutdown`), if
    /// `audit.checkpoint_key_file` is set. `Ok(false)`: no key, nothing written.
    pub fn checkpoint(&self, trigger: &str) -> std::io::Result<bool> {
        match &self.file {
            Some(sink) => sink.checkpoint(trigger),
            None => Ok(false),
        }
    }

    /// For events whose writer cannot refuse anything (reloads, anomalies, admin actions): a
    /// failure is logged as an error with the event kind, never dropped silently.
    pub async fn emit_or_log<E: Event>(&self, event: &E) {
        if let Err(e) = self.emit(event).await {
            tracing::error!(event = E::NAME, "audit event could not be written: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::events::*;
    use super::rotation::*;
    use super::*;
    use futures_util::FutureExt;
    use serde_json::Value;
    use std::path::Path;
    use std::time::Duration;

    /// The lines without their chain (`prev`), as they were emitted.
    fn unchained(text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let cut = line.find(",\"prev\":\"").unwrap_or(line.len() - 1);
            out.push_str(&line[..cut]);
            out.push_str("}\n");
        }
        out
    }

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
        let text = unchained(&std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap());
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
        let text = unchained(&std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap());
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
        // The stalled writer finishes its own buffer when it runs.
        runtime().block_on(stalled).unwrap();
        let text = unchained(&std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap());
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
            serde_json::from_value(serde_json::json!({ "file": active, "rotate_bytes": 1000 })).unwrap();
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
                assert!(len >= 1000, "{} rotated at {len} bytes", f.display());
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
        assert!(size_before < 1000);
    }

    #[tokio::test]
    async fn a_rotation_that_fails_keeps_every_event_in_the_current_file_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        // The new file cannot be created: a directory has its name.
        std::fs::create_dir(with_suffix(&active, "rotating")).unwrap();
        let config: AuditConfig =
            serde_json::from_value(serde_json::json!({ "file": active, "rotate_bytes": 800 })).unwrap();
        let log = AuditLog::open(&config).unwrap();
        for i in 0..30 {
            log.emit_line(format!("{{\"n\":{i}}}\n").as_bytes()).await.unwrap();
        }
        assert!(rotated_files(&active).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&active).unwrap().lines().count(), 30);
        assert!(log.is_healthy(), "a failed rotation is not a failed write");
        std::fs::remove_dir(with_suffix(&active, "rotating")).unwrap();
        // Tried again once another eighth of `rotate_bytes` (100 bytes: two lines) is written.
        log.emit_line(b"{\"n\":30}\n").await.unwrap();
        log.emit_line(b"{\"n\":31}\n").await.unwrap();
        let rotated = rotated_files(&active).unwrap();
        assert_eq!(rotated.len(), 1);
        let events = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("{\"n\""))
                .count()
        };
        assert_eq!(events(&rotated[0]) + events(&active), 32, "every event, once");
        assert!(events(&rotated[0]) >= 31);
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
        let r = log.rotate_now(By::gateway("test")).unwrap().unwrap();
        assert_eq!(r.previous_file, "audit.jsonl.29991231T235959.999Z");
    }
}
