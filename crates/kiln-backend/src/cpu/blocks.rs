//! The integer formats' blocks in the one shape every kernel computes with.
//!
//! Each ggml block format, from Q8_0 to Q2_K, decodes to the same three
//! things: an integer *code* per element (unsigned, 0..=63; or a signed byte
//! for Q8_0), a float *scale* per 16 elements and a float *offset
//! coefficient* per granule of 16 or 32 elements, with
//!
//! ```text
//! value[t] = scale[t / 16] * code[t] + coef[t / granule]
//! ```
//!
//! So a dot product with 8-bit activations `x[t] = dx * qx[t]` splits into an
//! exact integer part, `sum(code * qx)`, scaled per block, and a small float
//! part, `sum(coef_g * xs_g)` where `xs_g` is the activation's sum over the
//! granule. [`unpack`] is the portable definition of that decoding; the SIMD
//! kernels decode the hot formats in registers and must agree with it.

use half::f16;

use super::actq::QuantizedRows;
use crate::quant::{q3_k_scales, scale_min_k4, GgmlType};

/// Elements per block of the canonical computation.
pub(crate) const QK: usize = 32;

/// How one integer format is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IntFormat {
    pub ty: GgmlType,
    /// Elements per block (32 or 256).
    pub elems: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// Codes are signed bytes (Q8_0) rather than small unsigned integers.
    pub signed: bool,
    /// Elements per offset coefficient: 16 or 32, or 0 for none.
    pub granule: usize,
}

impl IntFormat {
    /// The integer format of `ty`, or `None` for float formats (and Q8_K,
    /// which only exists as an activation format).
    pub fn of(ty: GgmlType) -> Option<Self> {
        let f = ty.format();
        let c = f.codes?;
        Some(Self {
            ty,
            elems: f.elems,
            bytes: f.bytes,
            signed: c.signed,
            granule: c.granule,
        })
    }

    /// Offset coefficients per block.
    pub fn coefs_per_block(&self) -> usize {
        self.elems.checked_div(self.granule).unwrap_or(0)
    }
}

/// What an integer kernel reads.
#[derive(Clone, Copy)]
pub(crate) struct IntOperands<'a> {
    pub f: IntFormat,
    pub w: &'a [u8],
    pub row_bytes: usize,
    pub q: &'a QuantizedRows,
    pub n: usize,
    pub k: usize,
}

impl IntOperands<'_> {
    /// Offset coefficients per weight row.
    pub fn coefs_per_row(&self) -> usize {
        self.k / self.f.elems * self.f.coefs_per_block()
    }

    /// Input row `i`'s sums per offset granule.
    pub fn sums(&self, i: usize) -> &[f32] {
        let g = self.coefs_per_row();
        match self.f.granule {
            16 => &self.q.sum16[i * g..(i + 1) * g],
            32 => &self.q.sum32[i * g..(i + 1) * g],
            _ => &[],
        }
    }
}

/// One block decoded: `codes[..elems]`, `scale[..elems / 16]` and
/// `coef[..elems / granule]`.
#[derive(Clone)]
pub(super) struct Unpacked {
    pub codes: [u8; 256],
    pub scale: [f32; 16],
    pub coef: [f32; 16],
}

impl Default for Unpacked {
    fn default() -> Self {
        Self {
            codes: [0; 256],
            scale: [0.0; 16],
            coef: [0.0; 16],
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes one block `b` of format `f` into `u`.
pub(super) fn unpack(f: &IntFormat, b: &[u8], u: &mut Unpacked) {
    let nibbles = |qs: &[u8], codes: &mut [u8]| {
        for (l, &q) in qs.iter().enumerate() {
            codes[l] = q & 0x0f;
            codes[l + 16] = q >> 4;
        }
    };
    // The fifth bit of element l of a Q5_0/Q5_1 block is bit l of `qh`.
    let fifth_bits = |qh: u32, codes: &mut [u8]| {
        for (l, c) in codes.iter_mut().enumerate().take(32) {
            *c |= (((qh >> l) & 1) << 4) as u8;
        }
    };
    match f.ty {
        GgmlType::Q8_0 => {
            u.codes[..32].copy_from_slice(&b[2..34]);
            u.scale[..2].fill(f16_at(b, 0));
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            u.scale[..2].fill(d);
            if f.ty == GgmlType::Q4_0 {
                nibbles(&b[2..18], &mut u.codes);
                u.coef[0] = -8.0 * d;
            } else {
                nibbles(&b[6..22], &mut u.codes);
                fifth_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &mut u.codes);
                u.coef[0] = -16.0 * d;
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            u.scale[..2].fill(f16_at(b, 0));
            u.coef[0] = f16_at(b, 2);
            if f.ty == GgmlType::Q4_1 {
                nibbles(&b[4..20], &mut u.codes);
            } else {
                nibbles(&b[8..24], &mut u.codes);
                fifth_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &mut u.codes);
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if f.ty == GgmlType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for sub in 0..8 {
                let (sc, m) = scale_min_k4(sub, scales);
                u.scale[2 * sub..2 * sub + 2].fill(d * sc as f32);
                u.coef[sub] = -(dmin * m as f32);
                let chunk = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
                for l in 0..32 {
                    let low = if sub % 2 == 0 {
                        chunk[l] & 0x0f
                    } else {
                        chunk[l] >> 4
                    };
                    let high = qh.map_or(0, |qh| ((qh[l] >> sub) & 1) << 4);
                    u.codes[32 * sub + l] = low | high;
                }
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            // (Loops by half, quarter and lane rather than by element: no
            // division per element, and the lane loops vectorise.)
            for half in 0..2 {
                for quarter in 0..4 {
                    let low = &ql[64 * half + 32 * (quarter % 2)..][..32];
                    let high = &qh[32 * half..][..32];
                    let out = &mut u.codes[128 * half + 32 * quarter..][..32];
                    let shift = if quarter < 2 { 0 } else { 4 };
                    for l in 0..32 {
                        let lo = (low[l] >> shift) & 0x0f;
                        let hi = (high[l] >> (2 * quarter)) & 3;
                        out[l] = lo | (hi << 4);
                    }
                }
            }
            for (g, &s) in sc.iter().enumerate() {
                u.scale[g] = d * (s as i8) as f32;
                u.coef[g] = -32.0 * u.scale[g];
            }
        }
        GgmlType::Q3K => {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            let scales = q3_k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            for half in 0..2 {
                for j in 0..4 {
                    let low = &qs[32 * half..][..32];
                    let out = &mut u.codes[128 * half + 32 * j..][..32];
                    for l in 0..32 {
                        let lo = (low[l] >> (2 * j)) & 3;
                        let hi = (hmask[l] >> (4 * half + j)) & 1;
                        out[l] = lo | (hi << 2);
                    }
                }
            }
            for (g, &s) in scales.iter().enumerate() {
                u.scale[g] = d * s as f32;
                u.coef[g] = -4.0 * u.scale[g];
            }
        }
        GgmlType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for half in 0..2 {
                for j in 0..4 {
                    let low = &qs[32 * half..][..32];
                    let out = &mut u.codes[128 * half + 32 * j..][..32];
                    for l in 0..32 {
                        out[l] = (low[l] >> (2 * j)) & 3;
                    }
                }
            }
            for (g, &s) in scales.iter().enumerate() {
                u.scale[g] = d * (s & 0x0f) as f32;
                u.coef[g] = -(dmin * (s >> 4) as f32);
            }
        }
        GgmlType::MXFP4 => {
            use crate::quant::mxfp4::{e8m0_half, CODES, ZERO_POINT};
            let d = e8m0_half(b[0]);
            u.scale[..2].fill(d);
            for (l, &q) in b[1..17].iter().enumerate() {
                u.codes[l] = CODES[(q & 0x0f) as usize];
                u.codes[l + 16] = CODES[(q >> 4) as usize];
            }
            u.coef[0] = -(ZERO_POINT as f32) * d;
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8K => {
            unreachable!("IntFormat::of excludes float formats")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::random_blocks;
    use crate::quant::{block_dequantizer, dequantize_with};

    /// The decoded form gives back what the reference dequantizer computes.
    #[test]
    fn unpacked_blocks_reproduce_the_dequantized_values() {
        for ty in crate::quant::WEIGHT_FORMATS
            .into_iter()
            .filter(|&ty| IntFormat::of(ty).is_some())
        {
            let f = IntFormat::of(ty).unwrap();
            let bytes = random_blocks(ty, 6, 11);
            let mut want = vec![0f32; 6 * f.elems];
            dequantize_with(block_dequantizer(ty).unwrap(), ty, &bytes, &mut want);
            let mut u = Unpacked::default();
            for (blk, want) in bytes.chunks_exact(f.bytes).zip(want.chunks_exact(f.elems)) {
                unpack(&f, blk, &mut u);
                for (t, &w) in want.iter().enumerate() {
                    let code = if f.signed {
                        u.codes[t] as i8 as f32
                    } else {
                        assert!(u.codes[t] < 64, "{ty:?}: code {}", u.codes[t]);
                        u.codes[t] as f32
                    };
                    let coef = t.checked_div(f.granule).map_or(0.0, |g| u.coef[g]);
                    let got = u.scale[t / 16] * code + coef;
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{ty:?} element {t}: {got} vs {w}"
                    );
                }
            }
        }
    }
}
