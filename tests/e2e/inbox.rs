//! The approvals inbox in a real browser: Debian's Chromium, headless, driven by
//! `tests/browser/inbox.mjs` (playwright-core from npm, installed by `.ci/run` with `npm ci
//! --prefix tests/browser`). The script signs in as alice, reads a held payment whose
//! arguments carry `<script>` and an email address, approves it with a comment, signs in as
//! bob (another group) and finds no buttons, and forges POSTs that must be refused. This test
//! then checks what happened behind the page: the agent's retry passes once, the decision is
//! on the audit trail under alice's name, and the refused forgeries are too.
//!
//! `TOOLGATE_SCREENSHOTS=DIR` keeps the script's screenshots (docs/images was made so).

use std::process::Command;

use serde_json::{Value, json};

use crate::rules::{OPS_KEY, rule_files};
use crate::support::{Harness, sha256_hex};

const ALICE: &str = "alice-inbox-token";
const BOB: &str = "bob-inbox-token";
const XSS: &str = "<script>window.__xss=1</script>";
const EMAIL: &str = "ada.lovelace@example.com";

fn payment(amount: u32) -> String {
    json!({"to": XSS, "amount": amount, "note": format!("refund for {EMAIL}")}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_decides_in_the_browser_and_the_page_runs_no_injected_script() {
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "the browser test needs playwright-core: run `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "the browser test needs Debian's chromium at {chromium} (`apt-get install chromium`; .ci/run does)"
    );
    let people = format!(
        ", people: [ {{ name: alice, token_sha256: {}, roles: [approver], approver_groups: [finance-leads] }}, {{ name: bob, token_sha256: {}, roles: [approver], approver_groups: [security-leads] }} ]",
        sha256_hex(ALICE),
        sha256_hex(BOB)
    );
    let h = Harness::start_admin("", &[], &people).await;
    for (name, text) in rule_files(&h.upstream.url) {
        std::fs::write(h.policy_dir.join(name), text).unwrap();
    }
    assert_eq!(h.admin("POST", "/admin/reload", true).await.status, 200);
    let hold = |amount| {
        let h = &h;
        async move {
            let r = h.call("pay.send", Some(OPS_KEY), &payment(amount)).await;
            r.assert_error(202, "approval_required")["approval_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let first = hold(250).await;
    let second = hold(260).await;

    let screenshots = std::env::var("TOOLGATE_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| h.dir.path().join("screenshots"));
    let out = Command::new("node")
        .arg(browser_dir.join("inbox.mjs"))
        .env("ADMIN_URL", &h.admin)
        .env("APPROVER_TOKEN", ALICE)
        .env("OUTSIDER_TOKEN", BOB)
        .env("APPROVAL_ID", &first)
        .env("SECOND_ID", &second)
        .env("TOOL", "pay.send")
        .env("AGENT", "ops-bot")
        .env("REDACTED_VALUE", EMAIL)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT_DIR", &screenshots)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("browser test passed"), "{stdout}");
    assert!(screenshots.join("inbox.png").is_file());

    // Behind the page: alice's approval, with her comment, as a signed-in session.
    let events = h.audit();
    let decided: Vec<&Value> = events.iter().filter(|e| e["event"] == "approval_decided").collect();
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(
        (
            &decided[0]["approval_id"],
            &decided[0]["by"],
            &decided[0]["via"],
            &decided[0]["comment"]
        ),
        (
            &json!(first),
            &json!("alice"),
            &json!("session"),
            &json!("refund checked against the ticket")
        )
    );
    // Both sign-ins are on the trail, with the token kind and roles.
    let signed_in: Vec<(&Value, &Value)> = events
        .iter()
        .filter(|e| e["event"] == "admin_signed_in")
        .map(|e| (&e["by"], &e["roles"]))
        .collect();
    assert_eq!(
        signed_in,
        [
            (&json!("alice"), &json!(["approver"])),
            (&json!("bob"), &json!(["approver"]))
        ]
    );
    // alice's POST with a forged CSRF token, bob's forged and token-less ones: refused and on
    // the trail.
    let refused: Vec<&Value> = events.iter().filter(|e| e["event"] == "admin_refused").collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(
        (&refused[0]["by"], &refused[0]["approval_id"], &refused[0]["reason"]),
        (
            &json!("alice"),
            &json!(first),
            &json!("The form's CSRF token is not valid.")
        )
    );
    assert!(
        refused[1..]
            .iter()
            .all(|e| e["by"] == "bob" && e["approval_id"] == second.as_str())
    );
    // The agent's retry passes once; the second call is still pending.
    let body = payment(250);
    let with = [("x-toolgate-approval", first.as_str())];
    assert_eq!(h.call_with("pay.send", OPS_KEY, &body, &with).await.status, 200);
    h.call_with("pay.send", OPS_KEY, &body, &with)
        .await
        .assert_error(403, "approval_denied");
    assert_eq!(h.upstream.count("/pay"), 1);
    let second_now = h.admin("GET", &format!("/admin/approvals/{second}"), true).await.json();
    assert_eq!(second_now["status"], "pending");
}
