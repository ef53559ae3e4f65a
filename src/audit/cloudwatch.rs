//! Ships the audit file to CloudWatch Logs. The file is the spool: calls only ever wait for
//! the local append (as without this sink), and a shipper task follows the file, sending
//! complete lines in PutLogEvents batches within the service limits (10 000 events,
//! 1 048 576 bytes counted as message + 26 per event, 256 KiB per event, chronological within a
//! batch) and recording a checkpoint — the byte offset acknowledged — after each success.
//!
//! Nothing is lost: throttling or an outage only delays shipping (exponential backoff, up to
//! 30 s between tries) while calls keep flowing; after a restart shipping resumes at the
//! checkpoint. Nothing is sent twice: a crash between a successful PutLogEvents and writing the
//! checkpoint would re-send that batch, so on start the shipper reads back the stream's events
//! since the checkpoint's last timestamp and skips lines already there.
//! Backlog and lag are on `/metrics`.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_cloudwatchlogs::Client;
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::CloudWatchConfig;

/// The service's per-event overhead in the batch size.
const EVENT_OVERHEAD: usize = 26;
/// The service's largest event (message + overhead).
const MAX_EVENT: usize = 256 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    log_group: String,
    log_stream: String,
    /// The newest rotated file (`audit.rotate_bytes`) shipped whole: it and every file whose
    /// name sorts before it are in CloudWatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shipped_through: Option<String>,
    /// Bytes acknowledged by CloudWatch of the oldest file not shipped whole (the audit file
    /// itself when no rotated file is left).
    offset: u64,
    /// Timestamp (ms) of the last event shipped.
    last_ts_ms: i64,
    /// The file `offset` counts into (device, inode), so an offset is never applied to another
    /// file (one renamed so it sorts out of place, or replaced by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file_id: Option<(u64, u64)>,
}

pub struct Shipper {
    client: Client,
    group: String,
    stream: String,
    file: PathBuf,
    checkpoint_path: PathBuf,
    cfg: CloudWatchConfig,
}

impl Shipper {
    pub async fn new(cfg: CloudWatchConfig, file: PathBuf, region: Option<String>) -> Shipper {
        let client = Client::new(&crate::upstream::aws_sdk::sdk_config(region).await);
        let stream = cfg.log_stream.replace("{hostname}", &hostname());
        let checkpoint_path = cfg.checkpoint.clone().unwrap_or_else(|| {
            let mut p = file.clone().into_os_string();
            p.push(".cloudwatch");
            PathBuf::from(p)
        });
        Shipper {
            client,
            group: cfg.log_group.clone(),
            stream,
            file,
            checkpoint_path,
            cfg,
        }
    }

    /// Follows the file until `stop` is set.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut cp = self.load_checkpoint();
        let mut already = self.already_shipped(&cp).await;
        let mut backoff = Duration::from_millis(200);
        let mut ensured = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let Chunk {
                lines,
                consumed,
                backlog,
                file_id,
            } = match self.next_chunk(&mut cp) {
                Ok(r) => {
                    metrics::gauge!("toolgate_cloudwatch_backlog_bytes").set(r.backlog as f64);
                    r
                }
                Err(e) => {
                    // The backlog gauge keeps its last value: unknown is not zero.
                    metrics::counter!("toolgate_cloudwatch_errors_total").increment(1);
                    tracing::warn!(file = %self.file.display(), "cloudwatch shipper cannot read the audit file: {e}");
                    Chunk::default()
                }
            };
            let _ = backlog;
            metrics::gauge!("toolgate_cloudwatch_lag_seconds").set(
                lines
                    .first()
                    .map_or(0.0, |(ts, _)| (now_ms() - ts).max(0) as f64 / 1000.0),
            );
            if lines.is_empty() && consumed > 0 {
                // Only blank lines: nothing to send, but passed.
                cp.offset += consumed;
                cp.file_id = file_id;
                continue;
            }
            if lines.is_empty() {
                if self
                    .sleep(&mut stop, Duration::from_millis(self.cfg.flush_interval_ms))
                    .await
                {
                    return;
                }
                continue;
            }
            let read = lines.len();
            let mut events: Vec<(i64, String)> = lines
                .into_iter()
                .filter(|(_, msg)| already.is_empty() || !already.contains(msg))
                .collect();
            let skipped = read - events.len();
            events.sort_by_key(|(ts, _)| *ts);
            let last_ts = events.last().map_or(cp.last_ts_ms, |(ts, _)| *ts);
            if !ensured {
                self.ensure_destination().await;
                ensured = true;
            }
            let result = if events.is_empty() {
                Ok(())
            } else {
                let batch: Vec<InputLogEvent> = events
                    .iter()
                    .map(|(ts, msg)| {
                        InputLogEvent::builder()
                            .timestamp(*ts)
                            .message(msg.clone())
                            .build()
                            .expect("timestamp and message are set")
                    })
                    .collect();
                self.client
                    .put_log_events()
                    .log_group_name(&self.group)
                    .log_stream_name(&self.stream)
                    .set_log_events(Some(batch))
                    .send()
                    .await
                    .map(|out| {
                        if let Some(r) = out.rejected_log_events_info() {
                            tracing::warn!("cloudwatch rejected some events (too old, too new or expired): {r:?}");
                        }
                    })
                    .map_err(|e| aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e).to_string())
            };
            match result {
                Ok(()) => {
                    metrics::counter!("toolgate_cloudwatch_events_shipped_total").increment(events.len() as u64);
                    cp.offset += consumed;
                    cp.file_id = file_id;
                    cp.last_ts_ms = last_ts;
                    if let Err(e) = self.save_checkpoint(&cp) {
                        tracing::error!("cloudwatch shipper cannot write its checkpoint: {e}");
                    }
                    // The read-back matters until the lines shipped before the restart are passed.
                    if skipped == 0 {
                        already.clear();
                    }
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    metrics::counter!("toolgate_cloudwatch_errors_total").increment(1);
                    tracing::warn!(retry_in = ?backoff, "cloudwatch PutLogEvents failed, will retry: {e}");
                    if e.contains("ResourceNotFound") {
                        ensured = false;
                    }
                    if self.sleep(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The next lines to ship: from the oldest rotated file not shipped whole, else from the
    /// audit file. A rotated file no longer grows: read to its end, it is recorded as shipped
    /// and the next one starts at offset 0. The checkpoint's offset stays right across a
    /// rotation because a rotation renames the file being read, and the renamed file is then
    /// the oldest one not shipped whole.
    fn next_chunk(&self, cp: &mut Checkpoint) -> std::io::Result<Chunk> {
        loop {
            let unshipped = self.unshipped(cp)?;
            if let Some(oldest) = unshipped.first() {
                let mut chunk = read_lines(&mut std::fs::File::open(oldest)?, cp.offset, &self.cfg)?;
                if !offset_fits(cp, &chunk, oldest) {
                    continue;
                }
                if chunk.lines.is_empty() && chunk.consumed == 0 {
                    if chunk.backlog > 0 {
                        tracing::warn!(file = %oldest.display(), bytes = chunk.backlog, "a rotated audit file ends without a newline; its last bytes are not shipped");
                    }
                    cp.shipped_through = oldest.file_name().map(|n| n.to_string_lossy().into_owned());
                    cp.offset = 0;
                    cp.file_id = None;
                    if let Err(e) = self.save_checkpoint(cp) {
                        tracing::error!("cloudwatch shipper cannot write its checkpoint: {e}");
                    }
                    continue;
                }
                chunk.backlog += unshipped[1..]
                    .iter()
                    .chain([&self.file])
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum::<u64>();
                return Ok(chunk);
            }
            let mut active = match std::fs::File::open(&self.file) {
                // Between a rotation's two renames.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.unshipped(cp)?.is_empty() => continue,
                other => other?,
            };
            // A rotation between the listing and the open: the file opened may be the new one.
            if !self.unshipped(cp)?.is_empty() {
                continue;
            }
            let chunk = read_lines(&mut active, cp.offset, &self.cfg)?;
            if !offset_fits(cp, &chunk, &self.file) {
                continue;
            }
            return Ok(chunk);
        }
    }

    /// Rotated files not shipped whole, oldest first.
    fn unshipped(&self, cp: &Checkpoint) -> std::io::Result<Vec<PathBuf>> {
        let mut files = crate::audit::rotated_files(&self.file)?;
        if let Some(through) = &cp.shipped_through {
            files.retain(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().as_ref() > through.as_str())
            });
        }
        Ok(files)
    }

    /// Sleeps; true if asked to stop.
    async fn sleep(&self, stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.changed() => true,
        }
    }

    async fn ensure_destination(&self) {
        if let Err(e) = self.client.create_log_group().log_group_name(&self.group).send().await
            && !e
                .as_service_error()
                .is_some_and(|s| s.is_resource_already_exists_exception())
        {
            tracing::warn!(
                "cloudwatch CreateLogGroup: {}",
                aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e)
            );
        }
        if let Err(e) = self
            .client
            .create_log_stream()
            .log_group_name(&self.group)
            .log_stream_name(&self.stream)
            .send()
            .await
            && !e
                .as_service_error()
                .is_some_and(|s| s.is_resource_already_exists_exception())
        {
            tracing::warn!(
                "cloudwatch CreateLogStream: {}",
                aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e)
            );
        }
    }

    fn load_checkpoint(&self) -> Checkpoint {
        let cp: Checkpoint = std::fs::read(&self.checkpoint_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if cp.log_group == self.group && cp.log_stream == self.stream {
            cp
        } else {
            // A new destination gets the whole file.
            Checkpoint {
                log_group: self.group.clone(),
                log_stream: self.stream.clone(),
                ..Checkpoint::default()
            }
        }
    }

    fn save_checkpoint(&self, cp: &Checkpoint) -> std::io::Result<()> {
        let tmp = self.checkpoint_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(cp).expect("JSON serialises"))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.checkpoint_path)
    }

    /// The messages already in the stream since the checkpoint's last event: what a crash after
    /// PutLogEvents and before the checkpoint left shipped but not recorded.
    async fn already_shipped(&self, cp: &Checkpoint) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut token: Option<String> = None;
        for _ in 0..20 {
            let mut req = self
                .client
                .get_log_events()
                .log_group_name(&self.group)
                .log_stream_name(&self.stream)
                .start_from_head(true)
                .start_time(cp.last_ts_ms);
            if let Some(t) = &token {
                req = req.next_token(t);
            }
            let Ok(out) = req.send().await else { break };
            let events = out.events();
            if events.is_empty() {
                break;
            }
            seen.extend(events.iter().filter_map(|e| e.message().map(str::to_owned)));
            let next = out.next_forward_token().map(str::to_owned);
            if next == token {
                break;
            }
            token = next;
        }
        seen
    }
}

/// What one read of the spool found.
#[derive(Default)]
struct Chunk {
    /// Complete lines within the batch limits: `(timestamp ms, message)`.
    lines: Vec<(i64, String)>,
    /// The bytes they span.
    consumed: u64,
    /// Bytes not yet shipped, in this file and any later one.
    backlog: u64,
    /// The file read (device, inode).
    file_id: Option<(u64, u64)>,
}

/// Whether the checkpoint's offset counts into the file `chunk` was read from. If not (a file
/// whose name no longer sorts in its place, or one replaced by hand), the offset is dropped, with
/// a warning, and the file is read from its start: some events may be sent twice, none skipped.
fn offset_fits(cp: &mut Checkpoint, chunk: &Chunk, path: &std::path::Path) -> bool {
    let fits = cp.offset == 0 || cp.file_id.is_none() || chunk.file_id.is_none() || cp.file_id == chunk.file_id;
    if !fits {
        tracing::warn!(file = %path.display(), offset = cp.offset, "the cloudwatch checkpoint's offset is for another file; shipping this one from its start");
        metrics::counter!("toolgate_cloudwatch_errors_total").increment(1);
        cp.offset = 0;
        cp.file_id = None;
    }
    fits
}

/// Complete lines of `f` from `offset`, within the batch limits.
fn read_lines(f: &mut std::fs::File, offset: u64, cfg: &CloudWatchConfig) -> std::io::Result<Chunk> {
    let meta = f.metadata()?;
    let (len, file_id) = (meta.len(), crate::file_id(&meta));
    if len <= offset {
        return Ok(Chunk {
            file_id,
            ..Chunk::default()
        });
    }
    f.seek(SeekFrom::Start(offset))?;
    let want = ((len - offset) as usize).min(cfg.batch_max_bytes.max(MAX_EVENT) + MAX_EVENT);
    let mut buf = vec![0u8; want];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    let mut out = Vec::new();
    let (mut consumed, mut bytes) = (0usize, 0usize);
    for line in buf.split_inclusive(|b| *b == b'\n') {
        if !line.ends_with(b"\n") || out.len() >= cfg.batch_max_events {
            break;
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let msg = fit(text);
        let size = msg.len() + EVENT_OVERHEAD;
        if bytes + size > cfg.batch_max_bytes && !out.is_empty() {
            break;
        }
        bytes += size;
        consumed += line.len();
        if msg.is_empty() {
            continue;
        }
        out.push((timestamp_ms(&msg), msg));
    }
    if consumed == 0 && buf.len() == want && (want as u64) < len - offset {
        // One line longer than a whole read: read on to its end. Its start is what is shipped,
        // cut to the service's limit and marked, as any oversized event.
        let mut line_len = want as u64;
        let mut more = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut more)?;
            if n == 0 {
                break; // not ended yet: it waits, as any partial last line
            }
            if let Some(i) = more[..n].iter().position(|b| *b == b'\n') {
                line_len += i as u64 + 1;
                let msg = fit(String::from_utf8_lossy(&buf[..want.min(MAX_EVENT)]).into_owned());
                out.push((timestamp_ms(&msg), msg));
                consumed = line_len as usize;
                break;
            }
            line_len += n as u64;
        }
    }
    Ok(Chunk {
        lines: out,
        consumed: consumed as u64,
        backlog: len - offset,
        file_id,
    })
}

/// A message within the service's event size (cut, and marked, if it is not).
fn fit(mut msg: String) -> String {
    let max = MAX_EVENT - EVENT_OVERHEAD - 32;
    if msg.len() > max {
        let mut end = max;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str(" …[truncated by toolgate]");
    }
    msg
}

/// The event's own `ts`, else now.
fn timestamp_ms(msg: &str) -> i64 {
    let ts = msg
        .find("\"ts\":\"")
        .and_then(|i| msg[i + 6..].split('"').next())
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    ts.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_ms, |d| d.as_millis() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "toolgate".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(events: usize, bytes: usize) -> CloudWatchConfig {
        CloudWatchConfig {
            log_group: "g".into(),
            log_stream: "s".into(),
            batch_max_events: events,
            batch_max_bytes: bytes,
            flush_interval_ms: 10,
            checkpoint: None,
        }
    }

    #[test]
    fn reads_complete_lines_within_the_batch_limits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let (l1, l2) = (
            "{\"ts\":\"2026-11-23T10:00:00.250Z\",\"n\":1}\n",
            "{\"ts\":\"2026-11-23T10:00:01Z\",\"n\":2}\n",
        );
        std::fs::write(&p, format!("{l1}{l2}{{\"n\":3")).unwrap();
        let read = |offset, c| read_lines(&mut std::fs::File::open(&p).unwrap(), offset, &c).unwrap();
        let Chunk {
            lines,
            consumed,
            backlog,
            ..
        } = read(0, cfg(10, 1_048_576));
        assert_eq!(lines.len(), 2, "the partial last line waits");
        let expected = humantime::parse_rfc3339("2026-11-23T10:00:00.250Z").unwrap();
        assert_eq!(
            lines[0].0,
            expected.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
        );
        assert_eq!(consumed as usize, l1.len() + l2.len());
        assert!(backlog > consumed);
        let one = read(0, cfg(1, 1_048_576));
        assert_eq!((one.lines.len(), one.consumed as usize), (1, l1.len()));
        let rest = read(one.consumed, cfg(10, 1_048_576));
        assert_eq!(rest.backlog, backlog - one.consumed);
        assert_eq!(rest.lines[0].1, "{\"ts\":\"2026-11-23T10:00:01Z\",\"n\":2}");
    }

    #[test]
    fn oversized_events_are_cut_to_the_service_limit() {
        let big = "x".repeat(300_000);
        assert!(fit(big).len() + EVENT_OVERHEAD <= MAX_EVENT);
    }

    #[test]
    fn a_line_longer_than_one_read_is_shipped_cut_not_skipped_or_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let long = format!(
            "{{\"ts\":\"2026-11-23T10:00:00Z\",\"x\":\"{}\"}}\n",
            "y".repeat(2_000_000)
        );
        std::fs::write(&p, format!("{long}{{\"n\":2}}\n")).unwrap();
        let c = cfg(10, 1_048_576);
        let first = read_lines(&mut std::fs::File::open(&p).unwrap(), 0, &c).unwrap();
        assert_eq!(first.lines.len(), 1);
        assert_eq!(first.consumed as usize, long.len());
        assert!(first.lines[0].1.ends_with("…[truncated by toolgate]"));
        assert!(first.lines[0].1.len() + EVENT_OVERHEAD <= MAX_EVENT);
        let next = read_lines(&mut std::fs::File::open(&p).unwrap(), first.consumed, &c).unwrap();
        assert_eq!(next.lines[0].1, "{\"n\":2}");
        // Still being written (no newline yet): it waits.
        std::fs::write(&p, &long[..long.len() - 1]).unwrap();
        let partial = read_lines(&mut std::fs::File::open(&p).unwrap(), 0, &c).unwrap();
        assert_eq!((partial.lines.len(), partial.consumed), (0, 0));
    }

    async fn shipper_for(file: PathBuf) -> Shipper {
        Shipper::new(cfg(10, 1_048_576), file, Some("us-east-1".into())).await
    }

    fn drain(shipper: &Shipper, cp: &mut Checkpoint) -> Vec<String> {
        let mut shipped = Vec::new();
        loop {
            let chunk = shipper.next_chunk(cp).unwrap();
            if chunk.consumed == 0 {
                return shipped;
            }
            shipped.extend(chunk.lines.into_iter().map(|(_, m)| m));
            cp.offset += chunk.consumed;
            cp.file_id = chunk.file_id;
        }
    }

    #[tokio::test]
    async fn rotated_files_are_shipped_oldest_first_then_the_current_one_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        std::fs::write(&active, "{\"n\":1}\n").unwrap();
        let shipper = shipper_for(active.clone()).await;
        let mut cp = Checkpoint::default();
        assert_eq!(drain(&shipper, &mut cp), ["{\"n\":1}"]);
        // One more event, then the file is rotated under the shipper (the offset now counts into
        // the renamed file: the same file, as its identity shows), and again; then the current
        // file gets one event.
        std::fs::write(&active, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        std::fs::rename(&active, dir.path().join("audit.jsonl.20261201T000000.000Z")).unwrap();
        std::fs::write(dir.path().join("audit.jsonl.20261201T000001.000Z"), "{\"n\":3}\n").unwrap();
        std::fs::write(&active, "{\"n\":4}\n").unwrap();
        assert_eq!(drain(&shipper, &mut cp), ["{\"n\":2}", "{\"n\":3}", "{\"n\":4}"]);
        assert_eq!(cp.shipped_through.as_deref(), Some("audit.jsonl.20261201T000001.000Z"));
        assert_eq!(drain(&shipper, &mut cp), Vec::<String>::new());
    }

    #[tokio::test]
    async fn an_offset_into_another_file_is_dropped_and_the_file_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.jsonl");
        std::fs::write(&active, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        let shipper = shipper_for(active.clone()).await;
        let mut cp = Checkpoint {
            offset: 8,
            file_id: Some((u64::MAX, u64::MAX)),
            ..Checkpoint::default()
        };
        assert_eq!(drain(&shipper, &mut cp), ["{\"n\":1}", "{\"n\":2}"]);
        // With the right identity, the offset holds.
        let mut cp = Checkpoint {
            offset: 8,
            file_id: crate::file_id(&std::fs::metadata(&active).unwrap()),
            ..Checkpoint::default()
        };
        assert_eq!(drain(&shipper, &mut cp), ["{\"n\":2}"]);
    }
}
