//! Load-time quantization (`option.quantize`, `--quantize`).
//!
//! Exists so that a 16- or 32-bit checkpoint (safetensors, PyTorch, or the
//! float tensors of a GGUF file) can be served in one of the block formats
//! the CPU backend computes natively, at a fraction of its memory, with no
//! offline conversion step. Conversion happens inside [`WeightSource`], one
//! matrix at a time as the decoder asks for it: each matrix is read from the
//! (memory-mapped) checkpoint row by row straight into its quantized form, so
//! the peak is one matrix's quantized bytes plus a row of f32 per thread,
//! never the model in f32.

use std::time::Instant;

use kiln_backend::quant::GgmlType;
use kiln_backend::quantize::{quantize, quantize_rows_with, QuantizeError};
use kiln_backend::WeightData;

use crate::weights::WeightSource;
use crate::{HostTensor, ModelError, Result};

/// A source whose float weight matrices are quantized as they are read.
///
/// Which matrices and to what, following llama.cpp's `llama-quantize`: every
/// linear layer and the token embedding go to the target format; the output
/// projection (or the token embedding when it doubles as the output, tied)
/// goes to Q6_K unless the target is Q8_0, because the logits are the most
/// sensitive to rounding. Norms, biases and position tables are vectors or
/// read through [`WeightSource::get`], and stay in f32. Matrices already in
/// a block format are kept as they are.
pub(crate) struct Quantized<'a> {
    pub inner: &'a dyn WeightSource,
    pub to: GgmlType,
}

impl Quantized<'_> {
    fn format_for(&self, name: &str) -> GgmlType {
        let head = name == "output.weight"
            || (name == "token_embd.weight" && !self.inner.contains("output.weight"));
        if head && self.to != GgmlType::Q8_0 {
            GgmlType::Q6K
        } else {
            self.to
        }
    }
}

impl WeightSource for Quantized<'_> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        self.inner.get(name)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let (shape, data) = self.inner.get_weight(name)?;
        // A mixture-of-experts router stays as stored (as llama.cpp's
        // quantizer keeps it): rounding its logits would change which
        // experts a token goes to.
        if name.ends_with(".ffn_gate_inp.weight") || name.ends_with(".ffn_gate_inp_shexp.weight") {
            return Ok((shape, data));
        }
        let mut to = self.format_for(name);
        // A head too narrow for Q6_K's 256-wide super-blocks takes the
        // target format rather than staying in float.
        if to != self.to
            && shape
                .last()
                .is_some_and(|c| !c.is_multiple_of(to.block().0))
        {
            to = self.to;
        }
        let data = convert(name, &shape, data, to).map_err(|e| ModelError::Tensor {
            path: self.inner.describe().into(),
            tensor: name.to_string(),
            msg: e.to_string(),
        })?;
        Ok((shape, data))
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Quantizes one matrix to `to`, or hands it back unchanged where it is not
/// a float matrix or its rows are not whole blocks (with a log line).
pub fn convert(
    name: &str,
    shape: &[usize],
    data: WeightData,
    to: GgmlType,
) -> Result<WeightData, QuantizeError> {
    // A 3-D tensor (a mixture-of-experts layer's experts, `[experts, rows,
    // cols]`) quantizes as the matrix of all its rows.
    let (rows, cols) = match *shape {
        [rows, cols] => (rows, cols),
        [experts, rows, cols] => (experts.saturating_mul(rows), cols),
        _ => return Ok(data),
    };
    let from = match &data {
        WeightData::F32(_) => GgmlType::F32,
        WeightData::Ggml { ty, .. } => *ty,
    };
    if !matches!(from, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        tracing::debug!(tensor = name, "already {from:?}; kept as it is");
        return Ok(data);
    }
    let (block, _) = to.block();
    if !cols.is_multiple_of(block) {
        tracing::info!(
            tensor = name,
            "rows of {cols} are not whole {to:?} blocks of {block}; kept in {from:?}"
        );
        return Ok(data);
    }
    let stored = match &data {
        WeightData::F32(v) => v.len(),
        WeightData::Ggml { bytes, .. } => bytes.len() / from.block().1,
    };
    if rows.checked_mul(cols) != Some(stored) {
        return Err(QuantizeError::Shape { len: stored, cols });
    }
    let t0 = Instant::now();
    let bytes = match &data {
        WeightData::F32(v) => quantize(to, v, cols)?,
        WeightData::Ggml { ty, bytes } => {
            let mut out = Vec::new();
            let ty = *ty;
            quantize_rows_with(to, cols, rows * cols, &mut out, |range, row| {
                decode_floats(ty, bytes, range, row)
            })?;
            // Read once: a mapped checkpoint's pages leave this process's
            // memory, so converting a model larger than memory holds one
            // matrix of it at a time.
            bytes.release_resident();
            out
        }
    };
    tracing::debug!(
        tensor = name,
        "{from:?} [{rows}, {cols}] -> {to:?} in {:.1?}",
        t0.elapsed()
    );
    Ok(WeightData::Ggml {
        ty: to,
        bytes: bytes.into(),
    })
}

/// Decodes elements `range` of little-endian float storage `ty` into `out`.
///
/// 16-bit rows go through `half`'s slice conversion (F16C where the CPU has
/// it, eight values an instruction) when they lie 2-byte aligned, as a
/// mapped checkpoint's tensors do; value by value otherwise. Converting an
/// fp16 checkpoint spent more of its time here than anywhere but the
/// quantizer.
fn decode_floats(ty: GgmlType, bytes: &[u8], range: std::ops::Range<usize>, out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    /// The elements as 16-bit words, when they lie aligned.
    fn halves<'a>(bytes: &'a [u8], range: &std::ops::Range<usize>) -> Option<&'a [u16]> {
        let raw = bytes.get(2 * range.start..2 * range.end)?;
        // SAFETY: any two bytes are a valid u16; align_to splits off what is
        // not aligned, and only an exact, aligned cast is used.
        let (head, mid, tail) = unsafe { raw.align_to::<u16>() };
        (cfg!(target_endian = "little") && head.is_empty() && tail.is_empty()).then_some(mid)
    }
    match ty {
        GgmlType::F16 => match halves(bytes, &range) {
            Some(h) => h.reinterpret_cast::<half::f16>().convert_to_f32_slice(out),
            None => {
                for (y, b) in out.iter_mut().zip(bytes[2 * range.start..].chunks_exact(2)) {
                    *y = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        GgmlType::BF16 => match halves(bytes, &range) {
            Some(h) => h.reinterpret_cast::<half::bf16>().convert_to_f32_slice(out),
            None => {
                for (y, b) in out.iter_mut().zip(bytes[2 * range.start..].chunks_exact(2)) {
                    *y = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        _ => {
            for (y, b) in out.iter_mut().zip(bytes[4 * range.start..].chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_rows_decode_the_same_aligned_or_not() {
        let vals: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 8.0).collect();
        for ty in [GgmlType::F16, GgmlType::BF16] {
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|&v| match ty {
                    GgmlType::F16 => half::f16::from_f32(v).to_le_bytes(),
                    _ => half::bf16::from_f32(v).to_le_bytes(),
                })
                .collect();
            // The same bytes one address on: not 2-byte aligned.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            let (mut a, mut b) = (vec![0f32; 50], vec![0f32; 50]);
            decode_floats(ty, &bytes, 10..60, &mut a);
            decode_floats(ty, &shifted[1..], 10..60, &mut b);
            assert_eq!(a, vals[10..60], "{ty:?} aligned");
            assert_eq!(b, vals[10..60], "{ty:?} unaligned");
        }
    }

    #[test]
    fn f16_rows_convert_like_their_f32_values() {
        let vals: Vec<f32> = (0..2 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let from_f16 = convert(
            "w",
            &[2, 256],
            WeightData::Ggml {
                ty: GgmlType::F16,
                bytes: f16.into(),
            },
            GgmlType::Q4K,
        )
        .expect("convert");
        // The values are exact in f16, so both paths quantize the same floats.
        let from_f32 =
            convert("w", &[2, 256], WeightData::F32(vals), GgmlType::Q4K).expect("convert");
        assert_eq!(from_f16, from_f32);
        assert!(matches!(
            from_f16,
            WeightData::Ggml {
                ty: GgmlType::Q4K,
                ..
            }
        ));
    }

    #[test]
    fn storage_that_disagrees_with_the_shape_is_an_error() {
        let short = WeightData::Ggml {
            ty: GgmlType::F16,
            bytes: vec![0u8; 2 * 255].into(),
        };
        assert_eq!(
            convert("w", &[1, 256], short, GgmlType::Q8_0),
            Err(QuantizeError::Shape {
                len: 255,
                cols: 256
            })
        );
    }

    #[test]
    fn ragged_rows_and_quantized_input_are_kept() {
        let w = WeightData::F32(vec![0.5; 2 * 48]);
        assert_eq!(convert("w", &[2, 48], w.clone(), GgmlType::Q8_0), Ok(w));
        let q = WeightData::Ggml {
            ty: GgmlType::Q4_0,
            bytes: vec![0u8; 18].into(),
        };
        assert_eq!(convert("w", &[1, 32], q.clone(), GgmlType::Q8_0), Ok(q));
    }
}
