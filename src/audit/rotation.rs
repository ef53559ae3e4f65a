//! Rotation of the audit file: by size (`audit.rotate_bytes`) between batches, or by an
//! operator (`POST /admin/audit/rotate`). The full file keeps its events under a name with
//! its rotation time, and the new file opens with an `audit_rotated` event naming it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use super::events::{AuditRotated, Event, rfc3339_millis};
use super::file::{Active, FileSink};

impl FileSink {
    /// Starts a new file; the full one keeps its events under a name that sorts after every
    /// earlier one. Runs under the file's lock, between whole batches, so no line is split and
    /// none lands in the wrong file. A failure keeps the current file (nothing is lost) and is
    /// tried again after another eighth of `rotate_bytes`.
    pub(super) fn rotate(&self, active: &mut Active) {
        match self.try_rotate(active, Trigger::Size) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %self.path.display(), "audit file rotation failed, still writing to the current file: {e}");
                active.rotate_at = active.len + (self.rotate_bytes / 8).max(1);
            }
        }
    }

    pub(super) fn try_rotate(&self, active: &mut Active, trigger: Trigger<'_>) -> std::io::Result<Rotated> {
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
        let mut next = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(&fresh)?;
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
            next = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.path)?;
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
        let line = AuditRotated {
            previous_file: &previous_file,
            previous_bytes,
            trigger,
            by,
        }
        .to_line();
        // The rotation is done either way; a failed first line is the next batch's failure too.
        // Its `prev` is the last line of the full file: the chain runs on across files.
        let written = active.write_chained(&line);
        let written = written.and_then(|()| if self.sync { active.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), "audit file rotated, but its first event could not be written: {e}");
        }
        Ok(Rotated {
            previous_file,
            previous_bytes,
        })
    }
}

/// The newest rotation's suffix: the newest rotated file, or the one the current file's first
/// line names if that is newer (rotated files are deleted once shipped; a new name must still
/// sort after every name a shipper has seen).
pub(super) fn newest_rotation(active: &Path) -> std::io::Result<Option<String>> {
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
    Admin { by: super::By<'a> },
}

/// A rotation done: the file that now holds the events before it.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    pub previous_file: String,
    pub previous_bytes: u64,
}

/// `path` with `.suffix` appended to its file name.
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
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
pub(super) fn suffix_time(suffix: &str) -> Option<SystemTime> {
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
pub(super) fn next_suffix(active: &Path, newest: Option<&str>) -> String {
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
