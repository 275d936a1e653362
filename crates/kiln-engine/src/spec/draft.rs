//! A draft model as proposer: a smaller model with the same tokenizer runs
//! greedily `k` tokens ahead of the target, over a KV cache of its own.
//!
//! Each sequence keeps the tokens whose keys and values the draft's cache
//! holds. Before guessing, they are compared with the sequence's tokens now:
//! the common prefix stays cached (guesses the target rejected fall out
//! here), the rest is computed in one step with the tokens the target
//! accepted, then `k - 1` one-token steps extend the guess. All sequences
//! share each of those steps. The model that drafts for itself guesses
//! exactly what it will choose (the CPU backend computes each row as it
//! would alone), so every guess of a greedy request is accepted.
//!
//! The decoder is held behind an [`Arc`]: a model drafting for itself
//! ([`crate::Engine::start_self_draft`]) shares the target's weights, loaded
//! once, and only the KV cache is the draft's own.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_backend::{Backend, KvSpec, SeqSlice, StepInput};
use kiln_model::decoder::Decoder;

use super::profile::{profile_requested, PhaseTimes};
use super::{ProposalRequest, Proposer};
use crate::block_manager::BlockManager;

/// One sequence's state in the draft's cache.
#[derive(Debug, Default)]
struct DraftSeq {
    /// Tokens whose keys and values are cached, in order.
    tokens: Vec<u32>,
    blocks: Vec<u32>,
}

/// A draft model guessing greedily.
pub struct DraftProposer<B: Backend> {
    backend: B,
    /// The draft's weights; the target's own when it drafts for itself.
    decoder: Arc<Decoder<B>>,
    kv: B::KvCache,
    blocks: BlockManager,
    seqs: HashMap<u64, DraftSeq>,
    /// Per-phase timings of the draft's steps (`KILN_STEP_PROFILE=1`).
    profile: PhaseTimes,
}

/// One sequence's part in a draft step.
struct Row {
    id: u64,
    /// Tokens to compute and their first position.
    tokens: Vec<u32>,
    start: usize,
}

impl<B: Backend> DraftProposer<B> {
    /// A proposer running `decoder` (a model of its own, or an `Arc` it
    /// shares with the target) on `backend` with a KV cache of `num_blocks`
    /// blocks of `block_size` tokens.
    pub fn new(
        backend: B,
        decoder: impl Into<Arc<Decoder<B>>>,
        num_blocks: usize,
        block_size: usize,
    ) -> crate::Result<Self> {
        let decoder = decoder.into();
        let c = decoder.config();
        let spec = KvSpec {
            n_layers: c.n_layers,
            num_blocks,
            block_size,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let kv = backend.alloc_kv_cache(&spec)?;
        Ok(Self {
            backend,
            decoder,
            kv,
            blocks: BlockManager::new(num_blocks, block_size),
            seqs: HashMap::new(),
            profile: PhaseTimes::new(
                "draft",
                &["input", "forward", "argmax"],
                profile_requested(),
            ),
        })
    }

    /// The weights the draft runs (for checking that a self-draft shares them).
    pub fn decoder(&self) -> &Arc<Decoder<B>> {
        &self.decoder
    }

    /// The draft's vocabulary size (must be the target's).
    pub fn vocab_size(&self) -> usize {
        self.decoder.config().vocab_size
    }

    fn drop_seq(&mut self, id: u64) {
        if let Some(s) = self.seqs.remove(&id) {
            self.blocks.free(&s.blocks);
        }
    }

    /// Runs one step over `rows` and returns each row's greedy next token;
    /// `None` if the step failed (every sequence is then forgotten).
    fn step(&mut self, rows: &[Row]) -> Option<Vec<u32>> {
        let t = std::time::Instant::now();
        let bs = self.blocks.block_size();
        let mut input = StepInput::default();
        for r in rows {
            let s = self.seqs.get(&r.id)?;
            let query_start = input.tokens.len();
            for (j, &t) in r.tokens.iter().enumerate() {
                let pos = r.start + j;
                input.tokens.push(t);
                input.positions.push(pos as u32);
                input
                    .slots
                    .push(s.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            input.seqs.push(SeqSlice {
                query_start,
                query_len: r.tokens.len(),
                context_len: r.start + r.tokens.len(),
                block_table: s.blocks.clone(),
            });
            input.logit_rows.push((input.tokens.len() - 1) as u32);
        }
        let t = self.profile.lap(0, t);
        match self.decoder.forward(&self.backend, &mut self.kv, &input) {
            Ok(logits) => {
                let t = self.profile.lap(1, t);
                let vocab = logits.len() / rows.len().max(1);
                let guesses = logits.chunks_exact(vocab.max(1)).map(argmax).collect();
                self.profile.lap(2, t);
                self.profile.step_done(rows.len() as u64);
                Some(guesses)
            }
            Err(e) => {
                tracing::error!("the draft model's step failed: {e}");
                let ids: Vec<u64> = self.seqs.keys().copied().collect();
                ids.into_iter().for_each(|id| self.drop_seq(id));
                None
            }
        }
    }
}

/// The first largest value's index, NaNs passed over (as the sampler's greedy choice).
fn argmax(row: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

impl<B: Backend> Proposer for DraftProposer<B> {
    fn propose(&mut self, batch: &[ProposalRequest<'_>]) -> Vec<Vec<u32>> {
        let max_pos = self.decoder.max_positions();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch.len()];
        // Catch up: each sequence computes what its cache lacks.
        let mut rows = Vec::new();
        let mut ks = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            let len = r.tokens.len();
            let k = r.k.min((max_pos + 1).saturating_sub(len));
            if len == 0 || k == 0 || r.tokens.iter().any(|&t| t as usize >= self.vocab_size()) {
                self.drop_seq(r.id);
                continue;
            }
            let s = self.seqs.entry(r.id).or_default();
            let common = s
                .tokens
                .iter()
                .zip(r.tokens)
                .take_while(|(a, b)| a == b)
                .count()
                .min(len - 1);
            s.tokens.truncate(common);
            // Room for the tokens and k - 1 guesses computed after them.
            let need = self
                .blocks
                .blocks_for(len + k - 1)
                .saturating_sub(s.blocks.len());
            match self.blocks.allocate_n(need) {
                Some(b) => s.blocks.extend(b),
                None => {
                    self.drop_seq(r.id);
                    continue;
                }
            }
            rows.push(Row {
                id: r.id,
                tokens: r.tokens[common..].to_vec(),
                start: common,
            });
            ks.push((i, k));
        }
        if rows.is_empty() {
            return out;
        }
        let Some(first) = self.step(&rows) else {
            return out;
        };
        for ((row, &(i, _)), g) in rows.iter_mut().zip(&ks).zip(first) {
            if let Some(s) = self.seqs.get_mut(&row.id) {
                s.tokens.extend(&row.tokens);
            }
            out[i].push(g);
            row.start += row.tokens.len();
            row.tokens = vec![g];
        }
        // Then one guess per step, for the sequences that want more.
        for r in 1.. {
            let live: Vec<usize> = (0..rows.len()).filter(|&j| ks[j].1 > r).collect();
            if live.is_empty() {
                break;
            }
            let step_rows: Vec<Row> = live
                .iter()
                .map(|&j| Row {
                    id: rows[j].id,
                    tokens: rows[j].tokens.clone(),
                    start: rows[j].start,
                })
                .collect();
            let Some(next) = self.step(&step_rows) else {
                return out;
            };
            for (&j, g) in live.iter().zip(next) {
                let row = &mut rows[j];
                if let Some(s) = self.seqs.get_mut(&row.id) {
                    s.tokens.extend(&row.tokens);
                }
                out[ks[j].0].push(g);
                row.start += 1;
                row.tokens = vec![g];
            }
        }
        out
    }

    fn release(&mut self, id: u64) {
        self.drop_seq(id);
        if self.seqs.is_empty() {
            self.profile.log();
        }
    }

    fn name(&self) -> &'static str {
        "draft_model"
    }
}
