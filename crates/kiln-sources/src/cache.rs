//! The download cache: one entry per source, published whole or not at all.
//!
//! Layout under the download directory (`SERVING_DOWNLOAD_DIR`, as in DJL,
//! else kiln's cache `$KILN_CACHE`, default `~/.cache/kiln`):
//!
//! ```text
//! download/<key>/            a complete entry: the files and .kiln-source.json
//! download/<key>.partial/    an entry being downloaded (resumed from)
//! download/<key>.lock        the entry's lock (an advisory file lock)
//! ```
//!
//! `<key>` is a hash of the source URL and the endpoint it is fetched from.
//! An entry directory only comes into being by renaming a `.partial`
//! directory whose every file was verified and whose manifest was written, so
//! a directory named `<key>` is always whole. A present entry is used as it
//! is, without asking the store again (as DJL does): pin `option.revision`
//! to a commit, or remove the entry, to pick up a changed model.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::patience::Patience;
use crate::progress::Progress;
use crate::transfer::{self, Remote, RemoteFile};
use crate::{hub, s3, select, Fetched, Source, SourceError};

/// The manifest of a complete entry.
pub const MANIFEST_FILE: &str = ".kiln-source.json";
/// A manifest larger than this is not one of ours.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Where downloaded models are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadDir {
    root: PathBuf,
}

/// One downloaded file: its content identity for later caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path inside the entry.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's ETag (S3) or blob id / LFS sha256 (Hub).
    pub etag: Option<String>,
}

/// What a complete entry holds and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The source URL.
    pub url: String,
    /// The endpoint it was fetched from (empty: the store's default).
    pub endpoint: String,
    /// The Hub commit the files come from (Hub sources only).
    pub commit: Option<String>,
    /// The files, by name.
    pub files: Vec<FileRecord>,
}

impl DownloadDir {
    /// A download directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DownloadDir { root: root.into() }
    }

    /// `SERVING_DOWNLOAD_DIR`, else `$KILN_CACHE`, else
    /// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let root = if let Some(d) = var("SERVING_DOWNLOAD_DIR") {
            PathBuf::from(d)
        } else if let Some(d) = var("KILN_CACHE") {
            PathBuf::from(d)
        } else if let Some(d) = var("XDG_CACHE_HOME") {
            PathBuf::from(d).join("kiln")
        } else {
            PathBuf::from(var("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache")
                .join("kiln")
        };
        DownloadDir::new(root)
    }

    /// The download directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `source`'s complete entry is (or will be).
    pub fn entry(&self, source: &Source) -> PathBuf {
        self.root.join("download").join(key(source))
    }

    /// The manifest of `source`'s entry, when the entry is complete.
    pub fn complete(&self, source: &Source) -> Option<Manifest> {
        read_complete(&self.entry(source))
    }
}

fn endpoint(source: &Source) -> String {
    match source {
        Source::S3 { .. } => s3::endpoint(),
        Source::Hub { .. } => hub::endpoint(),
    }
}

/// 32 hex digits of SHA-256 over the URL and the endpoint.
fn key(source: &Source) -> String {
    let mut h = sha2::Sha256::new();
    h.update(source.url().as_bytes());
    h.update(b"\n");
    h.update(endpoint(source).as_bytes());
    let digest = h.finalize();
    transfer::hex(&digest[..16])
}

/// The entry's manifest when it is complete: readable, and every file there
/// with its size.
fn read_complete(entry: &Path) -> Option<Manifest> {
    let mut bytes = Vec::new();
    File::open(entry.join(MANIFEST_FILE))
        .ok()?
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
    let whole = manifest.files.iter().all(|f| {
        std::fs::metadata(entry.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.size)
    });
    whole.then_some(manifest)
}

fn fetched(entry: PathBuf, manifest: Manifest) -> Fetched {
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    let ggufs: Vec<&&str> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
    let model_path = match ggufs.as_slice() {
        [one] if !names.contains(&"config.json") => entry.join(one),
        _ => entry.clone(),
    };
    Fetched {
        dir: entry,
        model_path,
        manifest,
    }
}

/// See [`crate::fetch`].
pub(crate) fn fetch(source: &Source, dir: &DownloadDir) -> Result<Fetched, SourceError> {
    let url = source.url();
    let patience = Patience::from_env()?;
    let entry = dir.entry(source);
    if let Some(m) = read_complete(&entry) {
        tracing::info!("{url}: using the cached copy in {}", entry.display());
        return Ok(fetched(entry, m));
    }
    let downloads = dir.root.join("download");
    std::fs::create_dir_all(&downloads).map_err(|e| SourceError::cache(&url, &downloads, e))?;
    let lock_path = entry.with_extension("lock");
    let _lock = crate::lock::exclusive(&lock_path, || {
        tracing::info!(
            "{url}: another kiln process is downloading it; waiting for its lock {}",
            lock_path.display()
        )
    })
    .map_err(|e| SourceError::cache(&url, &lock_path, e))?;
    // Whoever held the lock may have finished it.
    if let Some(m) = read_complete(&entry) {
        tracing::info!(
            "{url}: downloaded by another process into {}",
            entry.display()
        );
        return Ok(fetched(entry, m));
    }
    let partial = entry.with_extension("partial");
    std::fs::create_dir_all(&partial).map_err(|e| SourceError::cache(&url, &partial, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(transfer::PARALLEL_FILES)
        .thread_name("kiln-download")
        .enable_all()
        .build()
        .map_err(|e| SourceError::cache(&url, &partial, e))?;
    let manifest = runtime.block_on(download(source, &url, &partial, &patience))?;
    drop(runtime);
    publish(&url, &partial, &entry, &manifest)?;
    tracing::info!("{url}: cached in {}", entry.display());
    Ok(fetched(entry, manifest))
}

/// Lists the source, picks the model's files and downloads them into `partial`.
async fn download(
    source: &Source,
    url: &str,
    partial: &Path,
    patience: &Patience,
) -> Result<Manifest, SourceError> {
    let (remote, listed, commit) = match source {
        Source::S3 { bucket, prefix } => {
            let r = s3::S3Remote::connect(url, bucket, prefix, patience)?;
            let listed = r.list(url, patience).await?;
            (Remote::S3(r), listed, None)
        }
        Source::Hub { repo, revision } => {
            let mut r = hub::HubRemote::connect(url, repo)?;
            let revision = revision.as_deref().unwrap_or("main");
            let (commit, listed) = r.list(url, revision, patience).await?;
            (Remote::Hub(Box::new(r)), listed, Some(commit))
        }
    };
    let names: Vec<String> = listed.iter().map(|f| f.name.clone()).collect();
    let wanted = select::model_files(&names).ok_or_else(|| SourceError::NoModelFiles {
        url: url.to_string(),
        found: found(&names),
    })?;
    let files: Vec<RemoteFile> = listed
        .into_iter()
        .filter(|f| wanted.contains(&f.name))
        .collect();
    let total = files.iter().map(|f| f.size).sum();
    tracing::info!(
        "{url}: downloading {} files ({:.1} MiB) into {}",
        files.len(),
        total as f64 / (1 << 20) as f64,
        partial.display()
    );
    let progress = Progress::new(url, total);
    let logger = progress.spawn_logger();
    let to = transfer::Target {
        dir: partial,
        progress: &progress,
        patience: *patience,
    };
    let result = transfer::download_all(url, &remote, &files, &to).await;
    if let Some(l) = logger {
        l.abort();
    }
    result?;
    progress.finish();
    Ok(Manifest {
        url: url.to_string(),
        endpoint: endpoint(source),
        commit,
        files: files
            .into_iter()
            .map(|f| FileRecord {
                name: f.name,
                size: f.size,
                etag: f.etag,
            })
            .collect(),
    })
}

fn found(names: &[String]) -> String {
    match names.len() {
        0 => "nothing is listed under it".to_string(),
        n => {
            let some: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            let more = if n > 8 { ", …" } else { "" };
            format!(
                "{n} objects, none of them weights: {}{more}",
                some.join(", ")
            )
        }
    }
}

/// Writes the manifest into `partial`, removes the sidecars and renames it to
/// `entry`.
fn publish(
    url: &str,
    partial: &Path,
    entry: &Path,
    manifest: &Manifest,
) -> Result<(), SourceError> {
    let cache_err = |p: &Path, e| SourceError::cache(url, p, e);
    for p in transfer::sidecars(partial) {
        transfer::remove_if_exists(&p).map_err(|e| cache_err(&p, e))?;
    }
    let path = partial.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(manifest).unwrap_or_default();
    std::fs::write(&path, json).map_err(|e| cache_err(&path, e))?;
    File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| cache_err(&path, e))?;
    if entry.exists() {
        // An entry without a valid manifest (a hand-edited one, say) is replaced.
        std::fs::remove_dir_all(entry).map_err(|e| cache_err(entry, e))?;
    }
    std::fs::rename(partial, entry).map_err(|e| cache_err(entry, e))?;
    if let Some(parent) = entry.parent() {
        // Make the rename durable; a failure here loses nothing.
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_url_and_are_stable() {
        let a = Source::s3("s3://bucket/a").unwrap();
        let b = Source::s3("s3://bucket/b").unwrap();
        let dir = DownloadDir::new("/cache");
        assert_ne!(dir.entry(&a), dir.entry(&b));
        assert_eq!(
            dir.entry(&a),
            dir.entry(&Source::s3("s3://bucket/a/").unwrap())
        );
        assert!(dir.entry(&a).starts_with("/cache/download"));
    }

    #[test]
    fn an_entry_is_complete_only_with_a_manifest_and_every_file_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let entry = tmp.path().join("e");
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("config.json"), b"{}").unwrap();
        assert!(read_complete(&entry).is_none(), "no manifest");
        let manifest = Manifest {
            url: "s3://b/p".into(),
            endpoint: String::new(),
            commit: None,
            files: vec![FileRecord {
                name: "config.json".into(),
                size: 3,
                etag: None,
            }],
        };
        std::fs::write(
            entry.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        assert!(
            read_complete(&entry).is_none(),
            "config.json is 2 bytes, not 3"
        );
        std::fs::write(entry.join("config.json"), b"{ }").unwrap();
        assert_eq!(read_complete(&entry), Some(manifest));
    }

    #[test]
    fn a_single_gguf_without_config_is_the_model_path() {
        let m = |names: &[&str]| Manifest {
            url: String::new(),
            endpoint: String::new(),
            commit: None,
            files: names
                .iter()
                .map(|n| FileRecord {
                    name: n.to_string(),
                    size: 0,
                    etag: None,
                })
                .collect(),
        };
        let e = PathBuf::from("/c/e");
        assert_eq!(
            fetched(e.clone(), m(&["m.gguf"])).model_path,
            e.join("m.gguf")
        );
        assert_eq!(
            fetched(e.clone(), m(&["m.gguf", "config.json"])).model_path,
            e
        );
        assert_eq!(fetched(e.clone(), m(&["model.safetensors"])).model_path, e);
    }
}
