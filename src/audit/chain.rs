//! The tamper-evident chain of the audit file: every line carries `"prev"`, the SHA-256 (hex)
//! of the line before it as written, so editing, deleting or reordering a line breaks the
//! chain at the next one. The first line of a rotated-to file (`audit_rotated`) carries the
//! hash of the last line of the file before it, so the chain runs across rotation; a removed
//! file breaks it where the next file begins. At intervals and at shutdown the writer adds an
//! `audit_checkpoint` line: the chain's head, signed (HMAC-SHA256) with a key from a file, so
//! a verifier holding the key knows the trail up to there is what toolgate wrote.
//!
//! `prev` is added as the line is written, under the file's lock — the only place the order
//! of lines is known — by appending it as the last member of the line's JSON object. The
//! verifier is `toolgate audit verify` ([`verify`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The head of a chain that starts in this file (no line before it).
pub const GENESIS: [u8; 32] = [0; 32];
/// How far back from the end of a file its last line is looked for when appending resumes.
const TAIL: u64 = 4 * 1024 * 1024;

/// The chain as the writer keeps it: the hash of the last line written.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    pub head: [u8; 32],
}

impl Chain {
    /// Appends `lines` (whole lines, each ending in `\n`, each a JSON object) to `out`, each with
    /// its `prev`, and advances the head.
    pub fn link(&mut self, lines: &[u8], out: &mut Vec<u8>) {
        out.reserve(lines.len() + lines.len() / 8);
        for line in lines.split_inclusive(|b| *b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let start = out.len();
            match body.strip_suffix(b"}") {
                Some(open) if open.len() > 1 => {
                    out.extend_from_slice(open);
                    out.extend_from_slice(b",\"prev\":\"");
                    let mut hex = [0u8; 64];
                    hex::encode_to_slice(self.head, &mut hex).expect("64 hex digits");
                    out.extend_from_slice(&hex);
                    out.extend_from_slice(b"\"}");
                }
                // Not an object (never written by toolgate): chained as it is.
                _ => out.extend_from_slice(body),
            }
            self.head = Sha256::digest(&out[start..]).into();
            out.push(b'\n');
        }
    }
}

/// Where an existing file's chain stands, for appending to it: the hash of its last whole line
/// (or [`GENESIS`] for an empty file). A torn last line — the process was killed while writing
/// it, so nobody was told it was written — is cut off, and its length returned.
pub fn resume(file: &mut File) -> std::io::Result<(Chain, u64)> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        // A device (`/dev/full` in tests, a pipe): nothing to read back.
        return Ok((Chain { head: GENESIS }, 0));
    }
    let len = meta.len();
    let from = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::with_capacity((len - from) as usize);
    Read::take(&mut *file, len - from).read_to_end(&mut tail)?;
    let whole = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if from == 0 => 0,
        // One line longer than the tail read: nothing toolgate writes; start anew.
        None => return Ok((Chain { head: GENESIS }, 0)),
    };
    let torn = (tail.len() - whole) as u64;
    if torn > 0 {
        file.set_len(len - torn)?;
    }
    let lines = &tail[..whole];
    let last = lines
        .strip_suffix(b"\n")
        .map(|l| l.rsplit(|b| *b == b'\n').next().unwrap_or(l));
    let head = match last {
        Some(l) if !l.is_empty() => Sha256::digest(l).into(),
        _ => GENESIS,
    };
    Ok((Chain { head }, torn))
}

/// The key that signs checkpoints, read from `audit.checkpoint_key_file`.
#[derive(Clone)]
pub struct CheckpointKey {
    key: Vec<u8>,
    /// The first 16 hex digits of the key's SHA-256: which key signed, without revealing it.
    pub id: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey").field("id", &self.id).finish()
    }
}

impl CheckpointKey {
    /// The key in `path`: its bytes, surrounding whitespace trimmed; at least 32 bytes.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let key = bytes.trim_ascii().to_vec();
        if key.len() < 32 {
            return Err(format!(
                "{} holds {} bytes: a checkpoint key needs at least 32 (e.g. `openssl rand -hex 32 > {}`)",
                path.display(),
                key.len(),
                path.display()
            ));
        }
        let id = hex::encode(&Sha256::digest(&key)[..8]);
        Ok(Self { key, id })
    }

    /// The signature of a chain head as of `at_ms` (Unix milliseconds).
    pub fn sign(&self, head: &[u8; 32], at_ms: u64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(b"toolgate-audit-checkpoint\0");
        mac.update(&head[..]);
        mac.update(&at_ms.to_be_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// `audit_checkpoint`: the chain's head signed, written by the writer itself.
#[derive(Debug, Serialize)]
pub struct Checkpoint<'a> {
    /// When the head was signed, Unix milliseconds (covered by the signature).
    pub signed_at_ms: u64,
    /// The hash of the line before this one (equal to this line's `prev`).
    pub head: &'a str,
    pub key_id: &'a str,
    pub signature: &'a str,
    /// `interval` or `shutdown`.
    pub trigger: &'a str,
}

impl super::Event for Checkpoint<'_> {
    const NAME: &'static str = "audit_checkpoint";
}

/// What `audit verify` found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub files: Vec<String>,
    pub lines: u64,
    pub checkpoints: u64,
    /// Checkpoints whose signature was checked with the key (`--key`).
    pub checkpoints_verified: u64,
    /// Lines from before the chain existed (no `prev`), at the start of the trail.
    pub unchained: u64,
    /// The first break, if any: where, and what is wrong.
    pub broken: Option<Break>,
    /// A torn last line (a write cut short): not an event, reported apart.
    pub torn_tail: Option<String>,
    /// Whether the trail ends with a checkpoint (a clean shutdown, or nothing after the last one).
    pub ends_with_checkpoint: bool,
}

#[derive(Debug, Serialize)]
pub struct Break {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

/// Orders audit files as they were written: rotated files (`<name>.<UTC time>`) by their time,
/// then the file being written (`<name>`).
pub fn in_written_order(mut files: Vec<PathBuf>) -> Vec<PathBuf> {
    // The suffix is `YYYYMMDDTHHMMSS.mmmZ` (20 characters), after a dot.
    let key = |p: &PathBuf| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rotated = name.len().checked_sub(21).and_then(|dot| {
            let suffix = name.get(dot + 1..)?;
            let shaped = name.as_bytes()[dot] == b'.' && suffix.as_bytes()[8] == b'T' && suffix.ends_with('Z');
            shaped.then(|| (name[..dot].to_owned(), suffix.to_owned()))
        });
        match rotated {
            Some((base, suffix)) => (base, 0, suffix),
            None => (name, 1, String::new()),
        }
    };
    files.sort_by_key(key);
    files
}

/// Checks the chain through `files` (in the order given), and each checkpoint's signature
/// when `key` is given. Stops at the first break.
pub fn verify(files: &[PathBuf], key: Option<&CheckpointKey>) -> std::io::Result<Report> {
    let mut report = Report::default();
    let mut head: Option<[u8; 32]> = None;
    let mut previous_name: Option<String> = None;
    for (n, path) in files.iter().enumerate() {
        let name = path.display().to_string();
        report.files.push(name.clone());
        let text = std::fs::read(path)?;
        let last_file = n + 1 == files.len();
        let mut in_file = 0u64;
        let mut rest: &[u8] = &text;
        while !rest.is_empty() {
            let (line, next, whole) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..], true),
                None => (rest, &rest[rest.len()..], false),
            };
            rest = next;
            in_file += 1;
            let fail = |reason: String| Break {
                file: name.clone(),
                line: in_file,
                reason,
            };
            if !whole {
                if last_file {
                    report.torn_tail = Some(format!(
                        "{name}:{in_file}: the last line is incomplete ({} bytes; a write cut short); everything before it verifies",
                        line.len()
                    ));
                    break;
                }
                report.broken = Some(fail("an incomplete line in the middle of the trail".to_owned()));
                return Ok(report);
            }
            let event: serde_json::Value = match serde_json::from_slice(line) {
                Ok(v) => v,
                Err(e) => {
                    report.broken = Some(fail(format!("not a JSON event ({e})")));
                    return Ok(report);
                }
            };
            let hash: [u8; 32] = Sha256::digest(line).into();
            let Some(prev) = event.get("prev").and_then(|p| p.as_str()) else {
                if head.is_none() || report.lines == report.unchained {
                    // Written before the chain existed: the chain starts after these.
                    report.unchained += 1;
                    report.lines += 1;
                    head = Some(hash);
                    continue;
                }
                report.broken = Some(fail(
                    "the line has no `prev`: it was not written by toolgate's chain".to_owned(),
                ));
                return Ok(report);
            };
            let expected = head.map(hex::encode);
            match expected {
                // The trail's first line: whatever came before it is not here to check.
                None => {}
                Some(e) if e == prev => {}
                Some(e) => {
                    let rotated_from = (event["event"] == "audit_rotated")
                        .then(|| event["previous_file"].as_str().map(str::to_owned))
                        .flatten();
                    let reason = match (in_file, rotated_from, &previous_name) {
                        (1, Some(named), Some(before)) if !before.ends_with(&named) => format!(
                            "the chain does not continue from {before}: this file follows {named}, which is missing"
                        ),
                        (1, _, Some(before)) => format!(
                            "the chain does not continue from the last line of {before} (expected prev {e}, found {prev})"
                        ),
                        _ => format!(
                            "expected prev {e} (the hash of the line before), found {prev}: a line before this one was edited, removed or moved"
                        ),
                    };
                    report.broken = Some(fail(reason));
                    return Ok(report);
                }
            }
            if event["event"] == "audit_checkpoint" {
                report.checkpoints += 1;
                if let Some(key) = key {
                    let at = event["signed_at_ms"].as_u64().unwrap_or(u64::MAX);
                    let signed = event["key_id"] == key.id.as_str()
                        && head.is_some_and(|h| {
                            event["head"].as_str() == Some(hex::encode(h).as_str())
                                && event["signature"].as_str() == Some(key.sign(&h, at).as_str())
                        });
                    if !signed {
                        report.broken = Some(fail(
                            "the checkpoint's signature does not verify with this key".to_owned(),
                        ));
                        return Ok(report);
                    }
                    report.checkpoints_verified += 1;
                }
            }
            report.ends_with_checkpoint = event["event"] == "audit_checkpoint";
            report.lines += 1;
            head = Some(hash);
        }
        previous_name = Some(name);
    }
    Ok(report)
}

/// Checks a chain whose lines come in another order than written — events exported from
/// CloudWatch Logs, which orders them by timestamp — by following each line's `prev` to the
/// line it names: whole when one chain runs through every line. Reports the first line that
/// links to nothing (a line missing before it), or a second line claiming the same
/// predecessor (one of them edited or inserted).
pub fn verify_any_order(path: &Path, key: Option<&CheckpointKey>) -> std::io::Result<Report> {
    use std::collections::HashMap;
    let text = std::fs::read(path)?;
    let name = path.display().to_string();
    let mut report = Report {
        files: vec![name.clone()],
        ..Report::default()
    };
    let mut lines = Vec::new();
    for (n, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let fail = |reason: String| Break {
            file: name.clone(),
            line: n as u64 + 1,
            reason,
        };
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
            report.broken = Some(fail("not a JSON event".to_owned()));
            return Ok(report);
        };
        let Some(prev) = event.get("prev").and_then(|p| p.as_str()).map(str::to_owned) else {
            report.broken = Some(fail("the line has no `prev`".to_owned()));
            return Ok(report);
        };
        let hash = hex::encode(Sha256::digest(line));
        lines.push((n as u64 + 1, prev, hash, event));
    }
    let hashes: HashMap<&str, usize> = lines.iter().enumerate().map(|(i, l)| (l.2.as_str(), i)).collect();
    let mut next: HashMap<&str, usize> = HashMap::new();
    for (i, (n, prev, ..)) in lines.iter().enumerate() {
        if let Some(other) = next.insert(prev.as_str(), i) {
            report.broken = Some(Break {
                file: name.clone(),
                line: *n,
                reason: format!(
                    "this line and line {} both follow the same line: one of them was edited or inserted",
                    lines[other].0
                ),
            });
            return Ok(report);
        }
    }
    // The first line: the one whose predecessor is not among these lines.
    let heads: Vec<usize> = (0..lines.len())
        .filter(|&i| !hashes.contains_key(lines[i].1.as_str()))
        .collect();
    let Some(&head) = heads.first() else {
        return Ok(report);
    };
    let mut at = Some(head);
    let mut last = None;
    while let Some(i) = at {
        let (_, prev, hash, event) = &lines[i];
        if event["event"] == "audit_checkpoint" {
            report.checkpoints += 1;
            if let Some(key) = key {
                let signed = event["key_id"] == key.id.as_str()
                    && <[u8; 32]>::try_from(hex::decode(prev).unwrap_or_default().as_slice()).is_ok_and(|h| {
                        event["signature"].as_str()
                            == Some(
                                key.sign(&h, event["signed_at_ms"].as_u64().unwrap_or(u64::MAX))
                                    .as_str(),
                            )
                    });
                if !signed {
                    report.broken = Some(Break {
                        file: name.clone(),
                        line: lines[i].0,
                        reason: "the checkpoint's signature does not verify with this key".to_owned(),
                    });
                    return Ok(report);
                }
                report.checkpoints_verified += 1;
            }
        }
        report.lines += 1;
        last = Some(i);
        at = next.get(hash.as_str()).copied();
    }
    report.ends_with_checkpoint = last.is_some_and(|i| lines[i].3["event"] == "audit_checkpoint");
    if let Some(&orphan) = heads.get(1) {
        report.broken = Some(Break {
            file: name.clone(),
            line: lines[orphan].0,
            reason: "this line does not follow any line here: a line before it was removed or edited".to_owned(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_names_the_hash_of_the_one_before() {
        let mut chain = Chain { head: GENESIS };
        let mut out = Vec::new();
        chain.link(b"{\"a\":1}\n{\"b\":2}\n", &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("{{\"a\":1,\"prev\":\"{}\"}}", "0".repeat(64)));
        let first = hex::encode(Sha256::digest(lines[0].as_bytes()));
        assert!(lines[1].ends_with(&format!("\"prev\":\"{first}\"}}")), "{}", lines[1]);
        assert_eq!(chain.head, <[u8; 32]>::from(Sha256::digest(lines[1].as_bytes())));
    }

    #[test]
    fn files_are_ordered_as_written() {
        let files = [
            "a/audit.jsonl",
            "a/audit.jsonl.20261207T152359.940Z",
            "a/audit.jsonl.20261201T000000.000Z",
        ];
        let ordered = in_written_order(files.iter().map(PathBuf::from).collect());
        assert_eq!(ordered, [files[2], files[1], files[0]].map(PathBuf::from));
    }

    #[test]
    fn resuming_cuts_a_torn_line_and_continues_from_the_last_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let (chain, torn) = resume(&mut f).unwrap();
        assert_eq!(torn, 5);
        assert_eq!(chain.head, <[u8; 32]>::from(Sha256::digest(b"{\"b\":2}")));
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        let (empty, _) = resume(&mut tempfile::tempfile().unwrap()).unwrap();
        assert_eq!(empty.head, GENESIS);
    }
}
