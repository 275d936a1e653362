//! Paged attention on the CPU: keys and values live in fixed-size blocks,
//! each sequence names its blocks through a block table, and one call serves
//! any mix of prefill chunks and decode tokens.

use rayon::prelude::*;

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
    let (hd, group, bs) = (ctx.hd, ctx.group, ctx.block_size);
    let n = job.pos + 1 - job.first;
    let base =
        |j: usize| (job.block_table[j / bs] as usize * bs + j % bs) * ctx.kv_width + job.kv_off;
    scores.clear();
    scores.resize(group * n, 0.0);
    for (jj, j) in (job.first..=job.pos).enumerate() {
        let k = &ctx.kc[base(j)..base(j) + hd];
        for h in 0..group {
            scores[h * n + jj] = dot8::<FMA>(&job.q[h * hd..(h + 1) * hd], k) * ctx.scale;
        }
    }
    for h in 0..group {
        let row = &mut scores[h * n..(h + 1) * n];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    job.out.fill(0.0);
    for (jj, j) in (job.first..=job.pos).enumerate() {
        let v = &ctx.vc[base(j)..base(j) + hd];
        for h in 0..group {
            let w = scores[h * n + jj];
            for (o, &x) in job.out[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                *o = if FMA { w.mul_add(x, *o) } else { *o + w * x };
            }
        }
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
    let s = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s[0] + s[2]) + (s[1] + s[3]) + tail
}
