//! Cross-encoder rerankers: an encoder reading a (query, document) pair as
//! one input and a sequence-classification head on its first token giving
//! one relevance logit. BERT (`BertForSequenceClassification`: `[CLS] query
//! [SEP] document [SEP]`, token types 0 then 1; pooler dense + tanh, then
//! the classifier) and XLM-RoBERTa (`XLMRobertaForSequenceClassification`,
//! bge-reranker: `<s> query </s></s> document </s>`, token types 0;
//! `classifier.dense` + tanh, then `classifier.out_proj`).

use super::bert::BertEncoder;
use super::config::EncoderConfig;
use crate::weights::{SafetensorsSource, WeightSource};
use crate::{HostTensor, ModelError, Result};
use kiln_backend::Backend;
use std::path::Path;

/// A loaded cross-encoder.
pub struct CrossEncoder<B: Backend> {
    pub encoder: BertEncoder<B>,
    tokenizer: tokenizers::Tokenizer,
    /// The head's hidden layer (BERT's pooler, or RoBERTa's
    /// `classifier.dense`), followed by tanh.
    pooler: (HostTensor, HostTensor),
    /// The one-label output layer (`classifier`, or `classifier.out_proj`).
    classifier: (HostTensor, HostTensor),
}

/// The sequence-classification architectures read here, with the names of
/// their head's two layers.
const HEADS: [(&str, &str, &str); 3] = [
    (
        "BertForSequenceClassification",
        "bert.pooler.dense",
        "classifier",
    ),
    (
        "XLMRobertaForSequenceClassification",
        "classifier.dense",
        "classifier.out_proj",
    ),
    (
        "RobertaForSequenceClassification",
        "classifier.dense",
        "classifier.out_proj",
    ),
];

fn head_of(cfg: &serde_json::Value) -> Option<(&'static str, &'static str)> {
    let archs = cfg["architectures"].as_array()?;
    HEADS
        .iter()
        .find(|(arch, _, _)| archs.iter().any(|a| a == arch))
        .map(|&(_, hidden, out)| (hidden, out))
}

fn identity(name: &str) -> Option<String> {
    Some(name.to_string())
}

/// `w x + b` for a `[out, in]` matrix, on the host (the head is one row per pair).
fn affine(w: &HostTensor, b: &HostTensor, x: &[f32]) -> Vec<f32> {
    w.data
        .chunks_exact(x.len())
        .zip(&b.data)
        .map(|(row, b)| row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + b)
        .collect()
}

impl<B: Backend> CrossEncoder<B> {
    /// Whether `config.json` names a sequence-classification BERT or
    /// (XLM-)RoBERTa.
    pub fn is_cross_encoder(cfg: &serde_json::Value) -> bool {
        EncoderConfig::is_encoder(cfg) && head_of(cfg).is_some()
    }

    /// Loads a sequence-classification checkpoint with one label.
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_json = crate::loader::read_json(&cfg_path)?;
        let config = EncoderConfig::from_json(&cfg_json, &cfg_path)?;
        let (hidden, out) = head_of(&cfg_json).ok_or_else(|| ModelError::Config {
            path: cfg_path.clone(),
            msg: "architectures names no BertForSequenceClassification or \
                  XLMRobertaForSequenceClassification"
                .into(),
        })?;
        let d = config.hidden_size;
        let src = SafetensorsSource::open_dir(dir, identity)?;
        let get = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            if !src.contains(name) {
                return Err(ModelError::MissingTensor {
                    path: dir.to_path_buf(),
                    tensor: name.into(),
                });
            }
            let t = src.get(name)?;
            if t.shape != shape {
                return Err(ModelError::Tensor {
                    path: dir.to_path_buf(),
                    tensor: name.into(),
                    msg: format!("shape {:?}, expected {shape:?} (one label)", t.shape),
                });
            }
            Ok(t)
        };
        let pooler = (
            get(&format!("{hidden}.weight"), &[d, d])?,
            get(&format!("{hidden}.bias"), &[d])?,
        );
        let classifier = (
            get(&format!("{out}.weight"), &[1, d])?,
            get(&format!("{out}.bias"), &[1])?,
        );
        let bytes = crate::files::read_bounded(
            &dir.join("tokenizer.json"),
            crate::files::MAX_TOKENIZER_BYTES,
            "a tokenizer.json",
        )?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            encoder: BertEncoder::load(dir, config, backend)?,
            tokenizer,
            pooler,
            classifier,
        })
    }

    /// Token ids and token types of a (query, document) pair.
    pub fn encode_pair(&self, query: &str, doc: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .tokenizer
            .encode((query, doc), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Checks pairs' token ids against the vocabulary and length limit,
    /// without computing anything (error indices are the pairs').
    pub fn check(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<(), super::InputError> {
        let ids: Vec<&[u32]> = pairs.iter().map(|p| p.0.as_slice()).collect();
        let c = &self.encoder.config;
        super::check_ids(&ids, c.vocab_size, c.max_tokens())
    }

    /// The relevance logit of each pair (before any sigmoid), as one batch.
    pub fn logits(
        &self,
        backend: &B,
        pairs: &[(Vec<u32>, Vec<u32>)],
    ) -> std::result::Result<Vec<f32>, super::EmbedError> {
        let ids: Vec<&[u32]> = pairs.iter().map(|p| p.0.as_slice()).collect();
        let types: Vec<&[u32]> = pairs.iter().map(|p| p.1.as_slice()).collect();
        let c = &self.encoder.config;
        super::check_ids(&ids, c.vocab_size, c.max_tokens())?;
        let states = self.encoder.forward_typed(backend, &ids, Some(&types))?;
        let d = c.hidden_size;
        Ok(states
            .iter()
            .map(|s| {
                let pooled: Vec<f32> = affine(&self.pooler.0, &self.pooler.1, &s[..d])
                    .into_iter()
                    .map(f32::tanh)
                    .collect();
                affine(&self.classifier.0, &self.classifier.1, &pooled)[0]
            })
            .collect())
    }
}
