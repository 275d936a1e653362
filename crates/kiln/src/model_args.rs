//! The model-selection arguments every subcommand shares, and loading.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_engine::launch::DeviceModel;
use kiln_engine::load::{self, LoadModelError, LoadReport, LoadSpec, ModelLocation};
use kiln_engine::Device;
use kiln_model::{LoadOptions, WeightDtype};
use kiln_sources::Source;

/// Which model to load and how.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory; or a remote model,
    /// downloaded once into the cache: s3://bucket/prefix, hf://org/name, or
    /// a Hub id (org/name) that is not a local path. Default: the embedded
    /// default model (SmolLM2-135M-Instruct) from kiln's cache.
    #[arg(long, short = 'm', env = "KILN_MODEL")]
    pub model: Option<String>,
    /// The branch, tag or commit of a Hub model (DJL's option.revision).
    #[arg(long)]
    pub revision: Option<String>,
    /// Cap on prompt + output tokens (default: the model's own context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Quantize the float weight matrices of a 16/32-bit checkpoint while
    /// loading, to one of q8_0, q4_0, q4_1, q4_k, q6_k (as `option.quantize`).
    /// The result is kept in the prepared-model cache: the next start with
    /// the same model and settings maps it and converts nothing.
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<kiln_backend::GgmlType>,
    /// Round the weights to this precision while loading: fp16, bf16 (kept
    /// in the prepared-model cache like --quantize), or fp32 / auto.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<WeightDtype>,
    /// GiB the prepared-model cache may hold; least recently used entries
    /// beyond it are evicted. Default: unbounded.
    #[arg(long, env = "KILN_CACHE_MAX_GIB", value_parser = load::parse_cache_max_gib)]
    pub cache_max_gib: Option<u64>,
    /// Where the model runs: cpu, cuda or cuda:N (a GPU; needs a kiln built
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu", env = "KILN_DEVICE", value_parser = parse_device)]
    pub device: Device,
}

/// Clap's parser for `--device` (of `serve` too).
pub fn parse_device(value: &str) -> Result<Device, String> {
    Device::parse(value).map_err(|e| e.to_string())
}

/// Clap's parser for `--quantize` (of `prepare` and `inspect` too), with
/// `option.quantize`'s names: the message names what kiln supports.
pub fn parse_quantize(value: &str) -> Result<kiln_backend::GgmlType, String> {
    kiln_model::names::parse_quantize(value).map_err(|e| e.to_string())
}

/// Clap's parser for `--dtype`, with `option.dtype`'s names.
pub fn parse_dtype(value: &str) -> Result<WeightDtype, String> {
    WeightDtype::parse(value).ok_or_else(|| {
        format!(
            "'{value}' is not a dtype kiln knows; use one of {}",
            WeightDtype::ALLOWED
        )
    })
}

impl ModelArgs {
    /// The load options these arguments ask for.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            max_positions: self.max_model_len,
            quantize: self.quantize,
            dtype: self.dtype.unwrap_or_default(),
        }
    }

    /// Loads the model onto `--device`, logging how long it took.
    pub fn load(&self) -> anyhow::Result<DeviceModel> {
        Ok(self.load_reporting(false)?.0)
    }

    /// Loads the model onto `--device` (through the prepared-model cache
    /// when it converts, or always with `always_prepare`) and says how, by
    /// the path the server's registry takes too ([`load::load`]): the device
    /// is checked first, so an unusable GPU fails before any download.
    pub fn load_reporting(
        &self,
        always_prepare: bool,
    ) -> anyhow::Result<(DeviceModel, LoadReport)> {
        let model = match &self.model {
            Some(m) => resolve(m, self.revision.as_deref())?,
            None => ModelLocation::Local(
                kiln_model::default_model::default_model_path()
                    .context("no --model given, and the default model is missing")?,
            ),
        };
        let spec = LoadSpec {
            cache_max_bytes: self.cache_max_gib,
            always_prepare,
            ..LoadSpec::new(model, self.device, self.options())
        };
        match load::load(&spec) {
            Ok(loaded) => Ok((loaded.model, loaded.report)),
            // The CLI names the file it read, and where it came from.
            Err(LoadModelError::Load {
                path,
                remote,
                error,
            }) => {
                let from = remote
                    .map(|(_, url)| format!(" (downloaded from {url})"))
                    .unwrap_or_default();
                Err(anyhow::Error::new(error)
                    .context(format!("cannot load the model at {}{from}", path.display())))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Where `--model` points: the path itself, or a remote model to download
/// into the cache. The same rule as `option.model_id`: an existing path wins
/// over a Hub id of the same shape.
pub fn resolve(model: &str, revision: Option<&str>) -> anyhow::Result<ModelLocation> {
    let source = match Source::parse(model) {
        Some(source) => source?,
        None if Path::new(model).exists() || !kiln_sources::looks_like_hub_id(model) => {
            return Ok(ModelLocation::Local(PathBuf::from(model)))
        }
        None => Source::hub(model, revision)?,
    };
    if revision.is_some() && matches!(source, Source::S3 { .. }) {
        anyhow::bail!("--revision applies to Hugging Face models, not to {source}");
    }
    Ok(ModelLocation::Remote(source))
}
