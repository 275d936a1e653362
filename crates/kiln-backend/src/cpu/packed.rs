//! Weights of the block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
//! Q4_K, Q5_K, Q6_K, MXFP4) repacked at load into groups of 16 interleaved rows,
//! and the canonical computation over them.
//!
//! In the file, each row's blocks follow one another, so one output element
//! is one row's dot product, and a SIMD register summing eight lanes of it
//! still needs a horizontal sum and one float multiply per block per output.
//! Interleaved, a register holds the same four elements of 16 rows (lane
//! `r` is row `r`'s; AVX2 takes a group as two halves of eight), and one
//! activation broadcast against it adds into 16 outputs at once: after
//! eight such products per 32 elements, lane `r` holds row `r`'s whole
//! sum, exactly, and the float work (convert, scale, accumulate) is one
//! instruction per 16 outputs.
//!
//! A group keeps, per block of the file, the codes of its rows (nibbles,
//! plus bit planes for 5- and 6-bit codes; four 2-bit codes per byte, plus
//! a plane of third bits for Q3_K; or bytes for Q8_0) and their scales in
//! their integer or f16 form, so the packed weight is the file's size
//! (Q3_K, Q4_K, Q5_K: 2-4% more); the mapped pages of the original are
//! released as they are copied ([`crate::HostBytes::release_resident`]).
//!
//! **The canonical computation** for input row `i` and weight row `j`, over
//! the row's 32-element sub-blocks `b` in order (every kernel, SIMD or
//! portable, computes exactly this):
//! ```text
//! for each part h of b (the whole 32, or two halves of 16 for Q2_K, Q3_K
//! and Q6_K, whose scales are per 16 elements):
//!     S   = sum over t in h of u[t] * qx[t] - K * sum over t in h of qx[t]   (exact)
//!     acc = fma(float(S) * dx_b, scale_bh, acc)
//! for each part h of b:                    (Q4_1, Q5_1, Q4_K, Q5_K; Q2_K)
//!     off = fma(min_bh, xsum_bh, off)
//! y   = acc + off
//! ```
//! `u` is the stored code as an unsigned integer and `K` its zero point
//! (128 for Q8_0's signed bytes, 8 for Q4_0, 16 for Q5_0, 4 for Q3_K, 32
//! for Q6_K, 0 with a minimum). MXFP4 stores 4-bit indices and a byte of
//! E8M0 exponent per row and block; `u` is its index looked up in the
//! row's table (the E2M1 value doubled, plus `K` = 12) and its scale
//! 2^(e - 128). `scale_bh` is the f16 scale (`d * sc` for
//! the K-quants, an exact f32 product of an f16 and a small integer) and
//! `min_bh` the part's offset (the f16 minimum, or `-(dmin * m)`), one per
//! sub-block except for Q2_K, whose minimums are per 16 elements as its
//! scales. `qx`, `dx_b` and `xsum_bh` (the sum `dx_b * sum(qx)` over the
//! part) come from [`super::actq`].

use super::actq::QuantizedRows;
use super::blocks::{self, IntFormat, Unpacked, QK};
use crate::quant::{CodeLayout, GgmlType, SubScales, FORMATS};
use crate::HostBytes;

/// Rows per interleaved group: a 512-bit register's 16 lanes (AVX2 takes
/// a group as two halves of eight).
pub(super) const NR: usize = 16;
/// Bytes of one code vector: four elements of each row of a group.
pub(super) const VB: usize = 4 * NR;
/// Offset, within a chunk's head, of the second f16 per row (minimum or dmin).
const SECOND: usize = 2 * NR;
/// Offset of the K-quants' 6-bit scales (a row of `NR` per sub-block), then
/// of their minimums `8 * NR` bytes later; Q3_K's and Q6_K's signed scales
/// start at [`SECOND`] (a row of `NR` per half sub-block); Q2_K's bytes of
/// a 4-bit scale (low nibble) and a 4-bit minimum (high nibble), as the
/// file keeps them, at [`K_SCALES`] (a row of `NR` per half sub-block).
const K_SCALES: usize = 4 * NR;
const K_MINS: usize = K_SCALES + 8 * NR;

/// A block format that is repacked: a thin view of its row of
/// [`crate::quant::FORMATS`] (its [`CodeLayout`], with its [`SubScales`]),
/// and what the interleaved layout makes of it. Every property is a
/// `const fn` of the row, so a kernel generic over the format (its type
/// number as a `const u8`, mapped back by [`PackedFormat::from_index`])
/// sees constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedFormat(GgmlType);

impl PackedFormat {
    /// The format whose ggml type number (`ty as u8`) is `i`: kernels
    /// generic over a format take it as a `const u8` and map it back here
    /// (in a constant, so nothing of it is left at run time).
    pub const fn from_index(i: u8) -> Self {
        let mut k = 0;
        while k < FORMATS.len() {
            let ty = FORMATS[k].ty;
            if ty as u32 == i as u32 {
                match Self::of(ty) {
                    Some(f) => return f,
                    None => panic!("not a packed format"),
                }
            }
            k += 1;
        }
        panic!("not a ggml type number")
    }

    /// The packed form of `ty`, if it has one: every format whose row has
    /// a [`CodeLayout`].
    pub const fn of(ty: GgmlType) -> Option<Self> {
        match ty.format().codes {
            Some(_) => Some(Self(ty)),
            None => None,
        }
    }

    /// The ggml type.
    #[inline(always)]
    pub const fn ty(self) -> GgmlType {
        self.0
    }

    /// The format's codes, from its row of [`crate::quant::FORMATS`].
    #[inline(always)]
    const fn layout(self) -> CodeLayout {
        match self.ty().format().codes {
            Some(c) => c,
            None => panic!("every packed format is a block format"),
        }
    }

    /// Bits per code: 8 (Q8_0), 2, 3, 4, 5 or 6.
    #[inline(always)]
    pub const fn code_bits(self) -> usize {
        self.layout().code_bits
    }

    /// The codes are signed bytes (Q8_0), stored as they are.
    #[inline(always)]
    pub const fn signed(self) -> bool {
        self.layout().signed
    }

    /// 32-element sub-blocks per file block.
    #[inline(always)]
    pub const fn subs(self) -> usize {
        self.ty().format().elems / QK
    }

    /// Sub-blocks are scaled in two halves of 16 (Q2_K, Q3_K, Q6_K).
    #[inline(always)]
    pub const fn halves(self) -> bool {
        self.layout().halves
    }

    /// The format adds a minimum per sub-block (per half sub-block where
    /// its scales are: Q2_K).
    #[inline(always)]
    pub const fn has_min(self) -> bool {
        self.layout().has_min
    }

    /// The zero point `K` of the unsigned codes.
    #[inline(always)]
    pub const fn zero_point(self) -> i32 {
        self.layout().zero_point
    }

    /// The scales the block keeps besides its f16 fields.
    #[inline(always)]
    pub const fn sub_scales(self) -> SubScales {
        self.layout().sub_scales
    }

    /// The unsigned code of each stored 4-bit index, where the codes are
    /// a table's indices (MXFP4).
    #[inline(always)]
    pub const fn lookup(self) -> Option<&'static [u8; 16]> {
        self.layout().lookup
    }

    /// Code bytes per group and sub-block, a vector's worth per bit: eight
    /// code vectors of bytes; four of nibbles plus a plane per bit above
    /// four; or two of 2-bit codes plus a plane for a third bit.
    #[inline(always)]
    pub const fn sub_bytes(self) -> usize {
        self.code_bits() * VB
    }

    /// Offset of the head (an f16 `d` per row, then the rest) within a
    /// chunk, after the codes.
    #[inline(always)]
    pub const fn head(self) -> usize {
        self.subs() * self.sub_bytes()
    }

    /// Bytes per group and file block.
    #[inline(always)]
    pub const fn chunk(self) -> usize {
        self.head()
            + match self.sub_scales() {
                // d, and the minimum where there is one
                SubScales::None if self.has_min() => 2 * SECOND,
                SubScales::None => SECOND,
                // d, dmin, then per sub-block a scale and a minimum per row
                SubScales::ScaleMin(_) => K_MINS + 8 * NR,
                // d, then per half sub-block a signed scale per row
                SubScales::Signed(_) => SECOND + 16 * NR,
                // d, dmin, then per half sub-block a scale-and-minimum byte per row
                SubScales::Nibbles(_) => K_SCALES + 16 * NR,
                // the E8M0 exponent byte per row
                SubScales::E8M0(_) => NR,
            }
    }
}

/// A weight matrix in the interleaved layout: `groups` groups of `NR` rows
/// (the last padded with zero rows), each `blocks` chunks of
/// [`PackedFormat::chunk`] bytes, one per block of the file.
#[derive(Debug)]
pub(crate) struct PackedWeight {
    pub fmt: PackedFormat,
    pub groups: usize,
    pub blocks: usize,
    /// The layout's bytes: the copy made at load, or a range of a file an
    /// earlier start wrote them to ([`super::CpuWeight::from_laid_out`]).
    pub data: HostBytes,
}

impl PackedWeight {
    /// Bytes the layout of `rows` rows of `blocks` blocks of `fmt` takes.
    pub fn size(fmt: PackedFormat, rows: usize, blocks: usize) -> Option<usize> {
        rows.div_ceil(NR)
            .checked_mul(blocks)?
            .checked_mul(fmt.chunk())
    }

    /// Repacks `rows` rows of `blocks` blocks of `fmt` from the file's layout.
    /// `bytes` holds exactly those rows (checked by the caller).
    #[cfg(test)]
    pub fn pack(fmt: PackedFormat, rows: usize, blocks: usize, bytes: &[u8]) -> Self {
        Self::pack_releasing(fmt, rows, blocks, bytes, |_| {})
    }

    /// [`PackedWeight::pack`], calling `done` with each range of `bytes`
    /// (a few hundred rows at a time) once it has been copied, so the
    /// original can be released while the copy grows: peak memory stays
    /// near one matrix, not two. Slabs of rows are packed in parallel.
    pub fn pack_releasing(
        fmt: PackedFormat,
        rows: usize,
        blocks: usize,
        bytes: &[u8],
        done: impl Fn(std::ops::Range<usize>) + Sync,
    ) -> Self {
        use rayon::prelude::*;
        // Groups per slab: a few hundred rows.
        const SLAB: usize = 32;
        let groups = rows.div_ceil(NR);
        let f = IntFormat::of(fmt.ty()).expect("every packed format is a block format");
        let chunk = fmt.chunk();
        let mut data = crate::bytes::LayoutBuf::zeroed(groups * blocks * chunk);
        let row_bytes = blocks * f.bytes;
        data.as_mut_slice()
            .par_chunks_mut(SLAB * blocks * chunk)
            .enumerate()
            .for_each(|(slab, part)| {
                let mut u = Unpacked::default();
                for (gb, out) in part.chunks_exact_mut(chunk).enumerate() {
                    let (g, b) = (slab * SLAB + gb / blocks, gb % blocks);
                    for r in 0..NR {
                        let j = g * NR + r;
                        if j >= rows {
                            break; // padding rows stay zero: scale 0, contributes 0
                        }
                        let at = j * row_bytes + b * f.bytes;
                        let blk = &bytes[at..at + f.bytes];
                        blocks::unpack(&f, blk, &mut u);
                        pack_row(fmt, blk, &u, r, out);
                    }
                }
                let first = slab * SLAB * NR * row_bytes;
                done(first..((slab + 1) * SLAB * NR * row_bytes).min(bytes.len()));
            });
        Self {
            fmt,
            groups,
            blocks,
            data: data.into(),
        }
    }

    /// Row `j` as f32 values, exactly as the file's dequantizer gives them:
    /// what embedding lookups read, so the file's pages are never needed
    /// again.
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        let fmt = self.fmt;
        let (g, r) = (j / NR, j % NR);
        for (t, y) in out.iter_mut().enumerate() {
            let (sub, e) = (t / QK, t % QK);
            let (fb, s) = (sub / fmt.subs(), sub % fmt.subs());
            let chunk = &self.data[(g * self.blocks + fb) * fmt.chunk()..][..fmt.chunk()];
            let h = if fmt.halves() { e / 16 } else { 0 };
            let u = Self::code(fmt, chunk, s, r, e) - fmt.zero_point();
            let v = Self::scale(fmt, chunk, s, h, r) * u as f32;
            *y = if fmt.has_min() {
                v + Self::min(fmt, chunk, s, h, r)
            } else {
                v
            };
        }
    }

    /// Unsigned code `t` (0..32) of sub-block `s` of row `r` in a chunk.
    ///
    /// Element `t` is byte `e = t % 4` of row `r`'s four in code vector
    /// `q = t / 4` (at `4 * r + e`); the vectors are stored as bytes
    /// (Q8_0), as the low then the high nibbles of four vectors, with bit
    /// planes for bits 4 (bit `q`) and 5 (bits `2 (q % 4)` and up, of a
    /// plane per four vectors), or as 2-bit fields (bits `2 (q % 4)` and up
    /// of a byte per four vectors) with a plane for bit 2 (bit `q`).
    pub fn code(fmt: PackedFormat, chunk: &[u8], s: usize, r: usize, t: usize) -> i32 {
        let (q, e) = (t / 4, t % 4);
        let base = &chunk[s * fmt.sub_bytes()..];
        let at = 4 * r + e;
        if fmt.code_bits() == 8 {
            return (base[VB * q + at] as i8 as i32) + 128;
        }
        if fmt.code_bits() < 4 {
            let low = ((base[VB * (q / 4) + at] >> (2 * (q % 4))) & 3) as i32;
            let high = if fmt.code_bits() == 3 {
                ((base[2 * VB + at] >> q) & 1) as i32
            } else {
                0
            };
            return low | high << 2;
        }
        let byte = base[VB * (q % 4) + at];
        let nib = if q < 4 { byte & 0x0f } else { byte >> 4 } as i32;
        let high = match fmt.code_bits() {
            5 => ((base[4 * VB + at] >> q) & 1) as i32,
            6 => ((base[4 * VB + VB * (q / 4) + at] >> (2 * (q % 4))) & 3) as i32,
            _ => 0,
        };
        match fmt.lookup() {
            Some(table) => table[nib as usize] as i32,
            None => nib | high << 4,
        }
    }

    /// The scale of part `h` (0, or 1 for a second half) of sub-block `s`
    /// of row `r` in a chunk.
    pub fn scale(fmt: PackedFormat, chunk: &[u8], s: usize, h: usize, r: usize) -> f32 {
        let head = &chunk[fmt.head()..];
        if let SubScales::E8M0(_) = fmt.sub_scales() {
            return crate::quant::mxfp4::e8m0_half(head[r]);
        }
        let d = f16_at(head, 2 * r);
        match fmt.sub_scales() {
            SubScales::ScaleMin(_) => d * head[K_SCALES + NR * s + r] as f32,
            SubScales::Signed(_) => d * (head[SECOND + NR * (2 * s + h) + r] as i8) as f32,
            SubScales::Nibbles(_) => d * (head[K_SCALES + NR * (2 * s + h) + r] & 0x0f) as f32,
            SubScales::None | SubScales::E8M0(_) => d,
        }
    }

    /// The offset coefficient of part `h` (0, or 1 for a second half: Q2_K's
    /// minimums are per half) of sub-block `s` of row `r` (formats with a
    /// minimum).
    pub fn min(fmt: PackedFormat, chunk: &[u8], s: usize, h: usize, r: usize) -> f32 {
        let head = &chunk[fmt.head()..];
        match fmt.sub_scales() {
            SubScales::ScaleMin(_) => {
                -(f16_at(head, SECOND + 2 * r) * head[K_MINS + NR * s + r] as f32)
            }
            SubScales::Nibbles(_) => {
                -(f16_at(head, SECOND + 2 * r)
                    * (head[K_SCALES + NR * (2 * s + h) + r] >> 4) as f32)
            }
            _ => f16_at(head, SECOND + 2 * r),
        }
    }
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Writes row `r`'s file block `blk` (decoded as `u`) into a group's chunk `out`.
fn pack_row(fmt: PackedFormat, blk: &[u8], u: &Unpacked, r: usize, out: &mut [u8]) {
    // A table's codes are stored as their indices: the inverse table (of
    // codes below 32; the first index of a value the table repeats).
    let index = fmt.lookup().map(|t| {
        let mut inv = [0u8; 32];
        for (i, &c) in t.iter().enumerate().rev() {
            inv[c as usize] = i as u8;
        }
        inv
    });
    for s in 0..fmt.subs() {
        let base = &mut out[s * fmt.sub_bytes()..(s + 1) * fmt.sub_bytes()];
        if fmt.code_bits() == 8 && index.is_none() {
            // Bytes as they are, four at a time: the loop below takes each
            // code through the branches every width needs, which made
            // packing a quarter of a Q8_0 conversion's time.
            let codes = &u.codes[QK * s..QK * (s + 1)];
            for (q, four) in codes.chunks_exact(4).enumerate() {
                base[VB * q + 4 * r..VB * q + 4 * r + 4].copy_from_slice(four);
            }
            continue;
        }
        for t in 0..QK {
            let (q, e) = (t / 4, t % 4);
            let at = 4 * r + e;
            let c = u.codes[QK * s + t];
            let c = index.map_or(c, |inv| inv[c as usize]);
            if fmt.code_bits() == 8 {
                base[VB * q + at] = c;
                continue;
            }
            if fmt.code_bits() < 4 {
                base[VB * (q / 4) + at] |= (c & 3) << (2 * (q % 4));
                if fmt.code_bits() == 3 {
                    base[2 * VB + at] |= (c >> 2) << q;
                }
                continue;
            }
            base[VB * (q % 4) + at] |= if q < 4 { c & 0x0f } else { (c & 0x0f) << 4 };
            match fmt.code_bits() {
                5 => base[4 * VB + at] |= (c >> 4) << q,
                6 => base[4 * VB + VB * (q / 4) + at] |= (c >> 4) << (2 * (q % 4)),
                _ => {}
            }
        }
    }
    let head = &mut out[fmt.head()..];
    // The file's f16 `d`, then its second f16 (minimum or dmin) if any.
    let f16s = fmt.ty().format().f16_fields;
    for (i, &o) in f16s.iter().enumerate() {
        head[SECOND * i + 2 * r..SECOND * i + 2 * r + 2].copy_from_slice(&blk[o..o + 2]);
    }
    match fmt.sub_scales() {
        SubScales::None => {}
        SubScales::ScaleMin(read) => {
            for (s, (sc, m)) in read(blk).into_iter().enumerate() {
                head[K_SCALES + NR * s + r] = sc;
                head[K_MINS + NR * s + r] = m;
            }
        }
        SubScales::Signed(read) => {
            for (g, sc) in read(blk).into_iter().enumerate() {
                head[SECOND + NR * g + r] = sc as u8;
            }
        }
        SubScales::Nibbles(read) => {
            for (g, b) in read(blk).into_iter().enumerate() {
                head[K_SCALES + NR * g + r] = b;
            }
        }
        SubScales::E8M0(read) => head[r] = read(blk),
    }
}

/// What a kernel over packed weights reads.
#[derive(Clone, Copy)]
pub(super) struct PackedOperands<'a> {
    pub w: &'a PackedWeight,
    /// `w`'s bytes, borrowed once: reaching them through [`HostBytes`]
    /// costs a call into its owner, which at one call per chunk took 4% of
    /// a decode step.
    data: &'a [u8],
    /// Activations in [`super::actq::ActLayout::Split`].
    pub q: &'a QuantizedRows,
    /// Output columns (the weight's rows).
    pub n: usize,
    /// Input columns.
    pub k: usize,
}

impl<'a> PackedOperands<'a> {
    /// The operands of `q` times weight `w` (`n` rows of `k` columns).
    pub fn new(w: &'a PackedWeight, q: &'a QuantizedRows, n: usize, k: usize) -> Self {
        Self {
            w,
            data: &w.data,
            q,
            n,
            k,
        }
    }

    /// Group `g`'s block `b`, for a kernel that has the weight's format
    /// `fmt` as a constant (so the chunk's size is one too).
    #[inline(always)]
    pub fn chunk(&self, fmt: PackedFormat, g: usize, b: usize) -> &[u8] {
        debug_assert_eq!(fmt, self.w.fmt);
        let c = fmt.chunk();
        let at = (g * self.w.blocks + b) * c;
        &self.data[at..at + c]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::random_blocks;
    use crate::quant;

    /// Every code, scale and minimum survives the repack, including the
    /// padding of a last group of fewer than `NR` rows.
    #[test]
    fn repacking_keeps_every_value() {
        for ty in crate::quant::WEIGHT_FORMATS {
            let Some(fmt) = PackedFormat::of(ty) else {
                continue;
            };
            let f = IntFormat::of(ty).unwrap();
            let (rows, blocks) = (NR + 3, 3);
            let bytes = random_blocks(ty, rows * blocks, 5);
            let p = PackedWeight::pack(fmt, rows, blocks, &bytes);
            assert_eq!(p.data.len(), 2 * blocks * fmt.chunk());
            // About the file's size: at most 4% more.
            assert!(
                fmt.chunk() * 100 <= NR * f.bytes * 104,
                "{ty:?}: {} bytes per row and block, the file's {}",
                fmt.chunk() as f32 / NR as f32,
                f.bytes
            );
            let deq = quant::block_dequantizer(ty).unwrap();
            let mut want = vec![0f32; blocks * f.elems];
            let mut got = vec![0f32; blocks * f.elems];
            for j in 0..rows {
                let row = &bytes[j * blocks * f.bytes..(j + 1) * blocks * f.bytes];
                quant::dequantize_with(deq, ty, row, &mut want);
                p.row_f32(j, &mut got);
                for (t, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{ty:?} row {j} element {t}: {a} vs {b}"
                    );
                }
            }
            // The padding rows are zero: scale 0, or (MXFP4, whose zero
            // exponent byte is 2^-128) codes at the zero point.
            let last = &p.data[blocks * fmt.chunk()..];
            for r in rows % NR..NR {
                let zero_codes =
                    (0..QK).all(|t| PackedWeight::code(fmt, last, 0, r, t) == fmt.zero_point());
                let scale = PackedWeight::scale(fmt, last, 0, 0, r);
                assert!(scale == 0.0 || zero_codes, "{ty:?} padding row {r}");
            }
        }
    }
}
