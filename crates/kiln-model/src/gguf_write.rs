//! Writing GGUF files (version 3, data aligned to 32 bytes, the layout
//! [`crate::gguf::GgufFile`] and llama.cpp read).
//!
//! Two writers share one header encoder: [`GgufWriter`] builds a small file
//! in memory (test fixtures), and [`GgufStreamWriter`] writes a model of any
//! size tensor by tensor, as a conversion produces them, holding one tensor
//! at a time. GGUF puts the tensor directory (names, shapes, types, offsets)
//! before the data, and a converter learns the tensors one by one, so the
//! stream writer leaves room for the header at the start of the file, writes
//! the data after it as tensors arrive and, at [`GgufStreamWriter::finish`],
//! writes the header into that room, filled out to its end by a padding key
//! ([`PADDING_KEY`]) so the data starts where it was written. The data is
//! written once and the disk holds one copy of it: a 13.7 GB prepared file
//! needs 13.7 GB free, not twice that. Only a header larger than the room
//! (which [`header_room`] sizes from the tensors expected, with room to
//! spare) costs a copy into a second file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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

/// The metadata key whose string fills a streamed file's header out to the
/// room left for it (readers ignore keys they do not know).
pub const PADDING_KEY: &str = "kiln.header_padding";

/// Header bytes a [`GgufStreamWriter`] leaves per tensor expected, for its
/// directory entry and keys added at the end that name it: an entry takes
/// the name and about 40 bytes, so this is more than twice what a tensor
/// with a 60-byte name needs.
const ROOM_PER_TENSOR: u64 = 256;

/// The header room to create a [`GgufStreamWriter`] with when `metadata` is
/// the metadata known before the tensors (a tokenizer's vocabulary is the
/// bulk of it) and about `tensors` tensors will be added: the metadata's
/// encoded size, [`ROOM_PER_TENSOR`] per tensor and 16 KiB, rounded up to a
/// 4 KiB page so the data starts page-aligned. Too little room costs only
/// a copy at [`GgufStreamWriter::finish`].
pub fn header_room(metadata: &[(String, Value)], tensors: usize) -> u64 {
    let known = encode_header(metadata, &[]).len() as u64;
    (known + ROOM_PER_TENSOR * tensors as u64 + (16 << 10)).div_ceil(4096) * 4096
}

/// The header (magic, counts, metadata, tensor directory), padded so the
/// data section starts aligned.
fn header(metadata: &[(String, Value)], tensors: &[Entry]) -> Vec<u8> {
    let mut out = encode_header(metadata, tensors);
    out.resize(align(out.len() as u64) as usize, 0);
    out
}

/// The header of exactly `room` bytes: `metadata` and a [`PADDING_KEY`]
/// string as long as fills it (`room` is aligned, so the data starts right
/// after it); `None` when the header does not fit.
fn header_filling(metadata: &[(String, Value)], tensors: &[Entry], room: u64) -> Option<Vec<u8>> {
    let mut with_pad = metadata.to_vec();
    with_pad.push((PADDING_KEY.to_string(), Value::String(String::new())));
    let bare = encode_header(&with_pad, tensors).len() as u64;
    let fill = usize::try_from(room.checked_sub(bare)?).ok()?;
    if let Some((_, Value::String(pad))) = with_pad.last_mut() {
        *pad = " ".repeat(fill);
    }
    let head = encode_header(&with_pad, tensors);
    debug_assert_eq!(head.len() as u64, room);
    Some(head)
}

/// The header's bytes, unpadded.
fn encode_header(metadata: &[(String, Value)], tensors: &[Entry]) -> Vec<u8> {
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
/// A writer dropped before [`finish`](Self::finish) removes its file (a
/// failed conversion leaves no partial model behind).
pub struct GgufStreamWriter {
    path: PathBuf,
    /// The file, positioned after the last tensor's data.
    out: Option<BufWriter<File>>,
    /// Bytes left for the header: the data section starts here.
    room: u64,
    /// The data written so far (aligned), relative to `room`.
    offset: u64,
    tensors: Vec<Entry>,
    names: HashSet<String>,
    finished: bool,
}

impl GgufStreamWriter {
    /// Starts the file at `path`, its data written after `room` bytes kept
    /// for the header (a multiple of 4096: [`header_room`] says how much).
    pub fn create(path: &Path, room: u64) -> Result<Self> {
        let room = room.div_ceil(4096) * 4096;
        let io = |e| ModelError::io(path, e);
        // Readable too: a header that outgrows its room copies the data back.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        file.seek(SeekFrom::Start(room)).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            room,
            offset: 0,
            tensors: Vec::new(),
            names: HashSet::new(),
            finished: false,
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
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| bad("the writer has finished".into()))?;
        let padded = align(self.offset + bytes.len() as u64);
        let pad = (padded - self.offset - bytes.len() as u64) as usize;
        out.write_all(bytes)
            .and_then(|()| out.write_all(&[0u8; DEFAULT_ALIGNMENT as usize][..pad]))
            .map_err(|e| ModelError::io(&self.path, e))?;
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
        let out = self.out.take().ok_or_else(|| ModelError::Format {
            path: self.path.clone(),
            msg: "the writer has finished".into(),
        })?;
        let io = |e| ModelError::io(&self.path, e);
        let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
        let size = match header_filling(metadata, &self.tensors, self.room) {
            Some(head) => {
                file.seek(SeekFrom::Start(0)).map_err(io)?;
                file.write_all(&head).map_err(io)?;
                file.sync_all().map_err(io)?;
                self.room + self.offset
            }
            None => self.rewrite(file, metadata)?,
        };
        self.finished = true;
        Ok(size)
    }

    /// The header did not fit its room: the file again, header first and
    /// the data copied after it, in place of the first.
    fn rewrite(&self, mut file: File, metadata: &[(String, Value)]) -> Result<u64> {
        let head = header(metadata, &self.tensors);
        // Worth seeing: the disk holds two copies of the data until the end.
        tracing::info!(
            "{}: a header of {} bytes outgrew its {} bytes of room; copying the data",
            self.path.display(),
            head.len(),
            self.room
        );
        let mut name = self.path.as_os_str().to_owned();
        name.push(".rewrite");
        let tmp = PathBuf::from(name);
        let io = |e| ModelError::io(&tmp, e);
        let result = (|| {
            let mut again = File::create(&tmp).map_err(io)?;
            again.write_all(&head).map_err(io)?;
            file.seek(SeekFrom::Start(self.room)).map_err(io)?;
            let copied =
                std::io::copy(&mut (&mut file).take(self.offset), &mut again).map_err(io)?;
            if copied != self.offset {
                return Err(ModelError::Format {
                    path: self.path.clone(),
                    msg: format!("holds {copied} bytes of data, {} were written", self.offset),
                });
            }
            again.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &self.path).map_err(io)?;
            Ok(head.len() as u64 + self.offset)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl Drop for GgufStreamWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.out.take();
            let _ = std::fs::remove_file(&self.path);
        }
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
        let room = header_room(&[], 2);
        let mut w = GgufStreamWriter::create(&path, room).unwrap();
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
        // Written in place: the data is where it was streamed, after the room.
        assert_eq!(size, room + 32 + 2 * 34 + 28);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let g = GgufFile::open(&path).unwrap();
        assert!(matches!(g.get(PADDING_KEY), Some(Value::String(_))));
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
    fn a_header_larger_than_its_room_is_written_before_a_copy_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = GgufStreamWriter::create(&path, 1).unwrap();
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        w.add_f32("a", &[1000], &values).unwrap();
        w.add_f32("b", &[3], &[1.0, 2.0, 3.0]).unwrap();
        // 5000 bytes of metadata cannot fit in one 4096-byte page.
        let meta = vec![("big".to_string(), Value::String("x".repeat(5000)))];
        let size = w.finish(&meta).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no copy left"
        );
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get(PADDING_KEY), None);
        assert_eq!(g.get_str("big").map(str::len), Some(5000));
        assert_eq!(g.tensor_f32("a").unwrap().data, values);
        assert_eq!(g.tensor_f32("b").unwrap().data, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn an_unfinished_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = GgufStreamWriter::create(&path, 4096).unwrap();
        w.add_f32("a", &[1], &[1.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
