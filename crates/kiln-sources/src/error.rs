//! Why a model could not be made local. Every error starts with the source's
//! URL, so a log line or an HTTP 424 says which model it is about.

use std::path::PathBuf;

/// A failure to name, list, download, verify or cache a remote model.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL or id is malformed.
    #[error("{url}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store refused or failed a request (credentials, missing bucket,
    /// network).
    #[error("{url}: {what}: {message}")]
    Remote {
        /// The source URL.
        url: String,
        /// What was being done ("listing", "downloading config.json").
        what: String,
        /// The store's or client's message.
        message: String,
    },
    /// Nothing under the URL looks like a model.
    #[error("{url}: no model files there ({found})")]
    NoModelFiles {
        /// The source URL.
        url: String,
        /// What was found instead, for the reader.
        found: String,
    },
    /// A file arrived shorter or longer than the store said it is.
    #[error("{url}: {file}: got {got} bytes where the store lists {expected}; the partial copy is kept to resume from")]
    SizeMismatch {
        /// The source URL.
        url: String,
        /// The file inside the model.
        file: String,
        /// Bytes the store listed.
        expected: u64,
        /// Bytes received (including a resumed prefix).
        got: u64,
    },
    /// A file's checksum does not match the store's ETag or SHA-256.
    #[error("{url}: {file}: {kind} is {got}, the store says {expected}; the copy was discarded")]
    ChecksumMismatch {
        /// The source URL.
        url: String,
        /// The file inside the model.
        file: String,
        /// `md5 (ETag)` or `sha256`.
        kind: &'static str,
        /// What the store gave.
        expected: String,
        /// What the bytes hash to.
        got: String,
    },
    /// A download setting in the environment is malformed.
    #[error("{var}={value:?}: expected {expected}")]
    Setting {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// Reading or writing the cache failed.
    #[error("{url}: cache {}: {source}", path.display())]
    Cache {
        /// The source URL.
        url: String,
        /// The file or directory in the cache.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// A [`SourceError::Cache`] for `url` at `path`.
    pub(crate) fn cache(url: &str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SourceError::Cache {
            url: url.to_string(),
            path: path.into(),
            source,
        }
    }

    /// A [`SourceError::Remote`] for `url`.
    pub(crate) fn remote(url: &str, what: impl Into<String>, message: impl ToString) -> Self {
        SourceError::Remote {
            url: url.to_string(),
            what: what.into(),
            message: message.to_string(),
        }
    }
}
