//! Bidirectional attention on host memory: the reference (and, for now, the
//! only) implementation of [`crate::Backend::attention_bidirectional`], which
//! encoder models (BERT, XLM-RoBERTa) use instead of the decoder's causal,
//! paged attention.
//!
//! Work is split by sequence and head: each task lays its head's keys out
//! transposed (`head_dim` rows of the sequence's `n` keys) and its values
//! in rows, both padded to whole vectors. Queries go in tiles of eight:
//! a tile's scores for eight keys at a time, then its outputs for eight of
//! `head_dim`'s columns at a time, stay in registers while each key or
//! value vector is loaded once for the whole tile (one per query took
//! 27% of a batch of 256-token MiniLM inputs, against 26% for all the
//! matrix products). Where the CPU has AVX2 and FMA the loops are compiled
//! for it (fused multiply-adds, eight lanes), where it has AVX-512 for that
//! (sixteen lanes, the same bits), else plainly.
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
    let kernel = kernel();
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
            match kernel {
                // SAFETY: `Avx512` is chosen only where AVX-512F, AVX2 and
                // FMA were detected, `Fma` only where AVX2 and FMA were.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { head_avx512(&t) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Fma => unsafe { head_fma(&t) },
                Kernel::Plain => head::<false, 8>(&t),
            }
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

/// Which build of [`head`] runs.
#[derive(Clone, Copy)]
enum Kernel {
    /// Plain arithmetic, eight lanes.
    Plain,
    /// AVX2 with fused multiply-adds, eight lanes.
    #[cfg(target_arch = "x86_64")]
    Fma,
    /// AVX-512 with fused multiply-adds, sixteen lanes: the same operations
    /// on each score and output as [`Kernel::Fma`] (every lane sums in the
    /// same order whatever the width), so the same bits, in half the
    /// instructions.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The build for this CPU: AVX2 and FMA where the CPU kernels may use
/// vector code (`KILN_CPU_ISA` caps it), AVX-512 where they may use it.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        let c = crate::cpu::isa::chosen();
        match (c.simd.is_some(), c.avx512) {
            (true, true) => Kernel::Avx512,
            (true, false) => Kernel::Fma,
            _ => Kernel::Plain,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Kernel::Plain
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
    head::<true, 8>(t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
fn head_avx512(t: &Task) -> Vec<f32> {
    head::<true, 16>(t)
}

/// Queries per tile: their scores (and outputs) accumulate in registers
/// while each key (value) vector is loaded once for all of them.
const QT: usize = 8;

/// The head's output for every query of the sequence: `n` rows of
/// `head_dim`. For query `i`: `s_j = scale * sum_d q_i[d] k_j[d]` (the sum
/// over `d` in order), `w_j = e^(s_j - max) / sum_j e^(s_j - max)`, and
/// `o[d] = sum_j w_j v_j[d]` (over `j` in order). Queries go in tiles of
/// [`QT`] (the last ones one by one); a query's operations are the same in
/// either, so its result does not depend on the tiling.
#[inline(always)]
fn head<const FMA: bool, const L: usize>(t: &Task) -> Vec<f32> {
    let (n, hd) = (t.n, t.p.head_dim);
    // The head's keys transposed (row d holds k_j[d] for every key j) and
    // its values, each padded with zeros to whole vectors of L.
    let (np, hp) = (n.next_multiple_of(L), hd.next_multiple_of(L));
    let mut kt = vec![0f32; hd * np];
    let mut vp = vec![0f32; n * hp];
    for j in 0..n {
        let row = (t.start + j) * t.width + t.off;
        for (d, &x) in t.k[row..row + hd].iter().enumerate() {
            kt[d * np + j] = x;
        }
        vp[j * hp..j * hp + hd].copy_from_slice(&t.v[row..row + hd]);
    }
    let mut out = vec![0f32; n * hp];
    let mut w = vec![0f32; QT * np];
    let b = Bufs {
        kt: &kt,
        vp: &vp,
        np,
        hp,
    };
    let mut i = 0;
    while i < n {
        if n - i >= QT {
            tile::<FMA, QT, L>(t, &b, i, &mut w, &mut out);
            i += QT;
        } else {
            tile::<FMA, 1, L>(t, &b, i, &mut w, &mut out);
            i += 1;
        }
    }
    if hp != hd {
        for r in 1..n {
            out.copy_within(r * hp..r * hp + hd, r * hd);
        }
        out.truncate(n * hd);
    }
    out
}

/// A head's keys and values laid out for [`tile`].
struct Bufs<'a> {
    /// Keys transposed: `head_dim` rows of `np` (`n` padded) columns.
    kt: &'a [f32],
    /// Values: `n` rows of `hp` (`head_dim` padded) columns.
    vp: &'a [f32],
    np: usize,
    hp: usize,
}

/// Queries `i0..i0 + R` of the head: their scores into `w` (`R` rows of
/// `np`), then their outputs into `out`'s rows (of `hp` columns).
#[inline(always)]
fn tile<const FMA: bool, const R: usize, const L: usize>(
    t: &Task,
    b: &Bufs,
    i0: usize,
    w: &mut [f32],
    out: &mut [f32],
) {
    use crate::cpu::math::{exp, sum8};
    let (n, hd, np, hp) = (t.n, t.p.head_dim, b.np, b.hp);
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { c + a * b };
    let qs: [&[f32]; R] = std::array::from_fn(|r| {
        let at = (t.start + i0 + r) * t.width + t.off;
        &t.q[at..at + hd]
    });
    for jb in (0..np).step_by(L) {
        let mut acc = [[0f32; L]; R];
        for (d, krow) in b.kt.chunks_exact(np).enumerate() {
            let kv = &krow[jb..jb + L];
            for (a, q) in acc.iter_mut().zip(&qs) {
                let qd = q[d];
                for l in 0..L {
                    a[l] = madd(qd, kv[l], a[l]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            w[r * np + jb..r * np + jb + L].copy_from_slice(a);
        }
    }
    for r in 0..R {
        let s = &mut w[r * np..r * np + n];
        // Scale, and the maximum in eight lanes (score j in lane j % 8),
        // a chunk of eight at a time so that the loop vectorises (`>`
        // rather than `f32::max`, whose NaN rule keeps it scalar; the
        // scores are finite).
        let mut max = [f32::NEG_INFINITY; 8];
        let mut chunks = s.chunks_exact_mut(8);
        for c in &mut chunks {
            for l in 0..8 {
                c[l] *= t.p.scale;
                max[l] = if c[l] > max[l] { c[l] } else { max[l] };
            }
        }
        for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
            *x *= t.p.scale;
            max[l] = if *x > max[l] { *x } else { max[l] };
        }
        let max = max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in s.iter_mut() {
            *s = exp::<FMA>(*s - max);
        }
        let inv = 1.0 / sum8(s);
        for s in s.iter_mut() {
            *s *= inv;
        }
    }
    for db in (0..hp).step_by(L) {
        let mut acc = [[0f32; L]; R];
        for (j, vrow) in b.vp.chunks_exact(hp).enumerate() {
            let vv = &vrow[db..db + L];
            for (r, a) in acc.iter_mut().enumerate() {
                let wj = w[r * np + j];
                for l in 0..L {
                    a[l] = madd(wj, vv[l], a[l]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let at = (i0 + r) * hp + db;
            out[at..at + L].copy_from_slice(a);
        }
    }
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

    /// Sequences whose lengths and head size are not whole tiles or
    /// vectors (tiles of eight queries and the one-by-one rest, padded
    /// keys and values) match the textbook computation in f64, and a
    /// sequence gives the same bits alone as beside another.
    #[test]
    fn tiles_and_their_remainders_match_the_definition() {
        let p = BidirParams {
            n_heads: 2,
            head_dim: 12,
            scale: 0.3,
        };
        let width = 24;
        let lens = [19usize, 5];
        let tokens: usize = lens.iter().sum();
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 4.0;
        let q: Vec<f32> = (0..tokens * width).map(val).collect();
        let k: Vec<f32> = (0..tokens * width).map(|i| val(i + 77)).collect();
        let v: Vec<f32> = (0..tokens * width).map(|i| val(i + 311)).collect();
        let out = attention_bidirectional(&q, &k, &v, &lens, &p).unwrap();
        let mut start = 0;
        for &n in &lens {
            for h in 0..2 {
                for i in 0..n {
                    let at = |t: usize, d: usize| (start + t) * width + h * 12 + d;
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            let dot: f64 = (0..12)
                                .map(|d| q[at(i, d)] as f64 * k[at(j, d)] as f64)
                                .sum();
                            dot * 0.3
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..12 {
                        let want: f64 = (0..n).map(|j| e[j] / sum * v[at(j, d)] as f64).sum();
                        let got = out[at(i, d)] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq at {start}, head {h}, query {i}, d {d}: {got} vs {want}"
                        );
                    }
                }
            }
            start += n;
        }
        let alone = attention_bidirectional(
            &q[..19 * width],
            &k[..19 * width],
            &v[..19 * width],
            &[19],
            &p,
        )
        .unwrap();
        assert_eq!(alone, out[..19 * width].to_vec());
    }

    /// The AVX-512 build (sixteen lanes) gives the AVX2 build's bits: each
    /// lane sums in the same order whatever the width.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_build_gives_the_avx2_builds_bits() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma"))
        {
            return;
        }
        let p = BidirParams {
            n_heads: 1,
            head_dim: 40,
            scale: 0.2,
        };
        let n = 37;
        let val = |i: usize| ((i * 6151 % 997) as f32 / 997.0 - 0.5) * 3.0;
        let q: Vec<f32> = (0..n * 40).map(val).collect();
        let k: Vec<f32> = (0..n * 40).map(|i| val(i + 5)).collect();
        let v: Vec<f32> = (0..n * 40).map(|i| val(i + 9)).collect();
        let t = Task {
            q: &q,
            k: &k,
            v: &v,
            p: &p,
            width: 40,
            start: 0,
            n,
            off: 0,
        };
        // SAFETY: the features were detected above.
        let (a, b) = unsafe { (head_fma(&t), head_avx512(&t)) };
        assert_eq!(a, b);
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
