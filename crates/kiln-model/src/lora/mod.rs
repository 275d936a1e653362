//! LoRA adapters: low-rank deltas `scale * B·A·x` added to a decoder
//! layer's projections, so many fine-tunes of one base model share its
//! weights.
//!
//! An adapter is read from the PEFT layout (`adapter_config.json` and
//! `adapter_model.safetensors`, [`peft`]) into f32 host matrices per
//! (layer, projection) — [`HostLora`] — checked against the base model's
//! configuration, then uploaded to a backend ([`LoraAdapter`]). The delta
//! is separate from the base weights, so it applies to GGUF and
//! safetensors bases alike, quantized or not. A step names which rows use
//! which adapter ([`LoraStep`]); the decoder adds each adapter's delta to
//! exactly its rows ([`apply`]), so a row's result does not depend on what
//! else shares the step.
//!
//! On mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss) an adapter may also
//! target the router (`gate`) and the experts: each expert's gate, up and
//! down projections get their own `B·A` ([`HostLora::experts`]), read from
//! PEFT's fused `target_parameters` form or from per-expert modules, and
//! the expert layer runs an adapted row's chosen experts with that row's
//! own deltas (`decoder/moe.rs`).

pub mod apply;
pub mod peft;

pub use apply::{LoraAdapter, LoraExperts, LoraStep};
pub use peft::{read_peft, ExpertLora, HostLora, LoraMatrix};

use std::path::PathBuf;

/// How many [`Proj`]s there are: the length of an adapter's per-layer table.
pub const N_PROJ: usize = 8;

/// One of the projections of a decoder layer an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// A mixture-of-experts layer's router (`[n_experts, hidden]`).
    Router,
}

impl Proj {
    /// Every projection, in the order an adapter's per-layer table holds them.
    pub const ALL: [Proj; N_PROJ] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
        Proj::Router,
    ];

    /// The slot of this projection in a per-layer table.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The usual Hugging Face module name, for messages.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
            Proj::Router => "gate (router)",
        }
    }
}

/// One of the three matrices of a mixture-of-experts expert, in the order
/// an [`ExpertLora`] holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertPart {
    Gate,
    Up,
    Down,
}

impl ExpertPart {
    /// The slot of this part in an [`ExpertLora`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Limits an adapter must fit (DJL's `option.max_lora_rank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraLimits {
    /// Largest rank accepted; a larger adapter is refused at load.
    pub max_rank: usize,
}

impl Default for LoraLimits {
    /// DJL's and vLLM's default `max_lora_rank`, 16.
    fn default() -> Self {
        Self { max_rank: 16 }
    }
}

/// Why an adapter cannot be used. Every variant names the file or tensor,
/// so the user knows what to fix; the server answers them with a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A file of the PEFT layout is absent.
    #[error("{path}: not found (a PEFT adapter needs adapter_config.json and adapter_model.safetensors)")]
    Missing { path: PathBuf },
    /// A file that cannot be read or parsed.
    #[error("{path}: {msg}")]
    Malformed { path: PathBuf, msg: String },
    /// The adapter's rank is above the configured maximum.
    #[error("{path}: rank {rank} exceeds max_lora_rank {max}")]
    RankTooLarge {
        path: PathBuf,
        rank: usize,
        max: usize,
    },
    /// A target module that the base model does not have.
    #[error("{path}: target module '{module}' does not exist in this {arch} model")]
    UnknownTarget {
        path: PathBuf,
        module: String,
        arch: String,
    },
    /// A target kiln cannot adapt (embeddings, the output head, experts, DoRA …).
    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },
    /// A tensor whose shape does not fit the base model: usually an adapter
    /// trained for another architecture or size.
    #[error("{path}: tensor '{tensor}' has shape {got:?}, but the base model implies {want:?} (an adapter for another model?)")]
    Shape {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    /// The backend refused the adapter's matrices.
    #[error(transparent)]
    Backend(#[from] kiln_backend::BackendError),
}

/// Result alias for adapter loading.
pub type LoraResult<T> = std::result::Result<T, LoraError>;
