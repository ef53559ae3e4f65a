//! Tools under their own AWS roles, against a real local emulator: moto's server (from PyPI,
//! started here) in auth mode, so it checks every SigV4 signature and evaluates the role's
//! policies. toolgate runs as the real binary with the standard AWS environment pointing at it.
//!
//! The tools are CloudWatch Logs API calls on moto itself: a 200 proves toolgate assumed the
//! role, signed the request correctly (moto recomputes the signature) and the role allowed it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::support::{self, TestUpstream, send};
use serde_json::{Value, json};

const MOTO: &str = "moto[server]==5.2.5";
const ACCOUNT: &str = "123456789012";

fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| support::python_venv("moto-venv", &[MOTO], "import moto.server"))
        .clone()
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// moto's server on a free port (auth mode after `auth_after` requests, if given).
async fn start_moto(auth_after: Option<&str>) -> (Proc, u16) {
    let port = free_port();
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let mut cmd = Command::new(python);
    cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(n) = auth_after {
        cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n);
    }
    let moto = Proc(cmd.spawn().unwrap());
    wait_for(port).await;
    (moto, port)
}

/// `dir/toolgate.yaml` for the policies in `dir/policies` (ports picked by the OS, region
/// us-east-1), with `audit` as the audit section; returns its path.
fn write_config(dir: &std::path::Path, audit: &str) -> PathBuf {
    let d = dir.display();
    let cfg = dir.join("toolgate.yaml");
    let audit = if audit.is_empty() {
        format!("audit: {{ file: {d}/audit.jsonl }}\n")
    } else {
        audit.to_owned()
    };
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\npolicies: {d}/policies\napprovals: {{ store: {d}/a.redb }}\naws: {{ region: us-east-1 }}\n{audit}"),
    )
    .unwrap();
    cfg
}

/// An unsigned IAM query-API call to moto (counted among its first, unauthenticated requests).
async fn iam(moto: &str, params: &[(&str, &str)]) -> String {
    let mut body = String::from("Version=2010-05-08");
    for (k, v) in params {
        body.push('&');
        body.push_str(k);
        body.push('=');
        body.push_str(&percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string());
    }
    let r = send(
        "POST",
        moto,
        &[
            ("content-type", "application/x-www-form-urlencoded".to_owned()),
            // Routes the query API to IAM.
            ("authorization", "AWS4-HMAC-SHA256 Credential=AKIASETUP/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=00".to_owned()),
        ],
        body.into_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{params:?}: {text}");
    text
}

fn xml(text: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = text.find(&open).unwrap_or_else(|| panic!("no <{tag}> in {text}")) + open.len();
    let end = text[start..].find(&format!("</{tag}>")).unwrap() + start;
    text[start..end].to_owned()
}

fn policy(actions: &[&str], resource: &str) -> String {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resource}]})
        .to_string()
}

/// Starts toolgate serve with `env`; returns it and its data and admin URLs.
fn serve(cfg: &std::path::Path, env: &[(&str, String)]) -> (Proc, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    cmd.arg("serve")
        .arg("-c")
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped());
    for k in [
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_SESSION_TOKEN",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut data, mut admin) = (None, None);
    for line in stderr.by_ref() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("toolgate: data plane listening on ") {
            data = Some(a.to_owned());
        }
        if let Some(a) = line.strip_prefix("toolgate: admin plane listening on ") {
            admin = Some(a.to_owned());
            break;
        }
    }
    // Keep draining stderr (a full pipe would stall the server); echo it for failures.
    std::thread::spawn(move || {
        for line in stderr.map_while(Result::ok) {
            eprintln!("toolgate: {line}");
        }
    });
    (Proc(child), data.expect("data address"), admin.expect("admin address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_run_under_their_own_assumed_roles_signed_and_checked_by_the_emulator() {
    let (_moto, port) = start_moto(Some("7")).await;
    let moto = format!("http://127.0.0.1:{port}/");

    // The identity toolgate runs as may assume two roles, not a third.
    iam(&moto, &[("Action", "CreateUser"), ("UserName", "toolgate")]).await;
    let key = iam(&moto, &[("Action", "CreateAccessKey"), ("UserName", "toolgate")]).await;
    let (key_id, secret) = (xml(&key, "AccessKeyId"), xml(&key, "SecretAccessKey"));
    let assume = policy(&["sts:AssumeRole"], &format!("arn:aws:iam::{ACCOUNT}:role/logs-*"));
    iam(
        &moto,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", "toolgate"),
            ("PolicyName", "assume"),
            ("PolicyDocument", &assume),
        ],
    )
    .await;
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/toolgate")}, "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]}]}).to_string();
    for role in ["logs-writer", "logs-reader"] {
        iam(
            &moto,
            &[
                ("Action", "CreateRole"),
                ("RoleName", role),
                ("AssumeRolePolicyDocument", &trust),
            ],
        )
        .await;
    }
    let writer = policy(&["logs:CreateLogGroup", "logs:DescribeLogGroups"], "*");
    iam(
        &moto,
        &[
            ("Action", "PutRolePolicy"),
            ("RoleName", "logs-writer"),
            ("PolicyName", "w"),
            ("PolicyDocument", &writer),
        ],
    )
    .await;
    let reader = policy(&["logs:DescribeLogGroups"], "*");
    iam(
        &moto,
        &[
            ("Action", "PutRolePolicy"),
            ("RoleName", "logs-reader"),
            ("PolicyName", "r"),
            ("PolicyDocument", &reader),
        ],
    )
    .await;
    // From here on moto authenticates every request.

    let echo = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let role = |name: &str, sign: &str| format!("{{ arn: \"arn:aws:iam::{ACCOUNT}:role/{name}\", sign: {sign} }}");
    let logs_tool = |target: &str, role_name: &str| {
        format!(
            "    upstream: {{ url: \"{moto}\", method: POST, headers: {{ X-Amz-Target: \"Logs_20140328.{target}\", Content-Type: \"application/x-amz-json-1.1\" }} }}\n    aws_role: {}\n",
            role(role_name, "logs")
        )
    };
    let digest = support::sha256_hex("ops-key");
    let batch = support::sha256_hex("batch-key");
    let text = format!(
        "agents:\n  ops-bot:\n    credentials: {{ api_key_sha256: [ \"{digest}\" ] }}\n    tools: [ logs.*, echo.signed, echo.headers ]\n  batch-bot:\n    credentials: {{ api_key_sha256: [ \"{batch}\" ] }}\n    tools: [ echo.signed ]\ntools:\n  logs.create_group:\n{}    arguments: {{ type: object, required: [ logGroupName ], properties: {{ logGroupName: {{ type: string }} }} }}\n  logs.create_group_as_reader:\n{}  logs.describe:\n{}  logs.create_group_unassumable:\n{}  echo.signed:\n    upstream: {{ url: \"{}/signed\", method: POST }}\n    aws_role: {}\n  echo.headers:\n    upstream: {{ url: \"{}/echo_headers\", method: POST }}\n    aws_role: {}\n",
        logs_tool("CreateLogGroup", "logs-writer"),
        logs_tool("CreateLogGroup", "logs-reader"),
        logs_tool("DescribeLogGroups", "logs-writer"),
        logs_tool("CreateLogGroup", "admin-role"),
        echo.url,
        role("logs-writer", "execute-api"),
        echo.url,
        role("logs-writer", "execute-api"),
    );
    std::fs::write(policies.join("aws.yaml"), text).unwrap();
    let cfg = write_config(dir.path(), "");
    let env = [
        ("AWS_ACCESS_KEY_ID", key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_REGION", "us-east-1".to_owned()),
    ];
    let (_toolgate, data, admin) = serve(&cfg, &env);
    let call = |tool: &str, body: Value| {
        let url = format!("{data}/v1/tools/{tool}");
        async move {
            send(
                "POST",
                &url,
                &[
                    ("authorization", "Bearer ops-key".to_owned()),
                    ("content-type", "application/json".to_owned()),
                ],
                body.to_string().into_bytes(),
            )
            .await
        }
    };

    // Signed with the writer role's credentials, verified and permitted by the emulator.
    let r = call("logs.create_group", json!({"logGroupName": "/toolgate/test"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = call("logs.describe", json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("/toolgate/test"));

    // The reader role may not create groups: the emulator refuses the signed call.
    let r = call("logs.create_group_as_reader", json!({"logGroupName": "/toolgate/nope"})).await;
    assert!(
        r.status == 400 || r.status == 403,
        "{} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains("AccessDenied"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    // A role toolgate may not assume: STS refuses, nothing is sent, the event names the role.
    let r = call("logs.create_group_unassumable", json!({"logGroupName": "/toolgate/x"})).await;
    let body = r.assert_error(502, "upstream_error");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("role/admin-role"),
        "{body}"
    );

    // What a tool receives: SigV4 with the role's session token, never the caller's credential.
    for _ in 0..2 {
        assert_eq!(call("echo.signed", json!({"q": 1})).await.status, 200);
    }
    let seen = echo.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let auth = s.headers["authorization"].to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential="), "{auth}");
        assert!(auth.contains("/us-east-1/execute-api/aws4_request"), "{auth}");
        assert!(
            auth.contains("x-amz-security-token"),
            "the session token is signed: {auth}"
        );
        assert!(
            !auth.contains(&key_id),
            "signed with the role's credentials, not toolgate's own"
        );
        assert!(!auth.contains("ops-key"));
        assert!(s.headers.contains_key("x-amz-security-token"));
        assert!(s.headers.contains_key("x-amz-date"));
    }

    // A tool that echoes its request headers does not hand the agent the role's credentials:
    // the session token and the key id toolgate signed with are scrubbed from its answer.
    let r = call("echo.headers", json!({"q": 2})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent = echo.requests().last().unwrap().headers.clone();
    let token = sent["x-amz-security-token"].to_str().unwrap().to_owned();
    let credential = sent["authorization"].to_str().unwrap();
    let access_key = credential
        .split("Credential=")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let answer = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(!answer.contains(&token), "the session token came back: {answer}");
    assert!(!answer.contains(&access_key), "the access key id came back: {answer}");
    assert!(answer.contains("[REDACTED:aws_credentials]"), "{answer}");
    let e = events_for(&dir, &r);
    assert!(e["reasons"].to_string().contains("aws_role"), "{e}");

    // Concurrent first calls of another agent (its own session tags): one AssumeRole for all.
    let mut burst = Vec::new();
    for i in 0..16 {
        let url = format!("{data}/v1/tools/echo.signed");
        burst.push(tokio::spawn(async move {
            send(
                "POST",
                &url,
                &[("authorization", "Bearer batch-key".to_owned())],
                format!("{{\"i\": {i}}}").into_bytes(),
            )
            .await
            .status
        }));
    }
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }

    // Credentials are cached per role and agent: logs-writer once for ops-bot, once for
    // batch-bot (16 concurrent calls), logs-reader once; the refused role is counted apart.
    let metrics = send("GET", &format!("{admin}/metrics"), &[], Vec::new()).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let ok = text
        .lines()
        .find(|l| l.starts_with("toolgate_sts_assume_role_total{result=\"ok\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(ok.ends_with(" 3"), "{ok}");

    // Audit events carry the role.
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    let arns: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "tool_call")
        .filter_map(|e| e["upstream"]["role_arn"].as_str())
        .collect();
    assert!(
        arns.contains(&format!("arn:aws:iam::{ACCOUNT}:role/logs-writer").as_str()),
        "{arns:?}"
    );
    assert!(
        arns.contains(&format!("arn:aws:iam::{ACCOUNT}:role/admin-role").as_str()),
        "{arns:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sts_blocks_the_call_and_never_forwards_it_unsigned() {
    let echo = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let digest = support::sha256_hex("ops-key");
    std::fs::write(
        dir.path().join("policies/aws.yaml"),
        format!("agents:\n  ops-bot:\n    credentials: {{ api_key_sha256: [ \"{digest}\" ] }}\n    tools: [ echo.signed ]\ntools:\n  echo.signed:\n    upstream: {{ url: \"{}/signed\" }}\n    aws_role: {{ arn: \"arn:aws:iam::{ACCOUNT}:role/x\", sign: execute-api }}\n", echo.url),
    )
    .unwrap();
    let cfg = write_config(dir.path(), "");
    // STS "answers" by hanging up. A port held open, not one freed and hoped unused: a moto
    // started by a concurrent test could be given a freed port and answer for real.
    let sts = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sts_port = sts.local_addr().unwrap().port();
    std::thread::spawn(move || sts.incoming().for_each(drop));
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_ENDPOINT_URL_STS", format!("http://127.0.0.1:{sts_port}")),
        ("AWS_MAX_ATTEMPTS", "1".to_owned()),
    ];
    let (_toolgate, data, _) = serve(&cfg, &env);
    let r = send(
        "POST",
        &format!("{data}/v1/tools/echo.signed"),
        &[("authorization", "Bearer ops-key".to_owned())],
        b"{}".to_vec(),
    )
    .await;
    let body = r.assert_error(503, "unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("role/x"), "{body}");
    assert!(echo.requests().is_empty(), "nothing was forwarded");
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    let e = events.iter().find(|e| e["event"] == "tool_call").unwrap();
    assert_eq!(e["code"], "unavailable");
    assert_eq!(e["upstream"]["role_arn"], format!("arn:aws:iam::{ACCOUNT}:role/x"));
}

/// Every event in a CloudWatch Logs stream on moto, read back with GetLogEvents.
async fn read_stream(moto: &str, group: &str, stream: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut body = json!({"logGroupName": group, "logStreamName": stream, "startFromHead": true});
        if let Some(t) = &token {
            body["nextToken"] = json!(t);
        }
        let r = send(
            "POST",
            moto,
            &[
                ("x-amz-target", "Logs_20140328.GetLogEvents".to_owned()),
                ("content-type", "application/x-amz-json-1.1".to_owned()),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIAREAD/20260101/us-east-1/logs/aws4_request, SignedHeaders=host, Signature=00"
                        .to_owned(),
                ),
            ],
            body.to_string().into_bytes(),
        )
        .await;
        if r.status != 200 {
            return out; // no stream yet
        }
        let v = r.json();
        let events = v["events"].as_array().cloned().unwrap_or_default();
        out.extend(events.iter().filter_map(|e| e["message"].as_str().map(str::to_owned)));
        let next = v["nextForwardToken"].as_str().map(str::to_owned);
        if events.is_empty() || next == token {
            return out;
        }
        token = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_cloudwatch_exactly_once_across_a_kill_9_and_rotations() {
    let (_moto, port) = start_moto(None).await;
    let moto = format!("http://127.0.0.1:{port}/");
    let echo = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let digest = support::sha256_hex("ops-key");
    std::fs::write(
        dir.path().join("policies/p.yaml"),
        format!("agents:\n  ops-bot:\n    credentials: {{ api_key_sha256: [ \"{digest}\" ] }}\n    tools: [ echo.post ]\ntools:\n  echo.post:\n    upstream: {{ url: \"{}/echo\" }}\n", echo.url),
    )
    .unwrap();
    let d = dir.path().display();
    let cfg = write_config(
        dir.path(),
        &format!(
            "audit:\n  file: {d}/audit.jsonl\n  rotate_bytes: 4000\n  cloudwatch: {{ log_group: /toolgate/audit, log_stream: test-stream, batch_max_events: 7, flush_interval_ms: 100 }}\n"
        ),
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
    ];
    let calls = |data: String, n: usize, from: usize| async move {
        let mut tasks = Vec::new();
        for i in from..from + n {
            let url = format!("{data}/v1/tools/echo.post");
            tasks.push(tokio::spawn(async move {
                let headers = [("authorization", "Bearer ops-key".to_owned())];
                let r = support::try_send("POST", &url, &headers, format!("{{\"i\": {i}}}").into_bytes()).await;
                r.map(|r| r.status)
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap() == Some(200) {
                ok += 1;
            }
        }
        ok
    };

    let (mut first, data, _) = serve(&cfg, &env);
    assert_eq!(calls(data.clone(), 20, 0).await, 20);
    for _ in 0..100 {
        if read_stream(&moto, "/toolgate/audit", "test-stream").await.len() >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Calls in flight while the process is killed: whatever was answered is in the file.
    let burst = tokio::spawn(calls(data.clone(), 30, 20));
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let _ = burst.await;
    // The worst crash: everything shipped so far was acknowledged but never checkpointed.
    std::fs::write(
        dir.path().join("audit.jsonl.cloudwatch"),
        r#"{"log_group":"/toolgate/audit","log_stream":"test-stream","offset":0,"last_ts_ms":0}"#,
    )
    .unwrap();

    let (_second, data, admin) = serve(&cfg, &env);
    assert_eq!(calls(data, 15, 100).await, 15);

    // The events are spread over the rotated files and the current one.
    let active = dir.path().join("audit.jsonl");
    let mut files = toolgate::audit::rotated_files(&active).unwrap();
    assert!(files.len() >= 3, "{} rotated files", files.len());
    files.push(active);
    let file: Vec<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(file.len() >= 35, "{} events", file.len());
    let mut shipped = Vec::new();
    for _ in 0..100 {
        shipped = read_stream(&moto, "/toolgate/audit", "test-stream").await;
        if shipped.len() >= file.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (mut a, mut b) = (file.clone(), shipped.clone());
    a.sort();
    b.sort();
    assert_eq!(b.len(), a.len(), "every event shipped, none twice");
    assert_eq!(a, b, "CloudWatch holds exactly the audit file's events");
    // The chain is checkable from the shipped events alone: CloudWatch orders them by time,
    // not as written, and `--any-order` follows the chain from line to line.
    let from_cloudwatch = dir.path().join("from-cloudwatch.jsonl");
    let verify = |lines: &[String]| {
        std::fs::write(
            &from_cloudwatch,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
            .args(["audit", "verify", "--any-order"])
            .arg(&from_cloudwatch)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, said) = verify(&shipped);
    assert!(ok && said.contains("the chain is whole"), "{said}");
    // One shipped event removed: found.
    let mut gap = shipped.clone();
    gap.remove(gap.len() / 2);
    let (ok, said) = verify(&gap);
    assert!(!ok && said.contains("does not follow any line"), "{said}");
    let metrics =
        String::from_utf8_lossy(&send("GET", &format!("{admin}/metrics"), &[], Vec::new()).await.body).into_owned();
    assert!(metrics.contains("toolgate_cloudwatch_backlog_bytes 0"), "{metrics}");
    assert!(metrics.contains("toolgate_audit_rotations_total"), "{metrics}");
    // Every rotated file is recorded as shipped whole, so an operator can delete it.
    let cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("audit.jsonl.cloudwatch")).unwrap()).unwrap();
    let newest = files[files.len() - 2]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(cp["shipped_through"], newest.as_str(), "{cp}");
}

/// A **test double** for Amazon Bedrock Runtime's ApplyGuardrail (no local emulator serves it):
/// the real REST wire format — `POST /guardrail/{id}/version/{version}/apply`, SigV4 for
/// service `bedrock`, the JSON request and response shapes, `x-amzn-errortype` errors. It blocks
/// a denied topic, anonymises email addresses and throttles on demand.
async fn guardrail_double() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::extract::{Path as AxPath, Request};
    use axum::response::IntoResponse;
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/guardrail/{id}/version/{version}/apply",
        axum::routing::post(move |AxPath((id, version)): AxPath<(String, String)>, req: Request| {
            let log = log.clone();
            async move {
                let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&body).unwrap();
                let text = body["content"][0]["text"]["text"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push(json!({"id": id, "version": version, "source": body["source"], "text": text, "signed": auth.starts_with("AWS4-HMAC-SHA256") && auth.contains("/bedrock/aws4_request")}));
                let usage = json!({"topicPolicyUnits": 1, "contentPolicyUnits": 1, "wordPolicyUnits": 0, "sensitiveInformationPolicyUnits": 1, "sensitiveInformationPolicyFreeUnits": 0, "contextualGroundingPolicyUnits": 0});
                if text.contains("overload") {
                    return (axum::http::StatusCode::TOO_MANY_REQUESTS, [("x-amzn-errortype", "ThrottlingException")], json!({"message": "Rate exceeded"}).to_string()).into_response();
                }
                let reply = if text.contains("launch codes") {
                    json!({"usage": usage, "action": "GUARDRAIL_INTERVENED", "outputs": [{"text": "Sorry, I cannot help with that."}],
                        "assessments": [{"topicPolicy": {"topics": [{"name": "secrets", "type": "DENY", "action": "BLOCKED"}]}}]})
                } else if text.contains("@example.com") {
                    let masked = text.replace("ada@example.com", "{EMAIL}");
                    json!({"usage": usage, "action": "GUARDRAIL_INTERVENED", "outputs": [{"text": masked}],
                        "assessments": [{"sensitiveInformationPolicy": {"piiEntities": [{"match": "ada@example.com", "type": "EMAIL", "action": "ANONYMIZED"}]}}]})
                } else {
                    json!({"usage": usage, "action": "NONE", "outputs": [], "assessments": [{}]})
                };
                ([("content-type", "application/json")], reply.to_string()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_guardrails_block_anonymise_and_fail_closed() {
    let (double, seen) = guardrail_double().await;
    let echo = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let digest = support::sha256_hex("ops-key");
    std::fs::write(
        dir.path().join("policies/p.yaml"),
        format!(
            "agents:\n  ops-bot:\n    credentials: {{ api_key_sha256: [ \"{digest}\" ] }}\n    tools: [ echo.post, tickets.read ]\ntools:\n  echo.post:\n    upstream: {{ url: \"{u}/echo\" }}\n    filters: {{ input: [ guard ] }}\n  tickets.read:\n    upstream: {{ url: \"{u}/tickets/{{id}}\", method: GET }}\n    arguments: {{ type: object, required: [ id ], properties: {{ id: {{ type: string }} }} }}\n    filters: {{ output: [ guard ] }}\nfilters:\n  guard: {{ bedrock_guardrail: {{ id: gr-123, version: \"1\" }} }}\n",
            u = echo.url
        ),
    )
    .unwrap();
    let cfg = write_config(dir.path(), "");
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", double),
        ("AWS_MAX_ATTEMPTS", "1".to_owned()),
    ];
    let (_toolgate, data, _) = serve(&cfg, &env);
    let call = |tool: &str, body: Value| {
        let url = format!("{data}/v1/tools/{tool}");
        async move {
            send(
                "POST",
                &url,
                &[("authorization", "Bearer ops-key".to_owned())],
                body.to_string().into_bytes(),
            )
            .await
        }
    };

    let r = call("echo.post", json!({"q": "hello"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first["source"], "INPUT");
    assert_eq!(first["id"], "gr-123");
    assert_eq!(first["signed"], true, "SigV4 for service bedrock");

    // A denied topic blocks the call before it reaches the tool; the summary names no values.
    let r = call("echo.post", json!({"q": "tell me the launch codes"})).await;
    let body = r.assert_error(403, "content_blocked");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("guard") && msg.contains("topic 'secrets' BLOCKED"),
        "{msg}"
    );
    assert_eq!(echo.count("/echo"), 1);

    // Anonymisation: the tool receives the masked arguments.
    let r = call("echo.post", json!({"q": "write to ada@example.com"})).await;
    assert_eq!(r.status, 200);
    let last = echo.requests().last().unwrap().json();
    assert_eq!(last["q"], "write to {EMAIL}");

    // The guardrail throttled: fail closed, nothing forwarded.
    let r = call("echo.post", json!({"q": "overload"})).await;
    r.assert_error(503, "unavailable");
    assert_eq!(echo.count("/echo"), 2);

    // On the way out: the tool's response is checked as OUTPUT and anonymised.
    let r = call("tickets.read", json!({"id": "T-1"})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(!text.contains("ada@example.com") && text.contains("{EMAIL}"), "{text}");
    assert!(seen.lock().unwrap().iter().any(|s| s["source"] == "OUTPUT"));
    let events = support::read_events(&dir.path().join("audit.jsonl"));
    let e = events.iter().rev().find(|e| e["event"] == "tool_call").unwrap();
    assert!(e["reasons"].to_string().contains("anonymised the response"), "{e}");
}

/// A minimal upstream MCP server (JSON responses) that records the SigV4 headers of every
/// request it gets.
async fn signed_mcp_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use axum::extract::Request;
    use axum::response::IntoResponse;
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |req: Request| {
            let log = log.clone();
            async move {
                let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let token = req.headers().get("x-amz-security-token").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                let msg: Value = serde_json::from_slice(&body).unwrap();
                log.lock().unwrap().push((auth, token));
                let id = msg["id"].clone();
                let result = match msg["method"].as_str().unwrap_or("") {
                    "initialize" => json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "inv", "version": "1"}}),
                    "tools/list" => json!({"tools": [{"name": "count", "description": "Count stock", "inputSchema": {"type": "object", "properties": {"sku": {"type": "string"}}}}]}),
                    "tools/call" => json!({"content": [{"type": "text", "text": "42"}], "isError": false}),
                    _ => return axum::http::StatusCode::ACCEPTED.into_response(),
                };
                ([("content-type", "application/json")], json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mcp_servers_are_called_under_their_aws_role() {
    let (_moto, port) = start_moto(None).await;
    let (mcp_url, seen) = signed_mcp_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let digest = support::sha256_hex("ops-key");
    std::fs::write(
        dir.path().join("policies/p.yaml"),
        format!("mcp_servers:\n  inv: {{ url: \"{mcp_url}\", aws_role: {{ arn: \"arn:aws:iam::{ACCOUNT}:role/inventory\", sign: execute-api }} }}\nagents:\n  ops-bot:\n    credentials: {{ api_key_sha256: [ \"{digest}\" ] }}\n    tools: [ inv.* ]\n"),
    )
    .unwrap();
    let cfg = write_config(dir.path(), "");
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
    ];
    let (_toolgate, data, _) = serve(&cfg, &env);
    let mut r = None;
    for _ in 0..50 {
        let resp = send(
            "POST",
            &format!("{data}/v1/tools/inv.count"),
            &[("authorization", "Bearer ops-key".to_owned())],
            br#"{"sku": "A-1"}"#.to_vec(),
        )
        .await;
        if resp.status == 200 {
            r = Some(resp);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // discovery runs at start
    }
    let r = r.expect("the discovered tool becomes callable");
    assert!(String::from_utf8_lossy(&r.body).contains("42"));
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() >= 4,
        "initialize, initialized, tools/list, tools/call: {seen:?}"
    );
    for (auth, token) in &seen {
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential="),
            "every request signed: {auth}"
        );
        assert!(auth.contains("/execute-api/aws4_request"), "{auth}");
        assert!(
            !auth.contains("AKIAEXAMPLE"),
            "the role's credentials, not toolgate's own"
        );
        assert!(!token.is_empty(), "with the role session's token");
    }
}

/// The `tool_call` event of a response, from a served gateway's audit file in `dir`.
fn events_for(dir: &tempfile::TempDir, r: &support::Resp) -> Value {
    support::read_events(&dir.path().join("audit.jsonl"))
        .into_iter()
        .find(|e| e["event"] == "tool_call" && e["request_id"] == r.request_id().as_str())
        .expect("the call's event")
}
