//! Config and policy problems, each located at `FILE:LINE:COL` with the key path.
//!
//! Loading collects every problem it can find before failing, so `toolgate check` reports them
//! all at once; a security team fixes a file in one pass, not one error per CI run.

use std::fmt;

/// One problem in one file, where a person can find it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// The key path, e.g. `tools["billing.refund"].upstream.url`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.col)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        // One problem per line, always: CI tools parse `FILE:LINE:COL: message`.
        f.write_str(&self.message.replace('\n', " "))
    }
}

/// Every problem found while loading; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    pub fn one(problem: Problem) -> Self {
        Self {
            problems: vec![problem],
        }
    }

    /// A problem with a file as a whole (unreadable, missing), at 1:1.
    pub fn file(file: &str, message: impl Into<String>) -> Self {
        Self::one(Problem {
            file: file.to_owned(),
            line: 1,
            col: 1,
            path: String::new(),
            message: message.into(),
        })
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems across files and entries; turns into `Err` only at the end of loading.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }

    pub fn extend(&mut self, e: ConfigError) {
        self.0.extend(e.problems);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` if nothing was found, else every problem, sorted by file and position.
    pub fn finish<T>(mut self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            return Ok(value);
        }
        self.0
            .sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        self.0.dedup();
        Err(ConfigError { problems: self.0 })
    }
}
