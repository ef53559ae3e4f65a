//! The policy in force: reloaded from its directory when the files change (the watcher in
//! `server`), when an operator asks, or when the MCP catalog changes. A new policy takes effect
//! only once its `policy_reloaded` event is written; an invalid one leaves the last good policy
//! in force, and says why.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Gateway;
use crate::audit::{AuditError, By, PolicyReloadFailed, PolicyReloaded};
use crate::config::ConfigError;
use crate::policy::Policy;

/// A policy file's size, modification time and identity (device, inode), for the watcher.
pub type FileStamp = (u64, Option<std::time::SystemTime>, Option<(u64, u64)>);

/// Why a reload did not put a new policy in force (the last good one stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The new policy is valid, but its `policy_reloaded` event could not be written.
    #[error("policy {version} was not put in force: its audit event could not be written: {source}")]
    Unrecorded { version: String, source: AuditError },
}

/// Where the policy comes from, and what reloading it owes.
pub(super) struct Reloader {
    dir: Option<PathBuf>,
    /// One reload at a time.
    lock: tokio::sync::Mutex<()>,
    /// Set when the MCP catalog changed: the next reload swaps the policy in even though the
    /// files (and so the version) are the same.
    force: AtomicBool,
    /// Set when a valid policy was not put in force because its event could not be written:
    /// the watcher tries again (see [`Gateway::take_retry_due`]).
    retry_due: AtomicBool,
}

impl Reloader {
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            lock: tokio::sync::Mutex::new(()),
            force: AtomicBool::new(false),
            retry_due: AtomicBool::new(false),
        }
    }
}

impl Gateway {
    /// A cheap summary of the files the policy is read from: the policy directory's `*.yaml`,
    /// `*.yml` and `*.cedar`, and the JWKS file, each with its size, modification time and
    /// identity, links followed (a Kubernetes ConfigMap swaps a link to a new directory, and
    /// `agents.yaml` is a link into it). The watcher reloads when it changes; other files in
    /// the directory (a log, an editor's swap file) do not count.
    pub fn policy_fingerprint(&self) -> Vec<(std::ffi::OsString, Option<FileStamp>)> {
        let Some(dir) = &self.reload.dir else { return Vec::new() };
        let stamp = |path: &std::path::Path| {
            // A file that cannot be read is a change too (the next load reports it).
            let m = std::fs::metadata(path).ok()?;
            Some((m.len(), m.modified().ok(), crate::file_id(&m)))
        };
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| crate::policy::is_policy_file(p))
            .map(|p| (p.file_name().unwrap_or_default().to_owned(), stamp(&p)))
            .collect();
        out.sort();
        if let Some(jwks) = &self.policy_now().jwks_file {
            out.push((jwks.clone().into_os_string(), stamp(jwks)));
        }
        if let Some(shadow) = &self.config.shadow_policies {
            let mut files: Vec<_> = std::fs::read_dir(shadow)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| crate::policy::is_policy_file(p))
                .map(|p| (p.into_os_string(), None))
                .collect();
            for (p, s) in &mut files {
                *s = stamp(std::path::Path::new(p));
            }
            files.sort();
            out.extend(files);
        }
        out
    }

    /// Loads `shadow_policies` again; in force at once if it loads (a shadow decides nothing),
    /// audited either way when it changed.
    async fn reload_shadow(&self, trigger: &str, by: Option<By<'_>>) {
        let Some(dir) = self.config.shadow_policies.clone() else {
            return;
        };
        let loaded = tokio::task::spawn_blocking(move || Policy::load(&dir))
            .await
            .expect("policy loading does not panic");
        let previous = self.shadow.load_full();
        let previous_version = previous.as_ref().map_or("", |p| p.version.as_str());
        match loaded {
            Ok(policy) if policy.version == previous_version => {}
            Ok(policy) => {
                let event = PolicyReloaded {
                    policy_version: &policy.version,
                    previous_version,
                    trigger,
                    by,
                    shadow: true,
                };
                self.audit.emit_or_log(&event).await;
                tracing::info!(version = %policy.version, "shadow policy reloaded");
                self.shadow.store(Some(Arc::new(policy)));
            }
            Err(err) => {
                let errors: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
                tracing::error!("shadow policy reload failed, keeping the last good one:\n{err}");
                let event = PolicyReloadFailed {
                    policy_version: previous_version,
                    errors: &errors,
                    trigger,
                    by,
                    shadow: true,
                };
                self.audit.emit_or_log(&event).await;
            }
        }
    }

    /// Whether a reload is due again because the last one could not be recorded (and from
    /// now on, not: the caller tries it).
    pub fn take_retry_due(&self) -> bool {
        self.reload.retry_due.swap(false, Ordering::SeqCst)
    }

    /// Reloads policies from disk. On failure the last good policy stays in force; either way
    /// the outcome is audited. A new policy takes effect only once its `policy_reloaded` event
    /// is written (`by`: the operator who asked, if one did).
    pub async fn reload(&self, trigger: &str, by: Option<By<'_>>) -> Result<String, ReloadError> {
        let _guard = self.reload.lock.lock().await;
        // This attempt stands for any retry that was due.
        self.reload.retry_due.store(false, Ordering::SeqCst);
        let Some(dir) = self.reload.dir.clone() else {
            return Ok(self.policy().version.clone());
        };
        let discovered = self.catalog.tools();
        let loaded = tokio::task::spawn_blocking(move || Policy::load_with(&dir, &discovered))
            .await
            .expect("policy loading does not panic");
        let previous = self.policy();
        // The shadow policy goes with every reload: a bad one keeps the last good one (and is
        // audited), and never stands in the way of the enforced policy.
        self.reload_shadow(trigger, by).await;
        match loaded {
            Ok(policy) => self.put_in_force(policy, &previous, trigger, by).await,
            Err(err) => {
                let errors: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
                tracing::error!(kept = %previous.version, trigger, "policy reload failed, keeping the last good policy:\n{err}");
                metrics::counter!("toolgate_policy_reloads_total", "result" => "error").increment(1);
                let event = PolicyReloadFailed {
                    policy_version: &previous.version,
                    errors: &errors,
                    trigger,
                    by,
                    shadow: false,
                };
                self.audit.emit_or_log(&event).await;
                Err(err.into())
            }
        }
    }

    /// A valid new policy, put in force once its event is written (if it differs, or the
    /// catalog forced it).
    async fn put_in_force(
        &self,
        policy: Policy,
        previous: &Policy,
        trigger: &str,
        by: Option<By<'_>>,
    ) -> Result<String, ReloadError> {
        let version = policy.version.clone();
        let forced = self.reload.force.swap(false, Ordering::SeqCst);
        if version == previous.version && !forced {
            return Ok(version);
        }
        let event = PolicyReloaded {
            policy_version: &version,
            previous_version: &previous.version,
            trigger,
            by,
            shadow: false,
        };
        if let Err(source) = self.audit.emit(&event).await {
            // Asked again later (the watcher retries; a forced rebuild stays due).
            if forced {
                self.reload.force.store(true, Ordering::SeqCst);
            }
            self.reload.retry_due.store(true, Ordering::SeqCst);
            tracing::error!(version = %version, kept = %previous.version, trigger, "policy not reloaded: its audit event could not be written: {source}");
            metrics::counter!("toolgate_policy_reloads_total", "result" => "unrecorded").increment(1);
            return Err(ReloadError::Unrecorded { version, source });
        }
        let mut policy = policy;
        policy.auth.keep_keys_of(&previous.auth);
        self.policy.store(Arc::new(policy));
        tracing::info!(version = %version, previous = %previous.version, trigger, "policy reloaded");
        metrics::counter!("toolgate_policy_reloads_total", "result" => "ok").increment(1);
        Ok(version)
    }

    /// Rebuilds the policy with the current MCP catalog, whether or not the files changed.
    pub(super) async fn reload_now(&self, trigger: &str) -> Result<String, ReloadError> {
        if self.reload.dir.is_none() {
            return Ok(self.policy().version.clone());
        }
        self.reload.force.store(true, Ordering::SeqCst);
        self.reload(trigger, None).await
    }
}
