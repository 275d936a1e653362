//! Weight matrices in a backend's own layout, written once to a file and
//! mapped by later starts.
//!
//! The CPU backend rearranges every matrix of a block format (and every
//! float matrix) into interleaved groups of rows at upload
//! ([`kiln_backend::Backend::weight_layout`]). That copy costs a pass over
//! the whole model at every start; stored once, a later start maps the file
//! and hands each matrix's range of it to the backend as it is, so loading
//! is a map, and processes serving the same model share the pages. The
//! first start streams ([`LayoutRecorder::streaming`]): each matrix goes to
//! the file as soon as the backend has rearranged it, and the backend's
//! copy is swapped for the file's map, so that start too holds one matrix
//! at a time and serves from the file.
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
//! ... each matrix's bytes, at a multiple of ALIGN (of HUGE_PAGE for a
//!     matrix of at least that size, after a hole)
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
/// Matrices start at multiples of a cache line (what a reader requires).
const ALIGN: u64 = 64;
/// A matrix of at least this many bytes starts at a multiple of it (the
/// file has a hole before it), so that the page cache can hold it in 2 MiB
/// folios and a map of the file can give the kernels 2 MiB pages: the
/// page cache takes a write's folio sizes from its offset and length, and
/// only a folio that starts on a 2 MiB boundary of the file can be mapped
/// as one page. Written at 64-byte offsets, 559 MB of a Llama-3.2-1B-shaped
/// Q4_0's 805 ended up on 2 MiB pages; placed so, 637-668 MB.
const HUGE_PAGE: u64 = 2 << 20;

/// Where a matrix of `len` bytes goes when the file's data so far ends at
/// `at`: the next multiple of [`HUGE_PAGE`] for one that fills at least
/// a page, of [`ALIGN`] for a smaller one.
fn place(at: u64, len: u64) -> u64 {
    at.next_multiple_of(if len >= HUGE_PAGE { HUGE_PAGE } else { ALIGN })
}
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
                let taken = byte_range(&data);
                let w = backend.upload_weight(rows, cols, data)?;
                if let Some(stream) = &rec.stream {
                    let (w, streamed) = stream.append(backend, name, part, rows, cols, w);
                    if let (true, Some(packed)) = (streamed, &rec.packed) {
                        packed.taken(name, taken);
                    }
                    return Ok(w);
                }
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

/// The address range of a matrix's bytes as the loader hands them over,
/// which tells [`crate::prepared`] which of the tensors it read ended up in
/// the layout file.
fn byte_range(data: &WeightData) -> std::ops::Range<usize> {
    let bytes: &[u8] = match data {
        WeightData::F32(v) => bytemuck_f32(v),
        WeightData::Ggml { bytes, .. } => bytes,
    };
    let start = bytes.as_ptr() as usize;
    start..start + bytes.len()
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 slice is a valid byte slice of four times its length.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
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
    /// The matrices the model file leaves to this file (a packed prepared
    /// model, [`crate::prepared`]): one of them it does not hold is an
    /// error, not rearranged from the model's (placeholder) bytes.
    required: std::collections::HashSet<String>,
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
        // The kernels stream these pages at every decode step: on 2 MiB
        // pages where the kernel and filesystem grant them, as a weight
        // packed in memory is (`kiln_backend::advise_huge_pages`). A hint
        // only, so a refusal changes nothing.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
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
            required: Default::default(),
        })
    }

    /// This file as the only copy of the matrices `names`: one of them that
    /// the file does not hold (or holds in another shape, format or layout)
    /// fails the load instead of being rearranged from the model file, which
    /// holds only placeholders for them.
    pub fn required(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.required.extend(names);
        self
    }

    /// Rearranges `data` as usual, unless the file is the only copy of
    /// `name` ([`LayoutFile::required`]): then the load fails with `why`.
    fn fall_back<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        rows: usize,
        cols: usize,
        data: WeightData,
        why: String,
    ) -> Result<B::Weight, BackendError> {
        if self.required.contains(name) {
            return Err(BackendError::Invalid {
                op: "weight layout",
                msg: format!("{}: {why}", self.path.display()),
            });
        }
        self.mark_stale(why);
        backend.upload_weight(rows, cols, data)
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
            if self.required.contains(name) {
                return self.fall_back(
                    backend,
                    name,
                    rows,
                    cols,
                    data,
                    format!("it does not hold {name} (part {part})"),
                );
            }
            let w = backend.upload_weight(rows, cols, data)?;
            if backend.laid_out(&w).is_some() {
                self.mark_stale(format!("it does not hold {name} (part {part})"));
            }
            return Ok(w);
        };
        if (e.ty, e.rows, e.cols) != (ty as u32, rows, cols) {
            let why = format!(
                "its {name} (part {part}) is {} x {} of type {}, the model's {rows} x {cols} {ty:?}",
                e.rows, e.cols, e.ty
            );
            return self.fall_back(backend, name, rows, cols, data, why);
        }
        let owner: kiln_backend::ByteOwner = self.map.clone();
        let range = e.offset as usize..(e.offset + e.len) as usize;
        // SAFETY: `map` is a read-only shared map of a file (see `open`).
        let bytes = unsafe { HostBytes::file_mapped(owner, range) };
        let Some(bytes) = bytes else {
            // Checked in `open`; kept as a fallback, not a panic.
            let why = format!("its {name} (part {part}) lies outside it");
            return self.fall_back(backend, name, rows, cols, data, why);
        };
        match backend.upload_laid_out(rows, cols, ty, bytes) {
            Ok(w) => {
                if let Ok(mut n) = self.used.lock() {
                    *n += 1;
                }
                Ok(w)
            }
            Err(err) => {
                let why = format!("its {name} (part {part}): {err}");
                self.fall_back(backend, name, rows, cols, data, why)
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

/// The matrices a load rearranged, to write as a layout file: kept in
/// memory ([`LayoutRecorder::default`], written by [`LayoutRecorder::write`])
/// or streamed to the file as they are made ([`LayoutRecorder::streaming`],
/// finished by [`LayoutRecorder::finish`]).
#[derive(Default)]
pub struct LayoutRecorder {
    parts: Parts,
    recorded: Mutex<Vec<Recorded>>,
    stream: Option<Stream>,
    /// Told of every matrix streamed to the file (a packed prepared model
    /// leaves those out of its GGUF file).
    packed: Option<Arc<crate::prepared::PackedTensors>>,
}

impl LayoutRecorder {
    /// A recorder that writes each rearranged matrix to a new file at `path`
    /// as soon as the backend has made it, and hands the backend the file's
    /// mapped copy in place of its own: a load through it holds one matrix
    /// in memory at a time, whatever the model's size, and the model it
    /// returns is backed by the file (shared, reclaimable pages), as a later
    /// start that maps the file is. [`LayoutRecorder::finish`] completes the
    /// file.
    pub fn streaming(path: &Path) -> Result<Self> {
        Ok(LayoutRecorder {
            stream: Some(Stream::create(path)?),
            ..Default::default()
        })
    }

    /// This streaming recorder, telling `packed` which of the tensors read
    /// it wrote (see [`crate::prepared::load_and_prepare`]).
    pub fn telling(mut self, packed: Arc<crate::prepared::PackedTensors>) -> Self {
        self.packed = Some(packed);
        self
    }

    fn push(&self, r: Recorded) {
        if let Ok(mut v) = self.recorded.lock() {
            v.push(r);
        }
    }

    /// Matrices recorded.
    pub fn len(&self) -> usize {
        match &self.stream {
            Some(s) => s.state.lock().map_or(0, |st| st.entries.len()),
            None => self.recorded.lock().map_or(0, |v| v.len()),
        }
    }

    /// Bytes of rearranged matrices streamed to the file so far (0 for an
    /// in-memory recorder).
    pub fn streamed_bytes(&self) -> u64 {
        self.stream
            .as_ref()
            .and_then(|s| {
                s.state
                    .lock()
                    .ok()
                    .map(|st| st.entries.iter().map(|e| e.len).sum())
            })
            .unwrap_or(0)
    }

    /// Completes a [`LayoutRecorder::streaming`] file as a layout file of
    /// `layout` for cache key `key` (index, header, synced; the caller
    /// renames it into place) and returns its size. An error when the
    /// recorder is not streaming, or when writing any matrix failed (those
    /// matrices were served from memory, and the file is incomplete).
    pub fn finish(&self, layout: &str, key: &str) -> Result<u64> {
        let Some(stream) = &self.stream else {
            return Err(ModelError::Format {
                path: PathBuf::new(),
                msg: "this weight-layout recorder keeps matrices in memory: use write".into(),
            });
        };
        stream.finish(layout, key)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the recorded matrices to `path` as a layout file of `layout`
    /// for cache key `key`, durably (the caller renames it into place).
    /// Returns the file's size.
    pub fn write(&self, path: &Path, layout: &str, key: &str) -> Result<u64> {
        if self.stream.is_some() {
            return Err(ModelError::Format {
                path: path.to_path_buf(),
                msg: "this weight-layout recorder streams to its file: use finish".into(),
            });
        }
        let recorded = self.recorded.lock().map_err(|_| ModelError::Format {
            path: path.to_path_buf(),
            msg: "a thread recording weights panicked".into(),
        })?;
        // The same file a streaming recorder writes, matrix by matrix.
        let stream = Stream::create(path)?;
        for r in recorded.iter() {
            stream.put(&r.name, r.part, r.ty, r.rows, r.cols, &r.bytes)?;
        }
        stream.finish(layout, key)
    }
}

/// The file's first [`DATA_START`] bytes: magic, version, where the index is
/// and how long the file is.
fn header(index_at: u64, index_len: u64, total: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(DATA_START as usize);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    for v in [index_at, index_len, total] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    head.resize(DATA_START as usize, 0);
    head
}

/// A layout file being written matrix by matrix.
struct Stream {
    path: PathBuf,
    file: File,
    state: Mutex<StreamState>,
}

struct StreamState {
    /// Where the next matrix may start (before alignment).
    at: u64,
    entries: Vec<Entry>,
    /// The first write that failed: the file is not finished then.
    failed: Option<String>,
}

impl Stream {
    fn create(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(Stream {
            path: path.to_path_buf(),
            file,
            state: Mutex::new(StreamState {
                at: DATA_START,
                entries: Vec::new(),
                failed: None,
            }),
        })
    }

    /// Writes `w`'s rearranged bytes (when the backend rearranged it) at the
    /// file's end and returns the weight made from the file's mapped copy,
    /// dropping `w`'s own, and `true`. When anything fails, `w` itself is
    /// returned (the model serves all the same) and the file is marked
    /// incomplete; `false` also when the backend did not rearrange `w`.
    fn append<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        part: u32,
        rows: usize,
        cols: usize,
        w: B::Weight,
    ) -> (B::Weight, bool) {
        let Some((ty, bytes)) = backend.laid_out(&w) else {
            return (w, false);
        };
        let mapped = self
            .put(name, part, ty, rows, cols, &bytes)
            .and_then(|offset| self.map(name, offset, bytes.len()));
        match mapped {
            Ok(mapped) => match backend.upload_laid_out(rows, cols, ty, mapped) {
                Ok(from_file) => (from_file, true),
                Err(e) => {
                    self.fail(format!("{name} (part {part}): {e}"));
                    (w, false)
                }
            },
            Err(e) => {
                self.fail(e.to_string());
                (w, false)
            }
        }
    }

    /// The stream's state, locked, unless a write has failed (the error
    /// then says `what`, and why the write failed).
    fn unfailed(&self, what: &str) -> Result<std::sync::MutexGuard<'_, StreamState>> {
        let st = self.state.lock().map_err(|_| ModelError::Format {
            path: self.path.clone(),
            msg: "a thread writing the weight layout panicked".into(),
        })?;
        match &st.failed {
            Some(why) => Err(ModelError::Format {
                path: self.path.clone(),
                msg: format!("{what}: {why}"),
            }),
            None => Ok(st),
        }
    }

    fn fail(&self, why: String) {
        if let Ok(mut st) = self.state.lock() {
            st.failed.get_or_insert(why);
        }
    }

    /// Writes `bytes` at the file's end, where [`place`] puts them, and
    /// records their entry; returns their offset.
    fn put(
        &self,
        name: &str,
        part: u32,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut st = self.unfailed("an earlier write failed")?;
        let len = bytes.len() as u64;
        let offset = place(st.at, len);
        // A positioned write: the gap before a matrix placed on a 2 MiB
        // boundary stays a hole.
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| ModelError::io(&self.path, e))?;
        st.at = offset + len;
        st.entries.push(Entry {
            name: name.to_string(),
            part,
            ty: ty as u32,
            rows,
            cols,
            offset,
            len,
        });
        Ok(offset)
    }

    /// The `len` bytes of matrix `name` that [`Stream::put`] wrote at
    /// `offset`, mapped.
    fn map(&self, name: &str, offset: u64, len: usize) -> Result<HostBytes> {
        // SAFETY: a read-only shared map of a range this process has just
        // written and never writes again (the file only grows past it, and
        // the header and index are written outside it).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(&self.file)
        }
        .map_err(|e| ModelError::io(&self.path, e))?;
        // On 2 MiB pages where the page cache holds them so (see [`HUGE_PAGE`]).
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let owner: kiln_backend::ByteOwner = Arc::new(map);
        // SAFETY: as above; the whole map is the range.
        unsafe { HostBytes::file_mapped(owner, 0..len) }.ok_or_else(|| ModelError::Format {
            path: self.path.clone(),
            msg: format!("the map of {name} is not its {len} bytes"),
        })
    }

    fn finish(&self, layout: &str, key: &str) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let io = |e| ModelError::io(&self.path, e);
        let st = self.unfailed("incomplete")?;
        let index = Index {
            layout: layout.to_string(),
            key: key.to_string(),
            entries: st.entries.clone(),
        };
        let json = serde_json::to_vec(&index).map_err(|e| ModelError::Format {
            path: self.path.clone(),
            msg: format!("cannot write the index: {e}"),
        })?;
        let total = st.at + json.len() as u64;
        self.file.write_all_at(&json, st.at).map_err(io)?;
        self.file
            .write_all_at(&header(st.at, json.len() as u64, total), 0)
            .map_err(io)?;
        self.file.set_len(total).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_of_a_huge_page_or_more_start_on_one_and_the_rest_on_a_line() {
        // A small matrix packs in after what is there.
        assert_eq!(place(64, 1000), 64);
        assert_eq!(place(100, 1000), 128);
        assert_eq!(place(HUGE_PAGE + 1, HUGE_PAGE - 1), HUGE_PAGE + 64);
        // A large one skips to the next 2 MiB boundary, or stays on one.
        assert_eq!(place(64, HUGE_PAGE), HUGE_PAGE);
        assert_eq!(place(HUGE_PAGE, 5 * HUGE_PAGE), HUGE_PAGE);
        assert_eq!(place(3 * HUGE_PAGE + 64, HUGE_PAGE + 1), 4 * HUGE_PAGE);
        // Every place is one a reader accepts.
        for (at, len) in [(64, 1), (65, HUGE_PAGE), (7 * HUGE_PAGE - 1, 3)] {
            assert_eq!(place(at, len) % ALIGN, 0);
            assert!(place(at, len) >= at);
        }
    }
}
