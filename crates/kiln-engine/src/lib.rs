//! kiln-engine: turns prompts into streams of tokens, for many clients at once.
//!
//! The [`Engine`] owns one loaded model on a dedicated thread and serves every
//! request submitted to it by continuous batching over a paged KV cache:
//! the [`scheduler`] plans each step (which tokens of which sequences), the
//! [`block_manager`] owns the cache's blocks and the prefix cache, and the
//! engine loop runs the model, samples ([`sampling`]), turns tokens into
//! text without breaking characters ([`detok`]), applies stop conditions
//! ([`stops`]) and streams [`Event`]s back.
//!
//! It does not parse requests or speak HTTP, and it does not know how a model
//! computes: it drives a [`kiln_model::decoder::Decoder`] step by step.

pub mod adapters;
pub mod block_manager;
pub mod detok;
pub mod engine;
pub mod guided;
pub mod kv_size;
pub mod launch;
pub mod load;
pub mod metrics;
pub mod request;
pub mod sampling;
mod scheduler;
pub mod spec;
pub mod stops;

pub use adapters::{AdapterError, AdapterInfo, AdapterLimits, AdapterOptions};
pub use engine::{Engine, EngineConfig, EngineInfo, KvCapacity, RequestStream, SubmitError};
pub use guided::{CompileCancel, CompileError, Compiled, Constraint, Guide};
pub use kiln_backend::{Device, KvDtype};
pub use launch::{DeviceModel, LaunchError};
pub use load::{LoadModelError, LoadSpec, ModelLocation};
pub use metrics::MetricsSnapshot;
pub use request::{Event, FinishReason, Request, StopConditions, TokenOutput, Usage};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::SchedulerConfig;
pub use spec::{SpecConfig, SpecMethod};

/// Errors of starting or running an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Backend(#[from] kiln_backend::BackendError),
}

/// Result alias for this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
