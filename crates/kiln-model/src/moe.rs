//! Mixture-of-experts models: their configuration (from `config.json` or
//! GGUF metadata), how a router turns its logits into experts and weights,
//! and the Hugging Face names of their expert tensors.
//!
//! Qwen2-MoE, Qwen3-MoE and Mixtral replace the dense feed-forward block of
//! (some of) their layers by `n_experts` small SwiGLU blocks of which a
//! router picks `n_experts_used` per token; Qwen2-MoE adds a shared expert
//! every token goes through, scaled by a sigmoid gate. The decoder's side is
//! in `decoder/moe.rs`.

use serde_json::Value as Json;

use crate::config::DecoderConfig;
use crate::gguf::GgufFile;

/// More experts than any published model has; a header asking for more is
/// refused rather than sized from.
pub const MAX_EXPERTS: usize = 1 << 12;

/// More layers than any published model has: the per-layer expert settings
/// are only worked out below it, so a header cannot make them loop or
/// allocate without bound.
pub const MAX_LAYERS: usize = 1 << 12;

pub(crate) fn check_layers(n_layers: usize) -> Result<(), String> {
    if n_layers > MAX_LAYERS {
        return Err(format!(
            "{n_layers} layers (mixture-of-experts models of up to {MAX_LAYERS} are supported)"
        ));
    }
    Ok(())
}

/// How a router's logits become the chosen experts' weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Softmax over all experts, then the `k` largest probabilities;
    /// `renormalize` divides those by their sum (Qwen's `norm_topk_prob`;
    /// Mixtral always does, which equals a softmax over the top `k` logits).
    SoftmaxTopK { renormalize: bool },
    /// The `k` largest logits, then a softmax over just those (gpt-oss).
    TopKThenSoftmax,
}

/// The mixture-of-experts part of a [`DecoderConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// Experts each token is routed to (top-k).
    pub n_experts_used: usize,
    /// Intermediate size of one expert.
    pub expert_ff: usize,
    pub routing: Routing,
    /// Intermediate size of the shared expert every token goes through (Qwen2-MoE).
    pub shared_expert_ff: Option<usize>,
    /// The shared expert's output is scaled by `sigmoid(x · w)` (Qwen2-MoE's
    /// `shared_expert_gate`, GGUF's `ffn_gate_inp_shexp`).
    pub shared_expert_gate: bool,
    /// Layers whose feed-forward block is dense (`intermediate_size` wide):
    /// Qwen's `mlp_only_layers` and those `decoder_sparse_step` skips.
    pub dense_layers: Vec<usize>,
    /// The router has a bias (gpt-oss); the loader takes it when present.
    pub router_bias: bool,
    /// Each expert's gate, up and down projections have biases (gpt-oss);
    /// for sizing: the loader takes them when present.
    pub expert_bias: bool,
}

impl MoeConfig {
    /// Whether layer `i` routes its tokens to experts.
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer)
    }

    /// How many of `n_layers` layers are mixture-of-experts layers.
    pub fn sparse_layers(&self, n_layers: usize) -> usize {
        (0..n_layers).filter(|&i| self.is_sparse(i)).count()
    }

    /// Parameters of one MoE feed-forward block of width `hidden`: the
    /// router, the experts (only the `n_experts_used` a token reads when
    /// `active`) and the shared expert with its gate.
    pub fn ffn_params(&self, hidden: usize, active: bool) -> u64 {
        let h = hidden as u64;
        let experts = if active {
            self.n_experts_used
        } else {
            self.n_experts
        } as u64;
        // Saturating: the sizes may come from a header not yet checked against tensors.
        let router = h.saturating_mul(self.n_experts as u64)
            + if self.router_bias {
                self.n_experts as u64
            } else {
                0
            };
        let shared = self
            .shared_expert_ff
            .map_or(0, |ff| (3 * h).saturating_mul(ff as u64))
            + if self.shared_expert_gate { h } else { 0 };
        let ff = self.expert_ff as u64;
        let experts = (experts * 3 * h).saturating_mul(ff)
            + if self.expert_bias {
                experts.saturating_mul(2 * ff + h)
            } else {
                0
            };
        router.saturating_add(experts).saturating_add(shared)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.n_experts == 0 || self.n_experts > MAX_EXPERTS {
            return Err(format!(
                "{} experts (1 to {MAX_EXPERTS} are supported)",
                self.n_experts
            ));
        }
        if self.n_experts_used == 0 || self.n_experts_used > self.n_experts {
            return Err(format!(
                "{} experts per token out of {}",
                self.n_experts_used, self.n_experts
            ));
        }
        if self.expert_ff == 0 || self.shared_expert_ff == Some(0) {
            return Err("an expert's intermediate size is zero".into());
        }
        Ok(())
    }
}

/// Completes a llama-shaped config read from the `config.json` of a MoE
/// `model_type` (`qwen2_moe`, `qwen3_moe`, `mixtral`; others are left untouched):
/// the expert settings, and what these families inherit from their dense
/// relatives (Qwen3-MoE's q/k norms, Qwen2-MoE's q/k/v biases).
pub fn apply_hf(cfg: &mut DecoderConfig, model_type: &str, json: &Json) -> Result<(), String> {
    let get_usize = |k: &str| json.get(k).and_then(Json::as_u64).map(|v| v as usize);
    let get_bool = |k: &str| json.get(k).and_then(Json::as_bool);
    let req = |k: &str| get_usize(k).ok_or_else(|| format!("missing or non-integer '{k}'"));
    // transformers 5 writes `num_local_experts` for Qwen3-MoE, the Hub's configs `num_experts`.
    let n_experts = || {
        get_usize("num_experts")
            .or_else(|| get_usize("num_local_experts"))
            .ok_or_else(|| "missing or non-integer 'num_experts'".to_string())
    };
    let moe = match model_type {
        "mixtral" => MoeConfig {
            n_experts: n_experts()?,
            n_experts_used: req("num_experts_per_tok")?,
            expert_ff: cfg.intermediate_size,
            routing: Routing::SoftmaxTopK { renormalize: true },
            shared_expert_ff: None,
            shared_expert_gate: false,
            dense_layers: Vec::new(),
            router_bias: false,
            expert_bias: false,
        },
        "qwen2_moe" | "qwen3_moe" => {
            check_layers(cfg.n_layers)?;
            let n_experts = n_experts()?;
            let step = get_usize("decoder_sparse_step").unwrap_or(1).max(1);
            let only: Vec<usize> = json
                .get("mlp_only_layers")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as usize))
                        .collect()
                })
                .unwrap_or_default();
            let dense_layers = (0..cfg.n_layers)
                .filter(|i| n_experts == 0 || only.contains(i) || (i + 1) % step != 0)
                .collect::<Vec<_>>();
            if model_type == "qwen3_moe" {
                cfg.qk_norm = true;
            } else {
                // Qwen2-MoE's q/k/v projections carry biases (transformers 5 names it `qkv_bias`).
                cfg.qkv_bias = get_bool("qkv_bias").unwrap_or(true);
            }
            if n_experts == 0 {
                return Ok(());
            }
            let shared = get_usize("shared_expert_intermediate_size").filter(|&s| s > 0);
            MoeConfig {
                n_experts,
                n_experts_used: req("num_experts_per_tok")?,
                expert_ff: req("moe_intermediate_size")?,
                routing: Routing::SoftmaxTopK {
                    renormalize: get_bool("norm_topk_prob").unwrap_or(false),
                },
                shared_expert_ff: shared,
                shared_expert_gate: shared.is_some(),
                dense_layers,
                router_bias: false,
                expert_bias: false,
            }
        }
        _ => return Ok(()),
    };
    moe.validate()?;
    cfg.moe = Some(moe);
    Ok(())
}

/// The GGUF architectures read as mixture-of-experts models (Mixtral is
/// `llama` with `llama.expert_count`).
pub const GGUF_ARCHS: &[&str] = &["qwen2moe", "qwen3moe", "gpt-oss"];

/// The expert settings of a GGUF file of architecture `arch`, from
/// `{arch}.expert_count` and its siblings (llama.cpp's keys); `None` for a
/// dense model. Layers without a router tensor are dense.
pub fn from_gguf(
    file: &GgufFile,
    arch: &str,
    n_layers: usize,
    ff: usize,
) -> Result<Option<MoeConfig>, String> {
    let key = |k: &str| format!("{arch}.{k}");
    let get = |k: &str| file.get_u64(&key(k)).map(|v| v as usize);
    let n_experts = get("expert_count").unwrap_or(0);
    if n_experts == 0 {
        if GGUF_ARCHS.contains(&arch) {
            return Err(format!("missing or zero '{}'", key("expert_count")));
        }
        return Ok(None);
    }
    check_layers(n_layers)?;
    let n_experts_used = get("expert_used_count")
        .ok_or_else(|| format!("missing or non-integer '{}'", key("expert_used_count")))?;
    // llama.cpp: Qwen2-MoE's routing weights are used as the softmax gives
    // them, Qwen3-MoE's and Mixtral's renormalised over the chosen experts,
    // unless the file says otherwise.
    let renormalize = file
        .get(&key("expert_weights_norm"))
        .and_then(|v| v.as_bool())
        .unwrap_or(arch != "qwen2moe");
    let shared_expert_ff = get("expert_shared_feed_forward_length").or_else(|| {
        file.tensors
            .get("blk.0.ffn_gate_shexp.weight")
            .and_then(|t| t.shape().first().copied())
    });
    let shared_expert_ff = shared_expert_ff.filter(|_| {
        (0..n_layers).any(|i| {
            file.tensors
                .contains_key(&format!("blk.{i}.ffn_up_shexp.weight"))
        })
    });
    let moe = MoeConfig {
        n_experts,
        n_experts_used,
        expert_ff: get("expert_feed_forward_length").unwrap_or(ff),
        routing: Routing::SoftmaxTopK { renormalize },
        shared_expert_gate: shared_expert_ff.is_some()
            && file.tensors.contains_key("blk.0.ffn_gate_inp_shexp.weight"),
        shared_expert_ff,
        dense_layers: (0..n_layers)
            .filter(|i| {
                !file
                    .tensors
                    .contains_key(&format!("blk.{i}.ffn_gate_inp.weight"))
            })
            .collect(),
        router_bias: file.tensors.contains_key("blk.0.ffn_gate_inp.bias"),
        expert_bias: file.tensors.contains_key("blk.0.ffn_gate_exps.bias"),
    };
    moe.validate()?;
    Ok(Some(moe))
}

/// The experts of one token: `(expert, weight)` pairs, `k` of them, chosen
/// from the router's `logits` as `routing` says. Ties go to the lower index
/// (as `torch.topk` returns them on the CPU for these sizes).
pub fn route(logits: &[f32], k: usize, routing: Routing) -> Vec<(u32, f32)> {
    let softmax = |v: &[f32]| -> Vec<f32> {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = v.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        e.iter().map(|&x| x / sum).collect()
    };
    let top = |v: &[f32]| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        // NaN sorts last, so a broken router cannot pick it over real scores.
        idx.sort_by(|&a, &b| {
            v[b].partial_cmp(&v[a])
                .unwrap_or_else(|| v[a].is_nan().cmp(&v[b].is_nan()))
                .then(a.cmp(&b))
        });
        idx.truncate(k);
        idx
    };
    match routing {
        Routing::SoftmaxTopK { renormalize } => {
            let p = softmax(logits);
            let chosen = top(&p);
            let sum: f32 = chosen.iter().map(|&i| p[i]).sum();
            chosen
                .into_iter()
                .map(|i| (i as u32, if renormalize { p[i] / sum } else { p[i] }))
                .collect()
        }
        Routing::TopKThenSoftmax => {
            let chosen = top(logits);
            let picked: Vec<f32> = chosen.iter().map(|&i| logits[i]).collect();
            chosen
                .into_iter()
                .zip(softmax(&picked))
                .map(|(i, w)| (i as u32, w))
                .collect()
        }
    }
}

/// Splits `blk.N.part.kind` with an expert-numbered part (`ffn_gate.3`) into
/// (N, part, expert, kind).
fn expert_part(canonical: &str) -> Option<(&str, &str, &str, &str)> {
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, tail) = tail.split_once('.')?;
    let (expert, kind) = tail.split_once('.')?;
    expert
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then_some((layer, part, expert, kind))
}

/// Canonical MoE tensor names under a Hugging Face layer prefix: the router,
/// per-expert matrices (`blk.N.ffn_gate.E.weight`, llama.cpp's old
/// per-expert GGUF names too), transformers 5's fused 3-D
/// `experts.gate_up_proj`/`experts.down_proj` (canonical
/// `ffn_gate_up_exps`/`ffn_down_exps`) and the shared expert.
fn moe_name(
    canonical: &str,
    block: &str,
    experts: [&str; 3],
    shared: Option<(&str, &str)>,
) -> Option<String> {
    if let Some((layer, part, e, kind)) = expert_part(canonical) {
        let hf = match part {
            "ffn_gate" => experts[0],
            "ffn_up" => experts[1],
            "ffn_down" => experts[2],
            _ => return None,
        };
        return Some(format!(
            "model.layers.{layer}.{block}.experts.{e}.{hf}.{kind}"
        ));
    }
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let l = format!("model.layers.{layer}.{block}");
    Some(match (part, kind) {
        ("ffn_gate_inp", _) => format!("{l}.gate.{kind}"),
        ("ffn_gate_up_exps", "weight") => format!("{l}.experts.gate_up_proj"),
        ("ffn_down_exps", "weight") => format!("{l}.experts.down_proj"),
        ("ffn_gate_shexp" | "ffn_up_shexp" | "ffn_down_shexp", _) => {
            let (expert, _) = shared?;
            let proj = &part[..part.len() - "_shexp".len()];
            let proj = match proj {
                "ffn_gate" => "gate_proj",
                "ffn_up" => "up_proj",
                _ => "down_proj",
            };
            format!("{l}.{expert}.{proj}.{kind}")
        }
        ("ffn_gate_inp_shexp", _) => format!("{l}.{}.{kind}", shared?.1),
        _ => return None,
    })
}

/// Qwen2-MoE and Qwen3-MoE names (`model.layers.N.mlp.experts.E.gate_proj.weight`,
/// `mlp.gate`, `mlp.shared_expert`, `mlp.shared_expert_gate`); other
/// tensors as [`crate::weights::hf_llama_names`].
pub fn hf_qwen_moe_names(canonical: &str) -> Option<String> {
    moe_name(
        canonical,
        "mlp",
        ["gate_proj", "up_proj", "down_proj"],
        Some(("shared_expert", "shared_expert_gate")),
    )
    .or_else(|| crate::weights::hf_llama_names(canonical))
}

/// Mixtral names (`model.layers.N.block_sparse_moe.experts.E.w1.weight`:
/// w1 gate, w3 up, w2 down; `block_sparse_moe.gate` the router). The
/// safetensors source also finds them under `mlp.` (transformers 5's
/// module name).
pub fn hf_mixtral_names(canonical: &str) -> Option<String> {
    moe_name(canonical, "block_sparse_moe", ["w1", "w3", "w2"], None)
        .or_else(|| crate::weights::hf_llama_names(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_k_with_and_without_renormalisation() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let r = route(&logits, 2, Routing::SoftmaxTopK { renormalize: false });
        let e: Vec<f32> = logits.iter().map(|v| v.exp()).collect();
        let s: f32 = e.iter().sum();
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
        assert!((r[0].1 - e[1] / s).abs() < 1e-6 && (r[1].1 - e[2] / s).abs() < 1e-6);
        let n = route(&logits, 2, Routing::SoftmaxTopK { renormalize: true });
        assert!((n[0].1 + n[1].1 - 1.0).abs() < 1e-6);
        // Renormalised softmax-then-top-k is a softmax over the top logits.
        let t = route(&logits, 2, Routing::TopKThenSoftmax);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
        assert!((t[0].1 - n[0].1).abs() < 1e-6);
        assert!((t[0].1 - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_index_and_nan_never_wins() {
        let r = route(&[0.5, 1.0, 1.0, f32::NAN], 2, Routing::TopKThenSoftmax);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn names_map_per_expert_fused_and_shared_tensors() {
        assert_eq!(
            hf_qwen_moe_names("blk.1.ffn_up.3.weight").as_deref(),
            Some("model.layers.1.mlp.experts.3.up_proj.weight")
        );
        assert_eq!(
            hf_qwen_moe_names("blk.0.ffn_gate_inp.weight").as_deref(),
            Some("model.layers.0.mlp.gate.weight")
        );
        assert_eq!(
            hf_qwen_moe_names("blk.0.ffn_gate_up_exps.weight").as_deref(),
            Some("model.layers.0.mlp.experts.gate_up_proj")
        );
        assert_eq!(
            hf_qwen_moe_names("blk.0.ffn_down_shexp.weight").as_deref(),
            Some("model.layers.0.mlp.shared_expert.down_proj.weight")
        );
        assert_eq!(
            hf_qwen_moe_names("blk.0.ffn_gate_inp_shexp.weight").as_deref(),
            Some("model.layers.0.mlp.shared_expert_gate.weight")
        );
        // Dense parts keep the llama names.
        assert_eq!(
            hf_qwen_moe_names("blk.0.ffn_gate.weight").as_deref(),
            Some("model.layers.0.mlp.gate_proj.weight")
        );
        assert_eq!(
            hf_mixtral_names("blk.1.ffn_down.0.weight").as_deref(),
            Some("model.layers.1.block_sparse_moe.experts.0.w2.weight")
        );
        assert_eq!(
            hf_mixtral_names("blk.1.ffn_gate_inp.weight").as_deref(),
            Some("model.layers.1.block_sparse_moe.gate.weight")
        );
        assert_eq!(hf_mixtral_names("blk.1.ffn_up_shexp.weight"), None);
    }

    #[test]
    fn hf_configs_give_experts_dense_layers_and_routing() {
        let p = std::path::Path::new("/m/config.json");
        let j = serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4, "vocab_size": 320, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": true, "mlp_only_layers": [0], "decoder_sparse_step": 2
        });
        let c = DecoderConfig::from_hf_json(&j, p).unwrap();
        let m = c.moe.clone().unwrap();
        assert!(c.qk_norm);
        assert_eq!((m.n_experts, m.n_experts_used, m.expert_ff), (8, 2, 32));
        assert_eq!(m.routing, Routing::SoftmaxTopK { renormalize: true });
        // Layer 0 is mlp-only, layer 2 is skipped by the step of 2.
        assert_eq!(m.dense_layers, [0, 2]);
        assert!(c.active_param_count() < c.param_count());
        let mut bad = j.clone();
        bad["num_experts_per_tok"] = serde_json::json!(9);
        let e = DecoderConfig::from_hf_json(&bad, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("9 experts per token out of 8") && e.contains("/m/config.json"),
            "{e}"
        );
    }
}
