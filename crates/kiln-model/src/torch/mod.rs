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
//!
//! The reader is split along its jobs: `zip` finds the members of the
//! archive, `unpickle` runs the restricted unpickler over `data.pkl`,
//! `tensor` knows the element types and reads a tensor's (possibly
//! strided) view out of its storage, and `shards` combines the checkpoint
//! files of a model directory into one weight source.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{HostTensor, ModelError, Result};

mod shards;
mod tensor;
mod unpickle;
mod zip;

pub use shards::TorchSource;
pub use tensor::TorchDtype;

use tensor::{check_tensor, materialise, TensorEntry};
use zip::Archive;

/// What a pre-1.6 `torch.save` file starts with: a protocol-2 pickle of the
/// magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19";

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
        let found = unpickle::state_dict(&archive, &bytes).map_err(format_err)?;
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

/// A name from the file, safe and short enough to put in a message.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// A 64-bit count or offset from the file as a `usize`, or None where it does not fit.
fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}
