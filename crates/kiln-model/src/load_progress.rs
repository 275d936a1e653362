//! Progress of a load that converts or rearranges weights (a first start):
//! the bytes of the checkpoint read so far, the rate and the time left,
//! logged through `tracing` every [`LOG_EVERY`] from a thread of its own (so
//! a line comes even while one large matrix is converted), and a bar on a
//! terminal.
//!
//! It exists because a first start of a large model takes minutes, and a
//! server log that says nothing for minutes looks like a hang.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_backend::WeightData;

use crate::weights::WeightSource;
use crate::{HostTensor, Result};

/// How often a progress line is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

struct Shared {
    what: String,
    total: u64,
    done: AtomicU64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Shared {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 && self.total > done {
            format!("about {:.0} s left", (self.total - done) as f64 / rate)
        } else {
            "finishing".to_string()
        };
        format!(
            "{}: {:.2} of {:.2} GB read ({:.0}%) in {secs:.0} s, {:.0} MB/s, {left}",
            self.what,
            done as f64 / 1e9,
            self.total as f64 / 1e9,
            100.0 * done as f64 / self.total.max(1) as f64,
            rate / 1e6,
        )
    }
}

/// A load's progress, logged until it is dropped.
pub struct LoadProgress {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl LoadProgress {
    /// Progress of `what` (a sentence's subject: "converting /path") over
    /// `total` bytes of checkpoint, logged every `every`.
    pub fn start(what: String, total: u64, every: Duration) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.clone());
            bar
        });
        let shared = Arc::new(Shared {
            what,
            total,
            done: AtomicU64::new(0),
            start: Instant::now(),
            bar,
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let me = shared.clone();
        let ticker = std::thread::Builder::new()
            .name("kiln-load-progress".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    tracing::info!("{}", me.line());
                }
            })
            .ok();
        LoadProgress {
            shared,
            stop: Some(stop),
            ticker,
        }
    }

    /// Counts `n` more bytes of the checkpoint read.
    pub fn add(&self, n: u64) {
        self.shared.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.shared.bar {
            bar.inc(n);
        }
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// The progress line as it would be logged now.
    pub fn line(&self) -> String {
        self.shared.line()
    }
}

impl Drop for LoadProgress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        if let Some(bar) = &self.shared.bar {
            bar.finish_and_clear();
        }
    }
}

/// The bytes of the checkpoint at `path` (a GGUF file, or a directory's
/// weight files): the total a load's progress counts towards.
pub fn checkpoint_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    let Ok(dir) = std::fs::read_dir(path) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            [".safetensors", ".bin", ".pt", ".pth", ".gguf"]
                .iter()
                .any(|ext| name.ends_with(ext))
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A weight source that counts the bytes of every tensor read from it.
pub(crate) struct Counted<'a> {
    pub inner: &'a dyn WeightSource,
    pub progress: &'a LoadProgress,
}

impl WeightSource for Counted<'_> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        let t = self.inner.get(name)?;
        self.progress.add(4 * t.data.len() as u64);
        Ok(t)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let (shape, data) = self.inner.get_weight(name)?;
        self.progress.add(match &data {
            WeightData::F32(v) => 4 * v.len() as u64,
            WeightData::Ggml { bytes, .. } => bytes.len() as u64,
        });
        Ok((shape, data))
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_bytes_rate_and_time_left() {
        let p = LoadProgress::start("converting m".into(), 4_000_000_000, LOG_EVERY);
        p.add(1_000_000_000);
        let line = p.line();
        assert!(
            line.starts_with("converting m: 1.00 of 4.00 GB read (25%) in "),
            "{line}"
        );
        assert!(line.contains(" MB/s, about "), "{line}");
        assert!(line.ends_with(" s left"), "{line}");
        p.add(3_000_000_000);
        assert!(p.line().ends_with("finishing"), "{}", p.line());
        assert_eq!(p.done(), 4_000_000_000);
    }

    #[test]
    fn the_ticker_stops_when_dropped() {
        let t0 = Instant::now();
        drop(LoadProgress::start(
            "x".into(),
            1,
            Duration::from_secs(3600),
        ));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
