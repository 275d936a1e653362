//! Dot products of one row of ggml blocks with an f32 vector: the inner loop
//! of decode-time matrix products on quantized weights.
//!
//! The blocks are expanded to floats in registers and multiplied in f32, so
//! the result equals dequantize-then-dot up to summation order (activations
//! are not quantized, unlike llama.cpp's integer kernels). AVX2 + FMA + F16C
//! versions run where the CPU has them; the generic version dequantizes a
//! block at a time.

use crate::quant::GgmlType;

/// Elements per block of the formats handled here.
const QK: usize = 32;

/// `dot(dequantize(row), x)` for a row of `ty` blocks; `x.len()` is the row's
/// element count (a multiple of 32).
pub(super) fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU features the functions are compiled for were detected.
            unsafe {
                return match ty {
                    GgmlType::Q8_0 => avx2::q8_0(row, x),
                    GgmlType::Q4_0 => avx2::q4_0(row, x),
                    GgmlType::Q4_1 => avx2::q4_1(row, x),
                    _ => generic(ty, row, x),
                };
            }
        }
    }
    generic(ty, row, x)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Dequantizes a block at a time and takes plain dot products.
pub(super) fn generic(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let Some(f) = crate::quant::block_dequantizer(ty) else {
        return f32::NAN;
    };
    let (block, block_bytes) = ty.block();
    let mut buf = [0f32; 256];
    let buf = &mut buf[..block.min(256)];
    let mut sum = 0f32;
    for (b, xb) in row.chunks_exact(block_bytes).zip(x.chunks_exact(block)) {
        f(b, buf);
        sum += super::matmul::dot(buf, xb);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::QK;

    /// Horizontal sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The f16 at `p` as f32, broadcast to eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let h = unsafe { std::ptr::read_unaligned(p as *const u16) };
        let f = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
        _mm256_set1_ps(f)
    }

    /// Eight signed bytes starting at `p`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees eight readable bytes at p.
        let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// `sum(q[i] * x[i])` for 16 signed bytes in `q` against 16 floats at `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot16(q: __m128i, x: *const f32, acc: __m256) -> __m256 {
        let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q)));
        // SAFETY: the caller guarantees 16 readable floats at x.
        unsafe {
            let acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc);
            _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), acc)
        }
    }

    /// Q8_0: 34-byte blocks of an f16 scale and 32 signed bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / QK;
        debug_assert!(row.len() >= nb * 34);
        // Two accumulators so consecutive blocks' FMAs do not wait on each other.
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // SAFETY: block b spans row[34b..34b+34] and x[32b..32b+32], both in bounds.
            unsafe {
                let p = row.as_ptr().add(b * 34);
                let xp = x.as_ptr().add(b * QK);
                let mut s = _mm256_mul_ps(i8x8(p.add(2)), _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(i8x8(p.add(10)), _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(i8x8(p.add(18)), _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(i8x8(p.add(26)), _mm256_loadu_ps(xp.add(24)), s);
                acc[b & 1] = _mm256_fmadd_ps(f16x8(p), s, acc[b & 1]);
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// The 32 4-bit values of a Q4 block (16 bytes at `p`) as two vectors of
    /// 16 signed bytes (elements 0..16 and 16..32), each minus `offset`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8, offset: i8) -> (__m128i, __m128i) {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let mask = _mm_set1_epi8(0x0f);
        let off = _mm_set1_epi8(offset);
        let lo = _mm_sub_epi8(_mm_and_si128(q, mask), off);
        let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(q), mask), off);
        (lo, hi)
    }

    /// Q4_0: 18-byte blocks of an f16 scale and 32 nibbles, value `(q - 8) * d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / QK;
        debug_assert!(row.len() >= nb * 18);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // SAFETY: block b spans row[18b..18b+18] and x[32b..32b+32], both in bounds.
            unsafe {
                let p = row.as_ptr().add(b * 18);
                let xp = x.as_ptr().add(b * QK);
                let (lo, hi) = nibbles(p.add(2), 8);
                let s = dot16(lo, xp, _mm256_setzero_ps());
                let s = dot16(hi, xp.add(16), s);
                acc[b & 1] = _mm256_fmadd_ps(f16x8(p), s, acc[b & 1]);
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// Q4_1: 20-byte blocks of f16 scale `d`, f16 minimum `m` and 32 nibbles,
    /// value `q * d + m`; computed as `d * sum(q x) + m * sum(x)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / QK;
        debug_assert!(row.len() >= nb * 20);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm256_setzero_ps();
        for b in 0..nb {
            // SAFETY: block b spans row[20b..20b+20] and x[32b..32b+32], both in bounds.
            unsafe {
                let p = row.as_ptr().add(b * 20);
                let xp = x.as_ptr().add(b * QK);
                let (lo, hi) = nibbles(p.add(4), 0);
                let s = dot16(lo, xp, _mm256_setzero_ps());
                let s = dot16(hi, xp.add(16), s);
                let x0 = _mm256_add_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)));
                let x1 = _mm256_add_ps(_mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24)));
                acc = _mm256_fmadd_ps(f16x8(p), s, acc);
                acc_m = _mm256_fmadd_ps(f16x8(p.add(2)), _mm256_add_ps(x0, x1), acc_m);
            }
        }
        hsum(_mm256_add_ps(acc, acc_m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_dots_equal_dequantize_then_dot() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            for blocks in [1usize, 2, 7, 18] {
                let row = crate::cpu::tests::random_blocks(ty, blocks, 11 + blocks as u64);
                let x: Vec<f32> = (0..blocks * QK)
                    .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let w = crate::quant::dequantize(ty, &row, blocks * QK).unwrap();
                let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let scale: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                for (name, got) in [
                    ("dispatch", dot_row(ty, &row, &x)),
                    ("generic", generic(ty, &row, &x)),
                ] {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * scale.max(1.0),
                        "{ty:?} {blocks} blocks ({name}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
