//! The description of one forward step, shared by every backend.

use crate::{BackendError, Result};

/// Geometry of the paged KV cache: `num_blocks` blocks of `block_size` token
/// slots, each slot holding `n_kv_heads * head_dim` keys and as many values,
/// for each of `n_layers` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSpec {
    pub n_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvSpec {
    /// Total token slots.
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Bytes one token occupies across all layers at `elem_bytes` per element (keys + values).
    pub fn bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * elem_bytes
    }
}

/// One sequence's share of a step: a contiguous run of the step's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index of this sequence's first token in the step's token list.
    pub query_start: usize,
    /// How many of this sequence's tokens the step computes.
    pub query_len: usize,
    /// Tokens of context after this step (cached before it + `query_len`).
    pub context_len: usize,
    /// Physical KV block of each logical block of the sequence, in order.
    pub block_table: Vec<u32>,
}

/// A forward step over several sequences at once, with no padding: the
/// tokens of all sequences are concatenated, and each token knows its
/// position and the KV-cache slot its key and value are written to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepInput {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Cache slot (`block * block_size + offset`) of each token.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Rows (token indices) whose logits are wanted, usually each sequence's last token.
    pub logit_rows: Vec<u32>,
}

impl StepInput {
    /// A step over one sequence whose KV blocks are `0, 1, 2, …` in order (so a
    /// position's cache slot is the position itself): computes `tokens` at
    /// positions `start..` and asks for the logits of the last one.
    pub fn single_sequence(start: usize, tokens: &[u32], block_size: usize) -> Self {
        let end = start + tokens.len();
        let positions: Vec<u32> = (start..end).map(|p| p as u32).collect();
        Self {
            tokens: tokens.to_vec(),
            slots: positions.clone(),
            positions,
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: tokens.len(),
                context_len: end,
                block_table: (0..end.div_ceil(block_size) as u32).collect(),
            }],
            logit_rows: tokens
                .len()
                .checked_sub(1)
                .map(|r| vec![r as u32])
                .unwrap_or_default(),
        }
    }

    /// Checks internal consistency against the cache geometry, so a scheduler bug is
    /// an error here rather than an out-of-bounds access inside a kernel.
    pub fn validate(&self, kv: &KvSpec) -> Result<()> {
        let bad = |msg: String| Err(BackendError::Invalid { op: "step", msg });
        let n = self.tokens.len();
        if self.positions.len() != n || self.slots.len() != n {
            return bad(format!(
                "{n} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slots.len()
            ));
        }
        let mut covered = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.query_start != covered {
                return bad(format!(
                    "sequence {i} starts at {} not {covered}",
                    s.query_start
                ));
            }
            covered += s.query_len;
            if s.query_len > s.context_len {
                return bad(format!(
                    "sequence {i} computes more tokens than its context"
                ));
            }
            if s.block_table.len() * kv.block_size < s.context_len {
                return bad(format!(
                    "sequence {i} has {} blocks for {} tokens",
                    s.block_table.len(),
                    s.context_len
                ));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= kv.num_blocks) {
                return bad(format!("sequence {i} names block {b} of {}", kv.num_blocks));
            }
        }
        if covered != n {
            return bad(format!("sequences cover {covered} of {n} tokens"));
        }
        if let Some(s) = self.slots.iter().find(|&&s| s as usize >= kv.slots()) {
            return bad(format!("slot {s} beyond the cache's {}", kv.slots()));
        }
        if let Some(r) = self.logit_rows.iter().find(|&&r| r as usize >= n) {
            return bad(format!("logit row {r} beyond {n} tokens"));
        }
        Ok(())
    }
}
