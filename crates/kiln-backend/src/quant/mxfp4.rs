//! MXFP4, the OCP Microscaling format with FP4 (E2M1) elements: gpt-oss
//! stores its experts this way, and GGUF carries it as ggml type 39.
//!
//! A block of 32 elements is 17 bytes (ggml's `block_mxfp4`): one E8M0
//! byte `e`, a power-of-two scale 2^(e - 127) shared by the block, then 16
//! bytes of 4-bit E2M1 codes, element `j < 16` in the low nibble of byte
//! `1 + j` and element `j + 16` in its high nibble. A code's value is
//! [`E2M1_HALVES`]`[code] / 2`; like ggml, kiln keeps the doubled values,
//! which are small integers, and halves the scale instead
//! ([`e8m0_half`]`(e)` = 2^(e - 128)), so
//!
//! ```text
//! x[j] = E2M1_HALVES[code_j] * 2^(e - 128)
//! ```
//!
//! exactly. The CPU kernels take the doubled value plus [`ZERO_POINT`] as an
//! unsigned code ([`CODES`], 0..=24), so MXFP4 is computed like Q4_0: a
//! table lookup of the nibbles (a byte shuffle in registers) and a scale.
//! Hugging Face checkpoints (gpt-oss) keep the same codes and exponents in
//! another order (`<name>_blocks` and `<name>_scales`); kiln-model's
//! `mxfp4` module moves them into these blocks.

use crate::quantize::QuantizeError;

/// Elements per block.
pub const BLOCK: usize = 32;
/// Bytes per block: the exponent, then 16 bytes of codes.
pub const BLOCK_BYTES: usize = 17;

/// The 16 E2M1 values, doubled (ggml's `kvalues_mxfp4`): codes 0..8 are
/// +0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8..16 the same values negated.
pub const E2M1_HALVES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Added to [`E2M1_HALVES`] to make the kernels' unsigned codes.
pub const ZERO_POINT: i32 = 12;

/// The unsigned code of each 4-bit E2M1 code: its doubled value plus
/// [`ZERO_POINT`] (the format row's `CodeLayout::lookup`).
pub const CODES: [u8; 16] = {
    let mut c = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        c[i] = (E2M1_HALVES[i] as i32 + ZERO_POINT) as u8;
        i += 1;
    }
    c
};

/// 2^(e - 128): half the E8M0 scale 2^(e - 127), exactly (2^-128 and
/// 2^-127, for `e` 0 and 1, are subnormal floats), as ggml's
/// `ggml_e8m0_to_fp32_half` gives it for every `e` below 255. `e = 255`,
/// which OCP reserves for NaN, gives infinity (ggml: 2^127). The vector
/// kernels compute it the same way: the byte shifted into the exponent
/// field, raised to at least 2^-127's bits, then halved.
#[inline(always)]
pub fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(((e as u32) << 23).max(0x0040_0000)) * 0.5
}

/// Decodes one block (the format row's dequantizer).
pub fn dequantize_block(b: &[u8], y: &mut [f32]) {
    let d = e8m0_half(b[0]);
    for (j, &q) in b[1..BLOCK_BYTES].iter().enumerate() {
        y[j] = E2M1_HALVES[(q & 0x0f) as usize] as f32 * d;
        y[j + 16] = E2M1_HALVES[(q >> 4) as usize] as f32 * d;
    }
}

/// The code of [`E2M1_HALVES`] nearest to `x / d` (the first, so the
/// smaller magnitude, on a tie), as ggml's `best_index_mxfp4` picks it.
fn best_code(x: f32, d: f32) -> u8 {
    let mut best = 0;
    let mut best_err = (E2M1_HALVES[0] as f32 * d - x).abs();
    for (i, &v) in E2M1_HALVES.iter().enumerate().skip(1) {
        let err = (v as f32 * d - x).abs();
        if err < best_err {
            best = i as u8;
            best_err = err;
        }
    }
    best
}

/// Encodes one block of 32 values into `out` (17 bytes) as llama.cpp's
/// reference quantizer (`quantize_row_mxfp4_ref`) does: the exponent makes
/// the largest magnitude `amax` land in the top binade of the E2M1 values
/// (`e = floor(log2(amax)) - 2 + 127`, 0 for an all-zero block), and each
/// element takes the nearest value. Magnitudes beyond the top value (up to
/// twice `6 * 2^(e - 127)`) round to it; the exponent saturates at 0 and
/// 254 for magnitudes outside E8M0's range.
pub fn quantize_block(x: &[f32], out: &mut [u8]) {
    let mut amax = 0f32;
    for v in &x[..BLOCK] {
        // (As ggml compares: a NaN never becomes the maximum.)
        if amax < v.abs() {
            amax = v.abs();
        }
    }
    let e = if amax > 0.0 {
        // `as u8` saturates at 0 (and NaN); infinity saturates too, to 254.
        ((amax.log2().floor() - 2.0 + 127.0) as u8).min(254)
    } else {
        0
    };
    let d = e8m0_half(e);
    out[0] = e;
    for j in 0..16 {
        out[1 + j] = best_code(x[j], d) | (best_code(x[j + 16], d) << 4);
    }
}

/// Quantizes a row-major matrix of `cols` columns to MXFP4 blocks, in
/// ggml's row layout (ready for `WeightData::Ggml`): what tests and tools
/// use to make MXFP4 tensors from floats.
pub fn quantize(x: &[f32], cols: usize) -> Result<Vec<u8>, QuantizeError> {
    use rayon::prelude::*;
    let ty = super::GgmlType::MXFP4;
    if !cols.is_multiple_of(BLOCK) {
        return Err(QuantizeError::Ragged {
            ty,
            cols,
            block: BLOCK,
        });
    }
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(QuantizeError::Shape { len: x.len(), cols });
    }
    let mut out = vec![0u8; x.len() / BLOCK * BLOCK_BYTES];
    out.par_chunks_mut(BLOCK_BYTES * 64)
        .zip(x.par_chunks(BLOCK * 64))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
                quantize_block(x, o);
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every exponent decodes to 2^(e - 128), computed here by repeated
    /// halving and doubling rather than by bits.
    #[test]
    fn e8m0_half_is_the_power_of_two() {
        for e in 0..=254u8 {
            let mut want = 1f64;
            for _ in 0..(128 - e as i32).max(0) {
                want /= 2.0;
            }
            for _ in 0..(e as i32 - 128).max(0) {
                want *= 2.0;
            }
            assert_eq!(e8m0_half(e) as f64, want, "e = {e}");
        }
        assert!(e8m0_half(255).is_infinite());
    }

    /// The table is the OCP E2M1 one: sign bit 3, then exponent bits 1..3
    /// (bias 1) and one mantissa bit, computed here from the bits.
    #[test]
    fn the_code_table_is_ocp_e2m1() {
        for (c, &v) in E2M1_HALVES.iter().enumerate() {
            let (sign, exp, man) = (c >> 3, (c >> 1) & 3, c & 1);
            let mag = if exp == 0 {
                man as f32 * 0.5
            } else {
                (1.0 + man as f32 * 0.5) * (1 << (exp - 1)) as f32
            };
            let want = if sign == 1 { -mag } else { mag };
            assert_eq!(v as f32 / 2.0, want, "code {c}");
            assert_eq!(CODES[c] as i32 - ZERO_POINT, v as i32);
        }
    }

    /// Values on the grid survive a round trip exactly, and an off-grid
    /// block comes back within half a step of its exponent's grid.
    #[test]
    fn quantize_round_trips() {
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().enumerate() {
            *v = E2M1_HALVES[j % 16] as f32 * 0.25 * if j < 16 { 1.0 } else { -1.0 };
        }
        let mut b = [0u8; BLOCK_BYTES];
        quantize_block(&x, &mut b);
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(x, y);

        let x: Vec<f32> = (0..32)
            .map(|j| ((j * 7919) % 97) as f32 / 13.0 - 3.5)
            .collect();
        quantize_block(&x, &mut b);
        dequantize_block(&b, &mut y);
        let d = e8m0_half(b[0]);
        for (a, w) in x.iter().zip(&y) {
            // The widest gap of the doubled grid is 4 (8 to 12), in units
            // of d; beyond 12 d (OCP's exponent choice leaves the block's
            // top binade above 1.5 * 2^floor(log2 amax)) values clamp to it.
            if a.abs() > 12.0 * d {
                assert_eq!(*w, 12.0 * d * a.signum(), "{a}");
            } else {
                assert!((a - w).abs() <= 2.0 * d, "{a} vs {w} (d = {d})");
            }
        }
        // All zeros: exponent 0, every code 0.
        quantize_block(&[0.0; 32], &mut b);
        assert_eq!(b, [0u8; BLOCK_BYTES]);
        assert!(matches!(
            quantize(&[0.0; 48], 48),
            Err(QuantizeError::Ragged { .. })
        ));
        assert_eq!(quantize(&[1.0; 64], 32).unwrap().len(), 2 * BLOCK_BYTES);
    }
}
