//! Uploading files (a prepared model) to an `s3://` prefix, so that every
//! later start downloads them through the download cache instead of
//! converting.
//!
//! Files up to one part ([`PART_BYTES`]) go up in one request (their ETag
//! is then their MD5, which downloads verify); larger ones as multipart
//! uploads, [`PARALLEL_PARTS`] at a time, read from disk a part
//! at a time, so memory stays near `PARALLEL_PARTS` parts whatever the size.

use std::io::Read;
use std::path::{Path, PathBuf};

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

use crate::s3::{describe, S3Remote};
use crate::{Source, SourceError};

/// Size of one part of a multipart upload (S3 allows 5 MiB to 5 GiB),
/// unless `KILN_UPLOAD_PART_MIB` sets another (at least 5).
pub const PART_BYTES: usize = 64 << 20;
/// Parts in flight at once.
const PARALLEL_PARTS: usize = 4;

/// Uploads `files` (name under the prefix, local path) to `url`
/// (`s3://bucket/prefix`), replacing objects of the same names. Returns the
/// bytes uploaded. Blocking: runs its own small async runtime.
pub fn upload_files(url: &str, files: &[(String, PathBuf)]) -> Result<u64, SourceError> {
    let Source::S3 { bucket, prefix } = Source::s3(url)? else {
        return Err(SourceError::InvalidUrl {
            url: url.to_string(),
            reason: "is not an s3:// URL".into(),
        });
    };
    if let Some((name, _)) = files
        .iter()
        .find(|(n, _)| n.is_empty() || n.contains('/') || n.starts_with('.'))
    {
        return Err(SourceError::InvalidUrl {
            url: url.to_string(),
            reason: format!("'{name}' is not a plain file name to upload"),
        });
    }
    let remote = S3Remote::connect(
        url,
        &bucket,
        &prefix,
        &crate::patience::Patience::from_env()?,
    )?;
    let part = part_bytes();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-upload")
        .enable_all()
        .build()
        .map_err(|e| SourceError::remote(url, "starting the upload", e))?;
    runtime.block_on(async {
        let mut total = 0;
        for (name, path) in files {
            total += upload_file(&remote, url, name, path, part).await?;
        }
        Ok(total)
    })
}

async fn upload_file(
    remote: &S3Remote,
    url: &str,
    name: &str,
    path: &Path,
    part: usize,
) -> Result<u64, SourceError> {
    let key = if remote.prefix.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", remote.prefix)
    };
    let location = StorePath::from(key.as_str());
    let what = format!("uploading {name}");
    let local = |e| SourceError::cache(url, path, e);
    let mut file = std::fs::File::open(path).map_err(local)?;
    let size = file.metadata().map_err(local)?.len();
    tracing::info!("{url}: uploading {name} ({size} bytes)");
    if size <= part as u64 {
        let mut bytes = Vec::with_capacity(size as usize);
        (&mut file)
            .take(part as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(local)?;
        remote
            .store
            .put(&location, PutPayload::from(bytes))
            .await
            .map_err(|e| SourceError::remote(url, &what, describe(&e)))?;
        return Ok(size);
    }
    let upload = remote
        .store
        .put_multipart(&location)
        .await
        .map_err(|e| SourceError::remote(url, &what, describe(&e)))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
    let mut buf = vec![0u8; part];
    let mut sent = 0u64;
    let result: Result<(), SourceError> = async {
        loop {
            let n = read_full(&mut file, &mut buf).map_err(local)?;
            if n == 0 {
                break;
            }
            writer
                .wait_for_capacity(PARALLEL_PARTS)
                .await
                .map_err(|e| SourceError::remote(url, &what, describe(&e)))?;
            writer.write(&buf[..n]);
            sent += n as u64;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer
        .finish()
        .await
        .map_err(|e| SourceError::remote(url, &what, describe(&e)))?;
    tracing::info!(
        "{url}: uploaded {name} in {} parts of {} MiB",
        size.div_ceil(part as u64),
        part >> 20
    );
    if sent != size {
        return Err(SourceError::remote(
            url,
            &what,
            format!("the file changed while it was uploaded ({sent} of {size} bytes sent)"),
        ));
    }
    Ok(size)
}

/// The multipart part size: [`PART_BYTES`], or `KILN_UPLOAD_PART_MIB`.
fn part_bytes() -> usize {
    std::env::var("KILN_UPLOAD_PART_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(PART_BYTES, |mib| mib.clamp(5, 4096) << 20)
}

/// Fills `buf` from `r` unless the end comes first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
