//! Download progress: a bar on a terminal, a log line every few seconds
//! otherwise (a server's log, CI).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a progress line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Bytes done out of a known total, shared by the parallel file downloads.
#[derive(Clone)]
pub(crate) struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    total: u64,
    done: AtomicU64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// Progress towards `total` bytes of `url`.
    pub(crate) fn new(url: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(url.to_string());
            bar
        });
        Progress {
            inner: Arc::new(Inner {
                url: url.to_string(),
                total,
                done: AtomicU64::new(0),
                start: Instant::now(),
                bar,
            }),
        }
    }

    /// Counts `n` more bytes (received, or found already on disk).
    pub(crate) fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.inner.bar {
            bar.inc(n);
        }
    }

    /// Takes back `n` bytes counted for a copy that was then discarded.
    pub(crate) fn sub(&self, n: u64) {
        self.inner.done.fetch_sub(n, Ordering::Relaxed);
        if let Some(bar) = &self.inner.bar {
            bar.set_position(self.inner.done.load(Ordering::Relaxed));
        }
    }

    /// Logs progress every few seconds until the returned task is aborted;
    /// nothing when a bar is shown.
    pub(crate) fn spawn_logger(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.inner.bar.is_some() {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.log_line();
            }
        }))
    }

    fn log_line(&self) {
        let i = &self.inner;
        let done = i.done.load(Ordering::Relaxed);
        let secs = i.start.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            "downloading {}: {:.1} of {:.1} MiB ({:.0}%), {:.1} MiB/s",
            i.url,
            mib(done),
            mib(i.total),
            100.0 * done as f64 / i.total.max(1) as f64,
            mib(done) / secs
        );
    }

    /// Ends the bar (if any) and logs the total.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
        let i = &self.inner;
        tracing::info!(
            "downloaded {} ({:.1} MiB) in {:.1?}",
            i.url,
            mib(i.total),
            i.start.elapsed()
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
