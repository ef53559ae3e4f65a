//! Human approval: calls held by an `@approval` rule, persisted in an embedded store (redb) so a
//! restart between request and decision loses nothing. The same store keeps the pinned
//! definitions of upstream MCP tools (a restart must not forget what was approved).
//!
//! An approval is bound to the agent, the tool and the SHA-256 of the call's canonical
//! arguments. It is used at most once: the check and the `used` mark happen in one write
//! transaction, so two concurrent re-sends cannot both pass. It expires `ttl` after it was
//! requested, whether pending or approved. Records are kept for a week after they stop
//! mattering, for the admin list, then pruned.

mod shared;
mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use shared::SharedApprovals;
pub use store::Approvals;

/// An upstream MCP tool's definition as first seen (or last approved by an operator).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pin {
    pub sha256: String,
    pub description: String,
    pub input_schema: Value,
    /// Unix seconds.
    pub pinned_at: u64,
    /// `first-seen`, or the operator who approved this definition.
    pub pinned_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("the approval store at {path}: {source}")]
    Open { path: String, source: redb::DatabaseError },
    #[error(
        "the approval store at {path} is in use by another process (another toolgate with the same `approvals.store`?); give each instance its own store"
    )]
    InUse { path: String },
    #[error("the approval store failed: {0}")]
    Store(String),
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for ApprovalError {
            fn from(e: $t) -> Self {
                ApprovalError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    /// Approved, and the call it approved has passed.
    Used,
    /// Pending or approved past its expiry (derived when read, never stored).
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Used => "used",
            Status::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            "denied" => Status::Denied,
            "used" => Status::Used,
            "expired" => Status::Expired,
            _ => return None,
        })
    }
}

/// One approval request and its fate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub status: Status,
    pub agent: String,
    pub tool: String,
    /// The rule that held the call (the first), and the group(s) asked to approve it.
    pub rule: String,
    pub group: String,
    /// Every approval rule that matched; the approval covers exactly these.
    #[serde(default)]
    pub rules: Vec<String>,
    pub reason: String,
    /// The call's arguments with every detector's redaction applied (for the approver to read).
    pub arguments: Option<Value>,
    pub arguments_sha256: String,
    pub request_id: String,
    pub session: Option<String>,
    /// Unix seconds.
    pub requested_at: u64,
    pub expires_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_by_request: Option<String>,
    /// How many different people must approve (`@quorum`; 1 for records from before it).
    #[serde(default = "one")]
    pub quorum: u32,
    /// The approvals given so far, one per person; the approval is approved once there are
    /// `quorum` of them and every group in `group` is among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<Vote>,
}

fn one() -> u32 {
    1
}

/// One person's approval of a held call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vote {
    pub by: String,
    /// The approval's groups this person belongs to.
    pub groups: Vec<String>,
    /// Unix seconds.
    pub at: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

/// Someone deciding an approval: their name and the approver groups they belong to (`None`:
/// every group, the legacy shared admin token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub name: String,
    pub groups: Option<Vec<String>>,
}

impl Approver {
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.as_ref().is_none_or(|g| g.iter().any(|x| x == group))
    }

    /// Whether this person may decide `a` at all (belongs to one of its groups).
    pub fn may_decide(&self, a: &Approval) -> bool {
        a.groups().any(|g| self.in_group(g))
    }
}

impl Approval {
    /// The approver groups asked (the rules' `@approval` groups, joined by `, ` in `group`).
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.group.split(", ").filter(|g| !g.is_empty())
    }
    /// The status as of `now` (pending or approved past expiry reads as expired).
    pub(crate) fn settle(mut self, now: u64) -> Self {
        if matches!(self.status, Status::Pending | Status::Approved) && now >= self.expires_at {
            self.status = Status::Expired;
        }
        self
    }
}

/// What a new hold looks like, before it has an id.
#[derive(Debug, Clone)]
pub struct Hold<'a> {
    pub agent: &'a str,
    pub tool: &'a str,
    pub rule: &'a str,
    pub rules: &'a [String],
    pub group: &'a str,
    pub reason: &'a str,
    pub arguments: Option<Value>,
    pub arguments_sha256: &'a str,
    pub request_id: &'a str,
    pub session: Option<&'a str>,
    pub quorum: u32,
}

/// Decided, used or expired approvals are kept this long after they stopped mattering (for the
/// admin list), then pruned.
pub(crate) const KEEP_FOR_SECS: u64 = 7 * 24 * 3600;

/// The key of the pending request for one exact call: agent, tool, arguments.
pub(crate) fn pending_key(agent: &str, tool: &str, sha: &str) -> String {
    format!("{agent}\0{tool}\0{sha}")
}

/// A new pending approval for `hold`, valid for `ttl`.
pub(crate) fn new_approval(hold: Hold<'_>, now: u64, ttl: std::time::Duration) -> Approval {
    Approval {
        id: format!("apr_{}", uuid::Uuid::new_v4().simple()),
        status: Status::Pending,
        agent: hold.agent.to_owned(),
        tool: hold.tool.to_owned(),
        rule: hold.rule.to_owned(),
        group: hold.group.to_owned(),
        rules: hold.rules.to_vec(),
        reason: hold.reason.to_owned(),
        arguments: hold.arguments,
        arguments_sha256: hold.arguments_sha256.to_owned(),
        request_id: hold.request_id.to_owned(),
        session: hold.session.map(str::to_owned),
        requested_at: now,
        expires_at: now + ttl.as_secs(),
        decided_by: None,
        decided_at: None,
        comment: None,
        used_at: None,
        used_by_request: None,
        quorum: hold.quorum.max(1),
        votes: Vec::new(),
    }
}

/// `who` approves or denies `a` (settled as of `now`), if it is pending and `who` may: they
/// belong to one of its groups, did not make the call, and have not approved it already. A
/// denial decides at once; an approval decides once `quorum` different people approved and
/// every group is among them.
pub(crate) fn decide(
    a: &mut Approval,
    approve: bool,
    who: &Approver,
    comment: &str,
    now: u64,
) -> Result<(), DecideError> {
    if a.status != Status::Pending {
        return Err(DecideError::NotPending(a.status));
    }
    let groups: Vec<String> = a.groups().filter(|g| who.in_group(g)).map(str::to_owned).collect();
    if groups.is_empty() {
        return Err(DecideError::NotInGroup);
    }
    if who.name == a.agent {
        return Err(DecideError::OwnCall);
    }
    if a.votes.iter().any(|v| v.by == who.name) {
        return Err(DecideError::AlreadyApproved);
    }
    let comment_or_none = (!comment.is_empty()).then(|| comment.to_owned());
    if !approve {
        a.status = Status::Denied;
        a.decided_by = Some(who.name.clone());
        a.decided_at = Some(now);
        a.comment = comment_or_none;
        return Ok(());
    }
    a.votes.push(Vote {
        by: who.name.clone(),
        groups,
        at: now,
        comment: comment.to_owned(),
    });
    let every_group = a
        .groups()
        .all(|g| a.votes.iter().any(|v| v.groups.iter().any(|x| x == g)));
    if a.votes.len() >= a.quorum.max(1) as usize && every_group {
        a.status = Status::Approved;
        let names: Vec<&str> = a.votes.iter().map(|v| v.by.as_str()).collect();
        a.decided_by = Some(names.join(", "));
        a.decided_at = Some(now);
        a.comment = comment_or_none;
    }
    Ok(())
}

/// Lets `call` through on approval `a` (settled as of `now`) if `a` approved exactly it, and
/// marks `a` used.
pub(crate) fn consume(a: &mut Approval, call: &Hold<'_>, now: u64) -> Result<(), Refused> {
    // The same answer for "not yours" as for "no such approval": no enumeration.
    if a.agent != call.agent {
        return Err(Refused("no approval with this id exists for this agent"));
    }
    if a.tool != call.tool || a.arguments_sha256 != call.arguments_sha256 {
        return Err(Refused(
            "the approval is for another call: the tool and the arguments must be exactly those approved",
        ));
    }
    // Records from before `rules` existed cover their one rule.
    let covered = |r: &String| a.rules.contains(r) || (a.rules.is_empty() && *r == a.rule);
    if !call.rules.iter().all(covered) {
        return Err(Refused(
            "the approval does not cover every rule that now holds this call: request a new approval",
        ));
    }
    match a.status {
        Status::Approved => {
            a.status = Status::Used;
            a.used_at = Some(now);
            a.used_by_request = Some(call.request_id.to_owned());
            Ok(())
        }
        Status::Pending => Err(Refused("the approval is still pending: no one has approved it yet")),
        Status::Denied => Err(Refused("the approval was denied")),
        Status::Used => Err(Refused(
            "the approval was already used: each approval lets one call through",
        )),
        Status::Expired => Err(Refused("the approval has expired")),
    }
}

/// When an approval stopped mattering: used, decided, or expired, whichever is latest.
pub(crate) fn settled_at(a: &Approval) -> u64 {
    a.used_at.or(a.decided_at).unwrap_or(a.expires_at).max(a.expires_at)
}

/// Pending approvals one agent may have at once: more is refused, so one agent cannot bury
/// the approvers (or fill the disk).
pub const MAX_PENDING_PER_AGENT: usize = 100;

/// The agent already has [`MAX_PENDING_PER_AGENT`] pending approvals.
#[derive(Debug, PartialEq, Eq)]
pub struct TooMany;

/// Why an approval could not be decided.
#[derive(Debug, PartialEq, Eq)]
pub enum DecideError {
    NotFound,
    /// Not pending any more: already decided, used or expired.
    NotPending(Status),
    /// The approver belongs to none of the approval's groups.
    NotInGroup,
    /// The approver is the agent whose call is held.
    OwnCall,
    /// The approver already approved it (a quorum needs different people).
    AlreadyApproved,
}

impl DecideError {
    /// Why, for the person who asked.
    pub fn message(&self) -> String {
        match self {
            DecideError::NotFound => "No such approval.".to_owned(),
            DecideError::NotPending(s) => {
                format!(
                    "This approval is {}: only a pending approval can be decided.",
                    s.as_str()
                )
            }
            DecideError::NotInGroup => {
                "You are not an approver in this approval's group, so you cannot decide it.".to_owned()
            }
            DecideError::OwnCall => "Nobody approves a call their own credentials made.".to_owned(),
            DecideError::AlreadyApproved => {
                "You already approved this call; its quorum needs another person's approval.".to_owned()
            }
        }
    }
}

/// Why a presented approval does not let a call through. The message is safe for the agent.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// A call to hold, owned, so it can cross into the store's blocking task.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub agent: String,
    pub tool: String,
    pub rule: String,
    pub rules: Vec<String>,
    pub group: String,
    pub reason: String,
    pub arguments: Option<Value>,
    pub arguments_sha256: String,
    pub request_id: String,
    pub session: Option<String>,
    /// Different people who must approve (the largest `@quorum` of the rules).
    pub quorum: u32,
}

impl HoldRequest {
    pub fn as_hold(&self) -> Hold<'_> {
        Hold {
            agent: &self.agent,
            tool: &self.tool,
            rule: &self.rule,
            rules: &self.rules,
            group: &self.group,
            reason: &self.reason,
            arguments: self.arguments.clone(),
            arguments_sha256: &self.arguments_sha256,
            request_id: &self.request_id,
            session: self.session.as_deref(),
            quorum: self.quorum,
        }
    }
}

/// The store as the gateway and the admin plane use it: the file (redb), every operation on
/// tokio's blocking pool, since a redb transaction reads and writes (and may sync) the file and
/// an event loop must never wait on the disk; or Redis, shared by replicas ([`shared`]). One
/// place that knows this, instead of one per caller.
#[derive(Clone)]
pub struct ApprovalStore(Backend);

#[derive(Clone)]
enum Backend {
    File(Arc<Approvals>),
    Redis(Arc<SharedApprovals>),
}

impl std::fmt::Debug for ApprovalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Backend::File(a) => a.fmt(f),
            Backend::Redis(_) => f.write_str("ApprovalStore(redis)"),
        }
    }
}

impl From<Approvals> for ApprovalStore {
    fn from(store: Approvals) -> Self {
        Self::new(store)
    }
}

impl ApprovalStore {
    pub fn new(store: Approvals) -> Self {
        Self(Backend::File(Arc::new(store)))
    }

    /// Approvals and pins in Redis, shared by every replica on it; requests valid for `ttl`.
    pub fn shared(redis: Arc<crate::state::RedisState>, ttl: std::time::Duration) -> Self {
        Self(Backend::Redis(Arc::new(SharedApprovals { redis, ttl })))
    }

    async fn run<T: Send + 'static>(store: &Arc<Approvals>, op: impl FnOnce(&Approvals) -> T + Send + 'static) -> T {
        let store = store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .expect("the approval store does not panic")
    }

    /// [`Approvals::request`].
    pub async fn request(
        &self,
        hold: HoldRequest,
        now: u64,
    ) -> Result<Result<(Approval, bool), TooMany>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.request(hold.as_hold(), now)).await,
            Backend::Redis(r) => r.request(hold.as_hold(), now).await,
        }
    }

    /// [`Approvals::consume`].
    pub async fn consume(
        &self,
        id: String,
        call: HoldRequest,
        now: u64,
    ) -> Result<Result<Approval, Refused>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.consume(&id, &call.as_hold(), now)).await,
            Backend::Redis(r) => r.consume(&id, &call.as_hold(), now).await,
        }
    }

    /// [`Approvals::get`].
    pub async fn get(&self, id: String, now: u64) -> Result<Option<Approval>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.get(&id, now)).await,
            Backend::Redis(r) => r.get(&id, now).await,
        }
    }

    /// [`Approvals::list`].
    pub async fn list(&self, status: Option<Status>, now: u64) -> Result<Vec<Approval>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.list(status, now)).await,
            Backend::Redis(r) => r.list(status, now).await,
        }
    }

    /// [`Approvals::decide`].
    pub async fn decide(
        &self,
        id: String,
        approve: bool,
        who: Approver,
        comment: String,
        now: u64,
    ) -> Result<Result<Approval, DecideError>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.decide(&id, approve, &who, &comment, now)).await,
            Backend::Redis(r) => r.decide(&id, approve, &who, &comment, now).await,
        }
    }

    /// [`Approvals::pin`].
    pub async fn pin(&self, tool: String) -> Result<Option<Pin>, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.pin(&tool)).await,
            Backend::Redis(r) => r.pin(&tool).await,
        }
    }

    /// [`Approvals::has_pins`].
    pub async fn has_pins(&self, server: String) -> Result<bool, ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.has_pins(&server)).await,
            Backend::Redis(r) => r.has_pins(&server).await,
        }
    }

    /// [`Approvals::set_pin`].
    pub async fn set_pin(&self, tool: String, pin: Pin) -> Result<(), ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.set_pin(&tool, &pin)).await,
            Backend::Redis(r) => r.set_pin(&tool, &pin).await,
        }
    }

    /// [`Approvals::prune`].
    pub async fn prune(&self, now: u64) -> Result<(), ApprovalError> {
        match &self.0 {
            Backend::File(f) => Self::run(f, move |s| s.prune(now)).await,
            Backend::Redis(r) => r.prune(now).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(group: &str, quorum: u32) -> Approval {
        let hold = Hold {
            agent: "billing-bot",
            tool: "billing.refund",
            rule: "r",
            rules: &[],
            group,
            reason: "why",
            arguments: None,
            arguments_sha256: "h",
            request_id: "req",
            session: None,
            quorum,
        };
        new_approval(hold, 1000, std::time::Duration::from_secs(60))
    }

    fn person(name: &str, groups: &[&str]) -> Approver {
        Approver {
            name: name.to_owned(),
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        }
    }

    #[test]
    fn only_a_member_of_the_group_decides() {
        let mut a = held("billing-leads", 1);
        assert_eq!(
            decide(&mut a, true, &person("bob", &["security"]), "", 1001),
            Err(DecideError::NotInGroup)
        );
        assert_eq!(
            decide(&mut a, false, &person("bob", &["security"]), "", 1001),
            Err(DecideError::NotInGroup)
        );
        assert_eq!(a.status, Status::Pending);
        decide(&mut a, true, &person("alice", &["billing-leads"]), "ok", 1001).unwrap();
        assert_eq!((a.status, a.decided_by.as_deref()), (Status::Approved, Some("alice")));
        // The legacy shared token is in every group.
        let mut b = held("billing-leads", 1);
        let everyone = Approver {
            name: "admin-token".to_owned(),
            groups: None,
        };
        decide(&mut b, false, &everyone, "", 1001).unwrap();
        assert_eq!(b.status, Status::Denied);
    }

    #[test]
    fn a_quorum_needs_different_people_and_a_denial_decides_at_once() {
        let mut a = held("billing-leads", 2);
        let alice = person("alice", &["billing-leads"]);
        decide(&mut a, true, &alice, "first", 1001).unwrap();
        assert_eq!(a.status, Status::Pending, "one of two");
        assert_eq!(
            decide(&mut a, true, &alice, "again", 1002),
            Err(DecideError::AlreadyApproved)
        );
        assert_eq!(a.status, Status::Pending);
        decide(&mut a, true, &person("carol", &["billing-leads"]), "second", 1003).unwrap();
        assert_eq!(a.status, Status::Approved);
        assert_eq!(a.decided_by.as_deref(), Some("alice, carol"));
        assert_eq!(a.votes.len(), 2);

        let mut b = held("billing-leads", 2);
        decide(&mut b, true, &alice, "", 1001).unwrap();
        decide(&mut b, false, &person("carol", &["billing-leads"]), "no", 1002).unwrap();
        assert_eq!(b.status, Status::Denied);
    }

    #[test]
    fn every_group_asked_must_approve_and_nobody_approves_their_own_call() {
        let mut a = held("billing-leads, security", 1);
        decide(&mut a, true, &person("alice", &["billing-leads"]), "", 1001).unwrap();
        assert_eq!(a.status, Status::Pending, "security has not approved");
        decide(&mut a, true, &person("sam", &["security"]), "", 1002).unwrap();
        assert_eq!(a.status, Status::Approved);

        let mut b = held("billing-leads", 1);
        assert_eq!(
            decide(&mut b, true, &person("billing-bot", &["billing-leads"]), "", 1001),
            Err(DecideError::OwnCall)
        );
    }
}
