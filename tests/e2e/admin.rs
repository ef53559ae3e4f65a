//! The admin plane over real HTTP: health, metrics, the token, reloads good and broken, and the
//! file watcher.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::{ANALYST_KEY, Harness, SUPPORT_KEY, send};

/// Whether, within `polls` tenths of a second, the analyst is refused `kb.search` (the edits
/// these tests make to the policy take it away).
async fn analyst_denied_within(h: &Harness, polls: usize) -> bool {
    for _ in 0..polls {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#).await.status == 403 {
            return true;
        }
    }
    false
}

/// How many `policy_reloaded` events the audit file holds.
fn reloads(h: &Harness) -> usize {
    h.audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reloaded")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_need_no_token() {
    let h = Harness::start().await;
    assert_eq!(h.admin("GET", "/healthz", false).await.status, 200);
    let ready = h.admin("GET", "/readyz", false).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["audit"], "ok");

    h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "q"}"#).await;
    h.call("no.such.tool", Some(SUPPORT_KEY), "{}").await;
    let m = h.admin("GET", "/metrics", false).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(
        text.contains(r#"toolgate_calls_total{agent="support-bot",tool="kb.search",decision="allow",code="ok"}"#),
        "{text}"
    );
    // Caller-chosen tool names never become label values: no unbounded cardinality.
    assert!(
        text.contains(r#"tool="(unknown)",decision="deny",code="tool_not_allowed""#),
        "{text}"
    );
    assert!(!text.contains("no.such.tool"));
    assert!(text.contains("toolgate_decision_duration_seconds_bucket"));
    assert!(text.contains("toolgate_upstream_duration_seconds_bucket{tool=\"kb.search\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_require_the_token() {
    let h = Harness::start().await;
    h.admin("GET", "/admin/policy", false)
        .await
        .assert_error(401, "unauthenticated");
    let wrong = vec![("authorization", "Bearer not-the-token".to_owned())];
    send("GET", &format!("{}/admin/policy", h.admin), &wrong, Vec::new())
        .await
        .assert_error(401, "unauthenticated");
    send("POST", &format!("{}/admin/reload", h.admin), &wrong, Vec::new())
        .await
        .assert_error(401, "unauthenticated");
    let r = h.admin("GET", "/admin/policy", true).await;
    assert_eq!(r.status, 200);
    let p = r.json();
    assert_eq!(p["version"].as_str().unwrap().len(), 16);
    let analyst = p["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "analyst-bot")
        .unwrap();
    assert_eq!(analyst["tools"], serde_json::json!(["kb.search"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_is_not_served_on_the_admin_port() {
    let h = Harness::start().await;
    let auth = vec![("authorization", format!("Bearer {SUPPORT_KEY}"))];
    let r = send(
        "POST",
        &format!("{}/v1/tools/kb.search", h.admin),
        &auth,
        b"{}".to_vec(),
    )
    .await;
    r.assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_keeps_the_last_good_policy_and_is_audited() {
    let h = Harness::start().await;
    let before = h.admin("GET", "/admin/policy", true).await.json()["version"].clone();
    let agents = h.policy_dir.join("agents.yaml");
    let good = std::fs::read_to_string(&agents).unwrap();
    let broken = good.replace("tools: [ kb.* ]", "tols: [ kb.* ]").replace(
        "tools: [ tickets.read,",
        "tools: [ \"bad name\", nope.tool, tickets.read,",
    );
    std::fs::write(&agents, broken).unwrap();

    let r = h.admin("POST", "/admin/reload", true).await;
    assert_eq!(r.status, 422);
    let body = r.json();
    assert_eq!(body["error"]["code"], "policy_invalid");
    assert_eq!(body["error"]["policy_version"], before);
    let errors = body["error"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "every error, not the first: {errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("no tool named `nope.tool`")),
        "{errors:?}"
    );
    let text = errors[2]["text"].as_str().unwrap();
    assert!(
        text.contains("agents.yaml:") && text.contains("unknown field `tols`"),
        "{text}"
    );
    assert!(errors[2]["line"].as_u64().unwrap() > errors[0]["line"].as_u64().unwrap());

    // Still the old policy: the analyst can search.
    assert_eq!(
        h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#).await.status,
        200
    );
    assert_eq!(h.admin("GET", "/admin/policy", true).await.json()["version"], before);
    let failed: Vec<_> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reload_failed" && e["trigger"] == "admin")
        .collect();
    // The file watcher may also have tried the broken files (its own event, `file_change`).
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["policy_version"], before);
    assert!(failed[0]["errors"][0].as_str().unwrap().contains("agents.yaml"));

    // A good edit is picked up and audited with both versions.
    std::fs::write(&agents, good.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    let r = h.admin("POST", "/admin/reload", true).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "reloaded");
    h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#)
        .await
        .assert_error(403, "tool_not_allowed");
    let ok: Vec<_> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reloaded")
        .collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["previous_version"], before);
    let call = h.audit().into_iter().rev().find(|e| e["event"] == "tool_call").unwrap();
    assert_eq!(call["policy_version"], ok[0]["policy_version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_files_are_reloaded_when_they_change() {
    let h = Harness::start().await;
    assert_eq!(
        h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#).await.status,
        200
    );
    let agents = h.policy_dir.join("agents.yaml");
    let good = std::fs::read_to_string(&agents).unwrap();
    // A broken save first: ignored, the old policy stays.
    std::fs::write(&agents, "agents: [ this is not a map").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#).await.status,
        200
    );
    // Then the fixed file.
    std::fs::write(&agents, good.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    let denied = analyst_denied_within(&h, 50).await;
    assert!(denied, "the changed file was not reloaded");
    let kinds: Vec<String> = h
        .audit()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        kinds.contains(&"policy_reload_failed".to_owned()) && kinds.contains(&"policy_reloaded".to_owned()),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_rotates_by_size_and_on_an_admins_request_and_no_event_is_lost() {
    let h = Harness::start_with("audit: { rotate_bytes: 3000 }\n").await;
    for i in 0..12 {
        let r = h
            .call("kb.search", Some(SUPPORT_KEY), &format!(r#"{{"query": "q{i}"}}"#))
            .await;
        assert_eq!(r.status, 200);
    }
    let by_size = toolgate::audit::rotated_files(&h.audit_path).unwrap();
    assert!(
        !by_size.is_empty(),
        "twelve events of a few hundred bytes pass 3000 bytes"
    );

    // By hand: the event names the authenticated caller, not a `by` the body claims.
    let r = h
        .admin_json("POST", "/admin/audit/rotate", &serde_json::json!({"by": "alice"}))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    let rotated = toolgate::audit::rotated_files(&h.audit_path).unwrap();
    assert_eq!(rotated.len(), by_size.len() + 1);
    let newest = rotated.last().unwrap();
    assert_eq!(answer["previous_file"], newest.file_name().unwrap().to_str().unwrap());
    assert_eq!(answer["previous_bytes"], std::fs::metadata(newest).unwrap().len());

    // The new file opens with the event saying who rotated and what came before.
    let head = &crate::support::read_events(&h.audit_path)[0];
    assert_eq!(head["event"], "audit_rotated");
    assert_eq!(head["trigger"], "admin");
    assert_eq!(
        (&head["by"], &head["role"], &head["via"]),
        (&json!("admin-token"), &json!("operator"), &json!("admin_token"))
    );
    assert_eq!(head["previous_file"], answer["previous_file"]);

    // Every call's event is in exactly one file.
    let mut ids: Vec<String> = rotated
        .iter()
        .chain([&h.audit_path])
        .flat_map(|f| crate::support::read_events(f))
        .filter(|e| e["event"] == "tool_call")
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((n, ids.len()), (12, 12));

    // A rotation that cannot be done says so, and the events go on into the current file.
    let mut blocker = h.audit_path.clone().into_os_string();
    blocker.push(".rotating");
    std::fs::create_dir(&blocker).unwrap();
    let r = h
        .admin_json("POST", "/admin/audit/rotate", &serde_json::json!({"by": "alice"}))
        .await;
    r.assert_error(503, "unavailable");
    assert_eq!(
        h.call("kb.search", Some(SUPPORT_KEY), r#"{"query": "after"}"#)
            .await
            .status,
        200
    );
    let events = crate::support::read_events(&h.audit_path);
    assert_eq!(events.last().unwrap()["event"], "tool_call");
    assert_eq!(
        toolgate::audit::rotated_files(&h.audit_path).unwrap().len(),
        rotated.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_that_lets_agents_do_more_waits_for_its_audit_event() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    // Every audit write fails (ENOSPC), as on a full disk.
    let h = Harness::start_with("audit: { file: /dev/full }\n").await;
    let gw = h.running.as_ref().unwrap().gateway.clone();
    let agent_url = "/admin/agents/support-bot";

    // A quarantine only closes: it takes effect, and its answer says it was not recorded.
    let r = h
        .admin_json("POST", &format!("{agent_url}/quarantine"), &json!({"by": "alice"}))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["changed"], true);
    assert_eq!(r.json()["audited"], false);

    // A release would open again without a record: refused, and the agent stays quarantined.
    let r = h
        .admin_json("DELETE", &format!("{agent_url}/quarantine"), &json!({"by": "alice"}))
        .await;
    let body = r.assert_error(503, "unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("was not released") && message.contains("audit"),
        "{message}"
    );
    let status = h.admin("GET", agent_url, true).await.json();
    assert_eq!(status["quarantine"]["by"], "admin-token", "{status}");

    // An approval: neither approved nor denied without its `approval_decided` event.
    let hold = toolgate::approval::HoldRequest {
        agent: "support-bot".to_owned(),
        tool: "billing.refund".to_owned(),
        rule: "large-refunds".to_owned(),
        rules: vec!["large-refunds".to_owned()],
        group: "finance".to_owned(),
        reason: "over 100".to_owned(),
        arguments: Some(json!({"amount": 500})),
        arguments_sha256: "a".repeat(64),
        request_id: "req-held".to_owned(),
        session: None,
        quorum: 1,
    };
    let (approval, _) = gw
        .approvals
        .request(hold, toolgate::state::unix_now())
        .await
        .unwrap()
        .unwrap();
    for verdict in ["approve", "deny"] {
        let r = h
            .admin_json(
                "POST",
                &format!("/admin/approvals/{}/{verdict}", approval.id),
                &json!({"by": "bob"}),
            )
            .await;
        r.assert_error(503, "unavailable");
    }
    let stored = h.admin("GET", &format!("/admin/approvals/{}", approval.id), true).await;
    assert_eq!(
        stored.json()["status"],
        "pending",
        "{}",
        String::from_utf8_lossy(&stored.body)
    );

    // A valid new policy is not put in force without its `policy_reloaded` event, by hand or
    // by the watcher.
    let before = h.admin("GET", "/admin/policy", true).await.json()["version"].clone();
    let agents = h.policy_dir.join("agents.yaml");
    let text = std::fs::read_to_string(&agents).unwrap();
    std::fs::write(&agents, text.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    let r = h.admin_json("POST", "/admin/reload", &json!({"by": "carol"})).await;
    let body = r.assert_error(503, "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was not put in force"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.admin("GET", "/admin/policy", true).await.json()["version"], before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_by_hand_names_who_asked() {
    let h = Harness::start().await;
    let agents = h.policy_dir.join("agents.yaml");
    let text = std::fs::read_to_string(&agents).unwrap();
    std::fs::write(&agents, text.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    let r = h.admin_json("POST", "/admin/reload", &json!({"by": "carol"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["status"], "reloaded");
    let reloaded: Vec<_> = h
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "policy_reloaded")
        .collect();
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    // The caller as authenticated: the body's `by` is ignored.
    assert_eq!(reloaded[0]["by"], "admin-token");
    assert_eq!(reloaded[0]["role"], "operator");
    assert_eq!(reloaded[0]["trigger"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_ignores_files_the_policy_is_not_read_from() {
    let h = Harness::start().await;
    let churn = h.policy_dir.join("notes.log");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Something that writes a log next to the policies several times a second.
    let writer = {
        let (churn, stop) = (churn.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                std::fs::write(&churn, "x".repeat((n % 97) as usize)).unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let agents = h.policy_dir.join("agents.yaml");
    let text = std::fs::read_to_string(&agents).unwrap();
    std::fs::write(&agents, text.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    let denied = analyst_denied_within(&h, 60).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        denied,
        "the changed policy was not loaded while another file kept changing"
    );
    let reloads = reloads(&h);
    assert_eq!(reloads, 1, "the log file's changes are not policy changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_mounted_as_a_configmap_is_reloaded_when_its_link_is_swapped() {
    use std::os::unix::fs::symlink;
    let h = Harness::start().await;
    let dir = &h.policy_dir;
    // Laid out as Kubernetes mounts a ConfigMap: each file a link through `..data`, itself a
    // link to a timestamped directory; an update writes a new directory and swaps `..data`.
    std::fs::create_dir(dir.join("..v1")).unwrap();
    for f in ["agents.yaml", "tools.yaml"] {
        std::fs::rename(dir.join(f), dir.join("..v1").join(f)).unwrap();
    }
    symlink("..v1", dir.join("..data")).unwrap();
    for f in ["agents.yaml", "tools.yaml"] {
        symlink(format!("..data/{f}"), dir.join(f)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        h.call("kb.search", Some(ANALYST_KEY), r#"{"query":"q"}"#).await.status,
        200
    );

    std::fs::create_dir(dir.join("..v2")).unwrap();
    let agents = std::fs::read_to_string(dir.join("..v1/agents.yaml")).unwrap();
    std::fs::write(
        dir.join("..v2/agents.yaml"),
        agents.replace("tools: [ kb.* ]", "tools: [ ]"),
    )
    .unwrap();
    std::fs::copy(dir.join("..v1/tools.yaml"), dir.join("..v2/tools.yaml")).unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();

    let denied = analyst_denied_within(&h, 60).await;
    assert!(denied, "the swapped ConfigMap was not reloaded");
    let reloads = reloads(&h);
    assert_eq!(reloads, 1, "moving the same files behind links is not a new policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_whose_event_could_not_be_written_is_put_in_force_once_it_can_be() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000; // Linux
    // The audit log is a pipe this test reads: while no one reads it, every write fails
    // (EPIPE), as on a broken disk; reading again mends it.
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("audit.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let open_reader = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let reader = open_reader();
    let h = Harness::start_with(&format!("audit: {{ file: {} }}\n", fifo.display())).await;
    let version = || async { h.admin("GET", "/admin/policy", true).await.json()["version"].clone() };
    let before = version().await;

    drop(reader);
    let agents = h.policy_dir.join("agents.yaml");
    let text = std::fs::read_to_string(&agents).unwrap();
    std::fs::write(&agents, text.replace("tools: [ kb.* ]", "tools: [ ]")).unwrap();
    h.admin_json("POST", "/admin/reload", &json!({"by": "carol"}))
        .await
        .assert_error(503, "unavailable");
    // Long enough for the watcher to see the change too (two polls a second apart), and fail
    // the same way.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(version().await, before);

    let mut reader = open_reader();
    let mut after = before.clone();
    // The watcher backs off between tries (1, 2, 4 … s): up to 15 s.
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = version().await;
        if after != before {
            break;
        }
    }
    assert_ne!(
        after, before,
        "the policy was not put in force once the log could be written"
    );
    let mut written = String::new();
    let _ = reader.read_to_string(&mut written);
    let reloaded: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["event"] == "policy_reloaded")
        .collect();
    assert_eq!(reloaded.len(), 1, "{written}");
    assert_eq!(reloaded[0]["trigger"], "retry");
    assert_eq!(reloaded[0]["policy_version"], after);
}
