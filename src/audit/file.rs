//! The audit file: events appended by group commit, one pending buffer per thread (see the
//! module doc of `audit` for why), and a failed write reported to every caller whose line it
//! held.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use super::AuditError;
use super::chain::{self, Chain, CheckpointKey};
use crate::config::AuditConfig;
use crate::per_thread;

/// Bytes waiting to be written; beyond this, calls fail closed rather than buffer without bound.
const MAX_BUFFERED: usize = 64 * 1024 * 1024;
/// Failed batches remembered so each waiter can learn whether its own line failed.
const FAILURES_KEPT: usize = 256;
/// A batch buffer up to this size is kept for the next batch; a larger one (a burst) is freed.
const SPARE_KEPT: usize = 1024 * 1024;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
pub(super) struct FileSink {
    pub(super) path: PathBuf,
    pub(super) file: Mutex<Active>,
    /// Lines waiting to be written, one buffer per thread.
    pending: Box<[per_thread::Shard<Mutex<Pending>>]>,
    pub(super) sync: bool,
    /// Rotate once the file holds this many bytes (0: never).
    pub(super) rotate_bytes: u64,
    /// Signs checkpoints (`audit.checkpoint_key_file`); none: no checkpoints.
    pub(super) checkpoint_key: Option<CheckpointKey>,
}

/// The file being appended to, and what rotation needs to know of it.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) file: File,
    /// Its length, as written by this process (and found at open).
    pub(super) len: u64,
    /// The next rotation is tried at this length (later than `rotate_bytes` after a failure).
    pub(super) rotate_at: u64,
    /// The newest rotated file's suffix: a new one must sort after it (looked up at the first
    /// rotation).
    pub(super) newest: Option<String>,
    /// The hash of the last line written (`chain`).
    pub(super) chain: Chain,
    /// The batch with each line's `prev`, reused from batch to batch.
    linked: Vec<u8>,
}

impl Active {
    /// Writes whole `lines`, chained, and counts them in `len`. After a failed write the
    /// chain and the length are read again from the file, whatever part of it was written.
    pub(super) fn write_chained(&mut self, lines: &[u8]) -> std::io::Result<()> {
        let mut linked = std::mem::take(&mut self.linked);
        linked.clear();
        let before = self.chain;
        self.chain.link(lines, &mut linked);
        let written = self.file.write_all(&linked);
        match &written {
            Ok(()) => self.len += linked.len() as u64,
            Err(_) => {
                self.chain = before;
                if let Ok((chain, _)) = chain::resume(&mut self.file) {
                    self.chain = chain;
                }
                self.len = self.file.metadata().map_or(self.len, |m| m.len());
            }
        }
        if linked.capacity() <= SPARE_KEPT {
            self.linked = linked;
        }
        written
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
    /// Opens (creating it and its directory) the file `path` for appending.
    pub(super) fn open(path: &PathBuf, config: &AuditConfig) -> Result<FileSink, AuditError> {
        let open_error = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_error)?;
        }
        // Read too (to resume the chain), unless it is a pipe or a device: a pipe opened for
        // reading by its writer would never report a reader gone.
        let regular = std::fs::metadata(path).map_or(true, |m| m.is_file());
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(regular)
            .open(path)
            .map_err(open_error)?;
        // The chain goes on from the file's last whole line; a line torn by a crash while it
        // was written (never acknowledged to anyone) is cut off first.
        let (mut chain, torn) = chain::resume(&mut f).map_err(open_error)?;
        // An empty file after a rotation (a crash between the rename and its first line): the
        // chain goes on from the newest rotated file.
        if chain.head == chain::GENESIS
            && let Some(newest) = super::rotated_files(path).ok().and_then(|mut all| all.pop())
            && let Ok(mut previous) = File::open(&newest)
        {
            let len = previous.metadata().map_or(0, |m| m.len());
            let ends_whole = len > 0
                && previous.seek(std::io::SeekFrom::End(-1)).is_ok()
                && std::io::Read::bytes(&mut previous).next().and_then(Result::ok) == Some(b'\n');
            if ends_whole && let Ok((found, _)) = chain::resume(&mut previous) {
                chain = found;
            }
        }
        if torn > 0 {
            tracing::warn!(path = %path.display(), bytes = torn, "the audit file ended with an incomplete line (a write cut short); it was removed");
        }
        let len = f.metadata().map_err(open_error)?.len();
        let checkpoint_key = config
            .checkpoint_key_file
            .as_ref()
            .map(|p| CheckpointKey::read(p))
            .transpose()
            .map_err(|e| open_error(std::io::Error::other(e)))?;
        Ok(FileSink {
            path: path.clone(),
            file: Mutex::new(Active {
                file: f,
                len,
                rotate_at: config.rotate_bytes,
                newest: None,
                chain,
                linked: Vec::new(),
            }),
            pending: per_thread::shards(),
            sync: config.fsync,
            rotate_bytes: config.rotate_bytes,
            checkpoint_key,
        })
    }

    pub(super) async fn append(&self, line: &[u8]) -> Result<(), AuditError> {
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
                active.write_chained(&batch)?;
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
    /// Writes an `audit_checkpoint`: the chain's head, signed, if a key is configured. Under
    /// the file's lock, so the head is the line just before it.
    pub(super) fn checkpoint(&self, trigger: &str) -> std::io::Result<bool> {
        let Some(key) = &self.checkpoint_key else {
            return Ok(false);
        };
        let mut active = lock(&self.file);
        let at = crate::state::unix_now_ms();
        let head = hex::encode(active.chain.head);
        let line = super::Event::to_line(&chain::Checkpoint {
            signed_at_ms: at,
            head: &head,
            key_id: &key.id,
            signature: &key.sign(&active.chain.head, at),
            trigger,
        });
        active.write_chained(&line)?;
        if self.sync {
            active.file.sync_data()?;
        }
        Ok(true)
    }
}
