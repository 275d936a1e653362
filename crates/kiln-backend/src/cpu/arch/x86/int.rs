//! x86-64 kernels of the matrix product: the canonical computation of
//! [`crate::cpu::matmul`] with 256-bit vectors, chosen at run time by CPU feature.
//!
//! One body serves every instruction set: it is generic over [`Dot`], the
//! exact 8-lane integer dot product (AVX2 `maddubs`+`madd`, AVX-VNNI or
//! AVX512-VNNI `dpbusd`, all giving the same integers), and inlined into an
//! entry point compiled for that set's features. Block formats are decoded
//! in registers by an [`Unpack`] per format; rarer formats go through the
//! portable decoder ([`crate::cpu::blocks::unpack`]) into the same registers.

use std::arch::x86_64::*;

use crate::cpu::actq::ActBits;
use crate::cpu::blocks::{self, IntFormat, Unpacked};
use crate::cpu::blocks::{IntOperands, QK};
use crate::cpu::isa::Isa;

/// Runs the kernels of `isa` over rows `i0..i1` and columns `j0..j1`.
///
/// # Safety
/// `isa` is supported by this CPU; `out` points to an `m x n` buffer of
/// which no other thread touches these elements.
pub(crate) unsafe fn block(
    isa: Isa,
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    // SAFETY: the features of each entry point are those `isa` was detected with.
    unsafe {
        match isa {
            Isa::Avx2 => block_avx2(ops, i0, i1, j0, j1, out),
            Isa::AvxVnni => block_avxvnni(ops, i0, i1, j0, j1, out),
            Isa::Avx512Vnni => block_avx512vnni(ops, i0, i1, j0, j1, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2(ops: &IntOperands, i0: usize, i1: usize, j0: usize, j1: usize, out: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { dispatch::<Avx2Dot>(ops, i0, i1, j0, j1, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn block_avxvnni(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { dispatch::<AvxVnniDot>(ops, i0, i1, j0, j1, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_avx512vnni(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { dispatch::<Avx512VnniDot>(ops, i0, i1, j0, j1, out) }
}

/// The exact dot product of 32 unsigned bytes with 32 signed bytes, as 8
/// lanes each summing four neighbouring products.
pub(crate) trait Dot {
    /// Whether [`Dot::dot`] is exact for unsigned bytes up to 255 (the VNNI
    /// instructions); AVX2's `maddubs` saturates past 128 * 127 * 2.
    const FULL_BYTES: bool;

    /// # Safety
    /// The CPU has the instruction set of the implementation.
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;

    /// `acc + dot(u, s)`.
    ///
    /// # Safety
    /// As [`Dot::dot`].
    #[inline(always)]
    unsafe fn dot_add(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: as the trait's contract.
        unsafe { _mm256_add_epi32(acc, Self::dot(u, s)) }
    }

    /// 16-bit products: lane l sums `a0[2l]b0[2l] + a0[2l+1]b0[2l+1]` and the
    /// same of `a1`, `b1` (exact: 16-bit codes times 16-bit activations).
    ///
    /// # Safety
    /// As [`Dot::dot`].
    unsafe fn dot16(a0: __m256i, b0: __m256i, a1: __m256i, b1: __m256i) -> __m256i;
}

pub(crate) struct Avx2Dot;
impl Dot for Avx2Dot {
    const FULL_BYTES: bool = false;
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // Products of unsigned codes <= 128 with |s| <= 127 never saturate the 16-bit pair sums.
        // SAFETY: AVX2, per the trait's contract.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
    #[inline(always)]
    unsafe fn dot16(a0: __m256i, b0: __m256i, a1: __m256i, b1: __m256i) -> __m256i {
        // SAFETY: AVX2, per the trait's contract.
        unsafe { _mm256_add_epi32(_mm256_madd_epi16(a0, b0), _mm256_madd_epi16(a1, b1)) }
    }
}

pub(crate) struct AvxVnniDot;
impl Dot for AvxVnniDot {
    const FULL_BYTES: bool = true;
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, per the trait's contract.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s) }
    }
    #[inline(always)]
    unsafe fn dot_add(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, per the trait's contract.
        unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
    }
    #[inline(always)]
    unsafe fn dot16(a0: __m256i, b0: __m256i, a1: __m256i, b1: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI, per the trait's contract.
        unsafe {
            let p = _mm256_dpwssd_avx_epi32(_mm256_setzero_si256(), a0, b0);
            _mm256_dpwssd_avx_epi32(p, a1, b1)
        }
    }
}

pub(crate) struct Avx512VnniDot;
impl Dot for Avx512VnniDot {
    const FULL_BYTES: bool = true;
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX512-VNNI and AVX512VL, per the trait's contract.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
    #[inline(always)]
    unsafe fn dot_add(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX512-VNNI and AVX512VL, per the trait's contract.
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
    #[inline(always)]
    unsafe fn dot16(a0: __m256i, b0: __m256i, a1: __m256i, b1: __m256i) -> __m256i {
        // SAFETY: AVX512-VNNI and AVX512VL, per the trait's contract.
        unsafe {
            let p = _mm256_dpwssd_epi32(_mm256_setzero_si256(), a0, b0);
            _mm256_dpwssd_epi32(p, a1, b1)
        }
    }
}

/// 32 byte codes widened to 16 bits in the two registers of the 16-bit
/// activation layout (`actq::slot16`): elements 0..8 and 16..24, then 8..16
/// and 24..32.
#[inline(always)]
unsafe fn widen16<const SIGNED: bool>(codes: __m256i) -> (__m256i, __m256i) {
    // SAFETY: AVX2.
    unsafe {
        let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(codes);
        let (lo, hi) = (_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
        if SIGNED {
            (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi))
        } else {
            (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
        }
    }
}

/// Signed weights (Q8_0) against signed activations: |w| times x with w's sign.
#[inline(always)]
unsafe fn dot_signed<D: Dot>(w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: AVX2 is part of every ISA here.
    unsafe { D::dot(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)) }
}

/// Horizontal sum of eight lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the two.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// `sum(c[g] * s[g])` as the portable `offset_dot` computes it.
#[inline(always)]
unsafe fn offset_dot(c: &[f32], s: &[f32]) -> f32 {
    let n = c.len().min(s.len());
    // SAFETY: FMA; every index is below n.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut g = 0;
        while g + 8 <= n {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(c.as_ptr().add(g)),
                _mm256_loadu_ps(s.as_ptr().add(g)),
                acc,
            );
            g += 8;
        }
        let mut y = hsum(acc);
        while g < n {
            y = c[g].mul_add(s[g], y);
            g += 1;
        }
        y
    }
}

/// Decodes a block format: once per block, what the whole block shares
/// (and its offset coefficients); then each 32-element sub-block's codes
/// and scale lanes, in registers.
trait Unpack {
    /// Codes are signed bytes.
    const SIGNED: bool = false;
    /// What decoding the block's header leaves for its sub-blocks.
    type Block;

    /// # Safety
    /// `p` points to one whole block of `f`; `coef` has room for its coefficients.
    unsafe fn block(f: &IntFormat, p: *const u8, coef: *mut f32) -> Self::Block;

    /// Codes and scale lanes of sub-block `s`.
    ///
    /// # Safety
    /// `b` came from [`Unpack::block`]; `s < ELEMS / 32`.
    unsafe fn sub(b: &Self::Block, s: usize) -> (__m256i, __m256);
}

/// Every block format, through the portable decoder (the per-row kernels
/// run only when repacking is off, `KILN_CPU_REPACK=0`).
struct Generic<const SIGNED: bool>;
impl<const SIGNED: bool> Unpack for Generic<SIGNED> {
    const SIGNED: bool = SIGNED;
    type Block = Unpacked;
    #[inline(always)]
    unsafe fn block(f: &IntFormat, p: *const u8, coef: *mut f32) -> Self::Block {
        let mut u = Unpacked::default();
        // SAFETY: one whole block at p; room for its coefficients.
        unsafe {
            blocks::unpack(f, std::slice::from_raw_parts(p, f.bytes), &mut u);
            std::ptr::copy_nonoverlapping(u.coef.as_ptr(), coef, f.coefs_per_block());
        }
        u
    }
    #[inline(always)]
    unsafe fn sub(u: &Self::Block, s: usize) -> (__m256i, __m256) {
        // SAFETY: s < 8: 32 codes at 32 * s.
        unsafe {
            (
                _mm256_loadu_si256(u.codes.as_ptr().add(QK * s) as *const __m256i),
                _mm256_set_m128(_mm_set1_ps(u.scale[2 * s + 1]), _mm_set1_ps(u.scale[2 * s])),
            )
        }
    }
}

/// Chooses the kernel for the operands' format.
#[inline(always)]
unsafe fn dispatch<D: Dot>(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    // SAFETY (every arm): the caller's contract.
    unsafe {
        if ops.f.signed {
            cover_int::<D, Generic<true>>(ops, i0, i1, j0, j1, out)
        } else {
            cover_int::<D, Generic<false>>(ops, i0, i1, j0, j1, out)
        }
    }
}

/// Input rows per integer tile: their accumulators stay in registers while
/// each weight block is decoded once for all of them.
const INT_MR: usize = 4;

#[inline(always)]
unsafe fn cover_int<D: Dot, U: Unpack>(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    let mut coefs = vec![0f32; ops.coefs_per_row()];
    // SAFETY (all tiles): each stays inside i0..i1 x j0..j1, which the caller owns.
    unsafe {
        let mut i = i0;
        while i < i1 {
            let rows = (i1 - i).min(INT_MR);
            let wide = ops.q.bits == ActBits::Int16;
            for j in j0..j1 {
                match (rows, wide) {
                    (1, false) => int_tile::<D, U, 1, false>(ops, i, j, &mut coefs, out),
                    (2, false) => int_tile::<D, U, 2, false>(ops, i, j, &mut coefs, out),
                    (3, false) => int_tile::<D, U, 3, false>(ops, i, j, &mut coefs, out),
                    (_, false) => int_tile::<D, U, INT_MR, false>(ops, i, j, &mut coefs, out),
                    (1, true) => int_tile::<D, U, 1, true>(ops, i, j, &mut coefs, out),
                    (2, true) => int_tile::<D, U, 2, true>(ops, i, j, &mut coefs, out),
                    (3, true) => int_tile::<D, U, 3, true>(ops, i, j, &mut coefs, out),
                    (_, true) => int_tile::<D, U, INT_MR, true>(ops, i, j, &mut coefs, out),
                }
            }
            i += rows;
        }
    }
}

/// `MR` input rows from `i` against weight row `j`.
///
/// # Safety
/// `i + MR <= m`, `j < n`; the caller owns those output elements; `coefs`
/// holds a row's coefficients.
#[inline(always)]
unsafe fn int_tile<D: Dot, U: Unpack, const MR: usize, const WIDE: bool>(
    ops: &IntOperands,
    i: usize,
    j: usize,
    coefs: &mut [f32],
    out: *mut f32,
) {
    let (k, nb) = (ops.k, ops.k / QK);
    let sub = ops.f.elems / QK;
    let cpb = ops.f.coefs_per_block();
    debug_assert!(coefs.len() >= k / ops.f.elems * cpb);
    // SAFETY: block u of row j lies inside the weight buffer (checked at
    // upload); the activation rows i..i + MR hold k bytes and nb scales each;
    // `coefs` holds k / ELEMS * cpb floats.
    unsafe {
        let row = ops.w.as_ptr().add(j * ops.row_bytes);
        let xs: [*const i8; MR] = std::array::from_fn(|ii| ops.q.qx.as_ptr().add((i + ii) * k));
        let xs16: [*const i16; MR] =
            std::array::from_fn(|ii| ops.q.qx16.as_ptr().add((i + ii) * k));
        let ds: [*const f32; MR] = std::array::from_fn(|ii| ops.q.dx.as_ptr().add((i + ii) * nb));
        let mut acc = [_mm256_setzero_ps(); MR];
        for u in 0..k / ops.f.elems {
            let blk = U::block(
                &ops.f,
                row.add(u * ops.f.bytes),
                coefs.as_mut_ptr().add(u * cpb),
            );
            for s in 0..sub {
                let b = u * sub + s;
                let (codes, scale) = U::sub(&blk, s);
                let (c0, c1) = if WIDE {
                    if U::SIGNED {
                        widen16::<true>(codes)
                    } else {
                        widen16::<false>(codes)
                    }
                } else {
                    (codes, codes)
                };
                for ii in 0..MR {
                    let lanes = if WIDE {
                        let xp = xs16[ii].add(QK * b);
                        let x0 = _mm256_loadu_si256(xp as *const __m256i);
                        let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
                        D::dot16(c0, x0, c1, x1)
                    } else {
                        let xq = _mm256_loadu_si256(xs[ii].add(QK * b) as *const __m256i);
                        if U::SIGNED {
                            dot_signed::<D>(codes, xq)
                        } else {
                            D::dot(codes, xq)
                        }
                    };
                    let f = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(lanes),
                        _mm256_broadcast_ss(&*ds[ii].add(b)),
                    );
                    acc[ii] = _mm256_fmadd_ps(f, scale, acc[ii]);
                }
            }
        }
        for (ii, a) in acc.iter().enumerate() {
            let y = hsum(*a) + offset_dot(coefs, ops.sums(i + ii));
            *out.add((i + ii) * ops.n + j) = y;
        }
    }
}
