//! Tool names and allowlist patterns. One grammar for every tool name, matched exactly: no case
//! folding, no percent-decoding, no normalisation, so what the security team wrote is what matches.

/// True if `name` follows the tool-name grammar `^[A-Za-z0-9_.-]{1,128}$`.
pub fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One allowlist entry: an exact tool name or a trailing `.*` glob (`kb.*` matches `kb.search`,
/// not `kb` and not `kbx.search`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolPattern {
    Exact(String),
    /// Stored with its trailing dot: `kb.`.
    Prefix(String),
}

impl std::fmt::Display for ToolPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolPattern::Exact(name) => f.write_str(name),
            ToolPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

impl ToolPattern {
    /// Parses an allowlist entry; the error says what is wrong, for `check`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(prefix) = s.strip_suffix(".*") {
            if !is_valid_tool_name(prefix) || prefix.contains('*') {
                return Err(format!(
                    "`{s}` is not a valid pattern: a tool-name prefix followed by `.*`"
                ));
            }
            return Ok(ToolPattern::Prefix(format!("{prefix}.")));
        }
        if !is_valid_tool_name(s) {
            return Err(format!(
                "`{s}` is not a valid tool name (letters, digits, `_`, `.`, `-`; 1 to 128; globs only as a trailing `.*`)"
            ));
        }
        Ok(ToolPattern::Exact(s.to_owned()))
    }

    pub fn matches(&self, tool: &str) -> bool {
        match self {
            ToolPattern::Exact(name) => name == tool,
            ToolPattern::Prefix(prefix) => tool.len() > prefix.len() && tool.starts_with(prefix.as_str()),
        }
    }
}

/// An agent's allowlist: its enforced entries, and the entries in shadow mode (still
/// allowing; reported).
#[derive(Debug, Clone, Default)]
pub struct Allowlist(Vec<ToolPattern>, Vec<ToolPattern>);

impl Allowlist {
    pub fn new(patterns: Vec<ToolPattern>) -> Self {
        Self(patterns, Vec::new())
    }

    /// With entries in shadow mode besides.
    pub fn with_shadow(patterns: Vec<ToolPattern>, shadow: Vec<ToolPattern>) -> Self {
        Self(patterns, shadow)
    }

    pub fn allows(&self, tool: &str) -> bool {
        self.0.iter().any(|p| p.matches(tool)) || self.1.iter().any(|p| p.matches(tool))
    }

    /// The shadow entry that alone allows `tool`, if no enforced entry does.
    pub fn only_shadow(&self, tool: &str) -> Option<&ToolPattern> {
        if self.1.is_empty() || self.0.iter().any(|p| p.matches(tool)) {
            return None;
        }
        self.1.iter().find(|p| p.matches(tool))
    }

    /// Every entry, as written (enforced, then shadow).
    pub fn patterns(&self) -> impl Iterator<Item = &ToolPattern> {
        self.0.iter().chain(&self.1)
    }

    /// Whether an entry names `tool` exactly (not through a glob).
    pub fn names(&self, tool: &str) -> bool {
        self.patterns()
            .any(|p| matches!(p, ToolPattern::Exact(name) if name == tool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_name_grammar_is_strict() {
        for ok in ["tickets.read", "kb-search_2", "a", &"x".repeat(128)] {
            assert!(is_valid_tool_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a%2Eb",
            "a\0b",
            "tickets read",
            "é",
            &"x".repeat(129),
            "kb.*",
        ] {
            assert!(!is_valid_tool_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn globs_match_only_below_their_prefix() {
        let p = ToolPattern::parse("kb.*").unwrap();
        assert!(p.matches("kb.search"));
        assert!(p.matches("kb.articles.read"));
        assert!(!p.matches("kb"));
        assert!(!p.matches("kb."));
        assert!(!p.matches("kbx.search"));
        assert!(!p.matches("KB.search"));
    }

    #[test]
    fn exact_names_match_exactly() {
        let p = ToolPattern::parse("tickets.read").unwrap();
        assert!(p.matches("tickets.read"));
        assert!(!p.matches("Tickets.read"));
        assert!(!p.matches("tickets.read "));
        assert!(!p.matches("tickets.readx"));
    }

    #[test]
    fn refuses_malformed_patterns() {
        for bad in ["*", "kb*", "*.read", "kb.*.*", "a b", ".*"] {
            assert!(ToolPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
