//! Paged attention on the CPU: keys and values live in fixed-size blocks,
//! each sequence names its blocks through a block table, and one call serves
//! any mix of prefill chunks and decode tokens.

use rayon::prelude::*;

use super::matmul::hsum8;
use super::{CpuKvCache, CpuTensor};
use crate::{AttentionParams, BackendError, Result, StepInput};

pub(super) fn write_kv(
    cache: &mut CpuKvCache,
    layer: usize,
    k: &CpuTensor,
    v: &CpuTensor,
    slots: &[u32],
) -> Result<()> {
    let spec = cache.spec;
    let width = spec.n_kv_heads * spec.head_dim;
    if layer >= spec.n_layers || k.shape != v.shape || k.cols() != width || k.rows() != slots.len()
    {
        return Err(BackendError::Shape {
            op: "write_kv",
            msg: format!(
                "layer {layer}, k {:?}, v {:?}, {} slots, cache rows of {width}",
                k.shape,
                v.shape,
                slots.len()
            ),
        });
    }
    let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
    for (i, &s) in slots.iter().enumerate() {
        let s = s as usize;
        if s >= spec.slots() {
            return Err(BackendError::Invalid {
                op: "write_kv",
                msg: format!("slot {s} beyond {}", spec.slots()),
            });
        }
        kc[s * width..(s + 1) * width].copy_from_slice(&k.data[i * width..(i + 1) * width]);
        vc[s * width..(s + 1) * width].copy_from_slice(&v.data[i * width..(i + 1) * width]);
    }
    Ok(())
}

pub(super) fn paged_attention(
    q: &CpuTensor,
    cache: &CpuKvCache,
    layer: usize,
    step: &StepInput,
    p: &AttentionParams,
) -> Result<CpuTensor> {
    let spec = cache.spec;
    let hd = p.head_dim;
    if layer >= spec.n_layers
        || q.cols() != p.n_heads * hd
        || q.rows() != step.tokens.len()
        || spec.head_dim != hd
        || spec.n_kv_heads != p.n_kv_heads
        || p.n_kv_heads == 0
        || !p.n_heads.is_multiple_of(p.n_kv_heads)
    {
        return Err(BackendError::Shape {
            op: "attention",
            msg: format!(
                "q {:?}, params {p:?}, cache {spec:?}, layer {layer}",
                q.shape
            ),
        });
    }
    step.validate(&spec)?;
    let group = p.n_heads / p.n_kv_heads;
    let kv_width = p.n_kv_heads * hd;
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);

    // Which sequence each token belongs to, so every (token, KV head) pair is an independent task.
    let mut seq_of = vec![0usize; step.tokens.len()];
    for (si, s) in step.seqs.iter().enumerate() {
        seq_of[s.query_start..s.query_start + s.query_len].fill(si);
    }
    let ctx = Ctx {
        kc,
        vc,
        hd,
        group,
        kv_width,
        block_size: spec.block_size,
        scale: p.scale,
    };
    let mut out = vec![0f32; q.data.len()];
    // Each task: one token's query heads that share one KV head (GQA group),
    // so each key and value is loaded once for the whole group.
    out.par_chunks_mut(group * hd)
        .zip(q.data.par_chunks(group * hd))
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, (o, qg))| {
            let (t, g) = (idx / p.n_kv_heads, idx % p.n_kv_heads);
            let seq = &step.seqs[seq_of[t]];
            // Position of this query within its sequence; it sees keys first..=pos.
            let pos = seq.context_len - seq.query_len + (t - seq.query_start);
            let first = match p.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let job = Job {
                q: qg,
                out: o,
                kv_off: g * hd,
                block_table: &seq.block_table,
                first,
                pos,
            };
            #[cfg(target_arch = "x86_64")]
            {
                if super::x86::Isa::detected().is_some() {
                    // SAFETY: the CPU features were detected.
                    unsafe { attend_avx2(&ctx, job, scores) };
                    return;
                }
            }
            attend::<false>(&ctx, job, scores);
        });
    CpuTensor::new(q.shape.clone(), out)
}

/// What every attention task shares.
struct Ctx<'a> {
    kc: &'a [f32],
    vc: &'a [f32],
    hd: usize,
    group: usize,
    kv_width: usize,
    block_size: usize,
    scale: f32,
}

/// One task: a token's group of query heads.
struct Job<'a> {
    q: &'a [f32],
    out: &'a mut [f32],
    kv_off: usize,
    block_table: &'a [u32],
    first: usize,
    pos: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(ctx: &Ctx, job: Job, scores: &mut Vec<f32>) {
    attend::<true>(ctx, job, scores)
}

/// Softmax attention of `job.q`'s heads over keys `first..=pos`: scores, then
/// their softmax, then the weighted sum of values. The arithmetic for a query
/// depends only on its own position and the cache, never on the rest of the
/// batch (batch invariance).
#[inline(always)]
fn attend<const FMA: bool>(ctx: &Ctx, job: Job, scores: &mut Vec<f32>) {
    let (hd, group) = (ctx.hd, ctx.group);
    let n = job.pos + 1 - job.first;
    scores.clear();
    scores.resize(group * n, 0.0);
    let keys = KeyRows::new(ctx, &job);
    for (jj, at) in keys.clone() {
        let k = &ctx.kc[at..at + hd];
        for h in 0..group {
            scores[h * n + jj] = dot::<FMA>(&job.q[h * hd..(h + 1) * hd], k) * ctx.scale;
        }
    }
    for h in 0..group {
        let row = &mut scores[h * n..(h + 1) * n];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in row.iter_mut() {
            *s = super::math::exp::<FMA>(*s - max);
        }
        let sum = sum8(row);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    job.out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if FMA && hd.is_multiple_of(64) {
        for h in 0..group {
            for c in (0..hd).step_by(64) {
                let w = &scores[h * n..(h + 1) * n];
                let out = &mut job.out[h * hd + c..h * hd + c + 64];
                // SAFETY: FMA is true only inside `attend_avx2` (AVX2 and FMA detected).
                unsafe { weigh_values_avx(ctx, keys.clone(), c, w, out) };
            }
        }
        return;
    }
    for (jj, at) in keys {
        let v = &ctx.vc[at..at + hd];
        for h in 0..group {
            let w = scores[h * n + jj];
            for (o, &x) in job.out[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                *o = if FMA { w.mul_add(x, *o) } else { *o + w * x };
            }
        }
    }
}

/// `out[d] = sum over keys j, in order, of w[j] * v_j[c + d]` for 64
/// columns `d`, fused multiply-adds from zero: the loop above, bit for bit,
/// with the 64 sums in registers rather than stored and reloaded per key.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` holds 64 floats; `w` a weight per key.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weigh_values_avx(ctx: &Ctx, keys: KeyRows, c: usize, w: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: each key's row has head_dim >= c + 64 floats at its offset
    // (the cache's bounds were checked when the step was validated); `out`
    // holds 64; the features per the caller.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 8];
        // (A loop, not a closure: closures do not inherit the caller's
        // target features, and their intrinsics would become calls.)
        for (jj, at) in keys {
            let v = ctx.vc.as_ptr().add(at + c);
            let wj = _mm256_set1_ps(*w.get_unchecked(jj));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v.add(8 * r)), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *a);
        }
    }
}

/// Keys `first..=pos` of a job in order, as (index from `first`, offset of
/// the key head's row in the cache), walking the block table a block at a
/// time (no division per key).
#[derive(Clone)]
struct KeyRows<'a> {
    table: &'a [u32],
    block_size: usize,
    kv_width: usize,
    kv_off: usize,
    first: usize,
    pos: usize,
    /// The next key, and the cache row of its block's next slot.
    j: usize,
    row: usize,
    /// Keys left in the current block.
    left: usize,
}

impl<'a> KeyRows<'a> {
    fn new(ctx: &Ctx, job: &Job<'a>) -> Self {
        KeyRows {
            table: job.block_table,
            block_size: ctx.block_size,
            kv_width: ctx.kv_width,
            kv_off: job.kv_off,
            first: job.first,
            pos: job.pos,
            j: job.first,
            row: 0,
            left: 0,
        }
    }
}

impl Iterator for KeyRows<'_> {
    type Item = (usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.j > self.pos {
            return None;
        }
        if self.left == 0 {
            let bs = self.block_size;
            let (blk, within) = (self.j / bs, self.j % bs);
            self.row = self.table[blk] as usize * bs + within;
            self.left = (self.pos - self.j).min(bs - 1 - within) + 1;
        }
        let item = (self.j - self.first, self.row * self.kv_width + self.kv_off);
        self.j += 1;
        self.row += 1;
        self.left -= 1;
        Some(item)
    }
}

/// Sum in eight lanes, then theirs as [`dot8`] adds them, then the rest.
#[inline(always)]
fn sum8(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = a.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    hsum8(&acc) + tail
}

/// [`dot8`], with AVX intrinsics where `FMA` (only [`attend_avx2`], which
/// runs where AVX2 and FMA were detected, instantiates that): the same
/// lanes and order, so the same result, but one 256-bit operation per
/// eight products (the compiler splits `dot8`'s lanes into 64-bit pieces).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true only inside `attend_avx2`, whose features
        // (AVX2, FMA) were detected before it was called.
        return unsafe { dot_avx(a, b) };
    }
    dot8::<FMA>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n8 = n / 8 * 8;
    let tail: f32 = a[n8..n].iter().zip(&b[n8..n]).map(|(x, y)| x * y).sum();
    // SAFETY: every load reads 8 floats below n8; AVX and FMA per the caller.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
            i += 8;
        }
        super::x86::hsum(acc) + tail
    }
}

/// Dot product in eight lanes (then their sum), the width of one AVX register.
#[inline(always)]
fn dot8<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    hsum8(&acc) + tail
}
