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

/// ggml's `nearest_int`: round half to even (its float trick is exact for
/// the magnitudes quantizers produce).
pub(crate) fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

pub(crate) fn put_f16(out: &mut [u8], at: usize, v: f32) -> f32 {
    let h = f16::from_f32(v);
    out[at..at + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

/// 32 signed bytes with one f16 scale d = max|x| / 127; q = round(x / d).
pub(crate) fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (q, &v) in out[2..34].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
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
