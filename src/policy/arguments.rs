//! Tool arguments: strict JSON parsing (depth limit, duplicate keys refused) and validation
//! against the tool's JSON Schema, with messages that never echo the caller's values.
//!
//! The value parsed here is the only form of the arguments the rest of the gateway sees; the
//! upstream receives its re-serialisation, never the caller's original bytes, so a parser
//! differential (duplicate keys, odd escapes) cannot show one thing to the checks and another to
//! the tool.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Why a body is not acceptable arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentsError {
    #[error("The body is not valid JSON (line {line}, column {column}).")]
    NotJson { line: usize, column: usize },
    #[error("The body must be a JSON object of arguments.")]
    NotObject,
    #[error("The arguments are nested deeper than the limit of {0} levels.")]
    TooDeep(usize),
    #[error("The arguments contain the same key twice in one object.")]
    DuplicateKey,
}

const DUPLICATE: &str = "duplicate key";
const TOO_DEEP: &str = "too deep";
const HIT: &str = "a string matched";

/// The number content filters scan as text: one shaped like a payment card (13 to 19 digits,
/// the first 2 to 6, as the card networks' are). Every other detector needs punctuation a
/// bare number cannot have (`+`, `-`, `@`, letters), and a wider net would catch timestamps
/// and ids: one 13-to-19-digit number in ten passes Luhn.
pub fn scanned_number(n: &serde_json::Number) -> Option<u64> {
    let v = n.as_u64().or_else(|| n.as_i64().map(i64::unsigned_abs)).or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e19)
            .map(|f| f.abs() as u64)
    })?;
    is_card_shaped(v).then_some(v)
}

fn is_card_shaped(v: u64) -> bool {
    let digits = v.checked_ilog10().map_or(1, |d| d + 1);
    let first = v / 10u64.pow(digits - 1);
    (13..=19).contains(&digits) && (2..=6).contains(&first)
}

/// Parses a body into a JSON object, refusing duplicate keys and nesting deeper than `max_depth`.
/// An empty body is an empty object.
pub fn parse(body: &[u8], max_depth: usize) -> Result<Map<String, Value>, ArgumentsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match parse_value(body, max_depth)? {
        Value::Object(map) => Ok(map),
        _ => Err(ArgumentsError::NotObject),
    }
}

/// Parses any JSON value with the same strictness (for tool responses).
pub fn parse_value(body: &[u8], max_depth: usize) -> Result<Value, ArgumentsError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = Strict { depth_left: max_depth }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| classify(e, max_depth))?;
    Ok(value)
}

/// Checks `body` with [`parse_value`]'s strictness — one JSON value, at most `max_depth` deep,
/// no duplicate keys — and calls `hit` on every object key and string value at any depth,
/// without building a tree. `Ok(true)` as soon as `hit` returns true (the rest is not read:
/// a caller that must act on the match parses the body in full); `Ok(false)` if nothing hit.
///
/// For tool responses, which are nearly always clean: deciding that costs a fraction of
/// building a `Value` (no allocation per string, no hashed map per object).
pub fn any_string(body: &[u8], max_depth: usize, hit: &mut dyn FnMut(&str) -> bool) -> Result<bool, ArgumentsError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let scanned = Strings {
        depth_left: max_depth,
        hit,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match scanned {
        Ok(()) => Ok(false),
        Err(e) if e.classify() == serde_json::error::Category::Data && e.to_string().starts_with(HIT) => Ok(true),
        Err(e) => Err(classify(e, max_depth)),
    }
}

fn classify(e: serde_json::Error, max_depth: usize) -> ArgumentsError {
    match e.classify() {
        serde_json::error::Category::Data if e.to_string().starts_with(DUPLICATE) => ArgumentsError::DuplicateKey,
        serde_json::error::Category::Data if e.to_string().starts_with(TOO_DEEP) => ArgumentsError::TooDeep(max_depth),
        _ => ArgumentsError::NotJson {
            line: e.line(),
            column: e.column(),
        },
    }
}

/// [`any_string`]'s walk: a seed that counts depth, keeps each object's keys (borrowed from
/// the body unless escaped) to refuse duplicates, and stops at the first string that hits.
struct Strings<'h> {
    depth_left: usize,
    hit: &'h mut dyn FnMut(&str) -> bool,
}

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_u64(v.unsigned_abs())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        // A card-shaped number is seen as text too (a card number sent as a number).
        if is_card_shaped(v) && (self.hit)(&v.to_string()) {
            return Err(E::custom(HIT));
        }
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if v.fract() == 0.0 && v.abs() < 1e19 {
            return self.visit_u64(v.abs() as u64);
        }
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if (self.hit)(v) { Err(E::custom(HIT)) } else { Ok(()) }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth_left = self
            .depth_left
            .checked_sub(1)
            .ok_or_else(|| A::Error::custom(TOO_DEEP))?;
        while seq
            .next_element_seed(Strings {
                depth_left,
                hit: &mut *self.hit,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth_left = self
            .depth_left
            .checked_sub(1)
            .ok_or_else(|| A::Error::custom(TOO_DEEP))?;
        let mut keys: Vec<std::borrow::Cow<'de, str>> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            if (self.hit)(&key) {
                return Err(A::Error::custom(HIT));
            }
            keys.push(key);
            map.next_value_seed(Strings {
                depth_left,
                hit: &mut *self.hit,
            })?;
        }
        if has_duplicates(&mut keys) {
            return Err(A::Error::custom(DUPLICATE));
        }
        Ok(())
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

/// Whether a key repeats: pairwise for the small objects nearly all are, sorted beyond.
fn has_duplicates(keys: &mut [std::borrow::Cow<'_, str>]) -> bool {
    if keys.len() <= 16 {
        return keys.iter().enumerate().any(|(i, k)| keys[..i].contains(k));
    }
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// A `serde_json::Value` seed that counts depth and refuses duplicate keys.
struct Strict {
    depth_left: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Strict {
    fn nested<E: serde::de::Error>(&self) -> Result<Strict, E> {
        if self.depth_left == 0 {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(Strict {
            depth_left: self.depth_left - 1,
        })
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict {
            depth_left: inner.depth_left,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(Strict {
                depth_left: inner.depth_left,
            })?;
            if out.insert(key, v).is_some() {
                return Err(A::Error::custom(DUPLICATE));
            }
        }
        Ok(Value::Object(out))
    }
}

/// The canonical form of arguments: keys sorted, no whitespace. This is what is forwarded and hashed.
pub fn canonical(args: &Map<String, Value>) -> Vec<u8> {
    // serde_json's map keeps insertion order here (cedar-policy turns on `preserve_order`), so
    // keys are sorted explicitly: the same arguments always hash and forward the same bytes.
    let mut out = Vec::with_capacity(128);
    write_canonical_object(args, &mut out);
    out
}

fn write_canonical_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

/// A JSON string, as serde_json writes it: copied as it is when nothing in it needs escaping
/// (nearly always), else through serde_json's byte-at-a-time escaping.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // A fold, not `all`: without the early exit the compiler vectorises it.
    let plain = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("strings serialise");
    }
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => write_canonical_object(m, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_str(out, s),
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serialises"),
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    // Into a buffer: `hex::encode` builds its `String` one `char` at a time.
    let mut out = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(bytes), &mut out).expect("64 hex digits for 32 bytes");
    String::from_utf8(out.to_vec()).expect("hex is ASCII")
}

/// The arguments' shape, keys with the type of each value, for audit events that must not carry
/// values (`{"order_id": "string", "items": ["object"]}`).
pub fn shape(value: &Value) -> Value {
    match value {
        Value::Null => Value::from("null"),
        Value::Bool(_) => Value::from("boolean"),
        Value::Number(n) if n.is_f64() => Value::from("number"),
        Value::Number(_) => Value::from("integer"),
        Value::String(_) => Value::from("string"),
        Value::Array(items) => {
            // Types once each, in first-seen order: the shape of a list, not its length.
            let mut kinds: Vec<Value> = Vec::new();
            for item in items {
                let s = shape(item);
                if !kinds.contains(&s) {
                    kinds.push(s);
                }
            }
            Value::Array(kinds)
        }
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// A tool's compiled argument schema.
pub struct ArgumentSchema {
    validator: jsonschema::Validator,
    /// Property names the schema declares, to tell an agent what it may send.
    declared: Vec<String>,
}

impl fmt::Debug for ArgumentSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArgumentSchema")
            .field("declared", &self.declared)
            .finish()
    }
}

impl ArgumentSchema {
    /// Compiles a JSON Schema; remote `$ref`s are never fetched.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        if !schema.is_object() {
            return Err("an arguments schema must be a JSON Schema object".to_owned());
        }
        if schema
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "object")
        {
            return Err("an arguments schema must describe an object (`type: object`)".to_owned());
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| format!("invalid JSON Schema: {e}"))?;
        let declared = schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        Ok(Self { validator, declared })
    }

    /// `Ok` or a message for the agent naming where and what, never the offending value.
    pub fn validate(&self, args: &Value) -> Result<(), String> {
        // `is_valid` stops at the first failure and allocates nothing; the error is looked for
        // only for a call that fails.
        if self.validator.is_valid(args) {
            return Ok(());
        }
        let Some(err) = self.validator.iter_errors(args).next() else {
            return Ok(());
        };
        let at = safe_pointer(&err.instance_path().to_string());
        use jsonschema::error::ValidationErrorKind as K;
        let what = match err.kind() {
            K::Required { property } => {
                let name = property.as_str().unwrap_or("?");
                return Err(format!("Missing required argument '{}'.", join_pointer(&at, name)));
            }
            K::AdditionalProperties { .. } | K::UnevaluatedProperties { .. } => {
                return Err(format!(
                    "Unexpected argument at '{at}': this tool accepts only {}.",
                    if self.declared.is_empty() {
                        "the arguments its schema declares".to_owned()
                    } else {
                        self.declared.join(", ")
                    }
                ));
            }
            K::Type { kind } => format!("must be of type {}", type_name(kind)),
            K::Pattern { .. } => "does not match the required format".to_owned(),
            K::Format { format } => format!("must be a valid {format}"),
            K::Enum { .. } | K::Constant { .. } => "is not one of the allowed values".to_owned(),
            K::Minimum { limit } => format!("must be at least {limit}"),
            K::Maximum { limit } => format!("must be at most {limit}"),
            K::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
            K::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
            K::MinLength { limit } => format!("must be at least {limit} characters long"),
            K::MaxLength { limit } => format!("must be at most {limit} characters long"),
            K::MinItems { limit } => format!("must have at least {limit} items"),
            K::MaxItems { limit } => format!("must have at most {limit} items"),
            K::MinProperties { limit } => format!("must have at least {limit} properties"),
            K::MaxProperties { limit } => format!("must have at most {limit} properties"),
            K::UniqueItems => "must not contain duplicate items".to_owned(),
            K::MultipleOf { .. } => "is not an allowed multiple".to_owned(),
            _ => "does not match the tool's argument schema".to_owned(),
        };
        Err(format!("Argument '{at}' {what}."))
    }
}

fn type_name(kind: &jsonschema::error::TypeKind) -> String {
    match kind {
        jsonschema::error::TypeKind::Single(t) => t.to_string(),
        jsonschema::error::TypeKind::Multiple(ts) => {
            let names: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
            names.join(" or ")
        }
    }
}

/// An instance path, shown only when every segment is identifier-like: a caller-chosen key could
/// otherwise carry a secret into the error message and the logs.
fn safe_pointer(pointer: &str) -> String {
    let is_safe = pointer.split('/').skip(1).all(|s| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    if pointer.is_empty() {
        "/".to_owned()
    } else if is_safe {
        pointer.to_owned()
    } else {
        "(a nested value)".to_owned()
    }
}

fn join_pointer(at: &str, name: &str) -> String {
    if at == "/" {
        format!("/{name}")
    } else {
        format!("{at}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every string `any_string` shows `hit`, in order, when nothing hits.
    fn strings_seen(body: &[u8], depth: usize) -> Result<Vec<String>, ArgumentsError> {
        let mut seen = Vec::new();
        let hit = any_string(body, depth, &mut |s| {
            seen.push(s.to_owned());
            false
        })?;
        assert!(!hit);
        Ok(seen)
    }

    #[test]
    fn any_string_sees_every_key_and_string_at_any_depth_and_stops_at_a_hit() {
        let body = br#" {"a": [1, true, null, {"b\u0063": "x\n"}], "d": {"e": [["f"]], "g": 2.5}} "#;
        assert_eq!(strings_seen(body, 8).unwrap(), ["a", "bc", "x\n", "d", "e", "f", "g"]);
        let mut seen = 0;
        let hit = any_string(body, 8, &mut |s| {
            seen += 1;
            s == "x\n"
        });
        assert_eq!(hit, Ok(true));
        assert_eq!(seen, 3, "nothing after the hit is looked at");
    }

    #[test]
    fn any_string_is_as_strict_as_parse_value() {
        for (body, depth) in [
            (&br#"{"a": 1, "a": 2}"#[..], 8),
            (br#"{"a": {"k": 1, "\u006b": 2}}"#, 8),
            (br#"[[[1]]]"#, 2),
            (br#"{"a": "#, 8),
            (br#"{} {}"#, 8),
            (b"", 8),
        ] {
            let expected = parse_value(body, depth).unwrap_err();
            let got = strings_seen(body, depth).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&expected),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Beyond sixteen keys, duplicates are found by sorting.
        let many: Vec<String> = (0..40).map(|i| format!("\"k{}\": {i}", i % 39)).collect();
        let body = format!("{{{}}}", many.join(","));
        assert_eq!(strings_seen(body.as_bytes(), 8), Err(ArgumentsError::DuplicateKey));
        let body = body.replace("\"k0\": 39", "\"k39\": 39");
        assert_eq!(strings_seen(body.as_bytes(), 8).unwrap().len(), 40);
    }

    #[test]
    fn parses_objects_and_treats_an_empty_body_as_no_arguments() {
        assert_eq!(parse(br#"{"a": 1}"#, 8).unwrap()["a"], 1);
        assert!(parse(b"  ", 8).unwrap().is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_json_object() {
        assert_eq!(parse(b"[1]", 8), Err(ArgumentsError::NotObject));
        assert_eq!(parse(b"\"x\"", 8), Err(ArgumentsError::NotObject));
        assert!(matches!(parse(b"{\"a\":", 8), Err(ArgumentsError::NotJson { .. })));
        assert!(matches!(parse(b"{} {}", 8), Err(ArgumentsError::NotJson { .. })));
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        assert_eq!(parse(br#"{"a":1,"a":2}"#, 8), Err(ArgumentsError::DuplicateKey));
        assert_eq!(parse(br#"{"x":[{"a":1,"a":1}]}"#, 8), Err(ArgumentsError::DuplicateKey));
        // Escapes decode before comparison: "\u0061" is "a".
        assert_eq!(parse(br#"{"a":1,"\u0061":2}"#, 8), Err(ArgumentsError::DuplicateKey));
    }

    #[test]
    fn enforces_the_depth_limit_exactly() {
        let nest = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        assert!(parse(nest(4).as_bytes(), 4).is_ok());
        assert_eq!(parse(nest(5).as_bytes(), 4), Err(ArgumentsError::TooDeep(4)));
        let arrays = format!("{{\"a\":{}1{}}}", "[".repeat(10), "]".repeat(10));
        assert_eq!(parse(arrays.as_bytes(), 8), Err(ArgumentsError::TooDeep(8)));
    }

    #[test]
    fn canonical_form_sorts_keys() {
        let a = parse(br#"{"b": 1, "a": {"d": 2, "c": 3}}"#, 8).unwrap();
        assert_eq!(canonical(&a), br#"{"a":{"c":3,"d":2},"b":1}"#);
    }

    proptest::proptest! {
        /// Strings in the canonical form (plain ones copied, others escaped by serde_json) are
        /// exactly serde_json's, so the form parses back to the same arguments.
        #[test]
        fn canonical_strings_are_serde_jsons(text in "(\\PC|[\\x00-\\x1f\"\\\\\u{7f}])*") {
            let mut out = Vec::new();
            write_str(&mut out, &text);
            proptest::prop_assert_eq!(&out, &serde_json::to_vec(&text).unwrap());
            let args = json!({ text.clone(): [text.clone(), {"k": text.clone()}] });
            let Value::Object(map) = &args else { unreachable!() };
            proptest::prop_assert_eq!(serde_json::from_slice::<Value>(&canonical(map)).unwrap(), args);
        }
    }

    #[test]
    fn shape_keeps_keys_and_types_but_no_values() {
        let v = json!({"email": "a@b.c", "n": 3, "x": 1.5, "items": [{"id": "s"}, {"id": "t"}], "z": null});
        assert_eq!(
            shape(&v),
            json!({"email": "string", "n": "integer", "x": "number", "items": [{"id": "string"}], "z": "null"})
        );
    }

    fn refund_schema() -> ArgumentSchema {
        ArgumentSchema::compile(&json!({
            "type": "object", "required": ["order_id", "amount"], "additionalProperties": false,
            "properties": {"order_id": {"type": "string", "pattern": "^O-[0-9]+$"}, "amount": {"type": "integer", "minimum": 1}}
        }))
        .unwrap()
    }

    #[test]
    fn schema_messages_name_the_argument_but_never_its_value() {
        let s = refund_schema();
        assert!(s.validate(&json!({"order_id": "O-1", "amount": 5})).is_ok());
        let m = s
            .validate(&json!({"order_id": "secret-value", "amount": 5}))
            .unwrap_err();
        assert_eq!(m, "Argument '/order_id' does not match the required format.");
        let m = s.validate(&json!({"order_id": "O-1"})).unwrap_err();
        assert_eq!(m, "Missing required argument '/amount'.");
        let m = s
            .validate(&json!({"order_id": "O-1", "amount": 5, "hunter2": 1}))
            .unwrap_err();
        assert!(!m.contains("hunter2") && m.contains("order_id"), "{m}");
        let m = s.validate(&json!({"order_id": "O-1", "amount": 0})).unwrap_err();
        assert_eq!(m, "Argument '/amount' must be at least 1.");
    }

    #[test]
    fn refuses_schemas_that_are_not_for_objects() {
        assert!(ArgumentSchema::compile(&json!({"type": "string"})).is_err());
        assert!(ArgumentSchema::compile(&json!({"type": "object", "properties": {"a": {"type": 5}}})).is_err());
    }
}
