//! Approvers are people: admin callers authenticated as themselves (personal tokens, the auth
//! proxy's headers; OIDC in `oidc.rs`), each route open to its roles, an approval decided only
//! by an approver in its rule's group, a quorum of different people, and every decision and
//! refusal on the audit trail under the authenticated name.

use serde_json::{Value, json};

use crate::rules::{OPS_KEY, rule_files};
use crate::support::{ADMIN_TOKEN, Harness, Resp, send, sha256_hex};

const ALICE: &str = "alice-token"; // approver, finance-leads
const CAROL: &str = "carol-token"; // approver, finance-leads
const BOB: &str = "bob-token"; // approver, security-leads
const OLGA: &str = "olga-token"; // operator
const AUDREY: &str = "audrey-token"; // auditor

/// `admin.people`, as the harness's `admin:` map continues: four people, and one whose token
/// is also ops-bot's API key.
fn people() -> String {
    let person = |name: &str, token: &str, roles: &str, groups: &str| {
        format!(
            "{{ name: {name}, token_sha256: {}, roles: [{roles}]{groups} }}",
            sha256_hex(token)
        )
    };
    let list = [
        person("alice", ALICE, "approver", ", approver_groups: [finance-leads]"),
        person("carol", CAROL, "approver", ", approver_groups: [finance-leads]"),
        person("bob", BOB, "approver", ", approver_groups: [security-leads]"),
        person("olga", OLGA, "operator", ""),
        person("audrey", AUDREY, "auditor", ""),
        person(
            "ops-bot-owner",
            OPS_KEY,
            "approver",
            ", approver_groups: [finance-leads]",
        ),
    ];
    format!(", people: [ {} ]", list.join(", "))
}

/// Payments over 1000 need two finance leads.
const TWO_LEADS: &str = "@id(\"big-payments-need-two-leads\")\n@approval(\"finance-leads\")\n@quorum(\"2\")\nforbid (principal, action == Action::\"pay.send\", resource)\nwhen { context.input.amount.greaterThan(decimal(\"1000.0\")) };\n";

async fn start(admin_extra: &str) -> Harness {
    let h = Harness::start_admin("", &[], admin_extra).await;
    for (name, text) in rule_files(&h.upstream.url) {
        std::fs::write(h.policy_dir.join(name), text).unwrap();
    }
    std::fs::write(h.policy_dir.join("two-leads.cedar"), TWO_LEADS).unwrap();
    let r = h.admin("POST", "/admin/reload", true).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    h
}

async fn admin(h: &Harness, token: &str, method: &str, path: &str, body: Value) -> Resp {
    let headers = vec![
        ("authorization", format!("Bearer {token}")),
        ("content-type", "application/json".to_owned()),
    ];
    send(
        method,
        &format!("{}{path}", h.admin),
        &headers,
        body.to_string().into_bytes(),
    )
    .await
}

/// A payment held for approval; its id.
async fn held(h: &Harness, amount: u32) -> String {
    let r = h
        .call(
            "pay.send",
            Some(OPS_KEY),
            &format!(r#"{{"to": "acme", "amount": {amount}}}"#),
        )
        .await;
    r.assert_error(202, "approval_required")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn resend(h: &Harness, amount: u32, id: &str) -> Resp {
    h.call_with(
        "pay.send",
        OPS_KEY,
        &format!(r#"{{"to": "acme", "amount": {amount}}}"#),
        &[("x-toolgate-approval", id)],
    )
    .await
}

fn events(h: &Harness, kind: &str) -> Vec<Value> {
    h.audit().into_iter().filter(|e| e["event"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_approver_in_the_group_decides_and_the_decision_names_them() {
    let h = start(&people()).await;
    let id = held(&h, 250).await;
    let approve = format!("/admin/approvals/{id}/approve");

    // An approver of another group: 403, on the trail, and the approval is still pending.
    let r = admin(&h, BOB, "POST", &approve, json!({"comment": "mine?"})).await;
    r.assert_error(403, "forbidden");
    // An operator without the approver role cannot approve either; nor an auditor.
    admin(&h, OLGA, "POST", &approve, json!({}))
        .await
        .assert_error(403, "forbidden");
    admin(&h, AUDREY, "POST", &approve, json!({}))
        .await
        .assert_error(403, "forbidden");
    // Nobody approves a call their own credentials made.
    let own = admin(&h, OPS_KEY, "POST", &approve, json!({})).await;
    let body = own.assert_error(403, "forbidden");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("their own"),
        "{body}"
    );
    let refused = events(&h, "admin_refused");
    let who: Vec<(&str, &str)> = refused
        .iter()
        .map(|e| (e["by"].as_str().unwrap(), e["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        who,
        [
            ("bob", "approver"),
            ("olga", "approver"),
            ("audrey", "approver"),
            ("ops-bot-owner", "approver")
        ]
    );
    assert!(
        refused
            .iter()
            .all(|e| e["approval_id"].is_null() || e["approval_id"] == id.as_str())
    );
    assert_eq!(refused[0]["approval_id"], id.as_str());
    assert_eq!(refused[0]["action"], format!("POST {approve}"));
    assert_eq!(refused[0]["via"], "token");
    assert!(events(&h, "approval_decided").is_empty());

    // What each role may read: the auditor reads everything and changes nothing; an approver
    // sees the approvals of their groups only.
    assert_eq!(admin(&h, AUDREY, "GET", "/admin/policy", json!(null)).await.status, 200);
    let list = admin(&h, AUDREY, "GET", "/admin/approvals", json!(null)).await.json();
    assert_eq!(list["approvals"][0]["id"], id.as_str());
    admin(&h, AUDREY, "POST", "/admin/reload", json!({}))
        .await
        .assert_error(403, "forbidden");
    admin(&h, BOB, "GET", "/admin/policy", json!(null))
        .await
        .assert_error(403, "forbidden");
    let bobs = admin(&h, BOB, "GET", "/admin/approvals", json!(null)).await.json();
    assert_eq!(bobs["approvals"], json!([]), "not bob's group");
    admin(&h, BOB, "GET", &format!("/admin/approvals/{id}"), json!(null))
        .await
        .assert_error(404, "not_found");
    assert_eq!(admin(&h, OLGA, "POST", "/admin/reload", json!({})).await.status, 200);
    assert_eq!(
        events(&h, "admin_refused").len(),
        6,
        "the auditor's reload and bob's read too"
    );
    // No credential: 401, and no event (anyone can knock).
    send("POST", &format!("{}{approve}", h.admin), &[], Vec::new())
        .await
        .assert_error(401, "unauthenticated");
    assert_eq!(events(&h, "admin_refused").len(), 6);

    // Alice, in finance-leads, approves; the `by` her body claims is ignored.
    let r = admin(
        &h,
        ALICE,
        "POST",
        &approve,
        json!({"by": "mallory", "comment": "known vendor"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        (r.json()["status"].as_str(), r.json()["decided_by"].as_str()),
        (Some("approved"), Some("alice"))
    );
    let decided = events(&h, "approval_decided");
    assert_eq!(decided.len(), 1);
    assert_eq!(
        (
            &decided[0]["by"],
            &decided[0]["role"],
            &decided[0]["via"],
            &decided[0]["comment"]
        ),
        (
            &json!("alice"),
            &json!("approver"),
            &json!("token"),
            &json!("known vendor")
        )
    );
    assert!(!std::fs::read_to_string(&h.audit_path).unwrap().contains("mallory"));
    assert_eq!(resend(&h, 250, &id).await.status, 200);
    assert_eq!(h.upstream.count("/pay"), 1);

    // The shared admin token still decides, as `admin-token`, an operator in every group.
    let id2 = held(&h, 300).await;
    let r = admin(
        &h,
        ADMIN_TOKEN,
        "POST",
        &format!("/admin/approvals/{id2}/deny"),
        json!({}),
    )
    .await;
    assert_eq!(r.json()["decided_by"], "admin-token");
    assert_eq!(events(&h, "approval_decided")[1]["via"], "admin_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_two_needs_two_different_people() {
    let h = start(&people()).await;
    let id = held(&h, 5000).await;
    let approve = format!("/admin/approvals/{id}/approve");
    let r = admin(&h, ALICE, "POST", &approve, json!({"comment": "one"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let a = r.json();
    assert_eq!((a["status"].as_str(), a["quorum"].as_u64()), (Some("pending"), Some(2)));
    assert_eq!(a["votes"][0]["by"], "alice");
    let first = &events(&h, "approval_decided")[0];
    assert_eq!(
        (&first["status"], &first["decision"], &first["approvals"]),
        (&json!("pending"), &json!("approve"), &json!(1))
    );
    // One approval of two lets nothing through.
    resend(&h, 5000, &id).await.assert_error(403, "approval_denied");
    // The same person twice is not two people.
    admin(&h, ALICE, "POST", &approve, json!({}))
        .await
        .assert_error(403, "forbidden");
    assert_eq!(events(&h, "approval_decided").len(), 1);
    let r = admin(&h, CAROL, "POST", &approve, json!({"comment": "two"})).await;
    assert_eq!(r.json()["status"], "approved");
    assert_eq!(r.json()["decided_by"], "alice, carol");
    assert_eq!(resend(&h, 5000, &id).await.status, 200);
    resend(&h, 5000, &id).await.assert_error(403, "approval_denied");
    assert_eq!(h.upstream.count("/pay"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_count_only_from_the_auth_proxy() {
    let headers = |groups: &str| {
        vec![
            ("x-forwarded-email", "pat@example.com".to_owned()),
            ("x-forwarded-groups", groups.to_owned()),
            ("content-type", "application/json".to_owned()),
        ]
    };
    // The proxy is this test (127.0.0.1): its headers name the person.
    let h = start(", auth_proxy: { trusted_proxies: [ 127.0.0.1 ] }").await;
    let id = held(&h, 250).await;
    let url = format!("{}/admin/approvals/{id}/approve", h.admin);
    send("POST", &url, &headers("security-leads"), b"{}".to_vec())
        .await
        .assert_error(403, "forbidden");
    let r = send("POST", &url, &headers("staff, finance-leads"), b"{}".to_vec()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let decided = events(&h, "approval_decided");
    assert_eq!(
        (&decided[0]["by"], &decided[0]["via"]),
        (&json!("pat@example.com"), &json!("proxy"))
    );

    // The proxy is elsewhere: the same headers from here name nobody.
    let h = start(", auth_proxy: { trusted_proxies: [ 192.0.2.10 ] }").await;
    let id = held(&h, 250).await;
    let url = format!("{}/admin/approvals/{id}/approve", h.admin);
    send("POST", &url, &headers("finance-leads"), b"{}".to_vec())
        .await
        .assert_error(401, "unauthenticated");
    let status = admin(&h, ADMIN_TOKEN, "GET", &format!("/admin/approvals/{id}"), json!(null)).await;
    assert_eq!(status.json()["status"], "pending");
    assert!(events(&h, "approval_decided").is_empty());
}

#[test]
fn check_says_what_the_shared_token_does_and_refuses_an_approver_without_groups() {
    let dir = tempfile::tempdir().unwrap();
    crate::support::write_fixture_policies(&dir.path().join("policies"), &crate::support::refused_url());
    let check = |approvals: &str, token: Option<&str>| {
        let config = crate::support::write_serve_config(dir.path(), "");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(
                "admin: { listen: 127.0.0.1:0 }",
                &format!(
                    "admin: {{ listen: 127.0.0.1:0, token_env: TOOLGATE_CHECK_TOKEN{} }}",
                    people()
                ),
            )
            .replace("approvals: { store:", &format!("approvals: {{ {approvals}store:"));
        std::fs::write(&config, text).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"));
        cmd.args(["check", "--config"])
            .arg(&config)
            .env_remove("TOOLGATE_CHECK_TOKEN");
        if let Some(t) = token {
            cmd.env("TOOLGATE_CHECK_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = check("", Some("shared-secret"));
    assert!(ok, "{out}");
    assert!(
        out.contains("warning") && out.contains("operator in every approval group") && out.contains("admin-token"),
        "{out}"
    );
    let (ok, out) = check("", None);
    assert!(ok && !out.contains("admin-token"), "{out}");
    // An unsigned, plain-http webhook is worth a word too.
    let (ok, out) = check("webhook: { url: \"http://10.0.0.9/hook\" }, ", None);
    assert!(ok && out.contains("plain http") && out.contains("not signed"), "{out}");

    let config = crate::support::write_serve_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!(
            "admin: {{ listen: 127.0.0.1:0, people: [ {{ name: zed, token_sha256: {}, roles: [approver] }} ] }}",
            sha256_hex("z")
        ),
    );
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        said.contains("admin.people[0].approver_groups") && said.contains("approval groups"),
        "{said}"
    );
}
