//! A step's sequences packed into the flat arrays the attention kernels
//! read (see `kernels/attention_common.cu`): block tables padded to one
//! stride, per-sequence context and query extents, and the sequence of each
//! token. Packed on the host once per step and copied to the device in one
//! transfer; for a captured CUDA graph the stride and row count are the
//! graph's, fixed, and the rows past the batch are padding with no context.

use crate::{BackendError, KvSpec, Result, StepInput};

/// The packed metadata of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedStep {
    /// Block ids per table row (`[rows][stride]`, padding 0).
    pub table_stride: usize,
    pub block_tables: Vec<i32>,
    pub context_lens: Vec<i32>,
    pub query_starts: Vec<i32>,
    pub query_lens: Vec<i32>,
    /// The sequence (row) of each token.
    pub token_seqs: Vec<i32>,
    /// Sequences of the step (rows past them are padding).
    pub n_seqs: usize,
    /// Longest context of the step, for the decode kernel's split count.
    pub max_context: usize,
    /// Every sequence computes exactly one token (the decode kernel applies).
    pub decode_only: bool,
}

/// Packs `step` for a cache of geometry `kv`, as `rows` table rows of
/// `stride` blocks (`None`: as many as the step needs). Padding rows get no
/// context and a token index past the step's, so the kernels skip them.
pub fn pack(
    step: &StepInput,
    kv: &KvSpec,
    rows: Option<usize>,
    stride: Option<usize>,
) -> Result<PackedStep> {
    step.validate(kv)?;
    let bad = |msg: String| {
        Err(BackendError::Invalid {
            op: "pack_blocks",
            msg,
        })
    };
    let needed = step
        .seqs
        .iter()
        .map(|s| s.context_len.div_ceil(kv.block_size))
        .max()
        .unwrap_or(0);
    let stride = stride.unwrap_or(needed.max(1));
    if needed > stride {
        return bad(format!(
            "a sequence needs {needed} blocks, more than the table stride of {stride}"
        ));
    }
    let n = step.seqs.len();
    let rows = rows.unwrap_or(n);
    if rows < n {
        return bad(format!("{n} sequences for {rows} table rows"));
    }
    let too_big = |v: usize| i32::try_from(v).is_err();
    if too_big(rows * stride) || too_big(step.tokens.len() + rows) {
        return bad(format!(
            "{rows} rows of {stride} blocks overflow 32-bit indices"
        ));
    }
    let mut p = PackedStep {
        table_stride: stride,
        block_tables: vec![0; rows * stride],
        context_lens: vec![0; rows],
        query_starts: vec![0; rows],
        query_lens: vec![0; rows],
        token_seqs: vec![0; step.tokens.len()],
        n_seqs: n,
        max_context: 0,
        decode_only: !step.seqs.is_empty(),
    };
    for (i, s) in step.seqs.iter().enumerate() {
        let used = s.context_len.div_ceil(kv.block_size);
        let row = &mut p.block_tables[i * stride..i * stride + used];
        for (dst, &b) in row.iter_mut().zip(&s.block_table) {
            // validate() checked every block id against num_blocks.
            *dst = b as i32;
        }
        p.context_lens[i] = s.context_len as i32;
        p.query_starts[i] = s.query_start as i32;
        p.query_lens[i] = s.query_len as i32;
        p.token_seqs[s.query_start..s.query_start + s.query_len].fill(i as i32);
        p.max_context = p.max_context.max(s.context_len);
        p.decode_only &= s.query_len == 1;
    }
    for (j, start) in p.query_starts.iter_mut().enumerate().skip(n) {
        *start = (step.tokens.len() + (j - n)) as i32;
    }
    Ok(p)
}

/// How many splits the decode kernel runs per (sequence, head): enough
/// thread blocks to fill `target_blocks` (a few per multiprocessor), never
/// more than the longest context has partitions of `partition` keys, and
/// one when the batch alone fills the device.
pub fn decode_splits(
    max_context: usize,
    partition: usize,
    seq_heads: usize,
    target_blocks: usize,
) -> usize {
    let partitions = max_context.div_ceil(partition.max(1)).max(1);
    let want = target_blocks.div_ceil(seq_heads.max(1)).max(1);
    want.min(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqSlice;

    fn kv() -> KvSpec {
        KvSpec {
            n_layers: 1,
            num_blocks: 32,
            block_size: 4,
            n_kv_heads: 1,
            head_dim: 8,
        }
    }

    /// A prefill chunk of 3 tokens (context 7) and a decode token (context 9).
    fn mixed() -> StepInput {
        StepInput {
            tokens: vec![5, 6, 7, 8],
            positions: vec![4, 5, 6, 8],
            slots: vec![40, 41, 42, 8],
            seqs: vec![
                SeqSlice {
                    query_start: 0,
                    query_len: 3,
                    context_len: 7,
                    block_table: vec![9, 10],
                },
                SeqSlice {
                    query_start: 3,
                    query_len: 1,
                    context_len: 9,
                    block_table: vec![0, 1, 2],
                },
            ],
            logit_rows: vec![2, 3],
        }
    }

    #[test]
    fn packs_tables_extents_and_token_owners() {
        let p = pack(&mixed(), &kv(), None, None).expect("packs");
        assert_eq!(p.table_stride, 3);
        assert_eq!(p.block_tables, vec![9, 10, 0, 0, 1, 2]);
        assert_eq!(p.context_lens, vec![7, 9]);
        assert_eq!(p.query_starts, vec![0, 3]);
        assert_eq!(p.query_lens, vec![3, 1]);
        assert_eq!(p.token_seqs, vec![0, 0, 0, 1]);
        assert_eq!(p.max_context, 9);
        assert!(!p.decode_only);
    }

    #[test]
    fn graph_shapes_pad_rows_and_stride() {
        let mut step = mixed();
        step.seqs[0].query_len = 1;
        step.seqs[0].query_start = 0;
        step.seqs[1].query_start = 1;
        step.tokens.truncate(2);
        step.positions = vec![6, 8];
        step.slots = vec![42, 8];
        step.logit_rows = vec![0, 1];
        let p = pack(&step, &kv(), Some(4), Some(8)).expect("packs");
        assert!(p.decode_only);
        assert_eq!(p.block_tables.len(), 4 * 8);
        assert_eq!(&p.block_tables[8..11], &[0, 1, 2]);
        assert_eq!(p.context_lens, vec![7, 9, 0, 0]);
        // Padding rows point past the step's tokens.
        assert_eq!(p.query_starts, vec![0, 1, 2, 3]);
        assert_eq!(p.n_seqs, 2);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let err = pack(&mixed(), &kv(), None, Some(2)).expect_err("stride");
        assert!(err.to_string().contains("needs 3 blocks"), "{err}");
        assert!(pack(&mixed(), &kv(), Some(1), None).is_err());
        let mut bad = mixed();
        bad.seqs[1].block_table = vec![0, 1, 99];
        assert!(
            pack(&bad, &kv(), None, None).is_err(),
            "block beyond the cache"
        );
    }

    #[test]
    fn splits_fill_the_device_only_when_the_batch_does_not() {
        // One sequence, 32 heads, 8k context, 528 blocks wanted (4 per SM of 132):
        // 17 splits would fill it, and 8192 / 512 = 16 partitions cap it.
        assert_eq!(decode_splits(8192, 512, 32, 528), 16);
        assert_eq!(decode_splits(2048, 512, 32, 528), 4);
        // A short context is never split.
        assert_eq!(decode_splits(100, 512, 32, 528), 1);
        // 64 sequences x 32 heads already fill the device.
        assert_eq!(decode_splits(8192, 512, 64 * 32, 528), 1);
        assert_eq!(decode_splits(0, 512, 1, 528), 1);
    }
}
