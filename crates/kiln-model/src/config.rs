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
    /// YaRN (gpt-oss, Qwen and DeepSeek long-context configs): a blend of
    /// kept and divided frequencies, and cos/sin scaled by an attention factor.
    Yarn(crate::yarn::YarnScaling),
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
///
/// Every supported architecture is one setting of these fields: llama
/// (pre-norm RMSNorm, SiLU-gated FFN, rotary positions), mistral (plus a
/// sliding window), qwen2 (plus q/k/v biases), qwen3 (plus per-head q/k
/// norms), phi3 (fused projections, split at load), gpt2 (LayerNorm, GELU,
/// learned positions, Conv1D weights transposed at load), opt (LayerNorm
/// before or after each block, ReLU, learned positions offset by 2, optional
/// embedding projections) and gemma2 / gemma3 (scaled embeddings, `1 + w`
/// norms, post norms, soft caps, local and global layers: see `crate::gemma`).
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
    /// Each block normalises its input (true), or its output after the
    /// residual add (OPT with `do_layer_norm_before = false`).
    pub pre_norm: bool,
    /// A norm after the last block.
    pub final_norm: bool,
    pub activation: Activation,
    /// `act(gate(x)) * up(x)` (true) or `act(up(x))` (false).
    pub gated_ffn: bool,
    pub rope: Option<RopeConfig>,
    /// Learned absolute position embeddings, row `position + offset` (OPT's offset is 2).
    pub learned_positions: Option<usize>,
    /// RMSNorm over each query and key head before rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Width of the token embeddings; differs from `hidden_size` when the
    /// model projects them in and out (OPT's `word_embed_proj_dim`).
    pub embed_dim: usize,
    /// Longest context the model was built for.
    pub max_position_embeddings: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding-window attention span, if any.
    pub sliding_window: Option<usize>,
    /// Which projections carry biases (for sizing: the loader takes whatever
    /// biases the checkpoint has).
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub mlp_bias: bool,
    // Gemma 2 / Gemma 3 (`crate::gemma` sets them; neutral for the others).
    /// Multiplier of the token embeddings (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f32>,
    /// Added to every RMSNorm weight at load: Hugging Face Gemma checkpoints
    /// store `w` of `x * (1 + w)`, GGUF files already `1 + w`.
    pub norm_offset: f32,
    /// An RMSNorm on the attention output and on the feed-forward output,
    /// each before its residual add (Gemma's post norms).
    pub post_norms: bool,
    /// Multiplier of q·k when it is not `1/sqrt(head_dim)` (Gemma's
    /// `query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f32>,
    /// `cap * tanh(score / cap)` on attention scores (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// `cap * tanh(logit / cap)` on the output logits (Gemma 2).
    pub final_logit_softcap: Option<f32>,
    /// Per-layer attention (window, which rotary table) where layers differ;
    /// empty: every layer uses `sliding_window` and `rope`.
    pub layer_attention: Vec<LayerAttention>,
    /// Rotary settings of the layers marked `local_rope` (Gemma 3's local
    /// layers rotate with base 10000, its global ones with 1e6 and scaling).
    pub local_rope: Option<RopeConfig>,
    /// Mixture of experts in place of (some layers') dense feed-forward
    /// blocks (Qwen2-MoE, Qwen3-MoE, Mixtral); see [`crate::moe`].
    pub moe: Option<crate::moe::MoeConfig>,
    /// Each layer has one learned attention-sink logit per query head
    /// (gpt-oss's `self_attn.sinks`, GGUF `blk.N.attn_sinks.weight`).
    pub attn_sinks: bool,
}

/// How one layer attends, for models whose layers differ (Gemma 2 and 3
/// alternate local sliding-window layers with global ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    /// This layer's sliding window; `None`: it sees the whole context.
    pub window: Option<usize>,
    /// Rotates with [`DecoderConfig::local_rope`] instead of `rope`.
    pub local_rope: bool,
}

impl DecoderConfig {
    /// Number of parameters, counted from the shapes (biases and norms
    /// included; every expert of a mixture-of-experts model).
    pub fn param_count(&self) -> u64 {
        self.count_params(false)
    }

    /// Parameters one token reads: as [`DecoderConfig::param_count`], but
    /// of each mixture-of-experts layer only the experts a token is routed
    /// to (and the router and shared expert). Equal to it for dense models.
    pub fn active_param_count(&self) -> u64 {
        self.count_params(true)
    }

    fn count_params(&self, active: bool) -> u64 {
        let u = |v: usize| v as u64;
        let (h, e, ff) = (
            u(self.hidden_size),
            u(self.embed_dim),
            u(self.intermediate_size),
        );
        let q = u(self.n_heads * self.head_dim);
        let kv = u(self.n_kv_heads * self.head_dim);
        let norm = if self.norm == NormKind::Layer {
            2 * h
        } else {
            h
        };
        let bias = |on: bool, n: u64| if on { n } else { 0 };
        let attn =
            h * (q + 2 * kv) + q * h + bias(self.qkv_bias, q + 2 * kv) + bias(self.out_bias, h);
        let mlp_mats = if self.gated_ffn { 3 } else { 2 };
        let mlp = mlp_mats * h * ff + bias(self.mlp_bias, (mlp_mats - 1) * ff + h);
        let qk_norm = if self.qk_norm {
            2 * u(self.head_dim)
        } else {
            0
        };
        let sinks = if self.attn_sinks { u(self.n_heads) } else { 0 };
        let per_layer = attn + mlp + 2 * norm + qk_norm + sinks;
        let embed = u(self.vocab_size) * e;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let positions = self
            .learned_positions
            .map_or(0, |off| u(self.max_position_embeddings + off) * h);
        let proj = if e != h { 2 * e * h } else { 0 };
        let final_norm = if self.final_norm { norm } else { 0 };
        let per_layer = per_layer + if self.post_norms { 2 * norm } else { 0 };
        // Mixture-of-experts layers hold their experts instead of the dense block.
        let (sparse, moe_ffn) = self.moe.as_ref().map_or((0, 0), |m| {
            (
                u(m.sparse_layers(self.n_layers)),
                m.ffn_params(self.hidden_size, active),
            )
        });
        embed + head + positions + proj + per_layer * u(self.n_layers) + final_norm - mlp * sparse
            + moe_ffn * sparse
    }

    /// Bytes of keys and values one token takes in the KV cache at `elem_bytes` per value.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * elem_bytes
    }

    /// How layer `i` attends: its entry of `layer_attention`, else the
    /// model-wide window and rotary table.
    pub fn layer_attention(&self, i: usize) -> LayerAttention {
        self.layer_attention
            .get(i)
            .copied()
            .unwrap_or(LayerAttention {
                window: self.sliding_window,
                local_rope: false,
            })
    }

    /// A llama-shaped config with the given sizes; the architectures below adjust it.
    pub(crate) fn llama_like(
        arch: &str,
        vocab_size: usize,
        hidden_size: usize,
        n_layers: usize,
        n_heads: usize,
    ) -> Self {
        let head_dim = hidden_size / n_heads.max(1);
        Self {
            arch: arch.to_string(),
            vocab_size,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads: n_heads,
            head_dim,
            intermediate_size: 4 * hidden_size,
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            pre_norm: true,
            final_norm: true,
            activation: Activation::Silu,
            gated_ffn: true,
            rope: Some(RopeConfig {
                theta: 10000.0,
                rot_dim: head_dim,
                layout: RopeLayout::HalfSplit,
                scaling: RopeScaling::None,
            }),
            learned_positions: None,
            qk_norm: false,
            embed_dim: hidden_size,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            sliding_window: None,
            qkv_bias: false,
            out_bias: false,
            mlp_bias: false,
            embed_scale: None,
            norm_offset: 0.0,
            post_norms: false,
            attn_scale: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            layer_attention: Vec::new(),
            local_rope: None,
            moe: None,
            attn_sinks: false,
        }
    }

    /// Reads the configuration from GGUF metadata (llama, mistral-as-llama, qwen2, qwen3, phi3,
    /// gemma2, gemma3).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let bad = |msg: String| ModelError::Config {
            path: file.path().to_path_buf(),
            msg,
        };
        let arch = file
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing general.architecture".into()))?
            .to_string();
        if !matches!(
            arch.as_str(),
            "llama" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3" | "gpt-oss"
        ) && !crate::moe::GGUF_ARCHS.contains(&arch.as_str())
        {
            return Err(bad(format!(
                "architecture '{arch}' is not supported from GGUF (llama, qwen2, qwen3, phi3, gemma2, \
                 gemma3, qwen2moe, qwen3moe and gpt-oss are; other architectures load from Hugging Face directories)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            file.get_u64(&key(k))
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing or non-integer metadata '{}'", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        if n_heads == 0 || !hidden_size.is_multiple_of(n_heads) {
            return Err(bad(format!(
                "{hidden_size} features do not split into {n_heads} heads"
            )));
        }
        let vocab_size = match file.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| bad("cannot tell the vocabulary size".into()))?,
        };
        let mut cfg =
            Self::llama_like(&arch, vocab_size, hidden_size, req("block_count")?, n_heads);
        cfg.n_kv_heads = file
            .get_u64(&key("attention.head_count_kv"))
            .map_or(n_heads, |v| v as usize);
        cfg.head_dim = file
            .get_u64(&key("attention.key_length"))
            .map_or(hidden_size / n_heads, |v| v as usize);
        cfg.intermediate_size = req("feed_forward_length")?;
        cfg.norm_eps = file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32;
        cfg.max_position_embeddings = req("context_length")?;
        cfg.tie_word_embeddings = !file.tensors.contains_key("output.weight");
        cfg.qk_norm = file.tensors.contains_key("blk.0.attn_q_norm.weight");
        cfg.qkv_bias = file.tensors.contains_key("blk.0.attn_q.bias");
        // Phi-3 GGUFs write 0 for "no window".
        cfg.sliding_window = file
            .get_u64(&key("attention.sliding_window"))
            .map(|v| v as usize)
            .filter(|&w| w > 0);
        let scaling = match file.get_str(&key("rope.scaling.type")) {
            // Llama 3.1 GGUFs carry their frequency scaling precomputed as a tensor.
            _ if file.tensors.contains_key("rope_freqs.weight") => {
                RopeScaling::Factors(file.tensor_f32("rope_freqs.weight")?.data)
            }
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0),
            },
            Some("yarn") => RopeScaling::Yarn(
                crate::yarn::YarnScaling::from_gguf(file, &arch, cfg.max_position_embeddings)
                    .map_err(bad)?,
            ),
            Some(other) => return Err(bad(format!("rope scaling '{other}' is not supported"))),
        };
        cfg.rope = Some(RopeConfig {
            theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
            rot_dim: file
                .get_u64(&key("rope.dimension_count"))
                .map_or(cfg.head_dim, |v| v as usize),
            // llama.cpp's converter permutes llama's q/k rows so that rotary pairs
            // are adjacent; the other architectures keep Hugging Face's layout.
            layout: if arch == "llama" {
                RopeLayout::Interleaved
            } else {
                RopeLayout::HalfSplit
            },
            scaling,
        });
        if arch.starts_with("gemma") {
            crate::gemma::adjust_gguf(file, &mut cfg).map_err(bad)?;
        }
        cfg.moe =
            crate::moe::from_gguf(file, &arch, cfg.n_layers, cfg.intermediate_size).map_err(bad)?;
        if arch == "gpt-oss" {
            crate::gpt_oss::adjust_gguf(file, &mut cfg).map_err(bad)?;
        }
        cfg.validate(file.path())?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text =
            crate::files::read_bounded(path, crate::files::MAX_CONFIG_BYTES, "a config.json")?;
        let json: Json = serde_json::from_slice(&text).map_err(|e| ModelError::Config {
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
        let get_f64 = |k: &str| json.get(k).and_then(Json::as_f64);
        let get_bool = |k: &str| json.get(k).and_then(Json::as_bool);
        let model_type = json
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| bad("missing 'model_type'".into()))?;
        let activation = |key: &str, default: &str| -> Result<Activation> {
            match json.get(key).and_then(Json::as_str).unwrap_or(default) {
                "silu" | "swish" => Ok(Activation::Silu),
                "gelu" => Ok(Activation::Gelu),
                "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
                "relu" => Ok(Activation::Relu),
                other => Err(bad(format!("{key} '{other}' is not supported"))),
            }
        };
        let mut cfg = match model_type {
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "qwen2_moe" | "qwen3_moe"
            | "mixtral" | "gpt_oss" => {
                let hidden = req("hidden_size")?;
                let heads = req("num_attention_heads")?;
                if heads == 0 || !hidden.is_multiple_of(heads) && get_usize("head_dim").is_none() {
                    return Err(bad(format!(
                        "{hidden} features do not split into {heads} heads"
                    )));
                }
                let mut c = Self::llama_like(
                    model_type,
                    req("vocab_size")?,
                    hidden,
                    req("num_hidden_layers")?,
                    heads,
                );
                c.n_kv_heads = get_usize("num_key_value_heads").unwrap_or(heads);
                c.head_dim = get_usize("head_dim").unwrap_or(hidden / heads);
                c.intermediate_size = req("intermediate_size")?;
                c.norm_eps = get_f64("rms_norm_eps").unwrap_or(1e-6) as f32;
                c.activation = activation("hidden_act", "silu")?;
                c.max_position_embeddings = get_usize("max_position_embeddings").unwrap_or(2048);
                c.tie_word_embeddings = get_bool("tie_word_embeddings").unwrap_or(false);
                c.qkv_bias = get_bool("attention_bias").unwrap_or(model_type == "qwen2");
                c.out_bias = get_bool("attention_bias").unwrap_or(false);
                c.mlp_bias = get_bool("mlp_bias").unwrap_or(false);
                c.qk_norm = model_type == "qwen3";
                c.sliding_window = match model_type {
                    // Qwen2 configs carry a window that only applies with use_sliding_window.
                    "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe"
                        if get_bool("use_sliding_window") != Some(true) =>
                    {
                        None
                    }
                    _ => get_usize("sliding_window").filter(|&w| w > 0),
                };
                let partial = get_f64("partial_rotary_factor").unwrap_or(1.0);
                let rot_dim = ((c.head_dim as f64 * partial) as usize) & !1;
                c.rope = Some(RopeConfig {
                    theta: get_f64("rope_theta")
                        .or_else(|| {
                            json.get("rope_parameters")
                                .and_then(|r| r.get("rope_theta"))
                                .and_then(Json::as_f64)
                        })
                        .unwrap_or(10000.0),
                    rot_dim,
                    layout: RopeLayout::HalfSplit,
                    scaling: hf_rope_scaling(
                        json.get("rope_scaling")
                            .or_else(|| json.get("rope_parameters")),
                        json,
                    )
                    .map_err(bad)?,
                });
                c
            }
            "gpt2" => {
                let hidden = req("n_embd")?;
                let heads = req("n_head")?;
                if heads == 0 || !hidden.is_multiple_of(heads) {
                    return Err(bad(format!(
                        "{hidden} features do not split into {heads} heads"
                    )));
                }
                let mut c =
                    Self::llama_like("gpt2", req("vocab_size")?, hidden, req("n_layer")?, heads);
                c.intermediate_size = get_usize("n_inner").unwrap_or(4 * hidden);
                c.norm = NormKind::Layer;
                c.norm_eps = get_f64("layer_norm_epsilon").unwrap_or(1e-5) as f32;
                c.activation = activation("activation_function", "gelu_new")?;
                c.gated_ffn = false;
                c.rope = None;
                c.learned_positions = Some(0);
                c.max_position_embeddings = get_usize("n_positions").unwrap_or(1024);
                c.tie_word_embeddings = true;
                (c.qkv_bias, c.out_bias, c.mlp_bias) = (true, true, true);
                c
            }
            "opt" => {
                let hidden = req("hidden_size")?;
                let heads = req("num_attention_heads")?;
                if heads == 0 || !hidden.is_multiple_of(heads) {
                    return Err(bad(format!(
                        "{hidden} features do not split into {heads} heads"
                    )));
                }
                let mut c = Self::llama_like(
                    "opt",
                    req("vocab_size")?,
                    hidden,
                    req("num_hidden_layers")?,
                    heads,
                );
                c.intermediate_size = req("ffn_dim")?;
                c.norm = NormKind::Layer;
                c.norm_eps = 1e-5;
                c.activation = activation("activation_function", "relu")?;
                c.gated_ffn = false;
                c.rope = None;
                // OPT's position table starts at row 2 (rows 0 and 1 are never used).
                c.learned_positions = Some(2);
                c.max_position_embeddings = get_usize("max_position_embeddings").unwrap_or(2048);
                c.pre_norm = get_bool("do_layer_norm_before").unwrap_or(true);
                c.final_norm = c.pre_norm && !get_bool("_remove_final_layer_norm").unwrap_or(false);
                c.embed_dim = get_usize("word_embed_proj_dim").unwrap_or(hidden);
                c.tie_word_embeddings = get_bool("tie_word_embeddings").unwrap_or(true);
                let bias = get_bool("enable_bias").unwrap_or(true);
                (c.qkv_bias, c.out_bias, c.mlp_bias) = (bias, bias, bias);
                c
            }
            "gemma2" | "gemma3_text" | "gemma3" => {
                crate::gemma::from_hf_json(model_type, json).map_err(bad)?
            }
            other => {
                return Err(bad(format!(
                "model_type '{other}' is not supported (llama, mistral, qwen2, qwen3, phi3, gpt2, \
                     opt, gemma2, gemma3_text, gemma3, qwen2_moe, qwen3_moe, mixtral and gpt_oss are)"
            )))
            }
        };
        cfg.arch = model_type.to_string();
        crate::moe::apply_hf(&mut cfg, model_type, json).map_err(bad)?;
        if model_type == "gpt_oss" {
            crate::gpt_oss::apply_hf(&mut cfg, json).map_err(bad)?;
        }
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
        if !self.layer_attention.is_empty() && self.layer_attention.len() != self.n_layers {
            return bad(format!(
                "{} per-layer attention kinds for {} layers",
                self.layer_attention.len(),
                self.n_layers
            ));
        }
        for r in self.rope.iter().chain(&self.local_rope) {
            if r.rot_dim > self.head_dim || !r.rot_dim.is_multiple_of(2) {
                return bad(format!(
                    "rotary dimension {} for head dimension {}",
                    r.rot_dim, self.head_dim
                ));
            }
        }
        Ok(())
    }
}

impl RopeConfig {
    /// This rotary's `[max_pos, rot_dim]` table of cosines (first half of
    /// each row) and sines (second half), as the backend's rope op reads it.
    /// Row `p` depends on `p` alone, so a longer table extends a shorter
    /// one (the decoder grows its table as positions are reached).
    pub fn table(&self, max_pos: usize) -> Vec<f32> {
        let r = self;
        let half = r.rot_dim / 2;
        let (inv_freq, mscale): (Vec<f64>, f64) = match &r.scaling {
            RopeScaling::Yarn(y) => (y.inv_freq(r.theta, r.rot_dim), y.attention_factor),
            scaling => (
                (0..half)
                    .map(|i| {
                        let f = 1.0 / r.theta.powf(2.0 * i as f64 / r.rot_dim as f64);
                        scale_frequency(f, i, scaling)
                    })
                    .collect(),
                1.0,
            ),
        };
        let mut table = vec![0f32; max_pos * r.rot_dim];
        for (p, row) in table.chunks_exact_mut(r.rot_dim).enumerate() {
            for (i, &f) in inv_freq.iter().enumerate() {
                let ang = p as f64 * f;
                row[i] = (ang.cos() * mscale) as f32;
                row[half + i] = (ang.sin() * mscale) as f32;
            }
        }
        table
    }
}

fn scale_frequency(f: f64, i: usize, scaling: &RopeScaling) -> f64 {
    match scaling {
        // YaRN's blend depends on the base and dimension: `RopeConfig::table` asks
        // `YarnScaling::inv_freq` for the whole set instead.
        RopeScaling::None | RopeScaling::Yarn(_) => f,
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

pub(crate) fn hf_rope_scaling(
    v: Option<&Json>,
    config: &Json,
) -> std::result::Result<RopeScaling, String> {
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
        "yarn" => RopeScaling::Yarn(crate::yarn::YarnScaling::from_hf(v, config)?),
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
