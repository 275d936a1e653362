//! The typed values of the keys kiln reads: each enum with its names, as
//! DJL spells them, and what kiln does with it.

use std::fmt;
use std::path::{Path, PathBuf};

/// `engine`: how DJL runs the model's Python handler. kiln always runs its own
/// engine; the value only decides which warning to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// `Python` (the LMI default).
    Python,
    /// `MPI`: DJL's multi-process launcher for lmi-dist, TensorRT-LLM, DeepSpeed.
    Mpi,
    /// `DeepSpeed` (deprecated in DJL).
    DeepSpeed,
    /// Any other DJL engine name (`PyTorch`, `OnnxRuntime`, …), kept as written.
    Other(String),
}

impl Engine {
    pub(super) fn parse(value: &str) -> Engine {
        match value.to_ascii_lowercase().as_str() {
            "python" => Engine::Python,
            "mpi" => Engine::Mpi,
            "deepspeed" => Engine::DeepSpeed,
            _ => Engine::Other(value.to_string()),
        }
    }

    /// The name as DJL spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Engine::Python => "Python",
            Engine::Mpi => "MPI",
            Engine::DeepSpeed => "DeepSpeed",
            Engine::Other(name) => name,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.dtype`: the data type for the weights. The same type, and the
/// same table of names, as the CLI's `--dtype` and `kiln inspect` use.
pub use kiln_model::WeightDtype as Dtype;

/// `option.rolling_batch`: which continuous-batching library DJL uses. Every
/// value runs on kiln's own continuous-batching engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RollingBatch {
    /// `auto` (the default): let the server choose.
    #[default]
    Auto,
    /// `disable`: DJL batches statically (or not at all).
    Disable,
    /// `scheduler`: DJL's own Hugging Face scheduler.
    Scheduler,
    /// `lmi-dist`.
    LmiDist,
    /// `vllm`.
    Vllm,
    /// `deepspeed`.
    DeepSpeed,
    /// `trtllm`: TensorRT-LLM.
    TrtLlm,
    /// `tnx`: Transformers NeuronX.
    Tnx,
}

impl RollingBatch {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str =
        "auto, disable, scheduler, lmi-dist, vllm, deepspeed, trtllm, tnx";

    /// Parses a value (case-insensitive).
    pub fn parse(value: &str) -> Option<RollingBatch> {
        Some(match value.to_ascii_lowercase().as_str() {
            "auto" => RollingBatch::Auto,
            "disable" => RollingBatch::Disable,
            "scheduler" => RollingBatch::Scheduler,
            "lmi-dist" => RollingBatch::LmiDist,
            "vllm" => RollingBatch::Vllm,
            "deepspeed" => RollingBatch::DeepSpeed,
            "trtllm" => RollingBatch::TrtLlm,
            "tnx" => RollingBatch::Tnx,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RollingBatch::Auto => "auto",
            RollingBatch::Disable => "disable",
            RollingBatch::Scheduler => "scheduler",
            RollingBatch::LmiDist => "lmi-dist",
            RollingBatch::Vllm => "vllm",
            RollingBatch::DeepSpeed => "deepspeed",
            RollingBatch::TrtLlm => "trtllm",
            RollingBatch::Tnx => "tnx",
        }
    }
}

impl fmt::Display for RollingBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.enable_streaming` (deprecated in DJL since 0.25: rolling batch
/// streams when the request asks for it, which is what kiln does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Streaming {
    /// `false` (the default).
    #[default]
    False,
    /// `true`.
    True,
    /// `huggingface`: Hugging Face-style streamed output.
    HuggingFace,
}

impl Streaming {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str = "true, false, huggingface";

    /// Parses a value (case-insensitive, as DJL lowercases it).
    pub fn parse(value: &str) -> Option<Streaming> {
        Some(match value.to_ascii_lowercase().as_str() {
            "false" => Streaming::False,
            "true" => Streaming::True,
            "huggingface" => Streaming::HuggingFace,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Streaming::False => "false",
            Streaming::True => "true",
            Streaming::HuggingFace => "huggingface",
        }
    }
}

impl fmt::Display for Streaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.output_formatter`: the body format of generation responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormatter {
    /// One JSON document (`application/json`), the default.
    #[default]
    Json,
    /// JSON lines (`application/jsonlines`).
    JsonLines,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

impl OutputFormatter {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str = "json, jsonlines, sse";

    /// DJL formatter names that kiln accepts but does not implement: it warns
    /// and uses the default format instead, as DJL does for a formatter it
    /// does not know.
    pub const DJL_ONLY: &'static [&'static str] =
        &["json_chat", "jsonlines_chat", "3p", "3p_stream", "none"];

    /// Parses a value (exact, as DJL compares it).
    pub fn parse(value: &str) -> Option<OutputFormatter> {
        Some(match value {
            "json" => OutputFormatter::Json,
            "jsonlines" => OutputFormatter::JsonLines,
            "sse" => OutputFormatter::Sse,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormatter::Json => "json",
            OutputFormatter::JsonLines => "jsonlines",
            OutputFormatter::Sse => "sse",
        }
    }

    /// The response `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormatter::Json => "application/json",
            OutputFormatter::JsonLines => "application/jsonlines",
            OutputFormatter::Sse => "text/event-stream",
        }
    }
}

impl fmt::Display for OutputFormatter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.tensor_parallel_degree`: how many devices DJL shards the model over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorParallelDegree {
    /// `max` (or `-1`): all devices of the machine.
    Max,
    /// A fixed number of devices.
    Degree(u32),
}

impl fmt::Display for TensorParallelDegree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorParallelDegree::Max => f.write_str("max"),
            TensorParallelDegree::Degree(n) => write!(f, "{n}"),
        }
    }
}

/// Where the weights come from, classified from `option.model_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory or file: absolute, or relative to the model directory.
    LocalPath(PathBuf),
    /// A Hugging Face Hub id (`org/name` or `name`), with `option.revision`.
    HuggingFace {
        /// The model id.
        id: String,
        /// The commit, branch or tag, when given.
        revision: Option<String>,
    },
    /// An `s3://bucket/prefix` URL.
    S3(String),
    /// No `option.model_id`: the weights are in the model directory itself.
    InDirectory,
}

/// Where a model's weights are once its properties are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// On this machine already.
    Local(PathBuf),
    /// To be downloaded into the cache first.
    Remote(kiln_sources::Source),
}

impl ModelSource {
    /// Classifies an `option.model_id` value. Relative paths are taken from
    /// `model_dir`; a value shaped like a Hugging Face id is a local path when a
    /// directory or file of that name exists in `model_dir`.
    pub fn classify(
        value: &str,
        revision: Option<&str>,
        model_dir: &Path,
    ) -> Result<ModelSource, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(ModelSource::InDirectory);
        }
        if let Some(rest) = value.strip_prefix("s3://") {
            if rest.trim_matches('/').is_empty() {
                return Err("is an S3 URL without a bucket".to_string());
            }
            return Ok(ModelSource::S3(value.to_string()));
        }
        if value.starts_with("djl://") {
            return Err("is a DJL model zoo URL, which kiln does not serve: \
                 use a local path, a Hugging Face id or an s3:// URL"
                .to_string());
        }
        if let Some(path) = value.strip_prefix("file://") {
            return Ok(ModelSource::LocalPath(model_dir.join(path)));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(format!(
                "is a {scheme}:// URL; kiln reads local paths, Hugging Face ids and s3:// URLs"
            ));
        }
        let path = Path::new(value);
        if path.is_absolute() || value.starts_with('.') || model_dir.join(path).exists() {
            return Ok(ModelSource::LocalPath(model_dir.join(path)));
        }
        if is_hf_id(value) {
            return Ok(ModelSource::HuggingFace {
                id: value.to_string(),
                revision: revision.map(str::to_string),
            });
        }
        Ok(ModelSource::LocalPath(model_dir.join(path)))
    }
}

/// Whether `value` has the shape of a Hugging Face Hub id: `name` or
/// `namespace/name`, each of `[A-Za-z0-9_.-]`, not starting or ending with
/// `.` or `-`, without `..` or `--`, names at most 96 characters.
pub fn is_hf_id(value: &str) -> bool {
    kiln_sources::looks_like_hub_id(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_ids() {
        for id in [
            "facebook/opt-13b",
            "gpt2",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "a_b/c.d",
        ] {
            assert!(is_hf_id(id), "{id}");
        }
        for id in [
            "a/b/c", "-a/b", "a./b", "a/b..c", "a/b--c", "", "a b", "a/", "/a",
        ] {
            assert!(!is_hf_id(id), "{id}");
        }
    }
}
