//! Content filters: deny terms, deny patterns and PII/secret detectors over every string value
//! and key of the arguments (input) or the tool's response (output).
//!
//! Text is normalised before matching — NFKC, lowercase, invisible characters dropped, every run
//! of whitespace one space — so full-width letters, ligatures, zero-width joiners, non-breaking
//! spaces and JSON escapes (decoded by the parser first) cannot slip a term past. Deny terms are
//! one Aho-Corasick automaton and deny patterns one regex per filter: linear time.

use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

mod detectors;
mod normalize;
mod terms;

use detectors::DETECTORS;
pub use detectors::Detector;
pub use normalize::{has_invisible, normalize};
use terms::Terms;

/// `filters.<name>.bedrock_guardrail`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardrailConfig {
    /// The guardrail's id or ARN.
    pub id: String,
    /// Its version (`DRAFT` or a number).
    pub version: String,
    /// Per request (default 2000): a guardrail that does not answer in time blocks the call.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    2000
}

/// `filters.<name>` in a policy file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Literal phrases, matched after normalisation.
    #[serde(default)]
    pub deny_terms: Vec<String>,
    /// Regular expressions (`regex` crate syntax, linear time), matched against normalised text.
    #[serde(default)]
    pub deny_patterns: Vec<String>,
    /// Built-in detectors.
    #[serde(default)]
    pub detect: Vec<Detector>,
    /// What a match does (required, except for a `bedrock_guardrail` filter, where the
    /// guardrail decides: block, or anonymise).
    #[serde(default)]
    pub action: Option<Action>,
    /// An Amazon Bedrock guardrail instead of local matchers (run by the gateway, not here).
    #[serde(default)]
    pub bedrock_guardrail: Option<GuardrailConfig>,
    /// `enforce` (the default) or `shadow`: a shadow filter changes nothing — no block, no
    /// redaction — and what it would have done is on the call's audit event (`would_deny`
    /// `filter:<name>` for arguments, a note for responses). Not for Bedrock guardrails.
    #[serde(default)]
    pub mode: FilterMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the call with `content_blocked`.
    Block,
    /// Replace the whole string value with `[REDACTED:<kind>]` and go on.
    Redact,
}

/// Deny patterns as one case-insensitive regex matching where any of them does. Each is parsed
/// on its own (its flags and `(?x)` comments cannot reach into the next) and they are joined as
/// syntax trees, not as text. The filter only asks whether any pattern matches, and one regex
/// answers that several times faster than a `RegexSet` (which also works out which ones did).
fn any_of(patterns: &[&str]) -> Result<Regex, String> {
    let trees = patterns
        .iter()
        .map(|p| {
            regex_syntax::ParserBuilder::new()
                .case_insensitive(true)
                .build()
                .parse(p)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Regex::new(&regex_syntax::hir::Hir::alternation(trees).to_string()).map_err(|e| e.to_string())
}

/// What a filter found (never the matched text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    Term,
    Pattern,
    Detector(Detector),
}

impl Finding {
    pub fn kind(self) -> &'static str {
        match self {
            Finding::Term => "deny_term",
            Finding::Pattern => "deny_pattern",
            Finding::Detector(d) => d.as_str(),
        }
    }
}

/// A compiled filter.
#[derive(Debug)]
pub struct Filter {
    pub name: String,
    pub action: Action,
    /// `mode: shadow`: reports, never acts.
    pub shadow: bool,
    terms: Option<Terms>,
    /// Every deny pattern as one regex (see [`any_of`]).
    patterns: Option<Regex>,
    detectors: Vec<Detector>,
    /// A Bedrock guardrail (checked by the gateway; matches nothing locally).
    pub guardrail: Option<GuardrailConfig>,
}

impl Filter {
    /// Compiles a filter; errors name the offending entry.
    pub fn compile(name: &str, c: &FilterConfig) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let terms: Vec<String> = c.deny_terms.iter().map(|t| normalize(t).trim().to_owned()).collect();
        for (i, t) in terms.iter().enumerate() {
            if t.is_empty() {
                errors.push((format!("deny_terms[{i}]"), "must not be empty".to_owned()));
            }
        }
        let patterns: Vec<&str> = c.deny_patterns.iter().map(String::as_str).collect();
        let set = if patterns.is_empty() {
            None
        } else {
            for (i, p) in patterns.iter().enumerate() {
                if let Err(e) = Regex::new(p) {
                    // The regex crate's message spans lines with a caret diagram; keep its verdict.
                    let text = e.to_string();
                    let verdict = text
                        .lines()
                        .last()
                        .unwrap_or("")
                        .trim_start_matches("error: ")
                        .to_owned();
                    errors.push((format!("deny_patterns[{i}]"), format!("invalid regex: {verdict}")));
                }
            }
            if errors.is_empty() {
                match any_of(&patterns) {
                    Ok(re) => Some(re),
                    Err(e) => {
                        errors.push(("deny_patterns".to_owned(), format!("together they do not compile: {e}")));
                        None
                    }
                }
            } else {
                None
            }
        };
        let local = !(c.deny_terms.is_empty() && c.deny_patterns.is_empty() && c.detect.is_empty());
        match (&c.bedrock_guardrail, local) {
            (None, false) => errors.push((
                String::new(),
                "a filter needs deny_terms, deny_patterns, detect or bedrock_guardrail".to_owned(),
            )),
            (Some(_), true) => errors.push((
                "bedrock_guardrail".to_owned(),
                "a guardrail filter has no other matchers: put deny_terms, deny_patterns and detect in a filter of their own".to_owned(),
            )),
            (Some(g), false) => {
                if g.id.is_empty() || g.version.is_empty() {
                    errors.push(("bedrock_guardrail".to_owned(), "needs `id` and `version`".to_owned()));
                }
                if g.timeout_ms == 0 {
                    errors.push(("bedrock_guardrail.timeout_ms".to_owned(), "must be greater than 0".to_owned()));
                }
                if c.action.is_some() {
                    errors.push(("action".to_owned(), "the guardrail decides (block or anonymise): remove `action`".to_owned()));
                }
            }
            (None, true) if c.action.is_none() => {
                errors.push(("action".to_owned(), "missing: `block` or `redact`".to_owned()))
            }
            (None, true) => {}
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let terms = if terms.is_empty() {
            None
        } else {
            Some(Terms::compile(&terms).map_err(|(i, e)| vec![(format!("deny_terms[{i}]"), e)])?)
        };
        if c.mode == FilterMode::Shadow && c.bedrock_guardrail.is_some() {
            errors.push((
                "mode".to_owned(),
                "a Bedrock guardrail filter cannot run in shadow mode (the guardrail decides)".to_owned(),
            ));
            return Err(errors);
        }
        Ok(Self {
            name: name.to_owned(),
            action: c.action.unwrap_or(Action::Block),
            shadow: c.mode == FilterMode::Shadow,
            terms,
            patterns: set,
            detectors: c.detect.clone(),
            guardrail: c.bedrock_guardrail.clone(),
        })
    }

    /// A redacting filter with every built-in detector: what audit events pass arguments through.
    fn audit_redactor() -> Self {
        Self {
            name: "audit".to_owned(),
            action: Action::Redact,
            shadow: false,
            terms: None,
            patterns: None,
            detectors: Detector::ALL.to_vec(),
            guardrail: None,
        }
    }

    /// The first thing this filter finds in `text`.
    pub fn scan(&self, text: &str) -> Option<Finding> {
        self.scan_normalized(&normalize(text), &mut None)
    }

    /// As `scan`, for text already normalised (several filters share one normalisation).
    /// `any_detector` remembers, across the filters scanning one string, whether the detector
    /// set matched anywhere in it: filters share that set, so it runs once per string.
    fn scan_normalized(&self, n: &str, any_detector: &mut Option<bool>) -> Option<Finding> {
        if self.terms.as_ref().is_some_and(|t| t.is_match(n)) {
            return Some(Finding::Term);
        }
        if self.patterns.as_ref().is_some_and(|re| re.is_match(n)) {
            return Some(Finding::Pattern);
        }
        if self.detectors.is_empty() {
            return None;
        }
        // `is_match` stops at the first hit and allocates nothing; the overlapping search that
        // says which detectors matched runs only for the rare string that has one.
        if !*any_detector.get_or_insert_with(|| DETECTORS.is_match(n)) {
            return None;
        }
        let hits = DETECTORS.set.matches(n);
        self.detectors
            .iter()
            .copied()
            .find(|&d| hits.matched(d as usize) && d.is_confirmed_in(n))
            .map(Finding::Detector)
    }
}

/// Every built-in detector, redacting: what audit events, approvers and approval webhooks see
/// arguments through, whatever the tool's own filters are.
pub static AUDIT_REDACTOR: LazyLock<Filter> = LazyLock::new(Filter::audit_redactor);

/// Phrases that address the model rather than describe a tool: found in an upstream MCP tool's
/// definition, they hold it for an operator's review (matched as deny terms are: whatever
/// separates their words, look-alike letters read as what they show).
pub static INSTRUCTION_TERMS: LazyLock<Filter> = LazyLock::new(|| {
    let terms = [
        "ignore previous instructions",
        "ignore all previous",
        "ignore the previous",
        "ignore prior instructions",
        "ignore the above",
        "disregard previous",
        "disregard all previous",
        "disregard the above",
        "forget your instructions",
        "system prompt",
        "do not tell the user",
        "don't tell the user",
        "without telling the user",
        "do not mention this to the user",
    ];
    let config = FilterConfig {
        deny_terms: terms.iter().map(|t| (*t).to_owned()).collect(),
        // Tags that frame text as instructions to the model: `<IMPORTANT>`, `</system>`.
        deny_patterns: vec![r"<\s*/?\s*(?:important|system|instructions?|admin)\s*>".to_owned()],
        detect: Vec::new(),
        action: Some(Action::Block),
        bedrock_guardrail: None,
        mode: FilterMode::Enforce,
    };
    Filter::compile("tool-review", &config).expect("the built-in instruction terms compile")
});

/// Whether any built-in detector finds something in `text`: a value that must not be written
/// into a message or an event as it is.
pub fn holds_finding(text: &str) -> bool {
    AUDIT_REDACTOR.scan(text).is_some()
}

/// What running filters over a value did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The first blocking finding: (filter name, kind).
    pub blocked: Option<(String, &'static str)>,
    /// Every redaction: (filter name, kind), once per pair.
    pub redacted: Vec<(String, &'static str)>,
    /// Whether the audit filter given to [`apply_audited`] found something the filters left in
    /// place (the value then needs its own pass before it is recorded).
    pub audit_hit: bool,
    /// What shadow-mode filters would have done: (filter name, kind, action), once per pair.
    pub shadowed: Vec<(String, &'static str, Action)>,
    /// Inside a PEM private key's block: between a header line a filter rewrote and its END
    /// line, in document order (see `walk`).
    in_key: bool,
}

/// Whether any of `filters` finds something in `text`: what [`apply`] would act on.
pub fn finds_any<'f>(mut filters: impl Iterator<Item = &'f Filter>, text: &str) -> bool {
    let n = normalize(text);
    let mut any_detector = None;
    filters.any(|f| f.scan_normalized(&n, &mut any_detector).is_some())
}

/// Runs `filters` over every string value and key of `value`, in place: redacting filters
/// rewrite, the first blocking finding stops the walk.
pub fn apply(filters: &[&Filter], value: &mut Value) -> Outcome {
    apply_audited(filters.iter().copied(), None, value)
}

/// As [`apply`], for the filters `filters` yields (a tool's, picked from the policy's list
/// without collecting them per call), and also asks `audit` (on the same normalised text:
/// one normalisation per string for all of them) whether it would find anything in what the
/// filters leave. Most arguments hold nothing for it, and then the value as filtered is also
/// the value to record.
pub fn apply_audited<'f, I>(filters: I, audit: Option<&'f Filter>, value: &mut Value) -> Outcome
where
    I: Iterator<Item = &'f Filter> + Clone,
{
    let mut out = Outcome::default();
    walk(&Scan { filters, audit }, value, &mut out);
    out
}

struct Scan<'f, I> {
    filters: I,
    audit: Option<&'f Filter>,
}

fn walk<'f, I: Iterator<Item = &'f Filter> + Clone>(scan: &Scan<'f, I>, value: &mut Value, out: &mut Outcome) {
    if out.blocked.is_some() {
        return;
    }
    match value {
        // A PEM key sent as lines (an array of strings, objects with one line each, a text
        // answer split into lines): only its first line names it a private key; the string
        // values after it, in document order and at any depth, up to the END line, are the key
        // itself and go too. What starts the block is a header line some filter rewrote
        // (perhaps for an email on it, found first), whatever the kind; the header and END
        // lines are read normalised, as the detector reads them. Lines in the block are still
        // checked (a blocking filter still blocks). Keys and numbers are left as they are.
        Value::String(s) => {
            let replacement = check(scan, s, out);
            if out.in_key {
                out.in_key = !normalize(s).contains("-----end");
                *s = format!("[REDACTED:{}]", Detector::PrivateKey.as_str());
            } else if let Some(replacement) = replacement {
                let line = normalize(s);
                out.in_key = is_private_key_header(&line) && !line.contains("-----end");
                *s = replacement;
            }
        }
        Value::Array(items) => {
            for v in items.iter_mut() {
                if out.blocked.is_some() {
                    return;
                }
                walk(scan, v, out);
            }
        }
        // A card-shaped number as text (a card number sent as a number); redacted, it becomes
        // a string. The same numbers, read the same way, as the output fast path's.
        Value::Number(n) => {
            if let Some(v) = crate::policy::arguments::scanned_number(n)
                && let Some(replacement) = check(scan, &v.to_string(), out)
            {
                *value = Value::String(replacement);
            }
        }
        Value::Object(map) => {
            // Keys are checked first; the map is rebuilt only if one of them is rewritten.
            let renamed: Vec<(usize, String)> = map
                .keys()
                .enumerate()
                .filter_map(|(i, k)| check(scan, k, out).map(|r| (i, r)))
                .collect();
            if out.blocked.is_some() {
                return;
            }
            if !renamed.is_empty() {
                let old = std::mem::take(map);
                let names = unique_names(&old, &renamed);
                let mut renamed = renamed.iter().map(|(i, _)| *i).zip(names).peekable();
                for (i, (k, v)) in old.into_iter().enumerate() {
                    let key = match renamed.next_if(|(j, _)| *j == i) {
                        Some((_, name)) => name,
                        None => k,
                    };
                    map.insert(key, v);
                }
            }
            map.values_mut().for_each(|v| walk(scan, v, out));
        }
        _ => {}
    }
}

/// Whether a normalised line holds a PEM private-key header (`-----begin … private key-----`).
fn is_private_key_header(line: &str) -> bool {
    line.find("-----begin ")
        .is_some_and(|at| line[at..].contains("private key-----"))
}

/// `Some(replacement)` if a redacting filter matched; records blocks and redactions.
fn check<'f, I: Iterator<Item = &'f Filter> + Clone>(
    scan: &Scan<'f, I>,
    text: &str,
    out: &mut Outcome,
) -> Option<String> {
    let mut replacement = None;
    let n = normalize(text);
    let mut any_detector = None;
    for f in scan.filters.clone() {
        if let Some(found) = f.scan_normalized(&n, &mut any_detector) {
            if f.shadow {
                let entry = (f.name.clone(), found.kind(), f.action);
                if !out.shadowed.contains(&entry) {
                    out.shadowed.push(entry);
                }
                continue;
            }
            match f.action {
                Action::Block => {
                    out.blocked = Some((f.name.clone(), found.kind()));
                    return None;
                }
                Action::Redact => {
                    let entry = (f.name.clone(), found.kind());
                    if !out.redacted.contains(&entry) {
                        out.redacted.push(entry);
                    }
                    replacement.get_or_insert_with(|| format!("[REDACTED:{}]", found.kind()));
                }
            }
        }
    }
    if replacement.is_none()
        && !out.audit_hit
        && let Some(audit) = scan.audit
    {
        out.audit_hit = audit.scan_normalized(&n, &mut any_detector).is_some();
    }
    replacement
}

/// Names for the rewritten keys (`(index, replacement)`, in key order) that collide with no key
/// kept as it was nor with each other: the replacement, else `replacement#2`, `#3`, … A
/// counter per replacement keeps this linear (thousands of keys that all become
/// `[REDACTED:email]` would otherwise each try every number from 2 again).
fn unique_names(map: &Map<String, Value>, renamed: &[(usize, String)]) -> Vec<String> {
    let rewritten: std::collections::HashSet<usize> = renamed.iter().map(|(i, _)| *i).collect();
    let mut taken: std::collections::HashSet<String> = map
        .keys()
        .enumerate()
        .filter(|(i, _)| !rewritten.contains(i))
        .map(|(_, k)| k.clone())
        .collect();
    let mut next: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    renamed
        .iter()
        .map(|(_, base)| {
            let mut name = base.clone();
            while taken.contains(&name) {
                let n = next.entry(base.as_str()).or_insert(2);
                name = format!("{base}#{n}");
                *n += 1;
            }
            taken.insert(name.clone());
            name
        })
        .collect()
}

/// A filter named `f` from its config as JSON, for the tests of this module and its parts.
#[cfg(test)]
fn filter(config: Value) -> Filter {
    let c: FilterConfig = serde_json::from_value(config).unwrap();
    Filter::compile("f", &c).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deny_terms_survive_case_width_invisible_and_space_tricks() {
        let f = filter(json!({"deny_terms": ["project falcon"], "action": "block"}));
        for evasive in [
            "about Project Falcon",
            "PROJECT\u{00A0}FALCON",
            "project   \t falcon",
            "proj\u{200B}ect fal\u{200D}con",
            "ｐｒｏｊｅｃｔ ｆａｌｃｏｎ",
            "project\u{2003}\u{2003}falcon",
            "proj\u{0000}ect falcon",
            "proj\u{001F}ect fal\u{007F}con",
            "proj\u{0080}ect\u{009B} falcon",
            "proj\u{1D173}ect falcon",
            "Proj\u{0001}ect \u{1D17A}Falcon",
        ] {
            assert_eq!(f.scan(evasive), Some(Finding::Term), "{evasive:?}");
        }
        assert_eq!(f.scan("project eagle"), None);
    }

    #[test]
    fn text_as_short_as_the_shortest_term_is_searched_and_shorter_text_is_not_a_match() {
        let f = filter(json!({"deny_terms": ["q3 layoffs", "falcon"], "action": "block"}));
        assert_eq!(f.scan("Falcon"), Some(Finding::Term));
        assert_eq!(f.scan("falco"), None);
    }

    #[test]
    fn detects_common_pii_and_secrets() {
        let f = filter(
            json!({"detect": ["email", "phone", "ssn", "iban", "aws_access_key", "private_key", "bearer_token"], "action": "block"}),
        );
        for (text, kind) in [
            ("mail ada@example.com", "email"),
            ("call +14155550123", "phone"),
            ("call (415) 555-0123", "phone"),
            ("ssn 123-45-6789", "ssn"),
            ("iban GB82 WEST 1234 5698 7654 32", "iban"),
            ("key AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
            ("-----BEGIN RSA PRIVATE KEY-----", "private_key"),
            ("Authorization: Bearer abcdefghijklmnopqrstu", "bearer_token"),
        ] {
            assert_eq!(f.scan(text).map(Finding::kind), Some(kind), "{text}");
        }
        for clean in [
            "order O-17",
            "ssn 000-12-3456",
            "GB00 WEST 1234 5698 7654 32",
            "version 1.2.3",
        ] {
            assert_eq!(f.scan(clean), None, "{clean}");
        }
    }

    #[test]
    fn card_shaped_numbers_are_scanned_as_text() {
        let f = filter(json!({"detect": ["credit_card"], "action": "redact"}));
        let mut v = json!({"card": 4111111111111111u64, "limit": 5, "ref": 4111111111111112u64,
            "neg": -4111111111111111i64, "float": 4111111111111111.0, "ts": 1718000000006u64});
        apply(&[&f], &mut v);
        assert_eq!(
            v,
            json!({"card": "[REDACTED:credit_card]", "limit": 5, "ref": 4111111111111112u64,
                "neg": "[REDACTED:credit_card]", "float": "[REDACTED:credit_card]", "ts": 1718000000006u64}),
            "a millisecond timestamp that passes Luhn is not card-shaped"
        );
        // The output fast path sees them too, floats and negatives alike.
        for body in [
            &br#"{"a": [1, 4111111111111111]}"#[..],
            br#"[-4111111111111111]"#,
            br#"[4111111111111111.0]"#,
        ] {
            let hit = crate::policy::arguments::any_string(body, 8, &mut |s| finds_any([&f].into_iter(), s));
            assert_eq!(hit, Ok(true), "{}", String::from_utf8_lossy(body));
        }
        let body = br#"{"a": [1, 4111111111111111]}"#;
        let hit = crate::policy::arguments::any_string(body, 8, &mut |s| finds_any([&f].into_iter(), s));
        assert_eq!(hit, Ok(true));
        let clean = br#"{"a": [1, 4111111111111112, 5]}"#;
        assert_eq!(
            crate::policy::arguments::any_string(clean, 8, &mut |s| finds_any([&f].into_iter(), s)),
            Ok(false)
        );
    }

    #[test]
    fn redacted_keys_never_overwrite_another_key_and_stay_linear() {
        let f = filter(json!({"detect": ["email"], "action": "redact"}));
        // A key that already reads like a redaction comes after one that becomes it.
        let mut v = json!({"a@b.io": "X", "[REDACTED:email]": "Y", "c@d.io": "Z", "[REDACTED:email]#2": "W"});
        apply(&[&f], &mut v);
        let mut values: Vec<&str> = v.as_object().unwrap().values().map(|x| x.as_str().unwrap()).collect();
        values.sort_unstable();
        assert_eq!(values, ["W", "X", "Y", "Z"], "no value lost: {v}");
        assert_eq!(v.as_object().unwrap().len(), 4);
        // Fifty thousand keys that all redact to the same name: linear (the quadratic way took
        // minutes here; no timing is asserted).
        let many: serde_json::Map<String, Value> = (0..50_000).map(|i| (format!("a{i}@b.cd"), json!(0))).collect();
        let mut v = Value::Object(many);
        apply(&[&f], &mut v);
        assert_eq!(v.as_object().unwrap().len(), 50_000);
        assert!(v.as_object().unwrap().contains_key("[REDACTED:email]#50000"));
    }

    #[test]
    fn redaction_replaces_values_and_keys_at_any_depth() {
        let f = filter(json!({"detect": ["email"], "action": "redact"}));
        let mut v = json!({"note": "write to ada@example.com", "nested": [{"x": "b@c.io"}], "ok": "fine", "e@x.io": 1});
        let out = apply(&[&f], &mut v);
        assert!(out.blocked.is_none());
        assert_eq!(out.redacted, vec![("f".to_owned(), "email")]);
        assert_eq!(
            v,
            json!({"note": "[REDACTED:email]", "nested": [{"x": "[REDACTED:email]"}], "ok": "fine", "[REDACTED:email]": 1})
        );
    }

    #[test]
    fn a_private_key_sent_as_lines_is_redacted_to_its_end_line() {
        let f = filter(json!({"detect": ["private_key", "email"], "action": "redact"}));
        let mut v = json!({"a": ["x", "-----BEGIN EC PRIVATE KEY-----", "MHcCAQEEIK", "-----END EC PRIVATE KEY-----", "y"],
            "b": ["mail ada@example.com", "not a key"], "c": ["-----BEGIN RSA PRIVATE KEY----- MII -----END RSA PRIVATE KEY-----", "z"],
            // Spaced as the detector reads it (a no-break space, a tab), with other values in
            // the block, and an END line in full-width dashes.
            "d": ["-----BEGIN RSA PRIVATE\u{a0}KEY-----", null, "MIIEow", 7, "b3Bl\tx", "\u{ff0d}\u{ff0d}\u{ff0d}\u{ff0d}\u{ff0d}END RSA PRIVATE KEY-----", "after"]});
        apply(&[&f], &mut v);
        let gone = "[REDACTED:private_key]";
        assert_eq!(
            v,
            json!({"a": ["x", gone, gone, gone, "y"], "b": ["[REDACTED:email]", "not a key"], "c": [gone, "z"],
                "d": [gone, null, gone, 7, gone, gone, "after"]})
        );
        // One object per line (a line-reading tool, an MCP answer's content items), or a line
        // nested deeper: the block follows the document, not one array.
        let mut v = json!({"lines": [{"n": 1, "text": "-----BEGIN RSA PRIVATE KEY-----"}, {"n": 2, "text": "MIIEow"},
            [["b3Bl"]], {"n": 3, "text": "-----END RSA PRIVATE KEY-----"}, {"n": 4, "text": "after"}]});
        apply(&[&f], &mut v);
        assert_eq!(
            v,
            json!({"lines": [{"n": 1, "text": gone}, {"n": 2, "text": gone}, [[gone]], {"n": 3, "text": gone}, {"n": 4, "text": "after"}]})
        );
        // A blocking filter still blocks on a line inside the block.
        let block = filter(json!({"deny_terms": ["falcon"], "action": "block"}));
        let mut v = json!([
            "-----BEGIN EC PRIVATE KEY-----",
            "project falcon",
            "-----END EC PRIVATE KEY-----"
        ]);
        assert!(apply(&[&f, &block], &mut v).blocked.is_some());
    }

    #[test]
    fn a_block_names_the_filter_and_kind_only() {
        let f = filter(json!({"deny_patterns": ["falc[o0]n"], "action": "block"}));
        let mut v = json!({"a": {"b": ["FALC0N"]}});
        assert_eq!(apply(&[&f], &mut v).blocked, Some(("f".to_owned(), "deny_pattern")));
    }

    #[test]
    fn deny_patterns_keep_their_own_flags_and_comments() {
        // Joined as text, the first pattern's comment would swallow the second.
        let f = filter(
            json!({"deny_patterns": ["(?x) fal con  # verbose, with a comment", "launch(?:pad)?"], "action": "block"}),
        );
        for hit in ["FALCON", "the launchpad", "Launch"] {
            assert_eq!(f.scan(hit), Some(Finding::Pattern), "{hit}");
        }
        assert_eq!(
            f.scan("fal con"),
            None,
            "spaces are insignificant only inside the verbose pattern"
        );
        assert_eq!(f.scan("eagle"), None);
    }

    #[test]
    fn refuses_broken_filters() {
        let c: FilterConfig = serde_json::from_value(json!({"deny_patterns": ["("], "action": "block"})).unwrap();
        assert!(Filter::compile("f", &c).is_err());
        let c: FilterConfig = serde_json::from_value(json!({"action": "block"})).unwrap();
        assert!(Filter::compile("f", &c).is_err());
    }

    fn everything() -> Filter {
        filter(json!({
            "deny_terms": ["project falcon", "ｆｕｌｌ", "ǅ"], "deny_patterns": ["a+b+c", "(?:x|y){2,5}z"],
            "detect": ["email", "phone", "ssn", "credit_card", "iban", "aws_access_key", "aws_secret_key", "private_key", "bearer_token"],
            "action": "redact"
        }))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        #[test]
        fn scanning_any_text_never_panics(text in "\\PC{0,300}") {
            let f = everything();
            let _ = f.scan(&text);
            let mut v = json!({ text.clone(): [text.clone(), {"k": text}] });
            let _ = apply(&[&f], &mut v);
        }

        #[test]
        fn scanning_digit_and_separator_soup_never_panics(text in "[0-9 +()./@a-zA-Z-]{0,400}") {
            let _ = everything().scan(&text);
        }

        /// Anything at all, from the characters the normaliser and the term matcher treat
        /// specially (tags, invisible characters, dashes, digits of other scripts, look-alikes,
        /// combining marks, full-width), never panics.
        #[test]
        fn normalising_and_matching_special_characters_never_panics(
            text in "[a-z0-9 .@_\u{E0000}-\u{E007F}\u{200B}-\u{200F}\u{2010}-\u{2015}\u{0660}-\u{0669}\u{0430}-\u{044F}\u{0300}-\u{036F}\u{FF01}-\u{FF5E}]{0,300}"
        ) {
            let f = everything();
            let _ = f.scan(&text);
            let _ = normalize(&text);
            let _ = terms::fold_confusables(&normalize(&text));
        }
    }

    #[test]
    fn detectors_without_digits_or_at_still_find_their_kind() {
        let f = Filter::audit_redactor();
        let forty = "abcdefghij".repeat(4);
        for (text, kind) in [
            ("key akiaabcdefghijklmnop here".to_owned(), Detector::AwsAccessKey),
            (format!("aws_secret_access_key = {forty}"), Detector::AwsSecretKey),
            ("-----BEGIN RSA PRIVATE KEY-----".to_owned(), Detector::PrivateKey),
            (
                "Authorization: Bearer abcdefghijklmnopqrstuvwxyz".to_owned(),
                Detector::BearerToken,
            ),
            ("eyJhbGciOi.eyJzdWIiOi.abcdefghijkl".to_owned(), Detector::BearerToken),
        ] {
            assert_eq!(f.scan(&text), Some(Finding::Detector(kind)), "{text}");
        }
    }

    /// Shapes that make backtracking engines explode. The regex crate and Aho-Corasick are
    /// linear by construction and our own passes touch each byte (or each bounded match) once,
    /// so these finish as fast as any other 256 KiB; a super-linear scanner would hang here.
    #[test]
    fn adversarial_inputs_finish() {
        let f = everything();
        let big = 256 * 1024;
        for unit in [
            "1 ",
            "1-",
            "a@",
            "a.",
            "+1",
            "ab",
            "\u{0301}",
            "x",
            " ",
            "\u{200B}",
            "akia",
            "secret:",
            // The term matcher's own worst cases: a term's first word then endless separators,
            // words that almost make a term, look-alikes to fold, smuggled tags.
            "project ",
            "project-_. ",
            "projec",
            "pr\u{043E}ject f",
            "\u{E0070}\u{E0072}",
            // Digit runs of other scripts and dashes: folded, then read as card or SSN runs.
            "\u{0661}\u{2013}",
            "4.",
            "\u{FF11}",
            "a\u{00E9}@\u{0431}.",
        ] {
            let text = unit.repeat(big / unit.len());
            let _ = f.scan(&text);
        }
    }
}
