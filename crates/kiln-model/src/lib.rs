//! kiln-model: everything that turns files on disk into a runnable decoder.
//!
//! It reads checkpoint formats (GGUF, safetensors), derives one
//! [`config::DecoderConfig`] from whichever config the checkpoint carries,
//! builds the generic [`decoder::Decoder`] on a [`kiln_backend::Backend`], and
//! loads the tokenizer and chat template that go with it. It knows nothing of
//! requests, batching policy or HTTP; those live in `kiln-engine` and the server.

pub mod chat;
pub mod config;
pub mod convert;
pub mod decoder;
pub mod default_model;
pub mod dummy;
pub mod encoder;
pub mod files;
mod gemma;
// Tiny random-weight models written on the fly: test tools, only with the
// `test-support` feature, which every crate's tests turn on.
#[cfg(feature = "test-support")]
pub mod fixtures;
// A small mutation fuzzer for the parsers of outside data: a test tool, only
// with the `test-support` feature.
#[cfg(feature = "test-support")]
pub mod fuzz;
// The tiny checkpoints' goldens as every family's golden test reads them:
// a test tool, only with the `test-support` feature.
pub mod gguf;
mod gguf_write;
#[cfg(feature = "test-support")]
pub mod goldens;
pub mod gpt_oss;
pub mod inspect;
pub mod layouts;
pub mod load_progress;
pub mod loader;
pub mod lora;
pub mod moe;
pub mod mxfp4;
pub mod names;
pub mod prepared;
pub use kiln_backend::quant;
// The tiny checkpoints written as GGUF files the way llama.cpp's converter
// writes them: a test tool, only with the `test-support` feature.
#[cfg(feature = "test-support")]
pub mod tiny_gguf;
pub mod tokenizer;
pub mod torch;
pub mod weights;
pub mod yarn;

mod error;
mod host;

pub use error::{ModelError, Result};
pub use host::HostTensor;
pub use loader::{load, load_with, LoadOptions, LoadedModel, ModelFormat, WeightDtype};
