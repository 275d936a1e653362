//! `s3://bucket/prefix` through `object_store`: credentials, region and
//! endpoint from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`,
//! web identity, the container and instance metadata services), path-style
//! addressing unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`, so MinIO and
//! other S3-protocol stores work as they are.
//!
//! `object_store` tries failed requests and broken bodies again itself, but
//! a store that never answers holds a request until its client's timeout,
//! which cannot be short without cutting large bodies: so kiln bounds each
//! wait itself ([`crate::patience`]), and tries a stalled listing again.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, RetryConfig,
};

use crate::patience::{Failure, Patience};
use crate::transfer::{Check, Opened, RemoteFile};
use crate::SourceError;

/// More objects than this under one prefix is not a model directory.
const MAX_LISTED: usize = 100_000;

/// One bucket and prefix.
pub(crate) struct S3Remote {
    pub(crate) store: AmazonS3,
    pub(crate) prefix: String,
}

/// The endpoint that keys the cache along with the URL (the same bucket name
/// on two stores is two models).
pub(crate) fn endpoint() -> String {
    ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_default()
}

impl S3Remote {
    /// A client for `bucket`, configured from the environment.
    pub(crate) fn connect(
        url: &str,
        bucket: &str,
        prefix: &str,
        patience: &Patience,
    ) -> Result<Self, SourceError> {
        // A whole-request timeout would cut multi-gigabyte bodies; stalls are
        // caught by the waits `patience` bounds instead.
        let connect = patience.timeout.min(Duration::from_secs(10));
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "24h")
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", connect.as_millis().max(1)),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 5,
                retry_timeout: Duration::from_secs(120),
            })
            .build()
            .map_err(|e| SourceError::remote(url, "configuring the S3 client", e))?;
        Ok(S3Remote {
            store,
            prefix: prefix.to_string(),
        })
    }

    /// Everything directly under the prefix: (name, size, ETag); a listing
    /// that stalls is started again.
    pub(crate) async fn list(
        &self,
        url: &str,
        patience: &Patience,
    ) -> Result<Vec<RemoteFile>, SourceError> {
        patience
            .retried(url, "listing", || self.list_once(patience))
            .await
    }

    async fn list_once(&self, patience: &Patience) -> Result<Vec<RemoteFile>, Failure> {
        let prefix = (!self.prefix.is_empty()).then(|| StorePath::from(self.prefix.as_str()));
        let mut listing = self.store.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = patience.within("an answer", listing.next()).await? {
            let meta = meta.map_err(|e| Failure::Final(describe(&e)))?;
            if out.len() == MAX_LISTED {
                return Err(Failure::Final(format!(
                    "more than {MAX_LISTED} objects: not a model directory"
                )));
            }
            let key = meta.location.as_ref();
            let name = match &prefix {
                Some(p) => key
                    .strip_prefix(p.as_ref())
                    .and_then(|r| r.strip_prefix('/'))
                    .unwrap_or(key),
                None => key,
            };
            let check = md5_of_etag(meta.e_tag.as_deref()).map_or(Check::SizeOnly, Check::Md5);
            out.push(RemoteFile {
                name: name.to_string(),
                size: meta.size,
                etag: meta.e_tag.clone(),
                check,
            });
        }
        Ok(out)
    }

    /// The bytes of `file` from `offset`, of the version listed (`If-Match`).
    /// Errors are final: `object_store` has tried again already.
    pub(crate) async fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, Failure> {
        let key = if self.prefix.is_empty() {
            file.name.clone()
        } else {
            format!("{}/{}", self.prefix, file.name)
        };
        let opts = GetOptions {
            if_match: file.etag.clone(),
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&StorePath::from(key.as_str()), opts)
            .await
            .map_err(|e| Failure::Final(describe(&e)))?;
        let check = md5_of_etag(got.meta.e_tag.as_deref()).map(Check::Md5);
        let stream = got
            .into_stream()
            .map_err(|e| Failure::Final(describe(&e)))
            .boxed();
        Ok(Opened {
            start: offset,
            stream,
            check,
        })
    }
}

/// The hex MD5 in a single-part upload's ETag (`"<32 hex>"`); multipart
/// ETags (`"<hex>-N"`) and others are not a content hash.
fn md5_of_etag(etag: Option<&str>) -> Option<String> {
    let e = etag?.trim_matches('"');
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

/// An `object_store` error in words a user can act on. List and other
/// request failures arrive as `Generic` errors whose text carries the HTTP
/// status and S3's error code, so those are read from the text.
pub(crate) fn describe(e: &object_store::Error) -> String {
    let text = e.to_string();
    let has = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
    let hint = match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Some(ACCESS_DENIED),
        object_store::Error::Precondition { .. } => {
            Some("the object changed while it was being downloaded")
        }
        _ if has(&["NoSuchBucket"]) => Some("the bucket does not exist (not found)"),
        _ if has(&["NoSuchKey"]) => Some("the object does not exist (not found)"),
        object_store::Error::NotFound { .. } => Some("not found"),
        _ if has(&[
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403 Forbidden",
            "401 Unauthorized",
        ]) =>
        {
            Some(ACCESS_DENIED)
        }
        _ if has(&["404 Not Found"]) => Some("not found"),
        _ => None,
    };
    match hint {
        Some(h) => format!("{h} ({text})"),
        None => text,
    }
}

const ACCESS_DENIED: &str =
    "access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role kiln runs as)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_part_etags_are_md5() {
        assert_eq!(
            md5_of_etag(Some("\"0CC175B9C0F1B6A831C399E269772661\"")).as_deref(),
            Some("0cc175b9c0f1b6a831c399e269772661")
        );
        assert_eq!(
            md5_of_etag(Some("\"0cc175b9c0f1b6a831c399e269772661-3\"")),
            None
        );
        assert_eq!(md5_of_etag(None), None);
    }
}
