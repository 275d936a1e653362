//! [`ModelProperties`]: a model's validated configuration, and what the
//! server asks of it. Built by [`super::read`] and [`super::validate`].

use std::path::PathBuf;
use std::time::Duration;

use super::chat::ChatOptions;
use super::defaults;
use super::error::PropertiesError;
use super::raw::{Origin, RawProperties};
use super::values::{
    Dtype, Engine, ModelLocation, ModelSource, OutputFormatter, RollingBatch, Streaming,
    TensorParallelDegree,
};

/// A model's validated configuration: `serving.properties` plus environment.
#[derive(Debug, Clone)]
pub struct ModelProperties {
    /// The model directory (relative `option.model_id` paths start here).
    pub model_dir: PathBuf,
    /// The properties file that was read, if there was one.
    pub properties_file: Option<PathBuf>,
    /// `engine` (default `Python`).
    pub engine: Engine,
    /// `option.model_id` (with `option.revision`), classified.
    pub model_source: ModelSource,
    /// `option.revision`, as given.
    pub revision: Option<String>,
    /// `option.trust_remote_code` (default false; kiln runs no model code either way).
    pub trust_remote_code: bool,
    /// `option.dtype` (default `auto`: the checkpoint's type).
    pub dtype: Dtype,
    /// `option.quantize`: the block format float weight matrices are
    /// quantized to while loading (`q8_0`, `q4_k`, …); `None` keeps them.
    pub quantize: Option<kiln_backend::GgmlType>,
    /// `option.device` (`cpu`, `cuda`, `cuda:N`): where this model runs;
    /// `None` takes the server's `--device`.
    pub device: Option<kiln_backend::Device>,
    /// `option.tensor_parallel_degree`, if given (kiln uses one device).
    pub tensor_parallel_degree: Option<TensorParallelDegree>,
    /// `option.rolling_batch` (default `auto`).
    pub rolling_batch: RollingBatch,
    /// `option.max_rolling_batch_size`: most sequences decoded together
    /// (default 32, or 256 with `vllm`/`trtllm`, as in DJL).
    pub max_rolling_batch_size: usize,
    /// `option.max_rolling_batch_prefill_tokens`: most tokens one engine step
    /// may process (`None`: the engine decides).
    pub max_rolling_batch_prefill_tokens: Option<usize>,
    /// `option.max_model_len`, or else `option.n_positions`: the most tokens
    /// (prompt plus output) of one sequence (`None`: the model's own context
    /// length; DJL's Neuron default of 128 is not adopted).
    pub max_model_len: Option<usize>,
    /// `option.kv_cache_dtype` (vLLM's spelling; `auto`, `f16`, `f32`,
    /// `q8_0`): how this model's KV cache stores keys and values (`None`:
    /// the server's `--kv-cache-dtype`).
    pub kv_cache_dtype: Option<kiln_backend::KvDtype>,
    /// `option.kv_cache_memory_bytes` (vLLM's key and spelling: `4G`,
    /// `25.6k`, or bytes): this model's KV cache size (`None`: the
    /// server's `--kv-cache-mib` / `--kv-cache-memory-bytes`, else on the
    /// CPU `VLLM_CPU_KVCACHE_SPACE` or half the memory left after the weights).
    pub kv_cache_memory_bytes: Option<u64>,
    /// `option.max_input_len`: the most prompt tokens, if given.
    pub max_input_len: Option<usize>,
    /// `option.max_output_len`: the most generated tokens, if given.
    pub max_output_len: Option<usize>,
    /// `option.enable_streaming` (deprecated in DJL). With rolling batch on
    /// it has no effect: a request streams when it asks to. With
    /// `option.rolling_batch=disable` every LMI request streams as DJL's
    /// static-batch handler streams ([`Self::static_batch_streaming`]).
    pub enable_streaming: Streaming,
    /// `option.output_formatter`; `None` means DJL's default: `json`, or
    /// `jsonlines` for a streamed response (see [`Self::output_formatter_for`]).
    pub output_formatter: Option<OutputFormatter>,
    /// `option.tool_call_parser` and `option.reasoning_parser` (see [`super::chat`]).
    pub chat: ChatOptions,
    /// `batch_size` (or `max_dynamic_batch_size`): DJL's static batch size,
    /// default 1. kiln batches continuously and does not use it.
    pub batch_size: usize,
    /// `max_batch_delay`: how long DJL waits to fill a static batch (default
    /// 100 ms). kiln does not wait: a request joins the running batch at the
    /// next engine step.
    pub max_batch_delay: Duration,
    /// `job_queue_size`: most requests waiting for the engine (default 1000);
    /// more are refused with 503.
    pub job_queue_size: usize,
    /// `minWorkers` (default 1); kiln runs one engine.
    pub min_workers: usize,
    /// `maxWorkers`: as given, or else the larger of `minWorkers` and 1 (DJL
    /// derives its default from the device; kiln runs one engine).
    pub max_workers: usize,
    /// `option.model_loading_timeout` (default 1200 s, or `MODEL_LOADING_TIMEOUT`).
    pub model_loading_timeout: Duration,
    /// `option.predict_timeout`: longest time one request may take (default
    /// 240 s, or `PREDICT_TIMEOUT`).
    pub predict_timeout: Duration,
    /// `option.entryPoint`, if given (kiln always uses its built-in handler).
    pub entry_point: Option<String>,
    /// `option.prefill_first_token` (kiln's own, default false): whether
    /// `details.prefill` starts with the prompt's first token (with a null
    /// log-probability, as DJL's LMI schema documents it) or leaves it out
    /// (as DJL's vLLM handler writes it); see [`crate::lmi`].
    pub prefill_first_token: bool,
    /// `option.enable_lora` with its limits (see [`super::lora`]); `None`
    /// when adapters are off.
    pub lora: Option<kiln_engine::AdapterLimits>,
    /// `option.speculative_config` (vLLM's JSON; the ngram method), or
    /// `kiln serve --speculative-config`: speculative decoding, off if `None`.
    pub speculative: Option<kiln_engine::SpecConfig>,
    /// Every key set, with value and origin: the file's keys in file order,
    /// then the keys that came from the environment.
    pub raw: RawProperties,
    /// Things the operator should know: unknown keys, keys kiln ignores, and
    /// environment variables that the file shadows. Each names its origin.
    pub warnings: Vec<String>,
    pub(super) model_id_origin: Option<Origin>,
}

impl ModelProperties {
    /// The value of `key` in the effective configuration.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.raw.get(key)
    }

    /// DJL's static-batch streaming: with `option.rolling_batch=disable` and
    /// `option.enable_streaming`, its Hugging Face handler streams every
    /// request, a list of inputs as one `{"outputs": [...]}` line per step
    /// (see [`crate::lmi_outputs`]).
    pub fn static_batch_streaming(&self) -> bool {
        self.rolling_batch == RollingBatch::Disable && self.enable_streaming != Streaming::False
    }

    /// The response format: `option.output_formatter` if set, else `json`, or
    /// `jsonlines` for a streamed response (DJL's rule).
    pub fn output_formatter_for(&self, streaming: bool) -> OutputFormatter {
        match self.output_formatter {
            Some(formatter) => formatter,
            None if streaming => OutputFormatter::JsonLines,
            None => OutputFormatter::Json,
        }
    }

    /// Where the weights are: the `option.model_id` path, the model
    /// directory when there is no `option.model_id`, or a remote source
    /// (a Hugging Face id with `option.revision`, an `s3://` URL) that
    /// `kiln_sources` downloads before loading. A local path that does not
    /// exist, or a malformed remote one, is an error naming the setting.
    pub fn resolve(&self) -> Result<ModelLocation, PropertiesError> {
        let origin = || {
            self.model_id_origin.clone().unwrap_or_else(|| Origin::Env {
                var: "OPTION_MODEL_ID".to_string(),
            })
        };
        let value = || self.get("option.model_id").unwrap_or_default().to_string();
        let remote = |r: Result<kiln_sources::Source, kiln_sources::SourceError>| {
            r.map(ModelLocation::Remote)
                .map_err(|source| PropertiesError::BadSource {
                    origin: origin(),
                    value: value(),
                    source: Box::new(source),
                })
        };
        match &self.model_source {
            ModelSource::InDirectory => Ok(ModelLocation::Local(self.model_dir.clone())),
            ModelSource::LocalPath(path) if path.exists() => Ok(ModelLocation::Local(path.clone())),
            ModelSource::LocalPath(path) => Err(PropertiesError::LocalPathMissing {
                origin: origin(),
                value: value(),
                path: path.clone(),
            }),
            ModelSource::HuggingFace { id, revision } => {
                remote(kiln_sources::Source::hub(id, revision.as_deref()))
            }
            ModelSource::S3(url) => remote(kiln_sources::Source::s3(url)),
        }
    }
}

/// The defaults: a model directory `.` without `serving.properties`, in an
/// empty environment.
impl Default for ModelProperties {
    fn default() -> Self {
        ModelProperties {
            model_dir: PathBuf::from("."),
            properties_file: None,
            engine: Engine::Python,
            model_source: ModelSource::InDirectory,
            revision: None,
            trust_remote_code: false,
            dtype: Dtype::Auto,
            quantize: None,
            device: None,
            tensor_parallel_degree: None,
            rolling_batch: RollingBatch::Auto,
            max_rolling_batch_size: defaults::MAX_ROLLING_BATCH_SIZE,
            max_rolling_batch_prefill_tokens: None,
            max_model_len: None,
            kv_cache_dtype: None,
            kv_cache_memory_bytes: None,
            max_input_len: None,
            max_output_len: None,
            enable_streaming: Streaming::False,
            chat: ChatOptions::default(),
            output_formatter: None,
            batch_size: defaults::BATCH_SIZE,
            max_batch_delay: Duration::from_millis(defaults::MAX_BATCH_DELAY_MS),
            job_queue_size: defaults::JOB_QUEUE_SIZE,
            min_workers: defaults::MIN_WORKERS,
            max_workers: defaults::MIN_WORKERS.max(1),
            model_loading_timeout: Duration::from_secs(defaults::MODEL_LOADING_TIMEOUT_S),
            predict_timeout: Duration::from_secs(defaults::PREDICT_TIMEOUT_S),
            entry_point: None,
            prefill_first_token: false,
            lora: None,
            speculative: None,
            raw: RawProperties::default(),
            warnings: Vec::new(),
            model_id_origin: None,
        }
    }
}
