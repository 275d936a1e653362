//! Encoder models for embeddings: BERT-style checkpoints (`bert`,
//! `xlm-roberta`) with the pooling and normalisation their
//! sentence-transformers files ask for. Separate from the decoder: no KV
//! cache, no sampling, attention is bidirectional and every call is one
//! forward pass over whole inputs.

pub mod bert;
pub mod config;
pub mod cross;
pub mod pooling;

pub use bert::BertEncoder;
pub use config::{EncoderConfig, EncoderKind};
pub use cross::CrossEncoder;
pub use pooling::{l2_normalize, Pooling, SentenceConfig};

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

/// An encoder with its tokenizer and sentence-transformers head: text or
/// token ids in, one vector per input out.
pub struct EmbeddingModel<B: Backend> {
    pub encoder: BertEncoder<B>,
    pub tokenizer: Tokenizer,
    pub sentence: SentenceConfig,
    /// The longest input accepted: the position table's length, or the
    /// smaller `max_seq_length` of `sentence_bert_config.json`.
    pub max_tokens: usize,
}

/// Whether `dir` holds an encoder checkpoint this module can load
/// (`config.json` with `model_type` bert / xlm-roberta).
pub fn is_encoder_dir(dir: &Path) -> bool {
    let path = dir.join("config.json");
    path.exists()
        && crate::loader::read_json(&path)
            .map(|c| EncoderConfig::is_encoder(&c))
            .unwrap_or(false)
}

impl<B: Backend> EmbeddingModel<B> {
    /// Loads an encoder checkpoint directory: `config.json`,
    /// `model.safetensors`, `tokenizer.json` and, if present, the
    /// sentence-transformers files (without them: mean pooling, normalised,
    /// the common default of embedding servers).
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config = EncoderConfig::from_json(&crate::loader::read_json(&cfg_path)?, &cfg_path)?;
        let sentence = SentenceConfig::read(dir)?.unwrap_or(SentenceConfig {
            pooling: Pooling::Mean,
            normalize: true,
        });
        let mut max_tokens = config.max_tokens();
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
        let encoder = BertEncoder::load(dir, config, backend)?;
        tracing::info!(
            dir = %dir.display(),
            kind = ?encoder.config.kind,
            dim = encoder.config.hidden_size,
            pooling = ?sentence.pooling,
            normalize = sentence.normalize,
            "loaded encoder"
        );
        Ok(Self {
            encoder,
            tokenizer,
            sentence,
            max_tokens,
        })
    }

    /// Length of the embeddings this model produces.
    pub fn dim(&self) -> usize {
        self.encoder.config.hidden_size
    }

    /// Token ids of `text` with the model's special tokens (`[CLS] ... [SEP]`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Checks token id sequences against the model's vocabulary and
    /// length limit, without computing anything.
    pub fn check(&self, seqs: &[&[u32]]) -> Result<(), InputError> {
        check_ids(seqs, self.encoder.config.vocab_size, self.max_tokens)
    }

    /// One pooled (and, if the checkpoint says so, normalised) embedding
    /// per token id sequence, computed as one batch. A sequence's embedding
    /// is the same bits alone or in any batch.
    pub fn embed(&self, backend: &B, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        check_ids(seqs, self.encoder.config.vocab_size, self.max_tokens)?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let states = self.encoder.forward(backend, seqs)?;
        let d = self.dim();
        Ok(states
            .iter()
            .map(|s| {
                let mut v = self.sentence.pooling.apply(s, d);
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
