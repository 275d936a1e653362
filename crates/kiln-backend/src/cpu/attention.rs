//! Paged attention on the CPU: keys and values live in fixed-size blocks,
//! each sequence names its blocks through a block table, and one call serves
//! any mix of prefill chunks and decode tokens.
//!
//! Values are stored a token per row (`[slot][kv head][dim]`). Keys are
//! stored transposed within each block (`[block][kv head][dim][slot in
//! block]`, see [`key_at`]): one vector load then gives dimension `d` of
//! consecutive keys, and a query's scores against 8 or 16 keys come out of
//! one broadcast-and-FMA per dimension with no horizontal sums. Lane for
//! lane that is the same arithmetic as the dot product of [`dot8`], so a
//! score does not depend on how many keys were computed together.
//!
//! The cache stores f32, f16 or q8_0 ([`crate::KvDtype`], see `kv_cache.rs`);
//! the kernels are generic over the stored element ([`KvElem`]) and widen
//! each element to f32 as they load it (exactly; q8_0's integers then times
//! their block's scale, one rounding), so every path computes with the same
//! numbers and the arithmetic after the load is the f32 cache's.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::arch::x86;
#[cfg(target_arch = "x86_64")]
use super::isa;
use super::kv_cache::{key_at, key_scale_at, CpuKvCache, PlaneRef};
use super::kv_elem::KvElem;
use super::math::{hsum8, sum8};
use super::tensor::CpuTensor;
use crate::{AttentionParams, BackendError, Result, StepInput, Q8_0_BLOCK};
use half::f16;

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
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= spec.slots()) {
        return Err(BackendError::Invalid {
            op: "write_kv",
            msg: format!("slot {s} beyond {}", spec.slots()),
        });
    }
    let (mut kc, mut vc) = cache.layer_mut(layer);
    let (hd, bs, n_kv) = (spec.head_dim, spec.block_size, spec.n_kv_heads);
    let nb = hd.div_ceil(Q8_0_BLOCK);
    for (i, &s) in slots.iter().enumerate() {
        let s = s as usize;
        let (krow, vrow) = (
            &k.data[i * width..(i + 1) * width],
            &v.data[i * width..(i + 1) * width],
        );
        for (h, (kh, vh)) in krow.chunks_exact(hd).zip(vrow.chunks_exact(hd)).enumerate() {
            let (at, sat) = (
                key_at(s, h, width, hd, bs),
                key_scale_at(s, h, n_kv, nb, bs),
            );
            kc.put(kh, at, bs, sat, bs);
            vc.put(vh, s * width + h * hd, 1, (s * n_kv + h) * nb, 1);
        }
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
    check_sinks(p)?;
    let (kc, vc) = cache.layer(layer);
    let mut out = vec![0f32; q.data.len()];
    let no_scales: &[f16] = &[];
    match (kc, vc) {
        (PlaneRef::F32(kc), PlaneRef::F32(vc)) => attend_all(
            q,
            (kc, no_scales),
            (vc, no_scales),
            step,
            p,
            spec.block_size,
            &mut out,
        ),
        (PlaneRef::F16(kc), PlaneRef::F16(vc)) => attend_all(
            q,
            (kc, no_scales),
            (vc, no_scales),
            step,
            p,
            spec.block_size,
            &mut out,
        ),
        (PlaneRef::Q8 { q: kq, d: kd }, PlaneRef::Q8 { q: vq, d: vd }) => {
            attend_all(q, (kq, kd), (vq, vd), step, p, spec.block_size, &mut out)
        }
        _ => {
            return Err(BackendError::Invalid {
                op: "attention",
                msg: "keys and values stored in different types".into(),
            })
        }
    }
    CpuTensor::new(q.shape.clone(), out)
}

/// Every task of [`paged_attention`] over one layer's keys and values
/// stored as `K` (each with its q8_0 scales, empty for other types), into
/// `out`.
fn attend_all<K: KvElem>(
    q: &CpuTensor,
    (kc, ks): (&[K], &[f16]),
    (vc, vs): (&[K], &[f16]),
    step: &StepInput,
    p: &AttentionParams,
    block_size: usize,
    out: &mut [f32],
) {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let kv_width = p.n_kv_heads * hd;

    // Which sequence each token belongs to, so every (token, KV head) pair is an independent task.
    let mut seq_of = vec![0usize; step.tokens.len()];
    for (si, s) in step.seqs.iter().enumerate() {
        seq_of[s.query_start..s.query_start + s.query_len].fill(si);
    }
    let ctx = Ctx {
        kc,
        vc,
        ks,
        vs,
        nb: hd.div_ceil(Q8_0_BLOCK),
        hd,
        group,
        kv_width,
        block_size,
        scale: p.scale,
        softcap: p.softcap,
    };
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
                kv_head: g,
                block_table: &seq.block_table,
                first,
                pos,
                sinks: p.sinks.map(|s| &s[g * group..(g + 1) * group]),
            };
            #[cfg(target_arch = "x86_64")]
            {
                use isa::Isa;
                match isa::chosen().simd {
                    Some(Isa::Avx512Vnni) => {
                        // SAFETY: the CPU features (AVX-512F among them) were detected.
                        unsafe { attend_avx512(&ctx, job, scores) };
                        return;
                    }
                    Some(_) => {
                        // SAFETY: the CPU features were detected.
                        unsafe { attend_avx2(&ctx, job, scores) };
                        return;
                    }
                    None => {}
                }
            }
            attend::<false, false, K>(&ctx, job, scores);
        });
}

/// Refuses sinks that are not one finite logit per query head (they come
/// from a checkpoint: a wrong count or a NaN must not reach the softmax).
fn check_sinks(p: &AttentionParams) -> Result<()> {
    match p.sinks {
        Some(s) if s.len() != p.n_heads => Err(BackendError::Shape {
            op: "attention",
            msg: format!("{} attention sinks for {} heads", s.len(), p.n_heads),
        }),
        Some(s) if s.iter().any(|x| !x.is_finite()) => Err(BackendError::Invalid {
            op: "attention",
            msg: "an attention sink is not finite".into(),
        }),
        _ => Ok(()),
    }
}

/// What every attention task shares.
struct Ctx<'a, K> {
    /// Keys and values as stored; their q8_0 scales (empty for other types).
    kc: &'a [K],
    vc: &'a [K],
    ks: &'a [f16],
    vs: &'a [f16],
    /// q8_0 blocks per head.
    nb: usize,
    hd: usize,
    group: usize,
    kv_width: usize,
    block_size: usize,
    scale: f32,
    /// Gemma 2's soft cap on the scaled scores.
    softcap: Option<f32>,
}

impl<K: KvElem> Ctx<'_, K> {
    /// Key element `i` as f32, times scale `si` for q8_0.
    #[inline(always)]
    fn key(&self, i: usize, si: usize) -> f32 {
        let x = self.kc[i].widen();
        if K::SCALED {
            x * self.ks[si].to_f32()
        } else {
            x
        }
    }

    /// Value element `i` as f32, times scale `si` for q8_0.
    #[inline(always)]
    fn value(&self, i: usize, si: usize) -> f32 {
        let x = self.vc[i].widen();
        if K::SCALED {
            x * self.vs[si].to_f32()
        } else {
            x
        }
    }
}

/// One task: a token's group of query heads.
struct Job<'a> {
    q: &'a [f32],
    out: &'a mut [f32],
    /// The KV head the group's queries share.
    kv_head: usize,
    block_table: &'a [u32],
    first: usize,
    pos: usize,
    /// The group's attention sinks (one logit per query head), if any.
    sinks: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2<K: KvElem>(ctx: &Ctx<K>, job: Job, scores: &mut Vec<f32>) {
    attend::<true, false, K>(ctx, job, scores)
}

/// [`attend_avx2`] with values weighed in 512-bit registers (the same
/// operations lane by lane, so the same results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn attend_avx512<K: KvElem>(ctx: &Ctx<K>, job: Job, scores: &mut Vec<f32>) {
    attend::<true, true, K>(ctx, job, scores)
}

/// Softmax attention of `job.q`'s heads over keys `first..=pos`: scores, then
/// their softmax, then the weighted sum of values. The arithmetic for a query
/// depends only on its own position and the cache, never on the rest of the
/// batch (batch invariance).
#[inline(always)]
fn attend<const FMA: bool, const WIDE: bool, K: KvElem>(
    ctx: &Ctx<K>,
    job: Job,
    scores: &mut Vec<f32>,
) {
    let (hd, group) = (ctx.hd, ctx.group);
    let n = job.pos + 1 - job.first;
    scores.clear();
    scores.resize(group * n, 0.0);
    let keys = KeyRows::new(ctx, &job);
    let vector = FMA && hd.is_multiple_of(8);
    scores_into::<FMA, WIDE, K>(ctx, &job, keys.clone(), scores, n, vector);
    if let Some(cap) = ctx.softcap {
        // Score by score, so a score still depends on nothing but its query and key.
        scores.iter_mut().for_each(|s| *s = (*s / cap).tanh() * cap);
    }
    for h in 0..group {
        let row = &mut scores[h * n..(h + 1) * n];
        let mut max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sink = job.sinks.map(|s| s[h]);
        if let Some(s) = sink {
            max = max.max(s);
        }
        for s in row.iter_mut() {
            *s = super::math::exp::<FMA>(*s - max);
        }
        let mut sum = sum8(row);
        // A sink takes its share of the denominator and contributes no value.
        if let Some(s) = sink {
            sum += super::math::exp::<FMA>(s - max);
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
    job.out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if WIDE && hd.is_multiple_of(64) {
        for c in (0..hd).step_by(64) {
            let mut h0 = 0;
            while h0 < group {
                let heads = (group - h0).min(4);
                let (col, w) = (job.kv_head * hd + c, &scores[h0 * n..]);
                let out = &mut job.out[h0 * hd + c..];
                // SAFETY: WIDE is true only inside `attend_avx512` (AVX-512F
                // detected); `w` holds `heads` rows of n weights, `out`
                // `heads` rows of hd from column c.
                unsafe {
                    match heads {
                        1 => weigh_values_512::<1, K>(ctx, keys.clone(), col, w, n, out),
                        2 => weigh_values_512::<2, K>(ctx, keys.clone(), col, w, n, out),
                        3 => weigh_values_512::<3, K>(ctx, keys.clone(), col, w, n, out),
                        _ => weigh_values_512::<4, K>(ctx, keys.clone(), col, w, n, out),
                    }
                }
                h0 += heads;
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if FMA && hd.is_multiple_of(64) {
        for h in 0..group {
            for c in (0..hd).step_by(64) {
                let w = &scores[h * n..(h + 1) * n];
                let out = &mut job.out[h * hd + c..h * hd + c + 64];
                // SAFETY: FMA is true only inside `attend_avx2` (AVX2 and FMA detected).
                unsafe { weigh_values_avx(ctx, keys.clone(), job.kv_head * hd + c, w, out) };
            }
        }
        return;
    }
    let mut v = vec![0f32; hd];
    for (jj, slot) in keys {
        let at = slot * ctx.kv_width + job.kv_head * hd;
        let sat = (slot * ctx.kv_width / hd + job.kv_head) * ctx.nb;
        for (d, x) in v.iter_mut().enumerate() {
            *x = ctx.value(at + d, sat + d / Q8_0_BLOCK);
        }
        for h in 0..group {
            let w = scores[h * n + jj];
            for (o, &x) in job.out[h * hd..(h + 1) * hd].iter_mut().zip(&v) {
                *o = if FMA { w.mul_add(x, *o) } else { *o + w * x };
            }
        }
    }
}

/// `out[d] = sum over keys j, in order, of w[j] * v_j[c + d]` for 64
/// columns `d` (`c` counts from the start of the slot's row), fused multiply-adds from zero: the loop above, bit for bit,
/// with the 64 sums in registers rather than stored and reloaded per key.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` holds 64 floats; `w` a weight per key.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weigh_values_avx<K: KvElem>(
    ctx: &Ctx<K>,
    keys: KeyRows,
    c: usize,
    w: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    // q8_0: the first of the two scales of these 64 columns, from the slot's.
    let (scales_per_slot, sc) = value_scales(ctx, c);
    // SAFETY: each key's row has head_dim >= c + 64 floats at its offset
    // (the cache's bounds were checked when the step was validated); `out`
    // holds 64; the features per the caller.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 8];
        // (A loop, not a closure: closures do not inherit the caller's
        // target features, and their intrinsics would become calls.)
        for (jj, slot) in keys {
            let v = ctx.vc.as_ptr().add(slot * ctx.kv_width + c);
            let wj = _mm256_set1_ps(*w.get_unchecked(jj));
            let d = if K::SCALED {
                let s = ctx.vs.as_ptr().add(slot * scales_per_slot + sc);
                [
                    _mm256_set1_ps((*s).to_f32()),
                    _mm256_set1_ps((*s.add(1)).to_f32()),
                ]
            } else {
                [_mm256_setzero_ps(); 2]
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let x = K::load8(v.add(8 * r));
                let x = if K::SCALED {
                    _mm256_mul_ps(x, d[r / 4])
                } else {
                    x
                };
                *a = _mm256_fmadd_ps(wj, x, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *a);
        }
    }
}

/// [`weigh_values_avx`] for `H` heads at once on 512-bit registers: each
/// value row is loaded once for all of them. `w` holds the heads' weights
/// as rows of `n`; `out` their outputs as rows of the head size, from the
/// 64 columns at hand.
///
/// # Safety
/// The CPU has AVX-512F; as [`weigh_values_avx`] otherwise.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weigh_values_512<const H: usize, K: KvElem>(
    ctx: &Ctx<K>,
    keys: KeyRows,
    col: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (scales_per_slot, sc) = value_scales(ctx, col);
    // SAFETY: as `weigh_values_avx`; `w` and `out` hold H rows (the caller).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for (jj, slot) in keys {
            let v = ctx.vc.as_ptr().add(slot * ctx.kv_width + col);
            let d = if K::SCALED {
                let s = ctx.vs.as_ptr().add(slot * scales_per_slot + sc);
                [
                    _mm512_set1_ps((*s).to_f32()),
                    _mm512_set1_ps((*s.add(1)).to_f32()),
                ]
            } else {
                [_mm512_setzero_ps(); 2]
            };
            let mut vv = [_mm512_setzero_ps(); 4];
            for (r, x) in vv.iter_mut().enumerate() {
                let y = K::load16(v.add(16 * r));
                *x = if K::SCALED {
                    _mm512_mul_ps(y, d[r / 2])
                } else {
                    y
                };
            }
            for (hh, a) in acc.iter_mut().enumerate() {
                let wj = _mm512_set1_ps(*w.get_unchecked(hh * n + jj));
                for (ar, &x) in a.iter_mut().zip(&vv) {
                    *ar = _mm512_fmadd_ps(wj, x, *ar);
                }
            }
        }
        for (hh, a) in acc.iter().enumerate() {
            for (r, x) in a.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(hh * ctx.hd + 16 * r), *x);
            }
        }
    }
}

/// For the value kernels' 64 columns from `col` (of a slot's row of all
/// KV heads): q8_0 scales per slot, and the index of the columns' first
/// scale within a slot's (the second is the next one).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn value_scales<K>(ctx: &Ctx<K>, col: usize) -> (usize, usize) {
    let heads = ctx.kv_width / ctx.hd;
    (
        heads * ctx.nb,
        (col / ctx.hd) * ctx.nb + (col % ctx.hd) / Q8_0_BLOCK,
    )
}

/// Keys `first..=pos` of a job in order, as (index from `first`, cache
/// slot), walking the block table a block at a time (no division per key).
#[derive(Clone)]
struct KeyRows<'a> {
    table: &'a [u32],
    block_size: usize,
    first: usize,
    pos: usize,
    /// The next key, and the cache slot of its block's next slot.
    j: usize,
    row: usize,
    /// Keys left in the current block.
    left: usize,
}

impl<'a> KeyRows<'a> {
    fn new<K>(ctx: &Ctx<K>, job: &Job<'a>) -> Self {
        KeyRows {
            table: job.block_table,
            block_size: ctx.block_size,
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
        let item = (self.j - self.first, self.row);
        self.j += 1;
        self.row += 1;
        self.left -= 1;
        Some(item)
    }
}

/// Every score of `job` into `scores[h * n + jj]` (head `h` of the group,
/// key `first + jj`): with `vector` (only where `FMA`, on x86-64, and for
/// head sizes that are multiples of 8) from [`scores_avx`], otherwise key
/// by key with [`dot`]; both give the same bits.
#[inline(always)]
fn scores_into<const FMA: bool, const WIDE: bool, K: KvElem>(
    ctx: &Ctx<K>,
    job: &Job,
    keys: KeyRows,
    scores: &mut [f32],
    n: usize,
    vector: bool,
) {
    let hd = ctx.hd;
    #[cfg(target_arch = "x86_64")]
    if FMA && vector {
        if WIDE {
            let mut h0 = 0;
            while h0 < ctx.group {
                let heads = (ctx.group - h0).min(3);
                // SAFETY: WIDE is true only inside `attend_avx512` (AVX-512F
                // detected); `hd` is a multiple of 8; heads h0..h0 + heads
                // are of the group, whose rows `scores` holds.
                unsafe {
                    match heads {
                        1 => scores_512::<1, K>(ctx, job, h0, scores, n),
                        2 => scores_512::<2, K>(ctx, job, h0, scores, n),
                        _ => scores_512::<3, K>(ctx, job, h0, scores, n),
                    }
                }
                h0 += heads;
            }
            return;
        }
        // SAFETY: FMA is true only where AVX2 and FMA were detected (inside
        // `attend_avx2`, or a test that checked); `hd` is a multiple of 8
        // (the caller's `vector`); `scores` holds group x n.
        unsafe { scores_avx(ctx, job, scores, n) };
        return;
    }
    let _ = vector;
    let mut key = vec![0f32; hd];
    let (bs, n_kv) = (ctx.block_size, ctx.kv_width / hd);
    for (jj, slot) in keys {
        let at = key_at(slot, job.kv_head, ctx.kv_width, hd, bs);
        let sat = key_scale_at(slot, job.kv_head, n_kv, ctx.nb, bs);
        for (d, k) in key.iter_mut().enumerate() {
            *k = ctx.key(at + d * bs, sat + (d / Q8_0_BLOCK) * bs);
        }
        for h in 0..ctx.group {
            scores[h * n + jj] = dot::<FMA>(&job.q[h * hd..(h + 1) * hd], &key) * ctx.scale;
        }
    }
}

/// The keys `first..=pos` of `job` as runs inside one KV block each:
/// (where the first key's dimension 0 is in the key cache, that key's
/// position, keys in the run, where its first q8_0 scale is). Keys are
/// transposed within a block ([`key_at`], [`key_scale_at`]), so a run's
/// keys are consecutive for every dimension.
#[cfg(target_arch = "x86_64")]
fn key_runs<'a, K>(
    ctx: &'a Ctx<K>,
    job: &'a Job,
) -> impl Iterator<Item = (usize, usize, usize, usize)> + 'a {
    let (hd, bs) = (ctx.hd, ctx.block_size);
    let mut j = job.first;
    std::iter::from_fn(move || {
        if j > job.pos {
            return None;
        }
        let (blk, w) = (j / bs, j % bs);
        let count = (bs - w).min(job.pos + 1 - j);
        let slot = job.block_table[blk] as usize * bs + w;
        let base = key_at(slot, job.kv_head, ctx.kv_width, hd, bs);
        let scales = key_scale_at(slot, job.kv_head, ctx.kv_width / hd, ctx.nb, bs);
        let run = (base, j, count, scales);
        j += count;
        Some(run)
    })
}

/// Every score of `job` (`scores[h * n + jj]` for head `h` of the group and
/// key `first + jj`), eight keys per vector from the transposed key blocks:
/// lane by lane the arithmetic of [`dot_avx`] (eight partial sums over
/// dimensions `l, l + 8, ...`, fused, then added as [`x86::int::hsum`]
/// adds them), so bit for bit the same scores.
///
/// # Safety
/// The CPU has AVX2 and FMA; `hd` is a multiple of 8; `scores` holds
/// `group * n` floats; the job's keys are inside the cache (checked when
/// the step was validated).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_avx<K: KvElem>(ctx: &Ctx<K>, job: &Job, scores: &mut [f32], n: usize) {
    use std::arch::x86_64::*;
    let (hd, bs) = (ctx.hd, ctx.block_size);
    // What `dot_avx` adds for the dimensions past the last multiple of 8:
    // none here, an empty sum.
    let tail: f32 = [0f32; 0].iter().sum();
    // SAFETY: loads stay inside the key rows of this block (masked past
    // the keys wanted); stores inside `scores`; features per the caller.
    // (Loops, not closures: closures do not inherit target features.)
    unsafe {
        let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let (tail, scale) = (_mm256_set1_ps(tail), _mm256_set1_ps(ctx.scale));
        for (base, j, count, scales) in key_runs(ctx, job) {
            let mut c = 0;
            while c < count {
                let lanes = (count - c).min(8);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane_ids);
                let kp = ctx.kc.as_ptr().add(base + c);
                for h in 0..ctx.group {
                    let q = job.q.as_ptr().add(h * hd);
                    let mut p = [_mm256_setzero_ps(); 8];
                    let mut scale8 = _mm256_setzero_ps();
                    for d0 in (0..hd).step_by(8) {
                        if K::SCALED && d0 % Q8_0_BLOCK == 0 {
                            // The scales of these (up to) 8 keys for dimensions d0..d0 + 32
                            // (lanes past the run read the padding or other keys' scales).
                            let sp = ctx.ks.as_ptr().add(scales + (d0 / Q8_0_BLOCK) * bs + c);
                            scale8 = f16::load8(sp);
                        }
                        for (l, pl) in p.iter_mut().enumerate() {
                            let d = d0 + l;
                            let k = if K::IS_F32 {
                                _mm256_maskload_ps(kp.add(d * bs) as *const f32, mask)
                            } else {
                                // Unmasked: the lanes past the run are dropped at the store.
                                K::load8(kp.add(d * bs))
                            };
                            let k = if K::SCALED {
                                _mm256_mul_ps(k, scale8)
                            } else {
                                k
                            };
                            *pl = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(d)), k, *pl);
                        }
                    }
                    let s = [
                        _mm256_add_ps(p[0], p[4]),
                        _mm256_add_ps(p[1], p[5]),
                        _mm256_add_ps(p[2], p[6]),
                        _mm256_add_ps(p[3], p[7]),
                    ];
                    let t = [_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3])];
                    let y = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(t[0], t[1]), tail), scale);
                    let out = scores.as_mut_ptr().add(h * n + (j - job.first) + c);
                    _mm256_maskstore_ps(out, mask, y);
                }
                c += lanes;
            }
        }
    }
}

/// [`scores_avx`] for heads `h0..h0 + H` of the group on 512-bit
/// registers: sixteen keys per vector (a whole block at the default block
/// size), and each key vector loaded once for the `H` heads. Lane by lane
/// the same operations, so the same bits.
///
/// # Safety
/// The CPU has AVX-512F (and FMA); as [`scores_avx`] otherwise, with
/// `h0 + H <= group`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_512<const H: usize, K: KvElem>(
    ctx: &Ctx<K>,
    job: &Job,
    h0: usize,
    scores: &mut [f32],
    n: usize,
) {
    use std::arch::x86_64::*;
    let (hd, bs) = (ctx.hd, ctx.block_size);
    // SAFETY: as in `scores_avx`: loads inside the key rows of the block
    // (masked past the keys wanted), stores inside `scores`.
    // (Loops, not closures: closures do not inherit target features.)
    unsafe {
        let scale = _mm512_set1_ps(ctx.scale);
        let tail = _mm512_setzero_ps();
        for (base, j, count, scales) in key_runs(ctx, job) {
            let mut c = 0;
            while c < count {
                let lanes = (count - c).min(16);
                let mask: __mmask16 = if lanes == 16 { !0 } else { (1 << lanes) - 1 };
                let kp = ctx.kc.as_ptr().add(base + c);
                let mut p = [[_mm512_setzero_ps(); 8]; H];
                let mut scale16 = _mm512_setzero_ps();
                for d0 in (0..hd).step_by(8) {
                    if K::SCALED && d0 % Q8_0_BLOCK == 0 {
                        let sp = ctx.ks.as_ptr().add(scales + (d0 / Q8_0_BLOCK) * bs + c);
                        scale16 = f16::load16(sp);
                    }
                    for l in 0..8 {
                        let d = d0 + l;
                        let k = if K::IS_F32 {
                            _mm512_maskz_loadu_ps(mask, kp.add(d * bs) as *const f32)
                        } else {
                            K::load16(kp.add(d * bs))
                        };
                        let k = if K::SCALED {
                            _mm512_mul_ps(k, scale16)
                        } else {
                            k
                        };
                        for (hh, ph) in p.iter_mut().enumerate() {
                            let q = _mm512_set1_ps(*job.q.as_ptr().add((h0 + hh) * hd + d));
                            ph[l] = _mm512_fmadd_ps(q, k, ph[l]);
                        }
                    }
                }
                for (hh, ph) in p.iter().enumerate() {
                    let s = [
                        _mm512_add_ps(ph[0], ph[4]),
                        _mm512_add_ps(ph[1], ph[5]),
                        _mm512_add_ps(ph[2], ph[6]),
                        _mm512_add_ps(ph[3], ph[7]),
                    ];
                    let t = [_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3])];
                    let y = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(t[0], t[1]), tail), scale);
                    let out = scores.as_mut_ptr().add((h0 + hh) * n + (j - job.first) + c);
                    _mm512_mask_storeu_ps(out, mask, y);
                }
                c += lanes;
            }
        }
    }
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
        x86::int::hsum(acc) + tail
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::cpu::isa::Isa;
    use crate::cpu::test_support::{rand_vec, Coverage, Path};
    use crate::{KvDtype, KvSpec, SeqSlice};

    const DTYPES: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0];

    /// Whether this CPU runs `isa`'s kernels (whatever `KILN_CPU_ISA` caps
    /// the server's choice to: the tests call the kernels directly).
    fn cpu_has(isa: Isa) -> bool {
        Isa::all_supported().contains(&isa)
    }

    /// A one-layer cache of `dtype` with `n_kv` heads of `hd` holding `len`
    /// random keys and values (seeds `seed` and `seed + 1`) in scattered
    /// blocks of `bs`, written in one step: the cache, its block table, and
    /// the keys and values as rows of `n_kv * hd`.
    fn filled_cache(
        dtype: KvDtype,
        (bs, hd, n_kv): (usize, usize, usize),
        num_blocks: usize,
        len: usize,
        seed: u64,
    ) -> (CpuKvCache, Vec<u32>, Vec<f32>, Vec<f32>) {
        let spec = KvSpec {
            n_layers: 1,
            num_blocks,
            block_size: bs,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let mut cache = CpuKvCache::alloc(&spec, dtype).unwrap();
        let width = n_kv * hd;
        let table: Vec<u32> = (0..len.div_ceil(bs) as u32).rev().collect();
        let step = StepInput {
            tokens: vec![0; len],
            positions: (0..len as u32).collect(),
            slots: (0..len)
                .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                .collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: len,
                context_len: len,
                block_table: table.clone(),
            }],
            logit_rows: vec![len as u32 - 1],
        };
        let (keys, vals) = (rand_vec(len * width, seed), rand_vec(len * width, seed + 1));
        let k = CpuTensor::new(vec![len, width], keys.clone()).unwrap();
        let v = CpuTensor::new(vec![len, width], vals.clone()).unwrap();
        write_kv(&mut cache, 0, &k, &v, &step.slots).unwrap();
        (cache, table, keys, vals)
    }

    /// Calls `$body` with `ctx` bound to a [`Ctx`] over layer 0 of `$cache`
    /// in its stored element type (a macro: the body is generic over it).
    macro_rules! with_ctx {
        ($cache:expr, $hd:expr, $group:expr, $width:expr, $bs:expr, $scale:expr, |$ctx:ident| $body:block) => {{
            let no: &[f16] = &[];
            match $cache.layer(0) {
                (PlaneRef::F32(kc), PlaneRef::F32(vc)) => {
                    let $ctx = Ctx {
                        kc,
                        vc,
                        ks: no,
                        vs: no,
                        nb: $hd.div_ceil(Q8_0_BLOCK),
                        hd: $hd,
                        group: $group,
                        kv_width: $width,
                        block_size: $bs,
                        scale: $scale,
                        softcap: None,
                    };
                    $body
                }
                (PlaneRef::F16(kc), PlaneRef::F16(vc)) => {
                    let $ctx = Ctx {
                        kc,
                        vc,
                        ks: no,
                        vs: no,
                        nb: $hd.div_ceil(Q8_0_BLOCK),
                        hd: $hd,
                        group: $group,
                        kv_width: $width,
                        block_size: $bs,
                        scale: $scale,
                        softcap: None,
                    };
                    $body
                }
                (PlaneRef::Q8 { q: kc, d: ks }, PlaneRef::Q8 { q: vc, d: vs }) => {
                    let $ctx = Ctx {
                        kc,
                        vc,
                        ks,
                        vs,
                        nb: $hd.div_ceil(Q8_0_BLOCK),
                        hd: $hd,
                        group: $group,
                        kv_width: $width,
                        block_size: $bs,
                        scale: $scale,
                        softcap: None,
                    };
                    $body
                }
                _ => unreachable!("keys and values of one type"),
            }
        }};
    }

    /// [`scores_into`] with the 512-bit kernels' features.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn scores_wide<K: KvElem>(
        ctx: &Ctx<K>,
        job: &Job,
        keys: KeyRows,
        out: &mut [f32],
        n: usize,
    ) {
        scores_into::<true, true, K>(ctx, job, keys, out, n, true)
    }

    /// [`scores_into`] with the 256-bit kernels' features.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_narrow<K: KvElem>(
        ctx: &Ctx<K>,
        job: &Job,
        keys: KeyRows,
        out: &mut [f32],
        n: usize,
        vector: bool,
    ) {
        scores_into::<true, false, K>(ctx, job, keys, out, n, vector)
    }

    /// Scores from the transposed key blocks, eight (or sixteen, on 512-bit
    /// registers, for groups of heads split three at a time) keys at a time
    /// with masked partial vectors, are the key-by-key dot products bit for
    /// bit, whatever the block size and wherever the keys start and stop,
    /// for every stored type (f16 and q8_0 widened as they are loaded).
    #[test]
    fn vector_scores_equal_key_by_key_scores() {
        let mut cov = Coverage::new("vector_scores_equal_key_by_key_scores");
        // Without AVX2 only the key-by-key path exists: `finish` says so.
        let (vector, wide) = (cpu_has(Isa::Avx2), cpu_has(Isa::Avx512Vnni));
        for dtype in DTYPES {
            for (bs, hd, group) in [
                (16usize, 64usize, 3usize),
                (5, 8, 1),
                (4, 24, 2),
                (32, 16, 5),
                (16, 64, 7),
                (16, 80, 2),
            ] {
                let n_kv = 2;
                let width = n_kv * hd;
                let len = (12 * bs).min(45);
                let (cache, table, _, _) = filled_cache(dtype, (bs, hd, n_kv), 12, len, 3);
                assert_eq!(cache.dtype(), dtype);
                with_ctx!(cache, hd, group, width, bs, 0.125, |ctx| {
                    let q = rand_vec(group * hd, 5);
                    let mut out = vec![0f32; group * hd];
                    for (first, pos) in [(0usize, len - 1), (3, len - 2), (bs + 1, bs + 1), (0, 0)]
                    {
                        let job = Job {
                            q: &q,
                            out: &mut out,
                            kv_head: 1,
                            block_table: &table,
                            first,
                            pos,
                            sinks: None,
                        };
                        let n = pos + 1 - first;
                        let (mut a, mut b) = (vec![0f32; group * n], vec![0f32; group * n]);
                        let keys = KeyRows::new(&ctx, &job);
                        scores_into::<true, false, _>(&ctx, &job, keys.clone(), &mut b, n, false);
                        cov.ran(Path::Portable);
                        if !vector {
                            continue;
                        }
                        // SAFETY: AVX2, FMA and F16C were detected.
                        unsafe { scores_narrow(&ctx, &job, keys.clone(), &mut a, n, true) };
                        cov.ran(Path::Avx2);
                        for (e, (x, y)) in a.iter().zip(&b).enumerate() {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{dtype}: bs {bs} hd {hd} keys {first}..={pos}, score {e}: {x} vs {y}"
                            );
                        }
                        if wide {
                            let mut c = vec![0f32; group * n];
                            // SAFETY: AVX-512F was detected.
                            unsafe { scores_wide(&ctx, &job, keys, &mut c, n) };
                            cov.ran(Path::Avx512);
                            for (e, (x, y)) in c.iter().zip(&b).enumerate() {
                                assert_eq!(
                                    x.to_bits(),
                                    y.to_bits(),
                                    "{dtype} 512-bit: bs {bs} hd {hd} keys {first}..={pos}, score {e}: {x} vs {y}"
                                );
                            }
                        }
                    }
                });
            }
        }
        cov.finish(&[Path::Portable, Path::Avx2, Path::Avx512]);
    }

    /// Softmax attention in f64 over the exact keys and values: head `h`'s
    /// output row.
    fn reference(q: &[f32], keys: &[f32], vals: &[f32], hd: usize, scale: f64) -> Vec<f64> {
        let len = keys.len() / hd;
        let s: Vec<f64> = (0..len)
            .map(|j| {
                let k = &keys[j * hd..(j + 1) * hd];
                q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (0..len).map(|j| e[j] / z * vals[j * hd + d] as f64).sum())
            .collect()
    }

    /// The 512-bit value weighing gives the 256-bit one's results bit for
    /// bit (and the portable loop's, with fused multiply-adds) for groups
    /// of heads beyond four and heads of 128 too, for every stored type;
    /// and each type is softmax attention over the exact keys and values
    /// within its rounding: f32 1e-5, f16 (relative error 2^-11 per
    /// element) 2e-3, q8_0 (half a step of amax / 127) 2e-2 on these
    /// uniform [-1, 1) inputs.
    #[test]
    fn wide_and_narrow_kernels_agree() {
        let cov = Coverage::new("wide_and_narrow_kernels_agree");
        if !cpu_has(Isa::Avx512Vnni) {
            // Only the 256-bit kernel runs on this CPU: nothing to compare.
            cov.finish(&[Path::Avx512]);
            return;
        }
        let mut cov = cov;
        for dtype in DTYPES {
            let tol = match dtype {
                KvDtype::F32 => 1e-5,
                KvDtype::F16 => 2e-3,
                _ => 2e-2,
            };
            for (bs, hd, group) in [(16usize, 64usize, 3usize), (5, 128, 5)] {
                let len = (8 * bs).min(37);
                let (cache, table, keys, vals) = filled_cache(dtype, (bs, hd, 1), 8, len, 6);
                let q = rand_vec(group * hd, 8);
                let pos = len - 1;
                let outs: Vec<Vec<f32>> = with_ctx!(cache, hd, group, hd, bs, 0.1, |ctx| {
                    (0..3)
                        .map(|path| {
                            let mut out = vec![0f32; group * hd];
                            let job = Job {
                                q: &q,
                                out: &mut out,
                                kv_head: 0,
                                block_table: &table,
                                first: 0,
                                pos,
                                sinks: None,
                            };
                            // SAFETY: AVX-512F (and so AVX2, FMA and F16C) were detected.
                            unsafe {
                                match path {
                                    0 => attend_avx512(&ctx, job, &mut Vec::new()),
                                    1 => attend_avx2(&ctx, job, &mut Vec::new()),
                                    _ => portable_fma(&ctx, job),
                                }
                            }
                            out
                        })
                        .collect()
                });
                cov.ran(Path::Avx512);
                for other in &outs[1..] {
                    for (e, (a, b)) in outs[0].iter().zip(other).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dtype}: bs {bs} hd {hd} group {group}, output {e}"
                        );
                    }
                }
                for h in 0..group {
                    let want = reference(&q[h * hd..(h + 1) * hd], &keys, &vals, hd, 0.1);
                    for d in 0..hd {
                        let got = outs[0][h * hd + d] as f64;
                        assert!(
                            (got - want[d]).abs() < tol,
                            "{dtype}: head {h} dim {d}: {got} vs {}",
                            want[d]
                        );
                    }
                }
            }
        }
        cov.finish(&[Path::Avx512]);
    }

    /// [`attend`] with fused multiply-adds but no vector kernels (head
    /// sizes not multiples of 64 take this path for the values).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn portable_fma<K: KvElem>(ctx: &Ctx<K>, job: Job) {
        // The vector score kernels give the key-by-key bits (the test
        // above); the value loop below is the portable one.
        let (hd, group) = (ctx.hd, ctx.group);
        let n = job.pos + 1 - job.first;
        let mut scores = vec![0f32; group * n];
        let keys = KeyRows::new(ctx, &job);
        scores_into::<true, false, K>(ctx, &job, keys.clone(), &mut scores, n, true);
        for h in 0..group {
            let row = &mut scores[h * n..(h + 1) * n];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in row.iter_mut() {
                *s = super::super::math::exp::<true>(*s - max);
            }
            let inv = 1.0 / sum8(row);
            row.iter_mut().for_each(|s| *s *= inv);
        }
        job.out.fill(0.0);
        let mut v = vec![0f32; hd];
        for (jj, slot) in keys {
            let at = slot * ctx.kv_width + job.kv_head * hd;
            let sat = (slot * ctx.kv_width / hd + job.kv_head) * ctx.nb;
            for (d, x) in v.iter_mut().enumerate() {
                *x = ctx.value(at + d, sat + d / Q8_0_BLOCK);
            }
            for h in 0..group {
                let w = scores[h * n + jj];
                for (o, &x) in job.out[h * hd..(h + 1) * hd].iter_mut().zip(&v) {
                    *o = w.mul_add(x, *o);
                }
            }
        }
    }
}
