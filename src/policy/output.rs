//! Output filters over a tool's answer, after it answered and before the agent sees it: JSON at
//! any depth, text line by line (each line with its JSON escapes decoded, as a client that
//! parses it reads it), and an upstream MCP server's result as the value it is. An answer the
//! filters cannot read is withheld, never passed on unseen.
//!
//! Pure: the gateway hands in the answer and gets back what to send and what was found.

use std::borrow::Cow;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::Value;

use super::arguments::{self, ArgumentsError};
use super::tool::Tool;
use super::{Code, Policy, Reason, Stage};

/// Runs `tool`'s output filters over an HTTP answer (`content_type`, `body`): what to send.
/// `Err` is the reason the answer is withheld: a filter blocked it, or the filters could not
/// read it. Each redaction adds a note to `notes` (for the audit event), a block's too.
pub fn filter_http(
    policy: &Policy,
    tool: &Tool,
    content_type: Option<&HeaderValue>,
    body: &Bytes,
    max_depth: usize,
    notes: &mut Vec<Reason>,
) -> Result<Bytes, Reason> {
    let pass = || body.clone();
    if !policy.has_output_filters(tool) {
        return Ok(pass());
    }
    let unreadable = || unreadable(tool);
    // Media types are case-insensitive. A charset other than UTF-8 (or ASCII) would make the
    // client read other characters than the filters did: withheld. A media type that is not
    // visible ASCII cannot be read for its charset: withheld too.
    // (Compared without allocating: this runs for every answer a filtered tool gives.)
    let ct = match content_type.map(HeaderValue::to_str) {
        None => "",
        Some(Ok(ct)) => ct,
        Some(Err(_)) => return Err(unreadable()),
    };
    if has_foreign_charset(ct) {
        return Err(unreadable());
    }
    // JSON when declared, and also when it looks like JSON whatever the label: the client
    // may well parse it, and escapes (`\u0040`) must be decoded before the filters look.
    let declared = ct.as_bytes().windows(4).any(|w| w.eq_ignore_ascii_case(b"json"));
    let looks_like_json = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'));
    let as_json = if declared || looks_like_json {
        // Nearly every answer is clean: one pass with the same strictness says so without
        // building the tree, and the answer goes out as it came.
        match policy.output_is_clean(tool, body, max_depth) {
            Ok(true) => return Ok(pass()),
            Ok(false) => true,
            // JSON that lenient clients read one way and the filters cannot vouch for
            // (a repeated key, nesting past the limit), or declared JSON that is not.
            Err(ArgumentsError::DuplicateKey | ArgumentsError::TooDeep(_)) => return Err(unreadable()),
            Err(_) if declared => return Err(unreadable()),
            Err(_) => false,
        }
    } else {
        false
    };
    let parsed = as_json.then(|| arguments::parse_value(body, max_depth));
    if let Some(parsed) = parsed
        && (declared || !matches!(parsed, Err(ArgumentsError::NotJson { .. })))
    {
        let mut value = parsed.map_err(|_| unreadable())?;
        if !apply(policy, tool, &mut value, notes)? {
            return Ok(pass());
        }
        return Ok(Bytes::from(serde_json::to_vec(&value).expect("JSON serialises")));
    }
    // Not declared JSON and not one JSON value (say, JSON lines): text, filtered line by line,
    // each with its JSON escapes (`\u0040`) decoded: JSON lines (NDJSON, a BOM before JSON) are
    // read by clients decoded, so they are filtered so.
    let text = std::str::from_utf8(body).map_err(|_| unreadable())?;
    let raw_lines: Vec<&str> = text.split('\n').collect();
    let decoded = raw_lines.iter().map(|l| Value::from(decode_escapes(l).into_owned()));
    let mut value = Value::Array(decoded.collect());
    if !apply(policy, tool, &mut value, notes)? {
        return Ok(pass());
    }
    // A line a filter rewrote goes out rewritten; any other line as the tool wrote it. (A PEM
    // block's lines after its header were redacted by the walk, see `content::walk`.)
    let lines: Vec<&str> = value
        .as_array()
        .expect("text is split into lines")
        .iter()
        .zip(&raw_lines)
        .map(|(v, raw)| match v.as_str() {
            Some(seen) if seen != decode_escapes(raw) => seen,
            _ => *raw,
        })
        .collect();
    Ok(Bytes::from(lines.join("\n")))
}

/// Runs `tool`'s output filters over a structured answer (an upstream MCP server's result),
/// in place, with notes as [`filter_http`]'s. Nested deeper than `max_depth`: withheld, as a
/// JSON answer would be.
pub fn filter_value(
    policy: &Policy,
    tool: &Tool,
    value: &mut Value,
    max_depth: usize,
    notes: &mut Vec<Reason>,
) -> Result<(), Reason> {
    if !policy.has_output_filters(tool) {
        return Ok(());
    }
    if depth(value) > max_depth {
        return Err(unreadable(tool));
    }
    apply(policy, tool, value, notes).map(|_| ())
}

/// The filters over a parsed answer, in place: whether they redacted anything (each
/// redaction a note), or the block.
fn apply(policy: &Policy, tool: &Tool, value: &mut Value, notes: &mut Vec<Reason>) -> Result<bool, Reason> {
    let outcome = policy.filter_output(tool, value);
    let redacted = !outcome.redacted.is_empty();
    notes.extend(outcome.shadowed.into_iter().map(|(filter, kind, action)| {
        let would = match action {
            super::content::Action::Block => "blocked",
            super::content::Action::Redact => "redacted",
        };
        let message =
            format!("Filter '{filter}' (shadow mode) would have {would} the response ({kind}); nothing was changed.");
        Reason::new(Code::ContentBlocked, Stage::Output, filter, message)
    }));
    notes.extend(outcome.redacted.into_iter().map(|(filter, kind)| {
        let message = format!("Redacted {kind} in the response (filter '{filter}').");
        Reason::new(Code::ContentBlocked, Stage::Output, filter, message)
    }));
    if let Some((filter, kind)) = outcome.blocked {
        return Err(Reason::new(
            Code::ContentBlocked,
            Stage::Output,
            filter.clone(),
            format!(
                "The response of tool '{}' was blocked by content filter '{filter}' ({kind}).",
                tool.name
            ),
        ));
    }
    Ok(redacted)
}

fn unreadable(tool: &Tool) -> Reason {
    Reason::new(
        Code::ContentBlocked,
        Stage::Output,
        "output",
        format!(
            "The response of tool '{}' could not be read by its output filters, so it was withheld.",
            tool.name
        ),
    )
}

/// Whether any `charset` parameter of a media type, however spaced or quoted (clients differ
/// on which of several they take), is other than UTF-8 or ASCII.
fn has_foreign_charset(ct: &str) -> bool {
    ct.split(';')
        .skip(1)
        .filter_map(|p| p.split_once('='))
        .filter(|(name, _)| name.trim().trim_matches('"').eq_ignore_ascii_case("charset"))
        .any(|(_, value)| {
            let value = value.trim().trim_matches('"').trim();
            !["utf-8", "utf8", "us-ascii"]
                .iter()
                .any(|c| value.eq_ignore_ascii_case(c))
        })
}

/// Nesting depth as the strict parser counts it: each array or object is one level.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `line` with JSON string escapes decoded (`\u0040`, surrogate pairs, `\n`, `\"`…), as a
/// client that parses it reads it; borrowed when it has none. Escapes that do not decode are
/// left as they are.
pub fn decode_escapes(line: &str) -> Cow<'_, str> {
    if !line.contains('\\') {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let hex = |s: &str| s.get(2..6).and_then(|h| u32::from_str_radix(h, 16).ok());
        let simple = match rest.as_bytes().get(1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &rest[2..];
        } else if let Some(hi) = hex(rest).filter(|_| rest.as_bytes().get(1) == Some(&b'u')) {
            let pair = (0xD800..0xDC00)
                .contains(&hi)
                .then(|| rest.get(6..).filter(|r| r.starts_with("\\u")).and_then(hex))
                .flatten()
                .filter(|lo| (0xDC00..0xE000).contains(lo));
            match pair {
                Some(lo) => {
                    out.extend(char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)));
                    rest = &rest[12..];
                }
                None => {
                    match char::from_u32(hi) {
                        Some(c) => out.push(c),
                        None => out.push_str(&rest[..6]),
                    }
                    rest = &rest[6..];
                }
            }
        } else {
            out.push('\\');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FILES: &str = r#"
tools:
  crm.read:
    upstream: { url: "http://crm.internal/read" }
    filters: { output: [ pii ] }
  vault.read:
    upstream: { url: "http://vault.internal/read" }
    filters: { output: [ pii, keys ] }
  plain.read:
    upstream: { url: "http://plain.internal/read" }
filters:
  pii: { detect: [ email ], action: redact }
  keys: { detect: [ aws_access_key ], action: block }
"#;

    fn policy() -> Policy {
        let sources = [("policy.yaml".to_owned(), FILES.to_owned())];
        Policy::compile(&sources, |_| Err(std::io::Error::other("none"))).unwrap()
    }

    fn filter(p: &Policy, tool: &str, ct: Option<&str>, body: &str) -> (Result<Bytes, Reason>, Vec<Reason>) {
        let ct = ct.map(|c| HeaderValue::from_str(c).unwrap());
        let mut notes = Vec::new();
        let body = Bytes::from(body.to_owned());
        let out = filter_http(p, &p.tools[tool], ct.as_ref(), &body, 8, &mut notes);
        (out, notes)
    }

    fn text(out: Result<Bytes, Reason>) -> String {
        String::from_utf8(out.expect("passed").to_vec()).unwrap()
    }

    fn withheld(out: Result<Bytes, Reason>) -> Reason {
        let reason = out.expect_err("withheld");
        assert_eq!((reason.code, reason.stage), (Code::ContentBlocked, Stage::Output));
        reason
    }

    #[test]
    fn a_clean_answer_goes_out_as_it_came() {
        let p = policy();
        let body = r#"{ "name": "Ada",  "note": "\u00e9" }"#;
        let (out, notes) = filter(&p, "crm.read", Some("application/json"), body);
        assert_eq!(text(out), body);
        assert!(notes.is_empty());
        // A tool without output filters: anything at all, unread.
        let (out, _) = filter(&p, "plain.read", Some("text/plain; charset=latin1"), "\u{0}{{{");
        assert_eq!(text(out), "\u{0}{{{");
    }

    #[test]
    fn json_is_filtered_at_any_depth_escapes_decoded_whatever_its_label() {
        let p = policy();
        for ct in [Some("application/json"), Some("text/plain"), None] {
            let body = r#"{"rows": [{"mail": "ada\u0040example.com"}], "n": 1}"#;
            let (out, notes) = filter(&p, "crm.read", ct, body);
            let value: serde_json::Value = serde_json::from_slice(&out.unwrap()).unwrap();
            assert_eq!(value, json!({"rows": [{"mail": "[REDACTED:email]"}], "n": 1}), "{ct:?}");
            assert_eq!(notes.len(), 1);
            assert_eq!((notes[0].stage, notes[0].rule.as_str()), (Stage::Output, "pii"));
        }
    }

    #[test]
    fn text_is_filtered_line_by_line_and_untouched_lines_keep_their_bytes() {
        let p = policy();
        let body = "first \\u0041 line\nwrite to ada@example.com\n{\"m\": \"bob\\u0040example.com\"}\nlast";
        let (out, notes) = filter(&p, "crm.read", Some("text/plain"), body);
        let lines: Vec<String> = text(out).split('\n').map(str::to_owned).collect();
        assert_eq!(
            lines[0], "first \\u0041 line",
            "an unredacted line goes out as the tool wrote it"
        );
        assert_eq!(lines[1], "[REDACTED:email]", "a value with a finding is replaced whole");
        assert!(
            lines[2].contains("[REDACTED:email]"),
            "escapes are decoded before the filters look: {}",
            lines[2]
        );
        assert_eq!(lines[3], "last");
        assert_eq!(notes.len(), 1, "one note per filter and kind");
    }

    #[test]
    fn what_the_filters_cannot_read_is_withheld() {
        let p = policy();
        let cases: &[(Option<&str>, &str)] = &[
            (Some("application/json; charset=latin1"), r#"{"a": 1}"#),
            (Some("text/plain; charset=\"UTF-16\""), "hello"),
            (Some("text/plain; charset=utf-8; charset=koi8-r"), "hello"),
            (Some("application/json"), r#"{"a": 1, "a": 2}"#),
            (Some("text/plain"), r#"{"a": 1, "a": 2}"#),
            (Some("application/json"), "[[[[[[[[[[1]]]]]]]]]]"),
            (Some("application/json"), "{not json"),
        ];
        for (ct, body) in cases {
            let reason = withheld(filter(&p, "crm.read", *ct, body).0);
            assert_eq!(reason.rule, "output", "{ct:?} {body}");
        }
        // Bytes that are not UTF-8, as text.
        let mut notes = Vec::new();
        let bad = Bytes::from_static(b"caf\xe9");
        let out = filter_http(&p, &p.tools["crm.read"], None, &bad, 8, &mut notes);
        assert_eq!(withheld(out).rule, "output");
        // A media type that is not visible ASCII cannot be read for its charset.
        let ct = HeaderValue::from_bytes(b"text/plain; charset=\xff").unwrap();
        let out = filter_http(
            &p,
            &p.tools["crm.read"],
            Some(&ct),
            &Bytes::from_static(b"x"),
            8,
            &mut notes,
        );
        assert_eq!(withheld(out).rule, "output");
        // Undeclared text that only starts like JSON is read as text, not withheld.
        let (out, _) = filter(&p, "crm.read", Some("text/plain"), "{not json, mail ada@example.com");
        assert_eq!(text(out), "[REDACTED:email]");
    }

    #[test]
    fn a_blocking_filter_withholds_the_answer_and_names_itself_keeping_the_redactions_noted() {
        let p = policy();
        let body = r#"{"mail": "ada@example.com", "key": "AKIAIOSFODNN7EXAMPLE"}"#;
        let (out, notes) = filter(&p, "vault.read", Some("application/json"), body);
        let reason = withheld(out);
        assert_eq!(reason.rule, "keys");
        assert!(reason.message.contains("aws_access_key"), "{}", reason.message);
        assert_eq!(notes.len(), 1, "the redaction found beside the block is still recorded");
    }

    #[test]
    fn a_structured_answer_is_filtered_in_place_and_bounded_in_depth() {
        let p = policy();
        let tool = &p.tools["crm.read"];
        let mut result = json!({"content": [{"type": "text", "text": "ada@example.com"}], "isError": false});
        let mut notes = Vec::new();
        filter_value(&p, tool, &mut result, 8, &mut notes).unwrap();
        assert_eq!(result["content"][0]["text"], "[REDACTED:email]");
        assert_eq!(notes.len(), 1);
        let mut deep = json!({"a": [[[[[[[[1]]]]]]]]});
        assert_eq!(
            withheld(filter_value(&p, tool, &mut deep, 8, &mut notes).map(|()| Bytes::new())).rule,
            "output"
        );
        let mut fits = json!({"a": [[[[[[["ada@example.com"]]]]]]]});
        filter_value(&p, tool, &mut fits, 8, &mut notes).unwrap();
        assert_eq!(fits["a"][0][0][0][0][0][0][0], "[REDACTED:email]");
    }

    #[test]
    fn escapes_decode_as_a_json_parser_reads_them() {
        assert!(matches!(decode_escapes("plain"), Cow::Borrowed("plain")));
        assert_eq!(decode_escapes(r#"a\u0040b \"q\" \n \\"#), "a@b \"q\" \n \\");
        assert_eq!(decode_escapes(r"\ud83d\ude00"), "\u{1F600}");
        // Escapes that do not decode stay as they are: a lone surrogate, short or bad hex.
        assert_eq!(decode_escapes(r"\ud83d x"), "\\ud83d x");
        assert_eq!(decode_escapes(r"\u12"), "\\u12");
        assert_eq!(decode_escapes(r"\q"), "\\q");
    }
}
