//! gpt-oss's MXFP4 experts, from the safetensors layout Hugging Face
//! checkpoints use into ggml's MXFP4 blocks, which the CPU backend
//! computes with as they are (`kiln_backend::quant::mxfp4`).
//!
//! A checkpoint stores a stack of expert matrices (`rows` outputs by
//! `cols` inputs each) as two `U8` tensors:
//!
//! - `<name>_blocks`, shape `[..., rows, cols / 32, 16]`: per 32-element
//!   block, 16 bytes of 4-bit E2M1 codes, element `2i` in the low nibble of
//!   byte `i` and element `2i + 1` in its high nibble;
//! - `<name>_scales`, shape `[..., rows, cols / 32]`: per block, its E8M0
//!   exponent (scale 2^(e - 127)).
//!
//! ggml's block (17 bytes) keeps the same exponent byte first, then the same
//! codes in another order (element `j` in the low nibble of byte `j`,
//! element `j + 16` in its high nibble), so the move is lossless: only
//! nibbles change places. Leading dimensions (the experts) are flattened:
//! one matrix per index.

use kiln_backend::quant::mxfp4::{BLOCK, BLOCK_BYTES};
use kiln_backend::{GgmlType, WeightData};
use safetensors::Dtype;

use crate::weights::SafetensorsSource;
use crate::{ModelError, Result};

/// Bytes of codes per block in both layouts.
const CODE_BYTES: usize = BLOCK / 2;

/// A stack of MXFP4 matrices, each `rows x cols`, in ggml's block layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Mxfp4Experts {
    /// Output features of each matrix.
    pub rows: usize,
    /// Input features of each matrix (a whole number of 32-element blocks).
    pub cols: usize,
    /// One matrix per expert (per index of the leading dimensions), as
    /// `WeightData::Ggml` of type MXFP4, ready for `upload_weight`.
    pub experts: Vec<WeightData>,
}

/// Why a blocks/scales pair cannot be read as MXFP4 matrices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Mxfp4Error {
    /// The blocks tensor is not `[..., rows, cols / 32, 16]`.
    #[error("the blocks' shape {0:?} is not [..., rows, cols / 32, 16]")]
    BlocksShape(Vec<usize>),
    /// The scales do not have one byte per block.
    #[error(
        "the scales' shape {scales:?} is not the blocks' {blocks:?} without its last dimension"
    )]
    ScalesShape {
        blocks: Vec<usize>,
        scales: Vec<usize>,
    },
    /// The data is not as long as the shape says.
    #[error("{what} holds {have} bytes, its shape {shape:?} says {want}")]
    Length {
        what: &'static str,
        shape: Vec<usize>,
        have: usize,
        want: usize,
    },
}

/// Moves a blocks/scales pair (bytes and shapes as the checkpoint stores
/// them) into one MXFP4 matrix per leading index, in ggml's layout.
pub fn experts_from_hf(
    blocks: &[u8],
    blocks_shape: &[usize],
    scales: &[u8],
    scales_shape: &[usize],
) -> std::result::Result<Mxfp4Experts, Mxfp4Error> {
    let bad_blocks = || Mxfp4Error::BlocksShape(blocks_shape.to_vec());
    let [lead @ .., rows, groups, code_bytes] = blocks_shape else {
        return Err(bad_blocks());
    };
    if *code_bytes != CODE_BYTES || *groups == 0 {
        return Err(bad_blocks());
    }
    if scales_shape != &blocks_shape[..blocks_shape.len() - 1] {
        return Err(Mxfp4Error::ScalesShape {
            blocks: blocks_shape.to_vec(),
            scales: scales_shape.to_vec(),
        });
    }
    // Checked products: a shape from a file header may be anything.
    let count = |shape: &[usize]| {
        shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(bad_blocks)
    };
    let experts = count(lead)?;
    let n_blocks = count(&blocks_shape[..blocks_shape.len() - 1])?;
    for (what, have, shape, want) in [
        (
            "the blocks",
            blocks.len(),
            blocks_shape,
            n_blocks.checked_mul(CODE_BYTES),
        ),
        ("the scales", scales.len(), scales_shape, Some(n_blocks)),
    ] {
        if want != Some(have) {
            return Err(Mxfp4Error::Length {
                what,
                shape: shape.to_vec(),
                have,
                want: want.unwrap_or(usize::MAX),
            });
        }
    }
    let (rows, groups) = (*rows, *groups);
    let per_expert = rows * groups;
    let experts = (0..experts)
        .map(|e| {
            let range = e * per_expert..(e + 1) * per_expert;
            let mut out = vec![0u8; per_expert * BLOCK_BYTES];
            for ((o, codes), &exp) in out
                .chunks_exact_mut(BLOCK_BYTES)
                .zip(
                    blocks[range.start * CODE_BYTES..range.end * CODE_BYTES]
                        .chunks_exact(CODE_BYTES),
                )
                .zip(&scales[range])
            {
                o[0] = exp;
                repack_codes(codes, &mut o[1..]);
            }
            WeightData::Ggml {
                ty: GgmlType::MXFP4,
                bytes: out.into(),
            }
        })
        .collect();
    Ok(Mxfp4Experts {
        rows,
        cols: groups * BLOCK,
        experts,
    })
}

/// One block's 16 code bytes from Hugging Face's order (elements `2i`,
/// `2i + 1` in byte `i`) to ggml's (elements `j`, `j + 16` in byte `j`).
fn repack_codes(hf: &[u8], ggml: &mut [u8]) {
    let code = |t: usize| (hf[t / 2] >> (4 * (t % 2))) & 0x0f;
    for (j, q) in ggml.iter_mut().enumerate().take(CODE_BYTES) {
        *q = code(j) | (code(j + 16) << 4);
    }
}

impl SafetensorsSource {
    /// The MXFP4 matrices of `<canonical>_blocks` and `<canonical>_scales`
    /// (both looked up through the source's name map, both `U8`), one per
    /// expert: how a gpt-oss checkpoint's experts load without being
    /// expanded to floats.
    pub fn mxfp4_experts(&self, canonical: &str) -> Result<Mxfp4Experts> {
        let u8_only = |path: &std::path::PathBuf, name: &str, dtype: Dtype| {
            if dtype == Dtype::U8 {
                return Ok(());
            }
            Err(ModelError::Tensor {
                path: path.clone(),
                tensor: name.to_string(),
                msg: format!("MXFP4 blocks and scales must be U8, not {dtype:?}"),
            })
        };
        // The scales (a sixteenth of the blocks) are copied; the blocks are
        // read in place from the map, straight into ggml's layout.
        let (scales_shape, scales) =
            self.view(&format!("{canonical}_scales"), |path, _, name, view| {
                u8_only(path, name, view.dtype())?;
                Ok((view.shape().to_vec(), view.data().to_vec()))
            })?;
        self.view(&format!("{canonical}_blocks"), |path, _, name, view| {
            u8_only(path, name, view.dtype())?;
            experts_from_hf(view.data(), view.shape(), &scales, &scales_shape).map_err(|e| {
                ModelError::Tensor {
                    path: path.clone(),
                    tensor: name.to_string(),
                    msg: e.to_string(),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nibbles move as the two layouts say: element `t` of a block, put at
    /// Hugging Face's place, comes out at ggml's.
    #[test]
    fn codes_move_from_pairs_to_halves() {
        let mut hf = [0u8; 16];
        for t in 0..32 {
            // Element t's code is t % 16, plus a marker of which half.
            hf[t / 2] |= ((t % 16) as u8) << (4 * (t % 2));
        }
        let mut g = [0u8; 16];
        repack_codes(&hf, &mut g);
        for (j, &b) in g.iter().enumerate() {
            assert_eq!(b & 0x0f, (j % 16) as u8, "element {j}");
            assert_eq!(b >> 4, ((j + 16) % 16) as u8, "element {}", j + 16);
        }
        // And an asymmetric pattern: only element 1 set.
        let mut hf = [0u8; 16];
        hf[0] = 0x70;
        repack_codes(&hf, &mut g);
        assert_eq!(g[1], 0x07);
        assert_eq!(g.iter().filter(|&&b| b != 0).count(), 1);
    }

    /// Shapes and lengths that do not fit are refused with what is wrong.
    #[test]
    fn bad_shapes_are_refused() {
        let b = vec![0u8; 2 * 3 * 16];
        let s = vec![0u8; 6];
        assert!(experts_from_hf(&b, &[2, 3, 16], &s, &[2, 3]).is_ok());
        assert_eq!(
            experts_from_hf(&b, &[2, 3, 8, 2], &s, &[2, 3, 8]),
            Err(Mxfp4Error::BlocksShape(vec![2, 3, 8, 2]))
        );
        assert!(matches!(
            experts_from_hf(&b, &[2, 3, 16], &s, &[3, 2]),
            Err(Mxfp4Error::ScalesShape { .. })
        ));
        assert!(matches!(
            experts_from_hf(&b[1..], &[2, 3, 16], &s, &[2, 3]),
            Err(Mxfp4Error::Length {
                what: "the blocks",
                ..
            })
        ));
        assert!(matches!(
            experts_from_hf(&b, &[2, 3, 16], &s[1..], &[2, 3]),
            Err(Mxfp4Error::Length {
                what: "the scales",
                ..
            })
        ));
        // A header's absurd shape overflows nothing and allocates nothing.
        let huge = [usize::MAX / 2, 4, 3, 16];
        assert!(experts_from_hf(&b, &huge, &s, &huge[..3]).is_err());
        assert!(experts_from_hf(&b, &[16], &s, &[]).is_err());
    }
}
