//! The keys DJL Serving knows: those kiln reads, those it ignores (with
//! why), their environment forms, and the nearest known key to a typo.

/// The keys kiln reads.
pub(super) const TYPED_KEYS: &[&str] = &[
    "engine",
    "option.model_id",
    "option.revision",
    "option.trust_remote_code",
    "option.dtype",
    "option.quantize",
    "option.quantization",
    "option.device",
    "option.tensor_parallel_degree",
    "option.pipeline_parallel_degree",
    "option.rolling_batch",
    "option.max_rolling_batch_size",
    "option.max_rolling_batch_prefill_tokens",
    "option.max_num_batched_tokens",
    "option.max_model_len",
    "option.kv_cache_dtype",
    "option.kv_cache_memory_bytes",
    "option.n_positions",
    "option.max_input_len",
    "option.max_output_len",
    "option.enable_streaming",
    "option.output_formatter",
    "option.enable_auto_tool_choice",
    "option.tool_call_parser",
    "option.reasoning_parser",
    "option.enable_reasoning",
    "option.enable_stateful_sessions",
    "option.sessions_expiration",
    "option.sessions_path",
    "option.max_sessions_per_client",
    "option.prefill_first_token",
    "option.enable_lora",
    "option.max_loras",
    "option.max_lora_rank",
    "option.max_cpu_loras",
    "option.speculative_config",
    "option.speculative_draft_model",
    "option.speculative_length",
    "option.chat_template",
    "option.entryPoint",
    "option.model_loading_timeout",
    "option.predict_timeout",
    "batch_size",
    "max_dynamic_batch_size",
    "max_batch_delay",
    "job_queue_size",
    "minWorkers",
    "maxWorkers",
];

const NO_PYTHON: &str = "kiln runs no Python worker processes, so this has no effect";
const ONE_ENGINE: &str =
    "kiln runs one engine per model on one device, so worker and device placement settings have no effect";
const NO_QUANTIZE: &str =
    "kiln reads no bitsandbytes settings; use option.quantize=q8_0 (or q4_k) to quantize while loading";
const BACKEND_TUNING: &str = "this tunes one of DJL's backend libraries; kiln's own engine (paged KV cache, continuous batching) does not use it";
const NEURON: &str =
    "this is an AWS Neuron compilation setting; kiln does not run on Neuron devices";
const KV_MEMORY: &str = "kiln sizes the KV cache from option.kv_cache_memory_bytes (vLLM's key, e.g. 4G), else the server's --kv-cache-mib or --kv-cache-memory-bytes, else on the CPU VLLM_CPU_KVCACHE_SPACE (GiB) or half the memory left once the weights are loaded; a fraction of device memory is not used";
const NOT_YET: &str = "kiln does not support this yet; it is ignored";
const EXPERT_PARALLEL: &str = "kiln runs a model on one device, so a mixture-of-experts model keeps all its experts there: there is no expert or data parallelism to set up";
const TEXT_ONLY: &str =
    "kiln serves text generation only, so there are no images or videos per prompt to limit";
const NO_OFFLOAD: &str =
    "kiln does not offload weights to host memory; the model must fit the device";

/// Keys DJL knows and kiln ignores, with what kiln does instead.
pub(super) const IGNORED_KEYS: &[(&[&str], &str)] = &[
    (
        &[
            "option.pythonExecutable",
            "option.handler",
            "option.enable_venv",
            "option.parallel_loading",
            "option.mpi_mode",
            "option.async_mode",
            "option.env",
            "option.max_output_size",
            "option.model_dir",
            "option.modelName",
            "retry_threshold",
            "translatorFactory",
        ],
        NO_PYTHON,
    ),
    (&["option.task"], "kiln serves text generation"),
    (
        &[
            "gpu.minWorkers",
            "gpu.maxWorkers",
            "cpu.minWorkers",
            "cpu.maxWorkers",
            "load_on_devices",
            "max_idle_time",
            "required_memory_mb",
            "gpu.required_memory_mb",
            "reserved_memory_mb",
            "gpu.reserved_memory_mb",
        ],
        ONE_ENGINE,
    ),
    (&["option.load_in_8bit", "option.load_in_4bit"], NO_QUANTIZE),
    (&["option.gpu_memory_utilization"], KV_MEMORY),
    (
        &[
            "option.enforce_eager",
            "option.device_map",
            "option.low_cpu_mem_usage",
            "option.load_format",
            "option.disable_flash_attn",
            "option.max_tokens",
            "option.enable_cuda_graph",
            "option.triangular_masking",
            "option.return_tuple",
            "option.training_mp_size",
            "option.checkpoint",
            "option.decoding_strategy",
            "option.max_sparsity",
            "option.max_splits",
            "option.waiting_steps",
            "option.tokens_per_block",
            "option.batch_scheduler_policy",
            "option.kv_cache_free_gpu_mem_fraction",
            "option.max_num_sequences",
            "option.max_num_tokens",
            "option.use_custom_all_reduce",
            "option.enable_trt_overlap",
            "option.enable_kv_cache_reuse",
            "option.enable_chunked_prefill",
            "option.multi_block_mode",
            "option.use_fused_mlp",
            "option.smoothquant_alpha",
        ],
        BACKEND_TUNING,
    ),
    (
        &[
            "option.neuron_optimize_level",
            "option.context_length_estimate",
            "option.unroll",
            "option.load_split_model",
            "option.compiled_graph_path",
            "option.amp",
            "option.group_query_attention",
            "option.model_loader",
            "option.fuse_qkv",
            "option.fuse_mlp",
            "option.enable_mixed_precision_accumulation",
            "option.enable_saturate_infinity",
            "option.save_mp_checkpoint_path",
            "option.rolling_batch_strategy",
            "option.partition_schema",
            "option.attention_layout",
            "option.collectives_layout",
            "option.cache_layout",
            "option.all_reduce_dtype",
            "option.cast_logits_dtype",
        ],
        NEURON,
    ),
    (
        &[
            "option.draft_model_id",
            "option.spec_length",
            "option.draft_model_tp_size",
            "option.tgi_compat",
            "option.bedrock_compat",
            "option.long_lora_scaling_factors",
            "option.lora_extra_vocab_size",
        ],
        NOT_YET,
    ),
    (
        &[
            "option.enable_expert_parallel",
            "option.enable_eplb",
            "option.eplb_config",
            "option.num_redundant_experts",
            "option.expert_placement_strategy",
            "option.data_parallel_size",
        ],
        EXPERT_PARALLEL,
    ),
    (&["option.limit_mm_per_prompt"], TEXT_ONLY),
    (
        &["option.cpu_offload_gb", "option.cpu_offload_gb_per_gpu"],
        NO_OFFLOAD,
    ),
    (
        &["log_request_metric", "metrics_aggregation"],
        "kiln always exports its metrics at GET /server/metrics",
    ),
];

/// What kiln does instead of `key`, when DJL knows the key and kiln ignores it.
pub(super) fn ignored_reason(key: &str) -> Option<&'static str> {
    IGNORED_KEYS
        .iter()
        .find(|(keys, _)| keys.contains(&key))
        .map(|(_, reason)| *reason)
}

pub(super) fn all_known_keys() -> impl Iterator<Item = &'static str> {
    TYPED_KEYS.iter().copied().chain(
        IGNORED_KEYS
            .iter()
            .flat_map(|(keys, _)| keys.iter().copied()),
    )
}

/// Server-level keys that a model may override (DJL `WlmConfigManager`), whose
/// environment form is `SERVING_<KEY>`.
const SERVING_KEYS: &[&str] = &[
    "job_queue_size",
    "batch_size",
    "max_batch_delay",
    "max_idle_time",
    "load_on_devices",
];

/// The DJL environment variable for `key`, if it has one.
pub fn env_var_for(key: &str) -> Option<String> {
    if key == "engine" {
        return Some("OPTION_ENGINE".to_string());
    }
    if let Some(rest) = key.strip_prefix("option.") {
        // DJL lowercases OPTION_ names; camelCase keys other than entryPoint
        // cannot be reached from the environment.
        if rest == "entryPoint" || !rest.chars().any(|c| c.is_ascii_uppercase()) {
            return Some(format!("OPTION_{}", rest.to_ascii_uppercase()));
        }
        return None;
    }
    SERVING_KEYS
        .contains(&key)
        .then(|| format!("SERVING_{}", key.to_ascii_uppercase()))
}

/// The LMI container's aliases (its entrypoint turns them into `OPTION_`/
/// `SERVING_` variables when those are unset), in precedence order.
pub(super) const ENV_ALIASES: &[(&str, &str)] = &[
    ("HF_MODEL_TRUST_REMOTE_CODE", "option.trust_remote_code"),
    ("TENSOR_PARALLEL_DEGREE", "option.tensor_parallel_degree"),
    ("SM_NUM_GPUS", "option.tensor_parallel_degree"),
    (
        "PIPELINE_PARALLEL_DEGREE",
        "option.pipeline_parallel_degree",
    ),
    ("MAX_BATCH_SIZE", "option.max_rolling_batch_size"),
    ("MAX_CONCURRENT_REQUESTS", "job_queue_size"),
    (
        "MAX_BATCH_PREFILL_TOKENS",
        "option.max_rolling_batch_prefill_tokens",
    ),
    ("HF_MODEL_QUANTIZE", "option.quantize"),
];

/// Variables that DJL writes over the file (`SageMakerCompatibility`).
pub(super) const ENV_OVERRIDES: &[(&str, &[&str])] = &[
    (
        "SAGEMAKER_STARTUP_TIMEOUT",
        &["option.model_loading_timeout"],
    ),
    (
        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",
        &["option.predict_timeout"],
    ),
    ("SAGEMAKER_NUM_MODEL_WORKERS", &["minWorkers", "maxWorkers"]),
];

/// Reads the process environment: the `env` to pass in production.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The known key closest to `key`, if it is close enough to be a likely typo.
pub(super) fn suggest(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    let with_prefix = format!("option.{lower}");
    all_known_keys()
        .map(|known| {
            let k = known.to_ascii_lowercase();
            (
                edit_distance(&lower, &k).min(edit_distance(&with_prefix, &k)),
                known,
            )
        })
        .filter(|&(d, known)| d <= 2.max(known.len() / 8))
        .min_by_key(|&(d, _)| d)
        .map(|(_, known)| known)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names() {
        assert_eq!(
            env_var_for("option.max_rolling_batch_size").as_deref(),
            Some("OPTION_MAX_ROLLING_BATCH_SIZE")
        );
        assert_eq!(
            env_var_for("option.entryPoint").as_deref(),
            Some("OPTION_ENTRYPOINT")
        );
        assert_eq!(env_var_for("option.pythonExecutable"), None);
        assert_eq!(env_var_for("engine").as_deref(), Some("OPTION_ENGINE"));
        assert_eq!(
            env_var_for("job_queue_size").as_deref(),
            Some("SERVING_JOB_QUEUE_SIZE")
        );
        assert_eq!(env_var_for("minWorkers"), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("option.dtpye"), Some("option.dtype"));
        assert_eq!(suggest("rolling_batch"), Some("option.rolling_batch"));
        assert_eq!(
            suggest("option.max_rolling_batch_sise"),
            Some("option.max_rolling_batch_size")
        );
        assert_eq!(suggest("completely.different"), None);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
