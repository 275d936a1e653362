//! Downloading one file into the entry being built: resumed from its
//! partial copy, hashed as it arrives, checked, then renamed into place.
//!
//! In `<key>.partial/`, a file `NAME` being downloaded is `NAME.part`, with
//! `NAME.kiln-meta.json` recording the size and ETag it was started against;
//! a partial copy whose record no longer matches the store is discarded.
//! `NAME` itself only ever appears by renaming a verified `NAME.part`.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use md5::Digest as _;
use serde::{Deserialize, Serialize};

use crate::patience::{Failure, Patience};
use crate::progress::Progress;
use crate::{hub, s3, SourceError};

/// Files downloaded at once.
pub(crate) const PARALLEL_FILES: usize = 4;

/// A file of a remote model, as its store lists it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteFile {
    /// Path relative to the model's root (no `/` today).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The store's ETag, quotes included (S3) or the Hub's blob id.
    pub etag: Option<String>,
    /// How its bytes can be checked.
    pub check: Check,
}

/// A checksum the store gives for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// Only the size can be checked.
    SizeOnly,
    /// MD5, lower-case hex (S3's ETag of a single-part upload).
    Md5(String),
    /// SHA-256, lower-case hex (the Hub's LFS files).
    Sha256(String),
}

/// A byte stream from a store; a failure says whether trying again (from
/// the bytes that arrived) may help.
pub(crate) type ByteStream =
    Pin<Box<dyn Stream<Item = Result<bytes::Bytes, Failure>> + Send + 'static>>;

/// The bytes of a file from `start` on; `start` is 0 when the store ignored
/// the range asked for.
pub(crate) struct Opened {
    pub start: u64,
    pub stream: ByteStream,
    /// A checksum the answer's headers give for the whole file, used when
    /// the listing gave none (stores whose listings omit ETags).
    pub check: Option<Check>,
}

/// A store that files can be read from.
pub(crate) enum Remote {
    S3(s3::S3Remote),
    Hub(Box<hub::HubRemote>),
}

impl Remote {
    async fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, Failure> {
        match self {
            Remote::S3(r) => r.open(file, offset).await,
            Remote::Hub(r) => r.open(file, offset).await,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct PartMeta {
    size: u64,
    etag: Option<String>,
}

/// Where files go and how long their store may keep them waiting.
pub(crate) struct Target<'a> {
    pub dir: &'a Path,
    pub progress: &'a Progress,
    pub patience: Patience,
}

/// Downloads `files` into `to.dir`, [`PARALLEL_FILES`] at a time; the first
/// failure stops the others (their partial copies stay, to resume from).
pub(crate) async fn download_all(
    url: &str,
    remote: &Remote,
    files: &[RemoteFile],
    to: &Target<'_>,
) -> Result<(), SourceError> {
    let mut results = futures_util::stream::iter(files)
        .map(|f| download_one(url, remote, f, to))
        .buffer_unordered(PARALLEL_FILES);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

async fn download_one(
    url: &str,
    remote: &Remote,
    file: &RemoteFile,
    to: &Target<'_>,
) -> Result<(), SourceError> {
    let (dir, progress, patience) = (to.dir, to.progress, to.patience);
    let dest = dir.join(&file.name);
    let part = dir.join(format!("{}.part", file.name));
    let meta_path = dir.join(format!("{}.kiln-meta.json", file.name));
    let cache_err = |p: &Path, e: std::io::Error| SourceError::cache(url, p, e);
    let want = PartMeta {
        size: file.size,
        etag: file.etag.clone(),
    };
    let same = read_meta(&meta_path).as_ref() == Some(&want);
    if same && file_len(&dest) == Some(file.size) {
        // Verified and renamed by an earlier run that did not finish the rest.
        progress.add(file.size);
        return Ok(());
    }
    if !same {
        remove_if_exists(&dest).map_err(|e| cache_err(&dest, e))?;
        remove_if_exists(&part).map_err(|e| cache_err(&part, e))?;
        let json = serde_json::to_vec(&want).unwrap_or_default();
        std::fs::write(&meta_path, json).map_err(|e| cache_err(&meta_path, e))?;
    }
    let resume_point = || file_len(&part).filter(|&n| n <= file.size).unwrap_or(0);
    let mut offset = resume_point();
    let mut restarted = false;
    let mut broken = 0;
    loop {
        let resumed = offset > 0;
        match fetch_into(url, remote, file, &part, offset, progress, &patience).await? {
            Fetch::Verified => {
                std::fs::rename(&part, &dest).map_err(|e| cache_err(&dest, e))?;
                return Ok(());
            }
            // A resumed copy that does not verify may have been started
            // against other bytes: once more from the start.
            Fetch::Mismatch(err) if resumed && !restarted => {
                tracing::warn!("{err}; downloading {} again from the start", file.name);
                restarted = true;
                offset = 0;
            }
            Fetch::Mismatch(err) => return Err(err),
            Fetch::Broken(failure) => {
                broken += 1;
                let what = format!("downloading {}", file.name);
                let wait = patience.next_try(url, &what, &failure, broken, " from what arrived")?;
                tokio::time::sleep(wait).await;
                offset = resume_point();
            }
        }
    }
}

enum Fetch {
    Verified,
    /// The bytes do not hash to the store's checksum (the copy is gone).
    Mismatch(SourceError),
    /// The store stopped answering or the transfer broke: worth another
    /// try from what is in the partial copy.
    Broken(String),
}

/// Appends the rest of `file` to `part` (from `offset`) and checks it.
async fn fetch_into(
    url: &str,
    remote: &Remote,
    file: &RemoteFile,
    part: &Path,
    offset: u64,
    progress: &Progress,
    patience: &Patience,
) -> Result<Fetch, SourceError> {
    let cache_err = |e: std::io::Error| SourceError::cache(url, part, e);
    let what = || format!("downloading {}", file.name);
    let opened = if offset < file.size {
        let answer = patience
            .within("the store's answer", remote.open(file, offset))
            .await
            .and_then(|r| r);
        match answer {
            Ok(o) => Some(o),
            Err(Failure::Transient(m)) => return Ok(Fetch::Broken(m)),
            Err(Failure::Final(m)) => return Err(SourceError::remote(url, what(), m)),
        }
    } else {
        None
    };
    // The store sent the whole file when it ignored the range: start over.
    let mut got = opened.as_ref().map_or(offset, |o| o.start);
    let check = match (&file.check, opened.as_ref().and_then(|o| o.check.clone())) {
        (Check::SizeOnly, Some(c)) => c,
        (c, _) => c.clone(),
    };
    let mut hasher = Hasher::new(&check);
    if got > 0 {
        tracing::info!(
            "{url}: resuming {} at byte {got} of {}",
            file.name,
            file.size
        );
        hash_prefix(part, got, &mut hasher).map_err(cache_err)?;
    }
    progress.add(got);
    // Plain blocking writes of each chunk as it arrives: short (the page
    // cache takes them), and whatever arrived is in the file when the
    // process is killed, to resume from.
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(cache_err)?;
    out.set_len(got).map_err(cache_err)?;
    if let Some(opened) = opened {
        use std::io::{Seek, Write};
        out.seek(std::io::SeekFrom::Start(got)).map_err(cache_err)?;
        let mut stream = opened.stream;
        loop {
            let next = patience
                .within("more of the file", stream.next())
                .await
                .and_then(|n| n.transpose());
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(Failure::Transient(m)) => {
                    // What arrived is in the file, to resume from (and
                    // to be counted again then).
                    out.sync_all().map_err(cache_err)?;
                    progress.sub(got);
                    return Ok(Fetch::Broken(format!("{m} (at byte {got})")));
                }
                Err(Failure::Final(m)) => {
                    return Err(SourceError::remote(
                        url,
                        what(),
                        format!("{m} (at byte {got})"),
                    ))
                }
            };
            got += chunk.len() as u64;
            if got > file.size {
                break;
            }
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(cache_err)?;
            progress.add(chunk.len() as u64);
        }
    }
    out.sync_all().map_err(cache_err)?;
    drop(out);
    if got != file.size {
        if got > file.size {
            remove_if_exists(part).map_err(cache_err)?;
        }
        return Err(SourceError::SizeMismatch {
            url: url.to_string(),
            file: file.name.clone(),
            expected: file.size,
            got,
        });
    }
    if let Some((kind, expected, actual)) = hasher.mismatch(&check) {
        remove_if_exists(part).map_err(cache_err)?;
        progress.sub(got);
        return Ok(Fetch::Mismatch(SourceError::ChecksumMismatch {
            url: url.to_string(),
            file: file.name.clone(),
            kind,
            expected,
            got: actual,
        }));
    }
    let how = match check {
        Check::SizeOnly => "size",
        Check::Md5(_) => "size and md5 (ETag)",
        Check::Sha256(_) => "size and sha256",
    };
    tracing::debug!("{url}: {} verified: {how}", file.name);
    Ok(Fetch::Verified)
}

/// Feeds the first `len` bytes of `path` to `hasher`.
fn hash_prefix(path: &Path, len: u64, hasher: &mut Hasher) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

enum Hasher {
    None,
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn new(check: &Check) -> Self {
        match check {
            Check::SizeOnly => Hasher::None,
            Check::Md5(_) => Hasher::Md5(md5::Md5::new()),
            Check::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::None => {}
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    /// `(kind, expected, actual)` when the digest differs from `check`.
    fn mismatch(self, check: &Check) -> Option<(&'static str, String, String)> {
        let (kind, expected, actual) = match (self, check) {
            (Hasher::Md5(h), Check::Md5(e)) => ("md5 (ETag)", e, hex(&h.finalize())),
            (Hasher::Sha256(h), Check::Sha256(e)) => ("sha256", e, hex(&h.finalize())),
            _ => return None,
        };
        (actual != *expected).then(|| (kind, expected.clone(), actual))
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_meta(path: &Path) -> Option<PartMeta> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Removes a file, and succeeds when there was none.
pub(crate) fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The sidecar files of `dir` that are not part of a finished entry.
pub(crate) fn sidecars(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".kiln-meta.json") || n.ends_with(".part"))
        })
        .collect()
}
