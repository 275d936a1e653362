//! Adaptive speculation: a sequence whose guesses keep missing stops being
//! guessed for, for a while, so that it costs what it costs without
//! speculation.
//!
//! A guess the model rejects is not free: it is an extra row of the step
//! (and, for a draft model, a step of the draft). Where guessing cannot
//! help (output that does not copy from its prompt under n-gram lookup, a
//! draft that disagrees with the target) those rows only slow the sequence
//! down; vLLM and llama.cpp likewise skip proposals that cannot help. Each
//! sequence keeps a running acceptance rate (accepted over proposed guesses,
//! weighted towards recent drafts); when it falls below [`MIN_RATE`] the
//! sequence gets no guesses for a pause of steps, which doubles each time
//! the rate falls again (up to [`MAX_PAUSE`]) and starts over once drafts
//! are accepted again. Which steps carry guesses never changes the output:
//! every token is still the one the model chooses (see [`super`]).

use std::collections::HashMap;

/// Acceptance rate below which a sequence pauses its guesses.
pub const MIN_RATE: f32 = 0.3;
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
    /// Whether sequence `id` gets guesses in this step; called once per
    /// step it decodes in (a paused sequence counts its pause down).
    pub fn allow(&mut self, id: u64) -> bool {
        let g = self.seqs.entry(id).or_default();
        if g.skip > 0 {
            g.skip -= 1;
            return false;
        }
        true
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
