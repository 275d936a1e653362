//! Naming a remote model: an `s3://` prefix or a Hugging Face Hub id.

use std::fmt;

use crate::SourceError;

/// A model that lives somewhere else and must be downloaded before loading.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// Every model file directly under `s3://bucket/prefix`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix, without leading or trailing `/` (empty: the
        /// bucket's top level).
        prefix: String,
    },
    /// A Hugging Face Hub model repository.
    Hub {
        /// `org/name` or `name`.
        repo: String,
        /// A branch, tag or commit (`option.revision`); `main` when `None`.
        revision: Option<String>,
    },
}

impl Source {
    /// Parses `s3://bucket[/prefix]`.
    pub fn s3(url: &str) -> Result<Source, SourceError> {
        let invalid = |reason: &str| SourceError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !bucket_ok {
            return Err(invalid(
                "the bucket name must be 3-63 characters of a-z, 0-9, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == "." || s == "..") || prefix.contains("//") {
            return Err(invalid(
                "the prefix must not contain '.', '..' or empty segments",
            ));
        }
        Ok(Source::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// A Hub model `repo` (`org/name`) at `revision`.
    pub fn hub(repo: &str, revision: Option<&str>) -> Result<Source, SourceError> {
        let repo = repo.trim();
        if !looks_like_hub_id(repo) {
            return Err(SourceError::InvalidUrl {
                url: repo.to_string(),
                reason: "is not a Hugging Face model id (org/name)".to_string(),
            });
        }
        let revision = revision.map(str::trim).filter(|r| !r.is_empty());
        if let Some(r) = revision {
            if r.len() > 256 || r.contains("..") || r.chars().any(|c| c.is_control() || c == ' ') {
                return Err(SourceError::InvalidUrl {
                    url: repo.to_string(),
                    reason: format!("revision '{r}' is not a branch, tag or commit name"),
                });
            }
        }
        Ok(Source::Hub {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// A remote model named by URL: `s3://bucket/prefix` or
    /// `hf://org/name[@revision]` (the form [`Source::url`] prints); `None`
    /// for anything else, which is a local path to the caller.
    pub fn parse(value: &str) -> Option<Result<Source, SourceError>> {
        let value = value.trim();
        if value.starts_with("s3://") {
            return Some(Source::s3(value));
        }
        let rest = value.strip_prefix("hf://")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (rest, None),
        };
        Some(Source::hub(repo, revision).map_err(|e| match e {
            SourceError::InvalidUrl { reason, .. } => SourceError::InvalidUrl {
                url: value.to_string(),
                reason,
            },
            other => other,
        }))
    }

    /// How errors and logs name the source: `s3://bucket/prefix`, or
    /// `hf://org/name` with `@revision` when one was given.
    pub fn url(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Source::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Source::Hub {
                repo,
                revision: None,
            } => write!(f, "hf://{repo}"),
            Source::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "hf://{repo}@{r}"),
        }
    }
}

/// Whether `value` has the shape of a Hub model id: `name` or `org/name`,
/// each part 1-96 characters of letters, digits, `_`, `.` and `-`, not
/// starting or ending with `.` or `-`, without `..` or `--`.
pub fn looks_like_hub_id(value: &str) -> bool {
    let parts: Vec<&str> = value.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|part| {
            !part.is_empty()
                && part.len() <= 96
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && !part.starts_with(['.', '-'])
                && !part.ends_with(['.', '-'])
                && !part.contains("..")
                && !part.contains("--")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_split_into_bucket_and_prefix() {
        let s = Source::s3("s3://models/opt-13b/").unwrap();
        assert_eq!(
            s,
            Source::S3 {
                bucket: "models".into(),
                prefix: "opt-13b".into()
            }
        );
        assert_eq!(s.url(), "s3://models/opt-13b");
        let top = Source::s3("s3://models").unwrap();
        assert_eq!(top.url(), "s3://models");
    }

    #[test]
    fn bad_s3_urls_are_refused_naming_the_url() {
        for bad in [
            "s3://",
            "s3://UPPER/x",
            "s3://ab/x",
            "s3://b-ok/../etc",
            "s3://bkt/a//b",
        ] {
            let e = Source::s3(bad).unwrap_err().to_string();
            assert!(e.starts_with(bad), "{e}");
        }
    }

    #[test]
    fn urls_round_trip_through_parse() {
        for url in ["s3://bucket/a/b", "hf://org/tiny", "hf://org/tiny@v1.0"] {
            let s = Source::parse(url).unwrap().unwrap();
            assert_eq!(s.url(), url);
        }
        assert!(Source::parse("models/tiny").is_none());
        assert!(Source::parse("/abs/path").is_none());
        let e = Source::parse("hf://a/b/c")
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("hf://a/b/c: "), "{e}");
    }

    #[test]
    fn hub_ids_and_revisions() {
        let s = Source::hub("org/tiny", Some("v1")).unwrap();
        assert_eq!(s.url(), "hf://org/tiny@v1");
        assert!(Source::hub("org/tiny/extra", None).is_err());
        assert!(Source::hub("org/tiny", Some("a b")).is_err());
        assert_eq!(Source::hub("gpt2", Some(" ")).unwrap().url(), "hf://gpt2");
    }
}
