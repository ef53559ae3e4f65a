//! The `toolgate` command line: serve, demo, check, explain. The only place `anyhow` appears.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use toolgate::audit::AuditLog;
use toolgate::config::{ConfigError, ServerConfig, StateBackend};
use toolgate::gateway::Gateway;
use toolgate::policy::history::NoHistory;
use toolgate::policy::{Decision, Policy, ToolCall};
use toolgate::state::State;

/// mimalloc: a proxy allocates and frees many small buffers per call; glibc's malloc spent ~14% of
/// the CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "toolgate",
    version,
    about = "A reverse proxy that checks every AI agent tool call."
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: data plane and admin plane.
    Serve {
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
    },
    /// Run the embedded demo: bundled policies, demo tools, a scripted set of calls.
    Demo {
        /// Data-plane address (default from the bundled config, 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin-plane address (default 127.0.0.1:9090).
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Where the demo tools listen (the bundled policies point at 127.0.0.1:9001).
        #[arg(long, default_value = "127.0.0.1:9001")]
        tools_listen: std::net::SocketAddr,
        /// Play the script, print the table and exit instead of serving.
        #[arg(long)]
        once: bool,
    },
    /// Validate the config and every policy file; print each error as FILE:LINE:COL: message.
    Check {
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
    },
    /// Run policy test cases (YAML: agent, tool, args, earlier calls → expected decision);
    /// print `N passed, N failed`, exit 1 on any failure.
    Test {
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
        /// Directory of case files (default: `tests/` inside the policy directory).
        dir: Option<PathBuf>,
        /// Instead of running the cases, add the audit events named by `--request-id` to this
        /// case file as cases (the call, its earlier calls, the decision it got).
        #[arg(long, requires_all = ["audit", "request_id"])]
        record: Option<PathBuf>,
        /// With --record: the audit files to read.
        #[arg(long, num_args = 1..)]
        audit: Vec<PathBuf>,
        /// With --record: the request ids of the events to record.
        #[arg(long = "request-id", num_args = 1..)]
        request_id: Vec<String>,
    },
    /// Ask this gateway's admin plane whether it is up (`/healthz`) or ready (`/readyz`), for a
    /// container's HEALTHCHECK: exit 0 on 200, 1 otherwise. Reads the admin address (and
    /// whether it speaks TLS) from the config; sends no credential.
    Healthcheck {
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
        /// Ask `/readyz` (policy loaded, audit writable, state backend reachable) instead.
        #[arg(long)]
        ready: bool,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Run the recorded tool calls of audit files through a candidate policy and print the
    /// calls it would decide differently; exit 1 if any would change between allow, deny and
    /// held (so a pull request can gate on it), 2 if the policy or files cannot be read.
    Replay {
        /// Audit files: the current one and rotated ones (`audit.jsonl*`), any order.
        #[arg(long = "audit", required = true, num_args = 1..)]
        audit: Vec<PathBuf>,
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
        /// The candidate policy directory (default: the config's `policies`).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// `text` or `json`.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Print the JSON Schema of the server config or of a policy file (for editors' YAML
    /// completion and for CI); the same as docs/schema/.
    Schema {
        #[arg(value_enum)]
        file: SchemaOf,
    },
    /// Work with audit files.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the decision the proxy would take for a call, as JSON, without calling anything.
    Explain {
        #[arg(short, long, env = "TOOLGATE_CONFIG", default_value = "config/toolgate.yaml")]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        tool: String,
        /// The arguments, a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// The session the call belongs to (session-aware rules see no earlier calls here:
        /// use `toolgate test` cases with `history` for those).
        #[arg(long)]
        session: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that the audit trail is whole: every line's `prev` is the hash of the line before
    /// it, across rotated files, and (with --key) every checkpoint's signature. Reports the
    /// first broken line; exit 0 when whole, 1 when broken, 2 when the files cannot be read.
    Verify {
        /// The files: the current one and its rotated predecessors (`audit.jsonl*`), any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The checkpoint key (`audit.checkpoint_key_file`), to check checkpoint signatures.
        #[arg(long)]
        key: Option<PathBuf>,
        /// `text` or `json`.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        /// The lines of one file in any order (events exported from CloudWatch Logs, which
        /// orders them by time): the chain is followed from line to line by `prev`.
        #[arg(long)]
        any_order: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SchemaOf {
    Config,
    Policy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve { config } => serve(&config, cli.log_format),
        Command::Demo {
            listen,
            admin_listen,
            tools_listen,
            once,
        } => demo(listen, admin_listen, tools_listen, once),
        Command::Check { config } => return check(&config),
        Command::Test {
            config,
            record: Some(file),
            audit,
            request_id,
            ..
        } => return record_cases(&config, &file, audit, &request_id),
        Command::Test { config, dir, .. } => return test(&config, dir),
        Command::Healthcheck {
            config,
            ready,
            timeout_ms,
        } => return healthcheck(&config, ready, timeout_ms),
        Command::Schema { file } => {
            // The published files, which a test keeps equal to the schemas derived from the
            // parsing types (`config::config_schema`, `policy::policy_schema`). Printing them
            // rather than deriving them here leaves the derived code out of the binary.
            print!(
                "{}",
                match file {
                    SchemaOf::Config => include_str!("../docs/schema/config.schema.json"),
                    SchemaOf::Policy => include_str!("../docs/schema/policy.schema.json"),
                }
            );
            return ExitCode::SUCCESS;
        }
        Command::Replay {
            audit,
            config,
            policies,
            format,
        } => return replay(audit, &config, policies.as_deref(), format),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    key,
                    format,
                    any_order,
                },
        } => return audit_verify(files, key.as_deref(), format, any_order),
        Command::Explain {
            config,
            agent,
            tool,
            args,
            session,
        } => explain(&config, &agent, &tool, &args, session.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match cli.log_format {
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "toolgate stopped"),
                LogFormat::Pretty => eprintln!("toolgate: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // A log line that cannot be written (stderr closed: the log collector went away) is lost,
    // not reported with `eprintln!`, which would panic and fail the call being served.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load(config: &Path) -> Result<(ServerConfig, Policy), ConfigError> {
    let cfg = ServerConfig::load(config)?;
    let policy = Policy::load(&cfg.policies)?;
    // A shadow policy must load too: one that does not would decide nothing, silently.
    if let Some(dir) = &cfg.shadow_policies {
        Policy::load(dir)?;
    }
    Ok((cfg, policy))
}

fn serve(config_path: &Path, log_format: LogFormat) -> anyhow::Result<()> {
    let (config, policy) = load(config_path).map_err(|e| anyhow::anyhow!("the configuration is invalid:\n{e}"))?;
    let audit = AuditLog::open(&config.audit)?;
    let admin = &config.admin;
    if admin.token().is_none() && admin.people.is_empty() && admin.oidc.is_none() && admin.auth_proxy.is_none() {
        tracing::warn!(env = %admin.token_env, "no admin identity configured (no token in the variable named by admin.token_env, no admin.people, admin.oidc or admin.auth_proxy): /admin/* and /ui/ will refuse every request");
    }
    let dir = config.policies.clone();
    let version = policy.version.clone();
    let runtime = runtime()?;
    // With Redis, approvals and tool pins are kept there too (shared by the replicas), and
    // the approval store file is not opened.
    let (state, approvals) = match &config.state {
        StateBackend::Memory => (
            State::default(),
            toolgate::approval::Approvals::open_configured(&config.approvals)?.into(),
        ),
        StateBackend::Redis(redis) => {
            let shared = Arc::new(
                runtime
                    .block_on(toolgate::state::RedisState::connect(redis))
                    .context("the state backend is not usable")?,
            );
            tracing::info!(server = %redis.server(), "state: redis");
            let ttl = std::time::Duration::from_secs(config.approvals.ttl_seconds);
            let approvals = toolgate::approval::ApprovalStore::shared(shared.clone(), ttl);
            (State::redis(shared), approvals)
        }
    };
    let gateway = Arc::new(Gateway::new(config, policy, Some(dir), audit, approvals).with_state(state));
    runtime.block_on(async move {
        let running = toolgate::server::start(gateway)
            .await
            .context("cannot bind the listeners")?;
        let planes = [
            ("data", format!("{}://{}", running.data_scheme, running.data_addr)),
            ("admin", format!("{}://{}", running.admin_scheme, running.admin_addr)),
        ];
        for (plane, url) in planes {
            // A JSON log stays all JSON (a collector parses every line); the text form is the
            // line scripts wait for.
            match log_format {
                LogFormat::Json => tracing::info!(plane, url, "listening"),
                LogFormat::Pretty => eprintln!("toolgate: {plane} plane listening on {url}"),
            }
        }
        tracing::info!(policy_version = %version, "serving");
        shutdown_signal().await;
        tracing::info!("shutting down: finishing calls in flight");
        running.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn demo(
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    tools_listen: std::net::SocketAddr,
    once: bool,
) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let opts = toolgate::demo::DemoOptions {
            listen,
            admin_listen,
            tools_listen,
            ..Default::default()
        };
        let running = toolgate::demo::run(opts).await?;
        if !once {
            println!("\nServing until Ctrl-C.");
            shutdown_signal().await;
        }
        running.shutdown().await;
        Ok(())
    })
}

fn check(config_path: &Path) -> ExitCode {
    match load(config_path) {
        Ok((cfg, policy)) => {
            // The state backend is part of the config: a Redis that cannot be reached (or
            // refuses the credentials, or does not persist) would stop `serve` too.
            if let StateBackend::Redis(redis) = &cfg.state {
                let connected = runtime().map_err(|e| e.to_string()).and_then(|rt| {
                    rt.block_on(toolgate::state::RedisState::connect(redis))
                        .map_err(|e| e.to_string())
                });
                match connected {
                    Ok(_) => println!("ok: state backend redis at {}", redis.server()),
                    Err(e) => {
                        println!("{}: state: {e}", config_path.display());
                        eprintln!("1 error(s)");
                        return ExitCode::FAILURE;
                    }
                }
            }
            for warning in cfg.warnings() {
                println!("{}: warning: {warning}", config_path.display());
            }
            for warning in toolgate::policy::lint::warnings(&policy) {
                println!("{}: warning: {warning}", cfg.policies.display());
            }
            println!(
                "ok: {} and {} (policy version {}: {} agents, {} tools, {} filters)",
                config_path.display(),
                cfg.policies.display(),
                policy.version,
                policy.agents.len(),
                policy.tools.len(),
                policy.filters.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in &e.problems {
                println!("{p}");
            }
            eprintln!("{} error(s)", e.problems.len());
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(config_path: &Path, ready: bool, timeout_ms: u64) -> ExitCode {
    let config = match ServerConfig::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("toolgate healthcheck: the configuration is invalid:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = toolgate::server::probe::local_address(config.admin.listen);
    let path = if ready { "/readyz" } else { "/healthz" };
    let tls = config.admin.tls.is_some();
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let status = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(toolgate::server::probe::get(addr, path, tls, timeout))
            .map_err(|e| e.to_string())
    });
    match status {
        Ok(200) => ExitCode::SUCCESS,
        Ok(other) => {
            eprintln!("toolgate healthcheck: {path} answered {other}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("toolgate healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn test(config_path: &Path, dir: Option<PathBuf>) -> ExitCode {
    let (cfg, policy) = match load(config_path) {
        Ok(loaded) => loaded,
        Err(e) => {
            for p in &e.problems {
                println!("{p}");
            }
            eprintln!("the policy does not load: {} error(s)", e.problems.len());
            return ExitCode::FAILURE;
        }
    };
    let dir = dir.unwrap_or_else(|| cfg.policies.join("tests"));
    let limits = toolgate::policy::ParseLimits {
        max_json_depth: cfg.limits.max_json_depth,
    };
    let outcomes = toolgate::cases::case_files(&dir).and_then(|files| toolgate::cases::run(&policy, limits, &files));
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            for p in &e.problems {
                println!("{p}");
            }
            eprintln!("the test cases do not load: {} error(s)", e.problems.len());
            return ExitCode::FAILURE;
        }
    };
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    for o in &outcomes {
        let mark = if o.passed() { "PASS" } else { "FAIL" };
        println!("{mark}  {}:{}  {}", o.file, o.line, o.name);
        for f in &o.failures {
            println!("      {f}");
        }
    }
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(config_path: &Path, agent: &str, tool: &str, args: &str, session: Option<&str>) -> anyhow::Result<()> {
    let (cfg, policy) = load(config_path).map_err(|e| anyhow::anyhow!("the configuration is invalid:\n{e}"))?;
    let limits = toolgate::policy::ParseLimits {
        max_json_depth: cfg.limits.max_json_depth,
    };
    let call = ToolCall {
        session,
        ..ToolCall::new(agent, tool, args.as_bytes())
    };
    let eval = policy.evaluate(&call, limits, &NoHistory);
    let mut reasons = eval.notes.clone();
    let code = match &eval.decision {
        Decision::Deny(r) => {
            reasons.push(r.clone());
            Some(r.code.as_str())
        }
        Decision::Allow => None,
    };
    let mut out = json!({
        "agent": agent,
        "tool": tool,
        "decision": eval.decision.as_str(),
        "code": code,
        "reasons": reasons,
        "arguments_sha256": eval.arguments_sha256,
        "policy_version": policy.version,
    });
    if !eval.approvals.is_empty() {
        out["approval_rules"] = json!(
            eval.approvals
                .iter()
                .map(|(r, g)| json!({"rule": r, "group": g}))
                .collect::<Vec<_>>()
        );
    }
    if !eval.would_deny.is_empty() {
        out["would_deny"] = json!(eval.would_deny);
    }
    if let (Some(t), Some(url)) = (eval.tool, &eval.url)
        && eval.decision.is_allow()
    {
        out["upstream"] = json!({"method": t.target.kind(), "url": url});
        out["arguments"] = eval.arguments.clone().unwrap_or_default();
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `toolgate audit verify`.
fn audit_verify(files: Vec<PathBuf>, key: Option<&Path>, format: OutputFormat, any_order: bool) -> ExitCode {
    use toolgate::audit::chain;
    let key = match key.map(chain::CheckpointKey::read).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("toolgate: {e}");
            return ExitCode::from(2);
        }
    };
    let files = chain::in_written_order(files);
    let verified = match (any_order, files.as_slice()) {
        (true, [one]) => chain::verify_any_order(one, key.as_ref()),
        (true, _) => {
            eprintln!("toolgate: --any-order takes one file (concatenate the exports)");
            return ExitCode::from(2);
        }
        (false, _) => chain::verify(&files, key.as_ref()),
    };
    let report = match verified {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate: cannot read the audit files: {e}");
            return ExitCode::from(2);
        }
    };
    if format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
    } else {
        match &report.broken {
            Some(b) => println!("BROKEN at {}:{}: {}", b.file, b.line, b.reason),
            None => println!(
                "ok: {} lines in {} file(s), the chain is whole{}",
                report.lines,
                report.files.len(),
                if report.unchained > 0 {
                    format!(" (the first {} lines predate the chain)", report.unchained)
                } else {
                    String::new()
                }
            ),
        }
        let signed = if key.is_some() {
            format!("{} verified with the key", report.checkpoints_verified)
        } else {
            "not checked: pass --key".to_owned()
        };
        println!("checkpoints: {} ({signed})", report.checkpoints);
        if report.broken.is_none() && !report.ends_with_checkpoint {
            println!(
                "note: the trail does not end with a checkpoint: it is still being written, the process stopped without shutting down, or lines after the last checkpoint were removed"
            );
        }
        if let Some(t) = &report.torn_tail {
            println!("note: {t}");
        }
    }
    if report.broken.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `toolgate replay`.
fn replay(files: Vec<PathBuf>, config: &Path, policies: Option<&Path>, format: OutputFormat) -> ExitCode {
    let cfg = match ServerConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                eprintln!("{p}");
            }
            return ExitCode::from(2);
        }
    };
    let dir = policies.map_or_else(|| cfg.policies.clone(), Path::to_path_buf);
    let policy = match Policy::load(&dir) {
        Ok(p) => p,
        Err(e) => {
            for p in &e.problems {
                eprintln!("{p}");
            }
            eprintln!("the candidate policy does not load: {} error(s)", e.problems.len());
            return ExitCode::from(2);
        }
    };
    let limits = toolgate::policy::ParseLimits {
        max_json_depth: cfg.limits.max_json_depth,
    };
    let files = toolgate::audit::chain::in_written_order(files);
    let report = match toolgate::replay::replay(&policy, limits, &files) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate: cannot read the audit files: {e}");
            return ExitCode::from(2);
        }
    };
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report).expect("serializable")),
        OutputFormat::Text => print!("{}", toolgate::replay::render(&report)),
    }
    if report.changed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `toolgate test --record`.
fn record_cases(config: &Path, file: &Path, audit: Vec<PathBuf>, ids: &[String]) -> ExitCode {
    let (_, policy) = match load(config) {
        Ok(loaded) => loaded,
        Err(e) => {
            for p in &e.problems {
                println!("{p}");
            }
            return ExitCode::FAILURE;
        }
    };
    let files = toolgate::audit::chain::in_written_order(audit);
    let recorded = toolgate::cases::record(&policy, &files, ids)
        .and_then(|(cases, missing)| toolgate::cases::append_cases(file, &cases).map(|()| (cases.len(), missing)));
    match recorded {
        Ok((n, missing)) => {
            println!("recorded {n} case(s) to {}", file.display());
            for id in &missing {
                println!("not found (no tool_call event with this request id, or not a policy decision): {id}");
            }
            if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("toolgate: {e}");
            ExitCode::FAILURE
        }
    }
}
