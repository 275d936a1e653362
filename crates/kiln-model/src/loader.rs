//! Finds a model on disk, whatever its format, and loads everything that
//! serving it needs: decoder weights, tokenizer, chat template, stop ids.

use std::path::{Path, PathBuf};

use kiln_backend::Backend;
use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::gguf::{GgufFile, Value};
use crate::layouts::Layouts;
use crate::tokenizer::Tokenizer;
use crate::weights::{gpt2_conv1d, hf_names, SafetensorsSource, Transposed, WeightSource};
use crate::{ModelError, Result};

/// The checkpoint layout a path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face directory (`config.json` + safetensors + `tokenizer.json`).
    HfDir(PathBuf),
}

impl ModelFormat {
    /// Decides what `path` is: a `.gguf` file, a directory with `config.json`,
    /// or a directory holding exactly one `.gguf` file.
    pub fn detect(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if meta.is_file() {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        if path.join("config.json").is_file() {
            return Ok(Self::HfDir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Ok(Self::Gguf(one.clone())),
            [] => Err(ModelError::Format {
                path: path.to_path_buf(),
                msg: "no model here: expected config.json (Hugging Face layout) or one .gguf file"
                    .into(),
            }),
            _ => Err(ModelError::Format {
                path: path.to_path_buf(),
                msg: format!("{} .gguf files: name the one to load", ggufs.len()),
            }),
        }
    }
}

/// Options that change how a model is loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Cap on prompt + output length; defaults to the model's own maximum.
    pub max_positions: Option<usize>,
    /// Precision of the weights (`option.dtype`).
    pub dtype: WeightDtype,
    /// Block format to quantize float weight matrices to while loading
    /// (`option.quantize`); see [`crate::convert`]. `None` keeps them as stored.
    pub quantize: Option<kiln_backend::GgmlType>,
}

/// The precision weights are loaded in (`option.dtype`). Backends compute in
/// their own type (f32 on the CPU); asking for fp16 or bf16 rounds every
/// unquantized weight to that precision at load, so a CPU run reproduces what
/// a 16-bit deployment of the same checkpoint computes. Quantized GGUF
/// weights are kept as they are.
///
/// Its names are the one table that `--dtype`, `option.dtype` and `kiln
/// inspect` read ([`WeightDtype::parse`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// As stored in the checkpoint.
    #[default]
    Auto,
    /// 32-bit float (`fp32`, also `f32`, `float32`, `float`).
    F32,
    /// 16-bit float (`fp16`, also `f16`, `float16`, `half`).
    F16,
    /// bfloat16 (`bf16`, also `bfloat16`).
    Bf16,
}

impl WeightDtype {
    /// The canonical spellings, as listed in errors.
    pub const ALLOWED: &'static str = "auto, fp32, fp16, bf16";

    /// Parses a name case-insensitively: DJL's (`fp16`), PyTorch's
    /// (`float16`, `half`) and GGUF's (`f16`) spellings alike.
    pub fn parse(name: &str) -> Option<WeightDtype> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "auto" => WeightDtype::Auto,
            "fp32" | "f32" | "float32" | "float" => WeightDtype::F32,
            "fp16" | "f16" | "float16" | "half" => WeightDtype::F16,
            "bf16" | "bfloat16" => WeightDtype::Bf16,
            _ => return None,
        })
    }

    /// The canonical (DJL) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::F32 => "fp32",
            WeightDtype::F16 => "fp16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per value; `None` for `auto` (the checkpoint decides).
    pub fn bytes(self) -> Option<usize> {
        match self {
            WeightDtype::Auto => None,
            WeightDtype::F32 => Some(4),
            WeightDtype::F16 | WeightDtype::Bf16 => Some(2),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model ready to run: the decoder plus the text side around it.
pub struct LoadedModel<B: Backend> {
    pub decoder: Decoder<B>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end generation (the tokenizer's EOS-like ids and generation_config's).
    pub eos_ids: Vec<u32>,
    pub format: ModelFormat,
}

/// Loads the model at `path` onto `backend`.
pub fn load<B: Backend>(backend: &B, path: &Path, opts: &LoadOptions) -> Result<LoadedModel<B>> {
    load_with(backend, path, opts, &Layouts::Off)
}

/// [`load`], with the matrices already in the backend's layout taken from
/// `layouts` where it holds them (or recorded there for writing one); see
/// [`crate::layouts`].
pub fn load_with<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    layouts: &Layouts,
) -> Result<LoadedModel<B>> {
    open(path, false)?.load(backend, opts, None, layouts)
}

/// A model's text side and weight source, found and opened but no weight
/// read yet.
pub(crate) struct Opened {
    cfg: DecoderConfig,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    extra_eos: Vec<u32>,
    src: Box<dyn WeightSource>,
    format: ModelFormat,
    /// The metadata a prepared copy of this model carries so that it loads
    /// the same way: a GGUF file's own metadata, or a Hugging Face
    /// directory's config, tokenizer and chat template as text (see
    /// [`crate::prepared`]).
    pub carry: Vec<(String, Value)>,
}

impl Opened {
    /// Reads the weights onto `backend`; with `spool`, every tensor is also
    /// written there as the decoder takes it.
    pub(crate) fn load<B: Backend>(
        self,
        backend: &B,
        opts: &LoadOptions,
        spool: Option<&crate::prepared::Spool>,
        layouts: &Layouts,
    ) -> Result<LoadedModel<B>> {
        finish(
            backend,
            self.cfg,
            &*self.src,
            self.tokenizer,
            self.template,
            self.extra_eos,
            opts,
            self.format,
            spool,
            layouts,
        )
    }
}

impl Opened {
    /// About how many tensors a prepared copy of this model holds, to size
    /// its header ([`crate::gguf_write::header_room`]): a layer has at most
    /// about 20 (attention, feed-forward or stacked experts, norms and
    /// biases), and a few more lie outside the layers.
    pub(crate) fn tensors_expected(&self) -> usize {
        20 * self.cfg.n_layers + 16
    }

    /// The same model with its weight source wrapped by `f` (a packed
    /// prepared file's placeholders, [`crate::prepared::load_packed`]).
    pub(crate) fn wrap_source(
        mut self,
        f: impl FnOnce(Box<dyn WeightSource>) -> Box<dyn WeightSource>,
    ) -> Self {
        self.src = f(self.src);
        self
    }
}

/// Finds the model at `path` and opens everything but its weights;
/// `carry` asks for [`Opened::carry`] too (else it may be left empty).
pub(crate) fn open(path: &Path, carry: bool) -> Result<Opened> {
    let format = ModelFormat::detect(path)?;
    match &format {
        ModelFormat::Gguf(file) => {
            let gguf = GgufFile::open(file)?;
            let carry = if carry {
                crate::prepared::carried(&gguf)
            } else {
                Vec::new()
            };
            let (cfg, tokenizer, template, extra_eos) =
                if let Some(embedded) = crate::prepared::EmbeddedHf::read(&gguf)? {
                    embedded.into_parts(file)?
                } else {
                    let cfg = DecoderConfig::from_gguf(&gguf)?;
                    let tokenizer = Tokenizer::from_gguf(&gguf)?;
                    let template = gguf
                        .get_str("tokenizer.chat_template")
                        .map(|src| compile_template(src, &tokenizer))
                        .transpose()?;
                    (cfg, tokenizer, template, Vec::new())
                };
            // llama.cpp's gpt-oss files name the pre-FFN norm differently.
            let src: Box<dyn WeightSource> = if cfg.arch == "gpt-oss" {
                Box::new(crate::gpt_oss::GgufNames { inner: gguf })
            } else {
                Box::new(gguf)
            };
            Ok(Opened {
                cfg,
                tokenizer,
                template,
                extra_eos,
                src,
                format,
                carry,
            })
        }
        ModelFormat::HfDir(dir) => {
            let cfg_path = dir.join("config.json");
            let cfg_text = crate::files::read_text_bounded(
                &cfg_path,
                crate::files::MAX_CONFIG_BYTES,
                "a config.json",
            )?;
            let cfg_json: Json =
                serde_json::from_str(&cfg_text).map_err(|e| ModelError::Config {
                    path: cfg_path.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let cfg = DecoderConfig::from_hf_json(&cfg_json, &cfg_path)?;
            let tok_path = dir.join("tokenizer.json");
            let tok_text = crate::files::read_text_bounded(
                &tok_path,
                crate::files::MAX_TOKENIZER_BYTES,
                "a tokenizer.json",
            )?;
            let tok_cfg_path = dir.join("tokenizer_config.json");
            let tok_cfg_text = tok_cfg_path
                .is_file()
                .then(|| {
                    crate::files::read_text_bounded(
                        &tok_cfg_path,
                        crate::files::MAX_CONFIG_BYTES,
                        "a tokenizer_config.json",
                    )
                })
                .transpose()?;
            let tok_cfg = tok_cfg_text
                .as_deref()
                .map(|t| parse_json(t, &tok_cfg_path))
                .transpose()?;
            let tokenizer =
                Tokenizer::from_hf_bytes(tok_text.as_bytes(), tok_cfg.as_ref(), &tok_path)?;
            let template_src = hf_chat_template(dir, tok_cfg.as_ref())?;
            let template = template_src
                .as_deref()
                .map(|src| compile_template(src, &tokenizer))
                .transpose()?;
            let mut extra_eos = eos_ids_of(&cfg_json);
            let gen_path = dir.join("generation_config.json");
            if gen_path.is_file() {
                extra_eos.extend(eos_ids_of(&read_json(&gen_path)?));
            }
            let src = open_hf_weights(dir, &cfg.arch)?;
            let carry = crate::prepared::EmbeddedHf {
                config: cfg_text,
                tokenizer: tok_text,
                tokenizer_config: tok_cfg_text,
                chat_template: template_src,
                extra_eos: extra_eos.clone(),
            }
            .metadata(&cfg.arch);
            Ok(Opened {
                cfg,
                tokenizer,
                template,
                extra_eos,
                src,
                format,
                carry,
            })
        }
    }
}

/// A source whose float weights are rounded to 16-bit precision as they are
/// read: matrices are stored in that format (half the memory of f32), other
/// tensors keep f32 storage with rounded values.
struct Rounded<'a> {
    inner: &'a dyn WeightSource,
    dtype: WeightDtype,
}

impl Rounded<'_> {
    fn round(&self, v: &mut [f32]) {
        match self.dtype {
            WeightDtype::F16 => v
                .iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
            WeightDtype::Bf16 => v
                .iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
            WeightDtype::Auto | WeightDtype::F32 => {}
        }
    }
}

impl WeightSource for Rounded<'_> {
    fn get(&self, name: &str) -> Result<crate::HostTensor> {
        let mut t = self.inner.get(name)?;
        self.round(&mut t.data);
        Ok(t)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, kiln_backend::WeightData)> {
        let (shape, data) = self.inner.get_weight(name)?;
        let to = match self.dtype {
            WeightDtype::F16 => kiln_backend::GgmlType::F16,
            WeightDtype::Bf16 => kiln_backend::GgmlType::BF16,
            WeightDtype::Auto | WeightDtype::F32 => return Ok((shape, data)),
        };
        let data = data.into_float(to).map_err(|msg| ModelError::Tensor {
            path: self.inner.describe().into(),
            tensor: name.to_string(),
            msg,
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

/// The weights of a Hugging Face directory, under kiln's canonical names:
/// safetensors when present, else a PyTorch checkpoint (read without running
/// pickle code); GPT-2's Conv1D matrices are transposed as they are read.
pub fn open_hf_weights(dir: &Path, model_type: &str) -> Result<Box<dyn WeightSource>> {
    let names = match model_type {
        "gemma3" => crate::gemma::multimodal_names(dir),
        _ => hf_names(model_type),
    };
    let has = |f: &str| dir.join(f).is_file();
    if model_type == "gpt_oss" && (has("model.safetensors") || has("model.safetensors.index.json"))
    {
        // gpt-oss's experts may be MXFP4 pairs, which this source reads.
        let inner = SafetensorsSource::open_dir(dir, names)?;
        return Ok(Box::new(crate::gpt_oss::HfExperts { inner }));
    }
    let src: Box<dyn WeightSource> =
        if has("model.safetensors") || has("model.safetensors.index.json") {
            Box::new(SafetensorsSource::open_dir(dir, names)?)
        } else if has("pytorch_model.bin") || has("pytorch_model.bin.index.json") {
            Box::new(crate::torch::TorchSource::open_dir(dir, names)?)
        } else {
            return Err(ModelError::Format {
                path: dir.to_path_buf(),
                msg: "no weights: expected model.safetensors, model.safetensors.index.json, \
                  pytorch_model.bin or pytorch_model.bin.index.json"
                    .into(),
            });
        };
    Ok(if model_type == "gpt2" {
        Box::new(Transposed {
            inner: src,
            which: gpt2_conv1d,
        })
    } else if model_type == "gpt_oss" {
        Box::new(crate::gpt_oss::HfExperts { inner: src })
    } else {
        src
    })
}

#[allow(clippy::too_many_arguments)]
fn finish<B: Backend>(
    backend: &B,
    cfg: DecoderConfig,
    src: &dyn WeightSource,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    extra_eos: Vec<u32>,
    opts: &LoadOptions,
    format: ModelFormat,
    spool: Option<&crate::prepared::Spool>,
    layouts: &Layouts,
) -> Result<LoadedModel<B>> {
    let max_positions = opts.max_positions.map_or(cfg.max_position_embeddings, |m| {
        m.min(cfg.max_position_embeddings)
    });
    tracing::info!(
        arch = %cfg.arch,
        layers = cfg.n_layers,
        hidden = cfg.hidden_size,
        params = cfg.param_count(),
        "loading weights from {}",
        src.describe()
    );
    // A first start (converting into a prepared file, or rearranging into
    // a layout file) says how far it is.
    let progress = (spool.is_some() || matches!(layouts, Layouts::Record(_))).then(|| {
        let (verb, path) = match &format {
            ModelFormat::Gguf(p) | ModelFormat::HfDir(p) => (
                if spool.is_some() {
                    "converting"
                } else {
                    "rearranging"
                },
                p,
            ),
        };
        crate::load_progress::LoadProgress::start(
            format!("{verb} {}", path.display()),
            crate::load_progress::checkpoint_bytes(path),
            crate::load_progress::LOG_EVERY,
        )
    });
    let counted;
    let src: &dyn WeightSource = match &progress {
        Some(progress) => {
            counted = crate::load_progress::Counted {
                inner: src,
                progress,
            };
            &counted
        }
        None => src,
    };
    let rounded;
    let src: &dyn WeightSource = match opts.dtype {
        WeightDtype::F16 | WeightDtype::Bf16 => {
            rounded = Rounded {
                inner: src,
                dtype: opts.dtype,
            };
            &rounded
        }
        WeightDtype::Auto | WeightDtype::F32 => src,
    };
    let quantized;
    let src: &dyn WeightSource = match opts.quantize {
        Some(to) => {
            tracing::info!(
                "quantizing float weight matrices to {} while loading",
                crate::names::quantize_name(to)
            );
            quantized = crate::convert::Quantized { inner: src, to };
            &quantized
        }
        None => src,
    };
    let recorder;
    let src: &dyn WeightSource = match spool {
        Some(out) => {
            recorder = crate::prepared::Recorder {
                inner: src,
                spool: out,
            };
            &recorder
        }
        None => src,
    };
    let t0 = std::time::Instant::now();
    let decoder = Decoder::load_with(backend, cfg, src, max_positions, layouts)?;
    if opts.quantize.is_some() {
        tracing::info!("weights loaded and quantized in {:.2?}", t0.elapsed());
    }
    let mut eos_ids = tokenizer.eos_ids().to_vec();
    for id in extra_eos {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    Ok(LoadedModel {
        decoder,
        tokenizer,
        chat_template,
        eos_ids,
        format,
    })
}

pub(crate) fn compile_template(src: &str, tok: &Tokenizer) -> Result<ChatTemplate> {
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    ChatTemplate::new(
        src,
        &name(tok.bos_id()),
        &name(tok.eos_ids().first().copied()),
    )
}

/// The chat template of a Hugging Face directory: `chat_template.jinja`, or the
/// `chat_template` of `tokenizer_config.json` (a string, or a list of named
/// templates of which `default` is used).
fn hf_chat_template(dir: &Path, tok_cfg: Option<&Json>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return crate::files::read_text_bounded(
            &jinja,
            crate::files::MAX_TEMPLATE_BYTES,
            "a chat template",
        )
        .map(Some);
    }
    let Some(json) = tok_cfg else { return Ok(None) };
    Ok(match json.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(String::from),
        _ => None,
    })
}

/// `eos_token_id` (an id or a list of ids) of a parsed `config.json` or
/// `generation_config.json`.
fn eos_ids_of(json: &Json) -> Vec<u32> {
    match json.get("eos_token_id") {
        Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses JSON text that came from `path` (for messages).
pub(crate) fn parse_json(text: &str, path: &Path) -> Result<Json> {
    serde_json::from_str(text).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// Reads a small JSON file of a model (a config), within
/// [`crate::files::MAX_CONFIG_BYTES`].
pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text =
        crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, "a JSON config file")?;
    serde_json::from_slice(&text).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}
