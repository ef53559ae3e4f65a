//! `toolgate demo`: the bundled config and policies, real demo tools on loopback, a scripted set
//! of calls printed as a table of decisions, then the gateway keeps serving for `curl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::routing::{delete, get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::approval::Approvals;
use crate::audit::AuditLog;
use crate::config::{ConfigError, ServerConfig};
use crate::gateway::Gateway;
use crate::policy::Policy;
use crate::server::{self, Running};

/// The bundled files, embedded so the demo runs from any directory.
const CONFIG: &str = include_str!("../config/toolgate.yaml");
pub const POLICIES: [(&str, &str); 5] = [
    ("policies/agents.yaml", include_str!("../policies/agents.yaml")),
    ("policies/anomaly.yaml", include_str!("../policies/anomaly.yaml")),
    ("policies/filters.yaml", include_str!("../policies/filters.yaml")),
    ("policies/rules.cedar", include_str!("../policies/rules.cedar")),
    ("policies/tools.yaml", include_str!("../policies/tools.yaml")),
];
/// Where the bundled policies expect the demo tools.
const TOOLS_ADDR: &str = "127.0.0.1:9001";
pub const SUPPORT_KEY: &str = "demo-support-key";
pub const ANALYST_KEY: &str = "demo-analyst-key";
pub const BATCH_KEY: &str = "demo-batch-key";
pub const ADMIN_TOKEN: &str = "demo-admin-token";
/// Dana, a billing lead: an approver of `billing-leads` with her own token (the inbox page's
/// sign-in, and the demo's approval).
pub const DANA_TOKEN: &str = "demo-dana-token";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the bundled policy does not load:\n{0}")]
    Config(#[from] ConfigError),
    #[error(
        "cannot listen on {addr}: {source} (is another demo running? pick other ports with --listen, --admin-listen and --tools-listen)"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0} (is another demo running? pick other ports with --listen and --admin-listen)")]
    Start(#[from] server::StartError),
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Approvals(#[from] crate::approval::ApprovalError),
}

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub tools_listen: SocketAddr,
    pub audit_file: PathBuf,
    pub approvals_file: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            listen: None,
            admin_listen: None,
            tools_listen: TOOLS_ADDR.parse().unwrap(),
            audit_file: PathBuf::from("var/demo-audit.jsonl"),
            approvals_file: PathBuf::from("var/demo-approvals.redb"),
        }
    }
}

/// The demo tools: small JSON services that answer like real ones.
pub fn tools_router() -> Router {
    Router::new()
        .route(
            "/tickets/{id}",
            get(|Path(id): Path<String>| async move {
                Json(json!({"id": id, "subject": "Cannot log in", "status": "open",
                    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "phone": "+14155550123"}}))
            }),
        )
        .route(
            "/tickets/{id}/replies",
            post(|Path(id): Path<String>, Json(body): Json<Value>| async move {
                Json(json!({"received": body, "ticket_id": id, "posted": true}))
            }),
        )
        .route(
            "/kb/search",
            post(|Json(body): Json<Value>| async move {
                Json(json!({"query": body["query"], "results": [
                    {"title": "Resetting a password", "url": "https://kb.example/reset"},
                    {"title": "Two-factor login problems", "url": "https://kb.example/2fa"}]}))
            }),
        )
        .route(
            "/refunds/{order_id}",
            post(|Path(order): Path<String>, Json(body): Json<Value>| async move {
                Json(json!({"order_id": order, "refunded": body["amount"], "status": "refunded"}))
            }),
        )
        .route(
            "/fraud/{order_id}",
            post(|Path(order): Path<String>| async move {
                Json(json!({"order_id": order, "score": 0.04, "verdict": "low_risk"}))
            }),
        )
        .route("/accounts/{id}", delete(|| async { Json(json!({"deleted": true})) }))
}

/// Starts demo tools and the gateway on the bundled config, plays the script, prints the table.
pub async fn run(opts: DemoOptions) -> Result<Running, DemoError> {
    let tools_addr = start_tools(opts.tools_listen).await?;
    let running = start_gateway(&opts, tools_addr).await?;
    let base = format!("http://{}", running.data_addr);
    println!(
        "toolgate demo: gateway on {base}, admin on http://{}, demo tools on http://{tools_addr}",
        running.admin_addr
    );
    println!("audit events: {}\n", opts.audit_file.display());
    let script = script();
    println!(
        "{:<2}  {:<40}  {:<11}  {:<22}  {:<6}  {:<26}  detail",
        "#", "call", "agent", "tool", "status", "decision / code"
    );
    println!("{}", "-".repeat(150));
    let mut approval_id = None;
    for (i, (what, key, tool, args)) in script.iter().enumerate() {
        let (status, decision, body) = post_json(&base, tool, *key, args, &[]).await;
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Some(id) = parsed["approval_id"].as_str() {
            approval_id = Some(id.to_owned());
        }
        print_row(i + 1, what, *key, tool, status, &decision, &body);
    }
    if let Some(id) = approval_id {
        let admin = format!("http://{}", running.admin_addr);
        approve_and_resend(&base, &admin, &id, script.len()).await;
    }
    println!(
        "\nTry it yourself:\n  curl -s -X POST {base}/v1/tools/kb.search -H 'Authorization: Bearer {SUPPORT_KEY}' -d '{{\"query\":\"2fa\"}}'\n  curl -s http://{admin}/admin/policy -H 'Authorization: Bearer {ADMIN_TOKEN}'\n  curl -s http://{admin}/metrics | grep toolgate_calls_total\n  the approvals inbox: http://{admin}/ui/ (sign in with {DANA_TOKEN})",
        admin = running.admin_addr
    );
    Ok(running)
}

/// The demo tools, on their own listener.
async fn start_tools(addr: SocketAddr) -> Result<SocketAddr, DemoError> {
    let tools = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, source })?;
    let tools_addr = tools.local_addr().map_err(|source| DemoError::Bind { addr, source })?;
    tokio::spawn(async move {
        let _ = axum::serve(tools, tools_router()).await;
    });
    Ok(tools_addr)
}

/// The gateway on the bundled config and policies, pointed at the demo tools.
async fn start_gateway(opts: &DemoOptions, tools_addr: SocketAddr) -> Result<Running, DemoError> {
    let mut config = ServerConfig::parse("config/toolgate.yaml (bundled)", CONFIG)?;
    if let Some(a) = opts.listen {
        config.listen = a;
    }
    if let Some(a) = opts.admin_listen {
        config.admin.listen = a;
    }
    config.audit.file = Some(opts.audit_file.clone());
    let sources: Vec<(String, String)> = POLICIES
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.replace(&format!("http://{TOOLS_ADDR}"), &format!("http://{tools_addr}")),
            )
        })
        .collect();
    let policy = Policy::compile(&sources, |p| std::fs::read_to_string(p))?;
    let audit = AuditLog::open(&config.audit)?;
    config.approvals.store = opts.approvals_file.clone();
    config.admin.people.push(crate::config::admin::Person {
        name: "dana@billing".to_owned(),
        token_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(DANA_TOKEN.as_bytes())),
        roles: vec![crate::config::Role::Approver],
        approver_groups: vec!["billing-leads".to_owned()],
    });
    let approvals = Approvals::open_configured(&config.approvals)?;
    let gateway = Arc::new(Gateway::new(config.clone(), policy, None, audit, approvals).with_admin_token(ADMIN_TOKEN));
    Ok(server::start(gateway).await?)
}

/// The scripted calls: what each shows, whose key, which tool, the arguments.
fn script() -> Vec<(&'static str, Option<&'static str>, &'static str, Value)> {
    vec![
        (
            "read a ticket (tool output PII redacted)",
            Some(SUPPORT_KEY),
            "tickets.read",
            json!({"ticket_id": "T-1001"}),
        ),
        (
            "search the knowledge base",
            Some(SUPPORT_KEY),
            "kb.search",
            json!({"query": "reset password", "limit": 2}),
        ),
        (
            "reply with a customer email (redacted)",
            Some(SUPPORT_KEY),
            "tickets.reply",
            json!({"ticket_id": "T-1001", "body": "We wrote to ada@example.com"}),
        ),
        (
            "refund before any fraud check (rule)",
            Some(SUPPORT_KEY),
            "billing.refund",
            json!({"order_id": "O-17", "amount": 20}),
        ),
        (
            "fraud-check the order",
            Some(SUPPORT_KEY),
            "fraud.check",
            json!({"order_id": "O-17"}),
        ),
        (
            "refund a small order",
            Some(SUPPORT_KEY),
            "billing.refund",
            json!({"order_id": "O-17", "amount": 20}),
        ),
        (
            "tool not on the allowlist",
            Some(SUPPORT_KEY),
            "billing.delete_account",
            json!({"account_id": "A-1"}),
        ),
        (
            "tool that does not exist",
            Some(SUPPORT_KEY),
            "admin.shell",
            json!({"cmd": "id"}),
        ),
        (
            "another agent, narrower allowlist",
            Some(ANALYST_KEY),
            "tickets.read",
            json!({"ticket_id": "T-1001"}),
        ),
        (
            "arguments that break the schema",
            Some(SUPPORT_KEY),
            "billing.refund",
            json!({"order_id": "17; DROP", "amount": -5}),
        ),
        (
            "blocked content (internal term)",
            Some(SUPPORT_KEY),
            "kb.search",
            json!({"query": "status of Ｐroject\u{200B} FALCON"}),
        ),
        ("no credentials", None, "kb.search", json!({"query": "hello"})),
        (
            "batch job, first call",
            Some(BATCH_KEY),
            "kb.search",
            json!({"query": "invoices"}),
        ),
        (
            "batch job, over its token budget",
            Some(BATCH_KEY),
            "kb.search",
            json!({"query": "summarise ".repeat(45)}),
        ),
        (
            "batch job, second call",
            Some(BATCH_KEY),
            "kb.search",
            json!({"query": "receipts"}),
        ),
        (
            "batch job, over 2 calls per minute",
            Some(BATCH_KEY),
            "kb.search",
            json!({"query": "refunds"}),
        ),
        (
            "fraud-check a second order",
            Some(SUPPORT_KEY),
            "fraud.check",
            json!({"order_id": "O-18"}),
        ),
        (
            "refund above 100 (held for approval)",
            Some(SUPPORT_KEY),
            "billing.refund",
            json!({"order_id": "O-18", "amount": 250}),
        ),
    ]
}

/// The held refund: a billing lead approves it with one call, the agent sends it again (it
/// passes), and once more (the approval is spent).
async fn approve_and_resend(base: &str, admin: &str, id: &str, played: usize) {
    println!(
        "\nDana, a billing lead, approves the held refund with her own token (or in the inbox, {admin}/ui/):\n  curl -s -X POST {admin}/admin/approvals/{id}/approve -H 'Authorization: Bearer {DANA_TOKEN}' -d '{{\"comment\": \"customer goodwill\"}}'"
    );
    let (status, _, _) = admin_post(
        admin,
        DANA_TOKEN,
        &format!("/admin/approvals/{id}/approve"),
        &json!({"comment": "customer goodwill"}),
    )
    .await;
    println!("  -> {status}\n");
    let args = json!({"order_id": "O-18", "amount": 250});
    let retries = ["the same refund, with the approval", "the approval again (single use)"];
    for (n, what) in retries.into_iter().enumerate() {
        let (status, decision, body) = post_json(
            base,
            "billing.refund",
            Some(SUPPORT_KEY),
            &args,
            &[("x-toolgate-approval", id)],
        )
        .await;
        print_row(
            played + n + 1,
            what,
            Some(SUPPORT_KEY),
            "billing.refund",
            status,
            &decision,
            &body,
        );
    }
}

fn print_row(n: usize, what: &str, key: Option<&str>, tool: &str, status: u16, decision: &str, body: &[u8]) {
    let agent = match key {
        Some(SUPPORT_KEY) => "support-bot",
        Some(ANALYST_KEY) => "analyst-bot",
        Some(_) => "batch-bot",
        None => "(none)",
    };
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (code, detail) = match parsed.get("error") {
        Some(e) => (
            e["code"].as_str().unwrap_or("").to_owned(),
            e["message"].as_str().unwrap_or("").to_owned(),
        ),
        None => (String::new(), String::from_utf8_lossy(body).chars().take(60).collect()),
    };
    let verdict = if code.is_empty() || code == decision {
        decision.to_owned()
    } else {
        format!("{decision} / {code}")
    };
    println!("{n:<2}  {what:<40}  {agent:<11}  {tool:<22}  {status:<6}  {verdict:<26}  {detail}");
}

/// An admin-plane POST with `token`: (status, decision header, body).
async fn admin_post(admin: &str, token: &str, path: &str, body: &Value) -> (u16, String, Bytes) {
    send(
        http::Request::post(format!("{admin}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json"),
        body,
    )
    .await
}

/// One call over real HTTP: (status, x-toolgate-decision, body).
pub async fn post_json(
    base: &str,
    tool: &str,
    key: Option<&str>,
    args: &Value,
    headers: &[(&str, &str)],
) -> (u16, String, Bytes) {
    let mut req = http::Request::post(format!("{base}/v1/tools/{tool}")).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(req, args).await
}

async fn send(req: http::request::Builder, args: &Value) -> (u16, String, Bytes) {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = req
        .body(Full::new(Bytes::from(args.to_string())))
        .expect("valid request");
    match client.request(req).await {
        Ok(res) => {
            let status = res.status().as_u16();
            let decision = res
                .headers()
                .get("x-toolgate-decision")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = res
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, decision, body)
        }
        Err(e) => (0, "error".to_owned(), Bytes::from(e.to_string())),
    }
}
