//! The x86 decoders of the interleaved weights ([`crate::cpu::packed`]):
//! per packed format, a sub-block's codes into eight registers, and a
//! chunk's per-row scales and offset factors into f32 lanes.
//!
//! Each decoder is written once and generated for both register widths by
//! [`decoders!`]: 256 bits (half a group of eight rows, AVX2 and AVX-VNNI)
//! and 512 bits (a whole group of 16 rows, AVX512-VNNI and the AMX
//! epilogue). The two expansions are the same operations on wider lanes,
//! so they cost what the two hand-written copies did, and give the same
//! bits lane for lane.
//!
//! The format's constant `F` indexes [`format`]: every kernel generic over
//! `const F: u8` is instantiated per format by [`by_format!`], so the
//! format's properties fold to constants inside it.

use std::arch::x86_64::*;

use crate::cpu::packed::{PackedFormat, NR, VB};
use crate::quant::SubScales;

/// Evaluates `$body` with `$F` a `u8` constant naming the packed format
/// `$fmt` (its ggml type number, which [`format`] maps back), so that each
/// format gets its own instance of a kernel generic over `const F: u8`:
/// one arm per format that has kernels here.
macro_rules! by_format {
    ($fmt:expr, $F:ident => $body:expr) => {
        match $fmt.ty() {
            $crate::quant::GgmlType::Q8_0 => {
                const $F: u8 = $crate::quant::GgmlType::Q8_0 as u8;
                $body
            }
            $crate::quant::GgmlType::Q4_0 => {
                const $F: u8 = $crate::quant::GgmlType::Q4_0 as u8;
                $body
            }
            $crate::quant::GgmlType::Q4_1 => {
                const $F: u8 = $crate::quant::GgmlType::Q4_1 as u8;
                $body
            }
            $crate::quant::GgmlType::Q5_0 => {
                const $F: u8 = $crate::quant::GgmlType::Q5_0 as u8;
                $body
            }
            $crate::quant::GgmlType::Q5_1 => {
                const $F: u8 = $crate::quant::GgmlType::Q5_1 as u8;
                $body
            }
            $crate::quant::GgmlType::Q4K => {
                const $F: u8 = $crate::quant::GgmlType::Q4K as u8;
                $body
            }
            $crate::quant::GgmlType::Q5K => {
                const $F: u8 = $crate::quant::GgmlType::Q5K as u8;
                $body
            }
            $crate::quant::GgmlType::Q6K => {
                const $F: u8 = $crate::quant::GgmlType::Q6K as u8;
                $body
            }
            $crate::quant::GgmlType::Q2K => {
                const $F: u8 = $crate::quant::GgmlType::Q2K as u8;
                $body
            }
            $crate::quant::GgmlType::Q3K => {
                const $F: u8 = $crate::quant::GgmlType::Q3K as u8;
                $body
            }
            $crate::quant::GgmlType::MXFP4 => {
                const $F: u8 = $crate::quant::GgmlType::MXFP4 as u8;
                $body
            }
            ty => unreachable!("{ty:?} has no packed kernels"),
        }
    };
}
pub(crate) use by_format;

/// The format whose ggml type number is `F` (a const generic, so each is
/// its own kernel), evaluated at compile time.
pub(crate) const fn format<const F: u8>() -> PackedFormat {
    const { PackedFormat::from_index(F) }
}

/// Generates one width's decoders from the one body: `$codes` (a
/// sub-block's codes), `$head` (a chunk's `d` and second factor) and
/// `$scales` (a sub-block's scales and offset factors), one row per lane,
/// with that width's intrinsics named by the arguments.
macro_rules! decoders {
    (
        int: $vi:ty, float: $vf:ty, half_floats: $vh:ty,
        codes: $codes:ident, head: $head:ident, scales: $scales:ident,
        bytes: $bytes:ident, nibbles: $nibbles:ident, neg: $neg:ident, or_masked: $or_masked:ident,
        e8m0: $e8m0:ident, zero_i: $zero_i:ident, zero_f: $zero_f:ident,
        load_i: $load_i:ident, load_h: $load_h:ident, cvtph: $cvtph:ident,
        set1_epi8: $set1_epi8:ident, set1_epi32: $set1_epi32:ident,
        and: $and:ident, or: $or:ident, xor: $xor:ident,
        srli16: $srli16:ident, slli16: $slli16:ident, srli32: $srli32:ident,
        mul: $mul:ident, cvt_i32_f32: $cvt:ident,
        cvt_u8: $cvtu8:ident, cvt_i8: $cvti8:ident, load_bytes: $load_bytes:ident,
        cast_fi: $cast_fi:ident, cast_if: $cast_if:ident,
        shuffle: $shuffle:ident, broadcast16: $broadcast16:ident,
        slli32: $slli32:ident, max_epi32: $max_epi32:ident, set1_ps: $set1_ps:ident,
    ) => {
        /// The eight code registers of a sub-block's rows at `p`: register
        /// `q` holds elements `4q..4q + 4` of each of the rows. Q8_0's are
        /// its signed bytes as stored.
        #[inline(always)]
        pub(crate) unsafe fn $codes<const F: u8>(p: *const u8) -> [$vi; 8] {
            let fmt = format::<F>();
            // SAFETY: one whole sub-block of the format at p; the width's
            // instructions per the caller.
            unsafe {
                let mut c = [$zero_i(); 8];
                if fmt.code_bits() == 8 {
                    for (q, cq) in c.iter_mut().enumerate() {
                        *cq = $load_i(p.add(VB * q) as *const $vi);
                    }
                    return c;
                }
                if fmt.code_bits() < 4 {
                    // Bits 2(q % 4) and 2(q % 4) + 1 of vector q / 4 are
                    // register q's element (16-bit shifts: what crosses
                    // from the neighbouring byte lands outside the mask).
                    let m = $set1_epi8(3);
                    for v in 0..2 {
                        let x = $load_i(p.add(VB * v) as *const $vi);
                        c[4 * v] = $and(x, m);
                        c[4 * v + 1] = $and($srli16::<2>(x), m);
                        c[4 * v + 2] = $and($srli16::<4>(x), m);
                        c[4 * v + 3] = $and($srli16::<6>(x), m);
                    }
                    if fmt.code_bits() == 3 {
                        // Bit q of the plane is the third bit of register q's element.
                        let qh = $load_i(p.add(2 * VB) as *const $vi);
                        let m = $set1_epi8(4);
                        c[0] = $or_masked(c[0], $slli16::<2>(qh), m);
                        c[1] = $or_masked(c[1], $slli16::<1>(qh), m);
                        c[2] = $or_masked(c[2], qh, m);
                        c[3] = $or_masked(c[3], $srli16::<1>(qh), m);
                        c[4] = $or_masked(c[4], $srli16::<2>(qh), m);
                        c[5] = $or_masked(c[5], $srli16::<3>(qh), m);
                        c[6] = $or_masked(c[6], $srli16::<4>(qh), m);
                        c[7] = $or_masked(c[7], $srli16::<5>(qh), m);
                    }
                    return c;
                }
                let low = $set1_epi8(0x0f);
                for q in 0..4 {
                    let v = $load_i(p.add(VB * q) as *const $vi);
                    c[q] = $and(v, low);
                    c[q + 4] = $and($srli16::<4>(v), low);
                }
                // The planes hold the high bits of each byte's code; they
                // move to bit 4 (and 5) by shifts of 16-bit lanes, and the
                // bits that cross from the neighbouring byte land outside
                // the mask.
                if fmt.code_bits() == 5 {
                    // Bit q of a byte is the fifth bit of register q's element.
                    let qh = $load_i(p.add(4 * VB) as *const $vi);
                    let m = $set1_epi8(0x10);
                    c[0] = $or_masked(c[0], $slli16::<4>(qh), m);
                    c[1] = $or_masked(c[1], $slli16::<3>(qh), m);
                    c[2] = $or_masked(c[2], $slli16::<2>(qh), m);
                    c[3] = $or_masked(c[3], $slli16::<1>(qh), m);
                    c[4] = $or_masked(c[4], qh, m);
                    c[5] = $or_masked(c[5], $srli16::<1>(qh), m);
                    c[6] = $or_masked(c[6], $srli16::<2>(qh), m);
                    c[7] = $or_masked(c[7], $srli16::<3>(qh), m);
                } else if fmt.code_bits() == 6 {
                    // Bits 2(q % 4) and 2(q % 4) + 1 of the plane of quads
                    // 0..4 (then of 4..8) are the top two bits of register
                    // q's element.
                    let m = $set1_epi8(0x30);
                    for h in 0..2 {
                        let qh = $load_i(p.add(4 * VB + VB * h) as *const $vi);
                        let r = 4 * h;
                        c[r] = $or_masked(c[r], $slli16::<4>(qh), m);
                        c[r + 1] = $or_masked(c[r + 1], $slli16::<2>(qh), m);
                        c[r + 2] = $or_masked(c[r + 2], qh, m);
                        c[r + 3] = $or_masked(c[r + 3], $srli16::<2>(qh), m);
                    }
                }
                if let Some(table) = fmt.lookup() {
                    // The nibbles index the table of codes (MXFP4): a byte
                    // shuffle in each 128-bit lane.
                    let t = $broadcast16(_mm_loadu_si128(table.as_ptr() as *const __m128i));
                    for cq in c.iter_mut() {
                        *cq = $shuffle(t, *cq);
                    }
                }
                c
            }
        }

        /// The chunk's per-row f16 factors for the rows at `head` (a
        /// chunk's head, advanced to the first of these rows) as f32
        /// lanes: `d`, and the minimum (or `dmin`) where the format has
        /// one, else zeros.
        #[inline(always)]
        pub(crate) unsafe fn $head<const F: u8>(head: *const u8) -> ($vf, $vf) {
            if let SubScales::E8M0(_) = format::<F>().sub_scales() {
                // No f16 fields: the scale is the exponent byte, which the
                // scales decoder reads.
                // SAFETY: the width's instructions per the caller.
                return unsafe { ($zero_f(), $zero_f()) };
            }
            // SAFETY: the chunk's head at `head`; the width's instructions per the caller.
            unsafe {
                let d = $cvtph($load_h(head as *const $vh));
                let second = if format::<F>().has_min() {
                    $cvtph($load_h(head.add(2 * NR) as *const $vh))
                } else {
                    $zero_f()
                };
                (d, second)
            }
        }

        /// Sub-block `s`'s scales (of its two halves, which differ only
        /// for Q2_K, Q3_K and Q6_K) and its offset factors (of its two
        /// halves, which differ only for Q2_K), per row, from the chunk's
        /// head (advanced as for the head decoder) and its factors.
        #[inline(always)]
        pub(crate) unsafe fn $scales<const F: u8>(
            head: *const u8,
            d: $vf,
            second: $vf,
            s: usize,
        ) -> ($vf, $vf, $vf, $vf) {
            // SAFETY: the chunk's head at `head`; the width's instructions per the caller.
            unsafe {
                match format::<F>().sub_scales() {
                    SubScales::ScaleMin(_) => {
                        let sc = $mul(d, $bytes::<false>(head.add(4 * NR + NR * s)));
                        let m = $mul(second, $bytes::<false>(head.add(12 * NR + NR * s)));
                        (sc, sc, $neg(m), $neg(m))
                    }
                    SubScales::Signed(_) => (
                        $mul(d, $bytes::<true>(head.add(2 * NR + 2 * NR * s))),
                        $mul(d, $bytes::<true>(head.add(3 * NR + 2 * NR * s))),
                        second,
                        second,
                    ),
                    SubScales::Nibbles(_) => {
                        let (sc0, m0) = $nibbles(head.add(4 * NR + 2 * NR * s));
                        let (sc1, m1) = $nibbles(head.add(5 * NR + 2 * NR * s));
                        (
                            $mul(d, sc0),
                            $mul(d, sc1),
                            $neg($mul(second, m0)),
                            $neg($mul(second, m1)),
                        )
                    }
                    SubScales::None => (d, d, second, second),
                    SubScales::E8M0(_) => {
                        // A byte per row at the head (advanced to these rows).
                        let sc = $e8m0(head);
                        (sc, sc, second, second)
                    }
                }
            }
        }

        /// A byte per lane at `p` (unsigned, or `SIGNED`) as f32 lanes.
        #[inline(always)]
        unsafe fn $bytes<const SIGNED: bool>(p: *const u8) -> $vf {
            // SAFETY: a readable byte per lane at p.
            unsafe {
                let v = $load_bytes(p as *const __m128i);
                $cvt(if SIGNED { $cvti8(v) } else { $cvtu8(v) })
            }
        }

        /// A byte per lane at `p` as f32 lanes of their low and of their
        /// high nibbles.
        #[inline(always)]
        unsafe fn $nibbles(p: *const u8) -> ($vf, $vf) {
            // SAFETY: a readable byte per lane at p.
            unsafe {
                let v = $cvtu8($load_bytes(p as *const __m128i));
                let low = $and(v, $set1_epi32(0x0f));
                ($cvt(low), $cvt($srli32::<4>(v)))
            }
        }

        /// The E8M0 exponent bytes at `p`, a byte per lane, as f32 lanes of
        /// 2^(e - 128), exactly as `quant::mxfp4::e8m0_half` computes them:
        /// the byte in the exponent field, at least 2^-127's bits, halved.
        #[inline(always)]
        unsafe fn $e8m0(p: *const u8) -> $vf {
            // SAFETY: a readable byte per lane at p.
            unsafe {
                let v = $cvtu8($load_bytes(p as *const __m128i));
                let bits = $max_epi32($slli32::<23>(v), $set1_epi32(0x0040_0000));
                $mul($cast_if(bits), $set1_ps(0.5))
            }
        }

        /// `-v`, lane by lane (the sign bit flipped).
        #[inline(always)]
        unsafe fn $neg(v: $vf) -> $vf {
            // SAFETY: the width's instructions per the caller.
            unsafe { $cast_if($xor($cast_fi(v), $set1_epi32(i32::MIN))) }
        }

        /// `c | (v & m)`.
        #[inline(always)]
        unsafe fn $or_masked(c: $vi, v: $vi, m: $vi) -> $vi {
            // SAFETY: the width's instructions per the caller.
            unsafe { $or(c, $and(v, m)) }
        }
    };
}

decoders! {
    int: __m256i, float: __m256, half_floats: __m128i,
    codes: codes256, head: head256, scales: scales256,
    bytes: bytes8, nibbles: nibbles8, neg: neg256, or_masked: or_masked256,
    e8m0: e8m0_8, zero_i: _mm256_setzero_si256, zero_f: _mm256_setzero_ps,
    load_i: _mm256_loadu_si256, load_h: _mm_loadu_si128, cvtph: _mm256_cvtph_ps,
    set1_epi8: _mm256_set1_epi8, set1_epi32: _mm256_set1_epi32,
    and: _mm256_and_si256, or: _mm256_or_si256, xor: _mm256_xor_si256,
    srli16: _mm256_srli_epi16, slli16: _mm256_slli_epi16, srli32: _mm256_srli_epi32,
    mul: _mm256_mul_ps, cvt_i32_f32: _mm256_cvtepi32_ps,
    cvt_u8: _mm256_cvtepu8_epi32, cvt_i8: _mm256_cvtepi8_epi32, load_bytes: _mm_loadl_epi64,
    cast_fi: _mm256_castps_si256, cast_if: _mm256_castsi256_ps,
    shuffle: _mm256_shuffle_epi8, broadcast16: _mm256_broadcastsi128_si256,
    slli32: _mm256_slli_epi32, max_epi32: _mm256_max_epi32, set1_ps: _mm256_set1_ps,
}

decoders! {
    int: __m512i, float: __m512, half_floats: __m256i,
    codes: codes512, head: head512, scales: scales512,
    bytes: bytes16, nibbles: nibbles16, neg: neg512, or_masked: or_masked512,
    e8m0: e8m0_16, zero_i: _mm512_setzero_si512, zero_f: _mm512_setzero_ps,
    load_i: _mm512_loadu_si512, load_h: _mm256_loadu_si256, cvtph: _mm512_cvtph_ps,
    set1_epi8: _mm512_set1_epi8, set1_epi32: _mm512_set1_epi32,
    and: _mm512_and_si512, or: _mm512_or_si512, xor: _mm512_xor_si512,
    srli16: _mm512_srli_epi16, slli16: _mm512_slli_epi16, srli32: _mm512_srli_epi32,
    mul: _mm512_mul_ps, cvt_i32_f32: _mm512_cvtepi32_ps,
    cvt_u8: _mm512_cvtepu8_epi32, cvt_i8: _mm512_cvtepi8_epi32, load_bytes: _mm_loadu_si128,
    cast_fi: _mm512_castps_si512, cast_if: _mm512_castsi512_ps,
    shuffle: _mm512_shuffle_epi8, broadcast16: _mm512_broadcast_i32x4,
    slli32: _mm512_slli_epi32, max_epi32: _mm512_max_epi32, set1_ps: _mm512_set1_ps,
}
