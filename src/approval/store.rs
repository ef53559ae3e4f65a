//! The approval store on disk: redb, one file, every change one write transaction (so the
//! check and the `used` mark of [`Approvals::consume`] cannot interleave with another's).
//! Synchronous: the gateway reaches it through [`super::ApprovalStore`].

use std::path::Path;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    Approval, ApprovalError, Approver, DecideError, Hold, KEEP_FOR_SECS, MAX_PENDING_PER_AGENT, Pin, Refused, Status,
    TooMany, pending_key,
};

/// id → approval (JSON).
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
/// `agent \0 tool \0 arguments_sha256` → id of the pending approval for that exact call.
const PENDING: TableDefinition<&str, &str> = TableDefinition::new("pending");

/// Exposed tool name → the pinned definition of an upstream MCP tool (JSON [`Pin`]).
const PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("tool_pins");

fn pending_for(pending: &redb::Table<'_, &str, &str>, agent: &str) -> Result<usize, ApprovalError> {
    let start = format!("{agent}\0");
    let end = format!("{agent}\u{1}");
    Ok(pending.range(start.as_str()..end.as_str())?.count())
}

/// The agent's pending requests that are still pending at `now`: entries whose approval expired
/// (or is gone) are removed first. Only run when the plain count reaches the limit, so requests
/// nobody answered do not lock an agent out until the weekly prune.
fn live_pending_for(
    pending: &mut redb::Table<'_, &str, &str>,
    approvals: &redb::Table<'_, &str, &[u8]>,
    agent: &str,
    now: u64,
) -> Result<usize, ApprovalError> {
    let start = format!("{agent}\0");
    let end = format!("{agent}\u{1}");
    let entries: Vec<(String, String)> = pending
        .range(start.as_str()..end.as_str())?
        .map(|e| e.map(|(k, v)| (k.value().to_owned(), v.value().to_owned())))
        .collect::<Result<_, _>>()?;
    let mut live = 0;
    for (key, id) in entries {
        let still = match approvals.get(id.as_str())? {
            Some(bytes) => {
                let a: Approval = serde_json::from_slice(bytes.value())?;
                a.settle(now).status == Status::Pending
            }
            None => false,
        };
        if still {
            live += 1;
        } else {
            pending.remove(key.as_str())?;
        }
    }
    Ok(live)
}

/// The approval store.
pub struct Approvals {
    db: Database,
    ttl: Duration,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals").field("ttl", &self.ttl).finish()
    }
}

impl Approvals {
    /// The store the config names (`approvals.store`, `approvals.ttl_seconds`).
    pub fn open_configured(c: &crate::config::ApprovalsConfig) -> Result<Approvals, ApprovalError> {
        Self::open(&c.store, Duration::from_secs(c.ttl_seconds))
    }

    /// Opens (or creates) the store; prunes records that no longer matter.
    pub fn open(path: &Path, ttl: Duration) -> Result<Approvals, ApprovalError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => ApprovalError::InUse {
                path: path.display().to_string(),
            },
            source => ApprovalError::Open {
                path: path.display().to_string(),
                source,
            },
        })?;
        let store = Approvals { db, ttl };
        store.prune(crate::state::unix_now())?;
        Ok(store)
    }

    /// Holds a call for approval. The same agent, tool and arguments while a request is still
    /// pending get that request back (`false`: not new), so a retrying agent does not flood
    /// the approvers.
    pub fn request(&self, hold: Hold<'_>, now: u64) -> Result<Result<(Approval, bool), TooMany>, ApprovalError> {
        let key = pending_key(hold.agent, hold.tool, hold.arguments_sha256);
        let txn = self.db.begin_write()?;
        let result = {
            let mut approvals = txn.open_table(APPROVALS)?;
            let mut pending = txn.open_table(PENDING)?;
            let existing = pending.get(key.as_str())?.map(|id| id.value().to_owned());
            let live = match existing {
                Some(id) => match approvals.get(id.as_str())? {
                    Some(bytes) => {
                        let a: Approval = serde_json::from_slice(bytes.value())?;
                        let a = a.settle(now);
                        (a.status == Status::Pending).then_some(a)
                    }
                    None => None,
                },
                None => None,
            };
            match live {
                Some(a) => (a, false),
                None if pending_for(&pending, hold.agent)? >= MAX_PENDING_PER_AGENT
                    && live_pending_for(&mut pending, &approvals, hold.agent, now)? >= MAX_PENDING_PER_AGENT =>
                {
                    return Ok(Err(TooMany));
                }
                None => {
                    let a = super::new_approval(hold, now, self.ttl);
                    approvals.insert(a.id.as_str(), serde_json::to_vec(&a)?.as_slice())?;
                    pending.insert(key.as_str(), a.id.as_str())?;
                    (a, true)
                }
            }
        };
        if result.1 {
            txn.commit()?;
        } else {
            txn.abort().map_err(|e| ApprovalError::Store(e.to_string()))?;
        }
        Ok(Ok(result))
    }

    pub fn get(&self, id: &str, now: u64) -> Result<Option<Approval>, ApprovalError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(APPROVALS)?;
        let Some(bytes) = table.get(id)? else { return Ok(None) };
        let a: Approval = serde_json::from_slice(bytes.value())?;
        Ok(Some(a.settle(now)))
    }

    /// Every approval (optionally of one status), newest first.
    pub fn list(&self, status: Option<Status>, now: u64) -> Result<Vec<Approval>, ApprovalError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(APPROVALS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, bytes) = entry?;
            let a: Approval = serde_json::from_slice(bytes.value())?;
            let a = a.settle(now);
            if status.is_none_or(|s| s == a.status) {
                out.push(a);
            }
        }
        out.sort_by(|a, b| b.requested_at.cmp(&a.requested_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Approves or denies a pending approval.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        who: &Approver,
        comment: &str,
        now: u64,
    ) -> Result<Result<Approval, DecideError>, ApprovalError> {
        self.update(id, now, |a| super::decide(a, approve, who, comment, now))
            .map(|r| r.map_err(|e| e.unwrap_or(DecideError::NotFound)))
    }

    /// Lets the exact approved call through once: checks the binding and marks the approval
    /// used in one transaction.
    pub fn consume(&self, id: &str, call: &Hold<'_>, now: u64) -> Result<Result<Approval, Refused>, ApprovalError> {
        let outcome = self.update(id, now, |a| super::consume(a, call, now))?;
        Ok(outcome.map_err(|e| e.unwrap_or(Refused("no approval with this id exists for this agent"))))
    }

    /// Reads, changes and writes one approval in a write transaction. `Err(None)`: not found.
    fn update<E>(
        &self,
        id: &str,
        now: u64,
        change: impl FnOnce(&mut Approval) -> Result<(), E>,
    ) -> Result<Result<Approval, Option<E>>, ApprovalError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut approvals = txn.open_table(APPROVALS)?;
            let current = match approvals.get(id)? {
                Some(bytes) => Some(serde_json::from_slice::<Approval>(bytes.value())?),
                None => None,
            };
            match current {
                None => Err(None),
                Some(a) => {
                    let mut a = a.settle(now);
                    match change(&mut a) {
                        Err(e) => Err(Some(e)),
                        Ok(()) => {
                            approvals.insert(id, serde_json::to_vec(&a)?.as_slice())?;
                            if a.status != Status::Pending {
                                let mut pending = txn.open_table(PENDING)?;
                                pending.remove(pending_key(&a.agent, &a.tool, &a.arguments_sha256).as_str())?;
                            }
                            Ok(a)
                        }
                    }
                }
            }
        };
        if outcome.is_ok() {
            txn.commit()?;
        } else {
            txn.abort().map_err(|e| ApprovalError::Store(e.to_string()))?;
        }
        Ok(outcome)
    }

    /// The pinned definition of an upstream MCP tool.
    pub fn pin(&self, tool: &str) -> Result<Option<Pin>, ApprovalError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(PINS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(tool)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Whether any tool of the MCP server `server` is pinned (its exposed names start with
    /// `<server>.`): whether toolgate has listed that server before.
    pub fn has_pins(&self, server: &str) -> Result<bool, ApprovalError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(PINS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        // `/` sorts right after `.`: every `<server>.…` key lies between the two.
        let (from, to) = (format!("{server}."), format!("{server}/"));
        Ok(table.range(from.as_str()..to.as_str())?.next().is_some())
    }

    /// Pins (or re-pins) a tool's definition.
    pub fn set_pin(&self, tool: &str, pin: &Pin) -> Result<(), ApprovalError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PINS)?;
            table.insert(tool, serde_json::to_vec(pin)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Forgets approvals settled (decided, used or expired) more than a week ago. Runs when the
    /// store opens and then hourly while serving.
    pub fn prune(&self, now: u64) -> Result<(), ApprovalError> {
        let txn = self.db.begin_write()?;
        {
            let mut approvals = txn.open_table(APPROVALS)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut stale = Vec::new();
            for entry in approvals.iter()? {
                let (id, bytes) = entry?;
                let a: Approval = serde_json::from_slice(bytes.value())?;
                let settled_at = super::settled_at(&a);
                if now > settled_at + KEEP_FOR_SECS {
                    stale.push((
                        id.value().to_owned(),
                        pending_key(&a.agent, &a.tool, &a.arguments_sha256),
                    ));
                }
            }
            for (id, key) in stale {
                approvals.remove(id.as_str())?;
                // The same call may have asked again since: its key then names the newer one.
                let points_here = pending.get(key.as_str())?.is_some_and(|p| p.value() == id);
                if points_here {
                    pending.remove(key.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold<'a>(agent: &'a str, sha: &'a str) -> Hold<'a> {
        Hold {
            agent,
            tool: "billing.refund",
            rule: "r",
            rules: &[],
            group: "g",
            reason: "why",
            arguments: None,
            arguments_sha256: sha,
            request_id: "req",
            session: None,
            quorum: 1,
        }
    }

    fn lead() -> Approver {
        Approver {
            name: "lead".to_owned(),
            groups: Some(vec!["g".to_owned()]),
        }
    }

    #[test]
    fn pruning_an_old_approval_keeps_a_newer_one_for_the_same_call() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = KEEP_FOR_SECS + 24 * 3600;
        let store = Approvals::open(&dir.path().join("a.redb"), Duration::from_secs(ttl)).unwrap();
        let (old, _) = store.request(hold("bot", "h1"), 0).unwrap().unwrap();
        // The first expired unanswered; the same call asks again.
        let (newer, new) = store.request(hold("bot", "h1"), ttl + 1).unwrap().unwrap();
        assert!(new && newer.id != old.id);
        let now = ttl + KEEP_FOR_SECS + 1;
        store.prune(now).unwrap();
        assert!(store.get(&old.id, now).unwrap().is_none(), "the old one is gone");
        let (found, new) = store.request(hold("bot", "h1"), now).unwrap().unwrap();
        assert!(!new, "the newer request is still the pending one");
        assert_eq!(found.id, newer.id);
    }

    #[test]
    fn only_live_requests_count_toward_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Approvals::open(&dir.path().join("a.redb"), Duration::from_secs(60)).unwrap();
        let shas: Vec<String> = (0..=MAX_PENDING_PER_AGENT).map(|i| format!("h{i}")).collect();
        for sha in &shas[..MAX_PENDING_PER_AGENT] {
            assert!(store.request(hold("bot", sha), 1000).unwrap().is_ok());
        }
        let last = &shas[MAX_PENDING_PER_AGENT];
        assert_eq!(store.request(hold("bot", last), 1000).unwrap().unwrap_err(), TooMany);
        // Nobody answered; they expired. The agent may ask again at once, not after the prune.
        let (a, new) = store.request(hold("bot", last), 1000 + 61).unwrap().unwrap();
        assert!(new && a.status == Status::Pending);
    }

    #[test]
    fn a_store_in_use_says_so_and_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let _first = Approvals::open(&path, Duration::from_secs(60)).unwrap();
        let Err(e) = Approvals::open(&path, Duration::from_secs(60)) else {
            panic!("a second open of the same store must fail");
        };
        assert!(matches!(e, ApprovalError::InUse { .. }), "{e:?}");
        assert!(e.to_string().contains("approvals.store"), "{e}");
    }

    #[test]
    fn one_pending_request_per_exact_call_and_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Approvals::open(&dir.path().join("a.redb"), Duration::from_secs(60)).unwrap();
        let (a, new) = store.request(hold("bot", "h1"), 1000).unwrap().unwrap();
        assert!(new);
        let (again, new) = store.request(hold("bot", "h1"), 1001).unwrap().unwrap();
        assert!(!new);
        assert_eq!(again.id, a.id);
        let (other, new) = store.request(hold("bot", "h2"), 1001).unwrap().unwrap();
        assert!(new);
        assert_ne!(other.id, a.id);

        let rules = ["r".to_owned()];
        let consume = |sha: &str, agent: &str, now| {
            let call = Hold {
                rules: &rules,
                ..hold(agent, sha)
            };
            store.consume(&a.id, &call, now).unwrap()
        };
        assert_eq!(
            consume("h1", "bot", 1002).unwrap_err().0,
            "the approval is still pending: no one has approved it yet"
        );
        store.decide(&a.id, true, &lead(), "ok", 1003).unwrap().unwrap();
        assert_eq!(
            store.decide(&a.id, false, &lead(), "", 1003).unwrap().unwrap_err(),
            DecideError::NotPending(Status::Approved)
        );
        assert!(consume("h2", "bot", 1004).is_err(), "other arguments");
        assert!(consume("h1", "intruder", 1004).is_err(), "other agent");
        assert_eq!(consume("h1", "bot", 1004).unwrap().status, Status::Used);
        assert!(consume("h1", "bot", 1005).is_err(), "second use");
        // Expiry: the second request, approved, then read after its ttl.
        store.decide(&other.id, true, &lead(), "", 1006).unwrap().unwrap();
        let expired = store.consume(&other.id, &hold("bot", "h2"), 1001 + 60).unwrap();
        assert_eq!(expired.unwrap_err().0, "the approval has expired");
        assert_eq!(store.get(&other.id, 2000).unwrap().unwrap().status, Status::Expired);
        assert_eq!(store.list(Some(Status::Used), 2000).unwrap().len(), 1);
    }
}
