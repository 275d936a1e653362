//! Writing GGUF files (version 3, data aligned to 32 bytes, the layout
//! [`crate::gguf::GgufFile`] and llama.cpp read).
//!
//! Two writers share one header encoder: [`GgufWriter`] builds a small file
//! in memory (test fixtures), and [`GgufStreamWriter`] writes a model of any
//! size tensor by tensor, as a conversion produces them, holding one tensor
//! at a time. GGUF puts the tensor directory (names, shapes, types, offsets)
//! before the data, and a converter learns the tensors one by one, so the
//! stream writer spools the data to a side file as tensors arrive and, at
//! [`GgufStreamWriter::finish`], writes the header and then appends the spool
//! (an in-kernel copy on Linux), aligning every tensor.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::gguf::{Value, DEFAULT_ALIGNMENT, MAGIC};
use crate::quant::GgmlType;
use crate::{ModelError, Result};

/// One tensor's directory entry.
struct Entry {
    name: String,
    /// GGUF order: `dims[0]` is the fastest-varying dimension.
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

/// The header (magic, counts, metadata, tensor directory), padded so the
/// data section starts aligned.
fn header(metadata: &[(String, Value)], tensors: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&(t.ty as u32).to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    out.resize(align(out.len() as u64) as usize, 0);
    out
}

/// Serialises a GGUF file in memory. Used by tests (and tools) to make small
/// fixture files without external scripts.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// Adds one metadata key.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds one tensor with GGUF-order dims and already-encoded bytes.
    pub fn tensor(&mut self, name: &str, dims: Vec<u64>, ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims, ty, data));
        self
    }

    /// The file's bytes (version 3, alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut offset = 0u64;
        let entries: Vec<Entry> = self
            .tensors
            .iter()
            .map(|(name, dims, ty, data)| {
                let e = Entry {
                    name: name.clone(),
                    dims: dims.clone(),
                    ty: *ty,
                    offset,
                };
                offset = align(offset + data.len() as u64);
                e
            })
            .collect();
        let mut out = header(&self.metadata, &entries);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(align(out.len() as u64) as usize, 0);
        }
        out
    }
}

/// Writes a GGUF file tensor by tensor; see the module documentation.
///
/// The data spool is `<path>.data`; it is removed by [`finish`](Self::finish)
/// and when the writer is dropped unfinished (a failed conversion leaves no
/// stray file beside the one it was writing).
pub struct GgufStreamWriter {
    path: PathBuf,
    spool_path: PathBuf,
    spool: Option<BufWriter<File>>,
    offset: u64,
    tensors: Vec<Entry>,
    names: HashSet<String>,
}

impl GgufStreamWriter {
    /// Starts a file at `path` (written at [`finish`](Self::finish)).
    pub fn create(path: &Path) -> Result<Self> {
        let mut spool_name = path.as_os_str().to_owned();
        spool_name.push(".data");
        let spool_path = PathBuf::from(spool_name);
        let file = File::create(&spool_path).map_err(|e| ModelError::io(&spool_path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            spool_path,
            spool: Some(BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            tensors: Vec::new(),
            names: HashSet::new(),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor of that name was added.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Tensors added so far.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor was added yet.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Appends a tensor of row-major `shape` whose bytes are `bytes` in
    /// encoding `ty`. The byte count must be what the shape takes in `ty`.
    pub fn add(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: &[u8]) -> Result<()> {
        let bad = |msg: String| ModelError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg,
        };
        if self.names.contains(name) {
            return Err(bad("written twice".into()));
        }
        if shape.is_empty() || shape.len() > 4 {
            return Err(bad(format!("{} dimensions", shape.len())));
        }
        let (block, block_bytes) = ty.block();
        let numel: usize = shape.iter().product();
        let row = shape.last().copied().unwrap_or(0);
        if !row.is_multiple_of(block) || numel / block * block_bytes != bytes.len() {
            return Err(bad(format!(
                "{} bytes do not hold {shape:?} in {ty:?}",
                bytes.len()
            )));
        }
        let spool = self
            .spool
            .as_mut()
            .ok_or_else(|| bad("the writer has finished".into()))?;
        let padded = align(self.offset + bytes.len() as u64);
        let pad = (padded - self.offset - bytes.len() as u64) as usize;
        spool
            .write_all(bytes)
            .and_then(|()| spool.write_all(&[0u8; DEFAULT_ALIGNMENT as usize][..pad]))
            .map_err(|e| ModelError::io(&self.spool_path, e))?;
        self.tensors.push(Entry {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            offset: self.offset,
        });
        self.names.insert(name.to_string());
        self.offset = padded;
        Ok(())
    }

    /// Appends an f32 tensor.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, shape, GgmlType::F32, &bytes)
    }

    /// Writes the header with `metadata` and the tensors added, makes the
    /// file durable and returns its size in bytes.
    pub fn finish(mut self, metadata: &[(String, Value)]) -> Result<u64> {
        let spool = self.spool.take().ok_or_else(|| ModelError::Format {
            path: self.path.clone(),
            msg: "the writer has finished".into(),
        })?;
        let spool = spool
            .into_inner()
            .map_err(|e| ModelError::io(&self.spool_path, e.into_error()))?;
        drop(spool);
        let head = header(metadata, &self.tensors);
        let io = |e| ModelError::io(&self.path, e);
        let mut out = File::create(&self.path).map_err(io)?;
        out.write_all(&head).map_err(io)?;
        let mut data =
            File::open(&self.spool_path).map_err(|e| ModelError::io(&self.spool_path, e))?;
        let copied = std::io::copy(&mut data, &mut out).map_err(io)?;
        if copied != self.offset {
            return Err(ModelError::Format {
                path: self.spool_path.clone(),
                msg: format!("holds {copied} bytes, {} were written", self.offset),
            });
        }
        out.sync_all().map_err(io)?;
        let _ = std::fs::remove_file(&self.spool_path);
        Ok(head.len() as u64 + self.offset)
    }
}

impl Drop for GgufStreamWriter {
    fn drop(&mut self) {
        self.spool.take();
        let _ = std::fs::remove_file(&self.spool_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn streamed_tensors_read_back_aligned_with_their_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = GgufStreamWriter::create(&path).unwrap();
        // 3 f32 values: 12 bytes, so the next tensor starts padded at 32.
        w.add_f32("norm.weight", &[3], &[1.0, -2.0, 0.5]).unwrap();
        let q8 = vec![7u8; 2 * 34];
        w.add("w", &[2, 32], GgmlType::Q8_0, &q8).unwrap();
        assert!(w.add_f32("norm.weight", &[1], &[0.0]).is_err(), "twice");
        assert!(w.add("short", &[2, 32], GgmlType::Q8_0, &q8[..34]).is_err());
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "k.ids".to_string(),
                Value::Array(vec![Value::U32(4), Value::U32(9)]),
            ),
        ];
        let size = w.finish(&meta).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert!(!dir.path().join("m.gguf.data").exists(), "spool removed");
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(
            g.get("k.ids"),
            Some(&Value::Array(vec![Value::U32(4), Value::U32(9)]))
        );
        assert_eq!(
            g.tensor_f32("norm.weight").unwrap().data,
            vec![1.0, -2.0, 0.5]
        );
        let info = g.tensor_info("w").unwrap();
        assert_eq!(info.shape(), vec![2, 32]);
        assert_eq!(info.offset % DEFAULT_ALIGNMENT, 0);
        assert_eq!(g.tensor_bytes(info), &q8[..]);
    }

    #[test]
    fn an_unfinished_writer_leaves_no_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = GgufStreamWriter::create(&path).unwrap();
        w.add_f32("a", &[1], &[1.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
