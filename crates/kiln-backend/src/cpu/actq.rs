//! Activations quantized to integers for the integer kernels.
//!
//! Each row is split into blocks of 32; a block keeps one f32 scale `dx` and
//! 32 integers `qx` with `x ≈ dx * qx`, rounding to nearest, ties to even.
//! Two widths ([`ActBits`]): 8 bits (-127..=127, ggml's Q8_0 scheme, what
//! llama.cpp multiplies with) and 16 bits (-32767..=32767: 256 times finer,
//! so logits stay within about 1e-3 of an f32 computation). A block depends
//! on its own row only, so quantizing never couples the rows of a batch:
//! the engine's batch invariance holds.
//!
//! Alongside, the sums of each 16 and each 32 quantized values (times `dx`),
//! which the weight formats' offset coefficients multiply.

use std::sync::OnceLock;

/// The integer width activations are quantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActBits {
    /// 8-bit: the fastest products, and about 0.4% noise per product.
    Int8,
    /// 16-bit: results within f32 rounding of dequantize-then-f32 for
    /// practical purposes; the default.
    Int16,
}

impl ActBits {
    /// The process-wide choice: `KILN_CPU_ACTIVATIONS=int8` or `int16`
    /// (the default), read once.
    pub fn configured() -> ActBits {
        static BITS: OnceLock<ActBits> = OnceLock::new();
        *BITS.get_or_init(|| match std::env::var("KILN_CPU_ACTIVATIONS").as_deref() {
            Ok("int8") => ActBits::Int8,
            Ok("int16") | Err(_) => ActBits::Int16,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "KILN_CPU_ACTIVATIONS is int8 or int16; using int16"
                );
                ActBits::Int16
            }
        })
    }

    fn max(self) -> f32 {
        match self {
            ActBits::Int8 => 127.0,
            ActBits::Int16 => 32767.0,
        }
    }
}

/// Where element `t` of a 32-block sits in the 16-bit layout: each half of
/// the block is split in 8s and interleaved (0..8, 16..24, 8..16, 24..32), so
/// that a 16-bit pair-product lane never mixes the block's two halves.
pub(super) const fn slot16(t: usize) -> usize {
    let (half, within) = (t / 16, t % 16);
    (within / 8) * 16 + half * 8 + within % 8
}

/// A `[m, k]` activation quantized in blocks of 32 (`k` a multiple of 32).
pub(super) struct QuantizedRows {
    pub bits: ActBits,
    /// `m * k` signed bytes (8-bit mode).
    pub qx: Vec<i8>,
    /// `m * k` 16-bit values (16-bit mode), each block in the [`slot16`] order.
    pub qx16: Vec<i16>,
    /// Scale of each block: `m * k / 32`.
    pub dx: Vec<f32>,
    /// `dx * sum(qx)` over each 32 elements: `m * k / 32`.
    pub sum32: Vec<f32>,
    /// `dx * sum(qx)` over each 16 elements: `m * k / 16`.
    pub sum16: Vec<f32>,
}

impl QuantizedRows {
    /// The quantized value of element `t` of row-major position `t` (either width).
    pub fn value(&self, t: usize) -> i32 {
        match self.bits {
            ActBits::Int8 => self.qx[t] as i32,
            ActBits::Int16 => self.qx16[t / 32 * 32 + slot16(t % 32)] as i32,
        }
    }

    /// Quantizes the `m` rows of `k` values in `x` to `bits`.
    pub fn new(x: &[f32], k: usize, bits: ActBits) -> Self {
        debug_assert!(k.is_multiple_of(32) && x.len().is_multiple_of(k));
        let nb = x.len() / 32;
        let (n8, n16) = match bits {
            ActBits::Int8 => (x.len(), 0),
            ActBits::Int16 => (0, x.len()),
        };
        let mut q = Self {
            bits,
            qx: vec![0; n8],
            qx16: vec![0; n16],
            dx: vec![0.0; nb],
            sum32: vec![0.0; nb],
            sum16: vec![0.0; 2 * nb],
        };
        let top = bits.max();
        let mut block = [0i32; 32];
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / top;
            let id = if amax > 0.0 { top / amax } else { 0.0 };
            for (qv, &v) in block.iter_mut().zip(xb) {
                // |v * id| <= top up to one rounding, which rounds back to top.
                *qv = (v * id).round_ties_even() as i32;
            }
            match bits {
                ActBits::Int8 => {
                    for (o, &v) in q.qx[32 * b..32 * b + 32].iter_mut().zip(&block) {
                        *o = v as i8;
                    }
                }
                ActBits::Int16 => {
                    let o = &mut q.qx16[32 * b..32 * b + 32];
                    for (t, &v) in block.iter().enumerate() {
                        o[slot16(t)] = v as i16;
                    }
                }
            }
            let (s0, s1) = (
                block[..16].iter().sum::<i32>(),
                block[16..].iter().sum::<i32>(),
            );
            q.dx[b] = d;
            q.sum16[2 * b] = d * s0 as f32;
            q.sum16[2 * b + 1] = d * s1 as f32;
            q.sum32[b] = d * (s0 + s1) as f32;
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::rand_vec;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let mut x = rand_vec(4 * 64, 3);
        x[64..96].fill(0.0); // an all-zero block
        x[5] = 100.0; // a block with one large value
        for (bits, top) in [(ActBits::Int8, 127), (ActBits::Int16, 32767)] {
            let q = QuantizedRows::new(&x, 64, bits);
            for (b, xb) in x.chunks_exact(32).enumerate() {
                let d = q.dx[b];
                for (t, &v) in xb.iter().enumerate() {
                    let qv = q.value(32 * b + t);
                    assert!((-top..=top).contains(&qv));
                    assert!(
                        (v - d * qv as f32).abs() <= 0.5 * d + 1e-6,
                        "{v} vs {d} * {qv}"
                    );
                }
                let s: i32 = (32 * b..32 * b + 32).map(|t| q.value(t)).sum();
                assert_eq!(q.sum32[b], d * s as f32);
            }
            assert_eq!(q.dx[2], 0.0);
            assert!((64..96).all(|t| q.value(t) == 0));
            assert_eq!(q.value(5), top);
        }
    }

    #[test]
    fn the_16_bit_layout_is_a_permutation_keeping_halves_apart() {
        let mut seen = [false; 32];
        for t in 0..32 {
            let s = slot16(t);
            assert!(!seen[s]);
            seen[s] = true;
            // A pair-product lane l of either 16-value register holds slots
            // 2l, 2l + 1 (mod 16); lanes 0..4 must be the first half's.
            assert_eq!((s % 16) / 8, t / 16, "element {t} in slot {s}");
        }
    }
}
