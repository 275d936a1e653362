//! Speculative decoding: guess several tokens cheaply, let one step of the
//! model check them all, keep the longest run the model agrees with.
//!
//! A [`Proposer`] guesses up to `k` tokens that follow a sequence (the n-gram
//! prompt lookup in [`ngram`], a smaller draft model in [`draft`]). The
//! scheduler appends the guesses to the sequence's decode step, which then
//! computes the last real token and every guess at once and asks for a
//! logits row at each of them (`StepInput::logit_rows`). The engine chooses
//! the next token from the first row exactly as it would without
//! speculation; while the chosen token equals the guess at that position,
//! the next row (computed with the guess in the context, which is then the
//! true context) gives the token after it, and so on. So a step yields
//! between one and `k + 1` tokens, and every one of them is the token the
//! model would have produced one step at a time: with greedy decoding the
//! output is the same token for token, alone or in any batch (the CPU
//! backend computes each row independently of the others). The keys and
//! values of rejected guesses stay in their slots until the true tokens
//! overwrite them; only accepted tokens count as computed, so only blocks
//! of accepted tokens reach the prefix cache.
//!
//! Sampled requests use the same rule, which for proposals made without
//! randomness (n-gram lookup, a greedy draft) *is* the standard
//! rejection-sampling rule (Leviathan et al. 2023, Chen et al. 2023): see
//! [`verify`]. The output distribution is the model's exactly, and a seeded
//! request draws the same random numbers as without speculation.

pub mod adaptive;
pub mod config;
pub mod draft;
pub mod metrics;
pub mod ngram;
pub mod profile;
pub mod verify;

pub use config::{SpecConfig, SpecMethod};
pub use metrics::{SpecMetrics, SpecSnapshot};
pub use ngram::NgramProposer;

/// One sequence a proposer is asked to guess for.
#[derive(Debug, Clone, Copy)]
pub struct ProposalRequest<'a> {
    /// The engine's id of the sequence (stable while it lives).
    pub id: u64,
    /// Prompt and output so far; the guesses continue it.
    pub tokens: &'a [u32],
    /// Most tokens to guess (at least 1).
    pub k: usize,
}

/// Something that guesses the tokens a sequence continues with. The model
/// checks every guess, so a proposer may be wrong at no cost but the step's
/// extra rows; it must only be deterministic for seeded runs to repeat.
/// EAGLE-style heads would be another implementation.
pub trait Proposer: Send {
    /// Up to `r.k` guessed tokens for each request, in order (an empty list
    /// where it has none).
    fn propose(&mut self, batch: &[ProposalRequest<'_>]) -> Vec<Vec<u32>>;

    /// Sequence `id` has finished or was preempted: drop what is kept for it.
    fn release(&mut self, _id: u64) {}

    /// A short name for logs and metrics (`ngram`, `draft_model`).
    fn name(&self) -> &'static str;
}

/// The engine's proposer and how many tokens it guesses per step.
pub(crate) struct Speculator {
    pub proposer: Box<dyn Proposer>,
    /// Guesses per step and sequence.
    pub k: usize,
    /// Pauses of the sequences whose guesses keep missing.
    pub backoff: adaptive::Backoff,
}

impl Speculator {
    /// The proposer a configuration names, if any; a draft model comes
    /// loaded already (`draft`).
    pub fn from_config(
        cfg: Option<&SpecConfig>,
        draft: Option<Box<dyn Proposer>>,
    ) -> Result<Option<Self>, String> {
        let Some(cfg) = cfg else {
            return match draft {
                Some(_) => Err("a draft model was given without a speculative setting".into()),
                None => Ok(None),
            };
        };
        cfg.validate()?;
        let proposer: Box<dyn Proposer> = match (&cfg.method, draft) {
            (SpecMethod::Ngram { min, max }, None) => Box::new(NgramProposer::new(*min, *max)),
            (SpecMethod::DraftModel { .. }, Some(d)) => d,
            (SpecMethod::DraftModel { model }, None) => {
                return Err(format!(
                "the draft model {model} must be loaded with the target (Engine::start_with_draft)"
            ))
            }
            (SpecMethod::Ngram { .. }, Some(_)) => {
                return Err("a draft model was given for the ngram method".into())
            }
        };
        Ok(Some(Self {
            proposer,
            k: cfg.num_speculative_tokens,
            backoff: adaptive::Backoff::default(),
        }))
    }

    /// The proposer's name.
    pub fn name(&self) -> &'static str {
        self.proposer.name()
    }

    /// Sequence `id` has finished or was preempted.
    pub fn release(&mut self, id: u64) {
        self.proposer.release(id);
        self.backoff.release(id);
    }
}

#[cfg(test)]
mod tests {
    use crate::block_manager::BlockManager;
    use crate::scheduler::{RowUse, Scheduler, SchedulerConfig, SeqKv};

    fn sched(blocks: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_running: 8,
                max_step_tokens: budget,
            },
            BlockManager::new(blocks, 4),
        )
    }

    /// A draft rides along with its sequence's decode token: its tokens at
    /// the next positions, a row for each, the context grown by it; only
    /// accepted guesses count as computed, and only the blocks they fill
    /// are hashed for the prefix cache.
    #[test]
    fn drafts_join_the_decode_step_and_only_accepted_guesses_are_kept() {
        let mut s = sched(8, 100);
        s.add(SeqKv::new(1, vec![10, 11, 12]));
        let plan = s.schedule();
        s.commit(&plan);
        s.append(1, 13); // 4 tokens, 3 computed
        assert_eq!(s.decode_ready(), vec![1]);
        s.set_draft(1, vec![14, 15, 16]);
        let plan = s.schedule();
        let (input, uses) = s.step_input(&plan);
        assert_eq!(input.tokens, vec![13, 14, 15, 16]);
        assert_eq!(input.positions, vec![3, 4, 5, 6]);
        assert_eq!(input.seqs[0].query_len, 4);
        assert_eq!(input.seqs[0].context_len, 7);
        assert_eq!(input.logit_rows, vec![0, 1, 2, 3]);
        assert_eq!(
            uses,
            vec![
                RowUse::Sample(1),
                RowUse::Draft(1, 0),
                RowUse::Draft(1, 1),
                RowUse::Draft(1, 2)
            ]
        );
        assert_eq!(s.get(1).unwrap().blocks.len(), 2, "room for the guesses");
        s.commit(&plan);
        assert_eq!(s.get(1).unwrap().computed, 4);
        // The model agreed with 14, then chose 20 instead of 15.
        assert_eq!(s.take_draft(1), vec![14, 15, 16]);
        s.append(1, 14);
        s.append(1, 20);
        s.accept_draft(1, 1);
        let seq = s.get(1).unwrap();
        assert_eq!((seq.computed, seq.tokens.len()), (5, 6));
        assert_eq!(
            seq.hashes.len(),
            1,
            "block 0 (10 11 12 13) is full and hashed"
        );
        // Next step: one token again, no draft left over.
        let plan = s.schedule();
        let (input, _) = s.step_input(&plan);
        assert_eq!(input.tokens, vec![20]);
        assert_eq!(input.positions, vec![5]);
    }

    /// The step budget and the free blocks cut a draft; a draft never
    /// preempts anything.
    #[test]
    fn drafts_are_cut_to_the_budget_and_the_free_blocks() {
        let mut s = sched(2, 3);
        s.add(SeqKv::new(1, vec![1, 2, 3]));
        let plan = s.schedule();
        s.commit(&plan);
        s.append(1, 4);
        s.set_draft(1, vec![5, 6, 7, 8, 9]);
        // Budget 3: the decode token and 2 guesses.
        let plan = s.schedule();
        let (input, _) = s.step_input(&plan);
        assert_eq!(input.tokens, vec![4, 5, 6]);
        s.commit(&plan);
        s.take_draft(1);
        // Both guesses accepted, then the model's own next token, 7.
        s.append(1, 5);
        s.append(1, 6);
        s.append(1, 7);
        s.accept_draft(1, 2);
        assert_eq!(s.get(1).unwrap().computed, 6);
        // 7 tokens, 6 computed, 2 blocks of 4 in all: one guess fits.
        s.set_draft(1, vec![8, 9, 10]);
        let plan = s.schedule();
        let (input, _) = s.step_input(&plan);
        assert_eq!(input.tokens, vec![7, 8]);
        assert!(plan.preempted.is_empty());
    }
}
