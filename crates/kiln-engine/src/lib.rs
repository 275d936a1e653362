//! kiln-engine: turns prompts into streams of tokens.
//!
//! It holds what sits between a loaded model and a client: sampling
//! ([`sampling`]), turning token ids back into text a piece at a time without
//! breaking characters ([`detok`]), and the generation loop ([`generate`]).
//! It does not parse requests or speak HTTP, and it does not know how a
//! model computes: it drives a [`kiln_model::decoder::Decoder`] step by step.

pub mod detok;
pub mod generate;
pub mod sampling;

pub use generate::{generate, FinishReason, GenerateRequest, GenerationStats, TokenEvent};
pub use sampling::{Sampler, SamplingParams};

/// Errors of the generation loop.
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
