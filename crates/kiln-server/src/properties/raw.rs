//! The configuration as written: each key's value and where it was set (a
//! file line or an environment variable), before any is typed.

use std::fmt;
use std::path::PathBuf;

/// Where a value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a properties file.
    File {
        /// The file, as it was given.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
    },
    /// An environment variable.
    Env {
        /// The variable's name.
        var: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
        }
    }
}

/// One entry of the effective configuration: every key the file set, and
/// every known key that the environment supplied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawProperty {
    /// The key, as in `serving.properties` (`option.dtype`, `minWorkers`, …).
    pub key: String,
    /// The value as written (unescaped and trimmed).
    pub value: String,
    /// Where it was set.
    pub origin: Origin,
}

/// The effective configuration as written: every key the file set (in file
/// order), then the known keys that the environment supplied. Serializes as a
/// JSON object of key to value, in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawProperties(pub(super) Vec<RawProperty>);

impl RawProperties {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|p| p.value.as_str())
    }

    /// The entry for `key`, with its origin.
    pub fn entry(&self, key: &str) -> Option<&RawProperty> {
        self.0.iter().find(|p| p.key == key)
    }

    /// The entries, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, RawProperty> {
        self.0.iter()
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a RawProperties {
    type Item = &'a RawProperty;
    type IntoIter = std::slice::Iter<'a, RawProperty>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl serde::Serialize for RawProperties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for p in &self.0 {
            map.serialize_entry(&p.key, &p.value)?;
        }
        map.end()
    }
}
