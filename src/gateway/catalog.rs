//! The tools of upstream MCP servers: discovered at start, every `mcp.refresh_seconds` and on
//! an admin reload; each definition checked against its pin (pinned when first seen); a changed
//! one blocked until an operator approves it. Discovered tools are compiled into the policy like
//! any other tool, so a change to the catalog rebuilds the policy.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::{ActionError, Gateway};
use crate::approval::Pin;
use crate::audit::{ActionNotDone, By, ToolApproved, ToolDefinitionChanged, ToolHeld, ToolPinned};
use crate::policy::tool::{DiscoveredTool, McpServer, NewTools};
use crate::upstream::Signing;

/// The tools upstream MCP servers listed at the last refresh.
pub struct Catalog {
    discovered: Mutex<Vec<DiscoveredTool>>,
    /// Whether any discovered tool is marked changed: every call asks, almost always "no",
    /// and the answer needs no lock then (a lock both data-plane cores would write per call).
    /// Kept by [`Catalog::update`].
    any_changed: AtomicBool,
    /// One refresh at a time: two at once (the periodic one and an admin's) would each see the
    /// same catalog before them, and each audit the same new definitions.
    refreshing: tokio::sync::Mutex<()>,
}

impl Catalog {
    pub(super) fn new() -> Self {
        Self {
            discovered: Mutex::new(Vec::new()),
            any_changed: AtomicBool::new(false),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The tools as listed at the last refresh.
    pub fn tools(&self) -> Vec<DiscoveredTool> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DiscoveredTool>> {
        self.discovered.lock().expect("discovered lock")
    }

    /// Whether an upstream MCP tool is currently marked as changed since its pin.
    pub(super) fn is_changed(&self, name: &str) -> bool {
        if !self.any_changed.load(Ordering::Acquire) {
            return false;
        }
        self.lock().iter().any(|d| d.changed && d.exposed_name() == name)
    }

    /// Changes the discovered tools, and whether any is marked changed, under one lock.
    fn update(&self, change: impl FnOnce(&mut Vec<DiscoveredTool>)) {
        let mut discovered = self.lock();
        change(&mut discovered);
        self.any_changed
            .store(discovered.iter().any(|d| d.changed), Ordering::Release);
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Gateway {
    /// The tools upstream MCP servers listed at the last refresh.
    pub fn discovered_tools(&self) -> Vec<DiscoveredTool> {
        self.catalog.tools()
    }

    /// Asks every upstream MCP server for its tools, checks each definition against its pin
    /// (pinning what is seen for the first time, unless it is held for review), and rebuilds
    /// the policy if anything changed. A server that cannot be reached keeps the tools it had.
    pub async fn refresh_mcp(&self, trigger: &str) {
        let policy = self.policy();
        if policy.mcp_servers.is_empty() && self.catalog.is_empty() {
            return;
        }
        let _one = self.catalog.refreshing.lock().await;
        let previous = self.catalog.tools();
        let mut found = Vec::new();
        for server in policy.mcp_servers.values() {
            let mut tools = match self.list_tools(server, trigger).await {
                Some(tools) => tools,
                None => previous.iter().filter(|d| d.server == server.name).cloned().collect(),
            };
            // A tool without a pin is new only on a server listed before (one with pins): the
            // first listing is trusted as it is seen. Unknown (the store failed): held.
            let listed_before = self.approvals.has_pins(server.name.clone()).await.unwrap_or(true);
            let hold_new = listed_before && server.new_tools == NewTools::Review;
            for d in &mut tools {
                self.check_pin(d, &previous, trigger, hold_new).await;
            }
            found.extend(tools);
        }
        found.sort_by_key(DiscoveredTool::exposed_name);
        if found != previous {
            self.catalog.update(|d| *d = found);
            let _ = self.reload_now(trigger).await;
        }
    }

    /// One server's tools, asked as toolgate itself (agent `toolgate`), under the server's
    /// role if any; `None` if it could not be asked.
    async fn list_tools(&self, server: &McpServer, trigger: &str) -> Option<Vec<DiscoveredTool>> {
        let roles = &self.forwarder.roles;
        let signing_parts = match &server.aws_role {
            None => None,
            Some(role) => match (
                roles.credentials(role, "toolgate", &server.name, trigger).await,
                roles.region_for(role).await,
            ) {
                (Ok(c), Some(region)) => Some((c, region, role.sign.clone())),
                (creds, _) => {
                    tracing::warn!(server = %server.name, "no AWS credentials to ask the MCP server for its tools: {:?}", creds.err());
                    return None;
                }
            },
        };
        let signing = signing_parts.as_ref().map(|(credentials, region, service)| Signing {
            credentials,
            region,
            service,
        });
        let timeout = server
            .timeout
            .unwrap_or(Duration::from_millis(self.config.limits.upstream_timeout_ms));
        match self.forwarder.mcp.list_tools(server, timeout, signing.as_ref()).await {
            Ok(tools) => Some(
                tools
                    .into_iter()
                    .filter_map(|t| {
                        Some(DiscoveredTool {
                            server: server.name.clone(),
                            tool: t.get("name").and_then(Value::as_str)?.to_owned(),
                            description: t.get("description").and_then(Value::as_str).unwrap_or("").to_owned(),
                            input_schema: t
                                .get("inputSchema")
                                .cloned()
                                .unwrap_or_else(|| json!({"type": "object"})),
                            changed: false,
                            unreviewed: false,
                            findings: Vec::new(),
                        })
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(server = %server.name, "MCP server tools/list failed, keeping its last known tools: {e}");
                None
            }
        }
    }

    /// Checks a listed tool against its pin. A tool seen for the first time is pinned, or
    /// held for review: blocked if its definition looks like it hides instructions, callable
    /// only by exact grants if it is new on a server listed before (`hold_new`). One whose
    /// definition differs from its pin is blocked. Each is audited the first time it is seen
    /// so; if the pin store fails, the tool is hidden.
    async fn check_pin(&self, d: &mut DiscoveredTool, previous: &[DiscoveredTool], trigger: &str, hold_new: bool) {
        let name = d.exposed_name();
        let sha = d.definition_sha256();
        let pin = match self.approvals.pin(name.clone()).await {
            Ok(p) => p,
            Err(e) => {
                // Without the pin store a definition cannot be checked: hide the tool.
                tracing::error!(tool = %name, "cannot read the tool pin: {e}");
                d.changed = true;
                return;
            }
        };
        // Seen before in this state (same definition): already audited.
        let seen = |held: &dyn Fn(&DiscoveredTool) -> bool| {
            previous
                .iter()
                .any(|o| o.exposed_name() == name && o.definition_sha256() == sha && held(o))
        };
        match pin {
            Some(p) if p.sha256 == sha => {}
            Some(p) => {
                d.changed = true;
                if !seen(&|o| o.changed) {
                    tracing::warn!(tool = %name, "an upstream MCP tool's definition changed; blocked until approved");
                    metrics::counter!("toolgate_tool_definition_changes_total", "tool" => name.clone()).increment(1);
                    let event = ToolDefinitionChanged {
                        tool: &name,
                        server: &d.server,
                        pinned_sha256: &p.sha256,
                        seen_sha256: &sha,
                        description_changed: p.description != d.description,
                        schema_changed: p.input_schema != d.input_schema,
                        trigger,
                    };
                    self.audit.emit_or_log(&event).await;
                }
            }
            None => {
                let findings = d.suspicious();
                let reason = if !findings.is_empty() {
                    d.changed = true;
                    d.findings = findings.into_iter().map(str::to_owned).collect();
                    "suspicious"
                } else if hold_new {
                    d.unreviewed = true;
                    "new"
                } else {
                    self.pin_first_seen(d, &name, &sha).await;
                    return;
                };
                if !seen(&|o| o.changed || o.unreviewed) {
                    tracing::warn!(tool = %name, reason, "an upstream MCP tool is held for review");
                    let event = ToolHeld {
                        tool: &name,
                        server: &d.server,
                        sha256: &sha,
                        reason,
                        findings: &d.findings,
                        trigger,
                    };
                    self.audit.emit_or_log(&event).await;
                }
            }
        }
    }

    /// Pins a tool as first seen (trust on first use), and audits it.
    async fn pin_first_seen(&self, d: &mut DiscoveredTool, name: &str, sha: &str) {
        let pin = Pin {
            sha256: sha.to_owned(),
            description: d.description.clone(),
            input_schema: d.input_schema.clone(),
            pinned_at: crate::state::unix_now(),
            pinned_by: "first-seen".to_owned(),
        };
        if let Err(e) = self.approvals.set_pin(name.to_owned(), pin).await {
            tracing::error!(tool = %name, "cannot pin the tool: {e}");
            d.changed = true;
            return;
        }
        let event = ToolPinned {
            tool: name,
            server: &d.server,
            sha256: sha,
            by: "first-seen",
        };
        self.audit.emit_or_log(&event).await;
    }

    /// Approves an upstream MCP tool's definition — the one with hash `reviewed`, which must be
    /// the current one (`Err(Some(current))` otherwise): it is pinned, visible and callable.
    /// The `tool_approved` event is written first; if it cannot be, nothing changes.
    pub async fn approve_tool(
        &self,
        name: &str,
        reviewed: &str,
        by: By<'_>,
        comment: &str,
    ) -> Result<Result<DiscoveredTool, Option<String>>, ActionError> {
        let one = self.decisions.lock().await;
        let Some(tool) = self.catalog.tools().into_iter().find(|d| d.exposed_name() == name) else {
            return Ok(Err(None));
        };
        let sha = tool.definition_sha256();
        if sha != reviewed {
            return Ok(Err(Some(sha)));
        }
        let event = ToolApproved {
            tool: name,
            server: &tool.server,
            sha256: &sha,
            by,
            comment,
        };
        self.audit.emit(&event).await?;
        let pin = Pin {
            sha256: sha.clone(),
            description: tool.description.clone(),
            input_schema: tool.input_schema.clone(),
            pinned_at: crate::state::unix_now(),
            pinned_by: by.name.to_owned(),
        };
        let pinned = self.approvals.set_pin(name.to_owned(), pin).await;
        if let Err(e) = &pinned {
            let event = ActionNotDone {
                recorded_as: "tool_approved",
                error: e.to_string(),
                tool: Some(name),
                approval_id: None,
            };
            self.not_done(event, e).await;
        }
        pinned?;
        self.catalog.update(|discovered| {
            for d in discovered.iter_mut() {
                if d.exposed_name() == name && d.definition_sha256() == sha {
                    d.changed = false;
                    d.unreviewed = false;
                    d.findings.clear();
                }
            }
        });
        // The decision is made; the rebuild (retried by the watcher if it cannot be recorded)
        // need not hold up other decisions, or an anomaly's quarantine.
        drop(one);
        let _ = self.reload_now("tool_approved").await;
        Ok(Ok(DiscoveredTool {
            changed: false,
            unreviewed: false,
            findings: Vec::new(),
            ..tool
        }))
    }
}
