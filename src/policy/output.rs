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
