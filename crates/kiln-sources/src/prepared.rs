//! The prepared-model cache: converted models, each written once as a GGUF
//! file and mapped by every later start that asks for the same conversion of
//! the same source; and weight matrices in a backend's own layout (the CPU
//! backend's interleaved groups), written once per model file and layout
//! and mapped by later starts instead of rearranging every matrix again.
//!
//! Layout, beside the download cache (`<download dir>/prepared/`, the
//! download directory being `SERVING_DOWNLOAD_DIR`, else `$KILN_CACHE`):
//!
//! ```text
//! prepared/<key>/model.gguf            the prepared model
//! prepared/<key>/weights.layout        or: weights in a backend's layout
//!                                      or both (a packed prepared model)
//! prepared/<key>/.kiln-prepared.json   its record; its mtime is the last use
//! prepared/<key>.partial/              an entry being written
//! prepared/<key>.lock                  the entry's lock
//! ```
//!
//! Both kinds of entry are the same to the cache (keys, locks, eviction);
//! [`KeyParts::layout`] tells them apart.
//!
//! A model converted for a backend that rearranges its matrices (the CPU
//! backend) is a *packed* entry ([`KeyParts::packed`]): `weights.layout`
//! holds every matrix the backend rearranged, in its layout, and
//! `model.gguf` holds the rest (metadata, tokenizer, norms, biases, the
//! embedding table) and lists the matrices it leaves to the layout file,
//! so the disk holds each weight once. Its record gives both files' sizes
//! ([`Record::layout_size`]), checked at every lookup like the model's.
//! A packed `model.gguf` does not load alone: `kiln prepare` writes a whole
//! one instead.
//!
//! `<key>` hashes the [`KeyParts`]: the source's name and content identity
//! (for a download, the manifest's file names, sizes and ETags; for a local
//! model, each file's size and modification time, see [`local_identity`]),
//! the conversion settings and kiln's artifact version. An entry appears by
//! renaming a complete `.partial` directory, so a directory named `<key>`
//! whose record is readable is whole unless something cut it afterwards, and
//! such an entry is removed and reported when it is next looked up. Building
//! an entry holds its lock exclusively (a second process waits, then maps the
//! first one's file); using one holds it shared for as long as the process
//! runs, so eviction by another process (or this one) passes over it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{lock, DownloadDir};

mod key;
pub use key::{local_identity, remote_identity, KeyParts};

/// The prepared model inside an entry.
pub const PREPARED_FILE: &str = "model.gguf";
/// The weights in a backend's layout inside an entry of that kind.
pub const LAYOUT_FILE: &str = "weights.layout";
/// An entry's record.
pub const RECORD_FILE: &str = ".kiln-prepared.json";
/// A record larger than this is not one of ours.
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// Shared locks on the entries this process uses, by lock file, held until
/// it exits.
static IN_USE: Mutex<BTreeMap<PathBuf, File>> = Mutex::new(BTreeMap::new());

/// An entry's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The entry's key.
    pub key: String,
    /// What the key hashes.
    pub parts: KeyParts,
    /// The size of `model.gguf`.
    pub size: u64,
    /// The size of `weights.layout` in a packed entry ([`KeyParts::packed`]);
    /// `None` in every other kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_size: Option<u64>,
    /// When it was written (Unix seconds).
    pub created: u64,
}

impl Record {
    /// Bytes the entry's files take (both files of a packed entry).
    pub fn total_size(&self) -> u64 {
        self.size + self.layout_size.unwrap_or(0)
    }
}

/// A complete entry.
#[derive(Debug, Clone)]
pub struct PreparedEntry {
    /// The entry's directory.
    pub dir: PathBuf,
    /// Its record.
    pub record: Record,
    /// When a kiln process last used it.
    pub last_used: SystemTime,
}

impl PreparedEntry {
    /// The entry's key.
    pub fn key(&self) -> &str {
        &self.record.key
    }

    /// The entry's file: the prepared model, or the weights in a layout.
    pub fn file(&self) -> PathBuf {
        self.dir.join(self.record.parts.file_name())
    }

    /// A packed entry's `weights.layout` (see [`KeyParts::packed`]).
    pub fn packed_file(&self) -> Option<PathBuf> {
        self.record
            .parts
            .packed
            .as_ref()
            .map(|_| self.dir.join(LAYOUT_FILE))
    }
}

/// Why the prepared-model cache could not do something.
#[derive(Debug, thiserror::Error)]
pub enum PreparedError {
    /// Reading or writing the cache failed.
    #[error("prepared-model cache {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An entry's file is not what its record says; the entry was removed.
    #[error("{}: {msg}; the entry was removed from the prepared-model cache, the next start prepares it again", file.display())]
    Corrupt {
        /// The prepared file.
        file: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The entry is mapped by a running kiln process.
    #[error("prepared model {key} is in use by a running kiln process; stop it first")]
    InUse {
        /// The entry's key.
        key: String,
    },
    /// No entry has that key.
    #[error("no prepared model {key} in {}", root.display())]
    NotFound {
        /// The key asked for.
        key: String,
        /// The cache's directory.
        root: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PreparedError + '_ {
    move |source| PreparedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`PreparedCache::begin`] found.
pub enum Begin {
    /// The entry is complete: map its file.
    Ready(PreparedEntry),
    /// It is this process's to write: write [`Builder::file`], then
    /// [`Builder::commit`].
    Build(Builder),
}

/// An entry being written, under its exclusive lock. Dropped without
/// [`commit`](Builder::commit), it removes what was written.
pub struct Builder {
    parts: KeyParts,
    key: String,
    partial: PathBuf,
    entry: PathBuf,
    lock: Option<File>,
}

impl Builder {
    /// The entry's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where to write the entry's file (the prepared model, or the weights
    /// in a layout).
    pub fn file(&self) -> PathBuf {
        self.partial.join(self.parts.file_name())
    }

    /// Where to write a packed entry's `weights.layout` (see
    /// [`KeyParts::packed`]).
    pub fn packed_file(&self) -> Option<PathBuf> {
        self.parts
            .packed
            .as_ref()
            .map(|_| self.partial.join(LAYOUT_FILE))
    }

    /// Records the written file, publishes the entry (it is in use by this
    /// process from now on) and evicts least recently used entries beyond
    /// `cache`'s bound.
    pub fn commit(mut self, cache: &PreparedCache) -> Result<PreparedEntry, PreparedError> {
        let file = self.file();
        let size = std::fs::metadata(&file).map_err(io_err(&file))?.len();
        let layout_size = match self.packed_file() {
            Some(p) => Some(std::fs::metadata(&p).map_err(io_err(&p))?.len()),
            None => None,
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let record = Record {
            key: self.key.clone(),
            parts: self.parts.clone(),
            size,
            layout_size,
            created,
        };
        let path = self.partial.join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        std::fs::write(&path, json).map_err(io_err(&path))?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
        if self.entry.exists() {
            // A directory without a valid record (a hand-edited one) is replaced.
            std::fs::remove_dir_all(&self.entry).map_err(io_err(&self.entry))?;
        }
        std::fs::rename(&self.partial, &self.entry).map_err(io_err(&self.entry))?;
        if let Some(parent) = self.entry.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        if let Some(lock) = self.lock.take() {
            // From building it to using it: others may map it now.
            lock.lock_shared().map_err(io_err(&self.entry))?;
            keep(self.entry.with_extension("lock"), lock);
        }
        let entry = cache
            .read_entry(&self.key)?
            .ok_or_else(|| PreparedError::Corrupt {
                file: file.clone(),
                msg: "vanished as it was published".into(),
            })?;
        cache.evict()?;
        Ok(entry)
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// Keeps `lock` (on `path`) for the process's life; one per entry.
fn keep(path: PathBuf, lock: File) {
    if let Ok(mut held) = IN_USE.lock() {
        held.entry(path).or_insert(lock);
    }
}

/// Drops this process's lock on `path`, if it keeps one: an entry it no
/// longer uses (a lock of its own would keep it from rebuilding the entry,
/// as two handles' locks exclude each other even in one process).
fn release(path: &Path) {
    if let Ok(mut held) = IN_USE.lock() {
        held.remove(path);
    }
}

/// The prepared-model cache of one download directory.
#[derive(Debug, Clone)]
pub struct PreparedCache {
    root: PathBuf,
    max_bytes: Option<u64>,
}

impl PreparedCache {
    /// The cache under `download`'s root, holding at most `max_bytes` of
    /// prepared files (`None`: unbounded).
    pub fn new(download: &DownloadDir, max_bytes: Option<u64>) -> Self {
        PreparedCache {
            root: download.root().join("prepared"),
            max_bytes,
        }
    }

    /// The directory holding the entries.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.lock"))
    }

    /// The complete entry `key`, if there is one. An entry whose file is
    /// missing or not the size its record gives is removed and reported.
    fn read_entry(&self, key: &str) -> Result<Option<PreparedEntry>, PreparedError> {
        let dir = self.dir(key);
        let record_path = dir.join(RECORD_FILE);
        let Some(record) = read_record(&record_path) else {
            return Ok(None);
        };
        if record.key != key {
            return Ok(None);
        }
        let file = dir.join(record.parts.file_name());
        let size = std::fs::metadata(&file).map(|m| m.len());
        if size.as_ref().ok() != Some(&record.size) {
            let msg = match size {
                Ok(n) => format!(
                    "is {n} bytes where its record says {}: truncated or overwritten",
                    record.size
                ),
                Err(e) => format!("cannot be read ({e})"),
            };
            let _ = std::fs::remove_dir_all(&dir);
            return Err(PreparedError::Corrupt { file, msg });
        }
        if record.parts.packed.is_some() {
            let file = dir.join(LAYOUT_FILE);
            let size = std::fs::metadata(&file).map(|m| m.len());
            if size.as_ref().ok() != record.layout_size.as_ref() {
                let msg = match size {
                    Ok(n) => format!(
                        "is {n} bytes where its record says {:?}: truncated or overwritten",
                        record.layout_size
                    ),
                    Err(e) => format!("cannot be read ({e})"),
                };
                let _ = std::fs::remove_dir_all(&dir);
                return Err(PreparedError::Corrupt { file, msg });
            }
        }
        let last_used = std::fs::metadata(&record_path)
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH);
        Ok(Some(PreparedEntry {
            dir,
            record,
            last_used,
        }))
    }

    /// The complete entry for `parts`, marked used; or, when there is none,
    /// the exclusive right to write it (waiting while another process writes
    /// it, and then using that one's).
    pub fn begin(&self, parts: &KeyParts) -> Result<Begin, PreparedError> {
        let key = parts.key();
        std::fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        if let Some(e) = self.use_entry(&key)? {
            return Ok(Begin::Ready(e));
        }
        let lock_path = self.lock_path(&key);
        let lock = lock::exclusive(&lock_path, || {
            tracing::info!(
                "prepared model {key}: another kiln process is preparing it; waiting for {}",
                lock_path.display()
            )
        })
        .map_err(io_err(&lock_path))?;
        if let Some(e) = self.read_entry(&key)? {
            lock.lock_shared().map_err(io_err(&lock_path))?;
            keep(lock_path, lock);
            touch(&e);
            return Ok(Begin::Ready(e));
        }
        self.builder(parts, key, lock).map(Begin::Build)
    }

    /// The right to write entry `parts` again after this process found it
    /// corrupt and [`discard`](Self::discard)ed it, when no other process
    /// uses or writes it now; `None` when one does (the caller goes on
    /// without the cache rather than wait for that process to exit).
    pub fn try_rebuild(&self, parts: &KeyParts) -> Result<Option<Builder>, PreparedError> {
        let key = parts.key();
        let lock_path = self.lock_path(&key);
        release(&lock_path);
        let Some(lock) = lock::try_exclusive(&lock_path).map_err(io_err(&lock_path))? else {
            return Ok(None);
        };
        self.discard(&key)?;
        self.builder(parts, key, lock).map(Some)
    }

    /// A fresh `.partial` directory for entry `key`, whose exclusive `lock`
    /// the caller holds.
    fn builder(&self, parts: &KeyParts, key: String, lock: File) -> Result<Builder, PreparedError> {
        let entry = self.dir(&key);
        let partial = entry.with_extension("partial");
        if partial.exists() {
            // Left by a killed process; conversions start over.
            std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        Ok(Builder {
            parts: parts.clone(),
            key,
            partial,
            entry,
            lock: Some(lock),
        })
    }

    /// The complete entry `key` under a shared lock kept for the process's
    /// life, with its last use set to now.
    fn use_entry(&self, key: &str) -> Result<Option<PreparedEntry>, PreparedError> {
        if self.read_entry(key)?.is_none() {
            return Ok(None);
        }
        let lock_path = self.lock_path(key);
        let lock = lock::shared(&lock_path).map_err(io_err(&lock_path))?;
        // An eviction may have removed it while we waited.
        let Some(e) = self.read_entry(key)? else {
            return Ok(None);
        };
        keep(lock_path, lock);
        touch(&e);
        Ok(Some(e))
    }

    /// Removes entry `key` whatever its state (its file was found corrupt),
    /// and lets go of this process's use of it.
    pub fn discard(&self, key: &str) -> Result<(), PreparedError> {
        release(&self.lock_path(key));
        let dir = self.dir(key);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// The complete entries, least recently used first.
    pub fn list(&self) -> Vec<PreparedEntry> {
        let mut out: Vec<PreparedEntry> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir() && e.path().extension().is_none())
                    .filter_map(|e| {
                        let key = e.file_name().to_string_lossy().into_owned();
                        self.read_entry(&key).ok().flatten()
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|e| e.last_used);
        out
    }

    /// Bytes of prepared files in the cache.
    pub fn total_bytes(&self) -> u64 {
        self.list().iter().map(|e| e.record.total_size()).sum()
    }

    /// Removes entry `key`, unless a running kiln process uses it.
    pub fn remove(&self, key: &str) -> Result<(), PreparedError> {
        let valid = key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit());
        let dir = self.dir(key);
        if !valid || !dir.is_dir() {
            return Err(PreparedError::NotFound {
                key: key.to_string(),
                root: self.root.clone(),
            });
        }
        let lock_path = self.lock_path(key);
        let Some(_lock) = lock::try_exclusive(&lock_path).map_err(io_err(&lock_path))? else {
            return Err(PreparedError::InUse {
                key: key.to_string(),
            });
        };
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Removes every entry not in use; returns the keys removed and those
    /// kept because a running process uses them.
    pub fn remove_all(&self) -> Result<(Vec<String>, Vec<String>), PreparedError> {
        let (mut removed, mut in_use) = (Vec::new(), Vec::new());
        for e in self.list() {
            let key = e.key().to_string();
            match self.remove(&key) {
                Ok(()) => removed.push(key),
                Err(PreparedError::InUse { .. }) => in_use.push(key),
                Err(other) => return Err(other),
            }
        }
        Ok((removed, in_use))
    }

    /// While the prepared files take more than the bound, removes the least
    /// recently used entry that no running process uses. Returns the keys
    /// removed.
    pub fn evict(&self) -> Result<Vec<String>, PreparedError> {
        let Some(max) = self.max_bytes else {
            return Ok(Vec::new());
        };
        let entries = self.list();
        let mut total: u64 = entries.iter().map(|e| e.record.total_size()).sum();
        let mut evicted = Vec::new();
        for e in entries {
            if total <= max {
                break;
            }
            match self.remove(e.key()) {
                Ok(()) => {
                    tracing::info!(
                        "prepared model {}: evicted ({} bytes; the cache holds {total} of at most {max})",
                        e.key(),
                        e.record.total_size()
                    );
                    total -= e.record.total_size();
                    evicted.push(e.key().to_string());
                }
                Err(PreparedError::InUse { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        if total > max {
            tracing::warn!(
                "the prepared-model cache holds {total} bytes, more than its bound of {max}: \
                 the rest is in use"
            );
        }
        Ok(evicted)
    }
}

fn read_record(path: &Path) -> Option<Record> {
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_RECORD_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Sets an entry's last use to now (its record's mtime).
fn touch(e: &PreparedEntry) {
    let path = e.dir.join(RECORD_FILE);
    if let Ok(f) = File::options().write(true).open(&path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests;
