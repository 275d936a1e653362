//! gpt-oss (`model_type` `gpt_oss`, GGUF architecture `gpt-oss`): its
//! configuration ([`apply_hf`], [`adjust_gguf`]: experts routed by a
//! softmax over the top-k logits with router and expert biases, the clamped
//! SwiGLU of its experts, which layers attend through a sliding window,
//! attention sinks and biases) and its tensors under kiln's names
//! (`weights`: the fused, interleaved Hugging Face experts, in floats or
//! MXFP4, split into llama.cpp's per-kind stacks).
//! (Its YaRN rotary scaling is `crate::yarn`'s, its attention sinks are
//! per-layer tensors, HF `model.layers.N.self_attn.sinks`, GGUF
//! `blk.N.attn_sinks.weight`.)
//!
//! Facts from transformers' `configuration_gpt_oss.py` / `modeling_gpt_oss.py`
//! and llama.cpp's `openai-moe` model (GGUF architecture `gpt-oss`).

use kiln_backend::Activation;
use serde_json::Value as Json;

use crate::config::DecoderConfig;
use crate::gguf::GgufFile;
use crate::moe::{MoeConfig, Routing};

mod weights;
pub use weights::{hf_names, GgufNames, HfExperts, Mxfp4Pairs, MXFP4_REFUSAL};

/// The SwiGLU constants gpt-oss was trained with; llama.cpp writes no
/// GGUF key for them and uses these.
pub const SWIGLU_ALPHA: f32 = 1.702;
/// The clamp limit of gate and up projections (config `swiglu_limit`).
pub const SWIGLU_LIMIT: f32 = 7.0;

/// The experts' activation from a config.json: `swiglu_alpha` and
/// `swiglu_limit` (defaults 1.702 and 7.0, as transformers' config).
pub fn clamped_swiglu(config: &Json) -> Result<Activation, String> {
    let num = |k: &str, default: f32| -> Result<f32, String> {
        match config.get(k) {
            None | Some(Json::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x as f32),
                _ => Err(format!("'{k}' must be a positive number, got {v}")),
            },
        }
    };
    Ok(Activation::ClampedSwiglu {
        alpha: num("swiglu_alpha", SWIGLU_ALPHA)?,
        limit: num("swiglu_limit", SWIGLU_LIMIT)?,
    })
}

/// The experts' activation of a GGUF file (llama.cpp's constants).
pub fn gguf_clamped_swiglu() -> Activation {
    Activation::ClampedSwiglu {
        alpha: SWIGLU_ALPHA,
        limit: SWIGLU_LIMIT,
    }
}

/// Each layer's sliding window from a config.json: `layer_types`
/// (`"sliding_attention"` / `"full_attention"`), else transformers'
/// default, sliding on even layers (0, 2, ...) and full on odd ones; the
/// window is `sliding_window` (default 128).
pub fn layer_windows(config: &Json, n_layers: usize) -> Result<Vec<Option<usize>>, String> {
    let window = match config.get("sliding_window") {
        None | Some(Json::Null) => 128,
        Some(v) => match v.as_u64() {
            Some(w) if w > 0 => w as usize,
            _ => {
                return Err(format!(
                    "'sliding_window' must be a positive integer, got {v}"
                ))
            }
        },
    };
    match config.get("layer_types") {
        None | Some(Json::Null) => Ok(periodic_windows(window, 2, n_layers)),
        Some(Json::Array(types)) if types.len() == n_layers => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(Some(window)),
                Some("full_attention") => Ok(None),
                _ => Err(format!(
                    "'layer_types' entry {t} is not sliding_attention or full_attention"
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "'layer_types' must list {n_layers} layer types, got {other}"
        )),
    }
}

/// Each layer's sliding window of a GGUF file, as llama.cpp reads them:
/// `gpt-oss.attention.sliding_window` (required), on the layers that
/// `gpt-oss.attention.sliding_window_pattern` marks (an array of booleans,
/// or a period `n`: layer `i` slides when `i % n < n - 1`), by default a
/// period of 2: even layers slide, odd ones attend fully, the same layers
/// as transformers' default.
pub fn gguf_layer_windows(file: &GgufFile, n_layers: usize) -> Result<Vec<Option<usize>>, String> {
    let key = "gpt-oss.attention.sliding_window";
    let window = file
        .get_u64(key)
        .filter(|&w| w > 0)
        .ok_or_else(|| format!("missing or zero '{key}'"))? as usize;
    let pattern = "gpt-oss.attention.sliding_window_pattern";
    match file.get(pattern) {
        None => Ok(periodic_windows(window, 2, n_layers)),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return Ok(periodic_windows(window, n as usize, n_layers));
            }
            let flags = v
                .as_array()
                .filter(|a| a.len() == n_layers)
                .ok_or_else(|| format!("'{pattern}' is neither a period nor {n_layers} flags"))?;
            flags
                .iter()
                .map(|f| match f.as_bool() {
                    Some(slides) => Ok(slides.then_some(window)),
                    None => Err(format!("'{pattern}' holds a non-boolean")),
                })
                .collect()
        }
    }
}

/// Completes a llama-shaped config read from a gpt-oss `config.json`
/// (`model_type` `gpt_oss`): its experts (`num_local_experts`, top
/// `num_experts_per_tok`, each `intermediate_size` wide, softmax over the
/// chosen router logits, router and expert biases), the clamped SwiGLU,
/// per-layer windows in place of one model-wide window, attention sinks
/// and q/k/v/o biases (`attention_bias`, default true).
pub fn apply_hf(cfg: &mut DecoderConfig, json: &Json) -> std::result::Result<(), String> {
    let get = |k: &str| json.get(k).and_then(Json::as_u64).map(|v| v as usize);
    let n_experts = get("num_local_experts")
        .or_else(|| get("num_experts"))
        .ok_or("missing or non-integer 'num_local_experts'")?;
    let n_experts_used =
        get("num_experts_per_tok").ok_or("missing or non-integer 'num_experts_per_tok'")?;
    crate::moe::check_layers(cfg.n_layers)?;
    let bias = json
        .get("attention_bias")
        .and_then(Json::as_bool)
        .unwrap_or(true);
    (cfg.qkv_bias, cfg.out_bias) = (bias, bias);
    cfg.activation = clamped_swiglu(json)?;
    cfg.layer_attention = layer_windows(json, cfg.n_layers)?
        .into_iter()
        .map(|window| crate::config::LayerAttention {
            window,
            local_rope: false,
        })
        .collect();
    cfg.sliding_window = None;
    cfg.attn_sinks = true;
    cfg.moe = Some(experts(n_experts, n_experts_used, cfg.intermediate_size)?);
    Ok(())
}

/// Completes a config read from a GGUF file of architecture `gpt-oss`
/// (after the generic expert settings are read): llama.cpp routes this
/// architecture by a softmax over the chosen logits and always has router
/// and expert biases, sinks, attention biases and the clamped SwiGLU.
pub fn adjust_gguf(file: &GgufFile, cfg: &mut DecoderConfig) -> std::result::Result<(), String> {
    let m = cfg
        .moe
        .as_ref()
        .ok_or("a gpt-oss file needs 'gpt-oss.expert_count'")?;
    cfg.moe = Some(MoeConfig {
        dense_layers: Vec::new(),
        ..experts(m.n_experts, m.n_experts_used, m.expert_ff)?
    });
    cfg.activation = gguf_clamped_swiglu();
    cfg.layer_attention = gguf_layer_windows(file, cfg.n_layers)?
        .into_iter()
        .map(|window| crate::config::LayerAttention {
            window,
            local_rope: false,
        })
        .collect();
    cfg.sliding_window = None;
    cfg.attn_sinks = true;
    (cfg.qkv_bias, cfg.out_bias) = (true, true);
    Ok(())
}

/// gpt-oss's expert block: every layer sparse, top-k then softmax, biases.
fn experts(
    n_experts: usize,
    n_experts_used: usize,
    expert_ff: usize,
) -> std::result::Result<MoeConfig, String> {
    let m = MoeConfig {
        n_experts,
        n_experts_used,
        expert_ff,
        routing: Routing::TopKThenSoftmax,
        shared_expert_ff: None,
        shared_expert_gate: false,
        dense_layers: Vec::new(),
        router_bias: true,
        expert_bias: true,
    };
    m.validate()?;
    Ok(m)
}

/// llama.cpp's `set_swa_pattern(n)`: layer `i` slides when `i % n < n - 1`
/// (every layer when `n` is 0).
fn periodic_windows(window: usize, n: usize, n_layers: usize) -> Vec<Option<usize>> {
    (0..n_layers)
        .map(|i| (n == 0 || i % n < n - 1).then_some(window))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn swiglu_parameters_are_read_with_transformers_defaults() {
        assert_eq!(clamped_swiglu(&json!({})).unwrap(), gguf_clamped_swiglu());
        assert_eq!(
            clamped_swiglu(&json!({"swiglu_limit": 5.5, "swiglu_alpha": 2})).unwrap(),
            Activation::ClampedSwiglu {
                alpha: 2.0,
                limit: 5.5
            }
        );
        let e = clamped_swiglu(&json!({"swiglu_limit": -1})).unwrap_err();
        assert!(e.contains("swiglu_limit"), "{e}");
    }

    #[test]
    fn layer_windows_follow_layer_types_or_the_default_pattern() {
        // gpt-oss-20b's config: 24 layers alternating, starting sliding.
        let types: Vec<&str> = (0..4)
            .map(|i| {
                if i % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        let w = layer_windows(&json!({"sliding_window": 128, "layer_types": types}), 4).unwrap();
        assert_eq!(w, [Some(128), None, Some(128), None]);
        // transformers' default when layer_types is absent: the same pattern.
        assert_eq!(layer_windows(&json!({}), 4).unwrap(), w);
        assert_eq!(periodic_windows(128, 2, 4), w);
        assert_eq!(periodic_windows(8, 3, 4), [Some(8), Some(8), None, Some(8)]);
        // An explicit other pattern is followed, not the default.
        let w = layer_windows(
            &json!({"sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]}),
            2,
        )
        .unwrap();
        assert_eq!(w, [None, Some(64)]);
        for bad in [
            json!({"layer_types": ["full_attention"]}),
            json!({"layer_types": ["global", "full_attention"]}),
            json!({"sliding_window": 0}),
        ] {
            assert!(layer_windows(&bad, 2).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod gguf_tests {
    use super::*;
    use crate::gguf::{GgufWriter, Value};

    fn file(meta: &[(&str, Value)]) -> (tempfile::TempDir, GgufFile) {
        let mut w = GgufWriter::default();
        w.meta("general.architecture", Value::String("gpt-oss".into()));
        for (k, v) in meta {
            w.meta(k, v.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        let f = GgufFile::open(&path).unwrap();
        (dir, f)
    }

    #[test]
    fn gguf_windows_follow_llama_cpps_pattern() {
        let win = ("gpt-oss.attention.sliding_window", Value::U32(128));
        let (_d, f) = file(std::slice::from_ref(&win));
        assert_eq!(
            gguf_layer_windows(&f, 4).unwrap(),
            [Some(128), None, Some(128), None]
        );
        let flags = Value::Array(vec![
            Value::Bool(false),
            Value::Bool(true),
            Value::Bool(true),
        ]);
        let (_d, f) = file(&[
            win.clone(),
            ("gpt-oss.attention.sliding_window_pattern", flags),
        ]);
        assert_eq!(
            gguf_layer_windows(&f, 3).unwrap(),
            [None, Some(128), Some(128)]
        );
        assert!(gguf_layer_windows(&f, 4).unwrap_err().contains("4 flags"));
        let (_d, f) = file(&[]);
        assert!(gguf_layer_windows(&f, 2)
            .unwrap_err()
            .contains("sliding_window"));
    }
}
