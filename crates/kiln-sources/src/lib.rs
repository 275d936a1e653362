//! Where models come from, and the download cache that makes a remote model
//! local before anything loads it.
//!
//! A model is named by a local path, an `s3://bucket/prefix` URL (any
//! S3-protocol store: AWS, MinIO, …) or a Hugging Face Hub id. [`fetch`]
//! turns a remote [`Source`] into a local directory: the files a model needs
//! (config, tokenizer, generation config, chat template, weights) are
//! downloaded in parallel into `<download dir>/download/<key>` ([`DownloadDir`]),
//! each resumed after a kill, checked against the size and checksum the store
//! gives, and the directory appears under its final name only once it is
//! whole. A file lock per entry makes two processes that start on one cache
//! download once: the second waits and then uses the first one's copy. A
//! store that stops answering or sending is given up on after a timeout and
//! a few further tries (`KILN_DOWNLOAD_TIMEOUT`, `KILN_DOWNLOAD_RETRIES`:
//! the `patience` module), so a load fails instead of hanging.
//!
//! What this crate is not: it does not read model files (the loader in
//! `kiln-model` does, from the local path handed to it, and never touches the
//! network), and it does not convert them (a later prepared-model cache can
//! key itself by the [`FileRecord`]s an entry's manifest keeps).

mod cache;
mod error;
mod hub;
mod lock;
mod patience;
pub mod prepared;
mod progress;
mod s3;
mod select;
mod source;
mod transfer;
mod upload;

use std::path::PathBuf;

pub use cache::{DownloadDir, FileRecord, Manifest, MANIFEST_FILE};
pub use error::SourceError;
pub use patience::{RETRIES_VAR, TIMEOUT_VAR};
pub use prepared::{PreparedCache, PreparedError};
pub use source::{looks_like_hub_id, Source};
pub use upload::{upload_files, PART_BYTES};

/// A remote model made local.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The cache entry holding the files.
    pub dir: PathBuf,
    /// What to hand the loader: `dir`, or the single GGUF file in it when the
    /// source held a GGUF model and no `config.json`.
    pub model_path: PathBuf,
    /// What was downloaded, with sizes and ETags: the content identity of
    /// the entry.
    pub manifest: Manifest,
}

/// Makes `source` local: returns the cache entry at once when it is already
/// complete, else takes the entry's lock (waiting while another process
/// downloads it), downloads what is missing and publishes the entry.
///
/// Blocking: runs its own small async runtime, so call it from a thread that
/// is not a tokio worker (a loader thread, or `main` before serving).
pub fn fetch(source: &Source, dir: &DownloadDir) -> Result<Fetched, SourceError> {
    cache::fetch(source, dir)
}
