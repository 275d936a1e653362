//! Float weights (F32, F16, BF16) repacked at load into groups of 16 rows
//! stored column by column, and the canonical computation over them.
//!
//! In the file a row's elements follow one another, so a SIMD register
//! holds eight elements of one row and every output element ends with a
//! horizontal sum; a prompt's tile also reloads each input row once per
//! weight row. Transposed in groups, one register load gives element `t`
//! of 16 rows (lane `r` is row `r`'s), and one input element broadcast
//! against it adds into 16 outputs: a tile of `MR` input rows and `G`
//! groups keeps `MR x G` registers of outputs, reads each weight vector
//! once for all `MR` rows, and needs no horizontal sum at all. The packed
//! copy holds the stored values in their own width (F16 and BF16 stay two
//! bytes), so it takes the file's size, and the file's mapped pages are
//! released as the copy grows.
//!
//! **The canonical computation** for input row `i` and weight row `j`: one
//! fused multiply-add per element, in order, from zero:
//! ```text
//! y = 0;  for t in 0..k:  y = fma(w[j][t], x[i][t], y)
//! ```
//! with `w` widened to f32 exactly. Every kernel (portable, AVX2 on two
//! 256-bit halves of a group, AVX-512 on whole groups) computes exactly
//! this, whatever the tile shape, so a row's result never depends on the
//! batch around it.

use super::packed::NR;
use crate::quant::GgmlType;
use crate::HostBytes;

/// The float storage formats.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum FloatFormat {
    F32,
    F16,
    BF16,
}

impl FloatFormat {
    /// The float format of `ty`, if it is one.
    pub fn of(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::F32 => Some(FloatFormat::F32),
            GgmlType::F16 => Some(FloatFormat::F16),
            GgmlType::BF16 => Some(FloatFormat::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            FloatFormat::F32 => 4,
            FloatFormat::F16 | FloatFormat::BF16 => 2,
        }
    }

    /// The little-endian element at the start of `b`, widened to f32 (exactly).
    pub(super) fn widen(self, b: &[u8]) -> f32 {
        match self {
            FloatFormat::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            FloatFormat::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            FloatFormat::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    }
}

/// A float weight matrix in the transposed group layout: `groups` groups of
/// [`NR`] rows (the last padded with zero rows), each `k` vectors of `NR`
/// elements, vector `t` holding element `t` of every row of the group.
#[derive(Debug)]
pub(crate) struct FloatPacked {
    pub fmt: FloatFormat,
    pub groups: usize,
    pub k: usize,
    /// The layout's bytes: the copy made at load, or a range of a file an
    /// earlier start wrote them to ([`super::CpuWeight::from_laid_out`]).
    pub data: HostBytes,
}

impl FloatPacked {
    /// Repacks `rows` rows of `k` elements of `fmt` from the file's row
    /// layout in `bytes` (exactly those rows, checked by the caller),
    /// calling `done` with each range of `bytes` once it has been copied so
    /// the original can be released while the copy grows. Slabs of groups
    /// are packed in parallel.
    pub fn pack_releasing(
        fmt: FloatFormat,
        rows: usize,
        k: usize,
        bytes: &[u8],
        done: impl Fn(std::ops::Range<usize>) + Sync,
    ) -> Self {
        use rayon::prelude::*;
        // Groups per slab: a few hundred rows.
        const SLAB: usize = 16;
        let size = fmt.size();
        let groups = rows.div_ceil(NR);
        let row_bytes = k * size;
        let group_bytes = k * NR * size;
        let mut data = crate::bytes::LayoutBuf::zeroed(groups * group_bytes);
        data.as_mut_slice()
            .par_chunks_mut(SLAB * group_bytes)
            .enumerate()
            .for_each(|(slab, part)| {
                for (gs, out) in part.chunks_exact_mut(group_bytes).enumerate() {
                    let g = slab * SLAB + gs;
                    // Padding rows stay zero: they contribute nothing.
                    for r in 0..NR.min(rows.saturating_sub(g * NR)) {
                        let row = &bytes[(g * NR + r) * row_bytes..][..row_bytes];
                        match size {
                            2 => scatter::<2>(row, out, r),
                            _ => scatter::<4>(row, out, r),
                        }
                    }
                }
                let first = slab * SLAB * NR * row_bytes;
                let end = ((slab + 1) * SLAB * NR * row_bytes).min(bytes.len());
                done(first..end);
            });
        Self {
            fmt,
            groups,
            k,
            data: data.into(),
        }
    }

    /// Bytes the layout of `rows` rows of `k` elements of `fmt` takes.
    pub fn size(fmt: FloatFormat, rows: usize, k: usize) -> Option<usize> {
        rows.div_ceil(NR)
            .checked_mul(k)?
            .checked_mul(NR * fmt.size())
    }

    /// Element `t` of row `j`, widened to f32.
    pub fn at(&self, j: usize, t: usize) -> f32 {
        let (g, r) = (j / NR, j % NR);
        let size = self.fmt.size();
        self.fmt
            .widen(&self.data[((g * self.k + t) * NR + r) * size..][..size])
    }

    /// Row `j` as f32 values (embedding lookups read these).
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        for (t, y) in out.iter_mut().enumerate() {
            *y = self.at(j, t);
        }
    }

    /// The start of group `g`'s vectors.
    pub fn group(&self, g: usize) -> *const u8 {
        self.data[g * self.k * NR * self.fmt.size()..].as_ptr()
    }
}

/// Copies the `S`-byte elements of one weight row to lane `r` of the
/// group's vectors in `out`. (A fixed width, so each copy is a move, not a
/// call to `memmove`.)
fn scatter<const S: usize>(row: &[u8], out: &mut [u8], r: usize) {
    for (t, e) in row.chunks_exact(S).enumerate() {
        let e: &[u8; S] = e.try_into().expect("chunks of S bytes");
        let at = (t * NR + r) * S;
        out[at..at + S].copy_from_slice(e);
    }
}

/// The `m x k` input rows `x` laid out for tiles of `mr` rows: the tile of
/// rows `i..i + r` (`i` a multiple of `mr`, `r = min(mr, m - i)`) starts
/// at `i * k` and holds its rows interleaved element by element (`r`
/// values of element 0, then of element 1, ...), so a kernel finds a
/// tile's broadcasts at fixed offsets of one moving pointer. With `mr`
/// 1 it is `x` itself.
pub(super) fn interleave(x: &[f32], m: usize, k: usize, mr: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; m * k];
    out.par_chunks_mut(mr * k)
        .zip(x.par_chunks(mr * k))
        .for_each(|(o, rows)| {
            let r = rows.len() / k;
            // Written in order, read from the r rows at once (the other way
            // round, every write lands in another cache line).
            for (t, dst) in o.chunks_exact_mut(r).enumerate() {
                for (ii, d) in dst.iter_mut().enumerate() {
                    *d = rows[ii * k + t];
                }
            }
        });
    out
}

/// What a float kernel reads.
#[derive(Clone, Copy)]
pub(super) struct FloatOperands<'a> {
    pub w: &'a FloatPacked,
    /// The `m x k` input rows, as [`interleave`] lays them out for the
    /// kernel's tile height (the portable kernel's is 1: plain rows).
    pub x: &'a [f32],
    /// Output columns (the weight's rows).
    pub n: usize,
    pub k: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{float_weight_bytes, rand_vec};

    /// Every element survives the repack, for a partial last group too, and
    /// `done` is told about every byte of the original exactly once.
    #[test]
    fn repacking_keeps_every_value_and_reports_every_range() {
        for (ty, fmt) in [
            (GgmlType::F32, FloatFormat::F32),
            (GgmlType::F16, FloatFormat::F16),
            (GgmlType::BF16, FloatFormat::BF16),
        ] {
            let (rows, k) = (16 * 17 + 5, 7);
            let bytes = float_weight_bytes(ty, &rand_vec(rows * k, 3));
            let seen = std::sync::Mutex::new(vec![0u8; bytes.len()]);
            let p = FloatPacked::pack_releasing(fmt, rows, k, &bytes, |r| {
                let mut s = seen.lock().unwrap();
                s[r].iter_mut().for_each(|c| *c += 1);
            });
            assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "{ty:?}");
            assert_eq!(p.groups, 18);
            let mut row = vec![0f32; k];
            for j in 0..rows {
                p.row_f32(j, &mut row);
                for (t, &v) in row.iter().enumerate() {
                    let want = fmt.widen(&bytes[(j * k + t) * fmt.size()..]);
                    assert_eq!(v.to_bits(), want.to_bits(), "{ty:?} row {j} element {t}");
                }
            }
            // The padding rows are zero.
            assert!((rows..p.groups * NR).all(|j| (0..k).all(|t| p.at(j, t) == 0.0)));
        }
    }
}
