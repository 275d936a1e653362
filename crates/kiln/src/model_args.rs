//! The model-selection arguments every subcommand shares, and loading.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use kiln_backend::cpu::CpuBackend;
use kiln_model::{LoadOptions, LoadedModel};

/// Which model to load and how.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory. Default: the embedded
    /// default model (SmolLM2-135M-Instruct) from kiln's cache.
    #[arg(long, short = 'm', env = "KILN_MODEL")]
    pub model: Option<PathBuf>,
    /// Cap on prompt + output tokens (default: the model's own context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Quantize the float weight matrices of a 16/32-bit checkpoint while
    /// loading, to one of q8_0, q4_0, q4_1, q4_k, q6_k (as `option.quantize`).
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<kiln_backend::GgmlType>,
}

/// Clap's parser for `--quantize`: the message names what kiln supports.
fn parse_quantize(value: &str) -> Result<kiln_backend::GgmlType, String> {
    kiln_model::convert::parse_quantize(value).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Loads the model onto the CPU backend, logging how long it took.
    pub fn load(&self) -> anyhow::Result<LoadedModel<CpuBackend>> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => kiln_model::default_model::default_model_path()
                .context("no --model given, and the default model is missing")?,
        };
        let t0 = Instant::now();
        let opts = LoadOptions {
            max_positions: self.max_model_len,
            quantize: self.quantize,
            ..LoadOptions::default()
        };
        let model = kiln_model::load(&CpuBackend::new(), &path, &opts)
            .with_context(|| format!("cannot load the model at {}", path.display()))?;
        tracing::info!("loaded {} in {:.2?}", path.display(), t0.elapsed());
        Ok(model)
    }
}
