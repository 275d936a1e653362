//! Adaptive speculation depth: a sequence guesses as far ahead as its
//! guesses are likely to pay, and one whose guesses keep missing stops
//! being guessed for, for a while, so that it costs what it costs without
//! speculation.
//!
//! A guess the model rejects is not free: it is an extra row of the step
//! (and, for a draft model, a step of the draft). Where guessing cannot
//! help (output that does not copy from its prompt under n-gram lookup, a
//! draft that disagrees with the target) those rows only slow the sequence
//! down; vLLM and llama.cpp likewise skip proposals that cannot help. Each
//! sequence keeps a running acceptance rate `a` (accepted over proposed
//! guesses, weighted towards recent drafts). Guess `j` of a draft is kept
//! only if the `j - 1` before it were, about `a^j` of the time, and saves a
//! step when kept, while its row costs about [`MIN_RATE`] of a one-token
//! step whether kept or not (on 2 CPU cores a 5-row step of the default
//! model costs about 2.4 one-row steps: (2.4 - 1) / 4 = 0.35); so a draft
//! goes as deep as `a^j >= MIN_RATE` allows, up to `k`. When `a` falls
//! below [`MIN_RATE`] the sequence gets no guesses for a pause of steps,
//! which doubles each time the rate falls again (up to [`MAX_PAUSE`]) and
//! starts over once drafts are accepted again. How many guesses a step
//! carries never changes the output: every token is still the one the
//! model chooses (see [`super`]).

use std::collections::HashMap;

/// Acceptance rate below which a sequence pauses its guesses, and the
/// chance of being kept below which a deeper guess is not proposed (the
/// cost of a guess's row, as a fraction of a one-token step).
pub const MIN_RATE: f32 = 0.35;
/// Weight of the latest draft in the running rate.
const LATEST: f32 = 0.5;
/// The first pause, in steps.
pub const FIRST_PAUSE: u32 = 4;
/// The longest pause, in steps.
pub const MAX_PAUSE: u32 = 64;

/// One sequence's running rate and pause.
#[derive(Debug, Clone, Copy)]
struct Gate {
    rate: f32,
    /// Steps left without guesses.
    skip: u32,
    /// The next pause's length.
    pause: u32,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            rate: 1.0,
            skip: 0,
            pause: FIRST_PAUSE,
        }
    }
}

/// The pauses of every sequence being guessed for.
#[derive(Debug, Default)]
pub struct Backoff {
    seqs: HashMap<u64, Gate>,
}

impl Backoff {
    /// How many guesses (at most `k`) sequence `id` gets in this step: 0
    /// while it is paused, else the deepest `j` whose guess is kept often
    /// enough to pay for its row (`rate^j >= MIN_RATE`), at least 1. Called
    /// once per step the sequence decodes in (a pause counts down).
    pub fn depth(&mut self, id: u64, k: usize) -> usize {
        let g = self.seqs.entry(id).or_default();
        if g.skip > 0 {
            g.skip -= 1;
            return 0;
        }
        let mut j = 1;
        let mut kept = g.rate * g.rate;
        while j < k && kept >= MIN_RATE {
            j += 1;
            kept *= g.rate;
        }
        j.min(k)
    }

    /// Whether sequence `id` gets any guess in this step ([`Self::depth`] > 0).
    pub fn allow(&mut self, id: u64) -> bool {
        self.depth(id, 1) > 0
    }

    /// Sequence `id` had `proposed` guesses checked, of which `accepted` were kept.
    pub fn record(&mut self, id: u64, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        let g = self.seqs.entry(id).or_default();
        let latest = accepted.min(proposed) as f32 / proposed as f32;
        g.rate = LATEST * latest + (1.0 - LATEST) * g.rate;
        if g.rate < MIN_RATE {
            g.skip = g.pause;
            g.pause = (g.pause * 2).min(MAX_PAUSE);
            // After the pause one more poor draft pauses it again.
            g.rate = MIN_RATE;
        } else if g.rate >= 2.0 * MIN_RATE {
            g.pause = FIRST_PAUSE;
        }
    }

    /// Sequence `id` is gone.
    pub fn release(&mut self, id: u64) {
        self.seqs.remove(&id);
    }

    /// Steps sequence `id` has left without guesses.
    pub fn paused_for(&self, id: u64) -> u32 {
        self.seqs.get(&id).map_or(0, |g| g.skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth follows the rate: all k guesses while they are all kept,
    /// fewer as the rate falls, one just above MIN_RATE.
    #[test]
    fn depth_follows_the_acceptance_rate() {
        let mut b = Backoff::default();
        assert_eq!(b.depth(1, 4), 4, "a new sequence guesses k");
        assert_eq!(b.depth(1, 0), 0);
        b.record(1, 4, 4);
        assert_eq!(b.depth(1, 4), 4, "rate 1");
        // Rate 0.5 * 0.5 + 0.5 = 0.75: 0.75^4 = 0.32 < MIN_RATE <= 0.75^3.
        b.record(1, 4, 2);
        assert_eq!(b.depth(1, 4), 3);
        // Rate 0.375: at least MIN_RATE, but 0.375^2 = 0.14 is not.
        b.record(1, 3, 0);
        assert_eq!(b.depth(1, 4), 1);
        assert_eq!(b.paused_for(1), 0);
        // Below MIN_RATE: paused.
        b.record(1, 1, 0);
        assert_eq!(b.paused_for(1), FIRST_PAUSE);
        assert_eq!(b.depth(1, 4), 0);
    }

    /// Good drafts never pause; two misses in a row pause for FIRST_PAUSE
    /// steps, each further miss after a pause doubles it up to MAX_PAUSE,
    /// and accepted drafts bring the first pause back.
    #[test]
    fn misses_pause_guessing_with_doubling_pauses() {
        let mut b = Backoff::default();
        for _ in 0..20 {
            assert!(b.allow(1));
            b.record(1, 4, 3);
        }
        assert!(b.allow(1));
        b.record(1, 4, 0); // rate 0.5 * 0.75 + ... still above MIN_RATE
        assert_eq!(b.paused_for(1), 0);
        assert!(b.allow(1));
        b.record(1, 4, 0);
        assert_eq!(b.paused_for(1), FIRST_PAUSE);
        for _ in 0..FIRST_PAUSE {
            assert!(!b.allow(1));
        }
        // One more miss after the pause: twice as long.
        assert!(b.allow(1));
        b.record(1, 4, 0);
        assert_eq!(b.paused_for(1), 2 * FIRST_PAUSE);
        let mut pauses = vec![];
        for _ in 0..10 {
            while !b.allow(1) {}
            b.record(1, 4, 0);
            pauses.push(b.paused_for(1));
        }
        assert_eq!(pauses[0], 4 * FIRST_PAUSE);
        assert_eq!(*pauses.last().unwrap(), MAX_PAUSE);
        // Accepted drafts again: the next pause is the first one again.
        while !b.allow(1) {}
        b.record(1, 4, 4);
        b.record(1, 4, 4);
        b.record(1, 4, 0);
        b.record(1, 4, 0);
        assert_eq!(b.paused_for(1), FIRST_PAUSE);
        // Empty drafts (nothing proposed) change nothing; sequences are separate.
        b.record(2, 0, 0);
        assert!(b.allow(2));
        b.release(1);
        assert!(b.allow(1));
    }
}
