use std::path::{Path, PathBuf};

/// Everything that can go wrong turning files into a model. Each variant names
/// the file (and tensor, where there is one) so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The reason is part of the message and not also a `source()`, so that
    /// a chain printed with `{:#}` names it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: required tensor '{tensor}' is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Backend(#[from] kiln_backend::BackendError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, err: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            err,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
