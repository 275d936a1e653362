//! Embedding models: BERT-style encoders (`bert`, `xlm-roberta`) and
//! decoder embedders (Qwen3-Embedding style, [`decoder_embed`]), with the
//! pooling, normalisation and prompts their sentence-transformers files ask
//! for, and cross-encoder rerankers. Separate from generation: no
//! scheduling, no sampling; every call is one forward pass over whole
//! inputs.

pub mod bert;
pub mod config;
pub mod cross;
pub mod decoder_embed;
pub mod pooling;
pub mod prompts;

pub use bert::BertEncoder;
pub use config::{EncoderConfig, EncoderKind};
pub use cross::CrossEncoder;
pub use decoder_embed::DecoderEmbedder;
pub use pooling::{l2_normalize, Pooling, SentenceConfig};
pub use prompts::Prompts;

use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};
use kiln_backend::Backend;
use std::path::Path;

/// Why an input cannot be embedded; the request's fault, not the model's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("input {index} is empty")]
    Empty { index: usize },
    #[error("input {index} has {len} tokens, more than the model's maximum of {max}")]
    TooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("input {index}: token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { index: usize, id: u32, vocab: usize },
    #[error("prompt_name '{name}' is not one of the model's prompts ({known})")]
    UnknownPrompt { name: String, known: String },
}

/// Errors of [`EmbeddingModel::embed`]: a bad input, or the model failing.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<kiln_backend::BackendError> for EmbedError {
    fn from(e: kiln_backend::BackendError) -> Self {
        Self::Model(e.into())
    }
}

/// Checks token id sequences against a vocabulary and a length limit.
pub fn check_ids(seqs: &[&[u32]], vocab: usize, max: usize) -> Result<(), InputError> {
    for (index, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            return Err(InputError::Empty { index });
        }
        if s.len() > max {
            return Err(InputError::TooLong {
                index,
                len: s.len(),
                max,
            });
        }
        if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab) {
            return Err(InputError::BadToken { index, id, vocab });
        }
    }
    Ok(())
}

/// The transformer under an embedding model's pooling.
// One value per loaded model, never moved in a hot path: the variants'
// difference in size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Transformer<B: Backend> {
    /// BERT / XLM-RoBERTa: bidirectional, `[CLS] ... [SEP]` inputs.
    Bert(BertEncoder<B>),
    /// A causal decoder whose inputs end with its EOS.
    Decoder(DecoderEmbedder<B>),
}

/// An embedding model with its tokenizer and sentence-transformers head:
/// text or token ids in, one vector per input out.
pub struct EmbeddingModel<B: Backend> {
    pub transformer: Transformer<B>,
    pub tokenizer: Tokenizer,
    pub sentence: SentenceConfig,
    /// The sentence-transformers prompts (`config_sentence_transformers.json`).
    pub prompts: Prompts,
    /// The longest input accepted: the position table's length, or the
    /// smaller `max_seq_length` of `sentence_bert_config.json` (at most
    /// [`decoder_embed::MAX_DECODER_TOKENS`] for a decoder).
    pub max_tokens: usize,
    vocab_size: usize,
    dim: usize,
}

/// Whether `dir` holds an embedding checkpoint this module can load: an
/// encoder (`config.json` with `model_type` bert / xlm-roberta), or a
/// decoder type of [`decoder_embed`] with sentence-transformers files
/// (`modules.json`).
pub fn is_encoder_dir(dir: &Path) -> bool {
    let path = dir.join("config.json");
    let Ok(cfg) = crate::loader::read_json(&path) else {
        return false;
    };
    EncoderConfig::is_encoder(&cfg)
        || (decoder_embed::is_decoder_type(&cfg) && dir.join("modules.json").is_file())
}

impl<B: Backend> EmbeddingModel<B> {
    /// Loads an embedding checkpoint directory: `config.json`,
    /// `model.safetensors`, `tokenizer.json` and, if present, the
    /// sentence-transformers files (without them: mean pooling, normalised,
    /// the common default of embedding servers).
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_json = crate::loader::read_json(&cfg_path)?;
        let sentence = SentenceConfig::read(dir)?.unwrap_or(SentenceConfig {
            pooling: Pooling::Mean,
            normalize: true,
        });
        let mut max_tokens = if EncoderConfig::is_encoder(&cfg_json) {
            EncoderConfig::from_json(&cfg_json, &cfg_path)?.max_tokens()
        } else {
            let c = crate::config::DecoderConfig::from_hf_json(&cfg_json, &cfg_path)?;
            DecoderEmbedder::<B>::max_tokens(&c)
        };
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.exists() {
            let v = crate::loader::read_json(&sbert)?;
            if let Some(m) = v.get("max_seq_length").and_then(|m| m.as_u64()) {
                max_tokens = max_tokens.min(m.max(1) as usize);
            }
        }
        let tcfg = dir.join("tokenizer_config.json");
        let tokenizer = Tokenizer::from_hf_files(
            &dir.join("tokenizer.json"),
            tcfg.exists().then_some(tcfg.as_path()),
        )?;
        let prompts = Prompts::read(dir)?;
        let (transformer, vocab_size, dim) = if EncoderConfig::is_encoder(&cfg_json) {
            let config = EncoderConfig::from_json(&cfg_json, &cfg_path)?;
            let e = BertEncoder::load(dir, config, backend)?;
            let (v, d) = (e.config.vocab_size, e.config.hidden_size);
            (Transformer::Bert(e), v, d)
        } else if decoder_embed::is_decoder_type(&cfg_json) {
            let e = DecoderEmbedder::load(dir, &cfg_json, backend, max_tokens)?;
            let c = e.decoder.config();
            let (v, d) = (c.vocab_size, c.hidden_size);
            (Transformer::Decoder(e), v, d)
        } else {
            return Err(ModelError::Config {
                path: cfg_path,
                msg: "not an embedding model: model_type must be bert, xlm-roberta, roberta, \
                      qwen3, qwen2, llama or mistral"
                    .into(),
            });
        };
        tracing::info!(
            dir = %dir.display(),
            dim,
            max_tokens,
            pooling = ?sentence.pooling,
            normalize = sentence.normalize,
            default_prompt = ?prompts.default,
            "loaded embedding model"
        );
        Ok(Self {
            transformer,
            tokenizer,
            sentence,
            prompts,
            max_tokens,
            vocab_size,
            dim,
        })
    }

    /// Length of the embeddings this model produces.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The BERT-style encoder, if this model is one.
    pub fn encoder(&self) -> Option<&BertEncoder<B>> {
        match &self.transformer {
            Transformer::Bert(e) => Some(e),
            Transformer::Decoder(_) => None,
        }
    }

    /// Token ids of `text` with the model's special tokens (`[CLS] ... [SEP]`
    /// for BERT). A decoder embedder's input ends with its EOS: the
    /// tokenizer's post-processor appends it (as Qwen3-Embedding's does),
    /// and kiln appends it where the tokenizer did not.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, true)?;
        if let Transformer::Decoder(d) = &self.transformer {
            if let Some(eos) = d.eos {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
        }
        Ok(ids)
    }

    /// `text` with the prompt `name` (or the model's default prompt when
    /// `name` is `None`) before it, as sentence-transformers' `encode` does.
    pub fn prompted(&self, text: &str, name: Option<&str>) -> Result<String, InputError> {
        self.prompts.apply(text, name)
    }

    /// The most tokens one forward pass should take (a decoder's KV cache
    /// for the call stays within a budget).
    pub fn batch_tokens(&self) -> usize {
        match &self.transformer {
            Transformer::Bert(_) => 16384,
            Transformer::Decoder(d) => d.batch_tokens(),
        }
    }

    /// Checks token id sequences against the model's vocabulary and
    /// length limit, without computing anything.
    pub fn check(&self, seqs: &[&[u32]]) -> Result<(), InputError> {
        check_ids(seqs, self.vocab_size, self.max_tokens)
    }

    /// One pooled (and, if the checkpoint says so, normalised) embedding
    /// per token id sequence, computed as one batch. A sequence's embedding
    /// is the same bits alone or in any batch.
    pub fn embed(&self, backend: &B, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.check(seqs)?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let pooling = self.sentence.pooling;
        let states = match &self.transformer {
            Transformer::Bert(e) => e.forward(backend, seqs)?,
            Transformer::Decoder(e) => e.forward(backend, seqs, pooling)?,
        };
        let d = self.dim;
        Ok(states
            .iter()
            .map(|s| {
                let mut v = pooling.apply(s, d);
                if self.sentence.normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert_eq!(check_ids(&[&[1, 2]], 3, 2), Ok(()));
        assert_eq!(
            check_ids(&[&[1], &[]], 3, 2),
            Err(InputError::Empty { index: 1 })
        );
        assert_eq!(
            check_ids(&[&[1, 2, 0]], 3, 2),
            Err(InputError::TooLong {
                index: 0,
                len: 3,
                max: 2
            })
        );
        assert_eq!(
            check_ids(&[&[1, 3]], 3, 2),
            Err(InputError::BadToken {
                index: 0,
                id: 3,
                vocab: 3
            })
        );
    }
}
