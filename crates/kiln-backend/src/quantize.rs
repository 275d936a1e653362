//! Quantization of f32 rows into ggml block formats.
//!
//! Exists so that a 16- or 32-bit checkpoint can be served in a format the
//! CPU backend computes natively (`option.quantize`, `--quantize`), at a
//! quarter to an eighth of the memory, without an offline conversion step.
//!
//! The byte layouts are ggml's (the ones [`crate::quant`] decodes). The scale
//! choices follow llama.cpp's reference quantizers (no importance matrix), so
//! a converted block matches what `llama-quantize` writes for the same floats:
//! Q8_0, Q4_0 and Q4_1 take their scale from the block's extremes; Q4_K and
//! Q6_K search a few candidate scales per sub-block for the least weighted
//! error, then store the sub-block scales (and mins) in 6 or 8 bits relative
//! to one f16 super-block scale.

use half::f16;
use rayon::prelude::*;

use crate::quant::{row_bytes, BlockQuantizer, GgmlType};

/// Why a matrix could not be quantized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantizeError {
    /// kiln has no quantizer for this block format.
    #[error("kiln cannot quantize to {0:?}; it can quantize to {list}", list = target_names())]
    Unsupported(GgmlType),
    /// The row length is not a whole number of the format's blocks.
    #[error("rows of {cols} elements are not whole {ty:?} blocks of {block}")]
    Ragged {
        ty: GgmlType,
        cols: usize,
        block: usize,
    },
    /// The input is not a whole number of rows.
    #[error("{len} values are not whole rows of {cols}")]
    Shape { len: usize, cols: usize },
}

/// The formats kiln can quantize to, with the names `option.quantize` takes.
pub const QUANTIZE_TARGETS: [(GgmlType, &str); 5] = [
    (GgmlType::Q8_0, "q8_0"),
    (GgmlType::Q4_0, "q4_0"),
    (GgmlType::Q4_1, "q4_1"),
    (GgmlType::Q4K, "q4_k"),
    (GgmlType::Q6K, "q6_k"),
];

fn target_names() -> String {
    QUANTIZE_TARGETS
        .iter()
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The block encoder of `ty`, from its row of [`crate::quant::FORMATS`].
fn block_quantizer(ty: GgmlType) -> Result<BlockQuantizer, QuantizeError> {
    ty.format()
        .quantize
        .map(|(_, f)| f)
        .ok_or(QuantizeError::Unsupported(ty))
}

/// Quantizes a row-major matrix of `cols` columns to `ty`, rows in parallel.
/// The result is ggml's row layout, ready for [`crate::WeightData::Ggml`].
pub fn quantize(ty: GgmlType, x: &[f32], cols: usize) -> Result<Vec<u8>, QuantizeError> {
    let mut out = Vec::new();
    quantize_rows_with(ty, cols, x.len(), &mut out, |range, buf| {
        buf.copy_from_slice(&x[range])
    })?;
    Ok(out)
}

/// Quantizes `len` elements, read row by row through `fill(range, row)`, into
/// `out`: the caller decodes its own storage (f16, bf16, f32 bytes) one row at
/// a time, so no f32 copy of the whole matrix is ever made.
pub fn quantize_rows_with<F>(
    ty: GgmlType,
    cols: usize,
    len: usize,
    out: &mut Vec<u8>,
    fill: F,
) -> Result<(), QuantizeError>
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let f = block_quantizer(ty)?;
    let (block, block_bytes) = ty.block();
    let row_len = row_bytes(ty, cols).ok_or(QuantizeError::Ragged { ty, cols, block })?;
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(QuantizeError::Shape { len, cols });
    }
    out.clear();
    out.resize(len / cols * row_len, 0);
    out.par_chunks_mut(row_len).enumerate().for_each_init(
        || vec![0f32; cols],
        |row, (r, dst)| {
            fill(r * cols..(r + 1) * cols, row);
            for (x, y) in row
                .chunks_exact(block)
                .zip(dst.chunks_exact_mut(block_bytes))
            {
                f(x, y);
            }
        },
    );
    Ok(())
}

/// ggml's `nearest_int`: round half to even, by its float trick where that
/// is exact (|x| < 2^21: adding 1.5 * 2^23 leaves x rounded, ties to even,
/// in the sum's low mantissa bits) and by `round_ties_even` elsewhere (NaN
/// included). The trick is plain arithmetic; `round_ties_even` is a call
/// into libm per value on baseline x86-64, a fifth of a Q4_K conversion's
/// time.
#[inline(always)]
pub(crate) fn nearest(x: f32) -> i32 {
    if x.abs() < 2_097_152.0 {
        let v = x + 12_582_912.0;
        (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    } else {
        x.round_ties_even() as i32
    }
}

pub(crate) fn put_f16(out: &mut [u8], at: usize, v: f32) -> f32 {
    let h = f16::from_f32(v);
    out[at..at + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

/// `x.round()` (half away from zero) for |x| < 2^23, in arithmetic the
/// compiler vectorises on any x86-64: `round` itself is a call into libm
/// per value there (no SSE4.1 in the baseline), which made it most of the
/// time a Q8_0 conversion took. `x - trunc(x)` is exact, so this is the
/// same value for every input but a zero's sign (NaN gives 0 once cast, as
/// `round` does).
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x as i32 as f32;
    let r = x - t;
    if r >= 0.5 {
        t + 1.0
    } else if r <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// The largest |x| (NaNs ignored), in eight independent lanes: one running
/// maximum is a chain of dependent instructions the compiler may not
/// reorder, 32 of them a block.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// 32 signed bytes with one f16 scale d = max|x| / 127; q = round(x / d).
///
/// On x86-64 four values an instruction ([`q8_0_sse2`]: SSE2 is part of
/// the architecture, so no detection), the same bytes as [`q8_0_scalar`]:
/// converting an fp16 checkpoint to Q8_0 spent more than half its time
/// here, one value at a time.
pub(crate) fn q8_0(x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if x.len() == 32 && out.len() >= 34 {
        // SAFETY: SSE2 is in every x86-64 CPU; 32 values in, 34 bytes out.
        unsafe { q8_0_sse2(x, out) };
        return;
    }
    q8_0_scalar(x, out)
}

/// [`q8_0`] in SSE2: the largest |x| over eight vectors (NaNs ignored, as
/// [`abs_max`] does), then each scaled value rounded half away from zero as
/// [`round_half_away`] does (truncate, then step by the exact remainder;
/// NaN gives 0), packed to bytes with saturation.
///
/// # Safety
/// `x` holds 32 values and `out` at least 34 bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn q8_0_sse2(x: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's lengths; SSE2 is baseline on x86-64.
    unsafe {
        let p = x.as_ptr();
        let abs = _mm_castsi128_ps(_mm_set1_epi32(0x7fff_ffff));
        let mut v = [_mm_setzero_ps(); 8];
        let mut m = _mm_setzero_ps();
        for (i, vi) in v.iter_mut().enumerate() {
            *vi = _mm_loadu_ps(p.add(4 * i));
            // maxps gives its second operand when either is NaN: m.
            m = _mm_max_ps(_mm_and_ps(*vi, abs), m);
        }
        m = _mm_max_ps(m, _mm_shuffle_ps::<0b0100_1110>(m, m));
        m = _mm_max_ps(m, _mm_shuffle_ps::<0b1011_0001>(m, m));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(out, 0, d);
        let idv = _mm_set1_ps(id);
        let (half, neg_half) = (_mm_set1_ps(0.5), _mm_set1_ps(-0.5));
        let mut q = [_mm_setzero_si128(); 8];
        for (qi, vi) in q.iter_mut().zip(&v) {
            let s = _mm_mul_ps(*vi, idv);
            let s = _mm_and_ps(s, _mm_cmpord_ps(s, s));
            let t = _mm_cvttps_epi32(s);
            let r = _mm_sub_ps(s, _mm_cvtepi32_ps(t));
            // The comparisons are -1 where true: t + 1 at or above a half,
            // t - 1 at or below minus a half.
            let up = _mm_castps_si128(_mm_cmpge_ps(r, half));
            let down = _mm_castps_si128(_mm_cmple_ps(r, neg_half));
            *qi = _mm_add_epi32(_mm_sub_epi32(t, up), down);
        }
        let lo = _mm_packs_epi16(_mm_packs_epi32(q[0], q[1]), _mm_packs_epi32(q[2], q[3]));
        let hi = _mm_packs_epi16(_mm_packs_epi32(q[4], q[5]), _mm_packs_epi32(q[6], q[7]));
        let o = out.as_mut_ptr().add(2);
        _mm_storeu_si128(o as *mut __m128i, lo);
        _mm_storeu_si128(o.add(16) as *mut __m128i, hi);
    }
}

/// [`q8_0`] one value at a time: the definition, and the path elsewhere.
pub(crate) fn q8_0_scalar(x: &[f32], out: &mut [u8]) {
    let amax = abs_max(x);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (q, &v) in out[2..34].iter_mut().zip(x) {
        *q = (round_half_away(v * id) as i8) as u8;
    }
}

/// 32 4-bit values, x = (q - 8) * d, where d = m / -8 and m is the element of
/// largest magnitude (so it maps exactly to q = 0).
pub(crate) fn q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

/// 32 4-bit values, x = q * d + min over the block's [min, max] range.
pub(crate) fn q4_1(x: &[f32], out: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    put_f16(out, 2, min);
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

#[cfg(test)]
mod tests;
