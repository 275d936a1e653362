//! The element types of a PyTorch checkpoint and the reading of one tensor:
//! where its elements are in the file, the checks that its view fits in its
//! storage, and the copy of a (possibly strided) view into row-major f32.

use std::ops::Range;
use std::rc::Rc;

use half::{bf16, f16};
use rayon::prelude::*;

/// A tensor may have more elements than its storage (stride-0 broadcasts)
/// only up to this many, so a tiny corrupt file cannot demand a huge buffer.
const MAX_BROADCAST_NUMEL: usize = 1 << 24;

/// The element type of a tensor in a PyTorch checkpoint that kiln can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// PyTorch's name for it (`float32`, `bfloat16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }

    /// The dtype of a legacy typed storage class (`FloatStorage`, …).
    pub(super) fn from_storage_class(class: &str) -> Option<Self> {
        Some(match class {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" | "UntypedStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// The dtype named by a `torch.<name>` attribute (`float32`, `half`, …).
    pub(super) fn from_attr(name: &str) -> Option<Self> {
        Some(match name {
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "float64" | "double" => Self::F64,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            _ => return None,
        })
    }

    /// Decodes one little-endian element; `b` has exactly `self.size()` bytes.
    fn decode(self, b: &[u8]) -> f32 {
        fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(&b[..N]);
            a
        }
        match self {
            Self::F32 => f32::from_le_bytes(arr(b)),
            Self::F16 => f16::from_le_bytes(arr(b)).to_f32(),
            Self::BF16 => bf16::from_le_bytes(arr(b)).to_f32(),
            Self::F64 => f64::from_le_bytes(arr(b)) as f32,
            Self::I64 => i64::from_le_bytes(arr(b)) as f32,
            Self::I32 => i32::from_le_bytes(arr(b)) as f32,
            Self::I16 => i16::from_le_bytes(arr(b)) as f32,
            Self::I8 => b[0] as i8 as f32,
            Self::U8 => b[0] as f32,
            Self::Bool => (b[0] != 0) as u8 as f32,
        }
    }

    /// Decodes a run of contiguous elements, in parallel for large runs.
    fn decode_all(self, bytes: &[u8]) -> Vec<f32> {
        const CHUNK: usize = 1 << 16;
        let size = self.size();
        let mut out = vec![0f32; bytes.len() / size];
        if out.len() <= CHUNK {
            self.decode_into(bytes, &mut out);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * size))
                .for_each(|(o, b)| self.decode_into(b, o));
        }
        out
    }

    /// Decodes `out.len()` elements from `bytes`, one loop per dtype.
    fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        fn run<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
                let mut a = [0u8; N];
                a.copy_from_slice(b);
                *o = f(a);
            }
        }
        match self {
            Self::F32 => run(bytes, out, f32::from_le_bytes),
            Self::F16 => run(bytes, out, |b| f16::from_le_bytes(b).to_f32()),
            Self::BF16 => run(bytes, out, |b| bf16::from_le_bytes(b).to_f32()),
            Self::F64 => run(bytes, out, |b| f64::from_le_bytes(b) as f32),
            Self::I64 => run(bytes, out, |b| i64::from_le_bytes(b) as f32),
            Self::I32 => run(bytes, out, |b| i32::from_le_bytes(b) as f32),
            Self::I16 => run(bytes, out, |b| i16::from_le_bytes(b) as f32),
            Self::I8 => run(bytes, out, |[b]| b as i8 as f32),
            Self::U8 => run(bytes, out, |[b]| b as f32),
            Self::Bool => run(bytes, out, |[b]| (b != 0) as u8 as f32),
        }
    }
}

/// PyTorch dtypes kiln knows by name but does not read.
pub(super) const OTHER_DTYPES: &[&str] = &[
    "complex32",
    "complex64",
    "complex128",
    "chalf",
    "cfloat",
    "cdouble",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
];

/// A tensor's element type as the checkpoint declares it.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Elem {
    Known(TorchDtype),
    /// A dtype kiln does not read, by its PyTorch name.
    Other(Rc<str>),
}

impl Elem {
    pub(super) fn name(&self) -> &str {
        match self {
            Elem::Known(d) => d.name(),
            Elem::Other(n) => n,
        }
    }
}

/// Where one tensor's elements are in the file.
#[derive(Clone, Debug)]
pub(super) struct TensorEntry {
    /// `Err(name)` for a dtype kiln does not read.
    pub(super) dtype: std::result::Result<TorchDtype, String>,
    pub(super) shape: Vec<usize>,
    /// In elements, one per dimension.
    pub(super) stride: Vec<usize>,
    /// In elements, from the start of the storage.
    pub(super) offset: usize,
    /// The storage's bytes, as a range of the file.
    pub(super) storage: Range<usize>,
    pub(super) storage_key: String,
}

/// Checks that a tensor's view fits in its storage.
pub(super) fn check_tensor(e: &TensorEntry) -> std::result::Result<(), String> {
    let numel = numel(&e.shape).ok_or("its shape has more elements than memory can hold")?;
    let Ok(dtype) = e.dtype else {
        return Ok(()); // not readable anyway; get() says so
    };
    let storage_elems = e.storage.len() / dtype.size();
    if numel == 0 {
        return Ok(());
    }
    if numel > storage_elems.max(MAX_BROADCAST_NUMEL) {
        return Err(format!(
            "shape {:?} has {numel} elements, far more than its storage '{}' ({storage_elems})",
            e.shape, e.storage_key
        ));
    }
    let last = e
        .shape
        .iter()
        .zip(&e.stride)
        .try_fold(e.offset, |acc, (&n, &s)| {
            acc.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or("its strides overflow")?;
    if last >= storage_elems {
        return Err(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches element {last}, but storage '{}' \
             holds {storage_elems} {} elements",
            e.offset,
            e.shape,
            e.stride,
            e.storage_key,
            dtype.name()
        ));
    }
    Ok(())
}

/// The product of a shape, or None on overflow.
pub(super) fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
}

/// Whether a view is the row-major layout of its shape.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Reads a tensor's elements as row-major f32.
pub(super) fn materialise(file: &[u8], e: &TensorEntry) -> std::result::Result<Vec<f32>, String> {
    let dtype = e.dtype.clone().map_err(|other| {
        format!(
            "dtype {other} is not supported (kiln reads float32, float16, bfloat16, float64, \
             int64, int32, int16, int8, uint8 and bool tensors)"
        )
    })?;
    let storage = file
        .get(e.storage.clone())
        .ok_or("storage lies outside the file")?;
    let n = numel(&e.shape).ok_or("shape overflows")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let size = dtype.size();
    if is_contiguous(&e.shape, &e.stride) {
        let start = e.offset.checked_mul(size).ok_or("offset overflows")?;
        let bytes = n
            .checked_mul(size)
            .and_then(|len| storage.get(start..start.checked_add(len)?))
            .ok_or("view lies outside its storage")?;
        return Ok(dtype.decode_all(bytes));
    }
    gather(storage, dtype, e).ok_or_else(|| "view lies outside its storage".into())
}

/// Copies a strided view element by element into row-major order.
fn gather(storage: &[u8], dtype: TorchDtype, e: &TensorEntry) -> Option<Vec<f32>> {
    let size = dtype.size();
    let element = |i: usize| -> Option<f32> {
        let start = i.checked_mul(size)?;
        Some(dtype.decode(storage.get(start..start.checked_add(size)?)?))
    };
    let mut out = Vec::with_capacity(numel(&e.shape)?);
    let Some((&inner_n, outer_shape)) = e.shape.split_last() else {
        out.push(element(e.offset)?);
        return Some(out);
    };
    let (&inner_stride, outer_stride) = e.stride.split_last()?;
    let mut index = vec![0usize; outer_shape.len()];
    loop {
        let base = index
            .iter()
            .zip(outer_stride)
            .try_fold(e.offset, |acc, (&i, &s)| acc.checked_add(i.checked_mul(s)?))?;
        for j in 0..inner_n {
            out.push(element(base.checked_add(j.checked_mul(inner_stride)?)?)?);
        }
        // Advance the outer index like an odometer; done when it wraps.
        let mut d = outer_shape.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer_shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(!is_contiguous(&[2, 3], &[0, 1]));
    }
}
