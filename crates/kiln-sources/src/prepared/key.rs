//! Cache keys: what a prepared model's bytes depend on, and the content
//! identity of its source.

use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{FileRecord, Manifest};

/// Everything a prepared model's bytes depend on; hashed into its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyParts {
    /// The source: a URL, or a local model's canonical path.
    pub source: String,
    /// The source's content identity, file by file, sorted by name.
    pub identity: Vec<FileRecord>,
    /// The quantization target (`q8_0`, …, or `none`).
    pub quantize: String,
    /// The dtype the weights were rounded to (`f16`, `bf16`, `auto`).
    pub dtype: String,
    /// The artifact version of the kiln that converts.
    pub artifact_version: u32,
    /// For an entry holding weights in a backend's own layout (see
    /// [`crate::prepared`]): that layout's name and version, the source
    /// being the model file those weights were read from. `None` for a
    /// prepared model; left out of the hashed JSON then, so the keys of
    /// prepared models are what they were before layouts were cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    /// For a prepared model whose weight matrices are kept only in a
    /// backend's layout (see [`crate::prepared`]): that layout's name.
    /// The entry then holds `model.gguf` without those matrices and
    /// `weights.layout` with them. `None` (left out of the hashed JSON) for
    /// a prepared model that is one whole GGUF file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<String>,
}

impl KeyParts {
    /// The name of the entry's file: [`super::PREPARED_FILE`] for a prepared
    /// model, [`super::LAYOUT_FILE`] for weights in a backend's layout.
    pub fn file_name(&self) -> &'static str {
        match self.layout {
            Some(_) => super::LAYOUT_FILE,
            None => super::PREPARED_FILE,
        }
    }

    /// 32 hex digits of SHA-256 over the parts.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = sha2::Sha256::digest(&json);
        crate::transfer::hex(&digest[..16])
    }

    /// The identity as JSON text (what a prepared file's metadata records).
    pub fn identity_json(&self) -> String {
        serde_json::to_string(&self.identity).unwrap_or_default()
    }
}

/// The source name and content identity of a downloaded model: its URL (and
/// endpoint, when not the store's default) and the manifest's files with
/// their sizes and ETags, which the store changes whenever the content does.
pub fn remote_identity(manifest: &Manifest) -> (String, Vec<FileRecord>) {
    let source = if manifest.endpoint.is_empty() {
        manifest.url.clone()
    } else {
        format!("{} at {}", manifest.url, manifest.endpoint)
    };
    let mut files = manifest.files.clone();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    (source, files)
}

/// The source name and content identity of a local model (a file, or a
/// directory's regular, non-hidden files): its canonical path, and each
/// file's size and modification time (nanoseconds) in place of an ETag.
///
/// Size and mtime rather than a hash: hashing a 25 GB checkpoint takes
/// minutes at every start, which is what the cache exists to avoid, while
/// any tool that rewrites a file (a copy, a download, a conversion) gives it
/// a new mtime. A file changed in place with its old mtime restored is the
/// one change this misses; `kiln cache rm` clears such an entry.
pub fn local_identity(path: &Path) -> std::io::Result<(String, Vec<FileRecord>)> {
    let path = std::fs::canonicalize(path)?;
    let record = |p: &Path, name: String| -> std::io::Result<FileRecord> {
        let meta = std::fs::metadata(p)?;
        let mtime = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(FileRecord {
            name,
            size: meta.len(),
            etag: Some(format!(
                "mtime:{}.{:09}",
                mtime.as_secs(),
                mtime.subsec_nanos()
            )),
        })
    };
    let mut files = Vec::new();
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push(record(&path, name)?);
    } else {
        for e in std::fs::read_dir(&path)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.file_type()?.is_file() {
                continue;
            }
            files.push(record(&e.path(), name)?);
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok((path.display().to_string(), files))
}
