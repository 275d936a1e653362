//! Finds a model on disk, whatever its format, and loads everything that
//! serving it needs: decoder weights, tokenizer, chat template, stop ids.

use std::path::{Path, PathBuf};

use kiln_backend::Backend;
use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::gguf::GgufFile;
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// As stored in the checkpoint.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
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
    let format = ModelFormat::detect(path)?;
    match &format {
        ModelFormat::Gguf(file) => {
            let gguf = GgufFile::open(file)?;
            let cfg = DecoderConfig::from_gguf(&gguf)?;
            let tokenizer = Tokenizer::from_gguf(&gguf)?;
            let template = gguf
                .get_str("tokenizer.chat_template")
                .map(|src| compile_template(src, &tokenizer))
                .transpose()?;
            finish(
                backend,
                cfg,
                &gguf,
                tokenizer,
                template,
                Vec::new(),
                opts,
                format,
            )
        }
        ModelFormat::HfDir(dir) => {
            let cfg = DecoderConfig::from_hf_config(&dir.join("config.json"))?;
            let tok_cfg_path = dir.join("tokenizer_config.json");
            let tok_cfg_path = tok_cfg_path.is_file().then_some(tok_cfg_path);
            let tokenizer =
                Tokenizer::from_hf_files(&dir.join("tokenizer.json"), tok_cfg_path.as_deref())?;
            let template = match hf_chat_template(dir, tok_cfg_path.as_deref())? {
                Some(src) => Some(compile_template(&src, &tokenizer)?),
                None => None,
            };
            let mut extra_eos = eos_token_ids(&dir.join("config.json"))?;
            extra_eos.extend(eos_token_ids(&dir.join("generation_config.json"))?);
            let src = open_hf_weights(dir, &cfg.arch)?;
            finish(
                backend, cfg, &*src, tokenizer, template, extra_eos, opts, format,
            )
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
    let names = hf_names(model_type);
    let has = |f: &str| dir.join(f).is_file();
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
                crate::convert::quantize_name(to)
            );
            quantized = crate::convert::Quantized { inner: src, to };
            &quantized
        }
        None => src,
    };
    let t0 = std::time::Instant::now();
    let decoder = Decoder::load(backend, cfg, src, max_positions)?;
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

fn compile_template(src: &str, tok: &Tokenizer) -> Result<ChatTemplate> {
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
fn hf_chat_template(dir: &Path, tok_cfg: Option<&Path>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return crate::files::read_text_bounded(
            &jinja,
            crate::files::MAX_TEMPLATE_BYTES,
            "a chat template",
        )
        .map(Some);
    }
    let Some(path) = tok_cfg else { return Ok(None) };
    let json = read_json(path)?;
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

/// `eos_token_id` (an id or a list of ids) of `config.json` or
/// `generation_config.json`, if the file exists.
fn eos_token_ids(path: &Path) -> Result<Vec<u32>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let json = read_json(path)?;
    Ok(match json.get("eos_token_id") {
        Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
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
