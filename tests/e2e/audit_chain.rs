//! The tamper-evident audit trail, through the real binary: a day's worth of calls written
//! across rotated files with signed checkpoints verifies whole; editing, deleting or
//! reordering one line, or removing a rotated file, is reported at the right place; a
//! `kill -9` while writing leaves a trail that verifies up to its last whole line, and a
//! restart carries the chain on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{SUPPORT_KEY, Serving, TestUpstream, listeners, try_send, write_fixture_policies};

const KEY: &str = "0123456789abcdef0123456789abcdef-checkpoint-key";

fn serve(dir: &Path) -> (Serving, String) {
    let d = dir.display();
    let cfg = dir.join("toolgate.yaml");
    std::fs::write(dir.join("checkpoint.key"), KEY).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\npolicies: {d}/policies\napprovals: {{ store: {d}/approvals.redb }}\naudit: {{ file: {d}/audit/audit.jsonl, rotate_bytes: 4000, checkpoint_key_file: {d}/checkpoint.key, checkpoint_seconds: 1 }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (data, _, log) = listeners(&mut child);
    std::thread::spawn(move || log.map_while(Result::ok).for_each(drop));
    (Serving(child), data)
}

/// A call's status; 0 when the gateway did not answer.
async fn call(data: &str, n: usize) -> u16 {
    try_send(
        "POST",
        &format!("{data}/v1/tools/kb.search"),
        &[("authorization", format!("Bearer {SUPPORT_KEY}"))],
        format!(r#"{{"query": "question {n}"}}"#).into_bytes(),
    )
    .await
    .map_or(0, |r| r.status)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // Rotated files by their time (their names sort so), the live file last.
    all.sort();
    all.rotate_left(1);
    assert!(all.last().unwrap().ends_with("audit.jsonl"), "{all:?}");
    all
}

/// `toolgate audit verify` on `files` (with the key): (exit code, stdout).
fn verify(files: &[PathBuf], key: Option<&Path>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    cmd.args(["audit", "verify"]).args(files);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A copy of the trail in a new directory, for tampering with.
fn copy(files: &[PathBuf]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let copies = files
        .iter()
        .map(|f| {
            let to = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &to).unwrap();
            to
        })
        .collect();
    (dir, copies)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_verifies_and_every_kind_of_tampering_is_found_where_it_happened() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_policies(&dir.path().join("policies"), &upstream.url);
    let (mut gw, data) = serve(dir.path());
    for n in 0..20 {
        assert_eq!(call(&data, n).await, 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await; // an interval checkpoint
    for n in 20..40 {
        assert_eq!(call(&data, n).await, 200);
    }
    // SIGTERM: the last line is the shutdown checkpoint.
    Command::new("kill")
        .arg("-TERM")
        .arg(gw.0.id().to_string())
        .status()
        .unwrap();
    assert!(gw.0.wait().unwrap().success());
    let trail = files(dir.path());
    assert!(trail.len() >= 4, "rotated into several files: {trail:?}");
    let key = dir.path().join("checkpoint.key");
    let (code, out) = verify(&trail, Some(&key));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: ") && out.contains("the chain is whole"), "{out}");
    assert!(!out.contains("does not end with a checkpoint"), "{out}");
    let last: serde_json::Value = serde_json::from_str(lines(trail.last().unwrap()).last().unwrap()).unwrap();
    assert_eq!(
        (&last["event"], &last["trigger"]),
        (&"audit_checkpoint".into(), &"shutdown".into())
    );

    // Rotated files, oldest first (the live file last): tamper with the second one.
    let target = 1;
    let name = |copies: &[PathBuf]| copies[target].display().to_string();

    // An edited line: the chain breaks at the line after it.
    let (_d, copies) = copy(&trail);
    let mut l = lines(&copies[target]);
    l[2] = l[2].replacen("support-bot", "suppor7-bot", 1);
    write_lines(&copies[target], &l);
    let (code, out) = verify(&copies, Some(&key));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("BROKEN at {}:4:", name(&copies))), "{out}");

    // A deleted line: broken where it was.
    let (_d, copies) = copy(&trail);
    let mut l = lines(&copies[target]);
    l.remove(2);
    write_lines(&copies[target], &l);
    let (code, out) = verify(&copies, None);
    assert_eq!(code, 1);
    assert!(out.contains(&format!("BROKEN at {}:3:", name(&copies))), "{out}");

    // Two lines swapped: broken at the first of them.
    let (_d, copies) = copy(&trail);
    let mut l = lines(&copies[target]);
    l.swap(2, 3);
    write_lines(&copies[target], &l);
    let (code, out) = verify(&copies, None);
    assert_eq!(code, 1);
    assert!(out.contains(&format!("BROKEN at {}:3:", name(&copies))), "{out}");

    // A rotated file removed: the next file's first line names the missing one.
    let (_d, mut copies) = copy(&trail);
    let removed = copies.remove(target);
    let missing = removed.file_name().unwrap().to_string_lossy().into_owned();
    let (code, out) = verify(&copies, None);
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!("BROKEN at {}:1:", copies[target].display())) && out.contains(&missing),
        "{out}"
    );

    // A forged checkpoint (another key): the chain is whole, but the signature is not ours.
    let other = dir.path().join("other.key");
    std::fs::write(&other, "another-key-of-at-least-32-bytes-long!!").unwrap();
    let (code, out) = verify(&trail, Some(&other));
    assert_eq!(code, 1);
    assert!(out.contains("signature does not verify"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_writing_leaves_a_trail_that_verifies_and_a_restart_carries_it_on() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_policies(&dir.path().join("policies"), &upstream.url);
    let (mut gw, data) = serve(dir.path());
    let load: Vec<_> = (0..4)
        .map(|t| {
            let data = data.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    if call(&data, t * 100_000 + n).await == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    gw.0.kill().unwrap(); // SIGKILL, mid-write
    gw.0.wait().unwrap();
    for l in load {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), l).await;
    }
    // Whatever the kill cut short, what was written whole verifies.
    let mut live = files(dir.path()).pop().unwrap();
    let mut text = std::fs::read(&live).unwrap();
    if text.ends_with(b"\n") {
        // The kill fell between two writes: tear the last line as a kill mid-write would.
        text.truncate(text.len() - 7);
        std::fs::write(&live, &text).unwrap();
    }
    let (code, out) = verify(&files(dir.path()), None);
    assert_eq!(code, 0, "{out}");
    // (An empty live file: the kill fell between a rotation and its first line.)
    assert_eq!(out.contains("the last line is incomplete"), !text.is_empty(), "{out}");
    assert!(out.contains("does not end with a checkpoint"), "{out}");

    // Restarted on the same files: the torn line is cut, and the chain goes on from the last
    // whole line through the new calls and the shutdown checkpoint.
    let (gw, data) = serve(dir.path());
    assert_eq!(call(&data, 1).await, 200);
    Command::new("kill")
        .arg("-TERM")
        .arg(gw.0.id().to_string())
        .status()
        .unwrap();
    let mut gw = gw;
    gw.0.wait().unwrap();
    live = files(dir.path()).pop().unwrap();
    assert!(std::fs::read(&live).unwrap().ends_with(b"\n"));
    let (code, out) = verify(&files(dir.path()), Some(&dir.path().join("checkpoint.key")));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("incomplete") && !out.contains("does not end"), "{out}");
}
