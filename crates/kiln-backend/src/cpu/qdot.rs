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

/// One input row prepared for dot products with block rows: the values and
/// the sum of each 32-element block, which the Q4 formats' offsets multiply
/// (so it is computed once per input row, not once per weight row).
pub(super) struct BlockInput<'a> {
    pub x: &'a [f32],
    pub block_sums: Vec<f32>,
}

impl<'a> BlockInput<'a> {
    /// Prepares `x` (a multiple of 32 elements long).
    pub fn new(x: &'a [f32]) -> Self {
        let block_sums = x.chunks_exact(QK).map(|b| b.iter().sum()).collect();
        Self { x, block_sums }
    }
}

/// `dot(dequantize(row), x)` for a row of `ty` blocks with as many elements as `x`.
pub(super) fn dot_row(ty: GgmlType, row: &[u8], x: &BlockInput) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU features the functions are compiled for were detected.
            unsafe {
                return match ty {
                    GgmlType::Q8_0 => avx2::q8_0(row, x.x),
                    GgmlType::Q4_0 => avx2::q4_0(row, x.x, &x.block_sums),
                    GgmlType::Q4_1 => avx2::q4_1(row, x.x, &x.block_sums),
                    _ => generic(ty, row, x.x),
                };
            }
        }
    }
    generic(ty, row, x.x)
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

    /// `sum(q[i] * x[i])` over a block of 32 nibbles (16 bytes at `p`: element
    /// `j < 16` in the low nibble of byte `j`, element `j + 16` in its high
    /// nibble) against 32 floats at `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_dot(p: *const u8, x: *const f32) -> __m256 {
        let mask = _mm256_set1_epi32(0x0f);
        // SAFETY: the caller guarantees 16 readable bytes at p and 32 floats at x.
        unsafe {
            // Widen bytes to 32-bit lanes first, then split nibbles with lane-wise
            // mask and shift: two shuffles per block instead of six.
            let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
            let mut s = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)),
                _mm256_loadu_ps(x),
            );
            s = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)),
                _mm256_loadu_ps(x.add(8)),
                s,
            );
            s = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b0)),
                _mm256_loadu_ps(x.add(16)),
                s,
            );
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b1)),
                _mm256_loadu_ps(x.add(24)),
                s,
            )
        }
    }

    /// Q4_0: 18-byte blocks of an f16 scale `d` and 32 nibbles, value `(q - 8) * d`;
    /// computed as `d * sum(q x) - 8 d * sum(x)` with the block sums of `x` given.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let nb = x.len() / QK;
        debug_assert!(row.len() >= nb * 18 && sums.len() >= nb);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut offset = 0f32;
        for b in 0..nb {
            // SAFETY: block b spans row[18b..18b+18] and x[32b..32b+32], both in bounds.
            unsafe {
                let p = row.as_ptr().add(b * 18);
                let d = f16x8(p);
                let s = nibble_dot(p.add(2), x.as_ptr().add(b * QK));
                acc[b & 1] = _mm256_fmadd_ps(d, s, acc[b & 1]);
                offset += _mm256_cvtss_f32(d) * sums.get_unchecked(b);
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - 8.0 * offset
    }

    /// Q4_1: 20-byte blocks of f16 scale `d`, f16 minimum `m` and 32 nibbles,
    /// value `q * d + m`; computed as `d * sum(q x) + m * sum(x)` with the block
    /// sums of `x` given.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let nb = x.len() / QK;
        debug_assert!(row.len() >= nb * 20 && sums.len() >= nb);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut offset = 0f32;
        for b in 0..nb {
            // SAFETY: block b spans row[20b..20b+20] and x[32b..32b+32], both in bounds.
            unsafe {
                let p = row.as_ptr().add(b * 20);
                // d and m are adjacent: convert both with one instruction.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
                let s = nibble_dot(p.add(4), x.as_ptr().add(b * QK));
                acc[b & 1] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), s, acc[b & 1]);
                offset += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * sums.get_unchecked(b);
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) + offset
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
                    ("dispatch", dot_row(ty, &row, &BlockInput::new(&x))),
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
