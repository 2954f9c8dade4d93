//! Paths into a config (`listeners[1].cluster`), source locations, and the errors that carry both.
//!
//! Every problem with a config is a [`Diagnostic`]: where it is (the YAML path, and the line:column when the
//! config came from text) and what is wrong. [`ConfigErrors`] is the whole list for one config, printed one
//! problem per line as `keel.yaml:12:7: listeners[1].cluster: no cluster named "db"`.

use std::collections::HashMap;
use std::fmt;

/// One step of a [`ConfigPath`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path from the root of a config to one value, printed as `listeners[1].cluster`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConfigPath(Vec<Segment>);

impl ConfigPath {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.into()));
        Self(segments)
    }

    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Self(segments)
    }

    /// This path followed by `rest`.
    pub fn join(&self, rest: &ConfigPath) -> Self {
        Self(self.0.iter().chain(&rest.0).cloned().collect())
    }

    pub fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// Converts the path that `serde_path_to_error` recorded.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        Self(
            path.iter()
                .filter_map(|segment| match segment {
                    S::Seq { index } => Some(Segment::Index(*index)),
                    S::Map { key } => Some(Segment::Key(key.clone())),
                    S::Enum { .. } | S::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for ConfigPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column in a source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where each value of a parsed document sits in its text: the value itself, and for mapping entries the
/// key too (an unknown key is reported at the key).
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    values: HashMap<ConfigPath, Location>,
    keys: HashMap<ConfigPath, Location>,
}

impl SourceMap {
    pub(crate) fn insert(&mut self, path: ConfigPath, key: Option<Location>, value: Location) {
        if let Some(key) = key {
            self.keys.insert(path.clone(), key);
        }
        self.values.insert(path, value);
    }

    /// The location of the value at `path`, or of its nearest ancestor present in the text (a defaulted
    /// field has no location of its own).
    pub fn value(&self, path: &ConfigPath) -> Option<Location> {
        let mut path = path.clone();
        loop {
            if let Some(location) = self.values.get(&path) {
                return Some(*location);
            }
            path = path.parent()?;
        }
    }

    /// The location of the key that introduces `path`, falling back to [`SourceMap::value`].
    pub fn key(&self, path: &ConfigPath) -> Option<Location> {
        self.keys.get(path).copied().or_else(|| self.value(path))
    }
}

/// One problem with a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: ConfigPath,
    pub location: Option<Location>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(path: ConfigPath, message: impl Into<String>) -> Self {
        Self { path, location: None, message: message.into() }
    }

    pub(crate) fn at(mut self, location: Option<Location>) -> Self {
        self.location = location;
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = self.location {
            write!(f, "{location}: ")?;
        }
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one config, with the name of where it came from (a file name, or a snapshot
/// version).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub origin: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigErrors {
    /// One line per problem, `origin:line:col: path: message`.
    pub fn lines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|diagnostic| match diagnostic.location {
                Some(_) => format!("{}:{diagnostic}", self.origin),
                None => format!("{}: {diagnostic}", self.origin),
            })
            .collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_like_yaml_paths() {
        let path = ConfigPath::root().key("listeners").index(1).key("cluster");
        assert_eq!(path.to_string(), "listeners[1].cluster");
        assert_eq!(path.parent().unwrap().to_string(), "listeners[1]");
        assert_eq!(ConfigPath::root().to_string(), "");
    }

    #[test]
    fn errors_print_origin_location_path_and_message() {
        let path = ConfigPath::root().key("listeners").index(1).key("cluster");
        let errors = ConfigErrors {
            origin: "keel.yaml".into(),
            diagnostics: vec![
                Diagnostic::new(path, "no cluster named \"db\"").at(Some(Location { line: 12, column: 7 })),
                Diagnostic::new(ConfigPath::root(), "empty"),
            ],
        };
        assert_eq!(
            errors.to_string(),
            "keel.yaml:12:7: listeners[1].cluster: no cluster named \"db\"\nkeel.yaml: empty"
        );
    }
}
