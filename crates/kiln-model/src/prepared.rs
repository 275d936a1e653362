//! Prepared models: a converted model written once as one GGUF file, so that
//! later starts map it instead of converting again.
//!
//! Why GGUF: kiln already reads it with a memory map (weights are used in
//! place, no copy), it stores every block format the CPU backend computes,
//! and it is self-describing: its metadata holds everything else a model
//! needs. A prepared file holds
//!
//! - every tensor exactly as the decoder took it after conversion (quantized
//!   matrices, f32 norms and biases; GPT-2's transposed matrices already
//!   transposed), under kiln's canonical (llama.cpp) names;
//! - for a GGUF source, the source's metadata unchanged (architecture,
//!   tokenizer, chat template); for a Hugging Face directory, its
//!   `config.json`, `tokenizer.json` (as `tokenizer.huggingface.json`, the
//!   GGUF spec's key for it), `tokenizer_config.json`, chat template and the
//!   end-of-generation ids of `generation_config.json`, as text, so that every
//!   architecture kiln loads from a directory loads from its prepared file;
//! - under `kiln.prepared.*`, what it was made from and how: the cache key,
//!   the source, the source's content identity, the conversion settings and
//!   [`ARTIFACT_VERSION`].
//!
//! The cache around these files (keys, location, locking, eviction) is
//! `kiln_sources::prepared`; this module writes and recognises the files.
//!
//! # Packed prepared models: each weight once on disk
//!
//! A backend that rearranges its matrices (the CPU backend's interleaved
//! groups, [`crate::layouts`]) computes from a layout file, not from the
//! GGUF's rows. A conversion into the cache for such a backend
//! ([`load_and_prepare_packed`]) therefore writes each matrix once, where it
//! is used: every matrix the backend rearranged goes to the entry's layout
//! file only (streamed as it is made), and the GGUF file holds everything
//! else (metadata, tokenizer, norms, biases, the embedding table, any
//! matrix the backend kept as it was) and lists the matrices it leaves out
//! under `kiln.prepared.packed_tensors` (name, shape, type) with the layout's
//! name under `kiln.prepared.packed_layout` ([`packed_layout`]). Which matrices those are is
//! settled after the load: a tensor read once as a table and once as a
//! matrix (tied embeddings) stays in the GGUF file, since the table reads
//! its rows there.
//!
//! A later start ([`load_packed`]) maps both: the listed matrices are
//! placeholders of untouched anonymous memory (no bytes read or copied) and
//! the layout file must hold each of them, exactly, or the load fails (and
//! the caller rebuilds the entry); nothing is ever computed from a
//! placeholder. Such a GGUF file does not load alone ([`packed_layout`]
//! tells it apart); `kiln prepare`, which publishes a portable file, writes a whole
//! one with [`load_and_prepare`].

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_backend::{Backend, GgmlType, HostBytes, WeightData};
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::config::DecoderConfig;
use crate::gguf::{GgufFile, GgufStreamWriter, Value};
use crate::layouts::{LayoutFile, Layouts};
use crate::loader::{LoadOptions, LoadedModel, ModelFormat, WeightDtype};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;
use crate::{HostTensor, ModelError, Result};

/// Version of the prepared-file layout and of the conversions that fill it.
/// Part of every cache key: raising it (when a quantizer's output or the
/// metadata layout changes) makes older prepared files misses, not wrong
/// models.
pub const ARTIFACT_VERSION: u32 = 1;

const PREFIX: &str = "kiln.prepared.";
const KEY_HF_CONFIG: &str = "kiln.hf.config_json";
const KEY_HF_TOKENIZER: &str = "tokenizer.huggingface.json";
const KEY_HF_TOKENIZER_CONFIG: &str = "kiln.hf.tokenizer_config_json";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_EXTRA_EOS: &str = "kiln.eos_token_ids";
/// A packed prepared file's layout name.
const KEY_PACKED_LAYOUT: &str = "kiln.prepared.packed_layout";
/// A packed prepared file's list of the matrices only its layout file holds.
const KEY_PACKED_TENSORS: &str = "kiln.prepared.packed_tensors";

/// What a prepared file was made from and how (its `kiln.prepared.*`
/// metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedInfo {
    /// The prepared-model cache key.
    pub key: String,
    /// The source: a URL (`s3://…`, `hf://…`) or a local path.
    pub source: String,
    /// The source's content identity (JSON: its files' names, sizes and
    /// ETags or modification times).
    pub identity: String,
    /// The conversion settings, see [`Settings`].
    pub settings: Settings,
    /// [`ARTIFACT_VERSION`] of the kiln that wrote it.
    pub artifact_version: u32,
}

/// The conversion settings that change a prepared file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `option.quantize`'s name (`q8_0`, …) or `none`.
    pub quantize: String,
    /// `option.dtype` as it changes weights: `f16`, `bf16` or `auto` (f32
    /// and auto keep the stored values).
    pub dtype: String,
}

impl Settings {
    /// The settings `opts` ask for.
    pub fn of(opts: &LoadOptions) -> Self {
        Settings {
            quantize: opts
                .quantize
                .map_or("none", crate::names::quantize_name)
                .to_string(),
            dtype: match opts.dtype {
                WeightDtype::F16 => "f16",
                WeightDtype::Bf16 => "bf16",
                WeightDtype::Auto | WeightDtype::F32 => "auto",
            }
            .to_string(),
        }
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quantize={} dtype={}", self.quantize, self.dtype)
    }
}

/// Whether loading the model at `path` with `opts` converts weights (and
/// so is worth preparing): a quantization, or a 16-bit dtype other than
/// the one a Hugging Face directory's `config.json` says its weights are
/// stored in (an fp16 checkpoint served as fp16 is mapped as it is).
pub fn converts(path: &Path, opts: &LoadOptions) -> bool {
    if opts.quantize.is_some() {
        return true;
    }
    match opts.dtype {
        WeightDtype::F16 | WeightDtype::Bf16 => declared_dtype(path) != Some(opts.dtype),
        WeightDtype::Auto | WeightDtype::F32 => false,
    }
}

/// The weights' dtype a Hugging Face directory's `config.json` declares
/// (`torch_dtype`, or `dtype` in newer files); `None` when unknown.
fn declared_dtype(path: &Path) -> Option<WeightDtype> {
    let cfg = path.join("config.json");
    if !cfg.is_file() {
        return None;
    }
    let json = crate::loader::read_json(&cfg).ok()?;
    let name = json
        .get("torch_dtype")
        .or_else(|| json.get("dtype"))
        .and_then(serde_json::Value::as_str)?;
    match name {
        "float16" => Some(WeightDtype::F16),
        "bfloat16" => Some(WeightDtype::Bf16),
        "float32" => Some(WeightDtype::F32),
        _ => None,
    }
}

/// `opts` without the conversion: how a prepared file is loaded.
pub fn as_prepared(opts: &LoadOptions) -> LoadOptions {
    LoadOptions {
        max_positions: opts.max_positions,
        ..LoadOptions::default()
    }
}

impl PreparedInfo {
    /// Whether this file is what loading with `opts` would produce (same
    /// settings, same artifact version), so it can be mapped as it is.
    pub fn matches(&self, opts: &LoadOptions) -> bool {
        self.artifact_version == ARTIFACT_VERSION && self.settings == Settings::of(opts)
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let s = |v: &str| Value::String(v.to_string());
        vec![
            (format!("{PREFIX}key"), s(&self.key)),
            (format!("{PREFIX}source"), s(&self.source)),
            (format!("{PREFIX}source_identity"), s(&self.identity)),
            (format!("{PREFIX}quantize"), s(&self.settings.quantize)),
            (format!("{PREFIX}dtype"), s(&self.settings.dtype)),
            (
                format!("{PREFIX}artifact_version"),
                Value::U32(self.artifact_version),
            ),
        ]
    }

    /// The record in a GGUF file's metadata, when it is a prepared file.
    pub fn from_gguf(g: &GgufFile) -> Option<Self> {
        let s = |k: &str| g.get_str(&format!("{PREFIX}{k}")).map(str::to_string);
        Some(PreparedInfo {
            key: s("key")?,
            source: s("source")?,
            identity: s("source_identity").unwrap_or_default(),
            settings: Settings {
                quantize: s("quantize")?,
                dtype: s("dtype")?,
            },
            artifact_version: g.get_u64(&format!("{PREFIX}artifact_version"))? as u32,
        })
    }
}

/// The prepared-file record of the model at `path`, when it is a prepared
/// GGUF file (a directory holding one counts); `None` for anything else.
/// A prepared file that is truncated or corrupt is an error naming it.
pub fn read_info(path: &Path) -> Result<Option<PreparedInfo>> {
    let ModelFormat::Gguf(file) = ModelFormat::detect(path)? else {
        return Ok(None);
    };
    Ok(PreparedInfo::from_gguf(&GgufFile::open(file)?))
}

/// For a packed prepared file (see the module docs), the layout whose file
/// holds the matrices it leaves out: such a file does not load alone.
/// `None` for any other model (a directory included).
pub fn packed_layout(path: &Path) -> Result<Option<String>> {
    let ModelFormat::Gguf(file) = ModelFormat::detect(path)? else {
        return Ok(None);
    };
    Ok(GgufFile::open(file)?
        .get_str(KEY_PACKED_LAYOUT)
        .map(str::to_string))
}

/// Loads the model at `path` with `opts`, converting as [`crate::load`]
/// does, and writes the converted model to the prepared file `out` as it
/// goes (each tensor once, as the decoder takes it). Returns the model and
/// the file's size. On error, nothing is left at `out` but what the caller
/// created. `layouts` as in [`crate::load_with`].
pub fn load_and_prepare<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    info: &PreparedInfo,
    out: &Path,
    layouts: &Layouts,
) -> Result<(LoadedModel<B>, u64)> {
    prepare_into(backend, path, opts, info, out, layouts, None)
}

/// [`load_and_prepare`] for a packed entry (see the module docs): `layouts`
/// is a streaming [`crate::layouts::LayoutRecorder`] made
/// [`telling`](crate::layouts::LayoutRecorder::telling) `packed`, writing
/// the entry's layout file of `layout`; the GGUF file at `out` gets every
/// tensor but those the recorder wrote. Returns the model and the GGUF
/// file's size (the caller finishes the layout file).
#[allow(clippy::too_many_arguments)]
pub fn load_and_prepare_packed<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    info: &PreparedInfo,
    out: &Path,
    layouts: &Layouts,
    packed: Arc<PackedTensors>,
    layout: &str,
) -> Result<(LoadedModel<B>, u64)> {
    prepare_into(
        backend,
        path,
        opts,
        info,
        out,
        layouts,
        Some((packed, layout)),
    )
}

/// The body of both entry writers: loads `path` while streaming its tensors
/// into the GGUF file at `out`; with `packed`, the matrices the layout
/// recorder took are left out of it and listed in its metadata instead.
fn prepare_into<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    info: &PreparedInfo,
    out: &Path,
    layouts: &Layouts,
    packed: Option<(Arc<PackedTensors>, &str)>,
) -> Result<(LoadedModel<B>, u64)> {
    let opened = crate::loader::open(path, true)?;
    let mut metadata = opened.carry.clone();
    metadata.extend(info.metadata());
    let spool = Spool {
        out: Mutex::new(GgufStreamWriter::create(
            out,
            crate::gguf_write::header_room(&metadata, opened.tensors_expected()),
        )?),
        packed: packed.as_ref().map(|(p, _)| p.clone()),
    };
    let model = opened.load(backend, opts, Some(&spool), layouts)?;
    let mut writer = spool.out.into_inner().map_err(|_| ModelError::Format {
        path: out.to_path_buf(),
        msg: "a thread writing the prepared file panicked".into(),
    })?;
    match packed {
        None => tracing::info!(
            "wrote {} tensors to the prepared file {}",
            writer.len(),
            out.display()
        ),
        Some((packed, layout)) => {
            let left_out = packed.settle(&mut writer)?;
            tracing::info!(
                "wrote {} tensors to the prepared file {}; {} matrices only to its {layout} file",
                writer.len(),
                out.display(),
                left_out.len()
            );
            let list = serde_json::to_string(&left_out).map_err(|e| ModelError::Format {
                path: out.to_path_buf(),
                msg: format!("cannot list the packed matrices: {e}"),
            })?;
            metadata.push((
                KEY_PACKED_LAYOUT.to_string(),
                Value::String(layout.to_string()),
            ));
            metadata.push((KEY_PACKED_TENSORS.to_string(), Value::String(list)));
        }
    }
    let size = writer.finish(&metadata).inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })?;
    Ok((model, size))
}

/// Loads the packed prepared file `path` (see the module docs) with its
/// layout file `layout`, which must hold every matrix the GGUF file leaves
/// out: an error naming the file when it does not (the entry is to be
/// rebuilt), never a model computed from placeholders.
pub fn load_packed<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    layout: LayoutFile,
) -> Result<LoadedModel<B>> {
    let g = GgufFile::open(path)?;
    let Some(list) = g.get_str(KEY_PACKED_TENSORS) else {
        return Err(ModelError::Format {
            path: path.to_path_buf(),
            msg: format!("is not a packed prepared file (no {KEY_PACKED_TENSORS})"),
        });
    };
    let left_out: Vec<PackedTensor> =
        serde_json::from_str(list).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            msg: format!("its {KEY_PACKED_TENSORS} is not valid: {e}"),
        })?;
    drop(g);
    let mut placeholders = HashMap::with_capacity(left_out.len());
    for t in left_out {
        let ty = GgmlType::from_u32(t.ty).ok_or_else(|| ModelError::Format {
            path: path.to_path_buf(),
            msg: format!("packed matrix {} has unknown type {}", t.name, t.ty),
        })?;
        let cols = t.shape.last().copied().unwrap_or(0);
        let rows: usize = t.shape.iter().rev().skip(1).product();
        let len = kiln_backend::quant::row_bytes(ty, cols)
            .and_then(|r| r.checked_mul(rows))
            .filter(|_| t.shape.len() == 2)
            .ok_or_else(|| ModelError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "packed matrix {} is not a {ty:?} matrix: {:?}",
                    t.name, t.shape
                ),
            })?;
        placeholders.insert(t.name, (t.shape, ty, len));
    }
    let layouts = Layouts::Mapped(layout.required(placeholders.keys().cloned()));
    let opened = crate::loader::open(path, false)?.wrap_source(|inner| {
        Box::new(Placeholders {
            inner,
            placeholders,
        })
    });
    let model = opened.load(backend, opts, None, &layouts)?;
    layouts.finish().map_err(|why| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("its weight layout file does not match it: {why}"),
    })?;
    Ok(model)
}

/// What the loader of a prepared file writes it through: the GGUF writer,
/// and for a packed file the tracker of the tensors left to the layout file.
pub(crate) struct Spool {
    pub out: Mutex<GgufStreamWriter>,
    pub packed: Option<Arc<PackedTensors>>,
}

/// A matrix a packed prepared file leaves to its layout file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PackedTensor {
    name: String,
    /// Row-major.
    shape: Vec<usize>,
    /// ggml's type number.
    ty: u32,
}

/// One read of a matrix during a packed conversion.
struct Read {
    name: String,
    shape: Vec<usize>,
    ty: GgmlType,
    range: Range<usize>,
    /// The bytes, kept until the layout file takes them (then dropped) or
    /// the load ends (then written to the GGUF file).
    data: Option<WeightData>,
}

/// The matrices a packed conversion read, and which of them the layout
/// file took (see the module docs): shared by the prepared file's writer
/// and the [`crate::layouts::LayoutRecorder`] streaming the layout file.
#[derive(Default)]
pub struct PackedTensors {
    reads: Mutex<Vec<Read>>,
}

impl PackedTensors {
    /// A tracker for one conversion.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a read of matrix `name`.
    fn read(&self, name: &str, shape: &[usize], data: &WeightData) {
        let WeightData::Ggml { ty, bytes } = data else {
            return;
        };
        let start = bytes.as_ptr() as usize;
        if let Ok(mut reads) = self.reads.lock() {
            reads.push(Read {
                name: name.to_string(),
                shape: shape.to_vec(),
                ty: *ty,
                range: start..start + bytes.len(),
                data: Some(data.clone()),
            });
        }
    }

    /// The layout file took the bytes at `range` for matrix `name`: the
    /// read they came from (the first one of `name` not yet taken holding
    /// them) needs no place in the GGUF file.
    pub(crate) fn taken(&self, name: &str, range: Range<usize>) {
        let Ok(mut reads) = self.reads.lock() else {
            return;
        };
        let inside = |r: &Read| r.range.start <= range.start && range.end <= r.range.end;
        if let Some(r) = reads
            .iter_mut()
            .find(|r| r.data.is_some() && r.name == name && inside(r))
        {
            r.data = None;
        }
    }

    /// After the load: writes to `out` each matrix read at least once
    /// without the layout file taking it (unless `out` has it already), and
    /// returns the others, which only the layout file holds.
    fn settle(&self, out: &mut GgufStreamWriter) -> Result<Vec<PackedTensor>> {
        let reads = std::mem::take(&mut *self.reads.lock().map_err(|_| ModelError::Format {
            path: out.path().to_path_buf(),
            msg: "a thread loading the model panicked".into(),
        })?);
        let mut kept: Vec<&Read> = Vec::new();
        let mut left_out: Vec<&Read> = Vec::new();
        for r in &reads {
            if r.data.is_some() {
                kept.push(r);
            }
        }
        for r in &reads {
            let needed = kept.iter().any(|k| k.name == r.name) || out.contains(&r.name);
            if !needed && !left_out.iter().any(|l| l.name == r.name) {
                left_out.push(r);
            }
        }
        for r in kept {
            if out.contains(&r.name) {
                continue;
            }
            if let Some(WeightData::Ggml { ty, bytes }) = &r.data {
                out.add(&r.name, &r.shape, *ty, bytes)?;
            }
        }
        Ok(left_out
            .into_iter()
            .map(|r| PackedTensor {
                name: r.name.clone(),
                shape: r.shape.clone(),
                ty: r.ty as u32,
            })
            .collect())
    }
}

/// A packed prepared file's weights: its own tensors, and for each matrix
/// only its layout file holds, bytes of untouched anonymous memory of the
/// right size (no page is ever read or allocated), which the required
/// layout file replaces before anything could compute from them.
struct Placeholders {
    inner: Box<dyn WeightSource>,
    placeholders: HashMap<String, (Vec<usize>, GgmlType, usize)>,
}

impl WeightSource for Placeholders {
    fn get(&self, name: &str) -> Result<HostTensor> {
        if self.placeholders.contains_key(name) {
            return Err(ModelError::Tensor {
                path: self.inner.describe().into(),
                tensor: name.to_string(),
                msg: "is kept only in the weight layout file; it cannot be read as f32".into(),
            });
        }
        self.inner.get(name)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let Some((shape, ty, len)) = self.placeholders.get(name) else {
            return self.inner.get_weight(name);
        };
        let bytes = untouched(*len).ok_or_else(|| ModelError::Tensor {
            path: self.inner.describe().into(),
            tensor: name.to_string(),
            msg: format!("cannot reserve {len} bytes of address space for it"),
        })?;
        Ok((shape.clone(), WeightData::Ggml { ty: *ty, bytes }))
    }

    fn contains(&self, name: &str) -> bool {
        self.placeholders.contains_key(name) || self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// `len` bytes of read-only anonymous memory, never touched: address space,
/// no resident page.
fn untouched(len: usize) -> Option<HostBytes> {
    if len == 0 {
        let empty: kiln_backend::ByteOwner = Arc::new(Vec::<u8>::new());
        return HostBytes::shared(empty, 0..0);
    }
    let map = memmap2::MmapOptions::new()
        .len(len)
        .map_anon()
        .and_then(|m| m.make_read_only())
        .ok()?;
    let owner: kiln_backend::ByteOwner = Arc::new(map);
    HostBytes::shared(owner, 0..len)
}

/// The metadata of `g` that a prepared copy keeps: all but the layout key
/// (`general.alignment`) and an earlier preparation's record.
pub(crate) fn carried(g: &GgufFile) -> Vec<(String, Value)> {
    g.metadata
        .iter()
        .filter(|(k, _)| *k != "general.alignment" && !k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A Hugging Face directory's text side, as a prepared file embeds it.
pub(crate) struct EmbeddedHf {
    pub config: String,
    pub tokenizer: String,
    pub tokenizer_config: Option<String>,
    pub chat_template: Option<String>,
    pub extra_eos: Vec<u32>,
}

/// The parts [`crate::loader`] builds a model from.
type TextSide = (DecoderConfig, Tokenizer, Option<ChatTemplate>, Vec<u32>);

impl EmbeddedHf {
    /// The metadata that carries it.
    pub fn metadata(self, arch: &str) -> Vec<(String, Value)> {
        let mut out = vec![
            (
                "general.architecture".to_string(),
                Value::String(arch.to_string()),
            ),
            (KEY_HF_CONFIG.to_string(), Value::String(self.config)),
            (KEY_HF_TOKENIZER.to_string(), Value::String(self.tokenizer)),
        ];
        if let Some(t) = self.tokenizer_config {
            out.push((KEY_HF_TOKENIZER_CONFIG.to_string(), Value::String(t)));
        }
        if let Some(t) = self.chat_template {
            out.push((KEY_CHAT_TEMPLATE.to_string(), Value::String(t)));
        }
        if !self.extra_eos.is_empty() {
            let ids = self.extra_eos.iter().map(|&i| Value::U32(i)).collect();
            out.push((KEY_EXTRA_EOS.to_string(), Value::Array(ids)));
        }
        out
    }

    /// The embedded directory of a prepared file, when it has one.
    pub fn read(g: &GgufFile) -> Result<Option<Self>> {
        let Some(config) = g.get_str(KEY_HF_CONFIG) else {
            return Ok(None);
        };
        let tokenizer = g
            .get_str(KEY_HF_TOKENIZER)
            .ok_or_else(|| ModelError::Format {
                path: g.path().to_path_buf(),
                msg: format!("has {KEY_HF_CONFIG} but no {KEY_HF_TOKENIZER}"),
            })?;
        let extra_eos = g
            .get(KEY_EXTRA_EOS)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as u32)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(EmbeddedHf {
            config: config.to_string(),
            tokenizer: tokenizer.to_string(),
            tokenizer_config: g.get_str(KEY_HF_TOKENIZER_CONFIG).map(str::to_string),
            chat_template: g.get_str(KEY_CHAT_TEMPLATE).map(str::to_string),
            extra_eos,
        }))
    }

    /// Builds the config, tokenizer and template; `file` names the prepared
    /// file in errors.
    pub fn into_parts(self, file: &Path) -> Result<TextSide> {
        let cfg_json = crate::loader::parse_json(&self.config, file)?;
        let cfg = DecoderConfig::from_hf_json(&cfg_json, file)?;
        let tok_cfg = self
            .tokenizer_config
            .as_deref()
            .map(|t| crate::loader::parse_json(t, file))
            .transpose()?;
        let tokenizer =
            Tokenizer::from_hf_bytes(self.tokenizer.as_bytes(), tok_cfg.as_ref(), file)?;
        let template = self
            .chat_template
            .as_deref()
            .map(|src| crate::loader::compile_template(src, &tokenizer))
            .transpose()?;
        Ok((cfg, tokenizer, template, self.extra_eos))
    }
}

/// A weight source that writes every tensor the decoder takes, after
/// conversion, to a prepared file (for a packed one, the matrices only
/// once the load is over, and only those the layout file did not take).
pub(crate) struct Recorder<'a> {
    pub inner: &'a dyn WeightSource,
    pub spool: &'a Spool,
}

impl Recorder<'_> {
    fn write(&self, name: &str, f: impl FnOnce(&mut GgufStreamWriter) -> Result<()>) -> Result<()> {
        let mut out = self.spool.out.lock().map_err(|_| ModelError::Format {
            path: name.into(),
            msg: "a thread writing the prepared file panicked".into(),
        })?;
        if out.contains(name) {
            return Ok(());
        }
        f(&mut out)
    }
}

impl WeightSource for Recorder<'_> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        let t = self.inner.get(name)?;
        self.write(name, |w| w.add_f32(name, &t.shape, &t.data))?;
        Ok(t)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let (shape, data) = self.inner.get_weight(name)?;
        if let (Some(packed), WeightData::Ggml { .. }) = (&self.spool.packed, &data) {
            packed.read(name, &shape, &data);
            return Ok((shape, data));
        }
        self.write(name, |w| match &data {
            WeightData::F32(v) => w.add_f32(name, &shape, v),
            WeightData::Ggml { ty, bytes } => w.add(name, &shape, *ty, bytes),
        })?;
        Ok((shape, data))
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
