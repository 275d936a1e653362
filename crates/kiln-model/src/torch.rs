//! PyTorch checkpoints (`pytorch_model.bin`), read without running pickle code.
//!
//! Since PyTorch 1.6, `torch.save` writes a ZIP archive (entries STORED, that
//! is uncompressed, with their data 64-byte aligned) holding
//! `<archive>/data.pkl` (a protocol-2 pickle of the saved object),
//! `<archive>/data/<key>` (the raw bytes of each storage), `<archive>/byteorder`
//! and `<archive>/version`. A tensor in the pickle is a call of
//! `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
//! requires_grad, backward_hooks[, metadata])`, whose `storage` is a persistent
//! id `('storage', torch.FloatStorage, key, location, numel)`.
//!
//! Unpickling in Python can call any function a file names, so a checkpoint
//! can carry code. This reader never calls anything: a small restricted
//! unpickler (`Machine`) understands the opcodes a state dict needs and
//! treats the few allowed globals (below) as inert markers that it interprets
//! itself. Any other global (`os.system`, `builtins.eval`, …), any opcode
//! outside that set and every malformed length or index is an error naming
//! what was refused; no input panics, and every length and count is checked
//! against the bytes that are actually there before anything is allocated.
//!
//! Allowed globals: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_tensor_v3`, `torch._utils._rebuild_parameter`,
//! `torch._utils._rebuild_parameter_with_state`,
//! `torch._tensor._rebuild_from_type_v2` (only around the functions above),
//! `torch.Tensor` and `torch.nn.parameter.Parameter` (as its type argument),
//! `torch.<X>Storage` and `torch.storage.UntypedStorage` (storage types),
//! `torch.<dtype>` (`torch.float32`, …) and `_codecs.encode` (how protocol 2
//! writes a `bytes` value). The legacy format (before PyTorch 1.6: a bare
//! pickle stream or a tar file) is refused with advice to re-save.
//!
//! Opcodes run: PROTO, FRAME, STOP, MARK, POP, POP_MARK, DUP, NONE, NEWTRUE,
//! NEWFALSE, BININT, BININT1, BININT2, LONG1 (up to 8 bytes), BINFLOAT,
//! BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, SHORT_BINSTRING, BINSTRING,
//! BINBYTES, SHORT_BINBYTES, BINBYTES8, EMPTY_TUPLE, TUPLE, TUPLE1..3,
//! EMPTY_LIST, APPEND, APPENDS, EMPTY_DICT, SETITEM, SETITEMS, BINGET,
//! LONG_BINGET, BINPUT, LONG_BINPUT, MEMOIZE, GLOBAL and STACK_GLOBAL (allowed
//! names only), REDUCE (allowed calls only), NEWOBJ (OrderedDict only), BUILD
//! (on a dict or tensor; the state is ignored) and BINPERSID (storages only).
//! INST and OBJ are refused naming what they would call; every other opcode
//! is refused by name.
//!
//! Tensors of float32, float16, bfloat16, float64, int64, int32, int16, int8,
//! uint8 and bool read as f32 (integers above 2^24 lose precision; they are
//! buffers such as position ids). Other dtypes (complex, float8, …) are listed
//! but reading them is an error. The top-level object must be a dict; tensors
//! in nested dicts get dotted names (`{"model": {"w": t}}` → `model.w`) and
//! values that are not tensors or dicts (ints, strings, lists) are ignored.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::weights::{NameMap, WeightSource};
use crate::{HostTensor, ModelError, Result};

/// Most dimensions a tensor may have.
const MAX_RANK: usize = 32;
/// Deepest nesting of dicts searched for tensors.
const MAX_DICT_DEPTH: usize = 16;
/// A tensor may have more elements than its storage (stride-0 broadcasts)
/// only up to this many, so a tiny corrupt file cannot demand a huge buffer.
const MAX_BROADCAST_NUMEL: usize = 1 << 24;
/// Longest tensor name (dotted, for nested dicts).
const MAX_NAME_LEN: usize = 4096;
/// Most bytes of tensor names in one checkpoint (real ones have a few MB).
const MAX_NAME_BYTES: usize = 64 << 20;
/// Longest storage key (torch.save numbers its storages: "0", "1", …).
const MAX_STORAGE_KEY: usize = 64;
/// Largest data.pkl read (real state dicts have a few MB); unpickling uses
/// at most a small multiple of it in memory.
const MAX_PICKLE: usize = 256 << 20;
/// Most arguments of a call the unpickler interprets.
const MAX_ARGS: usize = 8;
/// Longest module or attribute name read from a GLOBAL or INST line.
const MAX_GLOBAL_LINE: usize = 1024;

/// What a pre-1.6 `torch.save` file starts with: a protocol-2 pickle of the
/// magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19";

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
    fn from_storage_class(class: &str) -> Option<Self> {
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
    fn from_attr(name: &str) -> Option<Self> {
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
const OTHER_DTYPES: &[&str] = &[
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
enum Elem {
    Known(TorchDtype),
    /// A dtype kiln does not read, by its PyTorch name.
    Other(Rc<str>),
}

impl Elem {
    fn name(&self) -> &str {
        match self {
            Elem::Known(d) => d.name(),
            Elem::Other(n) => n,
        }
    }
}

/// Where one tensor's elements are in the file.
#[derive(Clone, Debug)]
struct TensorEntry {
    /// `Err(name)` for a dtype kiln does not read.
    dtype: std::result::Result<TorchDtype, String>,
    shape: Vec<usize>,
    /// In elements, one per dimension.
    stride: Vec<usize>,
    /// In elements, from the start of the storage.
    offset: usize,
    /// The storage's bytes, as a range of the file.
    storage: Range<usize>,
    storage_key: String,
}

/// The bytes of a checkpoint: memory-mapped, or owned (tests, in-memory data).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One PyTorch checkpoint file (`torch.save` ZIP format): its tensors' names,
/// shapes and dtypes are read when it is opened, their data when asked for.
pub struct TorchCheckpoint {
    path: PathBuf,
    bytes: Bytes,
    /// In the order the state dict lists them.
    tensors: Vec<(String, TensorEntry)>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for TorchCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl TorchCheckpoint {
    /// Memory-maps a checkpoint and reads its directory of tensors (the
    /// pickle, never any code in it).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: a read-only map of a file we do not write; as for
        // GgufFile::open, changing the file under a running server is not
        // supported.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Reads a checkpoint held in memory; `path` only names it in messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let format_err = |msg: String| ModelError::Format {
            path: path.clone(),
            msg,
        };
        check_magic(&bytes).map_err(format_err)?;
        let archive = Archive::read(&bytes).map_err(format_err)?;
        let found = archive.unpickle(&bytes).map_err(format_err)?;
        let mut tensors = Vec::with_capacity(found.len());
        let mut by_name = HashMap::with_capacity(found.len());
        for (name, entry) in found {
            check_tensor(&entry).map_err(|msg| ModelError::Tensor {
                path: path.clone(),
                tensor: name.clone(),
                msg,
            })?;
            match by_name.get(&name) {
                Some(&i) => tensors[i] = (name, entry),
                None => {
                    by_name.insert(name.clone(), tensors.len());
                    tensors.push((name, entry));
                }
            }
        }
        Ok(Self {
            path,
            bytes,
            tensors,
            by_name,
        })
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names, in the order the state dict lists them.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether the checkpoint has a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// A tensor's shape (empty for a 0-d tensor).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entry(name).map(|e| e.shape.as_slice())
    }

    /// A tensor's dtype as PyTorch names it (`float32`, `bfloat16`, …),
    /// including dtypes [`get`](Self::get) cannot read.
    pub fn dtype(&self, name: &str) -> Option<&str> {
        self.entry(name).map(|e| match &e.dtype {
            Ok(d) => d.name(),
            Err(other) => other.as_str(),
        })
    }

    fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i].1)
    }

    /// A tensor as dense row-major f32 (views and transposes materialised).
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let entry = self.entry(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let data = materialise(&self.bytes, entry).map_err(|msg| ModelError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg,
        })?;
        Ok(HostTensor::new(entry.shape.clone(), data))
    }
}

/// Refuses files that are not the ZIP format, saying what they are instead.
fn check_magic(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.starts_with(b"PK") {
        return Ok(());
    }
    let legacy = "a legacy (before PyTorch 1.6) checkpoint, which kiln does not read: \
                  load it with torch and save it again with a current torch.save, \
                  or better, convert it to safetensors";
    if bytes.starts_with(LEGACY_MAGIC) {
        return Err(format!("this is {legacy}"));
    }
    if bytes.get(257..262) == Some(b"ustar") {
        return Err(format!("this tar file is {legacy}"));
    }
    Err(
        "not a PyTorch checkpoint: torch.save has written ZIP archives since \
         PyTorch 1.6 and this file is not one"
            .into(),
    )
}

/// Checks that a tensor's view fits in its storage.
fn check_tensor(e: &TensorEntry) -> std::result::Result<(), String> {
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
fn numel(shape: &[usize]) -> Option<usize> {
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
fn materialise(file: &[u8], e: &TensorEntry) -> std::result::Result<Vec<f32>, String> {
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

// ---------------------------------------------------------------------------
// The ZIP container: just enough of it for torch.save's STORED archives,
// ZIP64 included (files over 4 GiB). CRCs are not checked.

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// One member of the archive.
#[derive(Clone, Debug)]
struct ZipEntry {
    /// 0 = STORED; anything else is compressed and unreadable here.
    method: u16,
    /// The member's (stored) bytes, as a range of the file.
    data: Range<usize>,
}

/// Where the central directory is and how many entries it has.
struct CentralDir {
    offset: usize,
    count: u64,
}

/// The members of a torch.save archive and the prefix they share.
struct Archive {
    entries: HashMap<String, ZipEntry>,
    /// `<archive>` in `<archive>/data.pkl`.
    prefix: String,
}

impl Archive {
    /// Reads the central directory and finds `<archive>/data.pkl`.
    fn read(bytes: &[u8]) -> std::result::Result<Self, String> {
        let dir = find_central_dir(bytes)?;
        let mut entries = HashMap::new();
        let mut pickle_prefix = None;
        let mut at = dir.offset;
        for i in 0..dir.count {
            let (name, entry, next) = read_central_entry(bytes, at)
                .map_err(|e| format!("ZIP central directory entry {i}: {e}"))?;
            at = next;
            if pickle_prefix.is_none() {
                if let Some(p) = name.strip_suffix("/data.pkl") {
                    if !p.contains('/') {
                        pickle_prefix = Some(p.to_string());
                    }
                }
            }
            entries.entry(name).or_insert(entry);
        }
        let prefix = pickle_prefix.ok_or(
            "this ZIP archive has no <archive>/data.pkl, so it is not a PyTorch checkpoint",
        )?;
        let archive = Self { entries, prefix };
        archive.check_byteorder(bytes)?;
        Ok(archive)
    }

    /// Where the bytes of `<archive>/<name>` are, if the archive has that
    /// member (within the file: checked when the directory was read).
    fn member(&self, name: &str) -> std::result::Result<Option<Range<usize>>, String> {
        let full = format!("{}/{name}", self.prefix);
        let Some(entry) = self.entries.get(&full) else {
            return Ok(None);
        };
        if entry.method != 0 {
            return Err(format!(
                "ZIP member {full} is compressed (method {}); torch.save stores members \
                 uncompressed and kiln reads only those",
                entry.method
            ));
        }
        Ok(Some(entry.data.clone()))
    }

    fn check_byteorder(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let Some(range) = self.member("byteorder")? else {
            return Ok(()); // older torch versions wrote none; they were little-endian
        };
        match bytes.get(range) {
            Some(b"little") => Ok(()),
            Some(b"big") => Err("this checkpoint was saved on a big-endian machine; \
                                 kiln reads only little-endian ones"
                .into()),
            other => Err(format!(
                "unknown byteorder '{}'",
                printable(&String::from_utf8_lossy(other.unwrap_or_default()))
            )),
        }
    }

    /// Runs the restricted unpickler over data.pkl and lists its tensors.
    fn unpickle(&self, bytes: &[u8]) -> std::result::Result<Vec<(String, TensorEntry)>, String> {
        let pickle = self
            .member("data.pkl")?
            .and_then(|range| bytes.get(range))
            .ok_or("data.pkl is missing")?;
        if pickle.len() > MAX_PICKLE {
            return Err(format!(
                "data.pkl has {} bytes, more than the {MAX_PICKLE} kiln reads",
                pickle.len()
            ));
        }
        let resolve = |key: &str| -> std::result::Result<Range<usize>, String> {
            self.member(&format!("data/{key}"))?.ok_or_else(|| {
                format!(
                    "data.pkl refers to storage '{}', but the archive has no {}/data/{}",
                    printable(key),
                    self.prefix,
                    printable(key)
                )
            })
        };
        let mut machine = Machine::new(pickle, &resolve);
        let root = machine.run()?;
        machine.state_dict(&root)
    }
}

/// Finds the end-of-central-directory record (and its ZIP64 form).
fn find_central_dir(b: &[u8]) -> std::result::Result<CentralDir, String> {
    let not_zip = || "not a valid ZIP archive: no end-of-central-directory record".to_string();
    let last = b.len().checked_sub(22).ok_or_else(not_zip)?;
    let first = last.saturating_sub(0xFFFF);
    let eocd = (first..=last)
        .rev()
        .find(|&i| le_u32(b, i) == Some(EOCD_SIG))
        .ok_or_else(not_zip)?;
    let truncated = || "ZIP end-of-central-directory record is truncated".to_string();
    let count = le_u16(b, eocd + 10).ok_or_else(truncated)?;
    let offset = le_u32(b, eocd + 16).ok_or_else(truncated)?;
    let zip64 = eocd
        .checked_sub(20)
        .filter(|&loc| le_u32(b, loc) == Some(ZIP64_LOCATOR_SIG));
    let Some(locator) = zip64 else {
        return Ok(CentralDir {
            offset: offset as usize,
            count: count.into(),
        });
    };
    let bad64 = || "ZIP64 end-of-central-directory record is missing or truncated".to_string();
    let rec = le_u64(b, locator + 8)
        .and_then(to_usize)
        .ok_or_else(bad64)?;
    if le_u32(b, rec) != Some(ZIP64_EOCD_SIG) {
        return Err(bad64());
    }
    Ok(CentralDir {
        count: le_u64(b, rec + 32).ok_or_else(bad64)?,
        offset: le_u64(b, rec + 48).and_then(to_usize).ok_or_else(bad64)?,
    })
}

/// Reads the central directory entry at `at`: its name, where its data is,
/// and where the next entry starts.
fn read_central_entry(
    b: &[u8],
    at: usize,
) -> std::result::Result<(String, ZipEntry, usize), &'static str> {
    const TRUNC: &str = "truncated";
    if le_u32(b, at) != Some(CENTRAL_SIG) {
        return Err("bad signature");
    }
    let flags = le_u16(b, at + 8).ok_or(TRUNC)?;
    let method = le_u16(b, at + 10).ok_or(TRUNC)?;
    let mut csize = u64::from(le_u32(b, at + 20).ok_or(TRUNC)?);
    let mut usize_ = u64::from(le_u32(b, at + 24).ok_or(TRUNC)?);
    let name_len = usize::from(le_u16(b, at + 28).ok_or(TRUNC)?);
    let extra_len = usize::from(le_u16(b, at + 30).ok_or(TRUNC)?);
    let comment_len = usize::from(le_u16(b, at + 32).ok_or(TRUNC)?);
    let mut local = u64::from(le_u32(b, at + 42).ok_or(TRUNC)?);
    let name_at = at + 46;
    let name = b.get(name_at..name_at + name_len).ok_or(TRUNC)?;
    let extra = b
        .get(name_at + name_len..name_at + name_len + extra_len)
        .ok_or(TRUNC)?;
    if flags & 1 != 0 {
        return Err("member is encrypted");
    }
    apply_zip64_extra(extra, &mut usize_, &mut csize, &mut local)?;
    if method == 0 && csize != usize_ {
        return Err("stored member's sizes disagree");
    }
    let data = local_data(b, local, csize)?;
    let next = name_at + name_len + extra_len + comment_len;
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, ZipEntry { method, data }, next))
}

/// Replaces the 0xFFFFFFFF sizes and offset of a central entry by the 64-bit
/// values of its ZIP64 extra field, which lists them in this order.
fn apply_zip64_extra(
    mut extra: &[u8],
    usize_: &mut u64,
    csize: &mut u64,
    local: &mut u64,
) -> std::result::Result<(), &'static str> {
    while extra.len() >= 4 {
        let id = le_u16(extra, 0).ok_or("truncated extra field")?;
        let len = usize::from(le_u16(extra, 2).ok_or("truncated extra field")?);
        let body = extra.get(4..4 + len).ok_or("truncated extra field")?;
        if id == 1 {
            let mut at = 0;
            for field in [usize_, csize, local] {
                if *field == u64::from(u32::MAX) {
                    *field = le_u64(body, at).ok_or("truncated ZIP64 extra field")?;
                    at += 8;
                }
            }
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}

/// The data range of the member whose local header is at `local`.
fn local_data(b: &[u8], local: u64, size: u64) -> std::result::Result<Range<usize>, &'static str> {
    let local = to_usize(local).ok_or("local header offset too large")?;
    if le_u32(b, local) != Some(LOCAL_SIG) {
        return Err("no local header where the directory says");
    }
    let name_len = usize::from(le_u16(b, local + 26).ok_or("truncated local header")?);
    let extra_len = usize::from(le_u16(b, local + 28).ok_or("truncated local header")?);
    let start = local + 30 + name_len + extra_len;
    let end = to_usize(size)
        .and_then(|s| start.checked_add(s))
        .filter(|&end| end <= b.len())
        .ok_or("member data runs past the end of the file")?;
    Ok(start..end)
}

/// A name from the file, safe and short enough to put in a message.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

// ---------------------------------------------------------------------------
// The restricted unpickler.

/// A global the unpickler accepts. None is ever imported or called: each is
/// a marker the unpickler interprets itself.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` or `torch.nn.parameter.Parameter`.
    TensorType(&'static str),
    CodecsEncode,
    /// A storage class (`torch.FloatStorage`); named for messages.
    Storage(Elem, Rc<str>),
    /// A dtype (`torch.float32`); named for messages.
    Dtype(Elem, Rc<str>),
}

impl Global {
    /// Looks `module.name` up in the allow-list.
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromTypeV2,
            ("torch", "Tensor") => Self::TensorType("torch.Tensor"),
            ("torch.nn.parameter", "Parameter") => Self::TensorType("torch.nn.parameter.Parameter"),
            ("_codecs", "encode") => Self::CodecsEncode,
            ("torch.storage", "UntypedStorage") => Self::Storage(
                Elem::Known(TorchDtype::U8),
                "torch.storage.UntypedStorage".into(),
            ),
            ("torch", attr) => Self::torch_attr(attr)?,
            _ => return None,
        })
    }

    /// `torch.<attr>`: a storage class or a dtype.
    fn torch_attr(attr: &str) -> Option<Self> {
        let full: Rc<str> = format!("torch.{attr}").into();
        if let Some(class) = attr.strip_suffix("Storage") {
            if class.is_empty() || !attr.chars().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            let elem = match TorchDtype::from_storage_class(attr) {
                Some(d) => Elem::Known(d),
                None => Elem::Other(full.clone()),
            };
            return Some(Self::Storage(elem, full));
        }
        if let Some(d) = TorchDtype::from_attr(attr) {
            return Some(Self::Dtype(Elem::Known(d), full));
        }
        OTHER_DTYPES
            .contains(&attr)
            .then(|| Self::Dtype(Elem::Other(attr.into()), full))
    }

    /// The global's Python name, for messages.
    fn name(&self) -> &str {
        match self {
            Self::OrderedDict => "collections.OrderedDict",
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Self::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3",
            Self::RebuildParameter => "torch._utils._rebuild_parameter",
            Self::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Self::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
            Self::TensorType(n) => n,
            Self::CodecsEncode => "_codecs.encode",
            Self::Storage(_, n) | Self::Dtype(_, n) => n,
        }
    }
}

/// A value on the unpickler's stack. Containers live in the machine's arenas
/// and are referred to by index, so values are cheap to copy, shared like
/// Python references, and never nest (no deep recursion when dropped).
#[derive(Clone, Debug)]
enum Value {
    None,
    /// Bools, floats and bytes matter to no tensor: only their type is kept.
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Global(Global),
    Tuple(usize),
    List(usize),
    Dict(usize),
    Storage(usize),
    Tensor(usize),
}

/// The state of a search of nested dicts for tensors.
struct Walk {
    out: Vec<(String, TensorEntry)>,
    /// Dicts already searched (a dict may hold itself).
    seen: HashSet<usize>,
    /// Bytes of all names made so far.
    name_bytes: usize,
}

impl Walk {
    /// Counts a name against the limits, so that memoized long keys reused
    /// many times cannot make the name list huge.
    fn charge(&mut self, name: &str) -> PResult<()> {
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "data.pkl has a tensor name of {} bytes (at most {MAX_NAME_LEN}): '{}'",
                name.len(),
                printable(name)
            ));
        }
        self.name_bytes += name.len();
        if self.name_bytes > MAX_NAME_BYTES {
            return Err(format!(
                "data.pkl's tensor names add up to more than {MAX_NAME_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// A storage a persistent id named.
struct StorageRef {
    key: Rc<str>,
    elem: Elem,
    bytes: Range<usize>,
}

/// A tensor a rebuild call made.
struct RawTensor {
    storage: usize,
    elem: Elem,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Pickle opcodes by byte, for messages (from Python's pickletools).
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "(no such opcode)",
    }
}

/// The refusal for a global outside the allow-list.
fn refuse_global(name: &str) -> String {
    format!(
        "data.pkl calls {}, which is not a tensor: refusing to run code from a checkpoint \
         (kiln reads only tensors and dicts of tensors from PyTorch files; if you trust this \
         file, load it with torch and save the state dict as safetensors)",
        printable(name)
    )
}

type Resolver<'a> = dyn Fn(&str) -> std::result::Result<Range<usize>, String> + 'a;

/// The restricted pickle machine: Python's unpickler minus everything that
/// imports or calls, plus an interpretation of torch's rebuild functions.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts, for messages.
    op_pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    seqs: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
    storages: Vec<StorageRef>,
    tensors: Vec<RawTensor>,
    resolve: &'a Resolver<'a>,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], resolve: &'a Resolver<'a>) -> Self {
        Self {
            data,
            pos: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            seqs: Vec::new(),
            dicts: Vec::new(),
            storages: Vec::new(),
            tensors: Vec::new(),
            resolve,
        }
    }

    /// An error at the current opcode.
    fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("data.pkl, byte {}: {msg}", self.op_pos)
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).filter(|&e| e <= data.len());
        let Some(end) = end else {
            let op = data
                .get(self.op_pos)
                .copied()
                .map_or("data.pkl", opcode_name);
            return Err(self.err(format!(
                "{op} needs {n} more bytes, but data.pkl ends first"
            )));
        };
        let out = &data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// A length prefix, checked against the bytes that remain.
    fn len(&mut self, width: usize) -> PResult<usize> {
        let n = match width {
            1 => u64::from(self.u8()?),
            4 => u64::from(self.u32()?),
            _ => self.u64()?,
        };
        to_usize(n)
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| self.err(format!("length {n} runs past the end of data.pkl")))
    }

    /// A newline-terminated line (GLOBAL and INST operands).
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE)];
        let n = window
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated name"))?;
        let line = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(line)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> PResult<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> PResult<&Value> {
        self.stack.last().ok_or_else(|| self.err("empty stack"))
    }

    /// Pops everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| self.err("no MARK"))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn new_seq(&mut self, items: Vec<Value>, tuple: bool) -> Value {
        self.seqs.push(items);
        let id = self.seqs.len() - 1;
        if tuple {
            Value::Tuple(id)
        } else {
            Value::List(id)
        }
    }

    fn new_dict(&mut self) -> Value {
        self.dicts.push(Vec::new());
        Value::Dict(self.dicts.len() - 1)
    }

    /// Python's name for a value's type, for messages.
    fn type_name(v: &Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Global(_) => "global",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// Runs the pickle to its STOP and returns the object it built.
    fn run(&mut self) -> PResult<Value> {
        loop {
            self.op_pos = self.pos;
            let op = self
                .take(1)
                .map_err(|_| self.err("data.pkl ends without STOP"))?[0];
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    /// Runs one opcode (other than STOP).
    fn step(&mut self, op: u8) -> PResult<()> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(self.err(format!("unknown pickle protocol {proto}")));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint only
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 | 0x89 => self.push(Value::Bool),
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v.into()));
            }
            0x8a => self.long1()?,
            b'G' => {
                self.take(8)?; // BINFLOAT
                self.push(Value::Float);
            }
            b'X' | 0x8c | 0x8d | b'U' | b'T' => self.string(op)?,
            b'B' | b'C' | 0x8e => {
                let n = self.len(match op {
                    b'C' => 1,
                    b'B' => 4,
                    _ => 8,
                })?;
                self.take(n)?;
                self.push(Value::Bytes);
            }
            b')' => {
                let v = self.new_seq(Vec::new(), true);
                self.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.new_seq(items, true);
                self.push(v);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                let v = self.new_seq(items, true);
                self.push(v);
            }
            b']' => {
                let v = self.new_seq(Vec::new(), false);
                self.push(v);
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'}' => {
                let v = self.new_dict();
                self.push(v);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    self.u8()?.into()
                } else {
                    self.u32()?
                };
                let v = self.memo.get(&i).cloned();
                let v = v.ok_or_else(|| self.err(format!("memo entry {i} is not set")))?;
                self.push(v);
            }
            b'q' | b'r' | 0x94 => {
                let i = match op {
                    b'q' => self.u8()?.into(),
                    b'r' => self.u32()?,
                    _ => u32::try_from(self.memo.len()).map_err(|_| self.err("memo too large"))?,
                };
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                    return Err(self.err("STACK_GLOBAL needs two strings"));
                };
                self.global(m, n)?;
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = self.call(&f, &args, true)?;
                self.push(v);
            }
            0x81 => self.newobj()?,
            b'b' => self.build()?,
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(&pid)?;
                self.push(v);
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                return Err(refuse_global(&format!("{module}.{name}")));
            }
            b'o' => {
                let items = self.pop_mark()?;
                let name = match items.first() {
                    Some(Value::Global(g)) => g.name().to_string(),
                    _ => "an object".to_string(),
                };
                return Err(refuse_global(&name));
            }
            other => {
                return Err(self.err(format!(
                    "unsupported pickle opcode {} (0x{other:02x}): a torch.save state dict does \
                     not use it",
                    opcode_name(other)
                )))
            }
        }
        Ok(())
    }

    /// LONG1: a little-endian two's-complement integer of up to 8 bytes.
    fn long1(&mut self) -> PResult<()> {
        let n = usize::from(self.u8()?);
        if n > 8 {
            return Err(self.err(format!("a {n}-byte integer is too large")));
        }
        let b = self.take(n)?;
        let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            [0xFFu8; 8]
        } else {
            [0u8; 8]
        };
        a[..n].copy_from_slice(b);
        self.push(Value::Int(i64::from_le_bytes(a)));
        Ok(())
    }

    /// BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, SHORT_BINSTRING, BINSTRING.
    fn string(&mut self, op: u8) -> PResult<()> {
        let width = match op {
            0x8c | b'U' => 1,
            b'X' | b'T' => 4,
            _ => 8,
        };
        let n = self.len(width)?;
        let b = self.take(n)?;
        let s: Rc<str> = if matches!(op, b'U' | b'T') {
            // Python 2 str: bytes; read as latin-1 like torch.load does.
            b.iter().map(|&c| char::from(c)).collect::<String>().into()
        } else {
            std::str::from_utf8(b)
                .map_err(|_| self.err("string is not valid UTF-8"))?
                .into()
        };
        self.push(Value::Str(s));
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        let g = Global::resolve(module, name)
            .ok_or_else(|| refuse_global(&format!("{module}.{name}")))?;
        self.push(Value::Global(g));
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> PResult<()> {
        match *self.top()? {
            Value::List(id) => {
                self.seqs[id].extend(items);
                Ok(())
            }
            ref other => Err(self.err(format!("APPEND to a {}", Self::type_name(other)))),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let id = match *self.top()? {
            Value::Dict(id) => id,
            ref other => return Err(self.err(format!("SETITEM on a {}", Self::type_name(other)))),
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            self.dicts[id].push((k, v));
        }
        Ok(())
    }

    /// BUILD: sets an object's state. Only dicts (OrderedDict's `_metadata`)
    /// and tensors get one in a state dict; the state is ignored.
    fn build(&mut self) -> PResult<()> {
        let _state = self.pop()?;
        match self.top()? {
            Value::Dict(_) | Value::Tensor(_) => Ok(()),
            other => Err(self.err(format!("BUILD on a {}", Self::type_name(other)))),
        }
    }

    /// NEWOBJ: `cls.__new__(cls, *args)`; only an empty OrderedDict.
    fn newobj(&mut self) -> PResult<()> {
        let _args = self.pop()?;
        match self.pop()? {
            Value::Global(Global::OrderedDict) => {
                let v = self.new_dict();
                self.push(v);
                Ok(())
            }
            Value::Global(g) => Err(refuse_global(g.name())),
            other => Err(self.err(format!("NEWOBJ of a {}", Self::type_name(&other)))),
        }
    }

    /// The items of a tuple value.
    /// The items of a tuple value of at most `max` items (checked before
    /// copying, so a huge tuple passed many times costs nothing).
    fn tuple(&self, v: &Value, what: &str, max: usize) -> PResult<Vec<Value>> {
        let Value::Tuple(id) = v else {
            return Err(self.err(format!(
                "{what} must be a tuple, not a {}",
                Self::type_name(v)
            )));
        };
        let items = &self.seqs[*id];
        if items.len() > max {
            return Err(self.err(format!(
                "{what} has {} items, at most {max} expected",
                items.len()
            )));
        }
        Ok(items.clone())
    }

    /// REDUCE: interprets a call of an allowed global; never runs anything.
    /// `outer` is false inside `_rebuild_from_type_v2`, which may wrap only
    /// the other rebuild functions.
    fn call(&mut self, f: &Value, args: &Value, outer: bool) -> PResult<Value> {
        let Value::Global(g) = f else {
            return Err(self.err(format!(
                "REDUCE calls a {}, not a function",
                Self::type_name(f)
            )));
        };
        let args = self.tuple(args, &format!("the arguments of {}", g.name()), MAX_ARGS)?;
        match g {
            Global::OrderedDict if args.is_empty() => Ok(self.new_dict()),
            Global::RebuildTensorV2 => self.rebuild_tensor(&args, false),
            Global::RebuildTensorV3 => self.rebuild_tensor(&args, true),
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(self.err(format!("{} needs a tensor", g.name()))),
            },
            Global::RebuildFromTypeV2 if outer => self.rebuild_from_type(&args),
            Global::CodecsEncode => match args.as_slice() {
                [Value::Str(_), Value::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                    Ok(Value::Bytes)
                }
                _ => Err(self.err("_codecs.encode is allowed only as encode(str, 'latin1')")),
            },
            _ => Err(self.err(format!(
                "data.pkl calls {} with arguments kiln does not interpret",
                g.name()
            ))),
        }
    }

    /// `_rebuild_from_type_v2(func, new_type, args, state)`: tensor subclasses
    /// (Parameter with attributes); `func` must be a tensor rebuild function.
    fn rebuild_from_type(&mut self, args: &[Value]) -> PResult<Value> {
        let [func, Value::Global(Global::TensorType(_)), inner, _state] = args else {
            return Err(self.err(
                "_rebuild_from_type_v2 needs (function, torch.Tensor or Parameter, args, state)",
            ));
        };
        let v = self.call(func, inner, false)?;
        match v {
            Value::Tensor(_) => Ok(v),
            _ => Err(self.err("_rebuild_from_type_v2 must rebuild a tensor")),
        }
    }

    /// An int argument that must be non-negative.
    fn usize_arg(&self, v: &Value, what: &str) -> PResult<usize> {
        match v {
            Value::Int(i) => {
                usize::try_from(*i).map_err(|_| self.err(format!("{what} is negative ({i})")))
            }
            other => Err(self.err(format!(
                "{what} must be an int, not a {}",
                Self::type_name(other)
            ))),
        }
    }

    /// A tuple of non-negative ints (a size or a stride).
    fn dims_arg(&self, v: &Value, what: &str) -> PResult<Vec<usize>> {
        let items = self.tuple(v, what, MAX_RANK)?;
        items.iter().map(|d| self.usize_arg(d, what)).collect()
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride,
    /// requires_grad, backward_hooks[, metadata])`, or v3 with a dtype
    /// before the metadata.
    fn rebuild_tensor(&mut self, args: &[Value], v3: bool) -> PResult<Value> {
        let fixed = if v3 { 7 } else { 6 };
        if args.len() != fixed && args.len() != fixed + 1 {
            return Err(self.err(format!(
                "a tensor rebuild call has {} arguments, expected {fixed} or {}",
                args.len(),
                fixed + 1
            )));
        }
        let Value::Storage(storage) = args[0] else {
            return Err(self.err("a tensor's first argument must be a storage"));
        };
        let offset = self.usize_arg(&args[1], "storage_offset")?;
        let shape = self.dims_arg(&args[2], "size")?;
        let stride = self.dims_arg(&args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "size {shape:?} and stride {stride:?} differ in rank"
            )));
        }
        let elem = if v3 {
            match &args[6] {
                Value::Global(Global::Dtype(e, _)) => e.clone(),
                _ => return Err(self.err("_rebuild_tensor_v3 needs a torch dtype")),
            }
        } else {
            self.storages[storage].elem.clone()
        };
        if let Some(meta) = args.get(fixed) {
            self.check_metadata(meta)?;
        }
        self.tensors.push(RawTensor {
            storage,
            elem,
            offset,
            shape,
            stride,
        });
        Ok(Value::Tensor(self.tensors.len() - 1))
    }

    /// Tensor metadata (conjugate or negative bits) would change the values.
    fn check_metadata(&self, meta: &Value) -> PResult<()> {
        match meta {
            Value::None => Ok(()),
            Value::Dict(id) if self.dicts[*id].is_empty() => Ok(()),
            _ => Err(self.err(
                "a tensor carries conj/neg metadata; resolve it (tensor.resolve_conj()\
                 .resolve_neg()) before saving",
            )),
        }
    }

    /// BINPERSID: `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self, pid: &Value) -> PResult<Value> {
        let items = self.tuple(pid, "a persistent id", 5)?;
        let [Value::Str(kind), Value::Global(Global::Storage(elem, _)), Value::Str(key), _location, numel] =
            items.as_slice()
        else {
            return Err(self.err(
                "unsupported persistent id: expected ('storage', storage type, key, location, \
                 numel)",
            ));
        };
        if &**kind != "storage" {
            return Err(self.err(format!("unsupported persistent id '{}'", printable(kind))));
        }
        if key.len() > MAX_STORAGE_KEY {
            return Err(self.err(format!("storage key of {} bytes", key.len())));
        }
        let numel = self.usize_arg(numel, "a storage's size")?;
        let mut bytes = (self.resolve)(key)?;
        if let Elem::Known(d) = elem {
            let need = numel
                .checked_mul(d.size())
                .filter(|&n| n <= bytes.len())
                .ok_or_else(|| {
                    format!(
                        "data.pkl says storage '{}' holds {numel} {} elements, but its data has \
                         only {} bytes",
                        printable(key),
                        elem.name(),
                        bytes.len()
                    )
                })?;
            bytes.end = bytes.start + need;
        }
        self.storages.push(StorageRef {
            key: key.clone(),
            elem: elem.clone(),
            bytes,
        });
        Ok(Value::Storage(self.storages.len() - 1))
    }

    /// The tensors of the unpickled object, which must be a dict; nested
    /// dicts give dotted names, other values are skipped.
    fn state_dict(&self, root: &Value) -> PResult<Vec<(String, TensorEntry)>> {
        let Value::Dict(id) = root else {
            return Err(format!(
                "data.pkl holds a {}, not a state dict (a dict of tensors)",
                Self::type_name(root)
            ));
        };
        let mut walk = Walk {
            out: Vec::new(),
            seen: HashSet::new(),
            name_bytes: 0,
        };
        self.walk(*id, "", 0, &mut walk)?;
        Ok(walk.out)
    }

    /// Lists the tensors of dict `id` (and of the dicts in it) into `w`.
    fn walk(&self, id: usize, prefix: &str, depth: usize, w: &mut Walk) -> PResult<()> {
        if depth > MAX_DICT_DEPTH {
            return Err(format!(
                "data.pkl nests dicts more than {MAX_DICT_DEPTH} deep"
            ));
        }
        if !w.seen.insert(id) {
            return Ok(()); // a dict inside itself, or seen under another key
        }
        for (k, v) in &self.dicts[id] {
            let Value::Str(k) = k else { continue };
            let name = match v {
                Value::Tensor(_) => format!("{prefix}{k}"),
                Value::Dict(_) => format!("{prefix}{k}."),
                _ => continue,
            };
            w.charge(&name)?;
            match v {
                Value::Tensor(t) => w.out.push((name, self.entry(*t))),
                Value::Dict(d) => self.walk(*d, &name, depth + 1, w)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn entry(&self, t: usize) -> TensorEntry {
        let t = &self.tensors[t];
        let s = &self.storages[t.storage];
        TensorEntry {
            dtype: match &t.elem {
                Elem::Known(d) => Ok(*d),
                Elem::Other(n) => Err(n.to_string()),
            },
            shape: t.shape.clone(),
            stride: t.stride.clone(),
            offset: t.offset,
            storage: s.bytes.clone(),
            storage_key: s.key.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------
// A model directory's checkpoint.

/// A Hugging Face model directory's PyTorch checkpoint: `pytorch_model.bin`,
/// or the shards `pytorch_model.bin.index.json` lists. Tensors are asked for
/// by kiln's canonical names and found through a [`NameMap`].
pub struct TorchSource {
    files: Vec<TorchCheckpoint>,
    /// Checkpoint tensor name → index into `files`.
    index: HashMap<String, usize>,
    names: NameMap,
    /// The file to name when a tensor is missing (the index, when sharded).
    origin: PathBuf,
}

impl TorchSource {
    /// Opens the PyTorch checkpoint in a Hugging Face model directory.
    pub fn open_dir(dir: &Path, names: NameMap) -> Result<Self> {
        let (origin, paths) = shard_paths(dir)?;
        let files = paths
            .iter()
            .map(|p| TorchCheckpoint::open(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_checkpoints(origin, files, names))
    }

    /// Combines checkpoints already open; a tensor in several is taken from
    /// the last. `origin` names the checkpoint in messages.
    pub fn from_checkpoints(origin: PathBuf, files: Vec<TorchCheckpoint>, names: NameMap) -> Self {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
        }
        Self {
            files,
            index,
            names,
            origin,
        }
    }

    /// The checkpoint files, in the order they were opened.
    pub fn files(&self) -> &[TorchCheckpoint] {
        &self.files
    }

    fn locate(&self, canonical: &str) -> Option<(String, &TorchCheckpoint)> {
        let name = (self.names)(canonical)?;
        let i = *self.index.get(&name)?;
        Some((name, &self.files[i]))
    }
}

/// The checkpoint files of a model directory, and the file to name in
/// messages about the whole checkpoint.
fn shard_paths(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let single = dir.join("pytorch_model.bin");
    if single.exists() {
        return Ok((single.clone(), vec![single]));
    }
    let index_path = dir.join("pytorch_model.bin.index.json");
    if !index_path.exists() {
        return Err(ModelError::Format {
            path: dir.to_path_buf(),
            msg: "no pytorch_model.bin or pytorch_model.bin.index.json".into(),
        });
    }
    let format_err = |msg: String| ModelError::Format {
        path: index_path.clone(),
        msg,
    };
    let text =
        crate::files::read_bounded(&index_path, crate::files::MAX_INDEX_BYTES, "a shard index")?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format_err(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format_err("no 'weight_map' object".into()))?;
    let mut shards = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format_err(format!("weight_map['{tensor}'] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(format_err(format!(
                "shard name '{file}' leaves the model directory"
            )));
        }
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(format_err("'weight_map' lists no shards".into()));
    }
    let paths = shards.into_iter().map(|s| dir.join(s)).collect();
    Ok((index_path, paths))
}

impl WeightSource for TorchSource {
    fn get(&self, canonical: &str) -> Result<HostTensor> {
        match self.locate(canonical) {
            Some((name, file)) => file.get(&name),
            None => Err(ModelError::MissingTensor {
                path: self.origin.clone(),
                tensor: (self.names)(canonical).unwrap_or_else(|| canonical.to_string()),
            }),
        }
    }

    fn contains(&self, canonical: &str) -> bool {
        self.locate(canonical).is_some()
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [f] => f.path().display().to_string(),
            fs => format!(
                "{} PyTorch shards listed in {}",
                fs.len(),
                self.origin.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The unpickler on hand-made pickles: limits, malformed input, depth.

    use super::*;

    fn no_storage(key: &str) -> std::result::Result<Range<usize>, String> {
        Err(format!("no storage {key}"))
    }

    fn unpickle(p: &[u8]) -> PResult<Vec<(String, TensorEntry)>> {
        let resolve = no_storage;
        let mut m = Machine::new(p, &resolve);
        let root = m.run()?;
        m.state_dict(&root)
    }

    #[test]
    fn an_empty_dict_has_no_tensors() {
        assert!(unpickle(b"\x80\x02}q\x00.").unwrap().is_empty());
        let od = b"\x80\x02ccollections\nOrderedDict\nq\x00)R.";
        assert!(unpickle(od).unwrap().is_empty());
    }

    #[test]
    fn lengths_past_the_end_are_errors_not_allocations() {
        for p in [
            &b"\x80\x02X\xff\xff\xff\xff"[..],
            b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x02B\xff\xff\xff\x7f",
            b"\x80\x02T\xff\xff\xff\xff",
        ] {
            let e = unpickle(p).unwrap_err();
            assert!(e.contains("past the end"), "{e}");
        }
    }

    #[test]
    fn a_large_memo_index_allocates_nothing() {
        let p = b"\x80\x02}r\xff\xff\xff\xff0j\xff\xff\xff\xff.";
        assert!(unpickle(p).unwrap().is_empty());
        let e = unpickle(b"\x80\x02j\x01\x02\x03\x04.").unwrap_err();
        assert!(e.contains("memo entry 67305985 is not set"), "{e}");
    }

    #[test]
    fn deep_nesting_neither_recurses_nor_overflows() {
        let n = 200_000;
        // Lists nested n deep: n EMPTY_LISTs then n-1 APPENDs.
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        assert!(unpickle(&p).unwrap_err().contains("holds a list"));
        // Tuples nested n deep.
        let mut p = b"\x80\x02K\x00".to_vec();
        p.extend(std::iter::repeat_n(0x85, n));
        p.push(b'.');
        assert!(unpickle(&p).unwrap_err().contains("holds a tuple"));
        // Dicts nested n deep: {"a": {"a": ...}}.
        let mut p = b"\x80\x02".to_vec();
        for _ in 0..n {
            p.extend(b"}X\x01\x00\x00\x00a");
        }
        p.push(b'}');
        p.extend(std::iter::repeat_n(b's', n));
        p.push(b'.');
        assert!(unpickle(&p).unwrap_err().contains("more than 16 deep"));
    }

    #[test]
    fn long_names_are_bounded_one_by_one_and_in_total() {
        let key = |n: usize| {
            let mut k = b"X".to_vec();
            k.extend((n as u32).to_le_bytes());
            k.extend(std::iter::repeat_n(b'a', n));
            k
        };
        // {"aaa…": {}} with a 5000-byte key.
        let mut p = b"\x80\x02}".to_vec();
        p.extend(key(5000));
        p.extend(b"}s.");
        assert!(unpickle(&p).unwrap_err().contains("name of 5001 bytes"));
        // One 4000-byte key, memoized, for 20 000 entries.
        let mut p = b"\x80\x02}".to_vec();
        p.extend(key(4000));
        p.extend(b"q\x00}s(");
        for _ in 0..20_000 {
            p.extend(b"h\x00}");
        }
        p.extend(b"u.");
        let e = unpickle(&p).unwrap_err();
        assert!(e.contains("names add up to more than"), "{e}");
    }

    #[test]
    fn a_dict_inside_itself_is_walked_once() {
        // d = {}; d["self"] = d
        let p = b"\x80\x02}q\x00X\x04\x00\x00\x00selfh\x00s.";
        assert!(unpickle(p).unwrap().is_empty());
    }

    #[test]
    fn malformed_stacks_are_errors() {
        for (p, want) in [
            (&b"\x80\x02."[..], "underflow"),
            (b"\x80\x02(.", "underflow"),
            (b"\x80\x02t.", "no MARK"),
            (b"\x80\x02}", "without STOP"),
            (b"\x80\x02K\x00K\x01K\x02s.", "SETITEM on a int"),
            (b"\x80\x02K\x01K\x02s.", "empty stack"),
            (b"\x80\x02]]\x85R.", "REDUCE calls a list"),
            (b"\x80\x02\x8a\x09123456789.", "too large"),
            (b"\x80\x09.", "protocol 9"),
            (
                b"\x80\x02ctorch\nFloatStorage\n)R.",
                "calls torch.FloatStorage with",
            ),
        ] {
            let e = unpickle(p).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn unknown_opcodes_are_named() {
        let e = unpickle(b"\x80\x02\x8b\x01\x00\x00\x00\x00.").unwrap_err();
        assert!(e.contains("opcode LONG4 (0x8b)"), "{e}");
        let e = unpickle(b"\x80\x02S'x'\n.").unwrap_err();
        assert!(e.contains("opcode STRING"), "{e}");
        let e = unpickle(b"\x80\x02\xfe.").unwrap_err();
        assert!(e.contains("0xfe"), "{e}");
    }

    #[test]
    fn refused_globals_are_named_whatever_the_opcode() {
        for (p, name) in [
            (&b"\x80\x02cos\nsystem\n."[..], "os.system"),
            (
                b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93.",
                "builtins.exec",
            ),
            (b"(ios\nsystem\n.", "os.system"),
            (b"\x80\x02c__builtin__\neval\n.", "__builtin__.eval"),
            (b"\x80\x02ctorch\nload\n.", "torch.load"),
            (
                b"\x80\x02ctorch._utils\n_rebuild_qtensor\n.",
                "torch._utils._rebuild_qtensor",
            ),
            (b"\x80\x02ctorch\n_C_Storage\n.", "torch._C_Storage"),
        ] {
            let e = unpickle(p).unwrap_err();
            assert!(e.contains(&format!("calls {name}")), "{e}");
            assert!(e.contains("refusing to run code"), "{e}");
        }
    }

    #[test]
    fn long1_is_sign_extended() {
        let resolve = no_storage;
        let mut m = Machine::new(b"\x8a\x02\xfe\xff.", &resolve);
        assert!(matches!(m.run().unwrap(), Value::Int(-2)));
        let mut m = Machine::new(b"\x8a\x00.", &resolve);
        assert!(matches!(m.run().unwrap(), Value::Int(0)));
    }

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(!is_contiguous(&[2, 3], &[0, 1]));
    }
}
