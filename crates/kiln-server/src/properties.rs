//! `serving.properties`: DJL Serving's per-model configuration, read the way
//! DJL reads it, validated, and mapped onto what kiln does.
//!
//! # Where a value comes from
//!
//! For each key, highest precedence first (this is DJL Serving's order, see
//! `ModelInfo.loadServingProperties`, `SageMakerCompatibility` and the LMI
//! container's entrypoint script):
//!
//! 1. `SAGEMAKER_STARTUP_TIMEOUT`, `SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS` and
//!    `SAGEMAKER_NUM_MODEL_WORKERS`, which DJL writes over the file.
//! 2. The model's `serving.properties` file. **The file wins over the other
//!    environment forms**, as in DJL ("Configurations specified in the
//!    serving.properties files will override configurations specified in
//!    environment variables"); a variable that the file shadows is reported in
//!    [`ModelProperties::warnings`] so that nobody wonders why it did nothing.
//! 3. `OPTION_<KEY>` for `option.<key>` (upper snake case; `OPTION_ENTRYPOINT`
//!    is `option.entryPoint`, `OPTION_ENGINE` is `engine`) and `SERVING_<KEY>`
//!    for the server-level keys a model may override (`job_queue_size`,
//!    `batch_size`, `max_batch_delay`, `max_idle_time`, `load_on_devices`).
//! 4. The LMI container's aliases: `HF_MODEL_TRUST_REMOTE_CODE`,
//!    `TENSOR_PARALLEL_DEGREE` (then `SM_NUM_GPUS`), `PIPELINE_PARALLEL_DEGREE`,
//!    `MAX_BATCH_SIZE` (`option.max_rolling_batch_size`),
//!    `MAX_CONCURRENT_REQUESTS` (`job_queue_size`), `MAX_BATCH_PREFILL_TOKENS`,
//!    `HF_MODEL_QUANTIZE`.
//! 5. Defaults ([`defaults`]); `MODEL_LOADING_TIMEOUT` and `PREDICT_TIMEOUT`
//!    replace the two timeout defaults, as in DJL's Python engine.
//!
//! Empty environment values are ignored, as in DJL. `HF_MODEL_ID` does not
//! change the models of the store: like DJL, it adds one more model, whose
//! properties [`ModelProperties::from_hf_model_id`] builds (`HF_REVISION` and
//! `HF_TASK` go with it); see also `store::hf_model`.
//!
//! # What kiln does with them
//!
//! kiln runs one engine per model on one device, batching continuously, so the
//! settings for DJL's worker processes, tensor parallelism and static batching
//! are accepted, validated, and reported as not needed. Unknown keys are
//! warnings that name the key (with a suggestion when it looks like a typo),
//! never silence and never errors. Values of the keys kiln uses are validated,
//! and a bad one is an error naming the file and line (or the variable), the
//! key, the value, and what is allowed.
//!
//! # Where each part is
//!
//! The text format is in `lexer.rs`; the configuration as written, with
//! each value's origin, in `raw.rs`; the known keys and their environment
//! forms in `keys.rs`. `read.rs` reads a model's file or environment,
//! `builder.rs` gathers the entries in DJL's order, and `validate.rs` (with
//! [`chat`] for the chat-side keys) types them into a [`ModelProperties`]
//! (`model.rs`), whose value types are in `values.rs`. This file only
//! declares them and re-exports
//! what the rest of the server uses.

mod builder;
pub mod chat;
pub mod defaults;
mod error;
mod keys;
mod lexer;
mod lora;
mod model;
mod raw;
mod read;
mod validate;
mod values;

pub use chat::{ChatOptions, SessionOptions, ToolCallParser};
pub use defaults::MAX_JOB_QUEUE_SIZE;
pub use error::{Problem, PropertiesError};
pub use keys::{env_var_for, process_env};
pub use lexer::{parse_properties, ParseError, Property, MAX_PROPERTIES_BYTES};
pub use model::ModelProperties;
pub use raw::{Origin, RawProperties, RawProperty};
pub use read::PROPERTIES_FILE;
pub use values::{
    is_hf_id, Dtype, Engine, ModelLocation, ModelSource, OutputFormatter, RollingBatch, Streaming,
    TensorParallelDegree,
};
