//! The CPU backend's paged KV cache: keys and values of every layer in host
//! memory, stored as f32, f16 or q8_0 ([`KvDtype`]), and the conversion of
//! new keys and values into that type as they are written.
//!
//! Layout (the attention kernels in `attention.rs` depend on it): values a
//! token per row (`[slot][kv head][dim]`); keys transposed within each block
//! (`[block][kv head][dim][slot in block]`). For q8_0 each 32 dimensions of
//! a head of a token share one f16 scale, kept beside the integers in the
//! same pattern: `[block][kv head][dim / 32][slot in block]` for keys (so
//! the scales of consecutive keys load as one vector) and
//! `[slot][kv head][dim / 32]` for values.

use half::f16;

use crate::{BackendError, KvDtype, KvSpec, Result, Q8_0_BLOCK};

/// Elements readable past the end of every array: the vector kernels load
/// 8 or 16 consecutive keys of a block without a mask and drop the lanes past
/// the keys wanted, so the last block of the cache may be read up to 15
/// elements beyond its end.
const PAD: usize = 64;

/// One array of stored elements (keys or values of all layers).
pub(super) enum Plane {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// The integers, and one f16 scale per block of [`Q8_0_BLOCK`].
    Q8 {
        q: Vec<i8>,
        d: Vec<f16>,
    },
}

/// One layer's part of a [`Plane`], with [`PAD`] elements after it (the
/// next layer's or the padding), as the attention kernels read it.
#[derive(Clone, Copy)]
pub(super) enum PlaneRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8 { q: &'a [i8], d: &'a [f16] },
}

/// The paged KV cache in host memory: per layer, keys and values of
/// `[slots, n_kv_heads * head_dim]` elements, the layers of each one after
/// another in one allocation (see [`zeroed_vec`]).
pub struct CpuKvCache {
    pub(super) spec: KvSpec,
    dtype: KvDtype,
    /// Elements per layer.
    per_layer: usize,
    /// q8_0 scales per layer (0 for other types).
    scales_per_layer: usize,
    k: Plane,
    v: Plane,
}

impl CpuKvCache {
    /// A zeroed cache of `spec`'s geometry storing `dtype` (`Auto` is f16),
    /// its pages mapped as they are first written (see [`zeroed_vec`]).
    pub(crate) fn alloc(spec: &KvSpec, dtype: KvDtype) -> Result<CpuKvCache> {
        let dtype = match dtype {
            KvDtype::Auto => KvDtype::F16,
            d => d,
        };
        let overflow = || BackendError::OutOfMemory(format!("KV cache {spec:?} overflows"));
        let per_layer = spec
            .slots()
            .checked_mul(spec.n_kv_heads * spec.head_dim)
            .ok_or_else(overflow)?;
        let total = per_layer.checked_mul(spec.n_layers).ok_or_else(overflow)?;
        let scales_per_layer = match dtype {
            KvDtype::Q8_0 => spec.slots() * spec.n_kv_heads * spec.head_dim.div_ceil(Q8_0_BLOCK),
            _ => 0,
        };
        let oom = || {
            BackendError::OutOfMemory(format!(
                "cannot allocate {} MiB for the KV cache ({dtype})",
                spec.slots().saturating_mul(dtype.bytes_per_token(spec)) >> 20
            ))
        };
        let plane = || -> Result<Plane> {
            Ok(match dtype {
                KvDtype::F32 => Plane::F32(zeroed_vec(total + PAD).ok_or_else(oom)?),
                KvDtype::Q8_0 => Plane::Q8 {
                    q: zeroed_vec(total + PAD).ok_or_else(oom)?,
                    d: zeroed_vec(scales_per_layer * spec.n_layers + PAD).ok_or_else(oom)?,
                },
                _ => Plane::F16(zeroed_vec(total + PAD).ok_or_else(oom)?),
            })
        };
        Ok(CpuKvCache {
            spec: *spec,
            dtype,
            per_layer,
            scales_per_layer,
            k: plane()?,
            v: plane()?,
        })
    }

    /// The geometry the cache was made with.
    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// The type keys and values are stored as (never `Auto`).
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Layer `layer`'s keys and values, each followed by [`PAD`] readable
    /// elements (and scales).
    pub(super) fn layer(&self, layer: usize) -> (PlaneRef<'_>, PlaneRef<'_>) {
        let at = (layer * self.per_layer, layer * self.scales_per_layer);
        let len = (self.per_layer + PAD, self.scales_per_layer + PAD);
        (self.k.view(at, len), self.v.view(at, len))
    }

    /// Layer `layer`'s keys and values, to write.
    pub(super) fn layer_mut(&mut self, layer: usize) -> (PlaneMut<'_>, PlaneMut<'_>) {
        let at = (layer * self.per_layer, layer * self.scales_per_layer);
        let len = (self.per_layer, self.scales_per_layer);
        (self.k.view_mut(at, len), self.v.view_mut(at, len))
    }
}

impl Plane {
    /// `len.0` elements from `at.0` and `len.1` scales from `at.1`.
    fn view(&self, at: (usize, usize), len: (usize, usize)) -> PlaneRef<'_> {
        let e = at.0..at.0 + len.0;
        match self {
            Plane::F32(x) => PlaneRef::F32(&x[e]),
            Plane::F16(x) => PlaneRef::F16(&x[e]),
            Plane::Q8 { q, d } => PlaneRef::Q8 {
                q: &q[e],
                d: &d[at.1..at.1 + len.1],
            },
        }
    }

    /// [`Plane::view`], to write.
    fn view_mut(&mut self, at: (usize, usize), len: (usize, usize)) -> PlaneMut<'_> {
        let e = at.0..at.0 + len.0;
        match self {
            Plane::F32(x) => PlaneMut::F32(&mut x[e]),
            Plane::F16(x) => PlaneMut::F16(&mut x[e]),
            Plane::Q8 { q, d } => PlaneMut::Q8 {
                q: &mut q[e],
                d: &mut d[at.1..at.1 + len.1],
            },
        }
    }
}

/// One layer's keys or values, to write.
pub(super) enum PlaneMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Q8 { q: &'a mut [i8], d: &'a mut [f16] },
}

/// Where dimension 0 of KV head `h`'s key for cache slot `s` is: keys are
/// transposed within a block of `bs` slots, so dimension `d` is `d * bs`
/// further on, and the next slot of the block is one further on.
pub(super) fn key_at(s: usize, h: usize, width: usize, hd: usize, bs: usize) -> usize {
    (s / bs) * bs * width + h * hd * bs + s % bs
}

/// Where the q8_0 scale of dimensions `0..32` of KV head `h`'s key for slot
/// `s` is (`nb` scales per head); the scale of dimensions `32 b..` is
/// `b * bs` further on.
pub(super) fn key_scale_at(s: usize, h: usize, n_kv: usize, nb: usize, bs: usize) -> usize {
    (s / bs) * bs * n_kv * nb + h * nb * bs + s % bs
}

/// f32 to f16, rounding to nearest even, finite values beyond f16's range
/// saturated to ±65504 rather than made infinite (an infinite key would
/// turn every score of its query into NaN).
pub(super) fn to_f16(x: f32) -> f16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0))
}

/// The f16 scale of a q8_0 block and its integers: `amax / 127`, and each
/// element divided by the scale as stored (so `q * d` is the closest the
/// block can give), rounded and kept within ±127.
pub(super) fn quantize_q8(x: &[f32], q: &mut [i8]) -> f16 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = to_f16(amax / 127.0);
    let df = d.to_f32();
    let inv = if df > 0.0 && df.is_finite() {
        1.0 / df
    } else {
        0.0
    };
    for (o, &v) in q.iter_mut().zip(x) {
        // NaN becomes 0 (`as` saturates and maps NaN to 0).
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

impl PlaneMut<'_> {
    /// Stores one head's `x` (head_dim values) whose dimension `j` goes to
    /// element `at + j * stride` and, for q8_0, whose block `b`'s scale
    /// goes to `scale_at + b * scale_stride`.
    pub(super) fn put(
        &mut self,
        x: &[f32],
        at: usize,
        stride: usize,
        scale_at: usize,
        scale_stride: usize,
    ) {
        match self {
            PlaneMut::F32(o) => x
                .iter()
                .enumerate()
                .for_each(|(j, &v)| o[at + j * stride] = v),
            PlaneMut::F16(o) => x
                .iter()
                .enumerate()
                .for_each(|(j, &v)| o[at + j * stride] = to_f16(v)),
            PlaneMut::Q8 { q, d } => {
                let mut ints = [0i8; Q8_0_BLOCK];
                for (b, block) in x.chunks(Q8_0_BLOCK).enumerate() {
                    let ints = &mut ints[..block.len()];
                    d[scale_at + b * scale_stride] = quantize_q8(block, ints);
                    for (j, &i) in ints.iter().enumerate() {
                        q[at + (b * Q8_0_BLOCK + j) * stride] = i;
                    }
                }
            }
        }
    }
}

/// `n` zeros, from zeroed pages the OS maps lazily (so a large KV cache costs
/// nothing at start), or `None` when the allocation fails.
///
/// Lazily only above glibc's mapping threshold, which
/// `keep_freed_memory` (in the backend's module) raises to 32 MiB: a smaller block comes from the
/// heap and is cleared page by page at once. That is why the KV cache is
/// one allocation for keys and one for values rather than one per layer
/// (a 1 GiB cache's 17 MiB layers were cleared at every start: 0.1-0.5 s
/// of page faults before the server was ready).
fn zeroed_vec<T: Zeroable>(n: usize) -> Option<Vec<T>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: the layout has a non-zero size; a non-null result is a zeroed
    // allocation of exactly `n` Ts with the global allocator's layout for
    // Vec<T> of capacity n, and all-zero bits are a valid T (`Zeroable`).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

/// Element types for which all-zero bits are a valid value (0).
trait Zeroable {}
impl Zeroable for f32 {}
impl Zeroable for f16 {}
impl Zeroable for i8 {}
