//! How long kiln waits on a store, and how often it tries again.
//!
//! A store that accepts a connection and then never answers (or stops
//! sending half way through a file) would otherwise hold a download, and the
//! model waiting on it, for ever: every request to a store and every wait
//! for the next bytes of a file is bounded by `KILN_DOWNLOAD_TIMEOUT`
//! (seconds, default 60), and a request or transfer that stalled or broke is
//! tried again up to `KILN_DOWNLOAD_RETRIES` times (default 3), resuming a
//! file from what arrived, before the download fails naming the URL.
//! Refusals (denied, not found) are not tried again.

use std::future::Future;
use std::time::Duration;

use crate::SourceError;

/// Seconds a store may take to answer a request or to send more of a file.
pub const TIMEOUT_VAR: &str = "KILN_DOWNLOAD_TIMEOUT";
/// Further tries of a request or transfer that stalled or broke.
pub const RETRIES_VAR: &str = "KILN_DOWNLOAD_RETRIES";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_RETRIES: u32 = 3;
/// The first wait before trying again; it doubles with each try.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Why one try of a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Worth trying again: no answer in time, a broken connection, a 5xx.
    Transient(String),
    /// Another try would fail the same way (denied, not found, malformed),
    /// or the store's own client has already tried again.
    Final(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transient(m) | Failure::Final(m) => f.write_str(m),
        }
    }
}

/// The timeout and the number of further tries (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patience {
    pub timeout: Duration,
    pub retries: u32,
}

impl Default for Patience {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
        }
    }
}

impl Patience {
    /// The settings of the environment; a malformed one is an error.
    pub(crate) fn from_env() -> Result<Self, SourceError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, SourceError> {
        let mut p = Self::default();
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = set(TIMEOUT_VAR) {
            p.timeout = v
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| SourceError::Setting {
                    var: TIMEOUT_VAR,
                    value: v.clone(),
                    expected: "a positive number of seconds",
                })?;
        }
        if let Some(v) = set(RETRIES_VAR) {
            p.retries = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n <= 100)
                .ok_or_else(|| SourceError::Setting {
                    var: RETRIES_VAR,
                    value: v.clone(),
                    expected: "a whole number from 0 to 100",
                })?;
        }
        Ok(p)
    }

    /// The wait before further try `n` (from 1): doubling from a quarter
    /// of a second, at most 8 s.
    fn backoff(&self, n: u32) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(MAX_BACKOFF)
    }

    /// `fut`'s output, or a transient failure when it takes longer than the
    /// timeout (`what` it was waiting for, for the message).
    pub(crate) async fn within<T>(
        &self,
        what: &str,
        fut: impl Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            Failure::Transient(format!(
                "{what} did not come within {:?} ({TIMEOUT_VAR})",
                self.timeout
            ))
        })
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed
    /// transiently `1 + retries` times; failures become errors naming `url`
    /// and `what` was being done.
    pub(crate) async fn retried<T, F, Fut>(
        &self,
        url: &str,
        what: &str,
        mut attempt: F,
    ) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Final(m)) => return Err(SourceError::remote(url, what, m)),
                Err(Failure::Transient(m)) => {
                    tries += 1;
                    tokio::time::sleep(self.next_try(url, what, &m, tries, "")?).await;
                }
            }
        }
    }

    /// After transient failure number `tries` (from 1) of `what`: the
    /// error that gives up when no try is left, else the wait before the
    /// next one, logged (`how` says how it is tried, e.g. " from what
    /// arrived").
    pub(crate) fn next_try(
        &self,
        url: &str,
        what: &str,
        message: &str,
        tries: u32,
        how: &str,
    ) -> Result<Duration, SourceError> {
        if tries > self.retries {
            let message = match tries {
                1 => format!("{message} (tried once; {RETRIES_VAR}=0)"),
                n => format!("{message} (tried {n} times; see {RETRIES_VAR})"),
            };
            return Err(SourceError::remote(url, what, message));
        }
        let wait = self.backoff(tries);
        tracing::warn!(
            "{url}: {what}: {message}; trying again{how} in {wait:?} ({tries} of {RETRIES_VAR}={})",
            self.retries
        );
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_environment_and_bad_ones_are_named() {
        let vars = |t: &'static str, r: &'static str| {
            move |k: &str| match k {
                TIMEOUT_VAR => Some(t.to_string()),
                RETRIES_VAR => Some(r.to_string()),
                _ => None,
            }
        };
        assert_eq!(Patience::from_vars(|_| None).unwrap(), Patience::default());
        let p = Patience::from_vars(vars("0.5", "0")).unwrap();
        assert_eq!((p.timeout, p.retries), (Duration::from_millis(500), 0));
        for (t, r, bad) in [
            ("0", "1", TIMEOUT_VAR),
            ("x", "1", TIMEOUT_VAR),
            ("1", "-1", RETRIES_VAR),
        ] {
            let e = Patience::from_vars(vars(t, r)).unwrap_err().to_string();
            assert!(e.starts_with(bad), "{e}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = Patience::default();
        assert_eq!(p.backoff(1), Duration::from_millis(250));
        assert_eq!(p.backoff(3), Duration::from_secs(1));
        assert_eq!(p.backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn transient_failures_are_tried_again_and_final_ones_are_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = Patience {
            timeout: Duration::from_millis(20),
            retries: 2,
        };
        let tries = std::cell::Cell::new(0);
        let r: Result<(), _> = rt.block_on(p.retried("s3://b/m", "listing", || {
            tries.set(tries.get() + 1);
            p.within("an answer", std::future::pending())
        }));
        let e = r.unwrap_err().to_string();
        assert_eq!(tries.get(), 3);
        assert!(
            e.starts_with("s3://b/m: listing: an answer did not come within 20ms"),
            "{e}"
        );
        assert!(e.contains("tried 3 times"), "{e}");
        tries.set(0);
        let r: Result<(), _> = rt.block_on(p.retried("s3://b/m", "listing", || {
            tries.set(tries.get() + 1);
            async { Err(Failure::Final("access denied".into())) }
        }));
        assert_eq!(tries.get(), 1);
        assert_eq!(
            r.unwrap_err().to_string(),
            "s3://b/m: listing: access denied"
        );
    }
}
