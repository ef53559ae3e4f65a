//! What a valid policy still deserves a word about (`toolgate check` prints these): grants
//! and rules that do nothing, tools nobody may call, and globs that grant more than the tools
//! that exist today. None stops the policy loading: each may be intended, and each is worth
//! a reviewer's second look.

use super::Policy;
use super::allowlist::ToolPattern;

/// The warnings for `policy`, in a stable order (agents, tools, rules, each by name).
pub fn warnings(policy: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    let mut agents: Vec<_> = policy.agents.values().collect();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    for agent in &agents {
        if !policy.tools.keys().any(|t| agent.allowlist.allows(t)) {
            out.push(format!(
                "agent `{}` may call no tool: its allowlist matches none of the tools defined",
                agent.id
            ));
        }
        for pattern in agent.allowlist.patterns() {
            let matched: Vec<&str> = policy
                .tools
                .keys()
                .filter(|t| pattern.matches(t))
                .map(String::as_str)
                .collect();
            match (pattern, matched.as_slice()) {
                (_, []) => out.push(format!(
                    "agent `{}`: `{pattern}` grants nothing: no tool defined matches it",
                    agent.id
                )),
                (ToolPattern::Prefix(_), now) => out.push(format!(
                    "agent `{}`: `{pattern}` is broader than the tools that exist: it also grants any tool added later under that name (today: {})",
                    agent.id,
                    now.join(", ")
                )),
                _ => {}
            }
        }
    }
    for tool in policy.tools.keys() {
        if !agents.iter().any(|a| a.allowlist.allows(tool)) {
            out.push(format!("tool `{tool}`: no agent may call it"));
        }
    }
    let callable: Vec<&str> = policy
        .tools
        .keys()
        .filter(|t| agents.iter().any(|a| a.allowlist.allows(t)))
        .map(String::as_str)
        .collect();
    let mut rules: Vec<_> = policy.rules.list().collect();
    rules.sort_by(|a, b| a.id.cmp(&b.id));
    for rule in rules {
        if !callable.iter().any(|t| policy.rules.rule_applies(&rule.id, t)) {
            out.push(format!(
                "rule `{}` ({}) can never apply: it matches no tool an agent may call",
                rule.id, rule.file
            ));
        }
    }
    out
}
