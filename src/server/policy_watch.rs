//! The policy watcher: polls the files the policy is read from once a second and reloads once
//! a change has held still for a poll, so an editor or a deploy that writes in place, or moves
//! files one by one, is never caught half-way (a truncated rules file is valid, with fewer
//! rules). It also retries a valid policy that could not be put in force because its event
//! could not be written.

use crate::gateway::{FileStamp, Gateway, ReloadError};

/// After this many polls (seconds) of policy files that never hold still, the watcher says so.
const UNSETTLED_WARNING: u32 = 30;

/// What the watcher has seen.
pub(super) struct PolicyWatch {
    /// The files as last loaded. Nothing at first: the first polls compare the files with the
    /// policy in force by loading them (a reload that finds the same version changes nothing
    /// and writes no event), so a file changed between the policy's load and the watcher's
    /// start is not missed.
    last: Vec<(std::ffi::OsString, Option<FileStamp>)>,
    /// A change seen on the last poll, waiting to hold still.
    settling: Option<Vec<(std::ffi::OsString, Option<FileStamp>)>>,
    unsettled: u32,
    /// The poll at which an unrecorded policy is tried again, and the back-off to the next.
    retry_at: u64,
    retry_backoff: u64,
}

impl Default for PolicyWatch {
    fn default() -> Self {
        PolicyWatch {
            last: Vec::new(),
            settling: None,
            unsettled: 0,
            retry_at: 0,
            retry_backoff: 1,
        }
    }
}

impl PolicyWatch {
    /// One poll, at second `tick` of the watcher's life.
    pub(super) async fn poll(&mut self, gateway: &Gateway, tick: u64) {
        let now = gateway.policy_fingerprint();
        if now == self.last {
            self.settling = None;
            self.unsettled = 0;
            // A valid policy whose event could not be written was not put in force (whether
            // the files, an admin or the MCP catalog asked for it): tried again here until it
            // is, backing off while the log stays broken: 1, 2, 4 … 60 s between tries. An
            // invalid one waits for the files to change.
            if tick >= self.retry_at && gateway.take_retry_due() {
                let failed = matches!(gateway.reload("retry", None).await, Err(ReloadError::Unrecorded { .. }));
                self.retry_backoff = if failed { (self.retry_backoff * 2).min(60) } else { 1 };
                self.retry_at = tick + self.retry_backoff;
            }
        } else if self.settling.as_ref() == Some(&now) {
            self.last = now;
            self.settling = None;
            self.unsettled = 0;
            let _ = gateway.reload("file_change", None).await;
        } else {
            self.settling = Some(now);
            self.unsettled += 1;
            if self.unsettled == UNSETTLED_WARNING {
                tracing::warn!(
                    "the policy files have changed on every poll for {UNSETTLED_WARNING} s: nothing is \
                     reloaded until they hold still for a second (write elsewhere and rename)"
                );
            }
        }
    }
}
