//! YAML files → JSON values plus a map from key path to source position.
//!
//! Files are parsed with `saphyr` (YAML 1.2, duplicate keys refused, positions on every node),
//! turned into `serde_json::Value`, and each entry is then deserialised on its own with
//! `serde_path_to_error`. That way one typo does not hide the next one, and every error — a serde
//! error or a later semantic check — can be pointed at `FILE:LINE:COL` by its key path.

use std::collections::HashMap;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use super::error::{ConfigError, Problem};

/// One segment of a key path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path inside a document, e.g. `tools["billing.refund"].upstream`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_owned()));
        Self(v)
    }

    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }

    fn parent(&self) -> Option<Self> {
        if self.0.is_empty() {
            return None;
        }
        Some(Self(self.0[..self.0.len() - 1].to_vec()))
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if is_plain_key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Key(k) => write!(f, "[{k:?}]")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

fn is_plain_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A parsed YAML file: its value and where each key path starts.
#[derive(Debug)]
pub struct Document {
    pub file: String,
    pub value: Value,
    positions: HashMap<KeyPath, (usize, usize)>,
}

impl Document {
    /// Parses one YAML document. An empty file is an empty mapping.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let docs = MarkedYaml::load_from_str(text).map_err(|e| {
            ConfigError::one(Problem {
                file: file.to_owned(),
                line: e.marker().line(),
                col: e.marker().col() + 1,
                path: String::new(),
                message: format!("invalid YAML: {}", e.info()),
            })
        })?;
        let mut doc = Document {
            file: file.to_owned(),
            value: Value::Object(Map::new()),
            positions: HashMap::new(),
        };
        match docs.len() {
            0 => Ok(doc),
            1 => {
                let mut problems = Vec::new();
                doc.value = doc.convert(&docs[0], KeyPath::root(), &mut problems);
                if problems.is_empty() {
                    Ok(doc)
                } else {
                    Err(ConfigError { problems })
                }
            }
            _ => Err(ConfigError::file(
                file,
                "a file must hold one YAML document, not several",
            )),
        }
    }

    fn convert(&mut self, node: &MarkedYaml<'_>, path: KeyPath, problems: &mut Vec<Problem>) -> Value {
        let pos = (node.span.start.line(), node.span.start.col() + 1);
        self.positions.entry(path.clone()).or_insert(pos);
        match &node.data {
            YamlData::Value(s) => scalar(s),
            YamlData::Representation(s, _, _) => Value::String(s.to_string()),
            YamlData::Sequence(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, path.index(i), problems))
                    .collect(),
            ),
            YamlData::Mapping(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    let key = match &k.data {
                        YamlData::Value(Scalar::String(s)) => s.to_string(),
                        YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                        YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                        _ => {
                            problems.push(self.problem_at(
                                (k.span.start.line(), k.span.start.col() + 1),
                                &path,
                                "mapping keys must be plain strings",
                            ));
                            continue;
                        }
                    };
                    let child = path.key(&key);
                    // The key's own position is where a person looks for "this entry".
                    self.positions
                        .insert(child.clone(), (k.span.start.line(), k.span.start.col() + 1));
                    let value = self.convert(v, child, problems);
                    map.insert(key, value);
                }
                Value::Object(map)
            }
            YamlData::Tagged(_, inner) => self.convert(inner, path, problems),
            YamlData::Alias(_) | YamlData::BadValue => {
                problems.push(self.problem_at(pos, &path, "aliases and unresolvable values are not allowed"));
                Value::Null
            }
        }
    }

    fn problem_at(&self, (line, col): (usize, usize), path: &KeyPath, message: &str) -> Problem {
        Problem {
            file: self.file.clone(),
            line,
            col,
            path: path.to_string(),
            message: message.to_owned(),
        }
    }

    /// A problem at `path`, located at the nearest ancestor the file mentions.
    pub fn problem(&self, path: &KeyPath, message: impl Into<String>) -> Problem {
        let mut probe = Some(path.clone());
        let mut pos = (1, 1);
        while let Some(p) = probe {
            if let Some(found) = self.positions.get(&p) {
                pos = *found;
                break;
            }
            probe = p.parent();
        }
        Problem {
            file: self.file.clone(),
            line: pos.0,
            col: pos.1,
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// Deserialises the value at `path` into `T`, locating the error at the exact key on failure.
    pub fn decode<T: DeserializeOwned>(&self, path: &KeyPath, value: &Value) -> Result<T, Problem> {
        serde_path_to_error::deserialize(value).map_err(|err| {
            let mut at = path.clone();
            for seg in err.path().iter() {
                at = match seg {
                    serde_path_to_error::Segment::Seq { index } => at.index(*index),
                    serde_path_to_error::Segment::Map { key } => at.key(key),
                    _ => at,
                };
            }
            self.problem(&at, err.into_inner().to_string())
        })
    }
}

fn scalar(s: &Scalar<'_>) -> Value {
    match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number((*i).into()),
        Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner()).map_or(Value::Null, Value::Number),
        Scalar::String(s) => Value::String(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_keys_and_renders_dotted_tool_names() {
        let doc = Document::parse("p.yaml", "tools:\n  billing.refund:\n    upstream: {url: x}\n").unwrap();
        let path = KeyPath::root()
            .key("tools")
            .key("billing.refund")
            .key("upstream")
            .key("url");
        let p = doc.problem(&path, "bad");
        assert_eq!(
            p.to_string(),
            "p.yaml:3:16: tools[\"billing.refund\"].upstream.url: bad"
        );
    }

    #[test]
    fn refuses_duplicate_keys_with_their_position() {
        let err = Document::parse("p.yaml", "a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.problems[0].line, 3);
        assert!(err.problems[0].message.contains("duplicate"), "{err}");
    }

    #[test]
    fn reports_syntax_errors_with_line_and_column() {
        let err = Document::parse("p.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(err.problems[0].file, "p.yaml");
        assert!(err.problems[0].line >= 1);
        assert!(err.problems[0].message.starts_with("invalid YAML"));
    }

    #[test]
    fn unknown_fields_point_at_the_misspelled_key() {
        #[derive(serde::Deserialize, Debug, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            tools: Vec<String>,
        }
        let doc = Document::parse("p.yaml", "x:\n  tols: []\n").unwrap();
        let v = doc.value["x"].clone();
        let p = doc.decode::<T>(&KeyPath::root().key("x"), &v).unwrap_err();
        assert_eq!((p.line, p.col), (2, 3), "{p}");
        assert!(p.message.contains("unknown field `tols`"), "{p}");
    }
}
