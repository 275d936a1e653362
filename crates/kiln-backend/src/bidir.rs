//! Bidirectional attention on host memory: the reference (and, for now, the
//! only) implementation of [`crate::Backend::attention_bidirectional`], which
//! encoder models (BERT, XLM-RoBERTa) use instead of the decoder's causal,
//! paged attention.
//!
//! Work is split by sequence and head: each task lays its head's keys out
//! transposed (`head_dim` rows of the sequence's `n` keys), so a query's
//! scores are `head_dim` element-wise multiply-adds over `n` lanes, and
//! its output `n` multiply-adds over `head_dim` lanes: loops the compiler
//! vectorises, without a horizontal sum per key. Where the CPU has AVX2
//! and FMA they are compiled for it (fused multiply-adds), else plainly.
//! Every query row's arithmetic is a fixed sequence of operations on its
//! own sequence's keys and values, so a sequence's result is the same bits
//! alone or in any batch, on any number of threads.

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
    // One task per sequence and head, each writing its head's columns of
    // its sequence's rows into a buffer of its own; then the buffers are
    // placed. (Tasks of one sequence share its rows, so they cannot each
    // own a slice of `out`.)
    let mut tasks = Vec::with_capacity(seq_lens.len() * p.n_heads);
    let mut start = 0;
    for &n in seq_lens {
        tasks.extend((0..p.n_heads).map(|h| (start, n, h)));
        start += n;
    }
    let fma = fma_kernels();
    let heads: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(start, n, h)| {
            let t = Task {
                q,
                k,
                v,
                p,
                width,
                start,
                n,
                off: h * p.head_dim,
            };
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: `fma` is true only where AVX2 and FMA were detected.
                return unsafe { head_fma(&t) };
            }
            let _ = fma;
            head::<false>(&t)
        })
        .collect();
    let mut out = vec![0f32; tokens * width];
    for (&(start, n, h), o) in tasks.iter().zip(&heads) {
        let off = h * p.head_dim;
        for i in 0..n {
            let at = (start + i) * width + off;
            out[at..at + p.head_dim].copy_from_slice(&o[i * p.head_dim..(i + 1) * p.head_dim]);
        }
    }
    Ok(out)
}

/// Whether the fused multiply-add build runs here: AVX2 and FMA detected,
/// and the CPU kernels not capped to the portable code (`KILN_CPU_ISA`).
fn fma_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::isa::chosen().simd.is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One sequence's one head.
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    p: &'a BidirParams,
    width: usize,
    /// The sequence's first token and its length.
    start: usize,
    n: usize,
    /// The head's first column.
    off: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn head_fma(t: &Task) -> Vec<f32> {
    head::<true>(t)
}

/// The head's output for every query of the sequence: `n` rows of
/// `head_dim`. For query `i`: `s_j = scale * sum_d q_i[d] k_j[d]` (the sum
/// over `d` in order), `w_j = e^(s_j - max) / sum_j e^(s_j - max)`, and
/// `o[d] = sum_j w_j v_j[d]` (over `j` in order).
#[inline(always)]
fn head<const FMA: bool>(t: &Task) -> Vec<f32> {
    use crate::cpu::math::{exp, sum8};
    let (n, hd) = (t.n, t.p.head_dim);
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { c + a * b };
    // The head's keys transposed: row d holds k_j[d] for every key j.
    let mut kt = vec![0f32; hd * n];
    for j in 0..n {
        let row = (t.start + j) * t.width + t.off;
        for (d, &x) in t.k[row..row + hd].iter().enumerate() {
            kt[d * n + j] = x;
        }
    }
    let mut out = vec![0f32; n * hd];
    let mut scores = vec![0f32; n];
    for (i, o) in out.chunks_exact_mut(hd).enumerate() {
        let qr = (t.start + i) * t.width + t.off;
        scores.fill(0.0);
        for (&qd, kd) in t.q[qr..qr + hd].iter().zip(kt.chunks_exact(n)) {
            for (s, &x) in scores.iter_mut().zip(kd) {
                *s = madd(qd, x, *s);
            }
        }
        let mut max = [f32::NEG_INFINITY; 8];
        for (l, s) in scores.iter_mut().enumerate() {
            *s *= t.p.scale;
            max[l % 8] = max[l % 8].max(*s);
        }
        let max = max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in scores.iter_mut() {
            *s = exp::<FMA>(*s - max);
        }
        let inv = 1.0 / sum8(&scores);
        for (j, &w) in scores.iter().enumerate() {
            let w = w * inv;
            let vr = (t.start + j) * t.width + t.off;
            for (od, &vd) in o.iter_mut().zip(&t.v[vr..vr + hd]) {
                *od = madd(w, vd, *od);
            }
        }
    }
    out
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
