//! Reader for GGUF files (versions 2 and 3), the single-file format llama.cpp
//! uses for weights, hyper-parameters and tokenizer.
//!
//! The file is memory-mapped; the header (metadata and tensor directory) is
//! parsed eagerly, tensor data is read lazily from the map when a weight is
//! asked for, so each byte of weights is read once. Every length and offset
//! in the header is checked against the file size before use: a truncated or
//! corrupt file is an error naming the file and the tensor, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use memmap2::Mmap;

pub use crate::gguf_write::{GgufStreamWriter, GgufWriter};
use crate::quant::{self, GgmlType};
use crate::{HostTensor, ModelError, Result};

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bound on any single header string or array, so a corrupt length
/// cannot make us allocate gigabytes before noticing.
const MAX_HEADER_ITEMS: u64 = 1 << 28;

/// One metadata value. Arrays keep their element values.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer of any width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool; integers 0/1 are accepted too.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    /// The elements, when the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major order (slowest dimension first), as PyTorch prints it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed header plus the memory map of the data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: self.path.to_path_buf(),
            msg: format!("{} (at byte {})", what.into(), self.pos),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err(format!("file truncated: needed {n} more bytes")))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > MAX_HEADER_ITEMS || n as usize > self.buf.len() {
            return Err(self.err(format!("implausible {what} length {n}")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let b = self.bytes(n)?;
        // Tokenizer vocabularies occasionally hold invalid UTF-8 pieces; keep them lossily
        // rather than refusing the whole file.
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("metadata arrays nested too deeply"));
                }
                let elem_ty = self.u32()?;
                let n = self.len("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file. Tensor data is validated for bounds, not read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only; a file modified underneath us by another process
        // could change the bytes we read, which is the accepted risk of every mmap loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &mmap[..],
            pos: 0,
            path: &path,
        };
        if c.buf.len() < 4 || &c.buf[..4] != MAGIC {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        c.pos = 4;
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version} (2 and 3 are)")));
        }
        let n_tensors = c.len("tensor count")?;
        let n_kv = c.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let raw_ty = c.u32()?;
            let ggml_type = GgmlType::from_u32(raw_ty)
                .ok_or_else(|| c.err(format!("tensor '{name}' has unknown ggml type {raw_ty}")))?;
            let offset = c.u64()?;
            infos.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(c.err(format!("bad general.alignment {alignment}")));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = BTreeMap::new();
        for info in infos {
            let nbytes = tensor_nbytes(&info).ok_or_else(|| ModelError::Tensor {
                path: path.clone(),
                tensor: info.name.clone(),
                msg: format!(
                    "{} elements do not fill whole {:?} blocks",
                    info.numel(),
                    info.ggml_type
                ),
            })?;
            let end = data_start
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(nbytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(ModelError::Tensor {
                    path: path.clone(),
                    tensor: info.name.clone(),
                    msg: format!(
                        "data ({nbytes} bytes at offset {}) runs past the end of the file ({file_len} bytes): the file is truncated or corrupt",
                        info.offset
                    ),
                });
            }
            tensors.insert(info.name.clone(), info);
        }
        Ok(Self {
            path,
            mmap: Arc::new(mmap),
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string metadata value by key.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// An integer metadata value by key.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// A float metadata value by key.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// The raw bytes of a tensor, bounds already checked at open.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // Bounds were validated in `parse` for every tensor in the directory.
        let start = (self.data_start + info.offset) as usize;
        let len = tensor_nbytes(info).unwrap_or(0) as usize;
        &self.mmap[start..start + len]
    }

    /// A tensor's bytes as a shared range of the memory map: no copy, and the
    /// map stays alive as long as the weight does.
    pub fn tensor_shared(&self, info: &TensorInfo) -> kiln_backend::HostBytes {
        let start = (self.data_start + info.offset) as usize;
        let len = tensor_nbytes(info).unwrap_or(0) as usize;
        let owner: kiln_backend::ByteOwner = self.mmap.clone();
        // SAFETY: `Mmap::map` maps the file shared and read-only, so its
        // pages can be dropped and read back from the file.
        unsafe { kiln_backend::HostBytes::file_mapped(owner, start..start + len) }
            .expect("tensor bounds were validated when the file was opened")
    }

    /// The directory entry of a tensor, or an error naming the file and tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Reads a tensor, dequantizing it to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(info);
        let data =
            quant::dequantize(info.ggml_type, bytes, info.numel() as usize).map_err(|msg| {
                ModelError::Tensor {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    msg,
                }
            })?;
        Ok(HostTensor::new(info.shape(), data))
    }
}

fn tensor_nbytes(info: &TensorInfo) -> Option<u64> {
    let (block, bytes) = info.ggml_type.block();
    let n = info.numel();
    if !n.is_multiple_of(block as u64) {
        return None;
    }
    // Quantized blocks run along the fastest dimension, so each row must be whole blocks.
    if info
        .dims
        .first()
        .is_some_and(|&d| !d.is_multiple_of(block as u64))
    {
        return None;
    }
    n.checked_div(block as u64)?.checked_mul(bytes as u64)
}
