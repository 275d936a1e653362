//! Hugging Face Hub models through `hf-hub`'s API: the endpoint
//! (`HF_ENDPOINT`), the token (`HF_TOKEN`, else the one `huggingface-cli
//! login` saved under `HF_HOME`), the repository listing and file URLs. The
//! revision asked for is pinned to the commit the listing names, so every
//! file comes from one commit; the bytes are fetched with range requests so
//! that a download resumes. The client tries nothing again itself: a
//! listing or file request that stalls, breaks or meets a 5xx or 429 is
//! transient ([`crate::patience`]), a refusal final.

use futures_util::TryStreamExt;
use hf_hub::api::tokio::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use crate::patience::{Failure, Patience};
use crate::transfer::{Check, Opened, RemoteFile};
use crate::SourceError;

/// A repository listing larger than this is refused.
const MAX_LISTING_BYTES: usize = 32 << 20;
/// Where the Hub is when `HF_ENDPOINT` is unset.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// One repository, pinned to a commit once listed.
pub(crate) struct HubRemote {
    api: Api,
    repo: String,
    pinned: Option<ApiRepo>,
}

/// The endpoint that keys the cache along with the id.
pub(crate) fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

#[derive(Deserialize)]
struct Listing {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl HubRemote {
    /// A client for `repo`, configured from the environment.
    pub(crate) fn connect(url: &str, repo: &str) -> Result<Self, SourceError> {
        let mut builder = ApiBuilder::from_env()
            .with_progress(false)
            .with_endpoint(endpoint());
        if let Some(token) = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|t| !t.trim().is_empty()))
        {
            builder = builder.with_token(Some(token.trim().to_string()));
        }
        let api = builder
            .build()
            .map_err(|e| SourceError::remote(url, "configuring the Hub client", e))?;
        Ok(HubRemote {
            api,
            repo: repo.to_string(),
            pinned: None,
        })
    }

    /// The files of `revision` (with sizes and LFS hashes); pins the commit.
    pub(crate) async fn list(
        &mut self,
        url: &str,
        revision: &str,
        patience: &Patience,
    ) -> Result<(String, Vec<RemoteFile>), SourceError> {
        let what = "listing the repository";
        let repo = self.api.repo(Repo::with_revision(
            self.repo.clone(),
            RepoType::Model,
            revision.to_string(),
        ));
        let body = patience
            .retried(url, what, || async {
                let resp = patience
                    .within(
                        "an answer",
                        repo.info_request().query(&[("blobs", "true")]).send(),
                    )
                    .await?
                    .map_err(|e| Failure::Transient(e.to_string()))?;
                let status = resp.status();
                if !status.is_success() {
                    let hint = match status.as_u16() {
                        401 | 403 => "; a private or gated model needs HF_TOKEN",
                        404 => "; no such model or revision",
                        _ => "",
                    };
                    return Err(by_status(status.as_u16(), format!("HTTP {status}{hint}")));
                }
                patience
                    .within("the listing", read_limited(resp, MAX_LISTING_BYTES))
                    .await?
            })
            .await?;
        let listing: Listing = serde_json::from_slice(&body)
            .map_err(|e| SourceError::remote(url, what, format!("unexpected answer: {e}")))?;
        let mut files = Vec::new();
        for s in listing.siblings {
            let size = s.lfs.as_ref().map(|l| l.size).or(s.size);
            let Some(size) = size else {
                // Without ?blobs=true sizes are missing; such a file cannot
                // be verified, so it is refused rather than trusted.
                return Err(SourceError::remote(
                    url,
                    what,
                    format!("the listing gives no size for {}", s.rfilename),
                ));
            };
            let check = match &s.lfs {
                Some(l) if l.sha256.len() == 64 => Check::Sha256(l.sha256.to_ascii_lowercase()),
                _ => Check::SizeOnly,
            };
            files.push(RemoteFile {
                name: s.rfilename,
                size,
                etag: s.lfs.map(|l| l.sha256).or(s.blob_id),
                check,
            });
        }
        if listing.sha.is_empty() || !listing.sha.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SourceError::remote(
                url,
                what,
                "the listing names no commit",
            ));
        }
        self.pinned = Some(self.api.repo(Repo::with_revision(
            self.repo.clone(),
            RepoType::Model,
            listing.sha.clone(),
        )));
        Ok((listing.sha, files))
    }

    /// The bytes of `file` from `offset`, at the pinned commit.
    pub(crate) async fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, Failure> {
        let repo = self
            .pinned
            .as_ref()
            .ok_or_else(|| Failure::Final("the repository was not listed first".into()))?;
        let mut req = self.api.client().get(repo.url(&file.name));
        if offset > 0 {
            req = req.header("range", format!("bytes={offset}-"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        let start = match resp.status().as_u16() {
            200 => 0,
            206 => offset,
            s => return Err(by_status(s, format!("HTTP {s}"))),
        };
        let stream = Box::pin(
            resp.bytes_stream()
                .map_err(|e| Failure::Transient(e.to_string())),
        );
        // The Hub's listing already gave the LFS sha256; other files have a
        // git blob id, which is not a hash of the bytes alone.
        Ok(Opened {
            start,
            stream,
            check: None,
        })
    }
}

/// A failure from an HTTP status: the server's troubles (5xx) and 429 may
/// pass, the others will not.
fn by_status(status: u16, message: String) -> Failure {
    if status >= 500 || status == 429 {
        Failure::Transient(message)
    } else {
        Failure::Final(message)
    }
}

/// A response body of at most `limit` bytes.
async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Failure> {
    let too_big = || Failure::Final(format!("the answer is over {limit} bytes"));
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| Failure::Transient(e.to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
