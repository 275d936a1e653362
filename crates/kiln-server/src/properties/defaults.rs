//! Default values, matching the DJL LMI containers where kiln behaves the same.

/// `option.max_rolling_batch_size` (DJL `LmiConfigRecommender`: 32, or
/// [`MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM`] when `option.rolling_batch` is
/// `vllm` or `trtllm`).
pub const MAX_ROLLING_BATCH_SIZE: usize = 32;
/// `option.max_rolling_batch_size` when `option.rolling_batch` names vllm or trtllm.
pub const MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM: usize = 256;
/// `job_queue_size` (DJL `WlmConfigManager`).
pub const JOB_QUEUE_SIZE: usize = 1000;
/// `batch_size` (DJL `WlmConfigManager`).
pub const BATCH_SIZE: usize = 1;
/// `max_batch_delay` in milliseconds (DJL `WlmConfigManager`).
pub const MAX_BATCH_DELAY_MS: u64 = 100;
/// `minWorkers` (DJL `ModelInfo`).
pub const MIN_WORKERS: usize = 1;
/// `option.model_loading_timeout` in seconds: the LMI images set
/// `MODEL_LOADING_TIMEOUT=1200` (the Python engine's own default is 240).
pub const MODEL_LOADING_TIMEOUT_S: u64 = 1200;
/// `option.predict_timeout` in seconds: the LMI images set `PREDICT_TIMEOUT=240`.
pub const PREDICT_TIMEOUT_S: u64 = 240;

/// The largest `job_queue_size` accepted wherever it is given
/// (`serving.properties`, `SERVING_JOB_QUEUE_SIZE`, `MAX_CONCURRENT_REQUESTS`,
/// `kiln serve --job-queue-size`, `POST /models?job_queue_size=`). The
/// engine admits up to `job_queue_size + max_rolling_batch_size` requests;
/// a value near `usize::MAX` would overflow that sum and refuse every
/// request, so larger values are refused where they are read.
pub const MAX_JOB_QUEUE_SIZE: usize = u32::MAX as usize;
