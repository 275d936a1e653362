//! Paged attention on the CPU: keys and values live in fixed-size blocks,
//! each sequence names its blocks through a block table, and one call serves
//! any mix of prefill chunks and decode tokens.

use rayon::prelude::*;

use super::matmul::dot;
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
    let bs = spec.block_size;

    // Which sequence each token belongs to, so every (token, head) pair is an independent task.
    let mut seq_of = vec![0usize; step.tokens.len()];
    for (si, s) in step.seqs.iter().enumerate() {
        seq_of[s.query_start..s.query_start + s.query_len].fill(si);
    }

    let mut out = vec![0f32; q.data.len()];
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (t, h) = (idx / p.n_heads, idx % p.n_heads);
            let seq = &step.seqs[seq_of[t]];
            // Position of this query within its sequence; it sees keys 0..=pos.
            let pos = seq.context_len - seq.query_len + (t - seq.query_start);
            let first = match p.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let qv = &q.data[idx * hd..(idx + 1) * hd];
            let kv_off = (h / group) * hd;
            let slot = |j: usize| seq.block_table[j / bs] as usize * bs + j % bs;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in first..=pos {
                let base = slot(j) * kv_width + kv_off;
                let s = dot(qv, &kc[base..base + hd]) * p.scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for (j, &w) in (first..=pos).zip(scores.iter()) {
                let base = slot(j) * kv_width + kv_off;
                let w = w * inv;
                for (o, &v) in o.iter_mut().zip(&vc[base..base + hd]) {
                    *o += w * v;
                }
            }
        },
    );
    CpuTensor::new(q.shape.clone(), out)
}
