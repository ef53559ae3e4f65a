//! Test support: a real upstream HTTP server that records what it receives, and a harness that
//! starts the real gateway (both planes) on 127.0.0.1:0 with fixture policies.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use toolgate::audit::AuditLog;
use toolgate::config::ServerConfig;
use toolgate::gateway::Gateway;
use toolgate::policy::Policy;
use toolgate::server::{self, Running};

pub const SUPPORT_KEY: &str = "support-key";
pub const ANALYST_KEY: &str = "analyst-key";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A real HTTP server on 127.0.0.1:0 standing in for the tools.
#[derive(Clone)]
pub struct TestUpstream {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let app = Router::new().fallback(move |req: Request| {
            let log = log.clone();
            async move { respond(log, req).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|s| s.uri.starts_with(path_prefix))
            .count()
    }
}

async fn respond(log: Arc<Mutex<Vec<Seen>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let path = parts.uri.path().to_owned();
    log.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let json_ct = [("content-type", "application/json")];
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            (json_ct, r#"{"late":true}"#).into_response()
        }
        "/big" => (json_ct, format!("{{\"blob\":\"{}\"}}", "x".repeat(100_000))).into_response(),
        "/echo_headers" => {
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), Value::from(v.to_str().unwrap_or(""))))
                .collect();
            (json_ct, json!({"headers": headers}).to_string()).into_response()
        }
        "/huge" => (json_ct, format!("{{\"blob\":\"{}\"}}", "x".repeat(12 << 20))).into_response(),
        "/text" => ([("content-type", "text/plain")], "hello\ncontact ada@example.com please\nbye").into_response(),
        "/secret" => (json_ct, r#"{"key":"AKIAIOSFODNN7EXAMPLE"}"#).into_response(),
        // Answers for output filters: clean (with spacing a re-serialisation would lose), PII
        // deep inside, and three kinds of JSON no filter can vouch for.
        "/answer/clean" => (json_ct, r#"{"b": [1, {"note": "all fine", "x": null}],  "a": "plain text"}"#).into_response(),
        "/answer/pii" => (json_ct, r#"{"k": [{"z": "mail ada@example.com"}], "n": 1}"#).into_response(),
        "/answer/dup" => (json_ct, r#"{"a": "x", "a": "y"}"#).into_response(),
        "/answer/deep" => (json_ct, format!("{}{}", "[".repeat(20), "]".repeat(20))).into_response(),
        "/answer/broken" => (json_ct, r#"{"a": "#).into_response(),
        "/answer/upper" => ([("content-type", "Application/JSON")], r#"{"to": "ada\u0040example.com"}"#).into_response(),
        "/answer/labelled_text" => ([("content-type", "text/plain")], r#"{"to": "ada\u0040example.com"}"#).into_response(),
        "/answer/ndjson" => ([("content-type", "text/plain")], "{\"to\": \"ada\\u0040example.com\"}\n{\"n\": 1}").into_response(),
        "/answer/dup_text" => ([("content-type", "text/plain")], r#"{"x": 1, "x": "ada\u0040example.com"}"#).into_response(),
        "/answer/bom" => ([("content-type", "text/plain")], "\u{FEFF}{\"to\": \"ada\\u0040example.com\"}").into_response(),
        "/answer/utf7" => ([("content-type", "text/plain; charset =utf-7")], "ada+AEA-example.com").into_response(),
        "/answer/utf16" => ([("content-type", "text/plain; charset=UTF-16LE")], "h\0i\0").into_response(),
        "/answer/pem" => (
            [("content-type", "text/plain")],
            "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nb3BlbnNzaC1rZXk\n-----END RSA PRIVATE KEY-----\nmail ops@example.com -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIK\n-----END EC PRIVATE KEY-----\ndone",
        )
            .into_response(),
        "/answer/pem_lines" => (
            json_ct,
            r#"{"file": "id_rsa", "lines": ["-----BEGIN OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXktdjEAAAAA", "QyNTUxOQAAACDx", "-----END OPENSSH PRIVATE KEY-----", "after"]}"#,
        )
            .into_response(),
        "/answer/list" => (json_ct, "[1, {\"a\": \"\\u00e9\"}]\n").into_response(),
        "/answer/pretty" => (json_ct, "{\n  \"a\": [1,\r\n    2],\r  \"b\": \"x\"\n}\n").into_response(),
        "/status500" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, json_ct, r#"{"err":"boom"}"#).into_response(),
        p if p.starts_with("/tickets/") && parts.method == "GET" => {
            (json_ct, json!({"id": p.trim_start_matches("/tickets/"), "customer": {"email": "ada@example.com", "card": "4111 1111 1111 1111"}, "status": "open"}).to_string()).into_response()
        }
        _ => (json_ct, json!({"ok": true, "path": path}).to_string()).into_response(),
    }
}

/// A URL nothing listens on (a port bound then released).
pub fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The real gateway on loopback with the fixture policies copied into a temp dir.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub data: String,
    pub admin: String,
    pub upstream: TestUpstream,
    pub audit_path: PathBuf,
    pub policy_dir: PathBuf,
    pub running: Option<Running>,
}

/// Writes `DIR/toolgate.yaml` for `toolgate serve` on free ports, with its policies, audit file
/// and approval store in `dir` (its own store: the default is locked by any toolgate already
/// running from the repository), then the `extra` config lines.
pub fn write_serve_config(dir: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("toolgate.yaml");
    let d = dir.display();
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\npolicies: {d}/policies\naudit: {{ file: {d}/audit.jsonl }}\napprovals: {{ store: {d}/approvals.redb }}\n{extra}"),
    )
    .unwrap();
    cfg
}

/// Reads a spawned `toolgate serve`'s stderr until both listeners are up; returns the data and
/// admin URLs and the rest of the log, still open (dropping it closes the pipe).
pub fn listeners(
    child: &mut std::process::Child,
) -> (
    String,
    String,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let (mut data, mut admin) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("toolgate: data plane listening on ") {
            data = Some(addr.to_owned());
        }
        if let Some(addr) = line.strip_prefix("toolgate: admin plane listening on ") {
            admin = Some(addr.to_owned());
            break;
        }
    }
    (
        data.expect("serve prints its data-plane address"),
        admin.expect("serve prints its admin address"),
        lines,
    )
}

/// A spawned `toolgate serve`, killed when the test ends, passed or failed (a failed assertion
/// must not leave it running, holding the test harness's output open).
pub struct Serving(pub std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `toolgate serve -c cfg` (with `env`), trusting the fixture CA for its outbound HTTPS (an
/// identity provider, a webhook receiver): the running process, its data and admin URLs. Its
/// log goes to the test's output.
pub fn serve_trusting_fixture_ca(cfg: &Path, env: &[(&str, &str)]) -> (Serving, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["serve", "-c"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .env("SSL_CERT_FILE", fixture("tls").join("ca.pem"))
        .env_remove("SSL_CERT_DIR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (data, admin, log) = listeners(&mut child);
    std::thread::spawn(move || log.map_while(Result::ok).for_each(|line| eprintln!("toolgate: {line}")));
    (Serving(child), data, admin)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Copies the fixture policies into `dir`, filling placeholders.
pub fn write_fixture_policies(dir: &Path, upstream: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["agents.yaml", "tools.yaml"] {
        let text = std::fs::read_to_string(fixture("policies").join(f))
            .unwrap()
            .replace("{{UPSTREAM}}", upstream)
            .replace("{{DOWN}}", &refused_url())
            .replace("SUPPORT_DIGEST", &sha256_hex(SUPPORT_KEY))
            .replace("ANALYST_DIGEST", &sha256_hex(ANALYST_KEY));
        std::fs::write(dir.join(f), text).unwrap();
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts with extra config lines appended (YAML at top level, e.g. limits).
    pub async fn start_with(extra_config: &str) -> Self {
        Self::start_full(extra_config, &[]).await
    }

    /// Starts with extra config lines and extra policy files (`{{DIR}}` is the temp dir,
    /// `{{UPSTREAM}}` the test upstream's URL).
    pub async fn start_full(extra_config: &str, extra_policies: &[(&str, &str)]) -> Self {
        Self::start_admin(extra_config, extra_policies, "").await
    }

    /// As [`Harness::start_full`], with `admin_extra` added to the `admin:` map (e.g.
    /// `, tls: { … }`).
    pub async fn start_admin(extra_config: &str, extra_policies: &[(&str, &str)], admin_extra: &str) -> Self {
        let upstream = TestUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        write_fixture_policies(&policy_dir, &upstream.url);
        for (name, text) in extra_policies {
            let text = text
                .replace("{{DIR}}", &dir.path().display().to_string())
                .replace("{{UPSTREAM}}", &upstream.url)
                .replace("{{FIXTURES}}", &fixture("").display().to_string());
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let extra_config = extra_config.replace("{{DIR}}", &dir.path().display().to_string());
        let extra_config = extra_config.as_str();
        let audit_path = dir.path().join("audit.jsonl");
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
        let limits = if extra_config.contains("limits:") {
            String::new()
        } else {
            "limits: { max_body_bytes: 4096, max_json_depth: 8, upstream_timeout_ms: 2000, max_response_bytes: 65536 }\n".to_owned()
        };
        // An `audit:` of the test's own is given the test's file, unless it names its own
        // (e.g. `/dev/full`, a log that fails every write).
        let (audit, extra_config) = match extra_config.strip_prefix("audit: {") {
            Some(_) if extra_config.starts_with("audit: { file:") => (String::new(), extra_config.to_owned()),
            Some(rest) => {
                // Up to the brace that closes `audit: {` (its values may be maps too).
                let mut depth = 1;
                let end = rest
                    .find(|c| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .expect("audit: { ... } closed");
                let (audit, rest) = (&rest[..end], &rest[end + 1..]);
                (
                    format!("audit: {{ file: {},{audit}}}\n", audit_path.display()),
                    rest.trim_start().to_owned(),
                )
            }
            None => (
                format!("audit: {{ file: {} }}\n", audit_path.display()),
                extra_config.to_owned(),
            ),
        };
        let config_text = format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, token_env: TOOLGATE_TEST_UNSET_TOKEN, token_file: {}{admin_extra} }}\npolicies: {}\n{audit}{limits}{approvals}{extra_config}",
            token_file.display(),
            policy_dir.display(),
            approvals = if extra_config.contains("approvals:") {
                String::new()
            } else {
                format!(
                    "approvals: {{ store: {} }}\n",
                    dir.path().join("approvals.redb").display()
                )
            },
        );
        let config_path = dir.path().join("toolgate.yaml");
        std::fs::write(&config_path, &config_text).unwrap();
        let config = ServerConfig::load(&config_path).unwrap();
        let policy = Policy::load(&policy_dir).unwrap();
        let audit = AuditLog::open(&config.audit).unwrap();
        let approvals = toolgate::approval::Approvals::open_configured(&config.approvals).unwrap();
        let gateway = Arc::new(Gateway::new(config, policy, Some(policy_dir.clone()), audit, approvals));
        let running = server::start(gateway).await.unwrap();
        Self {
            data: format!("http://{}", running.data_addr),
            admin: format!("http://{}", running.admin_addr),
            running: Some(running),
            dir,
            upstream,
            audit_path,
            policy_dir,
        }
    }

    /// `POST /v1/tools/{tool}` with an API key and a JSON body.
    pub async fn call(&self, tool: &str, key: Option<&str>, body: &str) -> Resp {
        let mut headers = vec![("content-type", "application/json".to_owned())];
        if let Some(k) = key {
            headers.push(("authorization", format!("Bearer {k}")));
        }
        send(
            "POST",
            &format!("{}/v1/tools/{tool}", self.data),
            &headers,
            body.as_bytes().to_vec(),
        )
        .await
    }

    /// `POST /v1/tools/{tool}` with an API key, a JSON body and extra headers.
    pub async fn call_with(&self, tool: &str, key: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
        let mut headers = vec![
            ("content-type", "application/json".to_owned()),
            ("authorization", format!("Bearer {key}")),
        ];
        headers.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        send(
            "POST",
            &format!("{}/v1/tools/{tool}", self.data),
            &headers,
            body.as_bytes().to_vec(),
        )
        .await
    }

    /// An authed admin request with a JSON body.
    pub async fn admin_json(&self, method: &str, path: &str, body: &Value) -> Resp {
        let headers = vec![
            ("authorization", format!("Bearer {ADMIN_TOKEN}")),
            ("content-type", "application/json".to_owned()),
        ];
        send(
            method,
            &format!("{}{path}", self.admin),
            &headers,
            body.to_string().into_bytes(),
        )
        .await
    }

    /// A request to the admin plane, with the admin token when `authed`.
    pub async fn admin(&self, method: &str, path: &str, authed: bool) -> Resp {
        let headers = if authed {
            vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))]
        } else {
            Vec::new()
        };
        send(method, &format!("{}{path}", self.admin), &headers, Vec::new()).await
    }

    /// Every audit event written so far.
    pub fn audit(&self) -> Vec<Value> {
        read_events(&self.audit_path)
    }

    /// The one `tool_call` event for a request id.
    pub fn event_for(&self, resp: &Resp) -> Value {
        self.one_event(resp, "tool_call")
    }

    /// The one `request_refused` event for a request id (refused before it was a tool call).
    pub fn refusal_for(&self, resp: &Resp) -> Value {
        self.one_event(resp, "request_refused")
    }

    fn one_event(&self, resp: &Resp, kind: &str) -> Value {
        let id = resp.request_id();
        let events: Vec<Value> = self
            .audit()
            .into_iter()
            .filter(|e| e["request_id"] == id.as_str() && e["event"] == kind)
            .collect();
        assert_eq!(
            events.len(),
            1,
            "expected exactly one {kind} event for {id}, got {events:?}"
        );
        events.into_iter().next().unwrap()
    }
}

pub fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect()
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn request_id(&self) -> String {
        self.header("x-request-id")
            .expect("every response has x-request-id")
            .to_owned()
    }

    /// Asserts the contract's error body and returns it.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "status for {code}; body {:?}", self.body);
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["request_id"], self.request_id().as_str(), "{body}");
        assert!(
            body["error"]["message"].as_str().is_some_and(|m| m.len() > 10),
            "{body}"
        );
        body
    }
}

/// [`send`], or `None` if the server did not answer (it was killed).
pub async fn try_send(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Option<Resp> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .ok()?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some(Resp { status, headers, body })
}

/// Sends one HTTP/1.1 request over a fresh connection.
/// Sends `head` (request line, headers and the start of a body that declares itself longer) to
/// `base` over a raw connection and then nothing more; returns the raw reply once the gateway
/// closes the connection. Panics if it has not after 5 s: a stalled sender must be cut off.
pub async fn send_stalled(base: &str, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_to_end(&mut reply))
        .await
        .expect("the gateway answers and closes instead of waiting forever")
        .unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

/// Reads one HTTP/1.1 response (head and a `content-length` body) from a raw connection that
/// stays open.
pub async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("a content-length");
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut chunk))
            .await
            .expect("the response arrives")
            .unwrap();
        assert!(n > 0, "the connection closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub async fn send(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Resp {
    try_send(method, url, headers, body).await.expect("gateway answers")
}

/// A Python interpreter with `packages` installed, in a virtualenv under the target directory
/// (created on first use), or the one named by `TOOLGATE_TEST_PYTHON`. `check` is Python code
/// that must run for the environment to count as ready.
pub fn python_venv(name: &str, packages: &[&str], check: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("TOOLGATE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let py = venv.join("bin/python");
    let works = |py: &PathBuf| {
        std::process::Command::new(py)
            .args(["-c", check])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works(&py) {
        let status = std::process::Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for these tests");
        assert!(status.success(), "python3 -m venv failed");
        let out = std::process::Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {packages:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(works(&py), "{packages:?} do not import after installing them");
    }
    py
}
