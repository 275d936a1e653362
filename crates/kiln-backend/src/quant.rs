//! ggml tensor types and their dequantization to f32.
//!
//! GGUF checkpoints store weights in ggml's block formats. The CPU backend
//! computes with every format here as it is stored (see `cpu::matmul`);
//! [`dequantize`] is the reference its kernels are tested against and what
//! small tensors (norms, biases) are read through. The block layouts below are the ones ggml defines
//! (`ggml-common.h`); each function turns whole blocks into floats.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::HostBytes;

pub mod mxfp4;

/// The ggml element types kiln knows. Values are ggml's enum numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    BF16 = 30,
    /// OCP Microscaling FP4 (gpt-oss's experts): see [`mxfp4`].
    MXFP4 = 39,
}

impl GgmlType {
    /// Maps ggml's type number to the enum; `None` for types kiln cannot read.
    pub fn from_u32(v: u32) -> Option<Self> {
        FORMATS.iter().map(|f| f.ty).find(|&ty| ty as u32 == v)
    }

    /// The format's row of [`FORMATS`]: everything kiln knows about it.
    pub const fn format(self) -> &'static Format {
        // Each row's index in the table, which `formats_are_listed_once` checks.
        let i = match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 2,
            Self::Q8_0 => 3,
            Self::Q4_0 => 4,
            Self::Q4_1 => 5,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q2K => 8,
            Self::Q3K => 9,
            Self::Q4K => 10,
            Self::Q5K => 11,
            Self::Q6K => 12,
            Self::Q8K => 13,
            Self::MXFP4 => 14,
        };
        &FORMATS[i]
    }

    /// Byte offsets of the f16 scales (and minimums) inside one block; empty
    /// for the float formats. Test and benchmark data generators set these to
    /// moderate values so that random blocks decode to finite numbers.
    pub fn f16_fields(self) -> &'static [usize] {
        self.format().f16_fields
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        let f = self.format();
        (f.elems, f.bytes)
    }
}

/// One weight format, in one row: its block layout, its dequantizer, its
/// quantizer, and how the CPU kernels see and repack its blocks. Adding a
/// format is a [`GgmlType`] variant, its row of [`FORMATS`] (with the
/// functions it points at), and its kernels (its decode arm in
/// `cpu::blocks::unpack`, its instance in the x86 `by_format!` and its
/// vector decoders' arms where its codes or scales are new).
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// The format's ggml type (and type number).
    pub ty: GgmlType,
    /// Elements per block (1 for the float formats).
    pub elems: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// Byte offsets of the f16 scales (and minimums) inside one block: the
    /// scale `d` first, then the minimum or `dmin` where the format has one
    /// (the interleaved layout copies them in that order).
    pub f16_fields: &'static [usize],
    /// Decodes one block; `None` where kiln cannot read the format (Q8_K,
    /// which exists only as an activation format).
    pub dequantize: Option<BlockDequantizer>,
    /// The name `option.quantize` takes and the block encoder, where kiln
    /// can write the format.
    pub quantize: Option<(&'static str, BlockQuantizer)>,
    /// How the CPU kernels compute with the blocks; `None` for the float
    /// formats (their own kernels) and Q8_K.
    pub codes: Option<CodeLayout>,
}

/// A block format as the CPU kernels see it: integer codes, a scale per 16
/// elements and an offset per granule (see `cpu::blocks`), and the shape of
/// its codes in the interleaved layout (see `cpu::packed`).
#[derive(Debug, Clone, Copy)]
pub struct CodeLayout {
    /// Codes are signed bytes (Q8_0) rather than small unsigned integers.
    pub signed: bool,
    /// Elements per offset coefficient: 16 or 32, or 0 for none.
    pub granule: usize,
    /// Bits per code: 8 (Q8_0), 2, 3, 4, 5 or 6.
    pub code_bits: usize,
    /// 32-element sub-blocks are scaled in two halves of 16 (Q2_K, Q3_K, Q6_K).
    pub halves: bool,
    /// The format adds a minimum per sub-block (per half sub-block where
    /// its scales are: Q2_K).
    pub has_min: bool,
    /// The zero point of the unsigned codes in the interleaved layout.
    pub zero_point: i32,
    /// The scales a block keeps besides its f16 fields, and the function
    /// that reads them out of a block for the interleaved layout.
    pub sub_scales: SubScales,
    /// Where the stored 4-bit codes are not the integers themselves but
    /// indices into a table of values (MXFP4's E2M1 codes): the unsigned
    /// code (value plus `zero_point`) of each index. The interleaved layout
    /// keeps the indices, and kernels look them up in registers.
    pub lookup: Option<&'static [u8; 16]>,
}

/// The scales (and minimums) a block keeps per part besides its f16 fields,
/// each variant with the function that reads them out of one block: what
/// the interleaved layout (`cpu::packed`) copies into a group's head, and
/// how its kernels read them back.
#[derive(Debug, Clone, Copy)]
pub enum SubScales {
    /// None: the f16 `d` scales every element (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
    None,
    /// An unsigned scale and minimum per 32-element sub-block, multiplying
    /// `d` and `dmin` (Q4_K, Q5_K).
    ScaleMin(fn(&[u8]) -> [(u8, u8); 8]),
    /// A signed scale per 16 elements, multiplying `d` (Q3_K, Q6_K).
    Signed(fn(&[u8]) -> [i8; 16]),
    /// A byte per 16 elements, a 4-bit scale in its low nibble (multiplying
    /// `d`) and a 4-bit minimum in its high one (multiplying `dmin`) (Q2_K).
    Nibbles(fn(&[u8]) -> [u8; 16]),
    /// No f16 fields: the block's one scale is a power of two, stored as an
    /// E8M0 exponent byte `e` (read out by the function) that scales every
    /// element by [`mxfp4::e8m0_half`]`(e)` = 2^(e - 128) (MXFP4).
    E8M0(fn(&[u8]) -> u8),
}

/// Writes one block of a format for `x` (one block's elements) into `out`.
pub type BlockQuantizer = fn(&[f32], &mut [u8]);

const fn codes(
    signed: bool,
    granule: usize,
    code_bits: usize,
    halves: bool,
    has_min: bool,
    zero_point: i32,
    sub_scales: SubScales,
) -> Option<CodeLayout> {
    Some(CodeLayout {
        signed,
        granule,
        code_bits,
        halves,
        has_min,
        zero_point,
        sub_scales,
        lookup: None,
    })
}

/// Every format kiln knows, one row each, in [`GgmlType::format`]'s order.
pub static FORMATS: [Format; 15] = {
    use crate::quantize::{q4_0 as enc_q4_0, q4_1 as enc_q4_1, q8_0 as enc_q8_0};
    use crate::quantize_k::{q4_k as enc_q4_k, q6_k as enc_q6_k};
    use GgmlType as T;
    [
        Format {
            ty: T::F32,
            elems: 1,
            bytes: 4,
            f16_fields: &[],
            dequantize: Some(|b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            quantize: None,
            codes: None,
        },
        Format {
            ty: T::F16,
            elems: 1,
            bytes: 2,
            f16_fields: &[],
            dequantize: Some(|b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            quantize: None,
            codes: None,
        },
        Format {
            ty: T::BF16,
            elems: 1,
            bytes: 2,
            f16_fields: &[],
            dequantize: Some(|b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            quantize: None,
            codes: None,
        },
        Format {
            ty: T::Q8_0,
            elems: 32,
            bytes: 34,
            f16_fields: &[0],
            dequantize: Some(q8_0),
            quantize: Some(("q8_0", enc_q8_0)),
            codes: codes(true, 0, 8, false, false, 128, SubScales::None),
        },
        Format {
            ty: T::Q4_0,
            elems: 32,
            bytes: 18,
            f16_fields: &[0],
            dequantize: Some(q4_0),
            quantize: Some(("q4_0", enc_q4_0)),
            codes: codes(false, 32, 4, false, false, 8, SubScales::None),
        },
        Format {
            ty: T::Q4_1,
            elems: 32,
            bytes: 20,
            f16_fields: &[0, 2],
            dequantize: Some(q4_1),
            quantize: Some(("q4_1", enc_q4_1)),
            codes: codes(false, 32, 4, false, true, 0, SubScales::None),
        },
        Format {
            ty: T::Q5_0,
            elems: 32,
            bytes: 22,
            f16_fields: &[0],
            dequantize: Some(q5_0),
            quantize: None,
            codes: codes(false, 32, 5, false, false, 16, SubScales::None),
        },
        Format {
            ty: T::Q5_1,
            elems: 32,
            bytes: 24,
            f16_fields: &[0, 2],
            dequantize: Some(q5_1),
            quantize: None,
            codes: codes(false, 32, 5, false, true, 0, SubScales::None),
        },
        Format {
            ty: T::Q2K,
            elems: QK_K,
            bytes: 84,
            f16_fields: &[80, 82],
            dequantize: Some(q2_k),
            quantize: None,
            codes: codes(
                false,
                16,
                2,
                true,
                true,
                0,
                SubScales::Nibbles(|b| {
                    let mut s = [0; 16];
                    s.copy_from_slice(&b[..16]);
                    s
                }),
            ),
        },
        Format {
            ty: T::Q3K,
            elems: QK_K,
            bytes: 110,
            f16_fields: &[108],
            dequantize: Some(q3_k),
            quantize: None,
            codes: codes(
                false,
                16,
                3,
                true,
                false,
                4,
                SubScales::Signed(|b| q3_k_scales(&b[96..108])),
            ),
        },
        Format {
            ty: T::Q4K,
            elems: QK_K,
            bytes: 144,
            f16_fields: &[0, 2],
            dequantize: Some(q4_k),
            quantize: Some(("q4_k", enc_q4_k)),
            codes: codes(
                false,
                32,
                4,
                false,
                true,
                0,
                SubScales::ScaleMin(k4_scale_mins),
            ),
        },
        Format {
            ty: T::Q5K,
            elems: QK_K,
            bytes: 176,
            f16_fields: &[0, 2],
            dequantize: Some(q5_k),
            quantize: None,
            codes: codes(
                false,
                32,
                5,
                false,
                true,
                0,
                SubScales::ScaleMin(k4_scale_mins),
            ),
        },
        Format {
            ty: T::Q6K,
            elems: QK_K,
            bytes: 210,
            f16_fields: &[208],
            dequantize: Some(q6_k),
            quantize: Some(("q6_k", enc_q6_k)),
            codes: codes(
                false,
                16,
                6,
                true,
                false,
                32,
                SubScales::Signed(|b| std::array::from_fn(|g| b[192 + g] as i8)),
            ),
        },
        Format {
            ty: T::Q8K,
            elems: QK_K,
            bytes: 292,
            f16_fields: &[],
            dequantize: None,
            quantize: None,
            codes: None,
        },
        Format {
            ty: T::MXFP4,
            elems: 32,
            bytes: 17,
            f16_fields: &[],
            dequantize: Some(mxfp4::dequantize_block),
            // A stored format (gpt-oss ships it), not an `option.quantize`
            // target; its encoder is `mxfp4::quantize_block`.
            quantize: None,
            codes: Some(CodeLayout {
                signed: false,
                granule: 32,
                code_bits: 4,
                halves: false,
                has_min: false,
                zero_point: mxfp4::ZERO_POINT,
                sub_scales: SubScales::E8M0(|b| b[0]),
                lookup: Some(&mxfp4::CODES),
            }),
        },
    ]
};

/// Every weight format the CPU backend computes with as stored.
pub const WEIGHT_FORMATS: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::MXFP4,
];

/// A weight matrix as a checkpoint holds it, handed to [`crate::Backend::upload_weight`].
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    /// Plain f32 values, row-major.
    F32(Vec<f32>),
    /// Rows of ggml blocks (each row a whole number of blocks), as stored in
    /// GGUF; also plain little-endian F32, F16 or BF16 rows (safetensors), which
    /// ggml stores the same way. Usually a range of the memory-mapped file.
    Ggml { ty: GgmlType, bytes: HostBytes },
}

impl WeightData {
    /// Splits a matrix of `cols` columns into consecutive bands of `rows[i]`
    /// rows each (fused projections such as q/k/v stored as one matrix).
    pub fn split_rows(self, cols: usize, rows: &[usize]) -> Result<Vec<WeightData>, String> {
        let row_len = match &self {
            WeightData::F32(_) => cols,
            WeightData::Ggml { ty, .. } => row_bytes(*ty, cols)
                .ok_or_else(|| format!("{cols} columns are not whole {ty:?} blocks"))?,
        };
        let total: usize = rows.iter().sum();
        let have = match &self {
            WeightData::F32(v) => v.len(),
            WeightData::Ggml { bytes, .. } => bytes.len(),
        };
        if total * row_len != have {
            return Err(format!(
                "{have} elements or bytes cannot split into {rows:?} rows of {cols}"
            ));
        }
        let mut start = 0;
        Ok(rows
            .iter()
            .map(|&r| {
                let range = start * row_len..(start + r) * row_len;
                start += r;
                match &self {
                    WeightData::F32(v) => WeightData::F32(v[range].to_vec()),
                    WeightData::Ggml { ty, bytes } => WeightData::Ggml {
                        ty: *ty,
                        bytes: bytes
                            .slice(range)
                            .expect("range checked against the length above"),
                    },
                }
            })
            .collect())
    }
}

impl WeightData {
    /// The same matrix stored as `to` (F32, F16 or BF16), rounding to its
    /// precision; block formats and data already in `to` are returned as they are.
    pub fn into_float(self, to: GgmlType) -> Result<WeightData, String> {
        let encode = |v: &mut dyn Iterator<Item = f32>| -> Vec<u8> {
            match to {
                GgmlType::F16 => v.flat_map(|x| f16::from_f32(x).to_le_bytes()).collect(),
                GgmlType::BF16 => v.flat_map(|x| bf16::from_f32(x).to_le_bytes()).collect(),
                _ => v.flat_map(|x| x.to_le_bytes()).collect(),
            }
        };
        if !matches!(to, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(format!("{to:?} is not a float format"));
        }
        Ok(match self {
            WeightData::F32(v) if to == GgmlType::F32 => WeightData::F32(v),
            WeightData::F32(v) => WeightData::Ggml {
                ty: to,
                bytes: encode(&mut v.into_iter()).into(),
            },
            WeightData::Ggml { ty, bytes }
                if ty != to && matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) =>
            {
                let (_, size) = ty.block();
                let f = block_dequantizer(ty).ok_or("float formats always dequantize")?;
                let mut it = bytes.chunks_exact(size).map(|b| {
                    let mut y = [0f32];
                    f(b, &mut y);
                    y[0]
                });
                WeightData::Ggml {
                    ty: to,
                    bytes: encode(&mut it).into(),
                }
            }
            same => same,
        })
    }
}

/// Bytes one row of `cols` elements of type `ty` occupies, or `None` when
/// `cols` is not a whole number of blocks.
pub fn row_bytes(ty: GgmlType, cols: usize) -> Option<usize> {
    let (block, bytes) = ty.block();
    cols.is_multiple_of(block).then_some(cols / block * bytes)
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// Turns one block of bytes into its elements.
pub type BlockDequantizer = fn(&[u8], &mut [f32]);

/// The block dequantizer of `ty`, or `None` for types kiln cannot read yet.
pub fn block_dequantizer(ty: GgmlType) -> Option<BlockDequantizer> {
    ty.format().dequantize
}

/// Dequantizes whole blocks of `ty` from `bytes` into `out` (sequentially;
/// callers parallelise). `out.len()` must be the number of elements the bytes hold.
pub fn dequantize_with(f: BlockDequantizer, ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (block, block_bytes) = ty.block();
    for (y, b) in out
        .chunks_exact_mut(block)
        .zip(bytes.chunks_exact(block_bytes))
    {
        f(b, y);
    }
}

/// Dequantizes `numel` elements of type `ty` from `bytes`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let (block, block_bytes) = ty.block();
    if !numel.is_multiple_of(block) {
        return Err(format!(
            "{numel} elements is not a whole number of {ty:?} blocks"
        ));
    }
    let n_blocks = numel / block;
    if bytes.len() != n_blocks * block_bytes {
        return Err(format!(
            "expected {} bytes of {ty:?} data, found {}",
            n_blocks * block_bytes,
            bytes.len()
        ));
    }
    let f = block_dequantizer(ty).ok_or_else(|| format!("{ty:?} tensors are not supported yet"))?;
    let mut out = vec![0f32; numel];
    // Chunks of many blocks keep rayon's per-task overhead negligible.
    let per_task = (4096 / block).max(1);
    out.par_chunks_mut(block * per_task)
        .zip(bytes.par_chunks(block_bytes * per_task))
        .for_each(|(y, b)| dequantize_with(f, ty, b, y));
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 32 4-bit values, scale d: x = (q - 8) * d. Low nibbles are elements 0..16.
pub(crate) fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// 32 4-bit values, scale d and minimum m: x = q * d + m.
pub(crate) fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// 5-bit values: low 4 bits in nibbles, the fifth bit of element j in bit j of `qh`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((q & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((q & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// 32 signed bytes with one scale.
pub(crate) fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// The eight (scale, minimum) pairs of a Q4_K or Q5_K block `b`, packed
/// in 6 bits each in its bytes 4..16: the row's [`SubScales::ScaleMin`]
/// reader for both formats.
fn k4_scale_mins(b: &[u8]) -> [(u8, u8); 8] {
    std::array::from_fn(|s| scale_min_k4(s, &b[4..16]))
}

/// The 6-bit (scale, min) pair `j` of the 12 packed bytes used by Q4_K and Q5_K.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let d = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d, m)
    }
}

/// Super-block of 8 sub-blocks of 32, each with its own 6-bit scale and min.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Like Q4_K with a fifth bit per element in `qh`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, (ql, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let u1 = 1u8 << (2 * chunk);
        let u2 = 2u8 << (2 * chunk);
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0x0f) + hi1) as f32 - m1;
            out[l + 32] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

/// 6-bit values (4 low bits in `ql`, 2 high in `qh`) with 16 signed 8-bit scales.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    debug_assert_eq!(y.len(), QK_K);
    for half in 0..2 {
        let ql = &ql_all[64 * half..];
        let qh = &qh_all[32 * half..];
        let sc = &sc_all[8 * half..];
        let out = &mut y[128 * half..128 * (half + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// 2-bit values in 16 sub-blocks of 16, each with a 4-bit scale (low nibble
/// of `scales[i]`) and a 4-bit minimum (high nibble): x = d * sc * q - dmin * m.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (e, out) in y.iter_mut().enumerate().take(QK_K) {
        let sub = e / 16;
        let (sc, m) = (scales[sub] & 0x0f, scales[sub] >> 4);
        let (half, within) = (e / 128, e % 128);
        let (shift, l) = (2 * (within / 32), within % 32);
        let q = (qs[32 * half + l] >> shift) & 3;
        *out = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// The 16 signed 6-bit scales of a Q3_K block, unpacked from its 12 bytes
/// (low 4 bits in the first 8 bytes' nibbles, high 2 bits in the last 4).
pub(crate) fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, s) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// 3-bit values: the low 2 bits in `qs`, the third in `hmask` (a clear bit
/// subtracts 4), 16 sub-blocks of 16 with signed 6-bit scales: x = d * sc * q.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for (e, out) in y.iter_mut().enumerate().take(QK_K) {
        let (half, within) = (e / 128, e % 128);
        let (j, l) = (within / 32, within % 32);
        let low = (qs[32 * half + l] >> (2 * j)) & 3;
        let high = (hmask[l] >> (4 * half + j)) & 1;
        let q = (low | (high << 2)) as i32 - 4;
        *out = d * scales[e / 16] as f32 * q as f32;
    }
}

#[cfg(test)]
mod format_table_tests {
    use super::*;

    /// Every format has one row, found by its type and its type number,
    /// and the quantizer names are `QUANTIZE_TARGETS`'s.
    #[test]
    fn formats_are_listed_once() {
        for (i, f) in FORMATS.iter().enumerate() {
            assert!(std::ptr::eq(f.ty.format(), &FORMATS[i]), "{:?}", f.ty);
            assert_eq!(GgmlType::from_u32(f.ty as u32), Some(f.ty));
            // Kernels generic over a format take its type number as a `u8`.
            assert!(f.ty as u32 <= u8::MAX as u32, "{:?}", f.ty);
            if let Some(c) = f.codes {
                assert!(f.elems.is_multiple_of(32), "{:?}", f.ty);
                assert!(c.granule == 0 || f.elems.is_multiple_of(c.granule));
                // `d`, then the minimum or `dmin`: what the repack copies
                // (none where the scale is an E8M0 exponent byte).
                let d = !matches!(c.sub_scales, SubScales::E8M0(_)) as usize;
                assert_eq!(f.f16_fields.len(), d + c.has_min as usize, "{:?}", f.ty);
                // A table of codes indexes 4-bit codes.
                assert!(c.lookup.is_none() || c.code_bits == 4, "{:?}", f.ty);
            }
        }
        let mut rows: Vec<(u32, &str)> = FORMATS
            .iter()
            .filter_map(|f| Some((f.ty as u32, f.quantize?.0)))
            .collect();
        let mut targets: Vec<(u32, &str)> = crate::quantize::QUANTIZE_TARGETS
            .iter()
            .map(|&(ty, n)| (ty as u32, n))
            .collect();
        rows.sort();
        targets.sort();
        assert_eq!(rows, targets);
    }
}
