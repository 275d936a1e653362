//! Weight matrices on the CPU: f32, or rows of ggml blocks kept as they were
//! in the checkpoint (Q4_0, Q4_1, Q8_0), which is 4 to 6 times less memory to
//! stream per decode step than f32.

use crate::quant::{self, GgmlType, WeightData};
use crate::{BackendError, Result};

/// How a weight's values are stored.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    /// `rows` rows of `row_bytes` bytes of ggml blocks each.
    Blocks {
        ty: GgmlType,
        bytes: Vec<u8>,
        row_bytes: usize,
        dequant: quant::BlockDequantizer,
    },
}

/// A `[rows, cols]` weight matrix in host memory.
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
}

/// Block formats the CPU kernels compute with directly.
pub(super) fn computes_natively(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

impl CpuWeight {
    /// Takes a checkpoint's matrix, keeping natively supported blocks and
    /// converting everything else to f32.
    pub fn new(rows: usize, cols: usize, data: WeightData) -> Result<Self> {
        let numel = rows.checked_mul(cols).ok_or_else(|| BackendError::Shape {
            op: "upload_weight",
            msg: format!("{rows} x {cols} overflows"),
        })?;
        let invalid = |msg: String| BackendError::Invalid {
            op: "upload_weight",
            msg,
        };
        let storage = match data {
            WeightData::Ggml { ty, bytes } if computes_natively(ty) => {
                let dequant = quant::block_dequantizer(ty)
                    .ok_or_else(|| invalid(format!("{ty:?} cannot be dequantized")))?;
                let row_bytes = quant::row_bytes(ty, cols).ok_or_else(|| {
                    invalid(format!("{cols} columns are not whole {ty:?} blocks"))
                })?;
                if bytes.len() != rows * row_bytes {
                    return Err(invalid(format!(
                        "{} bytes for {rows} rows of {row_bytes} bytes",
                        bytes.len()
                    )));
                }
                Storage::Blocks {
                    ty,
                    bytes,
                    row_bytes,
                    dequant,
                }
            }
            other => Storage::F32(other.into_f32(numel).map_err(invalid)?),
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    /// Writes rows `r0..r0 + out.len() / cols` as f32 into `out`.
    pub fn rows_f32(&self, r0: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[r0 * self.cols..(r0 + n) * self.cols]),
            Storage::Blocks {
                ty,
                bytes,
                row_bytes,
                dequant,
            } => {
                let src = &bytes[r0 * row_bytes..(r0 + n) * row_bytes];
                quant::dequantize_with(*dequant, *ty, src, out);
            }
        }
    }
}
