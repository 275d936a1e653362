//! x86-64 kernels over interleaved weights: the canonical computation of
//! [`super::packed`], lane `r` of every register being row `r` of a group.
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

use super::actq::ActBits;
use super::packed::{PackedFormat, PackedOperands, NR, VB};
use super::x86::{Avx2Dot, AvxVnniDot, Dot, Isa};
use super::x86_amx::MT;

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
/// ([`super::x86_amx`]) and only the rest to `isa`'s.
///
/// # Safety
/// `isa` is supported by this CPU, and AMX if `amx` (see
/// [`super::x86_amx::available`]); `out` points to an `m x n` buffer of
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
            unsafe { super::x86_amx::block(ops, i0, i0 + whole, g0, g1, out) };
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

#[inline(always)]
unsafe fn dispatch<D: Dot>(
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

/// Evaluates `$body` with `$F` a `u8` constant naming the packed format
/// `$fmt` (the index [`format`] maps back), so that each format gets its
/// own instance of a kernel generic over `const F: u8`.
macro_rules! by_format {
    ($fmt:expr, $F:ident => $body:expr) => {
        match $fmt {
            PackedFormat::Q8_0 => {
                const $F: u8 = 0;
                $body
            }
            PackedFormat::Q4_0 => {
                const $F: u8 = 1;
                $body
            }
            PackedFormat::Q4_1 => {
                const $F: u8 = 2;
                $body
            }
            PackedFormat::Q5_0 => {
                const $F: u8 = 3;
                $body
            }
            PackedFormat::Q5_1 => {
                const $F: u8 = 4;
                $body
            }
            PackedFormat::Q4K => {
                const $F: u8 = 5;
                $body
            }
            PackedFormat::Q5K => {
                const $F: u8 = 6;
                $body
            }
            PackedFormat::Q6K => {
                const $F: u8 = 7;
                $body
            }
            PackedFormat::Q2K => {
                const $F: u8 = 8;
                $body
            }
            PackedFormat::Q3K => {
                const $F: u8 = 9;
                $body
            }
        }
    };
}
pub(super) use by_format;

/// The format with index `F` (a const generic, so each is its own kernel).
pub(super) const fn format(f: u8) -> PackedFormat {
    match f {
        0 => PackedFormat::Q8_0,
        1 => PackedFormat::Q4_0,
        2 => PackedFormat::Q4_1,
        3 => PackedFormat::Q5_0,
        4 => PackedFormat::Q5_1,
        5 => PackedFormat::Q4K,
        6 => PackedFormat::Q5K,
        7 => PackedFormat::Q6K,
        8 => PackedFormat::Q2K,
        _ => PackedFormat::Q3K,
    }
}

#[inline(always)]
unsafe fn cover<D: Dot, const F: u8>(
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
                        (1, false) => tile::<D, F, 1, false>(ops, i, g, h, out),
                        (2, false) => tile::<D, F, 2, false>(ops, i, g, h, out),
                        (3, false) => tile::<D, F, 3, false>(ops, i, g, h, out),
                        (_, false) => tile::<D, F, MR, false>(ops, i, g, h, out),
                        (1, true) => tile::<D, F, 1, true>(ops, i, g, h, out),
                        (2, true) => tile::<D, F, 2, true>(ops, i, g, h, out),
                        (3, true) => tile::<D, F, 3, true>(ops, i, g, h, out),
                        (_, true) => tile::<D, F, MR, true>(ops, i, g, h, out),
                    }
                    i += rows;
                }
            }
        }
    }
}

/// The eight code registers of half a group's sub-block at `p` (the
/// sub-block plus 32 bytes for the second half): register `q` holds
/// elements `4q..4q + 4` of each of the half's eight rows. Q8_0's are its
/// signed bytes as stored.
#[inline(always)]
unsafe fn codes<const F: u8>(p: *const u8) -> [__m256i; 8] {
    let fmt = format(F);
    // SAFETY: one whole sub-block of the format at p.
    unsafe {
        let mut c = [_mm256_setzero_si256(); 8];
        if fmt.code_bits() == 8 {
            for (q, cq) in c.iter_mut().enumerate() {
                *cq = _mm256_loadu_si256(p.add(VB * q) as *const __m256i);
            }
            return c;
        }
        if fmt.code_bits() < 4 {
            // Bits 2(q % 4) and 2(q % 4) + 1 of vector q / 4 are register
            // q's element (16-bit shifts: what crosses from the neighbouring
            // byte lands outside the mask).
            let m = _mm256_set1_epi8(3);
            for v in 0..2 {
                let x = _mm256_loadu_si256(p.add(VB * v) as *const __m256i);
                c[4 * v] = _mm256_and_si256(x, m);
                c[4 * v + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(x), m);
                c[4 * v + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m);
                c[4 * v + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(x), m);
            }
            if fmt.code_bits() == 3 {
                // Bit q of the plane is the third bit of register q's element.
                let qh = _mm256_loadu_si256(p.add(2 * VB) as *const __m256i);
                let m = _mm256_set1_epi8(4);
                c[0] = or_masked256(c[0], _mm256_slli_epi16::<2>(qh), m);
                c[1] = or_masked256(c[1], _mm256_slli_epi16::<1>(qh), m);
                c[2] = or_masked256(c[2], qh, m);
                c[3] = or_masked256(c[3], _mm256_srli_epi16::<1>(qh), m);
                c[4] = or_masked256(c[4], _mm256_srli_epi16::<2>(qh), m);
                c[5] = or_masked256(c[5], _mm256_srli_epi16::<3>(qh), m);
                c[6] = or_masked256(c[6], _mm256_srli_epi16::<4>(qh), m);
                c[7] = or_masked256(c[7], _mm256_srli_epi16::<5>(qh), m);
            }
            return c;
        }
        let low = _mm256_set1_epi8(0x0f);
        for q in 0..4 {
            let v = _mm256_loadu_si256(p.add(VB * q) as *const __m256i);
            c[q] = _mm256_and_si256(v, low);
            c[q + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
        }
        // The planes hold the high bits of each byte's code; they move to
        // bit 4 (and 5) by shifts of 16-bit lanes, and the bits that cross
        // from the neighbouring byte land outside the mask.
        if fmt.code_bits() == 5 {
            // Bit q of a byte is the fifth bit of register q's element.
            let qh = _mm256_loadu_si256(p.add(4 * VB) as *const __m256i);
            let m = _mm256_set1_epi8(0x10);
            c[0] = _mm256_or_si256(c[0], _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m));
            c[1] = _mm256_or_si256(c[1], _mm256_and_si256(_mm256_slli_epi16::<3>(qh), m));
            c[2] = _mm256_or_si256(c[2], _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m));
            c[3] = _mm256_or_si256(c[3], _mm256_and_si256(_mm256_slli_epi16::<1>(qh), m));
            c[4] = _mm256_or_si256(c[4], _mm256_and_si256(qh, m));
            c[5] = _mm256_or_si256(c[5], _mm256_and_si256(_mm256_srli_epi16::<1>(qh), m));
            c[6] = _mm256_or_si256(c[6], _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m));
            c[7] = _mm256_or_si256(c[7], _mm256_and_si256(_mm256_srli_epi16::<3>(qh), m));
        } else if fmt.code_bits() == 6 {
            // Bits 2(q % 4) and 2(q % 4) + 1 of the plane of quads 0..4
            // (then of 4..8) are the top two bits of register q's element.
            let m = _mm256_set1_epi8(0x30);
            for h in 0..2 {
                let qh = _mm256_loadu_si256(p.add(4 * VB + VB * h) as *const __m256i);
                let r = 4 * h;
                c[r] = _mm256_or_si256(c[r], _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m));
                c[r + 1] =
                    _mm256_or_si256(c[r + 1], _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m));
                c[r + 2] = _mm256_or_si256(c[r + 2], _mm256_and_si256(qh, m));
                c[r + 3] =
                    _mm256_or_si256(c[r + 3], _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m));
            }
        }
        c
    }
}

/// Four activation bytes at `p`, in every lane.
#[inline(always)]
unsafe fn broadcast4(p: *const i8) -> __m256i {
    // SAFETY: four readable bytes at p.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
}

/// The exact sums of `N` code registers from `q0` (as [`codes`] leaves
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

/// Eight bytes at `p` (unsigned, or `SIGNED`) as f32 lanes.
#[inline(always)]
unsafe fn bytes8<const SIGNED: bool>(p: *const u8) -> __m256 {
    // SAFETY: eight readable bytes at p.
    unsafe {
        let v = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtepi32_ps(if SIGNED {
            _mm256_cvtepi8_epi32(v)
        } else {
            _mm256_cvtepu8_epi32(v)
        })
    }
}

/// `c | (v & m)`.
#[inline(always)]
unsafe fn or_masked256(c: __m256i, v: __m256i, m: __m256i) -> __m256i {
    // SAFETY: AVX2 per the caller.
    unsafe { _mm256_or_si256(c, _mm256_and_si256(v, m)) }
}

/// `-v`, lane by lane.
#[inline(always)]
unsafe fn neg256(v: __m256) -> __m256 {
    // SAFETY: AVX per the caller.
    unsafe { _mm256_xor_ps(v, _mm256_set1_ps(-0.0)) }
}

/// Eight bytes at `p` as f32 lanes of their low and of their high nibbles.
#[inline(always)]
unsafe fn nibbles8(p: *const u8) -> (__m256, __m256) {
    // SAFETY: eight readable bytes at p.
    unsafe {
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let low = _mm256_and_si256(v, _mm256_set1_epi32(0x0f));
        (
            _mm256_cvtepi32_ps(low),
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v)),
        )
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
    let fmt = format(F);
    let nb = ops.k / 32;
    let q = ops.q;
    // Q8_0: VNNI takes the codes as unsigned bytes w + 128 (zero point 128);
    // AVX2's maddubs would saturate on those, so it multiplies |w| by x with w's sign.
    let sign_trick = fmt == PackedFormat::Q8_0 && !D::FULL_BYTES;
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
            let p = ops.chunk(g, fb).as_ptr();
            // This half's bytes: 4 of each 8 per code vector, 2 of each 16 per f16 row.
            let head = p.add(fmt.head());
            let d = _mm256_cvtph_ps(_mm_loadu_si128(head.add(2 * HALF * half) as *const __m128i));
            let second = if fmt.has_min() {
                let at = head.add(2 * NR + 2 * HALF * half);
                _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            let bytes_at = |o: usize| head.add(o + HALF * half);
            for s in 0..fmt.subs() {
                let mut c = codes::<F>(p.add(s * fmt.sub_bytes() + 4 * HALF * half));
                let mut mag = [_mm256_setzero_si256(); 8];
                if sign_trick {
                    for (m, cq) in mag.iter_mut().zip(&c) {
                        *m = _mm256_abs_epi8(*cq);
                    }
                } else if fmt == PackedFormat::Q8_0 {
                    let flip = _mm256_set1_epi8(i8::MIN);
                    for cq in c.iter_mut() {
                        *cq = _mm256_xor_si256(*cq, flip);
                    }
                }
                // Scales of the sub-block (or its two halves) and its
                // offsets (of its halves, which differ only for Q2_K).
                let (sc0, sc1, min0, min1) = match fmt {
                    PackedFormat::Q4K | PackedFormat::Q5K => {
                        let sc = _mm256_mul_ps(d, bytes8::<false>(bytes_at(4 * NR + NR * s)));
                        let m = _mm256_mul_ps(second, bytes8::<false>(bytes_at(12 * NR + NR * s)));
                        (sc, sc, neg256(m), neg256(m))
                    }
                    PackedFormat::Q3K | PackedFormat::Q6K => (
                        _mm256_mul_ps(d, bytes8::<true>(bytes_at(2 * NR + 2 * NR * s))),
                        _mm256_mul_ps(d, bytes8::<true>(bytes_at(3 * NR + 2 * NR * s))),
                        second,
                        second,
                    ),
                    PackedFormat::Q2K => {
                        let (sc0, m0) = nibbles8(bytes_at(4 * NR + 2 * NR * s));
                        let (sc1, m1) = nibbles8(bytes_at(5 * NR + 2 * NR * s));
                        (
                            _mm256_mul_ps(d, sc0),
                            _mm256_mul_ps(d, sc1),
                            neg256(_mm256_mul_ps(second, m0)),
                            neg256(_mm256_mul_ps(second, m1)),
                        )
                    }
                    _ => (d, d, second, second),
                };
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

#[inline(always)]
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
                let rows = (i1 - i).min(MR);
                match (rows, wide) {
                    (1, false) => tile512::<F, 1, false>(ops, i, g, out),
                    (2, false) => tile512::<F, 2, false>(ops, i, g, out),
                    (3, false) => tile512::<F, 3, false>(ops, i, g, out),
                    (_, false) => tile512::<F, MR, false>(ops, i, g, out),
                    (1, true) => tile512::<F, 1, true>(ops, i, g, out),
                    (2, true) => tile512::<F, 2, true>(ops, i, g, out),
                    (3, true) => tile512::<F, 3, true>(ops, i, g, out),
                    (_, true) => tile512::<F, MR, true>(ops, i, g, out),
                }
                i += rows;
            }
        }
    }
}

/// [`codes`] for a whole group: register `q` holds elements `4q..4q + 4`
/// of each of the 16 rows. Q8_0's are its signed bytes as stored.
#[inline(always)]
pub(super) unsafe fn codes512<const F: u8>(p: *const u8) -> [__m512i; 8] {
    let fmt = format(F);
    // SAFETY: one whole sub-block of the format at p; AVX512BW.
    unsafe {
        let mut c = [_mm512_setzero_si512(); 8];
        if fmt.code_bits() == 8 {
            for (q, cq) in c.iter_mut().enumerate() {
                *cq = _mm512_loadu_si512(p.add(VB * q) as *const __m512i);
            }
            return c;
        }
        // As in `codes`: 2-bit fields, and a plane of third bits moved to bit 2.
        if fmt.code_bits() < 4 {
            let m = _mm512_set1_epi8(3);
            for v in 0..2 {
                let x = _mm512_loadu_si512(p.add(VB * v) as *const __m512i);
                c[4 * v] = _mm512_and_si512(x, m);
                c[4 * v + 1] = _mm512_and_si512(_mm512_srli_epi16::<2>(x), m);
                c[4 * v + 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), m);
                c[4 * v + 3] = _mm512_and_si512(_mm512_srli_epi16::<6>(x), m);
            }
            if fmt.code_bits() == 3 {
                let qh = _mm512_loadu_si512(p.add(2 * VB) as *const __m512i);
                let m = _mm512_set1_epi8(4);
                c[0] = or_masked(c[0], _mm512_slli_epi16::<2>(qh), m);
                c[1] = or_masked(c[1], _mm512_slli_epi16::<1>(qh), m);
                c[2] = or_masked(c[2], qh, m);
                c[3] = or_masked(c[3], _mm512_srli_epi16::<1>(qh), m);
                c[4] = or_masked(c[4], _mm512_srli_epi16::<2>(qh), m);
                c[5] = or_masked(c[5], _mm512_srli_epi16::<3>(qh), m);
                c[6] = or_masked(c[6], _mm512_srli_epi16::<4>(qh), m);
                c[7] = or_masked(c[7], _mm512_srli_epi16::<5>(qh), m);
            }
            return c;
        }
        let low = _mm512_set1_epi8(0x0f);
        for q in 0..4 {
            let v = _mm512_loadu_si512(p.add(VB * q) as *const __m512i);
            c[q] = _mm512_and_si512(v, low);
            c[q + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
        }
        // As in `codes`: planes of high bits moved to bit 4 (and 5).
        if fmt.code_bits() == 5 {
            let qh = _mm512_loadu_si512(p.add(4 * VB) as *const __m512i);
            let m = _mm512_set1_epi8(0x10);
            c[0] = or_masked(c[0], _mm512_slli_epi16::<4>(qh), m);
            c[1] = or_masked(c[1], _mm512_slli_epi16::<3>(qh), m);
            c[2] = or_masked(c[2], _mm512_slli_epi16::<2>(qh), m);
            c[3] = or_masked(c[3], _mm512_slli_epi16::<1>(qh), m);
            c[4] = or_masked(c[4], qh, m);
            c[5] = or_masked(c[5], _mm512_srli_epi16::<1>(qh), m);
            c[6] = or_masked(c[6], _mm512_srli_epi16::<2>(qh), m);
            c[7] = or_masked(c[7], _mm512_srli_epi16::<3>(qh), m);
        } else if fmt.code_bits() == 6 {
            let m = _mm512_set1_epi8(0x30);
            for h in 0..2 {
                let qh = _mm512_loadu_si512(p.add(4 * VB + VB * h) as *const __m512i);
                let r = 4 * h;
                c[r] = or_masked(c[r], _mm512_slli_epi16::<4>(qh), m);
                c[r + 1] = or_masked(c[r + 1], _mm512_slli_epi16::<2>(qh), m);
                c[r + 2] = or_masked(c[r + 2], qh, m);
                c[r + 3] = or_masked(c[r + 3], _mm512_srli_epi16::<2>(qh), m);
            }
        }
        c
    }
}

/// [`part_sum`] on a whole group (codes from [`codes512`], unsigned), its
/// products spread over `CH` independent sums (integer additions are exact
/// in any order): four where few rows share a tile, so consecutive products
/// do not wait on each other's latency; one where the tile's rows already
/// give enough independent chains, which saves the additions.
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
            let xb = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * q) as *const i32));
            s[k % CH] = _mm512_dpbusd_epi32(s[k % CH], c[q], xb);
        }
        let mut sum = s[0];
        for &v in &s[1..] {
            sum = _mm512_add_epi32(sum, v);
        }
        sum
    }
}

/// [`act_sum`] on a whole group, for a tile of `R` rows.
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
            part_sum512::<N, 1>(c, x, q0)
        } else {
            part_sum512::<N, 4>(c, x, q0)
        };
        if WIDE {
            let x = x.add(32);
            let lo = if R >= 4 {
                part_sum512::<N, 1>(c, x, q0)
            } else {
                part_sum512::<N, 4>(c, x, q0)
            };
            _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32::<8>(s), s), lo)
        } else {
            s
        }
    }
}

/// `c | (v & m)`.
#[inline(always)]
unsafe fn or_masked(c: __m512i, v: __m512i, m: __m512i) -> __m512i {
    // SAFETY: AVX512F per the caller.
    unsafe { _mm512_or_si512(c, _mm512_and_si512(v, m)) }
}

/// Sixteen bytes at `p` (unsigned, or `SIGNED`) as f32 lanes.
#[inline(always)]
unsafe fn bytes16<const SIGNED: bool>(p: *const u8) -> __m512 {
    // SAFETY: sixteen readable bytes at p.
    unsafe {
        let v = _mm_loadu_si128(p as *const __m128i);
        _mm512_cvtepi32_ps(if SIGNED {
            _mm512_cvtepi8_epi32(v)
        } else {
            _mm512_cvtepu8_epi32(v)
        })
    }
}

/// Sixteen bytes at `p` as f32 lanes of their low and of their high nibbles.
#[inline(always)]
unsafe fn nibbles16(p: *const u8) -> (__m512, __m512) {
    // SAFETY: sixteen readable bytes at p; AVX512F per the caller.
    unsafe {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let low = _mm512_and_si512(v, _mm512_set1_epi32(0x0f));
        (
            _mm512_cvtepi32_ps(low),
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)),
        )
    }
}

/// `-v`, lane by lane.
#[inline(always)]
unsafe fn neg512(v: __m512) -> __m512 {
    // SAFETY: AVX512F per the caller.
    unsafe {
        _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(i32::MIN),
        ))
    }
}

/// A group chunk's per-row f16 factors at `head` as f32 lanes: `d`, and
/// the minimum (or `dmin`) where the format has one, else zeros.
#[inline(always)]
pub(super) unsafe fn head512<const F: u8>(head: *const u8) -> (__m512, __m512) {
    // SAFETY: the chunk's head at `head`; AVX512F per the caller.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(head as *const __m256i));
        let second = if format(F).has_min() {
            _mm512_cvtph_ps(_mm256_loadu_si256(head.add(2 * NR) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        (d, second)
    }
}

/// Sub-block `s`'s scales (of its two halves, which differ only for
/// Q2_K, Q3_K and Q6_K) and its offset factors (of its two halves, which
/// differ only for Q2_K), per row of the group, from the chunk's head and
/// its [`head512`] factors.
#[inline(always)]
pub(super) unsafe fn scales512<const F: u8>(
    head: *const u8,
    d: __m512,
    second: __m512,
    s: usize,
) -> (__m512, __m512, __m512, __m512) {
    // SAFETY: the chunk's head at `head`; AVX512F per the caller.
    unsafe {
        match format(F) {
            PackedFormat::Q4K | PackedFormat::Q5K => {
                let sc = _mm512_mul_ps(d, bytes16::<false>(head.add(4 * NR + NR * s)));
                let m = _mm512_mul_ps(second, bytes16::<false>(head.add(12 * NR + NR * s)));
                (sc, sc, neg512(m), neg512(m))
            }
            PackedFormat::Q3K | PackedFormat::Q6K => (
                _mm512_mul_ps(d, bytes16::<true>(head.add(2 * NR + 2 * NR * s))),
                _mm512_mul_ps(d, bytes16::<true>(head.add(3 * NR + 2 * NR * s))),
                second,
                second,
            ),
            PackedFormat::Q2K => {
                let (sc0, m0) = nibbles16(head.add(4 * NR + 2 * NR * s));
                let (sc1, m1) = nibbles16(head.add(5 * NR + 2 * NR * s));
                (
                    _mm512_mul_ps(d, sc0),
                    _mm512_mul_ps(d, sc1),
                    neg512(_mm512_mul_ps(second, m0)),
                    neg512(_mm512_mul_ps(second, m1)),
                )
            }
            _ => (d, d, second, second),
        }
    }
}

/// [`tile`] for a whole group on 512-bit registers.
///
/// # Safety
/// As [`tile`]; the CPU has AVX512F, BW, VL and VNNI.
#[inline(always)]
unsafe fn tile512<const F: u8, const R: usize, const WIDE: bool>(
    ops: &PackedOperands,
    i: usize,
    g: usize,
    out: *mut f32,
) {
    let fmt = format(F);
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
            let p = ops.chunk(g, fb).as_ptr();
            let head = p.add(fmt.head());
            let (d, second) = head512::<F>(head);
            for s in 0..fmt.subs() {
                let mut c = codes512::<F>(p.add(s * fmt.sub_bytes()));
                if fmt == PackedFormat::Q8_0 {
                    let flip = _mm512_set1_epi8(i8::MIN);
                    for cq in c.iter_mut() {
                        *cq = _mm512_xor_si512(*cq, flip);
                    }
                }
                let (sc0, sc1, min0, min1) = scales512::<F>(head, d, second, s);
                for ii in 0..R {
                    let blk = (i + ii) * nb + fb * fmt.subs() + s;
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
                        acc[ii] = _mm512_fmadd_ps(
                            _mm512_mul_ps(_mm512_cvtepi32_ps(s0), dx),
                            sc0,
                            acc[ii],
                        );
                        acc[ii] = _mm512_fmadd_ps(
                            _mm512_mul_ps(_mm512_cvtepi32_ps(s1), dx),
                            sc1,
                            acc[ii],
                        );
                    } else {
                        let sum = act_sum512::<8, WIDE, R>(&c, x, 0);
                        let sum = if zero_point != 0 {
                            let k = zero_point * *q.isum.get_unchecked(blk);
                            _mm512_sub_epi32(sum, _mm512_set1_epi32(k))
                        } else {
                            sum
                        };
                        acc[ii] = _mm512_fmadd_ps(
                            _mm512_mul_ps(_mm512_cvtepi32_ps(sum), dx),
                            sc0,
                            acc[ii],
                        );
                    }
                    if fmt.has_min() && fmt.halves() {
                        let xsum0 = _mm512_set1_ps(*q.sum16.get_unchecked(2 * blk));
                        let xsum1 = _mm512_set1_ps(*q.sum16.get_unchecked(2 * blk + 1));
                        off[ii] = _mm512_fmadd_ps(min0, xsum0, off[ii]);
                        off[ii] = _mm512_fmadd_ps(min1, xsum1, off[ii]);
                    } else if fmt.has_min() {
                        let xsum = _mm512_set1_ps(*q.sum32.get_unchecked(blk));
                        off[ii] = _mm512_fmadd_ps(min0, xsum, off[ii]);
                    }
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
