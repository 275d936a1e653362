//! Gemma 2 and Gemma 3 (text): what their configs say, as [`DecoderConfig`]
//! settings.
//!
//! Both families are llama-shaped decoders with these differences, each a
//! field of the config that the generic decoder honours:
//! - token embeddings multiplied by `sqrt(hidden_size)` (`embed_scale`);
//! - RMSNorm computing `x * (1 + w)`: Hugging Face checkpoints store `w`
//!   (`norm_offset = 1`, folded into the weight at load), llama.cpp's
//!   converter already wrote `1 + w` into GGUF files;
//! - an RMSNorm on the attention output and one on the feed-forward output,
//!   each before its residual add (`post_norms`);
//! - a GELU-tanh gated feed-forward;
//! - attention scaled by `query_pre_attn_scalar^-0.5` (`attn_scale`);
//! - local sliding-window layers between global ones (`layer_attention`):
//!   every other layer in Gemma 2 (layer 0 local), five local to one global
//!   in Gemma 3;
//! - Gemma 2: soft-capped attention scores and output logits;
//! - Gemma 3: per-head q/k RMSNorm, and local layers rotating with their own
//!   base (10000, unscaled) while global ones use `rope_theta` and the
//!   checkpoint's scaling (`local_rope`).
//!
//! Missing `config.json` keys take the defaults of transformers'
//! `Gemma2Config` / `Gemma3TextConfig` (the multimodal Gemma 3 checkpoints
//! leave most of their `text_config` to them).

use std::path::Path;

use kiln_backend::Activation;
use serde_json::Value as Json;

use crate::config::{hf_rope_scaling, DecoderConfig, LayerAttention, RopeConfig, RopeScaling};
use crate::gguf::GgufFile;
use crate::weights::{
    hf_gemma3_mm_names, hf_gemma3_mm_original_names, NameMap, SafetensorsSource, WeightSource,
};

/// How the multimodal Gemma 3 checkpoint in `dir` names its language
/// model's tensors: `model.language_model.…` as transformers saves it now,
/// or `language_model.model.…` as the checkpoints were first published.
pub(crate) fn multimodal_names(dir: &Path) -> NameMap {
    let saved_now = SafetensorsSource::open_dir(dir, hf_gemma3_mm_names);
    match saved_now {
        Ok(s) if !s.contains("token_embd.weight") => hf_gemma3_mm_original_names,
        // Other errors are the loader's to report, with these names.
        _ => hf_gemma3_mm_names,
    }
}

/// transformers' defaults for the keys a Gemma config may leave out.
struct Defaults {
    vocab_size: usize,
    max_positions: usize,
    /// Every `pattern`-th layer is global, the others local.
    pattern: usize,
    global_theta: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
}

const GEMMA2: Defaults = Defaults {
    vocab_size: 256_000,
    max_positions: 8192,
    pattern: 2,
    global_theta: 10_000.0,
    attn_softcap: Some(50.0),
    final_softcap: Some(30.0),
};

const GEMMA3: Defaults = Defaults {
    vocab_size: 262_208,
    max_positions: 131_072,
    pattern: 6,
    global_theta: 1_000_000.0,
    attn_softcap: None,
    final_softcap: None,
};

/// Gemma 3's local layers rotate with this base unless the config names another.
const LOCAL_THETA: f64 = 10_000.0;

/// Local (sliding-window) or global, for `n` layers where every
/// `pattern`-th one is global (transformers' and llama.cpp's rule: layer
/// `i` is local when `(i + 1) % pattern != 0`; llama.cpp reads a pattern of
/// 0 as "every layer local").
fn pattern_layers(n: usize, pattern: usize) -> Vec<bool> {
    (0..n)
        .map(|i| pattern == 0 || (i + 1) % pattern != 0)
        .collect()
}

/// The layer list from local flags, the window and whether local layers
/// rotate with their own table.
fn layer_attention(local: &[bool], window: Option<usize>, local_rope: bool) -> Vec<LayerAttention> {
    local
        .iter()
        .map(|&l| LayerAttention {
            window: if l { window } else { None },
            local_rope: l && local_rope,
        })
        .collect()
}

/// `sqrt(hidden)` as transformers multiplies it: a float32 tensor cast to
/// the weights' dtype first (so 55.4256 becomes 55.5 for a bfloat16 Gemma 3 4B).
fn embed_scale(hidden: usize, dtype: Option<&str>) -> f32 {
    let s = (hidden as f64).sqrt() as f32;
    match dtype {
        Some("bfloat16") => half::bf16::from_f32(s).to_f32(),
        Some("float16") => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// A config value that may be absent (take `default`) or null (none).
fn optional_f64(json: &Json, key: &str, default: Option<f64>) -> Result<Option<f64>, String> {
    match json.get(key) {
        None => Ok(default),
        Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("'{key}' is not a number")),
    }
}

/// Reads a Gemma 2 (`gemma2`), Gemma 3 text (`gemma3_text`) or multimodal
/// Gemma 3 (`gemma3`: its `text_config`, the vision tower ignored) config.
pub(crate) fn from_hf_json(model_type: &str, top: &Json) -> Result<DecoderConfig, String> {
    let json = if model_type == "gemma3" {
        top.get("text_config")
            .filter(|t| t.is_object())
            .ok_or("a multimodal gemma3 config without a 'text_config' object")?
    } else {
        top
    };
    let gemma3 = model_type != "gemma2";
    let d = if gemma3 { &GEMMA3 } else { &GEMMA2 };
    let usize_or = |k: &str, default: usize| -> Result<usize, String> {
        match json.get(k) {
            None | Some(Json::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| format!("'{k}' is not a non-negative integer")),
        }
    };
    let bool_or = |k: &str, default: bool| json.get(k).and_then(Json::as_bool).unwrap_or(default);
    if bool_or("use_bidirectional_attention", false) {
        return Err(
            "bidirectional Gemma (EmbeddingGemma) is an encoder, not a decoder kiln serves".into(),
        );
    }
    let hidden = usize_or("hidden_size", 2304)?;
    let heads = usize_or("num_attention_heads", 8)?;
    if heads == 0 {
        return Err("num_attention_heads is 0".into());
    }
    let mut c = DecoderConfig::llama_like(
        model_type,
        usize_or("vocab_size", d.vocab_size)?,
        hidden,
        usize_or("num_hidden_layers", 26)?,
        heads,
    );
    c.n_kv_heads = usize_or("num_key_value_heads", 4)?;
    c.head_dim = usize_or("head_dim", 256)?;
    c.intermediate_size = usize_or("intermediate_size", 9216)?;
    c.norm_eps = json
        .get("rms_norm_eps")
        .and_then(Json::as_f64)
        .unwrap_or(1e-6) as f32;
    c.activation = match json
        .get("hidden_activation")
        .and_then(Json::as_str)
        .unwrap_or("gelu_pytorch_tanh")
    {
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        other => return Err(format!("hidden_activation '{other}' is not supported")),
    };
    c.max_position_embeddings = usize_or("max_position_embeddings", d.max_positions)?;
    c.tie_word_embeddings = json
        .get("tie_word_embeddings")
        .or_else(|| top.get("tie_word_embeddings"))
        .and_then(Json::as_bool)
        .unwrap_or(true);
    let bias = bool_or("attention_bias", false);
    (c.qkv_bias, c.out_bias) = (bias, bias);
    c.qk_norm = gemma3;
    c.norm_offset = 1.0;
    c.post_norms = true;
    let dtype = [json, top].iter().find_map(|j| {
        j.get("dtype")
            .or_else(|| j.get("torch_dtype"))
            .and_then(Json::as_str)
    });
    c.embed_scale = Some(embed_scale(hidden, dtype));
    let scalar = json
        .get("query_pre_attn_scalar")
        .and_then(Json::as_f64)
        .unwrap_or(256.0);
    if scalar <= 0.0 {
        return Err(format!("query_pre_attn_scalar {scalar} is not positive"));
    }
    c.attn_scale = Some(scalar.powf(-0.5) as f32);
    let cap = |k: &str, default| -> Result<Option<f32>, String> {
        match optional_f64(json, k, default)? {
            Some(v) if v <= 0.0 => Err(format!("'{k}' {v} is not positive")),
            v => Ok(v.map(|v| v as f32)),
        }
    };
    c.attn_logit_softcap = cap("attn_logit_softcapping", d.attn_softcap)?;
    c.final_logit_softcap = cap("final_logit_softcapping", d.final_softcap)?;

    let window = match json.get("sliding_window") {
        None => Some(4096),
        Some(Json::Null) => None,
        Some(v) => Some(v.as_u64().ok_or("'sliding_window' is not an integer")? as usize),
    }
    .filter(|&w| w > 0);
    let local: Vec<bool> = match json.get("layer_types").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_array()
            .ok_or("'layer_types' is not a list")?
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "layer type {t} is not sliding_attention or full_attention"
                )),
            })
            .collect::<Result<_, _>>()?,
        None => match usize_or("sliding_window_pattern", d.pattern)? {
            // transformers divides by it.
            0 => return Err("sliding_window_pattern is 0".into()),
            p => pattern_layers(c.n_layers, p),
        },
    };
    if local.len() != c.n_layers {
        return Err(format!(
            "{} layer_types for {} layers",
            local.len(),
            c.n_layers
        ));
    }

    // Rotary: `rope_parameters` per layer type (transformers 5), or one
    // dict, or the older `rope_theta` / `rope_scaling` / `rope_local_base_freq`.
    let params = json.get("rope_parameters").filter(|v| v.is_object());
    let per_type = |t: &str| params.and_then(|p| p.get(t)).filter(|v| v.is_object());
    let (global_params, local_params) =
        match (per_type("full_attention"), per_type("sliding_attention")) {
            (None, None) => (params.or_else(|| json.get("rope_scaling")), None),
            (g, l) => (g, l),
        };
    let theta_of = |p: Option<&Json>, legacy: &str, default: f64| {
        p.and_then(|p| p.get("rope_theta"))
            .or_else(|| json.get(legacy))
            .and_then(Json::as_f64)
            .unwrap_or(default)
    };
    let rope = |theta: f64, scaling: RopeScaling| RopeConfig {
        theta,
        rot_dim: c.head_dim,
        layout: kiln_backend::RopeLayout::HalfSplit,
        scaling,
    };
    // In old configs `rope_scaling` is the global layers' scaling.
    c.rope = Some(rope(
        theta_of(global_params, "rope_theta", d.global_theta),
        hf_rope_scaling(global_params, json)?,
    ));
    if gemma3 {
        let local_theta = theta_of(local_params, "rope_local_base_freq", LOCAL_THETA);
        c.local_rope = Some(rope(local_theta, hf_rope_scaling(local_params, json)?));
    }
    c.layer_attention = layer_attention(&local, window, gemma3);
    c.sliding_window = None;
    Ok(c)
}

/// The Gemma settings of a `gemma2` or `gemma3` GGUF, read as llama.cpp
/// reads them (`cfg` already holds what every architecture shares).
pub(crate) fn adjust_gguf(file: &GgufFile, cfg: &mut DecoderConfig) -> Result<(), String> {
    let arch = cfg.arch.clone();
    let gemma3 = arch == "gemma3";
    let key = |k: &str| format!("{arch}.{k}");
    cfg.activation = Activation::GeluTanh;
    cfg.gated_ffn = true;
    // llama.cpp scales by sqrtf(n_embd) in float32.
    cfg.embed_scale = Some((cfg.hidden_size as f32).sqrt());
    // The converter already added 1 to every norm weight.
    cfg.norm_offset = 0.0;
    cfg.post_norms = true;
    // GGUF has no query_pre_attn_scalar: llama.cpp derives it from the
    // model size (the 27B models use hidden / heads, the others head_dim).
    let big = matches!(
        (arch.as_str(), cfg.n_layers),
        ("gemma2", 46) | ("gemma3", 62)
    );
    let scalar = if big {
        cfg.hidden_size / cfg.n_heads
    } else {
        cfg.head_dim
    };
    cfg.attn_scale = Some(1.0 / (scalar as f32).sqrt());
    let f = |k: &str| file.get_f64(&key(k)).map(|v| v as f32);
    let positive = |v: Option<f32>| v.filter(|&v| v > 0.0);
    if gemma3 {
        cfg.attn_logit_softcap = None;
        cfg.final_logit_softcap = positive(f("final_logit_softcapping"));
    } else {
        cfg.attn_logit_softcap = positive(Some(f("attn_logit_softcapping").unwrap_or(50.0)));
        cfg.final_logit_softcap = positive(Some(f("final_logit_softcapping").unwrap_or(30.0)));
    }
    let window = match file.get_u64(&key("attention.sliding_window")) {
        Some(w) => Some(w as usize).filter(|&w| w > 0),
        None if gemma3 => None,
        None => Some(4096),
    };
    cfg.sliding_window = None;
    let Some(window) = window else {
        // Gemma 3 without a window: every layer global.
        cfg.layer_attention = Vec::new();
        return Ok(());
    };
    let pattern_key = key("attention.sliding_window_pattern");
    let local: Vec<bool> = match file.get(&pattern_key) {
        Some(v) => match v.as_array() {
            Some(flags) => flags
                .iter()
                .map(|f| {
                    f.as_bool()
                        .ok_or(format!("'{pattern_key}' holds a non-boolean"))
                })
                .collect::<Result<_, _>>()?,
            None => pattern_layers(
                cfg.n_layers,
                v.as_u64()
                    .ok_or(format!("'{pattern_key}' is not an integer or a list"))?
                    as usize,
            ),
        },
        None => pattern_layers(cfg.n_layers, if gemma3 { 6 } else { 2 }),
    };
    if local.len() != cfg.n_layers {
        return Err(format!(
            "'{pattern_key}' has {} flags for {} layers",
            local.len(),
            cfg.n_layers
        ));
    }
    let global = cfg.rope.clone().ok_or("no rotary settings")?;
    if gemma3 {
        // Local layers: their own base (10000 unless stated), unscaled.
        cfg.local_rope = Some(RopeConfig {
            theta: file
                .get_f64(&key("rope.freq_base_swa"))
                .unwrap_or(LOCAL_THETA),
            scaling: RopeScaling::None,
            ..global
        });
    } else if let Some(theta) = file.get_f64(&key("rope.freq_base_swa")) {
        cfg.local_rope = Some(RopeConfig { theta, ..global });
    }
    cfg.layer_attention = layer_attention(&local, Some(window), cfg.local_rope.is_some());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(j: Json) -> DecoderConfig {
        DecoderConfig::from_hf_json(&j, Path::new("config.json")).expect("config")
    }

    #[test]
    fn gemma2_alternates_from_a_local_first_layer_and_caps_by_default() {
        let c = cfg(
            serde_json::json!({"model_type": "gemma2", "num_hidden_layers": 4,
            "sliding_window": 8, "query_pre_attn_scalar": 144}),
        );
        let w: Vec<_> = (0..4).map(|i| c.layer_attention(i).window).collect();
        assert_eq!(w, [Some(8), None, Some(8), None]);
        assert_eq!(c.attn_logit_softcap, Some(50.0));
        assert_eq!(c.final_logit_softcap, Some(30.0));
        assert_eq!(c.attn_scale, Some(1.0 / 12.0));
        assert_eq!((c.head_dim, c.n_kv_heads, c.norm_offset), (256, 4, 1.0));
        assert!(c.local_rope.is_none() && !c.qk_norm && c.post_norms);
    }

    #[test]
    fn gemma3_legacy_and_per_type_rope_fields_read_the_same() {
        let legacy = cfg(
            serde_json::json!({"model_type": "gemma3_text", "num_hidden_layers": 7,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        );
        let new = cfg(
            serde_json::json!({"model_type": "gemma3_text", "num_hidden_layers": 7,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        );
        assert_eq!(legacy, new);
        let r = new.rope.as_ref().unwrap();
        assert_eq!(
            (r.theta, &r.scaling),
            (1e6, &RopeScaling::Linear { factor: 8.0 })
        );
        let l = new.local_rope.as_ref().unwrap();
        assert_eq!((l.theta, &l.scaling), (1e4, &RopeScaling::None));
        // Layers 0-4 local, 5 global, 6 local.
        let local: Vec<_> = (0..7).map(|i| new.layer_attention(i).local_rope).collect();
        assert_eq!(local, [true, true, true, true, true, false, true]);
        assert!(
            new.qk_norm && new.final_logit_softcap.is_none() && new.attn_logit_softcap.is_none()
        );
    }

    #[test]
    fn multimodal_gemma3_reads_its_text_config_and_rounds_the_embedding_scale() {
        let c = cfg(
            serde_json::json!({"model_type": "gemma3", "torch_dtype": "bfloat16",
            "text_config": {"model_type": "gemma3_text", "hidden_size": 3072}}),
        );
        assert_eq!(c.arch, "gemma3");
        assert_eq!(c.embed_scale, Some(55.5));
        assert_eq!(c.vocab_size, 262_208);
        let e = DecoderConfig::from_hf_json(
            &serde_json::json!({"model_type": "gemma3"}),
            Path::new("config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("text_config"), "{e}");
    }

    #[test]
    fn bad_gemma_values_are_refused_with_their_key() {
        for (j, want) in [
            (
                serde_json::json!({"model_type": "gemma2", "layer_types": ["full_attention"]}),
                "layer_types",
            ),
            (
                serde_json::json!({"model_type": "gemma2", "attn_logit_softcapping": -1.0}),
                "attn_logit_softcapping",
            ),
            (
                serde_json::json!({"model_type": "gemma2", "hidden_activation": "swish"}),
                "hidden_activation",
            ),
            (
                serde_json::json!({"model_type": "gemma2", "sliding_window_pattern": 0}),
                "sliding_window_pattern",
            ),
            (
                serde_json::json!({"model_type": "gemma3_text", "use_bidirectional_attention": true}),
                "bidirectional",
            ),
        ] {
            let e = DecoderConfig::from_hf_json(&j, Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
