//! Activations quantized to integers for the integer kernels.
//!
//! Each row is split into blocks of 32; a block keeps one f32 scale `dx` and
//! 32 integers `qx` with `x ≈ dx * qx`, rounding to nearest, ties to even.
//! Two widths ([`ActBits`]): 8 bits (-127..=127, ggml's Q8_0 scheme, what
//! llama.cpp multiplies with) and 16 bits (-32512..=32512: 256 times finer,
//! so logits stay within about 1e-3 of an f32 computation). A block depends
//! on its own row only, so quantizing never couples the rows of a batch:
//! the engine's batch invariance holds.
//!
//! Two layouts ([`ActLayout`]), one per kernel family: the per-row kernels
//! read 16-bit values as such (in the [`slot16`] order); the kernels of
//! interleaved weights ([`super::packed`]) read bytes only, so a 16-bit value
//! is split into two signed bytes, `x = 255 * hi + lo` with both in
//! -127..=127 (hence the 16-bit range of ±(255 * 127 + 127)), and multiplied
//! as two 8-bit products: still exact integers.
//!
//! Alongside, the sums of each 16 and each 32 quantized values (as integers,
//! and times `dx`), which the weight formats' offsets multiply.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::isa;

/// The integer width activations are quantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActBits {
    /// 8-bit: the fastest products, and about 0.4% noise per product.
    Int8,
    /// 16-bit: results within f32 rounding of dequantize-then-f32 for
    /// practical purposes; the default.
    Int16,
}

impl ActBits {
    /// The process-wide choice: `KILN_CPU_ACTIVATIONS=int8` or `int16`
    /// (the default), read once.
    pub fn configured() -> ActBits {
        static BITS: OnceLock<ActBits> = OnceLock::new();
        *BITS.get_or_init(|| match std::env::var("KILN_CPU_ACTIVATIONS").as_deref() {
            Ok("int8") => ActBits::Int8,
            Ok("int16") | Err(_) => ActBits::Int16,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "KILN_CPU_ACTIVATIONS is int8 or int16; using int16"
                );
                ActBits::Int16
            }
        })
    }

    fn max(self) -> f32 {
        match self {
            ActBits::Int8 => 127.0,
            ActBits::Int16 => SPLIT_TOP as f32,
        }
    }
}

/// The largest 16-bit activation magnitude: what two signed bytes of at most
/// 127 each hold as `255 * hi + lo`.
const SPLIT_TOP: i32 = 255 * 127 + 127;

/// Which kernels the quantized rows are laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ActLayout {
    /// The per-row kernels: bytes in row order (8-bit), or 16-bit values in
    /// the [`slot16`] order.
    Lanes,
    /// The interleaved-weight kernels: bytes in row order (8-bit), or per
    /// 32-block the 32 `hi` bytes then the 32 `lo` bytes (16-bit).
    Split,
}

/// Where element `t` of a 32-block sits in the 16-bit layout: each half of
/// the block is split in 8s and interleaved (0..8, 16..24, 8..16, 24..32), so
/// that a 16-bit pair-product lane never mixes the block's two halves.
pub(super) const fn slot16(t: usize) -> usize {
    let (half, within) = (t / 16, t % 16);
    (within / 8) * 16 + half * 8 + within % 8
}

/// A `[m, k]` activation quantized in blocks of 32 (`k` a multiple of 32).
pub(super) struct QuantizedRows {
    pub bits: ActBits,
    /// `m * k` signed bytes (8-bit mode).
    pub qx: Vec<i8>,
    /// `m * k` 16-bit values (16-bit mode, [`ActLayout::Lanes`]), each
    /// block in the [`slot16`] order.
    pub qx16: Vec<i16>,
    /// `2 * m * k` bytes (16-bit mode, [`ActLayout::Split`]): per 32-block,
    /// the `hi` then the `lo` byte of each value, `x = 255 * hi + lo`.
    pub hilo: Vec<i8>,
    /// `sum(qx)` over each 32 elements, as an integer: `m * k / 32`.
    pub isum: Vec<i32>,
    /// `sum(qx)` over each 16 elements, as an integer: `m * k / 16`.
    pub isum16: Vec<i32>,
    /// Scale of each block: `m * k / 32`.
    pub dx: Vec<f32>,
    /// `dx * sum(qx)` over each 32 elements: `m * k / 32`.
    pub sum32: Vec<f32>,
    /// `dx * sum(qx)` over each 16 elements: `m * k / 16`.
    pub sum16: Vec<f32>,
}

impl QuantizedRows {
    /// The quantized value of element `t` of row-major position `t` (either width).
    pub fn value(&self, t: usize) -> i32 {
        match self.bits {
            ActBits::Int8 => self.qx[t] as i32,
            ActBits::Int16 if self.hilo.is_empty() => {
                self.qx16[t / 32 * 32 + slot16(t % 32)] as i32
            }
            ActBits::Int16 => {
                let (b, e) = (t / 32, t % 32);
                255 * self.hilo[64 * b + e] as i32 + self.hilo[64 * b + 32 + e] as i32
            }
        }
    }

    /// Room for `len` values in `bits` and `layout`, zeroed.
    fn zeroed(len: usize, bits: ActBits, layout: ActLayout) -> Self {
        let nb = len / 32;
        let (n8, n16, nsplit) = match (bits, layout) {
            (ActBits::Int8, _) => (len, 0, 0),
            (ActBits::Int16, ActLayout::Lanes) => (0, len, 0),
            (ActBits::Int16, ActLayout::Split) => (0, 0, 2 * len),
        };
        Self {
            bits,
            qx: vec![0; n8],
            qx16: vec![0; n16],
            hilo: vec![0; nsplit],
            dx: vec![0.0; nb],
            isum: vec![0; nb],
            isum16: vec![0; 2 * nb],
            sum32: vec![0.0; nb],
            sum16: vec![0.0; 2 * nb],
        }
    }

    /// Where quantizing tasks write into `self`.
    fn dest(&mut self) -> Dest {
        Dest {
            qx: self.qx.as_mut_ptr(),
            qx16: self.qx16.as_mut_ptr(),
            hilo: self.hilo.as_mut_ptr(),
            dx: self.dx.as_mut_ptr(),
            isum: self.isum.as_mut_ptr(),
            isum16: self.isum16.as_mut_ptr(),
            sum32: self.sum32.as_mut_ptr(),
            sum16: self.sum16.as_mut_ptr(),
        }
    }

    /// Quantizes the `m` rows of `k` values in `x` to `bits`, for the per-row kernels.
    pub fn new(x: &[f32], k: usize, bits: ActBits) -> Self {
        Self::with_layout(x, k, bits, ActLayout::Lanes)
    }

    /// Quantizes the `m` rows of `k` values in `x` to `bits`, laid out for `layout`.
    pub fn with_layout(x: &[f32], k: usize, bits: ActBits, layout: ActLayout) -> Self {
        debug_assert!(k.is_multiple_of(32) && x.len().is_multiple_of(k));
        let mut q = Self::zeroed(x.len(), bits, layout);
        let top = bits.max();
        let dst = q.dest();
        // Blocks are independent; a prompt's rows are quantized in parallel,
        // 256 blocks per task.
        const TASK: usize = 256;
        x.par_chunks(32 * TASK).enumerate().for_each(|(c, xs)| {
            #[cfg(target_arch = "x86_64")]
            if layout == ActLayout::Split && split_avx512() {
                // SAFETY: AVX-512 is present; the blocks of this task are theirs (see `blocks`).
                unsafe { blocks_avx512(xs, c * TASK, &dst, bits, top) };
                return;
            }
            // SAFETY: as above.
            unsafe { blocks(xs, c * TASK, &dst, bits, layout, top) };
        });
        q
    }
}

/// Whether the interleaved layout's quantizer runs its AVX-512 loop: where
/// the one choice of instruction sets admits AVX-512 ([`isa::chosen`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn split_avx512() -> bool {
    isa::chosen().avx512
}

/// [`blocks`] for the interleaved-weight layout on AVX-512, 16 values per
/// register: the same operations on each value (an exact maximum, one
/// multiply, the same rounding), so the same bits.
///
/// # Safety
/// AVX-512F and BW are present; as [`blocks`], for [`ActLayout::Split`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn blocks_avx512(xs: &[f32], b0: usize, dst: &Dest, bits: ActBits, top: f32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512 per the attribute; each block reads its 32 values
    // and writes only its own elements (see `blocks`).
    unsafe {
        let magic = _mm512_set1_ps(ROUND_MAGIC);
        for (i, xb) in xs.chunks_exact(32).enumerate() {
            let b = b0 + i;
            let x = [
                _mm512_loadu_ps(xb.as_ptr()),
                _mm512_loadu_ps(xb.as_ptr().add(16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x[0]), _mm512_abs_ps(x[1])));
            let d = amax / top;
            let id = _mm512_set1_ps(if amax > 0.0 { top / amax } else { 0.0 });
            let q = [
                round16(_mm512_mul_ps(x[0], id), magic),
                round16(_mm512_mul_ps(x[1], id), magic),
            ];
            let (s0, s1) = (_mm512_reduce_add_epi32(q[0]), _mm512_reduce_add_epi32(q[1]));
            match bits {
                ActBits::Int8 => {
                    for (h, v) in q.iter().enumerate() {
                        let at = dst.qx.add(32 * b + 16 * h) as *mut __m128i;
                        _mm_storeu_si128(at, _mm512_cvtepi32_epi8(*v));
                    }
                }
                ActBits::Int16 => {
                    let inv = _mm512_set1_ps(1.0 / 255.0);
                    for (h, v) in q.iter().enumerate() {
                        let hi = round16(_mm512_mul_ps(_mm512_cvtepi32_ps(*v), inv), magic);
                        let lo =
                            _mm512_sub_epi32(*v, _mm512_mullo_epi32(hi, _mm512_set1_epi32(255)));
                        let at = dst.hilo.add(64 * b + 16 * h);
                        _mm_storeu_si128(at as *mut __m128i, _mm512_cvtepi32_epi8(hi));
                        _mm_storeu_si128(at.add(32) as *mut __m128i, _mm512_cvtepi32_epi8(lo));
                    }
                }
            }
            *dst.dx.add(b) = d;
            *dst.isum.add(b) = s0 + s1;
            *dst.isum16.add(2 * b) = s0;
            *dst.isum16.add(2 * b + 1) = s1;
            *dst.sum16.add(2 * b) = d * s0 as f32;
            *dst.sum16.add(2 * b + 1) = d * s1 as f32;
            *dst.sum32.add(b) = d * (s0 + s1) as f32;
        }
    }
}

/// [`round_small`] in each lane. (A function, not a closure: closures do
/// not inherit the target features.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn round16(
    v: std::arch::x86_64::__m512,
    magic: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F per the callers.
    unsafe { _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_add_ps(v, magic), magic)) }
}

/// Quantizes the 32-blocks of `xs`, blocks `b0..` of the whole input, into `dst`.
///
/// # Safety
/// `dst` has room for those blocks in `bits` and `layout`, and no other
/// thread writes them.
#[inline(always)]
unsafe fn blocks(xs: &[f32], b0: usize, dst: &Dest, bits: ActBits, layout: ActLayout, top: f32) {
    for (i, xb) in xs.chunks_exact(32).enumerate() {
        let b = b0 + i;
        let mut block = [0i32; 32];
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / top;
        let id = if amax > 0.0 { top / amax } else { 0.0 };
        for (qv, &v) in block.iter_mut().zip(xb) {
            // |v * id| <= top up to one rounding, which rounds back to top.
            *qv = round_small(v * id);
        }
        let (s0, s1) = (
            block[..16].iter().sum::<i32>(),
            block[16..].iter().sum::<i32>(),
        );
        // SAFETY: block b owns elements 32b..32b + 32 of the value
        // vectors (64b.. of `hilo`), b of the per-block ones and 2b,
        // 2b + 1 of the per-half ones; the vector of the chosen
        // layout has them (the others are not written).
        unsafe {
            match (bits, layout) {
                (ActBits::Int8, _) => {
                    for (t, &v) in block.iter().enumerate() {
                        *dst.qx.add(32 * b + t) = v as i8;
                    }
                }
                (ActBits::Int16, ActLayout::Lanes) => {
                    for (t, &v) in block.iter().enumerate() {
                        *dst.qx16.add(32 * b + slot16(t)) = v as i16;
                    }
                }
                (ActBits::Int16, ActLayout::Split) => {
                    for (t, &v) in block.iter().enumerate() {
                        // The nearest multiple of 255, so the rest is within ±127.
                        // (v / 255 is never within 1e-3 of a tie, so the
                        // reciprocal's rounding error cannot change the result.)
                        let top_part = round_small(v as f32 * (1.0 / 255.0));
                        *dst.hilo.add(64 * b + t) = top_part as i8;
                        *dst.hilo.add(64 * b + 32 + t) = (v - 255 * top_part) as i8;
                    }
                }
            }
            *dst.dx.add(b) = d;
            *dst.isum.add(b) = s0 + s1;
            *dst.isum16.add(2 * b) = s0;
            *dst.isum16.add(2 * b + 1) = s1;
            *dst.sum16.add(2 * b) = d * s0 as f32;
            *dst.sum16.add(2 * b + 1) = d * s1 as f32;
            *dst.sum32.add(b) = d * (s0 + s1) as f32;
        }
    }
}

/// Where [`QuantizedRows::with_layout`]'s parallel tasks write: each block
/// its own elements.
struct Dest {
    qx: *mut i8,
    qx16: *mut i16,
    hilo: *mut i8,
    dx: *mut f32,
    isum: *mut i32,
    isum16: *mut i32,
    sum32: *mut f32,
    sum16: *mut f32,
}
// SAFETY: tasks write disjoint elements (see `with_layout`), and the
// vectors outlive the parallel loop.
unsafe impl Sync for Dest {}

/// `v` rounded to the nearest integer, ties to even, for |v| < 2^22: adding
/// and subtracting 1.5 * 2^23 leaves the rounded value (plain f32
/// arithmetic, which vectorises; `round_ties_even` is a library call on
/// baseline x86-64).
#[inline(always)]
fn round_small(v: f32) -> i32 {
    ((v + ROUND_MAGIC) - ROUND_MAGIC) as i32
}

/// 1.5 * 2^23: added to and subtracted from an f32 below 2^22 in
/// magnitude, it leaves the value rounded to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::rand_vec;

    /// The parallel, SIMD quantization (whatever this CPU runs) gives the
    /// element-by-element definition's bits, in every width and layout.
    #[test]
    fn every_path_quantizes_like_the_scalar_definition() {
        #[cfg(target_arch = "x86_64")]
        if !split_avx512() {
            eprintln!(
                "SKIPPED: no AVX-512 on this CPU (or KILN_CPU_ISA caps it): every_path_quantizes_like_the_scalar_definition \
                 compares the scalar path with itself (only the parallel split is checked)"
            );
        }
        let mut x = rand_vec(300 * 64, 7);
        x[64..96].fill(0.0);
        x[200] = -1e6;
        x[300] = 3e-30;
        for bits in [ActBits::Int8, ActBits::Int16] {
            for layout in [ActLayout::Lanes, ActLayout::Split] {
                let got = QuantizedRows::with_layout(&x, 64, bits, layout);
                let mut want = QuantizedRows::zeroed(x.len(), bits, layout);
                let dst = want.dest();
                // SAFETY: `want` has room for every block; one thread.
                unsafe { blocks(&x, 0, &dst, bits, layout, bits.max()) };
                let what = format!("{bits:?} {layout:?}");
                assert_eq!(got.qx, want.qx, "{what}");
                assert_eq!(got.qx16, want.qx16, "{what}");
                assert_eq!(got.hilo, want.hilo, "{what}");
                assert_eq!(
                    (&got.isum, &got.isum16),
                    (&want.isum, &want.isum16),
                    "{what}"
                );
                let bits_of = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                for (a, b) in [
                    (&got.dx, &want.dx),
                    (&got.sum16, &want.sum16),
                    (&got.sum32, &want.sum32),
                ] {
                    assert_eq!(bits_of(a), bits_of(b), "{what}");
                }
            }
        }
    }

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let mut x = rand_vec(4 * 64, 3);
        x[64..96].fill(0.0); // an all-zero block
        x[5] = 100.0; // a block with one large value
        for (bits, top, layout) in [
            (ActBits::Int8, 127, ActLayout::Lanes),
            (ActBits::Int16, SPLIT_TOP, ActLayout::Lanes),
            (ActBits::Int16, SPLIT_TOP, ActLayout::Split),
        ] {
            let q = QuantizedRows::with_layout(&x, 64, bits, layout);
            for (b, xb) in x.chunks_exact(32).enumerate() {
                let d = q.dx[b];
                for (t, &v) in xb.iter().enumerate() {
                    let qv = q.value(32 * b + t);
                    assert!((-top..=top).contains(&qv));
                    assert!(
                        (v - d * qv as f32).abs() <= 0.5 * d + 1e-6,
                        "{v} vs {d} * {qv}"
                    );
                }
                let s: i32 = (32 * b..32 * b + 32).map(|t| q.value(t)).sum();
                assert_eq!(q.isum[b], s);
                assert_eq!(q.sum32[b], d * s as f32);
            }
            assert_eq!(q.dx[2], 0.0);
            assert!((64..96).all(|t| q.value(t) == 0));
            assert_eq!(q.value(5), top);
            assert!(q.hilo.iter().all(|&v| v != i8::MIN), "bytes within ±127");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        for v in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 3.49, -3.51, 32511.5, 126.5, -126.5,
        ] {
            assert_eq!(round_small(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn the_16_bit_layout_is_a_permutation_keeping_halves_apart() {
        let mut seen = [false; 32];
        for t in 0..32 {
            let s = slot16(t);
            assert!(!seen[s]);
            seen[s] = true;
            // A pair-product lane l of either 16-value register holds slots
            // 2l, 2l + 1 (mod 16); lanes 0..4 must be the first half's.
            assert_eq!((s % 16) / 8, t / 16, "element {t} in slot {s}");
        }
    }
}
