//! Weight matrices on the CPU, kept in the encoding the checkpoint stores
//! them in (F32, F16, BF16 or any ggml block format), usually as a range of
//! the memory-mapped file: nothing is expanded at load, so a model takes the
//! memory of its file and a decode step streams as few bytes as it can.

use std::sync::{Arc, OnceLock};

use super::float_packed::{FloatFormat, FloatPacked};
use super::packed::{PackedFormat, PackedWeight};
use crate::quant::{self, GgmlType, WeightData};
use crate::{BackendError, HostBytes, Result};

/// A `[rows, cols]` weight matrix in host memory: `rows` rows of `row_bytes`
/// bytes of `ty`'s blocks each.
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub ty: GgmlType,
    pub bytes: HostBytes,
    pub row_bytes: usize,
    /// The rows interleaved for the packed kernels ([`super::packed`]), for
    /// the formats that have that layout; they then hold the only copy
    /// (the file's mapped pages are released), and `bytes` is empty.
    pub(super) packed: Option<Arc<PackedWeight>>,
    /// Float weights (F32, F16, BF16) transposed in groups for the float
    /// kernels ([`super::float_packed`]); they then hold the only copy,
    /// and `bytes` is empty.
    pub(super) float: Option<Arc<FloatPacked>>,
    dequant: quant::BlockDequantizer,
}

/// The name of the layouts [`CpuWeight::laid_out`] gives and
/// [`CpuWeight::from_laid_out`] takes: the interleaved groups of
/// [`super::packed`] and [`super::float_packed`]. Raise the version with any
/// change to what those layouts hold, so that files an older kiln wrote are
/// stale, never read as the new layout. Every kernel (portable, AVX2,
/// AVX-512, AMX) reads the same bytes, so the name does not depend on the
/// CPU.
pub const LAYOUT: &str = "cpu-interleaved-16-v1";

/// Whether block weights are repacked at load (`KILN_CPU_REPACK=0` keeps
/// the file's layout and the per-row kernels, for comparisons).
pub(super) fn repack_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_CPU_REPACK").map_or(true, |v| v != "0"))
}

impl CpuWeight {
    /// Takes a checkpoint's matrix as it is (f32 values become F32 rows).
    pub fn new(rows: usize, cols: usize, data: WeightData) -> Result<Self> {
        Self::new_with(rows, cols, data, repack_enabled())
    }

    /// A matrix only read by rows (`Backend::upload_table`): block formats
    /// keep the given bytes (usually the memory-mapped file's) instead of a
    /// rearranged copy, so only the rows looked up are read into memory.
    pub fn table(rows: usize, cols: usize, data: WeightData) -> Result<Self> {
        Self::new_with(rows, cols, data, false)
    }

    /// [`CpuWeight::new`], repacking block formats only if `repack`.
    fn new_with(rows: usize, cols: usize, data: WeightData, repack: bool) -> Result<Self> {
        let invalid = |msg: String| BackendError::Invalid {
            op: "upload_weight",
            msg,
        };
        let numel = rows
            .checked_mul(cols)
            .ok_or_else(|| invalid(format!("{rows} x {cols} overflows")))?;
        let (ty, bytes) = match data {
            WeightData::F32(v) => {
                if v.len() != numel {
                    return Err(invalid(format!("{} values for {rows} x {cols}", v.len())));
                }
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (GgmlType::F32, HostBytes::from(bytes))
            }
            WeightData::Ggml { ty, bytes } => (ty, bytes),
        };
        let dequant = quant::block_dequantizer(ty)
            .filter(|_| ty != GgmlType::Q8K)
            .ok_or_else(|| invalid(format!("{ty:?} weights are not supported")))?;
        let row_bytes = quant::row_bytes(ty, cols)
            .ok_or_else(|| invalid(format!("{cols} columns are not whole {ty:?} blocks")))?;
        if bytes.len() != rows * row_bytes {
            return Err(invalid(format!(
                "{} bytes for {rows} rows of {row_bytes} bytes of {ty:?}",
                bytes.len()
            )));
        }
        // The copy replaces the file's pages for the matrix products.
        let release = |r: std::ops::Range<usize>| {
            if let Some(part) = bytes.slice(r) {
                part.release_resident();
            }
        };
        let packed = PackedFormat::of(ty).filter(|_| repack).map(|fmt| {
            Arc::new(PackedWeight::pack_releasing(
                fmt,
                rows,
                cols / ty.block().0,
                &bytes,
                release,
            ))
        });
        let float = FloatFormat::of(ty).map(|fmt| {
            Arc::new(FloatPacked::pack_releasing(
                fmt, rows, cols, &bytes, release,
            ))
        });
        // Rows are read back from a packed copy when there is one; keeping
        // the original too would double a heap-held matrix (F32 from a
        // checkpoint, or one quantized while loading).
        let bytes = if packed.is_some() || float.is_some() {
            HostBytes::from(Vec::new())
        } else {
            bytes
        };
        Ok(Self {
            rows,
            cols,
            ty,
            bytes,
            row_bytes,
            packed,
            float,
            dequant,
        })
    }

    /// The matrix's bytes in the layout the kernels read ([`LAYOUT`]) and
    /// its stored format, when it was rearranged at load: what a later start
    /// can map and hand to [`CpuWeight::from_laid_out`] instead of
    /// rearranging again. `None` for a matrix kept in the file's layout.
    pub fn laid_out(&self) -> Option<(GgmlType, HostBytes)> {
        if let Some(p) = &self.packed {
            return Some((self.ty, p.data.clone()));
        }
        self.float.as_ref().map(|f| (self.ty, f.data.clone()))
    }

    /// A `[rows, cols]` matrix of `ty` from `bytes` that
    /// [`CpuWeight::laid_out`] gave for the same shape and format (usually a
    /// range of a memory-mapped file), used as they are: nothing is copied
    /// or rearranged. Bytes of any other length are refused; their content
    /// is not checked, which is the caller's part (the file's key and
    /// version).
    pub fn from_laid_out(rows: usize, cols: usize, ty: GgmlType, bytes: HostBytes) -> Result<Self> {
        let invalid = |msg: String| BackendError::Invalid {
            op: "upload_weight",
            msg,
        };
        let dequant = quant::block_dequantizer(ty)
            .filter(|_| ty != GgmlType::Q8K)
            .ok_or_else(|| invalid(format!("{ty:?} weights are not supported")))?;
        let row_bytes = quant::row_bytes(ty, cols)
            .ok_or_else(|| invalid(format!("{cols} columns are not whole {ty:?} blocks")))?;
        let len = bytes.len();
        let check = |size: Option<usize>| {
            if size == Some(len) {
                return Ok(());
            }
            Err(invalid(format!(
                "{len} bytes of {LAYOUT} for {rows} x {cols} of {ty:?}, where it takes {size:?}"
            )))
        };
        let groups = rows.div_ceil(super::packed::NR);
        let block_fmt = PackedFormat::of(ty).filter(|_| repack_enabled());
        let (packed, float) = match (block_fmt, FloatFormat::of(ty)) {
            (Some(fmt), _) => {
                let blocks = cols / ty.block().0;
                check(PackedWeight::size(fmt, rows, blocks))?;
                let p = PackedWeight {
                    fmt,
                    groups,
                    blocks,
                    data: bytes,
                };
                (Some(Arc::new(p)), None)
            }
            (None, Some(fmt)) => {
                check(FloatPacked::size(fmt, rows, cols))?;
                let f = FloatPacked {
                    fmt,
                    groups,
                    k: cols,
                    data: bytes,
                };
                (None, Some(Arc::new(f)))
            }
            (None, None) => {
                return Err(invalid(format!("{ty:?} weights have no rearranged layout")))
            }
        };
        Ok(Self {
            rows,
            cols,
            ty,
            bytes: HostBytes::from(Vec::new()),
            row_bytes,
            packed,
            float,
            dequant,
        })
    }

    /// The matrix with block formats kept in the file's row layout (no
    /// packed copy): what the per-row kernels compute from.
    #[cfg(test)]
    pub(super) fn unpacked(rows: usize, cols: usize, data: WeightData) -> Result<Self> {
        Self::new_with(rows, cols, data, false)
    }

    /// Writes rows `r0..r0 + out.len() / cols` as f32 into `out`.
    pub fn rows_f32(&self, r0: usize, out: &mut [f32]) {
        if let Some(p) = &self.packed {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                p.row_f32(r0 + r, row);
            }
            return;
        }
        if let Some(p) = &self.float {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                p.row_f32(r0 + r, row);
            }
            return;
        }
        let n = out.len() / self.cols;
        let src = &self.bytes[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
        quant::dequantize_with(self.dequant, self.ty, src, out);
    }
}
