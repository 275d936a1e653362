//! Why a model's properties cannot be used: each bad value with where it
//! was set, and the file and source errors.

use std::fmt;
use std::path::PathBuf;

use super::raw::Origin;

/// One bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the value was set.
    pub origin: Origin,
    /// The key.
    pub key: String,
    /// What is wrong, starting with the key and value, e.g.
    /// `option.dtype = 'fp8' is not one of auto, fp32, fp16, bf16`.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Why a model's properties cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    /// The properties file exists but cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid `.properties` text.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// One or more values are invalid (one line each).
    #[error("{}", join_problems(problems))]
    Invalid {
        /// Every bad value found, in file order then environment.
        problems: Vec<Problem>,
    },
    /// `option.model_id` names a remote model in a way that cannot be fetched.
    #[error("{origin}: option.model_id = '{value}': {source}")]
    BadSource {
        /// Where `option.model_id` was set.
        origin: Origin,
        /// The value.
        value: String,
        /// What is wrong with it.
        #[source]
        source: Box<kiln_sources::SourceError>,
    },
    /// `option.model_id` is a local path that does not exist.
    #[error("{origin}: option.model_id = '{value}': {} does not exist", path.display())]
    LocalPathMissing {
        /// Where `option.model_id` was set.
        origin: Origin,
        /// The value.
        value: String,
        /// The path it resolves to.
        path: PathBuf,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}
