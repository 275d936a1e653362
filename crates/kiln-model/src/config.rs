//! One configuration type for every decoder-only architecture.
//!
//! Checkpoints describe their model in different places (GGUF metadata keys,
//! Hugging Face `config.json`); both are turned into a [`DecoderConfig`] here,
//! and the decoder is driven by that alone.

use std::path::Path;

use kiln_backend::{Activation, RopeLayout};
use serde_json::Value as Json;

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

/// Which normalisation the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    Layer,
}

/// How rotary frequencies are stretched for contexts longer than training.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies scaled equally).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// Per-frequency divisors read from the checkpoint (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Dimensions of each head that rotate (the rest pass through).
    pub rot_dim: usize,
    pub layout: RopeLayout,
    pub scaling: RopeScaling,
}

/// Everything the generic decoder needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Architecture name as the checkpoint states it (`llama`, `qwen2`, …).
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub activation: Activation,
    /// `act(gate(x)) * up(x)` (true) or `act(up(x))` (false).
    pub gated_ffn: bool,
    pub rope: Option<RopeConfig>,
    /// Longest context the model was built for.
    pub max_position_embeddings: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding-window attention span, if any.
    pub sliding_window: Option<usize>,
}

impl DecoderConfig {
    /// Number of parameters implied by the shape (biases and norms included approximately).
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.n_heads * self.head_dim) as u64;
        let kv = (self.n_kv_heads * self.head_dim) as u64;
        let ff = self.intermediate_size as u64;
        let ffn_mats = if self.gated_ffn { 3 } else { 2 };
        let per_layer = h * q * 2 + h * kv * 2 + ffn_mats * h * ff + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + per_layer * self.n_layers as u64 + h
    }

    /// Reads a llama-family configuration from GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let bad = |msg: String| ModelError::Config {
            path: file.path().to_path_buf(),
            msg,
        };
        let arch = file
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing general.architecture".into()))?
            .to_string();
        if arch != "llama" {
            return Err(bad(format!(
                "architecture '{arch}' is not supported from GGUF yet (llama is)"
            )));
        }
        let prefix = arch.clone();
        let key = |k: &str| format!("{prefix}.{k}");
        let req = |k: &str| -> Result<usize> {
            file.get_u64(&key(k))
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing or non-integer metadata '{}'", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = file
            .get_u64(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0 || hidden_size % n_heads != 0 {
            return Err(bad(format!(
                "{hidden_size} features do not split into {n_heads} heads"
            )));
        }
        let head_dim = file
            .get_u64(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden_size / n_heads);
        let vocab_size = match file.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| bad("cannot tell the vocabulary size".into()))?,
        };
        let scaling = match file.get_str(&key("rope.scaling.type")) {
            // Llama 3.1 GGUFs carry their frequency scaling precomputed as a tensor.
            _ if file.tensors.contains_key("rope_freqs.weight") => {
                RopeScaling::Factors(file.tensor_f32("rope_freqs.weight")?.data)
            }
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0),
            },
            Some(other) => return Err(bad(format!("rope scaling '{other}' is not supported"))),
        };
        let rot_dim = file
            .get_u64(&key("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            n_layers: req("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: req("feed_forward_length")?,
            norm: NormKind::Rms,
            norm_eps: file
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            activation: Activation::Silu,
            gated_ffn: true,
            rope: Some(RopeConfig {
                theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
                rot_dim,
                // llama.cpp's converter permutes q/k rows so that pairs are adjacent.
                layout: RopeLayout::Interleaved,
                scaling,
            }),
            max_position_embeddings: req("context_length")?,
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
            sliding_window: None,
        };
        cfg.validate(file.path())?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_hf_json(&json, path)
    }

    /// Interprets a parsed `config.json` (`path` is used in error messages).
    pub fn from_hf_json(json: &Json, path: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let get_usize = |k: &str| json.get(k).and_then(Json::as_u64).map(|v| v as usize);
        let req =
            |k: &str| get_usize(k).ok_or_else(|| bad(format!("missing or non-integer '{k}'")));
        let model_type = json
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| bad("missing 'model_type'".into()))?;
        if !matches!(model_type, "llama") {
            return Err(bad(format!(
                "model_type '{model_type}' is not supported yet (llama is)"
            )));
        }
        let hidden_size = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        if n_heads == 0 || hidden_size % n_heads != 0 {
            return Err(bad(format!(
                "{hidden_size} features do not split into {n_heads} heads"
            )));
        }
        let head_dim = get_usize("head_dim").unwrap_or(hidden_size / n_heads);
        let activation = match json
            .get("hidden_act")
            .and_then(Json::as_str)
            .unwrap_or("silu")
        {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(bad(format!("hidden_act '{other}' is not supported"))),
        };
        let cfg = Self {
            arch: model_type.to_string(),
            vocab_size: req("vocab_size")?,
            hidden_size,
            n_layers: req("num_hidden_layers")?,
            n_heads,
            n_kv_heads: get_usize("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            intermediate_size: req("intermediate_size")?,
            norm: NormKind::Rms,
            norm_eps: json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .unwrap_or(1e-6) as f32,
            activation,
            gated_ffn: true,
            rope: Some(RopeConfig {
                theta: json
                    .get("rope_theta")
                    .and_then(Json::as_f64)
                    .unwrap_or(10000.0),
                rot_dim: head_dim,
                layout: RopeLayout::HalfSplit,
                scaling: hf_rope_scaling(json.get("rope_scaling")).map_err(bad)?,
            }),
            max_position_embeddings: get_usize("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            sliding_window: None,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                msg,
            })
        };
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads cannot share {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if [
            self.vocab_size,
            self.hidden_size,
            self.n_layers,
            self.intermediate_size,
            self.head_dim,
        ]
        .contains(&0)
        {
            return bad("a model dimension is zero".into());
        }
        if let Some(r) = &self.rope {
            if r.rot_dim > self.head_dim || !r.rot_dim.is_multiple_of(2) {
                return bad(format!(
                    "rotary dimension {} for head dimension {}",
                    r.rot_dim, self.head_dim
                ));
            }
        }
        Ok(())
    }

    /// The `[max_pos, rot_dim]` table of cosines (first half of each row) and
    /// sines (second half) the backend's rope op reads.
    pub fn rope_table(&self, max_pos: usize) -> Option<Vec<f32>> {
        let r = self.rope.as_ref()?;
        let half = r.rot_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / r.theta.powf(2.0 * i as f64 / r.rot_dim as f64);
                scale_frequency(f, i, &r.scaling)
            })
            .collect();
        let mut table = vec![0f32; max_pos * r.rot_dim];
        for (p, row) in table.chunks_exact_mut(r.rot_dim).enumerate() {
            for (i, &f) in inv_freq.iter().enumerate() {
                let ang = p as f64 * f;
                row[i] = ang.cos() as f32;
                row[half + i] = ang.sin() as f32;
            }
        }
        Some(table)
    }
}

fn scale_frequency(f: f64, i: usize, scaling: &RopeScaling) -> f64 {
    match scaling {
        RopeScaling::None => f,
        RopeScaling::Linear { factor } => f / factor,
        RopeScaling::Factors(factors) => f / factors.get(i).copied().unwrap_or(1.0) as f64,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (original_max_position / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

fn hf_rope_scaling(v: Option<&Json>) -> std::result::Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let num = |k: &str| {
        v.get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| format!("rope_scaling '{kind}' needs a numeric '{k}'"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
        },
        other => return Err(format!("rope_scaling type '{other}' is not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        // Wavelength 2π/1 ≈ 6 < 2048: unchanged.
        assert_eq!(scale_frequency(1.0, 0, &s), 1.0);
        // Wavelength 2π/1e-4 ≈ 62832 > 8192: divided by the factor.
        assert!((scale_frequency(1e-4, 0, &s) - 1.25e-5).abs() < 1e-12);
        // In between: a blend, strictly between the two.
        let f = 2.0 * std::f64::consts::PI / 4000.0;
        let g = scale_frequency(f, 0, &s);
        assert!(g < f && g > f / 8.0);
    }

    #[test]
    fn hf_config_errors_name_the_file_and_key() {
        let p = Path::new("/m/config.json");
        let j: Json = serde_json::json!({"model_type": "llama", "hidden_size": 64});
        let e = DecoderConfig::from_hf_json(&j, p).unwrap_err().to_string();
        assert!(
            e.contains("/m/config.json") && e.contains("num_attention_heads"),
            "{e}"
        );
        let j: Json = serde_json::json!({"model_type": "bloom"});
        let e = DecoderConfig::from_hf_json(&j, p).unwrap_err().to_string();
        assert!(e.contains("bloom"), "{e}");
    }
}
