//! `config.json` of a BERT-style encoder (`model_type` `bert` or
//! `xlm-roberta`), read into the few numbers [`super::bert`] needs.

use crate::{ModelError, Result};
use kiln_backend::Activation;
use serde_json::Value;
use std::path::Path;

/// Which encoder family a checkpoint belongs to; they differ only in how
/// token positions are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// BERT: positions 0, 1, 2, ...
    Bert,
    /// XLM-RoBERTa (and RoBERTa): positions start after `pad_token_id`
    /// (`padding_idx + 1`), as transformers' `create_position_ids_from_input_ids`.
    XlmRoberta,
}

/// The shape of an encoder, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub act: Activation,
    /// The first position id: 0 for BERT, `pad_token_id + 1` for XLM-R.
    pub position_offset: usize,
    /// Architectures named in `config.json` (`BertModel`,
    /// `BertForSequenceClassification`, ...).
    pub architectures: Vec<String>,
}

/// Upper bounds on header values, so a corrupt config cannot ask for an
/// absurd allocation before the weights are even read.
const MAX_DIM: usize = 1 << 16;
const MAX_LAYERS: usize = 512;
const MAX_VOCAB: usize = 1 << 22;

impl EncoderConfig {
    /// Whether a parsed `config.json` describes an encoder this module runs.
    pub fn is_encoder(cfg: &Value) -> bool {
        matches!(
            cfg.get("model_type").and_then(Value::as_str),
            Some("bert" | "xlm-roberta" | "roberta")
        )
    }

    /// Reads the encoder's shape from a parsed `config.json` at `path`.
    pub fn from_json(cfg: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let kind = match cfg.get("model_type").and_then(Value::as_str) {
            Some("bert") => EncoderKind::Bert,
            Some("xlm-roberta" | "roberta") => EncoderKind::XlmRoberta,
            other => {
                return Err(err(format!(
                    "not a BERT-style encoder (model_type {other:?})"
                )))
            }
        };
        let num = |key: &str, max: usize| -> Result<usize> {
            let v = cfg
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| err(format!("'{key}' is missing or not a whole number")))?;
            let v = usize::try_from(v).unwrap_or(usize::MAX);
            if v == 0 || v > max {
                return Err(err(format!("'{key}' = {v} is outside 1..={max}")));
            }
            Ok(v)
        };
        let hidden_size = num("hidden_size", MAX_DIM)?;
        let num_heads = num("num_attention_heads", MAX_DIM)?;
        if hidden_size % num_heads != 0 {
            return Err(err(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            )));
        }
        let act = match cfg
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => return Err(err(format!("hidden_act '{other}' is not supported"))),
        };
        let pos_type = cfg
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute");
        if pos_type != "absolute" {
            return Err(err(format!(
                "position_embedding_type '{pos_type}' is not supported (only 'absolute')"
            )));
        }
        let pad = cfg.get("pad_token_id").and_then(Value::as_u64).unwrap_or(1) as usize;
        let position_offset = match kind {
            EncoderKind::Bert => 0,
            EncoderKind::XlmRoberta => pad.saturating_add(1),
        };
        let max_positions = num("max_position_embeddings", 1 << 20)?;
        if position_offset >= max_positions {
            return Err(err(format!(
                "pad_token_id {pad} leaves no positions below max_position_embeddings {max_positions}"
            )));
        }
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12) as f32;
        Ok(Self {
            kind,
            vocab_size: num("vocab_size", MAX_VOCAB)?,
            hidden_size,
            num_layers: num("num_hidden_layers", MAX_LAYERS)?,
            num_heads,
            intermediate_size: num("intermediate_size", MAX_DIM * 8)?,
            max_positions,
            type_vocab_size: cfg
                .get("type_vocab_size")
                .and_then(Value::as_u64)
                .unwrap_or(2)
                .clamp(1, 16) as usize,
            layer_norm_eps: eps,
            act,
            position_offset,
            architectures: cfg
                .get("architectures")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The longest input (special tokens included) the position table holds.
    pub fn max_tokens(&self) -> usize {
        self.max_positions - self.position_offset
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4,
               "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 100,
               "max_position_embeddings": 64, "pad_token_id": 0})
    }

    #[test]
    fn xlmr_positions_start_after_padding_idx() {
        let mut cfg = base();
        cfg["model_type"] = json!("xlm-roberta");
        cfg["pad_token_id"] = json!(1);
        let c = EncoderConfig::from_json(&cfg, Path::new("c.json")).unwrap();
        assert_eq!((c.position_offset, c.max_tokens()), (2, 62));
        let b = EncoderConfig::from_json(&base(), Path::new("c.json")).unwrap();
        assert_eq!((b.position_offset, b.max_tokens()), (0, 64));
    }

    #[test]
    fn bad_values_are_named() {
        let mut cfg = base();
        cfg["num_attention_heads"] = json!(5);
        let e = EncoderConfig::from_json(&cfg, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let mut cfg = base();
        cfg["hidden_size"] = json!(1u64 << 40);
        let e = EncoderConfig::from_json(&cfg, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("'hidden_size'"), "{e}");
        let mut cfg = base();
        cfg["hidden_act"] = json!("mish");
        let e = EncoderConfig::from_json(&cfg, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("mish"), "{e}");
    }
}
