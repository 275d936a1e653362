//! The restricted unpickler: Python's unpickler minus everything that imports
//! or calls, plus an interpretation of torch's rebuild functions (the opcodes
//! and globals it accepts are listed in the parent module's documentation).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;

use super::tensor::{Elem, TensorEntry, TorchDtype, OTHER_DTYPES};
use super::zip::Archive;
use super::{printable, to_usize};

/// Most dimensions a tensor may have.
const MAX_RANK: usize = 32;
/// Deepest nesting of dicts searched for tensors.
const MAX_DICT_DEPTH: usize = 16;
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

/// Runs the restricted unpickler over the archive's data.pkl and lists its tensors.
pub(super) fn state_dict(
    archive: &Archive,
    bytes: &[u8],
) -> std::result::Result<Vec<(String, TensorEntry)>, String> {
    let pickle = archive
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
        archive.member(&format!("data/{key}"))?.ok_or_else(|| {
            format!(
                "data.pkl refers to storage '{}', but the archive has no {}/data/{}",
                printable(key),
                archive.prefix,
                printable(key)
            )
        })
    };
    let mut machine = Machine::new(pickle, &resolve);
    let root = machine.run()?;
    machine.state_dict(&root)
}

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
}
