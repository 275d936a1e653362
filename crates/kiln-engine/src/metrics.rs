//! Counters and latency histograms the engine updates as it runs, readable
//! from any thread (the server exports them in Prometheus text).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at most `LATENCY_BUCKETS[i]` (not cumulative).
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    /// Observations above the last bucket.
    overflow: AtomicU64,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)` per bucket, Prometheus style.
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.overflow.fetch_add(1, Relaxed),
        };
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Cumulative bucket counts, sum and count.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(&b, c)| {
                acc += c.load(Relaxed);
                (b, acc)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
            count: self.count.load(Relaxed),
        }
    }
}

/// Everything the engine counts. Gauges are overwritten each step, counters only grow.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub(crate) waiting: AtomicU64,
    /// Preempted sequences back in the queue (they started once, so the
    /// live count of queued requests no longer includes them).
    pub(crate) preempted_waiting: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) kv_blocks_total: AtomicU64,
    pub(crate) kv_blocks_used: AtomicU64,
    pub(crate) prefix_queried_tokens: AtomicU64,
    pub(crate) prefix_hit_tokens: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generated_tokens: AtomicU64,
    pub(crate) requests_finished: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    pub(crate) steps: AtomicU64,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) inter_token_latency: Histogram,
    /// Speculative decoding's counters.
    pub(crate) spec: crate::spec::SpecMetrics,
}

/// A point-in-time copy of [`EngineMetrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests waiting to run: submitted and not yet started, plus preempted
    /// ones waiting to resume. [`crate::Engine::metrics`] counts the
    /// submitted ones live, so a request is waiting from the moment it is
    /// accepted, not from the engine's next step (routers that read this
    /// every 50 ms must see a burst at once).
    pub waiting: u64,
    /// Sequences in the running batch.
    pub running: u64,
    pub kv_blocks_total: u64,
    pub kv_blocks_used: u64,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Prompt tokens of admitted requests, and tokens generated.
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Requests finished (any reason), and of those, failed with an error.
    pub requests_finished: u64,
    pub requests_failed: u64,
    /// Times a running sequence was evicted to make room (and later recomputed).
    pub preemptions: u64,
    /// Forward steps run.
    pub steps: u64,
    pub time_to_first_token: HistogramSnapshot,
    pub inter_token_latency: HistogramSnapshot,
    /// Speculative decoding: guesses checked and accepted.
    pub speculative: crate::spec::SpecSnapshot,
}

impl EngineMetrics {
    /// Copies every value.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Relaxed);
        MetricsSnapshot {
            waiting: g(&self.waiting),
            running: g(&self.running),
            kv_blocks_total: g(&self.kv_blocks_total),
            kv_blocks_used: g(&self.kv_blocks_used),
            prefix_queried_tokens: g(&self.prefix_queried_tokens),
            prefix_hit_tokens: g(&self.prefix_hit_tokens),
            prompt_tokens: g(&self.prompt_tokens),
            generated_tokens: g(&self.generated_tokens),
            requests_finished: g(&self.requests_finished),
            requests_failed: g(&self.requests_failed),
            preemptions: g(&self.preemptions),
            steps: g(&self.steps),
            time_to_first_token: self.time_to_first_token.snapshot(),
            inter_token_latency: self.inter_token_latency.snapshot(),
            speculative: self.spec.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[4], (0.025, 2));
        assert_eq!(s.buckets.last().unwrap().1, 2, "60 s is above every bucket");
        assert!((s.sum_seconds - 60.0205).abs() < 1e-9);
    }
}
