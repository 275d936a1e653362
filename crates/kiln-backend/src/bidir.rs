//! Bidirectional attention on host memory: the reference (and, for now, the
//! only) implementation of [`crate::Backend::attention_bidirectional`], which
//! encoder models (BERT, XLM-RoBERTa) use instead of the decoder's causal,
//! paged attention.

use crate::{BackendError, Result};
use rayon::prelude::*;

/// Shape parameters of one bidirectional attention call.
#[derive(Debug, Clone, Copy)]
pub struct BidirParams {
    pub n_heads: usize,
    pub head_dim: usize,
    /// Multiplier applied to q·k, normally `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// `softmax(q k^T * scale) v` per head and per sequence, where `q`, `k`, `v`
/// are `[tokens, n_heads * head_dim]` and `seq_lens` splits the tokens into
/// sequences that do not see each other. Each output row depends only on its
/// own sequence, in a fixed order of operations, so a sequence's result is
/// the same bits whether it comes alone or in a batch.
pub fn attention_bidirectional(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq_lens: &[usize],
    p: &BidirParams,
) -> Result<Vec<f32>> {
    let width = p.n_heads * p.head_dim;
    let tokens: usize = seq_lens.iter().sum();
    let bad = |msg: String| BackendError::Shape {
        op: "attention_bidirectional",
        msg,
    };
    if width == 0 {
        return Err(bad("n_heads * head_dim is 0".into()));
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.len() != tokens * width {
            return Err(bad(format!(
                "{name} has {} values, expected {tokens} tokens x {width}",
                t.len()
            )));
        }
    }
    let mut out = vec![0f32; tokens * width];
    // Each sequence's output rows are a contiguous band of `out`.
    let mut bands = Vec::with_capacity(seq_lens.len());
    let mut rest = out.as_mut_slice();
    let mut start = 0;
    for &n in seq_lens {
        let (band, tail) = rest.split_at_mut(n * width);
        bands.push((start, n, band));
        rest = tail;
        start += n;
    }
    bands.into_par_iter().for_each(|(start, n, band)| {
        let mut scores = vec![0f32; n];
        for i in 0..n {
            let row = (start + i) * width;
            for h in 0..p.n_heads {
                let off = h * p.head_dim;
                let qi = &q[row + off..row + off + p.head_dim];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let kr = (start + j) * width + off;
                    let kj = &k[kr..kr + p.head_dim];
                    let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                    *s = dot * p.scale;
                    max = max.max(*s);
                }
                let mut denom = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    denom += *s;
                }
                let o = &mut band[i * width + off..i * width + off + p.head_dim];
                for (j, &s) in scores.iter().enumerate() {
                    let w = s / denom;
                    let vr = (start + j) * width + off;
                    for (od, vd) in o.iter_mut().zip(&v[vr..vr + p.head_dim]) {
                        *od += w * vd;
                    }
                }
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_returns_its_value_and_sequences_do_not_mix() {
        let p = BidirParams {
            n_heads: 1,
            head_dim: 2,
            scale: 1.0,
        };
        // Two sequences of one token each: each must see only its own value.
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [5.0, 0.0, 0.0, 5.0];
        let v = [1.0, 2.0, 3.0, 4.0];
        let out = attention_bidirectional(&q, &k, &v, &[1, 1], &p).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn first_query_sees_later_keys() {
        let p = BidirParams {
            n_heads: 1,
            head_dim: 1,
            scale: 1.0,
        };
        // Equal scores: the first query averages both values (causal would give 1).
        let out = attention_bidirectional(&[0.0, 0.0], &[1.0, 1.0], &[1.0, 3.0], &[2], &p).unwrap();
        assert_eq!(out, vec![2.0, 2.0]);
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let p = BidirParams {
            n_heads: 1,
            head_dim: 2,
            scale: 1.0,
        };
        let err = attention_bidirectional(&[0.0; 4], &[0.0; 2], &[0.0; 4], &[2], &p).unwrap_err();
        assert!(err.to_string().contains("k has 2 values"), "{err}");
    }
}
