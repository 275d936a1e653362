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

use std::path::Path;
use std::sync::Mutex;

use kiln_backend::{Backend, WeightData};

use crate::chat::ChatTemplate;
use crate::config::DecoderConfig;
use crate::gguf::{GgufFile, GgufStreamWriter, Value};
use crate::layouts::Layouts;
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
    let opened = crate::loader::open(path, true)?;
    let mut metadata = opened.carry.clone();
    metadata.extend(info.metadata());
    let spool = Mutex::new(GgufStreamWriter::create(out)?);
    let model = opened.load(backend, opts, Some(&spool), layouts)?;
    let writer = spool.into_inner().map_err(|_| ModelError::Format {
        path: out.to_path_buf(),
        msg: "a thread writing the prepared file panicked".into(),
    })?;
    tracing::info!(
        "wrote {} tensors to the prepared file {}",
        writer.len(),
        out.display()
    );
    let size = writer.finish(&metadata).inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })?;
    Ok((model, size))
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
/// conversion, to a prepared file.
pub(crate) struct Recorder<'a> {
    pub inner: &'a dyn WeightSource,
    pub out: &'a Mutex<GgufStreamWriter>,
}

impl Recorder<'_> {
    fn write(&self, name: &str, f: impl FnOnce(&mut GgufStreamWriter) -> Result<()>) -> Result<()> {
        let mut out = self.out.lock().map_err(|_| ModelError::Format {
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
