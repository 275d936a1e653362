//! The generation loop for one sequence: prefill the prompt in chunks, then
//! decode token by token until a stop condition, streaming each token out.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use kiln_backend::{Backend, KvSpec, StepInput};
use kiln_model::LoadedModel;

use crate::detok::IncrementalDetokenizer;
use crate::sampling::{Sampler, SamplingParams};
use crate::{EngineError, Result};

/// KV-cache block size in tokens.
pub const BLOCK_SIZE: usize = 16;
/// Prompt tokens per prefill step, bounding activation memory for long prompts.
pub const PREFILL_CHUNK: usize = 512;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` or the model's context was reached.
    Length,
    /// The model produced an end-of-sequence token.
    EosToken,
    /// The caller asked to stop.
    Cancelled,
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty mid-character).
    pub text: String,
    pub logprob: f32,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Generates from `req.prompt`, calling `on_token` for every token (including a
/// final EOS, whose text is empty). Returning `ControlFlow::Break` stops early.
pub fn generate<B: Backend>(
    backend: &B,
    model: &LoadedModel<B>,
    req: &GenerateRequest,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationStats> {
    req.params.validate().map_err(EngineError::Invalid)?;
    let cfg = model.decoder.config();
    let max_pos = model.decoder.max_positions();
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.prompt.len() >= max_pos {
        return Err(EngineError::Invalid(format!(
            "the prompt has {} tokens; this model instance holds at most {max_pos}",
            req.prompt.len()
        )));
    }
    let total = (req.prompt.len() + req.max_new_tokens).min(max_pos);
    let spec = KvSpec {
        n_layers: cfg.n_layers,
        num_blocks: total.div_ceil(BLOCK_SIZE),
        block_size: BLOCK_SIZE,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = backend.alloc_kv_cache(&spec)?;
    let step_for =
        |start: usize, tokens: &[u32]| StepInput::single_sequence(start, tokens, BLOCK_SIZE);

    let t0 = Instant::now();
    let mut logits = Vec::new();
    for (i, chunk) in req.prompt.chunks(PREFILL_CHUNK).enumerate() {
        logits = model
            .decoder
            .forward(backend, &mut kv, &step_for(i * PREFILL_CHUNK, chunk))?;
    }
    let prefill_time = t0.elapsed();

    let t1 = Instant::now();
    let mut sampler = Sampler::new(req.params.clone());
    let mut detok = IncrementalDetokenizer::new(&req.prompt, true);
    let mut generated = Vec::new();
    let mut pos = req.prompt.len();
    let finish = loop {
        let choice = sampler.sample(&logits);
        generated.push(choice.token);
        let is_eos = !req.ignore_eos && model.eos_ids.contains(&choice.token);
        let mut text = if is_eos {
            String::new()
        } else {
            detok.push(&model.tokenizer, choice.token)?
        };
        let done = if is_eos {
            Some(FinishReason::EosToken)
        } else if generated.len() >= req.max_new_tokens || pos + 1 >= total {
            Some(FinishReason::Length)
        } else {
            None
        };
        if done.is_some() {
            text.push_str(&detok.flush(&model.tokenizer)?);
        }
        let event = TokenEvent {
            id: choice.token,
            text,
            logprob: choice.logprob,
        };
        if on_token(&event).is_break() {
            break FinishReason::Cancelled;
        }
        if let Some(reason) = done {
            break reason;
        }
        logits = model
            .decoder
            .forward(backend, &mut kv, &step_for(pos, &[choice.token]))?;
        pos += 1;
    };
    Ok(GenerationStats {
        finish,
        prompt_tokens: req.prompt.len(),
        generated,
        prefill_time,
        decode_time: t1.elapsed(),
    })
}
