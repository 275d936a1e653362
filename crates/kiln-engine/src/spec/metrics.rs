//! Counters of speculative decoding, in vLLM's terms: drafts (a step that
//! checked at least one guess of a sequence), draft tokens (guesses
//! checked), accepted tokens, and accepted tokens by position in the draft.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use super::config::MAX_SPECULATIVE_TOKENS;

/// The engine's speculative decoding counters (all zero without speculation).
#[derive(Debug, Default)]
pub struct SpecMetrics {
    /// The proposer's name and guesses per step, set once at start.
    setting: OnceLock<(&'static str, usize)>,
    drafts: AtomicU64,
    draft_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    /// Accepted guesses at each position of a draft (0 = the first guess).
    accepted_per_pos: [AtomicU64; MAX_SPECULATIVE_TOKENS],
}

/// A point-in-time copy of [`SpecMetrics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecSnapshot {
    /// The proposer's name (`ngram`, `draft_model`), `None` without speculation.
    pub method: Option<&'static str>,
    /// Guesses per step and sequence (0 without speculation).
    pub num_speculative_tokens: usize,
    pub num_drafts: u64,
    pub num_draft_tokens: u64,
    pub num_accepted_tokens: u64,
    /// Accepted guesses by position, `num_speculative_tokens` long.
    pub accepted_per_pos: Vec<u64>,
}

impl SpecSnapshot {
    /// Accepted guesses over checked guesses (0 before any).
    pub fn acceptance_rate(&self) -> f64 {
        if self.num_draft_tokens == 0 {
            0.0
        } else {
            self.num_accepted_tokens as f64 / self.num_draft_tokens as f64
        }
    }
}

impl SpecMetrics {
    /// Records one checked draft of `proposed` guesses of which the first
    /// `accepted` were kept.
    pub fn record(&self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.drafts.fetch_add(1, Relaxed);
        self.draft_tokens.fetch_add(proposed as u64, Relaxed);
        self.accepted_tokens.fetch_add(accepted as u64, Relaxed);
        for c in self.accepted_per_pos.iter().take(accepted) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Names the engine's proposer and its guesses per step.
    pub fn configure(&self, method: &'static str, k: usize) {
        let _ = self.setting.set((method, k.min(MAX_SPECULATIVE_TOKENS)));
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> SpecSnapshot {
        let (method, k) = match self.setting.get() {
            Some(&(m, k)) => (Some(m), k),
            None => (None, 0),
        };
        SpecSnapshot {
            method,
            num_speculative_tokens: k,
            num_drafts: self.drafts.load(Relaxed),
            num_draft_tokens: self.draft_tokens.load(Relaxed),
            num_accepted_tokens: self.accepted_tokens.load(Relaxed),
            accepted_per_pos: self
                .accepted_per_pos
                .iter()
                .take(k)
                .map(|c| c.load(Relaxed))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_position() {
        let m = SpecMetrics::default();
        m.record(3, 2);
        m.record(3, 0);
        m.record(0, 0);
        m.record(2, 2);
        assert_eq!(m.snapshot().method, None);
        m.configure("ngram", 3);
        let s = m.snapshot();
        assert_eq!(s.method, Some("ngram"));
        assert_eq!(s.num_drafts, 3);
        assert_eq!(s.num_draft_tokens, 8);
        assert_eq!(s.num_accepted_tokens, 4);
        assert_eq!(s.accepted_per_pos, vec![2, 2, 0]);
        assert!((s.acceptance_rate() - 0.5).abs() < 1e-12);
    }
}
