//! x86-64 kernels over float weights in the transposed group layout
//! ([`crate::cpu::float_packed`]): the canonical one-FMA-per-element chain in
//! every lane, with a group of 16 rows as one 512-bit register (AVX-512)
//! or two 256-bit halves (AVX2).
//!
//! A tile keeps `MR` input rows by `G` groups of outputs in registers; per
//! element `t` it loads the `G` weight vectors once (widening F16 and BF16
//! to f32), broadcasts each row's `x[t]` and adds `MR x G` products. Wide
//! tiles serve prompts; few rows take more groups, so that a decode step
//! still has several independent FMA chains in flight.

use std::arch::x86_64::*;

use crate::cpu::float_packed::{FloatFormat, FloatOperands};
use crate::cpu::isa::Isa;
use crate::cpu::packed::NR;

/// Runs the kernels of `isa` over rows `i0..i1` and groups `g0..g1`.
///
/// # Safety
/// `isa` is supported by this CPU; `out` points to an `m x n` buffer of
/// which no other thread touches these elements.
pub(crate) unsafe fn block(
    isa: Isa,
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the features of each entry point are those `isa` was detected with.
    unsafe {
        match isa {
            Isa::Avx2 | Isa::AvxVnni => float_avx2(ops, i0, i1, g0, g1, out),
            Isa::Avx512Vnni => float_avx512(ops, i0, i1, g0, g1, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_avx2(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match ops.w.fmt {
            FloatFormat::F32 => cover256::<F32>(ops, i0, i1, g0, g1, out),
            FloatFormat::F16 => cover256::<F16>(ops, i0, i1, g0, g1, out),
            FloatFormat::BF16 => cover256::<Bf16>(ops, i0, i1, g0, g1, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn float_avx512(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match ops.w.fmt {
            FloatFormat::F32 => cover512::<F32>(ops, i0, i1, g0, g1, out),
            FloatFormat::F16 => cover512::<F16>(ops, i0, i1, g0, g1, out),
            FloatFormat::BF16 => cover512::<Bf16>(ops, i0, i1, g0, g1, out),
        }
    }
}

/// A stored element type: loads element `t` of a group's 16 rows as f32.
trait Elem {
    /// Bytes per element.
    const SIZE: usize;
    /// Eight elements at `p` as f32.
    ///
    /// # Safety
    /// `8 * SIZE` readable bytes at `p`; AVX2, F16C.
    unsafe fn load8(p: *const u8) -> __m256;
    /// Sixteen elements at `p` as f32.
    ///
    /// # Safety
    /// `16 * SIZE` readable bytes at `p`; AVX-512F.
    unsafe fn load16(p: *const u8) -> __m512;
}

struct F32;
impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_loadu_ps(p as *const f32) }
    }
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: the trait's contract.
        unsafe { _mm512_loadu_ps(p as *const f32) }
    }
}

struct F16;
impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: the trait's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// A bf16 is the top half of an f32: widening is a 16-bit shift.
struct Bf16;
impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
        }
    }
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: the trait's contract.
        unsafe {
            let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
        }
    }
}

/// One group's 16 lanes in registers: the operations a tile needs.
trait Lanes {
    type V: Copy;
    /// # Safety
    /// The vector instruction set is enabled.
    unsafe fn zero() -> Self::V;
    /// Element vector at `p` (16 elements of `E`).
    ///
    /// # Safety
    /// `16 * E::SIZE` readable bytes at `p`.
    unsafe fn load<E: Elem>(p: *const u8) -> Self::V;
    /// `fma(w, x, acc)` in every lane.
    ///
    /// # Safety
    /// The vector instruction set is enabled.
    unsafe fn fma(w: Self::V, x: f32, acc: Self::V) -> Self::V;
    /// Writes the first `lanes` (1..=16) lanes to `out`.
    ///
    /// # Safety
    /// `lanes` writable floats at `out`.
    unsafe fn store(out: *mut f32, v: Self::V, lanes: usize);
}

/// A group as two 256-bit halves.
struct Ymm;
impl Lanes for Ymm {
    type V = [__m256; 2];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        // SAFETY: AVX.
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    unsafe fn load<E: Elem>(p: *const u8) -> Self::V {
        // SAFETY: the trait's contract.
        unsafe { [E::load8(p), E::load8(p.add(8 * E::SIZE))] }
    }
    #[inline(always)]
    unsafe fn fma(w: Self::V, x: f32, acc: Self::V) -> Self::V {
        // SAFETY: FMA.
        unsafe {
            let x = _mm256_set1_ps(x);
            [
                _mm256_fmadd_ps(w[0], x, acc[0]),
                _mm256_fmadd_ps(w[1], x, acc[1]),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store(out: *mut f32, v: Self::V, lanes: usize) {
        // SAFETY: the trait's contract.
        unsafe {
            if lanes == NR {
                _mm256_storeu_ps(out, v[0]);
                _mm256_storeu_ps(out.add(8), v[1]);
            } else {
                let mut all = [0f32; NR];
                _mm256_storeu_ps(all.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(all.as_mut_ptr().add(8), v[1]);
                std::ptr::copy_nonoverlapping(all.as_ptr(), out, lanes);
            }
        }
    }
}

/// A group as one 512-bit register.
struct Zmm;
impl Lanes for Zmm {
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        // SAFETY: AVX-512F.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load<E: Elem>(p: *const u8) -> Self::V {
        // SAFETY: the trait's contract.
        unsafe { E::load16(p) }
    }
    #[inline(always)]
    unsafe fn fma(w: Self::V, x: f32, acc: Self::V) -> Self::V {
        // SAFETY: AVX-512F.
        unsafe { _mm512_fmadd_ps(w, _mm512_set1_ps(x), acc) }
    }
    #[inline(always)]
    unsafe fn store(out: *mut f32, v: Self::V, lanes: usize) {
        // SAFETY: the trait's contract; the mask writes only `lanes` floats.
        unsafe { _mm512_mask_storeu_ps(out, ((1u32 << lanes) - 1) as u16, v) }
    }
}

/// Input rows per full tile for `isa`: how [`crate::cpu::float_packed::interleave`]
/// must lay out the input for these kernels.
pub(crate) fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 | Isa::AvxVnni => 6,
        Isa::Avx512Vnni => 12,
    }
}

/// Rows `i0..i1` by groups `g0..g1` with 256-bit halves: 16 registers hold
/// at most 12 accumulator halves beside the weights and the broadcast.
#[inline(always)]
unsafe fn cover256<E: Elem>(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let mut i = i0;
    while i < i1 {
        let rows = (i1 - i).min(6);
        // SAFETY (every arm): the tiles stay inside i0..i1 x g0..g1, which the caller owns.
        unsafe {
            match rows {
                1 => groups::<Ymm, E, 1, 3>(ops, i, g0, g1, out),
                2 => groups::<Ymm, E, 2, 3>(ops, i, g0, g1, out),
                3 => groups::<Ymm, E, 3, 2>(ops, i, g0, g1, out),
                4 => groups::<Ymm, E, 4, 1>(ops, i, g0, g1, out),
                5 => groups::<Ymm, E, 5, 1>(ops, i, g0, g1, out),
                _ => groups::<Ymm, E, 6, 1>(ops, i, g0, g1, out),
            }
        }
        i += rows;
    }
}

/// Rows `i0..i1` by groups `g0..g1` with 512-bit groups: 32 registers hold
/// up to 24 accumulators beside the weights and the broadcast.
#[inline(always)]
unsafe fn cover512<E: Elem>(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let mut i = i0;
    while i < i1 {
        let rows = (i1 - i).min(12);
        // SAFETY (every arm): the tiles stay inside i0..i1 x g0..g1, which the caller owns.
        unsafe {
            match rows {
                1 => groups::<Zmm, E, 1, 4>(ops, i, g0, g1, out),
                2 => groups::<Zmm, E, 2, 4>(ops, i, g0, g1, out),
                3 => groups::<Zmm, E, 3, 4>(ops, i, g0, g1, out),
                4 => groups::<Zmm, E, 4, 4>(ops, i, g0, g1, out),
                5 => groups::<Zmm, E, 5, 4>(ops, i, g0, g1, out),
                6 => groups::<Zmm, E, 6, 4>(ops, i, g0, g1, out),
                7 => groups::<Zmm, E, 7, 3>(ops, i, g0, g1, out),
                8 => groups::<Zmm, E, 8, 3>(ops, i, g0, g1, out),
                9 => groups::<Zmm, E, 9, 2>(ops, i, g0, g1, out),
                10 => groups::<Zmm, E, 10, 2>(ops, i, g0, g1, out),
                11 => groups::<Zmm, E, 11, 2>(ops, i, g0, g1, out),
                _ => groups::<Zmm, E, 12, 2>(ops, i, g0, g1, out),
            }
        }
        i += rows;
    }
}

/// `MR` rows from `i` against groups `g0..g1`, `G` groups per tile and the
/// rest one by one.
///
/// # Safety
/// `i + MR <= m`, `g1 <= groups`; the caller owns those output elements.
#[inline(always)]
unsafe fn groups<L: Lanes, E: Elem, const MR: usize, const G: usize>(
    ops: &FloatOperands,
    i: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the tile of rows from i starts at i * k of the interleaved
    // rows ([`crate::cpu::float_packed::interleave`]), MR x k floats.
    let xs = unsafe { ops.x.as_ptr().add(i * ops.k) };
    let mut g = g0;
    // SAFETY (both loops): every tile stays inside the caller's range.
    unsafe {
        while g + G <= g1 {
            tile::<L, E, MR, G>(ops, xs, i, g, out);
            g += G;
        }
        while g < g1 {
            tile::<L, E, MR, 1>(ops, xs, i, g, out);
            g += 1;
        }
    }
}

/// `MR` input rows from `i`, interleaved in `xs` (`xs[t * MR + ii]` is
/// row `i + ii`'s element `t`), against groups `g..g + G`.
///
/// # Safety
/// As [`groups`]; `xs` holds `MR * k` floats. (No closures here: they would
/// not inherit the entry point's target features, and their intrinsics
/// would become calls.)
#[inline(always)]
unsafe fn tile<L: Lanes, E: Elem, const MR: usize, const G: usize>(
    ops: &FloatOperands,
    xs: *const f32,
    i: usize,
    g: usize,
    out: *mut f32,
) {
    let step = NR * E::SIZE;
    // SAFETY: groups g..g + G hold k vectors of NR elements each; `xs`
    // holds MR x k floats; the outputs written are columns below n of rows
    // i..i + MR.
    unsafe {
        let mut wp = [std::ptr::null::<u8>(); G];
        for (gg, p) in wp.iter_mut().enumerate() {
            *p = ops.w.group(g + gg);
        }
        let mut acc = [[L::zero(); G]; MR];
        for t in 0..ops.k {
            let mut w = [L::zero(); G];
            for (v, p) in w.iter_mut().zip(&wp) {
                *v = L::load::<E>(p.add(t * step));
            }
            let x = xs.add(t * MR);
            for (ii, row) in acc.iter_mut().enumerate() {
                let x = *x.add(ii);
                for (a, &v) in row.iter_mut().zip(&w) {
                    *a = L::fma(v, x, *a);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (gg, v) in row.iter().enumerate() {
                let j0 = (g + gg) * NR;
                if j0 < ops.n {
                    L::store(out.add((i + ii) * ops.n + j0), *v, (ops.n - j0).min(NR));
                }
            }
        }
    }
}
