//! x86-64 kernels over interleaved weights: the canonical computation of
//! [`crate::cpu::packed`], lane `r` of every register being row `r` of a group.
//!
//! Per group and 32-block the codes are decoded once into eight registers
//! (four elements of each row); each input row then broadcasts its four
//! activation bytes against each, adding into the rows' exact block sums at
//! once, and one convert, multiply and FMA scale them all. 16-bit
//! activations take two such passes, their `hi` and `lo` bytes, joined as
//! `255 * hi + lo` in integers. AVX2 and AVX-VNNI work on 256-bit
//! registers, half a group at a time; AVX512-VNNI on 512-bit registers, a
//! whole group of 16 rows (`tile512`), with the same lanes' arithmetic.

use std::arch::x86_64::*;

use super::amx::MT;
use super::int::{Avx2Dot, AvxVnniDot, Dot};
use super::unpack::{
    by_format, codes256, codes512, format, head256, head512, scales256, scales512,
};
use crate::cpu::actq::{ActBits, QuantizedRows};
use crate::cpu::isa::Isa;
use crate::cpu::packed::{PackedOperands, NR};
use crate::cpu::{PREFETCH_FAR_BYTES, PREFETCH_NEAR_BYTES};

/// Which kernels run a product over packed weights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernels {
    /// The vector instruction set.
    pub isa: Isa,
    /// Whole tiles of 16 input rows go to the AMX kernel (see [`block`]).
    pub amx: bool,
}

/// Runs the kernels of `isa` over input rows `i0..i1` and groups `g0..g1`;
/// with `amx`, whole tiles of 16 rows go to the AMX kernel
/// ([`super::amx`]) and only the rest to `isa`'s.
///
/// # Safety
/// `isa` is supported by this CPU, and AMX if `amx` (see
/// [`crate::cpu::isa::chosen`]); `out` points to an `m x n` buffer of
/// which no other thread touches these elements.
pub(crate) unsafe fn block(
    Kernels { isa, amx }: Kernels,
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let mut i0 = i0;
    if amx {
        let whole = (i1 - i0) / MT * MT;
        if whole > 0 {
            // SAFETY: the caller's contract; AMX implies AVX-512.
            unsafe { super::amx::block(ops, i0, i0 + whole, g0, g1, out) };
            i0 += whole;
        }
        if i0 == i1 {
            return;
        }
    }
    // SAFETY: the features of each entry point are those `isa` was detected with.
    unsafe {
        match isa {
            Isa::Avx2 => packed_avx2(ops, i0, i1, g0, g1, out),
            Isa::AvxVnni => packed_avxvnni(ops, i0, i1, g0, g1, out),
            Isa::Avx512Vnni => packed_avx512vnni(ops, i0, i1, g0, g1, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_avx2(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { dispatch::<Avx2Dot>(ops, i0, i1, g0, g1, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn packed_avxvnni(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { dispatch::<AvxVnniDot>(ops, i0, i1, g0, g1, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn packed_avx512vnni(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { by_format!(ops.w.fmt, F => cover512::<F>(ops, i0, i1, g0, g1, out)) }
}

/// Input rows per tile: their accumulators stay in registers while each
/// group's block is decoded once for all of them.
const MR: usize = 4;

/// Input rows per 512-bit tile (32 registers hold more accumulators).
const MR512: usize = 6;

#[inline(always)]
unsafe fn dispatch<D: OutlinedTile>(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { by_format!(ops.w.fmt, F => cover::<D, F>(ops, i0, i1, g0, g1, out)) }
}

#[inline(always)]
unsafe fn cover<D: OutlinedTile, const F: u8>(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let wide = ops.q.bits == ActBits::Int16;
    // SAFETY (all tiles): each stays inside i0..i1 x groups g0..g1, which the caller owns.
    unsafe {
        for g in g0..g1 {
            for h in 0..2 {
                if g * NR + HALF * h >= ops.n {
                    break; // only padding rows
                }
                let mut i = i0;
                while i < i1 {
                    let rows = (i1 - i).min(MR);
                    match (rows, wide) {
                        (1, false) => outlined::<D, F, 1, false>(ops, i, g, h, out),
                        (2, false) => outlined::<D, F, 2, false>(ops, i, g, h, out),
                        (3, false) => outlined::<D, F, 3, false>(ops, i, g, h, out),
                        (_, false) => outlined::<D, F, MR, false>(ops, i, g, h, out),
                        (1, true) => outlined::<D, F, 1, true>(ops, i, g, h, out),
                        (2, true) => outlined::<D, F, 2, true>(ops, i, g, h, out),
                        (3, true) => outlined::<D, F, 3, true>(ops, i, g, h, out),
                        (_, true) => outlined::<D, F, MR, true>(ops, i, g, h, out),
                    }
                    i += rows;
                }
            }
        }
    }
}

/// [`tile`] for one instruction set, as a function of its own.
///
/// Each tile is outlined (as is [`tile512`]) so that every format, height
/// and width is a separate function: inlined, all of them made each entry
/// point one body of 450-880 thousand lines of LLVM IR, which took the
/// optimiser over ten minutes on one core per build of this crate (the
/// largest part of a CI run). A call per tile costs nothing measurable
/// beside the tile's pass over a whole row of codes. Called through
/// [`outlined`], which is what keeps it outlined.
trait OutlinedTile: Dot {
    /// # Safety
    /// As [`tile`]; the CPU has the implementation's instruction set.
    unsafe fn tile<const F: u8, const R: usize, const WIDE: bool>(
        ops: &PackedOperands,
        i: usize,
        g: usize,
        half: usize,
        out: *mut f32,
    );
}

macro_rules! outlined_tile {
    ($dot:ty, $features:literal) => {
        impl OutlinedTile for $dot {
            #[target_feature(enable = $features)]
            unsafe fn tile<const F: u8, const R: usize, const WIDE: bool>(
                ops: &PackedOperands,
                i: usize,
                g: usize,
                half: usize,
                out: *mut f32,
            ) {
                // SAFETY: the caller's contract, with this set's features.
                unsafe { tile::<Self, F, R, WIDE>(ops, i, g, half, out) }
            }
        }
    };
}

outlined_tile!(Avx2Dot, "avx2,fma,f16c");
outlined_tile!(AvxVnniDot, "avx2,fma,f16c,avxvnni");

/// Calls `D`'s [`OutlinedTile::tile`], and is why that stays a function of
/// its own. `#[inline(never)]` on a `#[target_feature]` function does not
/// reach LLVM as such: rustc (1.95) marks the calls to one `noinline` only
/// at call sites in functions that have its features themselves. That is
/// why [`cover512`] and `amx::block` have the features of their tiles; but
/// [`cover`] is generic over the instruction set, so it can have none (it
/// takes them from the entry point it is inlined into), and without this
/// wrapper the release build inlined every tile again. This wrapper has
/// no target features, so it keeps its own `noinline`, and LLVM never
/// inlines a function with more target features (the tile) into one with
/// fewer. Two calls per tile, against a tile's pass over a row of codes.
///
/// # Safety
/// As [`OutlinedTile::tile`].
#[inline(never)]
unsafe fn outlined<D: OutlinedTile, const F: u8, const R: usize, const WIDE: bool>(
    ops: &PackedOperands,
    i: usize,
    g: usize,
    half: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { D::tile::<F, R, WIDE>(ops, i, g, half, out) }
}

/// Four activation bytes at `p`, in every lane.
#[inline(always)]
unsafe fn broadcast4(p: *const i8) -> __m256i {
    // SAFETY: four readable bytes at p.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
}

/// The exact sums of `N` code registers from `q0` (as [`codes256`] leaves
/// them, or their magnitudes `mag` for signed Q8_0 on AVX2) against the
/// activation bytes of the same elements in the 32 at `x`.
#[inline(always)]
unsafe fn part_sum<D: Dot, const SIGN_TRICK: bool, const N: usize>(
    c: &[__m256i; 8],
    mag: &[__m256i; 8],
    x: *const i8,
    q0: usize,
) -> __m256i {
    // SAFETY: 32 readable bytes at x.
    unsafe {
        // Independent sums (integer additions are exact in any order), so
        // consecutive products do not wait on each other's latency.
        let mut s = [_mm256_setzero_si256(); 4];
        for k in 0..N {
            let q = q0 + k;
            let xb = broadcast4(x.add(4 * q));
            s[k % 4] = if SIGN_TRICK {
                // |w| against x with w's sign: exact for |x| <= 127.
                D::dot_add(s[k % 4], mag[q], _mm256_sign_epi8(xb, c[q]))
            } else {
                D::dot_add(s[k % 4], c[q], xb)
            };
        }
        _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]))
    }
}

/// [`part_sum`] of the activation block at `x`: one row of 8-bit values,
/// or, `WIDE`, the 32 `hi` bytes then the 32 `lo` bytes joined as
/// `255 * hi + lo`, exactly.
#[inline(always)]
unsafe fn act_sum<D: Dot, const SIGN_TRICK: bool, const N: usize, const WIDE: bool>(
    c: &[__m256i; 8],
    mag: &[__m256i; 8],
    x: *const i8,
    q0: usize,
) -> __m256i {
    // SAFETY: 32 (64 when wide) readable bytes at x.
    unsafe {
        let s = part_sum::<D, SIGN_TRICK, N>(c, mag, x, q0);
        if WIDE {
            let lo = part_sum::<D, SIGN_TRICK, N>(c, mag, x.add(32), q0);
            _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32::<8>(s), s), lo)
        } else {
            s
        }
    }
}

/// Prefetches, while sub-block `s` of the chunk at `p` is computed, its
/// share of the cache lines [`PREFETCH_FAR_BYTES`] further on into L2 and of
/// those [`PREFETCH_NEAR_BYTES`] further on into L1, so that over a chunk's
/// sub-blocks every line of the chunk that far ahead is asked for once at
/// each distance. (A prefetch is a hint that never faults, so an address
/// past the end of the weights is harmless; it is formed with
/// `wrapping_add`.)
#[inline(always)]
unsafe fn prefetch_ahead(fmt: crate::cpu::packed::PackedFormat, p: *const u8, s: usize) {
    let lines = fmt.chunk().div_ceil(64).div_ceil(fmt.subs());
    for l in 0..lines {
        let line = 64 * (s * lines + l);
        let far = p.wrapping_add(PREFETCH_FAR_BYTES + line);
        let near = p.wrapping_add(PREFETCH_NEAR_BYTES + line);
        // SAFETY: prefetching reads nothing and never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(far as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(near as *const i8);
        }
    }
}

/// Rows of a group one 256-bit register holds.
const HALF: usize = NR / 2;

/// `R` input rows from `i` against half `half` (rows `8 half..8 half + 8`)
/// of group `g`.
///
/// # Safety
/// `i + R <= m`, `g` is a group of the weight with a row `g * NR + 8 half`;
/// the caller owns those output elements.
#[inline(always)]
unsafe fn tile<D: Dot, const F: u8, const R: usize, const WIDE: bool>(
    ops: &PackedOperands,
    i: usize,
    g: usize,
    half: usize,
    out: *mut f32,
) {
    let fmt = format::<F>();
    let nb = ops.k / 32;
    let q = ops.q;
    // Q8_0: VNNI takes the codes as unsigned bytes w + 128 (zero point 128);
    // AVX2's maddubs would saturate on those, so it multiplies |w| by x with w's sign.
    let sign_trick = fmt.signed() && !D::FULL_BYTES;
    let zero_point = if sign_trick { 0 } else { fmt.zero_point() };
    let x_bytes = if WIDE { 64 } else { 32 };
    let xs = if WIDE { q.hilo.as_ptr() } else { q.qx.as_ptr() };
    // SAFETY: chunk (g, fb) lies inside the packed data; activation block
    // (i + ii, b) lies inside the quantized rows (64 bytes each when wide,
    // 32 otherwise), as do its scale and sums.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm256_setzero_ps(); R];
        for fb in 0..nb / fmt.subs() {
            let p = ops.chunk(fmt, g, fb).as_ptr();
            // This half's bytes: 4 of each 8 per code vector, 2 of each 16
            // per f16 row, 1 of each 16 per byte row of scales.
            let head = p.add(fmt.head());
            let (d, second) = head256::<F>(head.add(2 * HALF * half));
            let scales_at = head.add(HALF * half);
            for s in 0..fmt.subs() {
                prefetch_ahead(fmt, p, s);
                let mut c = codes256::<F>(p.add(s * fmt.sub_bytes() + 4 * HALF * half));
                let mut mag = [_mm256_setzero_si256(); 8];
                if sign_trick {
                    for (m, cq) in mag.iter_mut().zip(&c) {
                        *m = _mm256_abs_epi8(*cq);
                    }
                } else if fmt.signed() {
                    let flip = _mm256_set1_epi8(i8::MIN);
                    for cq in c.iter_mut() {
                        *cq = _mm256_xor_si256(*cq, flip);
                    }
                }
                // Scales of the sub-block (or its two halves) and its
                // offsets (of its halves, which differ only for Q2_K).
                let (sc0, sc1, min0, min1) = scales256::<F>(scales_at, d, second, s);
                for ii in 0..R {
                    let blk = (i + ii) * nb + fb * fmt.subs() + s;
                    let x = xs.add(x_bytes * blk);
                    let dx = _mm256_set1_ps(*q.dx.get_unchecked(blk));
                    if fmt.halves() {
                        let (s0, s1) = if sign_trick {
                            unreachable!("only Q8_0 takes the sign trick")
                        } else {
                            (
                                act_sum::<D, false, 4, WIDE>(&c, &mag, x, 0),
                                act_sum::<D, false, 4, WIDE>(&c, &mag, x, 4),
                            )
                        };
                        let k0 = zero_point * *q.isum16.get_unchecked(2 * blk);
                        let k1 = zero_point * *q.isum16.get_unchecked(2 * blk + 1);
                        let s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(k0));
                        let s1 = _mm256_sub_epi32(s1, _mm256_set1_epi32(k1));
                        acc[ii] = _mm256_fmadd_ps(
                            _mm256_mul_ps(_mm256_cvtepi32_ps(s0), dx),
                            sc0,
                            acc[ii],
                        );
                        acc[ii] = _mm256_fmadd_ps(
                            _mm256_mul_ps(_mm256_cvtepi32_ps(s1), dx),
                            sc1,
                            acc[ii],
                        );
                    } else {
                        let sum = if sign_trick {
                            act_sum::<D, true, 8, WIDE>(&c, &mag, x, 0)
                        } else {
                            act_sum::<D, false, 8, WIDE>(&c, &mag, x, 0)
                        };
                        let sum = if zero_point != 0 {
                            let k = zero_point * *q.isum.get_unchecked(blk);
                            _mm256_sub_epi32(sum, _mm256_set1_epi32(k))
                        } else {
                            sum
                        };
                        acc[ii] = _mm256_fmadd_ps(
                            _mm256_mul_ps(_mm256_cvtepi32_ps(sum), dx),
                            sc0,
                            acc[ii],
                        );
                    }
                    if fmt.has_min() && fmt.halves() {
                        let xsum0 = _mm256_set1_ps(*q.sum16.get_unchecked(2 * blk));
                        let xsum1 = _mm256_set1_ps(*q.sum16.get_unchecked(2 * blk + 1));
                        off[ii] = _mm256_fmadd_ps(min0, xsum0, off[ii]);
                        off[ii] = _mm256_fmadd_ps(min1, xsum1, off[ii]);
                    } else if fmt.has_min() {
                        let xsum = _mm256_set1_ps(*q.sum32.get_unchecked(blk));
                        off[ii] = _mm256_fmadd_ps(min0, xsum, off[ii]);
                    }
                }
            }
        }
        let j0 = g * NR + HALF * half;
        let lanes = (ops.n - j0).min(HALF);
        for ii in 0..R {
            let y = _mm256_add_ps(acc[ii], off[ii]);
            let dst = out.add((i + ii) * ops.n + j0);
            if lanes == HALF {
                _mm256_storeu_ps(dst, y);
            } else {
                let mut tmp = [0f32; HALF];
                _mm256_storeu_ps(tmp.as_mut_ptr(), y);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, lanes);
            }
        }
    }
}

// The same kernel on 512-bit registers (AVX512-VNNI): a whole group of 16
// rows per register, half the instructions per product. Lane for lane the
// same integer sums and float operations as `tile`, so the same results.
//
// The decoders the two share are written once (`super::unpack`); the tile
// loops stay twins on purpose: they differ in more than register width (the
// 256-bit one covers half a group, is generic over `Dot` with AVX2's sign
// trick for Q8_0's signed codes, and stores through a buffer at a ragged
// edge; the 512-bit one covers a whole group with `dpbusd` alone, picks its
// number of independent sums by tile height, and stores with a mask), so a
// width-generic body would carry each difference as a parameter of the hot
// loop without removing any code.

// With the features of its own (not only those of the entry point it is
// inlined into), so that its calls keep `tile512`'s `#[inline(never)]`:
// see `outlined`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn cover512<const F: u8>(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let wide = ops.q.bits == ActBits::Int16;
    // SAFETY (all tiles): each stays inside i0..i1 x groups g0..g1, which the caller owns.
    unsafe {
        for g in g0..g1 {
            let mut i = i0;
            while i < i1 {
                let rows = (i1 - i).min(MR512);
                match (rows, wide) {
                    (1, false) => tile512::<F, 1, false>(ops, i, g, out),
                    (2, false) => tile512::<F, 2, false>(ops, i, g, out),
                    (3, false) => tile512::<F, 3, false>(ops, i, g, out),
                    (4, false) => tile512::<F, 4, false>(ops, i, g, out),
                    (5, false) => tile512::<F, 5, false>(ops, i, g, out),
                    (_, false) => tile512::<F, MR512, false>(ops, i, g, out),
                    (1, true) => tile512::<F, 1, true>(ops, i, g, out),
                    (2, true) => tile512::<F, 2, true>(ops, i, g, out),
                    (3, true) => tile512::<F, 3, true>(ops, i, g, out),
                    (4, true) => tile512::<F, 4, true>(ops, i, g, out),
                    (5, true) => tile512::<F, 5, true>(ops, i, g, out),
                    (_, true) => tile512::<F, MR512, true>(ops, i, g, out),
                }
                i += rows;
            }
        }
    }
}

/// [`part_sum`] on a whole group (codes from [`codes512`], unsigned), its
/// products spread over `CH` independent sums (integer additions are exact
/// in any order). Two where the tile's rows give independent chains of
/// their own (one chain per row ran 16-bit activations over 128 rows at 85
/// GMAC/s on one Emerald Rapids core with four rows per tile, two chains
/// at 110 with six). Four for a lone row, so that each sum waits on one
/// cache line of codes (registers `q` and `q + 4` of a 4-bit format come
/// from the same line): with weights streaming from memory, the two
/// longer chains of [`rows_sum512`] read Q4_0 at 41-43 GMAC/s against
/// 43-47 and Q6_K at 29-31 against 33-35 (one Zen 4 core, 8192 x 3072),
/// though they were 10-20% faster with the weights in cache.
/// (Functions, not closures: closures do not inherit the caller's target
/// features, and their intrinsics would become calls.)
#[inline(always)]
unsafe fn part_sum512<const N: usize, const CH: usize>(
    c: &[__m512i; 8],
    x: *const i8,
    q0: usize,
) -> __m512i {
    // SAFETY: 32 readable bytes at x; AVX512-VNNI per the caller.
    unsafe {
        let mut s = [_mm512_setzero_si512(); CH];
        for k in 0..N {
            let q = q0 + k;
            let xb = broadcast4_512(x.add(4 * q));
            s[k % CH] = _mm512_dpbusd_epi32(s[k % CH], c[q], xb);
        }
        let mut sum = s[0];
        for &v in &s[1..] {
            sum = _mm512_add_epi32(sum, v);
        }
        sum
    }
}

/// [`act_sum`] on a whole group, for a tile of `R` rows (one, or four and
/// more over the halves' formats; the others take [`rows_sum512`]).
#[inline(always)]
unsafe fn act_sum512<const N: usize, const WIDE: bool, const R: usize>(
    c: &[__m512i; 8],
    x: *const i8,
    q0: usize,
) -> __m512i {
    // SAFETY: 32 (64 when wide) readable bytes at x.
    unsafe {
        // (No closure for the two calls: it would not inherit the target features.)
        let s = if R >= 4 {
            part_sum512::<N, 2>(c, x, q0)
        } else {
            part_sum512::<N, 4>(c, x, q0)
        };
        if WIDE {
            let x = x.add(32);
            let lo = if R >= 4 {
                part_sum512::<N, 2>(c, x, q0)
            } else {
                part_sum512::<N, 4>(c, x, q0)
            };
            _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32::<8>(s), s), lo)
        } else {
            s
        }
    }
}

/// Four activation bytes at `p`, in every lane of a 512-bit register.
#[inline(always)]
unsafe fn broadcast4_512(p: *const i8) -> __m512i {
    // SAFETY: four readable bytes at p.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
}

/// `-K * k` in every lane (zero without a zero point): where a part's
/// sums start.
#[inline(always)]
unsafe fn sum_start512(zero_point: i32, k: i32) -> __m512i {
    // SAFETY: AVX-512F per the caller.
    unsafe {
        if zero_point == 0 {
            _mm512_setzero_si512()
        } else {
            _mm512_set1_epi32(-zero_point * k)
        }
    }
}

/// The exact sums of a sub-block's eight code registers against each of
/// a tile's `R` activation blocks (at `xs`), per part: the whole 32 when
/// `P` is 1, two halves of 16 (registers 0..4 and 4..8) when it is 2.
/// Every row's part starts from `start` (its `-K * sum(qx)` over the
/// part, so no subtraction follows). Where [`act_sum512`] finishes one
/// row before the next, this walks the codes once with the rows
/// innermost, so each code register meets every row's broadcast in turn,
/// and each row and part keeps two independent chains (the `hi` and `lo`
/// bytes when `WIDE`, even and odd registers otherwise) and none of the
/// partial sums [`part_sum512`] adds up.
///
/// On one Zen 4 core (AMD EPYC build machine), alternating `linear_bench`
/// runs, 16-bit activations: 128 rows went from 84 to 89 GMAC/s for Q4_K,
/// 89-90 to 93 for Q4_0 and 92-93 to 94-95 for Q8_0 (3072 x 3072); two
/// and three rows with the weights streaming from memory (8192 x 3072,
/// best of three): Q4_K 79 to 83 and 82 to 88, Q4_0 78 to 87 and 82 to
/// 91, Q6_K 50 to 56 and 55 to 62. A lone row keeps [`act_sum512`] (see
/// [`part_sum512`]), and so does Q8_0 over two or three rows (43 to 40
/// from memory: its chains span eight lines each); the halves over four
/// or more rows do too: with both halves' chains live for every row the
/// registers run out (Q6_K, 128 rows: 66-73 GMAC/s either way).
#[inline(always)]
unsafe fn rows_sum512<const WIDE: bool, const R: usize, const P: usize>(
    c: &[__m512i; 8],
    xs: &[*const i8; R],
    start: [[__m512i; P]; R],
) -> [[__m512i; P]; R] {
    // SAFETY: 32 (64 when wide) readable bytes at each xs[ii].
    unsafe {
        let mut a = [[_mm512_setzero_si512(); P]; R];
        let mut b = start;
        for (q, &cq) in c.iter().enumerate() {
            let h = q / (8 / P);
            for ii in 0..R {
                let x = xs[ii].add(4 * q);
                if WIDE {
                    a[ii][h] = _mm512_dpbusd_epi32(a[ii][h], cq, broadcast4_512(x));
                    b[ii][h] = _mm512_dpbusd_epi32(b[ii][h], cq, broadcast4_512(x.add(32)));
                } else if q % 2 == 0 {
                    b[ii][h] = _mm512_dpbusd_epi32(b[ii][h], cq, broadcast4_512(x));
                } else {
                    a[ii][h] = _mm512_dpbusd_epi32(a[ii][h], cq, broadcast4_512(x));
                }
            }
        }
        let mut out = b;
        for ii in 0..R {
            for h in 0..P {
                let (hi, lo) = (a[ii][h], b[ii][h]);
                out[ii][h] = if WIDE {
                    // 255 * hi + lo, with lo's sum already holding -K * sum(qx).
                    _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32::<8>(hi), hi), lo)
                } else {
                    _mm512_add_epi32(hi, lo)
                };
            }
        }
        out
    }
}

/// Whether a tile of `rows` rows over `fmt` takes the rows-innermost walk
/// ([`rows_add512`]) rather than [`act_sum512`] row by row: wherever it
/// measured faster (see [`rows_sum512`]), so not for a lone row, nor for
/// Q8_0 over two or three rows, nor for the halves' formats over four or
/// more.
#[inline(always)]
const fn rows_innermost(fmt: crate::cpu::packed::PackedFormat, rows: usize) -> bool {
    if fmt.halves() {
        rows > 1 && rows < 4
    } else {
        rows >= 4 || (rows > 1 && fmt.code_bits() < 8)
    }
}

/// One sub-block of a tile of `R` rows by the rows-innermost walk
/// ([`rows_sum512`]) over `P` parts (1, or 2 for the halves' formats):
/// each row's exact sums scaled into `acc` and its offsets added into
/// `off`, in the canonical order. `b0` is the sub-block's block index in
/// the tile's first row; each next row's is `nb` further.
///
/// # Safety
/// As [`tile512`]: the tile's rows are rows of `q`, whose activations
/// (64 bytes a block when `WIDE`, else 32) start at `xs`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_add512<const F: u8, const WIDE: bool, const R: usize, const P: usize>(
    c: &[__m512i; 8],
    q: &QuantizedRows,
    xs: *const i8,
    b0: usize,
    nb: usize,
    (sc0, sc1, min0, min1): (__m512, __m512, __m512, __m512),
    acc: &mut [__m512; R],
    off: &mut [__m512; R],
) {
    let zero_point = format::<F>().zero_point();
    let x_bytes = if WIDE { 64 } else { 32 };
    // SAFETY: the caller's contract.
    unsafe {
        let mut xr = [std::ptr::null::<i8>(); R];
        let mut start = [[_mm512_setzero_si512(); P]; R];
        for ii in 0..R {
            let blk = b0 + ii * nb;
            xr[ii] = xs.add(x_bytes * blk);
            for (h, st) in start[ii].iter_mut().enumerate() {
                let k = if P == 1 {
                    *q.isum.get_unchecked(blk)
                } else {
                    *q.isum16.get_unchecked(2 * blk + h)
                };
                *st = sum_start512(zero_point, k);
            }
        }
        let sums = rows_sum512::<WIDE, R, P>(c, &xr, start);
        for ii in 0..R {
            let blk = b0 + ii * nb;
            let dx = _mm512_set1_ps(*q.dx.get_unchecked(blk));
            acc[ii] = scaled_add512(acc[ii], sums[ii][0], dx, sc0);
            if P == 2 {
                acc[ii] = scaled_add512(acc[ii], sums[ii][P - 1], dx, sc1);
            }
            off[ii] = add_offsets512::<F>(off[ii], q, blk, min0, min1);
        }
    }
}

/// `acc + float(sum) * dx * scale`, rounded as the canonical computation
/// does ([`crate::cpu::packed`]): the product with `dx` first, then one
/// fused multiply-add.
#[inline(always)]
unsafe fn scaled_add512(acc: __m512, sum: __m512i, dx: __m512, scale: __m512) -> __m512 {
    // SAFETY: AVX-512F per the caller.
    unsafe { _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), dx), scale, acc) }
}

/// `off` plus block `blk`'s offset terms where the format has minimums:
/// each part's minimum times the activations' sum over it (two halves of
/// 16 for Q2_K, the whole 32 otherwise); `off` itself without them.
///
/// # Safety
/// `blk` is a block of the quantized rows `q`; AVX-512F per the caller.
#[inline(always)]
unsafe fn add_offsets512<const F: u8>(
    off: __m512,
    q: &QuantizedRows,
    blk: usize,
    min0: __m512,
    min1: __m512,
) -> __m512 {
    let fmt = format::<F>();
    // SAFETY: the caller's contract.
    unsafe {
        if fmt.has_min() && fmt.halves() {
            let xsum0 = _mm512_set1_ps(*q.sum16.get_unchecked(2 * blk));
            let xsum1 = _mm512_set1_ps(*q.sum16.get_unchecked(2 * blk + 1));
            let off = _mm512_fmadd_ps(min0, xsum0, off);
            _mm512_fmadd_ps(min1, xsum1, off)
        } else if fmt.has_min() {
            let xsum = _mm512_set1_ps(*q.sum32.get_unchecked(blk));
            _mm512_fmadd_ps(min0, xsum, off)
        } else {
            off
        }
    }
}

/// [`tile`] for a whole group on 512-bit registers.
///
/// # Safety
/// As [`tile`]; the CPU has AVX512F, BW, VL and VNNI.
// A function of its own, as `OutlinedTile::tile` is.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline(never)]
unsafe fn tile512<const F: u8, const R: usize, const WIDE: bool>(
    ops: &PackedOperands,
    i: usize,
    g: usize,
    out: *mut f32,
) {
    let fmt = format::<F>();
    let nb = ops.k / 32;
    let q = ops.q;
    let zero_point = fmt.zero_point();
    let x_bytes = if WIDE { 64 } else { 32 };
    let xs = if WIDE { q.hilo.as_ptr() } else { q.qx.as_ptr() };
    // SAFETY: as in `tile`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let mut off = [_mm512_setzero_ps(); R];
        for fb in 0..nb / fmt.subs() {
            let p = ops.chunk(fmt, g, fb).as_ptr();
            let head = p.add(fmt.head());
            let (d, second) = head512::<F>(head);
            for s in 0..fmt.subs() {
                prefetch_ahead(fmt, p, s);
                let mut c = codes512::<F>(p.add(s * fmt.sub_bytes()));
                if fmt.signed() {
                    let flip = _mm512_set1_epi8(i8::MIN);
                    for cq in c.iter_mut() {
                        *cq = _mm512_xor_si512(*cq, flip);
                    }
                }
                let scales = scales512::<F>(head, d, second, s);
                let b0 = i * nb + fb * fmt.subs() + s;
                if rows_innermost(fmt, R) {
                    if fmt.halves() {
                        rows_add512::<F, WIDE, R, 2>(&c, q, xs, b0, nb, scales, &mut acc, &mut off);
                    } else {
                        rows_add512::<F, WIDE, R, 1>(&c, q, xs, b0, nb, scales, &mut acc, &mut off);
                    }
                    continue;
                }
                let (sc0, sc1, min0, min1) = scales;
                for ii in 0..R {
                    let blk = b0 + ii * nb;
                    let x = xs.add(x_bytes * blk);
                    let dx = _mm512_set1_ps(*q.dx.get_unchecked(blk));
                    if fmt.halves() {
                        let k0 = zero_point * *q.isum16.get_unchecked(2 * blk);
                        let k1 = zero_point * *q.isum16.get_unchecked(2 * blk + 1);
                        let s0 = _mm512_sub_epi32(
                            act_sum512::<4, WIDE, R>(&c, x, 0),
                            _mm512_set1_epi32(k0),
                        );
                        let s1 = _mm512_sub_epi32(
                            act_sum512::<4, WIDE, R>(&c, x, 4),
                            _mm512_set1_epi32(k1),
                        );
                        acc[ii] = scaled_add512(acc[ii], s0, dx, sc0);
                        acc[ii] = scaled_add512(acc[ii], s1, dx, sc1);
                    } else {
                        let sum = act_sum512::<8, WIDE, R>(&c, x, 0);
                        let sum = if zero_point != 0 {
                            let k = zero_point * *q.isum.get_unchecked(blk);
                            _mm512_sub_epi32(sum, _mm512_set1_epi32(k))
                        } else {
                            sum
                        };
                        acc[ii] = scaled_add512(acc[ii], sum, dx, sc0);
                    }
                    off[ii] = add_offsets512::<F>(off[ii], q, blk, min0, min1);
                }
            }
        }
        let j0 = g * NR;
        let lanes = (ops.n - j0).min(NR);
        let mask: __mmask16 = if lanes == NR { !0 } else { (1u16 << lanes) - 1 };
        for ii in 0..R {
            let y = _mm512_add_ps(acc[ii], off[ii]);
            _mm512_mask_storeu_ps(out.add((i + ii) * ops.n + j0), mask, y);
        }
    }
}
