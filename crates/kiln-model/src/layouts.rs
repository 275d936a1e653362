//! Weight matrices in a backend's own layout, written once to a file and
//! mapped by later starts.
//!
//! The CPU backend rearranges every matrix of a block format (and every
//! float matrix) into interleaved groups of rows at upload
//! ([`kiln_backend::Backend::weight_layout`]). That copy costs a pass over
//! the whole model at every start; stored once, a later start maps the file
//! and hands each matrix's range of it to the backend as it is, so loading
//! is a map, and processes serving the same model share the pages.
//!
//! The file (`weights.layout` in an entry of the prepared-model cache,
//! `kiln_sources::prepared`, whose key names the model file, the settings it
//! was loaded with and the layout):
//!
//! ```text
//! 0   b"KILNLAYT"                     magic
//! 8   u32 FORMAT_VERSION, u32 0
//! 16  u64 index offset, u64 index length, u64 file length   (little-endian)
//! 40  zeros up to DATA_START
//! ... each matrix's bytes, at a multiple of ALIGN
//! ... the index: JSON {layout, key, entries: [{name, part, ty, rows, cols,
//!     offset, len}]}
//! ```
//!
//! A file is used only when its magic, version, recorded length (the file's
//! own), layout name and key are the ones expected and every entry lies
//! inside its data; each matrix is used only when its name, part, format,
//! rows, columns and byte count are those the loader asks for. Anything
//! else makes the file stale ([`Layouts::finish`]): the matrix is rearranged
//! from the model as usual, so a wrong file costs time, never a wrong
//! answer. The bytes themselves are not checksummed (that would read the
//! whole model at every start); the file is written to a `.partial`
//! directory and renamed when whole, like a prepared model.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_backend::{Backend, BackendError, GgmlType, HostBytes, WeightData};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

const MAGIC: &[u8; 8] = b"KILNLAYT";
/// Version of the file's framing (not of the layout inside, which the
/// layout's name carries).
const FORMAT_VERSION: u32 = 1;
/// Where the first matrix starts.
const DATA_START: u64 = 64;
/// Matrices start at multiples of a cache line.
const ALIGN: u64 = 64;
/// An index larger than this is not one of ours.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// One matrix in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The tensor's name in the model.
    name: String,
    /// Which upload of that tensor (fused projections are uploaded once per
    /// part they are split into), from 0.
    part: u32,
    /// The stored format (ggml's type number).
    ty: u32,
    rows: usize,
    cols: usize,
    offset: u64,
    len: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    layout: String,
    key: String,
    entries: Vec<Entry>,
}

/// How a load treats weights in the backend's layout.
pub enum Layouts {
    /// The backend rearranges every matrix it takes (no file).
    Off,
    /// Matrices come from a file an earlier start wrote.
    Mapped(LayoutFile),
    /// The backend rearranges every matrix, and what it made is kept for
    /// [`LayoutRecorder::write`].
    Record(LayoutRecorder),
}

impl Layouts {
    /// Uploads matrix `name` (`rows x cols`, `data` as the source gives it)
    /// to `backend`: from the mapped file when it holds it, else as usual.
    pub(crate) fn upload<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        rows: usize,
        cols: usize,
        data: WeightData,
    ) -> Result<B::Weight, BackendError> {
        match self {
            Layouts::Off => backend.upload_weight(rows, cols, data),
            Layouts::Mapped(file) => file.upload(backend, name, rows, cols, data),
            Layouts::Record(rec) => {
                let part = rec.parts.next(name);
                let w = backend.upload_weight(rows, cols, data)?;
                if let Some((ty, bytes)) = backend.laid_out(&w) {
                    rec.push(Recorded {
                        name: name.to_string(),
                        part,
                        ty,
                        rows,
                        cols,
                        bytes,
                    });
                }
                Ok(w)
            }
        }
    }

    /// After the load: `Err` with the reason when a mapped file did not
    /// match the model (some of its matrices were rearranged again, or it
    /// holds matrices the model did not ask for), so the caller replaces it.
    pub fn finish(&self) -> std::result::Result<(), String> {
        match self {
            Layouts::Mapped(file) => file.finish(),
            Layouts::Off | Layouts::Record(_) => Ok(()),
        }
    }
}

/// Counts the uploads of each tensor name (the `part` of an entry).
#[derive(Default)]
struct Parts(Mutex<HashMap<String, u32>>);

impl Parts {
    fn next(&self, name: &str) -> u32 {
        let Ok(mut seen) = self.0.lock() else {
            return u32::MAX;
        };
        let n = seen.entry(name.to_string()).or_insert(0);
        *n += 1;
        *n - 1
    }
}

/// A file of weights in a backend's layout, mapped.
pub struct LayoutFile {
    path: PathBuf,
    map: Arc<Mmap>,
    entries: HashMap<(String, u32), Entry>,
    parts: Parts,
    /// Entries handed to the backend.
    used: Mutex<usize>,
    /// Why the file does not match the model, once something did not.
    stale: Mutex<Option<String>>,
}

fn ggml_type_of(data: &WeightData) -> GgmlType {
    match data {
        WeightData::F32(_) => GgmlType::F32,
        WeightData::Ggml { ty, .. } => *ty,
    }
}

impl LayoutFile {
    /// Maps the file at `path`, checking that it is whole and holds `layout`
    /// for cache key `key`; an error names the file and what is wrong.
    pub fn open(path: &Path, layout: &str, key: &str) -> Result<Self> {
        let bad = |msg: String| ModelError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and shared; the file is an entry of
        // the prepared-model cache, which is never written in place (a
        // new version is a new directory renamed into place), and this
        // process holds the entry's lock shared, so it is not removed
        // while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let len = map.len() as u64;
        if len < DATA_START {
            return Err(bad(format!(
                "is {len} bytes, shorter than its header: truncated"
            )));
        }
        if &map[..8] != MAGIC {
            return Err(bad("not a kiln weight-layout file (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "framing version {version}, this kiln reads {FORMAT_VERSION}"
            )));
        }
        let (index_at, index_len, recorded) = (u64_at(16), u64_at(24), u64_at(32));
        if recorded != len {
            return Err(bad(format!(
                "is {len} bytes where its header says {recorded}: truncated or overwritten"
            )));
        }
        let index_end = index_at.checked_add(index_len);
        if index_at < DATA_START || index_end != Some(len) || index_len > MAX_INDEX_BYTES {
            return Err(bad(format!(
                "its index ({index_len} bytes at {index_at}) is not the end of the file"
            )));
        }
        let index: Index = serde_json::from_slice(&map[index_at as usize..len as usize])
            .map_err(|e| bad(format!("its index is not valid: {e}")))?;
        if index.layout != layout {
            return Err(bad(format!(
                "holds layout '{}', where this kiln computes with '{layout}'",
                index.layout
            )));
        }
        if index.key != key {
            return Err(bad(format!(
                "was written for cache key {}, not {key}",
                index.key
            )));
        }
        let mut entries = HashMap::with_capacity(index.entries.len());
        for e in index.entries {
            let inside = e
                .offset
                .checked_add(e.len)
                .is_some_and(|end| e.offset >= DATA_START && end <= index_at);
            if !inside || e.offset % ALIGN != 0 || GgmlType::from_u32(e.ty).is_none() {
                return Err(bad(format!(
                    "entry {} (part {}) is not a matrix inside the file",
                    e.name, e.part
                )));
            }
            let id = (e.name.clone(), e.part);
            if entries.insert(id, e).is_some() {
                return Err(bad("an entry appears twice".into()));
            }
        }
        Ok(LayoutFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            entries,
            parts: Parts::default(),
            used: Mutex::new(0),
            stale: Mutex::new(None),
        })
    }

    /// The mapped file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Matrices the file holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no matrix.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn mark_stale(&self, why: String) {
        if let Ok(mut s) = self.stale.lock() {
            s.get_or_insert(why);
        }
    }

    fn upload<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        rows: usize,
        cols: usize,
        data: WeightData,
    ) -> Result<B::Weight, BackendError> {
        let part = self.parts.next(name);
        let ty = ggml_type_of(&data);
        let Some(e) = self.entries.get(&(name.to_string(), part)) else {
            let w = backend.upload_weight(rows, cols, data)?;
            if backend.laid_out(&w).is_some() {
                self.mark_stale(format!("it does not hold {name} (part {part})"));
            }
            return Ok(w);
        };
        if (e.ty, e.rows, e.cols) != (ty as u32, rows, cols) {
            self.mark_stale(format!(
                "its {name} (part {part}) is {} x {} of type {}, the model's {rows} x {cols} {ty:?}",
                e.rows, e.cols, e.ty
            ));
            return backend.upload_weight(rows, cols, data);
        }
        let owner: kiln_backend::ByteOwner = self.map.clone();
        let range = e.offset as usize..(e.offset + e.len) as usize;
        // SAFETY: `map` is a read-only shared map of a file (see `open`).
        let bytes = unsafe { HostBytes::file_mapped(owner, range) };
        let Some(bytes) = bytes else {
            // Checked in `open`; kept as a fallback, not a panic.
            self.mark_stale(format!("its {name} (part {part}) lies outside it"));
            return backend.upload_weight(rows, cols, data);
        };
        match backend.upload_laid_out(rows, cols, ty, bytes) {
            Ok(w) => {
                if let Ok(mut n) = self.used.lock() {
                    *n += 1;
                }
                Ok(w)
            }
            Err(err) => {
                self.mark_stale(format!("its {name} (part {part}): {err}"));
                backend.upload_weight(rows, cols, data)
            }
        }
    }

    fn finish(&self) -> std::result::Result<(), String> {
        if let Some(why) = self.stale.lock().ok().and_then(|s| s.clone()) {
            return Err(why);
        }
        let used = self.used.lock().map_or(0, |n| *n);
        if used != self.entries.len() {
            return Err(format!(
                "it holds {} matrices, the model took {used} of them",
                self.entries.len()
            ));
        }
        Ok(())
    }
}

/// One matrix the backend rearranged, kept for writing.
struct Recorded {
    name: String,
    part: u32,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Shares the backend's copy; nothing is duplicated.
    bytes: HostBytes,
}

/// The matrices a load rearranged, to write as a layout file.
#[derive(Default)]
pub struct LayoutRecorder {
    parts: Parts,
    recorded: Mutex<Vec<Recorded>>,
}

impl LayoutRecorder {
    fn push(&self, r: Recorded) {
        if let Ok(mut v) = self.recorded.lock() {
            v.push(r);
        }
    }

    /// Matrices recorded.
    pub fn len(&self) -> usize {
        self.recorded.lock().map_or(0, |v| v.len())
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the recorded matrices to `path` as a layout file of `layout`
    /// for cache key `key`, durably (the caller renames it into place).
    /// Returns the file's size.
    pub fn write(&self, path: &Path, layout: &str, key: &str) -> Result<u64> {
        let io = |e| ModelError::io(path, e);
        let recorded = self.recorded.lock().map_err(|_| ModelError::Format {
            path: path.to_path_buf(),
            msg: "a thread recording weights panicked".into(),
        })?;
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; DATA_START as usize]).map_err(io)?;
        let mut at = DATA_START;
        let mut entries = Vec::with_capacity(recorded.len());
        for r in recorded.iter() {
            let pad = at.next_multiple_of(ALIGN) - at;
            out.write_all(&[0u8; ALIGN as usize][..pad as usize])
                .map_err(io)?;
            at += pad;
            out.write_all(&r.bytes).map_err(io)?;
            entries.push(Entry {
                name: r.name.clone(),
                part: r.part,
                ty: r.ty as u32,
                rows: r.rows,
                cols: r.cols,
                offset: at,
                len: r.bytes.len() as u64,
            });
            at += r.bytes.len() as u64;
        }
        let index = Index {
            layout: layout.to_string(),
            key: key.to_string(),
            entries,
        };
        let json = serde_json::to_vec(&index).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            msg: format!("cannot write the index: {e}"),
        })?;
        out.write_all(&json).map_err(io)?;
        let total = at + json.len() as u64;
        let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
        let mut head = Vec::with_capacity(40);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        for v in [at, json.len() as u64, total] {
            head.extend_from_slice(&v.to_le_bytes());
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&head).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(total)
    }
}
