//! From the tools' JSON Schemas to Cedar: the schema rules are validated against, and the
//! `context.input` record built for each call.
//!
//! The mapping is deliberately narrow, so a rule can only name what the gateway can vouch for:
//! `string` → `String`, `integer` → `Long`, `number` → `decimal`, `boolean` → `Bool`, `array`
//! with `items` → `Set`, `object` with `properties` → a record (required properties required).
//! A property with any other schema (no `type`, several types, `$ref`, `oneOf`…) is left out of
//! `context.input`, so a rule that names it fails validation at load rather than erroring (and
//! being skipped) at run time.
//!
//! Cedar has no floats: a JSON number becomes a `decimal` (four decimal places). A value with
//! more precision cannot be represented exactly, and rounding either way lets some comparison be
//! dodged (`amount > 100` with `100.00001`, or `amount < 1` with `0.99999`), so such a value is
//! refused as invalid arguments rather than rounded.

use cedar_policy::RestrictedExpression;
use serde_json::{Map, Value, json};

/// The Cedar type of one argument.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgType {
    String,
    Long,
    Decimal,
    Bool,
    Set(Box<ArgType>),
    /// `(name, type, required)`.
    Record(Vec<(String, ArgType, bool)>),
}

/// Deep enough for any sensible argument schema; deeper parts are left out.
const MAX_DEPTH: usize = 16;

impl ArgType {
    /// The type of a tool's `arguments` schema (an empty record when there is none).
    pub fn of_arguments(schema: Option<&Value>) -> ArgType {
        schema
            .and_then(|s| Self::of(s, 0))
            .filter(|t| matches!(t, ArgType::Record(_)))
            .unwrap_or(ArgType::Record(Vec::new()))
    }

    fn of(schema: &Value, depth: usize) -> Option<ArgType> {
        if depth > MAX_DEPTH {
            return None;
        }
        let obj = schema.as_object()?;
        if ["$ref", "oneOf", "anyOf", "allOf", "not", "if"]
            .iter()
            .any(|k| obj.contains_key(*k))
        {
            return None;
        }
        Some(match obj.get("type")?.as_str()? {
            "string" => ArgType::String,
            "integer" => ArgType::Long,
            "number" => ArgType::Decimal,
            "boolean" => ArgType::Bool,
            "array" => ArgType::Set(Box::new(Self::of(obj.get("items")?, depth + 1)?)),
            "object" => {
                let required: Vec<&str> = obj
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let props = obj.get("properties").and_then(Value::as_object);
                let attrs = props
                    .into_iter()
                    .flatten()
                    .filter_map(|(name, s)| {
                        Some((name.clone(), Self::of(s, depth + 1)?, required.contains(&name.as_str())))
                    })
                    .collect();
                ArgType::Record(attrs)
            }
            _ => return None,
        })
    }

    /// The type in Cedar's JSON schema format.
    pub fn to_cedar(&self) -> Value {
        match self {
            ArgType::String => json!({"type": "String"}),
            ArgType::Long => json!({"type": "Long"}),
            ArgType::Decimal => json!({"type": "Extension", "name": "decimal"}),
            ArgType::Bool => json!({"type": "Boolean"}),
            ArgType::Set(item) => json!({"type": "Set", "element": item.to_cedar()}),
            ArgType::Record(attrs) => {
                let attributes: Map<String, Value> = attrs
                    .iter()
                    .map(|(name, t, required)| {
                        let mut v = t.to_cedar();
                        v["required"] = Value::Bool(*required);
                        (name.clone(), v)
                    })
                    .collect();
                json!({"type": "Record", "attributes": attributes})
            }
        }
    }

    /// A validated value as a Cedar expression. The value already passed the tool's JSON
    /// Schema, so only range and precision can fail here; the message is safe to show.
    pub fn to_expr(&self, v: &Value, path: &str) -> Result<RestrictedExpression, String> {
        let wrong = || format!("argument `{path}` does not have the type its schema declares");
        Ok(match self {
            ArgType::String => RestrictedExpression::new_string(v.as_str().ok_or_else(wrong)?.to_owned()),
            ArgType::Bool => RestrictedExpression::new_bool(v.as_bool().ok_or_else(wrong)?),
            ArgType::Long => RestrictedExpression::new_long(as_long(v).ok_or_else(|| {
                format!("argument `{path}` is outside the range rules can compare (64-bit integers)")
            })?),
            ArgType::Decimal => RestrictedExpression::new_decimal(as_decimal(v).ok_or_else(|| {
                format!(
                    "argument `{path}` has more than 4 decimal places or is out of range; rules compare numbers exactly to 4 decimal places"
                )
            })?),
            ArgType::Set(item) => {
                let items = v.as_array().ok_or_else(wrong)?;
                let exprs = items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| item.to_expr(x, &format!("{path}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                RestrictedExpression::new_set(exprs)
            }
            ArgType::Record(attrs) => record(attrs, v.as_object().ok_or_else(wrong)?, path)?,
        })
    }

    /// The top-level arguments object as a Cedar record (`context.input`).
    pub fn to_record_expr(&self, args: &Map<String, Value>) -> Result<RestrictedExpression, String> {
        match self {
            ArgType::Record(attrs) => record(attrs, args, ""),
            _ => Err("the arguments are not an object".to_owned()),
        }
    }
}

fn record(
    attrs: &[(String, ArgType, bool)],
    obj: &Map<String, Value>,
    path: &str,
) -> Result<RestrictedExpression, String> {
    let mut fields = Vec::with_capacity(attrs.len());
    for (name, t, required) in attrs {
        match obj.get(name) {
            Some(x) => {
                let sub = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                fields.push((name.clone(), t.to_expr(x, &sub)?));
            }
            None if *required => return Err(format!("argument `{path}.{name}` is missing")),
            None => {}
        }
    }
    RestrictedExpression::new_record(fields).map_err(|_| format!("argument `{path}` cannot be compared by rules"))
}

fn as_long(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        let f = v.as_f64()?;
        // JSON Schema counts 100.0 as an integer.
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
    })
}

/// Cedar's `decimal` literal for a JSON number, if exactly representable (at most 4 decimal
/// places, |x| < 922337203685477).
fn as_decimal(v: &Value) -> Option<String> {
    if let Some(i) = v.as_i64() {
        return (i.unsigned_abs() < 922_337_203_685_477).then(|| format!("{i}.0"));
    }
    let f = v.as_f64()?;
    if !f.is_finite() || f.abs() >= 922_337_203_685_477.0 {
        return None;
    }
    // Rust's `Display` for f64 is the shortest string that reads back to the same f64, never
    // in exponent form: exactly the digits the caller sent, as far as an f64 could carry them.
    let s = format!("{f}");
    match s.split_once('.') {
        None => Some(format!("{s}.0")),
        Some((_, frac)) if frac.len() <= 4 => Some(s),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_supported_subset_and_leaves_out_the_rest() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "anything": {}, "either": {"type": ["string", "null"]}, "ref": {"$ref": "#/x"},
            "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        }});
        let ArgType::Record(attrs) = ArgType::of_arguments(Some(&schema)) else {
            panic!()
        };
        let mut names: Vec<_> = attrs.iter().map(|(n, _, r)| (n.as_str(), *r)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("a", true),
                ("inner", false),
                ("n", false),
                ("tags", false),
                ("x", false)
            ]
        );
    }

    #[test]
    fn decimals_are_exact_or_refused() {
        assert_eq!(as_decimal(&json!(100)).as_deref(), Some("100.0"));
        assert_eq!(as_decimal(&json!(250.5)).as_deref(), Some("250.5"));
        assert_eq!(as_decimal(&json!(0.0001)).as_deref(), Some("0.0001"));
        assert_eq!(as_decimal(&json!(-3.25)).as_deref(), Some("-3.25"));
        assert_eq!(as_decimal(&json!(100.000000001)), None);
        assert_eq!(as_decimal(&json!(0.99999)), None);
        assert_eq!(as_decimal(&json!(1e300)), None);
        assert_eq!(as_long(&json!(100.0)), Some(100));
        assert_eq!(as_long(&json!(1e300)), None);
    }
}
