//! Decoder embedders (Qwen3-Embedding style): a decoder-only checkpoint
//! (qwen3, qwen2, llama, mistral) with sentence-transformers files, whose
//! embedding is the final hidden state (after the final norm) of a pooled
//! row, usually the last token, which the tokenizer makes the EOS.
//!
//! The decoder runs causally, as in generation, over each batch of inputs
//! at once, with a KV cache that lives for the one call; it is asked for
//! hidden states instead of logits ([`Decoder::output_hidden_states`]).

use std::path::Path;

use kiln_backend::{Backend, KvSpec, SeqSlice, StepInput};

use super::pooling::Pooling;
use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::weights::{hf_llama_names, SafetensorsSource, WeightSource};
use crate::{ModelError, Result};

/// Model types whose checkpoints this module loads (the llama layout).
const TYPES: [&str; 4] = ["qwen3", "qwen2", "llama", "mistral"];

/// KV slots per cache block of a call's cache.
const BLOCK: usize = 16;

/// The most bytes a call's KV cache may take; bounds the tokens of one batch.
const KV_BUDGET_BYTES: usize = 256 << 20;

/// The longest input kiln takes for a decoder embedder unless the checkpoint
/// says less (`max_seq_length`, `max_position_embeddings`).
pub const MAX_DECODER_TOKENS: usize = 8192;

/// A loaded decoder embedder's transformer.
pub struct DecoderEmbedder<B: Backend> {
    pub decoder: Decoder<B>,
    /// The token the tokenizer should end every input with (the config's
    /// first `eos_token_id`), if the checkpoint names one.
    pub eos: Option<u32>,
}

/// Canonical names to a bare `Qwen3Model` / `LlamaModel` checkpoint's, which
/// is how Qwen3-Embedding is published (no `model.` prefix, no `lm_head`).
fn bare_llama_names(canonical: &str) -> Option<String> {
    hf_llama_names(canonical).map(|n| n.strip_prefix("model.").map_or(n.clone(), str::to_string))
}

/// Whether a parsed `config.json` is a decoder type this module loads.
pub fn is_decoder_type(cfg: &serde_json::Value) -> bool {
    cfg.get("model_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| TYPES.contains(&t))
}

impl<B: Backend> DecoderEmbedder<B> {
    /// Loads the decoder in `dir`, holding at most `max_tokens` positions.
    pub fn load(
        dir: &Path,
        cfg_json: &serde_json::Value,
        backend: &B,
        max_tokens: usize,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let mut cfg = DecoderConfig::from_hf_json(cfg_json, &cfg_path)?;
        let mut src = SafetensorsSource::open_dir(dir, hf_llama_names)?;
        if !src.contains("token_embd.weight") {
            src = SafetensorsSource::open_dir(dir, bare_llama_names)?;
        }
        if !src.contains("output.weight") {
            // The head is never used: the embedding is the hidden state.
            cfg.tie_word_embeddings = true;
        }
        let mut decoder = Decoder::load(backend, cfg, &src, max_tokens)?;
        decoder.output_hidden_states(true);
        let eos = match cfg_json.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()),
            Some(v) => v.as_u64(),
            None => None,
        }
        .and_then(|v| u32::try_from(v).ok());
        Ok(Self { decoder, eos })
    }

    /// The longest input `max_tokens` allows for a checkpoint `config.json`.
    pub fn max_tokens(cfg: &DecoderConfig) -> usize {
        cfg.max_position_embeddings.clamp(1, MAX_DECODER_TOKENS)
    }

    /// The most tokens one call should hold (its KV cache within budget).
    pub fn batch_tokens(&self) -> usize {
        let c = self.decoder.config();
        let spec = KvSpec {
            n_layers: c.n_layers,
            num_blocks: 1,
            block_size: 1,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        (KV_BUDGET_BYTES / spec.bytes_per_token(4).max(1)).max(1)
    }

    /// The pooled rows of each sequence's final hidden states, as one step:
    /// for each sequence, the rows `pooling` reads (the last, the first, or
    /// all of them), `[rows, hidden]` row-major. The caller has checked the ids.
    pub fn forward(&self, backend: &B, seqs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let c = self.decoder.config();
        let mut input = StepInput::default();
        let mut block = 0u32;
        let mut rows_per_seq = Vec::with_capacity(seqs.len());
        for s in seqs {
            let start = input.tokens.len();
            let blocks = s.len().div_ceil(BLOCK) as u32;
            input.tokens.extend_from_slice(s);
            for p in 0..s.len() {
                input.positions.push(p as u32);
                input.slots.push(block * BLOCK as u32 + p as u32);
            }
            input.seqs.push(SeqSlice {
                query_start: start,
                query_len: s.len(),
                context_len: s.len(),
                block_table: (block..block + blocks).collect(),
            });
            let rows: Vec<u32> = match pooling {
                Pooling::LastToken => vec![(start + s.len() - 1) as u32],
                Pooling::Cls => vec![start as u32],
                Pooling::Mean => (start..start + s.len()).map(|r| r as u32).collect(),
            };
            rows_per_seq.push(rows.len());
            input.logit_rows.extend(rows);
            block += blocks;
        }
        let spec = KvSpec {
            n_layers: c.n_layers,
            num_blocks: (block as usize).max(1),
            block_size: BLOCK,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        input.validate(&spec).map_err(ModelError::Backend)?;
        // One call's keys and values live only for the call: stored exact
        // (f32) where the backend can, so embeddings match the reference
        // implementation as closely as the weights allow.
        let mut kv = match backend.alloc_kv_cache_as(&spec, kiln_backend::KvDtype::F32) {
            Ok(kv) => kv,
            Err(_) => backend.alloc_kv_cache(&spec)?,
        };
        let states = self.decoder.forward(backend, &mut kv, &input)?;
        let d = c.hidden_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for n in rows_per_seq {
            out.push(states[at * d..(at + n) * d].to_vec());
            at += n;
        }
        Ok(out)
    }
}
