//! Reading a PEFT LoRA adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`) into f32 host matrices, checked against
//! the base model's [`DecoderConfig`].
//!
//! PEFT names each matrix after the module it adapts
//! (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`,
//! `[rank, in]`, and `….lora_B.weight`, `[out, rank]`); the layer index
//! and the module's name say which projection of kiln's decoder it
//! belongs to. Fused modules (Phi-3's `qkv_proj` and `gate_up_proj`,
//! GPT-2's `c_attn`) share one `A` and have their `B` split by rows, the
//! way the base weight is split at load. The delta's scale is
//! `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, with
//! `rank_pattern` and `alpha_pattern` overriding per module. The base
//! model's name (`base_model_name_or_path`) is ignored: an adapter trained
//! for another model is caught by its module names and shapes.
//!
//! Mixture-of-experts models (Mixtral, Qwen3-MoE) hold their experts in
//! transformers 5 as two 3-D parameters per layer, `experts.gate_up_proj`
//! (`[n, 2 * ff, hidden]`, each expert's gate rows then its up rows) and
//! `experts.down_proj` (`[n, hidden, ff]`), and PEFT adapts them through
//! `target_parameters`: one `lora_A` of `[n * r, in]` whose rows
//! `e*r..(e+1)*r` are expert `e`'s `A`, and one `lora_B` of `[out, n * r]`
//! whose columns `k*n + e` (k < r) are expert `e`'s `B`. Two wrapped
//! parameters nest, so their tensors are named `….experts.lora_A.weight`
//! and `….experts.base_layer.lora_A.weight`; which is which is told by
//! their shapes (`in`/`out` are `hidden`/`2 * ff` for gate_up and
//! `ff`/`hidden` for down, which never coincide). PEFT's fusion of an
//! adapter written for transformers 4 doubles the rank and alpha of
//! `gate_up_proj` through `rank_pattern`/`alpha_pattern` keys such as
//! `.*\.gate_up_proj`. Adapters written for transformers 4 name each
//! expert's module (`block_sparse_moe.experts.3.w1`,
//! `mlp.experts.3.gate_proj`) and are read into the same per-expert form.
//! The router (`mlp.gate`, `block_sparse_moe.gate`) is an ordinary
//! `[n_experts, hidden]` projection.
//!
//! gpt-oss stores its experts transposed (`gate_up_proj` `[n, hidden,
//! 2 * ff]`, `down_proj` `[n, ff, hidden]`, inputs first), which PEFT's
//! ParamWrapper reads as (in, out) without swapping: the same `lora_A`
//! `[n * r, in]` and `lora_B` `[out, n * r]`, the delta added to the weight
//! and so before the experts' biases and clamped SwiGLU. Its gate and up
//! outputs are interleaved (gate the even rows of `B`, up the odd ones, as
//! the base weight is split at load). Its router `mlp.router` (`weight` and
//! `bias`, not a linear module) is adapted through `target_parameters`
//! `mlp.router.weight`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use kiln_backend::RopeLayout;

use super::{ExpertPart, LoraError, LoraLimits, LoraResult, Proj, N_PROJ};
use crate::config::DecoderConfig;

/// The PEFT adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The PEFT adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Largest `adapter_config.json` read (real ones are under 2 KB).
const MAX_ADAPTER_CONFIG_BYTES: u64 = 1 << 20;

/// One projection's low-rank pair: `delta(x) = scale * B·(A·x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMatrix {
    pub rank: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    pub scale: f32,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// One mixture-of-experts expert's matrices in one layer, indexed by
/// [`ExpertPart`] (gate, up, down).
pub type ExpertLora = [Option<LoraMatrix>; 3];

/// A whole adapter on the host: per layer, one optional [`LoraMatrix`] per
/// [`Proj`] (in [`Proj::ALL`]'s order).
#[derive(Debug, Clone)]
pub struct HostLora {
    /// The directory it was read from, for messages.
    pub path: PathBuf,
    /// Largest rank of any of its matrices.
    pub rank: usize,
    pub layers: Vec<[Option<LoraMatrix>; N_PROJ]>,
    /// Per layer, the experts' matrices, one [`ExpertLora`] per expert; empty
    /// for a layer whose experts the adapter leaves alone.
    pub experts: Vec<Vec<ExpertLora>>,
}

impl HostLora {
    /// The matrices of `layer`'s projection `proj`, if the adapter targets it.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<&LoraMatrix> {
        self.layers.get(layer)?[proj.index()].as_ref()
    }

    /// Expert `expert`'s matrix `part` in `layer`, if the adapter targets it.
    pub fn expert(&self, layer: usize, expert: usize, part: ExpertPart) -> Option<&LoraMatrix> {
        self.experts.get(layer)?.get(expert)?[part.index()].as_ref()
    }

    /// Host bytes the adapter's matrices take (for memory accounting).
    pub fn bytes(&self) -> usize {
        let experts = self.experts.iter().flatten().flatten();
        self.layers
            .iter()
            .flatten()
            .chain(experts)
            .flatten()
            .map(|m| 4 * (m.a.len() + m.b.len()))
            .sum()
    }
}

/// The settings of `adapter_config.json` kiln uses.
struct PeftConfig {
    r: usize,
    alpha: f64,
    rslora: bool,
    rank_pattern: BTreeMap<String, usize>,
    alpha_pattern: BTreeMap<String, f64>,
}

/// Whether a `rank_pattern`/`alpha_pattern` key names `module`. PEFT tries
/// the key as the regular expression `(.*\.)?(key)$` from the start of the
/// module's name: a name matches itself or a dotted suffix, and a key
/// starting with `.*` (PEFT's own `.*\.gate_up_proj`) matches any name
/// ending with the rest. Keys are checked by [`plain_pattern`] at load.
fn pattern_matches(key: &str, module: &str) -> bool {
    let key = key.replace("\\.", ".");
    match key.strip_prefix(".*") {
        Some(rest) => module.ends_with(rest),
        None => module == key || module.ends_with(&format!(".{key}")),
    }
}

/// Whether a pattern key is a name kiln can match without a regular
/// expression engine: dotted name parts, `\.` for a dot, optionally after
/// a leading `.*`.
fn plain_pattern(key: &str) -> bool {
    let rest = key.strip_prefix(".*").unwrap_or(key).replace("\\.", ".");
    !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

impl PeftConfig {
    fn rank_of(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.r, |(_, &r)| r)
    }

    fn alpha_of(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.alpha, |(_, &a)| a)
    }

    fn scale(&self, module: &str, rank: usize) -> f32 {
        let alpha = self.alpha_of(module);
        let r = rank as f64;
        (if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }) as f32
    }
}

/// The module names (last component) of `cfg`'s architecture that an
/// adapter may target, each with the projections it stands for.
fn module_table(cfg: &DecoderConfig) -> Vec<(&'static str, Vec<Proj>)> {
    use Proj::*;
    match cfg.arch.as_str() {
        "gpt2" => vec![
            ("c_attn", vec![Q, K, V]),
            ("c_proj", vec![]), // O or Down, by its parent: see `projections_of`
            ("c_fc", vec![Up]),
        ],
        "opt" => vec![
            ("q_proj", vec![Q]),
            ("k_proj", vec![K]),
            ("v_proj", vec![V]),
            ("out_proj", vec![O]),
            ("fc1", vec![Up]),
            ("fc2", vec![Down]),
        ],
        "phi3" => vec![
            ("qkv_proj", vec![Q, K, V]),
            ("o_proj", vec![O]),
            ("gate_up_proj", vec![Gate, Up]),
            ("down_proj", vec![Down]),
        ],
        _ => {
            let mut t = vec![
                ("q_proj", vec![Q]),
                ("k_proj", vec![K]),
                ("v_proj", vec![V]),
                ("o_proj", vec![O]),
            ];
            if cfg.gated_ffn {
                t.push(("gate_proj", vec![Gate]));
            }
            t.push(("up_proj", vec![Up]));
            t.push(("down_proj", vec![Down]));
            if cfg.moe.is_some() && !is_gpt_oss(cfg) {
                // The router and Mixtral's per-expert names (transformers 4).
                t.push(("gate", vec![Router]));
                t.push(("w1", vec![]));
                t.push(("w2", vec![]));
                t.push(("w3", vec![]));
            }
            t
        }
    }
}

/// Module names that exist in these models but that kiln does not adapt.
const UNSUPPORTED_MODULES: &[&str] = &[
    "lm_head",
    "embed_tokens",
    "wte",
    "wpe",
    "embed_out",
    "router",
    // OPT's maps between narrower embeddings and the layers (OPT-350m).
    "project_in",
    "project_out",
];

/// `(out, in)` of one projection of `cfg`'s layers.
fn dims(cfg: &DecoderConfig, p: Proj) -> (usize, usize) {
    let h = cfg.hidden_size;
    let q = cfg.n_heads * cfg.head_dim;
    let kv = cfg.n_kv_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    match p {
        Proj::Q => (q, h),
        Proj::K | Proj::V => (kv, h),
        Proj::O => (h, q),
        Proj::Gate | Proj::Up => (ff, h),
        Proj::Down => (h, ff),
        Proj::Router => (cfg.moe.as_ref().map_or(0, |m| m.n_experts), h),
    }
}

/// A module name split into its layer and its name inside the layer
/// (`model.layers.3.self_attn.q_proj` → `(3, ["self_attn", "q_proj"])`).
fn split_module(module: &str) -> Option<(usize, Vec<&str>)> {
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts.windows(2).position(|w| {
        matches!(w[0], "layers" | "h")
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && !w[1].is_empty()
    })?;
    let layer = parts[at + 1].parse().ok()?;
    Some((layer, parts[at + 2..].to_vec()))
}

/// What one adapted module of a layer stands for.
enum Target {
    /// Projections of the layer (a fused module's `B` split by rows, in
    /// this order).
    Dense(Vec<Proj>),
    /// One expert's projection (transformers 4's per-expert modules).
    Expert(usize, ExpertPart),
    /// PEFT's `target_parameters` on the experts' 3-D `gate_up_proj` or
    /// `down_proj`: which of the two is told by the tensors' shapes.
    FusedExperts,
}

/// gpt-oss (`gpt_oss` in Hugging Face configs, `gpt-oss` in GGUF), whose
/// fused experts are transposed with gate and up interleaved, and whose
/// router is `mlp.router`.
fn is_gpt_oss(cfg: &DecoderConfig) -> bool {
    matches!(cfg.arch.as_str(), "gpt_oss" | "gpt-oss")
}

/// The expert part a transformers 4 per-expert module name stands for.
fn expert_part(leaf: &str) -> Option<ExpertPart> {
    match leaf {
        "w1" | "gate_proj" => Some(ExpertPart::Gate),
        "w3" | "up_proj" => Some(ExpertPart::Up),
        "w2" | "down_proj" => Some(ExpertPart::Down),
        _ => None,
    }
}

/// What a module of a layer's mixture-of-experts block (`inner` after
/// `mlp` or `block_sparse_moe`) stands for, or why kiln cannot adapt it.
fn moe_target(
    cfg: &DecoderConfig,
    path: &Path,
    layer: usize,
    inner: &[&str],
) -> LoraResult<Target> {
    let unsupported = |what: &str| LoraError::Unsupported {
        path: path.to_path_buf(),
        what: format!(
            "an adapter on {what} ('{}' in layer {layer})",
            inner.join(".")
        ),
    };
    let n_experts = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
    if is_gpt_oss(cfg) {
        // Only the fused form exists: transformers never split gpt-oss's experts.
        return match inner.get(1..).unwrap_or_default() {
            ["router"] => Ok(Target::Dense(vec![Proj::Router])),
            ["experts"] | ["experts", "base_layer"] => Ok(Target::FusedExperts),
            _ => Err(LoraError::UnknownTarget {
                path: path.to_path_buf(),
                module: inner.join("."),
                arch: format!("{n_experts}-expert {}", cfg.arch),
            }),
        };
    }
    match inner.get(1..).unwrap_or_default() {
        ["gate"] => Ok(Target::Dense(vec![Proj::Router])),
        ["experts"] | ["experts", "base_layer"] => Ok(Target::FusedExperts),
        ["experts", e, leaf] => match (e.parse::<usize>(), expert_part(leaf)) {
            (Ok(e), Some(part)) if e < n_experts => Ok(Target::Expert(e, part)),
            _ => Err(LoraError::UnknownTarget {
                path: path.to_path_buf(),
                module: inner.join("."),
                arch: format!("{n_experts}-expert {}", cfg.arch),
            }),
        },
        rest if rest.first().is_some_and(|p| p.starts_with("shared_expert")) => {
            Err(unsupported("the shared expert"))
        }
        _ => Err(LoraError::UnknownTarget {
            path: path.to_path_buf(),
            module: inner.join("."),
            arch: cfg.arch.clone(),
        }),
    }
}

/// What a module of a layer stands for, or why it has none.
fn target_of(cfg: &DecoderConfig, path: &Path, layer: usize, inner: &[&str]) -> LoraResult<Target> {
    let sparse = cfg.moe.as_ref().is_some_and(|m| m.is_sparse(layer));
    if sparse && matches!(inner.first(), Some(&"mlp") | Some(&"block_sparse_moe")) {
        return moe_target(cfg, path, layer, inner);
    }
    projections_of(cfg, path, inner).map(Target::Dense)
}

/// The projections a module of a dense layer stands for, or why it has none.
fn projections_of(cfg: &DecoderConfig, path: &Path, inner: &[&str]) -> LoraResult<Vec<Proj>> {
    let leaf = inner.last().copied().unwrap_or_default();
    let unknown = || LoraError::UnknownTarget {
        path: path.to_path_buf(),
        module: inner.join("."),
        arch: cfg.arch.clone(),
    };
    // Only a module directly in the layer or in its attention or MLP block.
    let parent_ok = match inner {
        [_] => true,
        [p, _] => matches!(*p, "self_attn" | "attn" | "mlp"),
        _ => false,
    };
    if !parent_ok {
        return Err(unknown());
    }
    if cfg.arch == "gpt2" && leaf == "c_proj" {
        return match inner.first() {
            Some(&"attn") => Ok(vec![Proj::O]),
            Some(&"mlp") => Ok(vec![Proj::Down]),
            _ => Err(unknown()),
        };
    }
    module_table(cfg)
        .into_iter()
        .find(|(n, p)| *n == leaf && !p.is_empty() && !p.contains(&Proj::Router))
        .map(|(_, p)| p)
        .ok_or_else(unknown)
}

/// Checks `target_modules` (a list of names, `"all-linear"`, or a regular
/// expression, which the tensors' names are then checked against instead).
fn check_targets(cfg: &DecoderConfig, path: &Path, json: &Value) -> LoraResult<()> {
    check_target_parameters(cfg, path, json)?;
    let Some(list) = json.get("target_modules").and_then(Value::as_array) else {
        return Ok(());
    };
    let table = module_table(cfg);
    for t in list {
        let Some(name) = t.as_str() else {
            return Err(malformed(
                path,
                format!("target_modules holds {t}, not a name"),
            ));
        };
        let leaf = name.rsplit('.').next().unwrap_or(name);
        if name == "all-linear" || table.iter().any(|(n, _)| *n == leaf) {
            continue;
        }
        if UNSUPPORTED_MODULES.contains(&leaf) {
            return Err(LoraError::Unsupported {
                path: path.to_path_buf(),
                what: format!("target module '{name}'"),
            });
        }
        return Err(LoraError::UnknownTarget {
            path: path.to_path_buf(),
            module: name.to_string(),
            arch: cfg.arch.clone(),
        });
    }
    Ok(())
}

/// Checks `target_parameters`: on mixture-of-experts models, the experts'
/// `gate_up_proj` and `down_proj` and the router's weight (`gate.weight`,
/// gpt-oss's `router.weight`); nothing elsewhere.
fn check_target_parameters(cfg: &DecoderConfig, path: &Path, json: &Value) -> LoraResult<()> {
    let list = match json.get("target_parameters") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(malformed(
                path,
                format!("target_parameters is {v}, not a list"),
            ))
        }
    };
    for t in list {
        let Some(name) = t.as_str() else {
            return Err(malformed(
                path,
                format!("target_parameters holds {t}, not a name"),
            ));
        };
        let experts = name == "gate_up_proj"
            || name == "down_proj"
            || name.ends_with("experts.gate_up_proj")
            || name.ends_with("experts.down_proj");
        let router = if is_gpt_oss(cfg) {
            name == "router.weight" || name.ends_with(".router.weight")
        } else {
            name == "gate.weight" || name.ends_with(".gate.weight")
        };
        if !(cfg.moe.is_some() && (experts || router)) {
            return Err(LoraError::Unsupported {
                path: path.to_path_buf(),
                what: format!("target parameter '{name}' on this {} model", cfg.arch),
            });
        }
    }
    Ok(())
}

fn malformed(path: &Path, msg: String) -> LoraError {
    LoraError::Malformed {
        path: path.to_path_buf(),
        msg,
    }
}

fn read_config(dir: &Path) -> LoraResult<(PeftConfig, Value, PathBuf)> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(LoraError::Missing { path });
    }
    let bytes = crate::files::read_bounded(&path, MAX_ADAPTER_CONFIG_BYTES, "an adapter config")
        .map_err(|e| malformed(&path, e.to_string()))?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(&path, format!("not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(malformed(&path, "not a JSON object".into()));
    }
    let unsupported = |what: String| LoraError::Unsupported {
        path: path.clone(),
        what,
    };
    match json.get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => {}
        Some(other) => return Err(unsupported(format!("peft_type '{other}' (only LORA is)"))),
    }
    if json.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("DoRA (use_dora)".into()));
    }
    if json.get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("a LoRA bias (lora_bias)".into()));
    }
    match json.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => return Err(unsupported(format!("bias '{b}' (only 'none' is)"))),
    }
    if json
        .get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(unsupported(
            "modules_to_save (whole trained modules)".into(),
        ));
    }
    for key in ["trainable_token_indices", "layer_replication"] {
        if json
            .get(key)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(unsupported(format!("'{key}'")));
        }
    }
    let uint = |key: &str, default: usize| -> LoraResult<usize> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .map(|r| r as usize)
                .ok_or_else(|| malformed(&path, format!("'{key}' is {v}, not a positive integer"))),
        }
    };
    let r = uint("r", 8)?;
    let alpha = match json.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| malformed(&path, format!("'lora_alpha' is {v}, not a number")))?,
    };
    let rslora = json
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let map = |key: &str| -> LoraResult<Vec<(String, Value)>> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Some(v) => Err(malformed(&path, format!("'{key}' is {v}, not an object"))),
        }
    };
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some((k, _)) = map(key)?.into_iter().find(|(k, _)| !plain_pattern(k)) {
            return Err(unsupported(format!(
                "{key} key '{k}' (kiln reads module names, optionally after '.*', not other regular expressions)"
            )));
        }
    }
    let mut rank_pattern = BTreeMap::new();
    for (k, v) in map("rank_pattern")? {
        let r = v
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| malformed(&path, format!("rank_pattern '{k}' is {v}")))?;
        rank_pattern.insert(k, r as usize);
    }
    let mut alpha_pattern = BTreeMap::new();
    for (k, v) in map("alpha_pattern")? {
        let a = v
            .as_f64()
            .ok_or_else(|| malformed(&path, format!("alpha_pattern '{k}' is {v}")))?;
        alpha_pattern.insert(k, a);
    }
    Ok((
        PeftConfig {
            r,
            alpha,
            rslora,
            rank_pattern,
            alpha_pattern,
        },
        json,
        path,
    ))
}

/// A 2-D tensor as f32 (F32, F16 or BF16 in the file).
fn to_f32(path: &Path, name: &str, view: &safetensors::tensor::TensorView) -> LoraResult<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(malformed(
                path,
                format!("tensor '{name}' is {other:?}; adapters must be F32, F16 or BF16"),
            ))
        }
    })
}

/// Reorders the rows of `b: [heads * head_dim, rank]` from Hugging Face's
/// rotary order (each head's first half, then its second) to the
/// interleaved order llama.cpp's converter gives llama's q and k weights
/// (pairs `(j, j + head_dim/2)` adjacent), so the delta lines up with a
/// GGUF base's rows.
fn interleave_heads(b: &[f32], heads: usize, head_dim: usize, rank: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; b.len()];
    for h in 0..heads {
        for j in 0..half {
            for k in 0..2 {
                let src = h * head_dim + k * half + j;
                let dst = h * head_dim + 2 * j + k;
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    out
}

/// Reads the PEFT adapter in `dir` for a base model configured as `cfg`.
pub fn read_peft(dir: &Path, cfg: &DecoderConfig, limits: LoraLimits) -> LoraResult<HostLora> {
    let (peft, json, config_path) = read_config(dir)?;
    check_targets(cfg, &config_path, &json)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.is_file() {
        return Err(LoraError::Missing { path: wpath });
    }
    let file = File::open(&wpath).map_err(|e| malformed(&wpath, e.to_string()))?;
    // SAFETY: a read-only map of a file nobody in this process writes.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| malformed(&wpath, e.to_string()))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| malformed(&wpath, format!("not a valid safetensors file: {e}")))?;

    // Module name → (A, B) tensor names, in name order.
    let mut modules: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for name in st.names() {
        let (module, which) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if name.contains("lora_embedding") || name.contains("magnitude") {
            return Err(LoraError::Unsupported {
                path: wpath.clone(),
                what: format!("tensor '{name}' (embedding adapters and DoRA)"),
            });
        } else {
            return Err(malformed(
                &wpath,
                format!(
                    "tensor '{name}' is not a LoRA matrix (….lora_A.weight or ….lora_B.weight)"
                ),
            ));
        };
        modules.entry(module.to_string()).or_default()[which] = Some(name.to_string());
    }
    if modules.is_empty() {
        return Err(malformed(&wpath, "holds no LoRA matrices".into()));
    }

    let mut layers: Vec<[Option<LoraMatrix>; N_PROJ]> =
        (0..cfg.n_layers).map(|_| Default::default()).collect();
    let mut experts: Vec<Vec<ExpertLora>> = vec![Vec::new(); cfg.n_layers];
    let mut max_rank = 0;
    let permute = cfg
        .rope
        .as_ref()
        .is_some_and(|r| r.layout == RopeLayout::Interleaved);
    for (module, [a_name, b_name]) in &modules {
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(malformed(
                &wpath,
                format!("module '{module}' needs both lora_A and lora_B"),
            ));
        };
        let Some((layer, inner)) = split_module(module) else {
            let leaf = module.rsplit('.').next().unwrap_or(module);
            return Err(if UNSUPPORTED_MODULES.contains(&leaf) {
                LoraError::Unsupported {
                    path: wpath.clone(),
                    what: format!("an adapter on '{module}'"),
                }
            } else {
                LoraError::UnknownTarget {
                    path: wpath.clone(),
                    module: module.clone(),
                    arch: cfg.arch.clone(),
                }
            });
        };
        if layer >= cfg.n_layers {
            return Err(LoraError::UnknownTarget {
                path: wpath.clone(),
                module: module.clone(),
                arch: format!("{}-layer {}", cfg.n_layers, cfg.arch),
            });
        }
        let target = target_of(cfg, &wpath, layer, &inner)?;
        let get = |n: &str| {
            st.tensor(n)
                .map_err(|e| malformed(&wpath, format!("tensor '{n}': {e}")))
        };
        let (a, b) = (get(a_name)?, get(b_name)?);
        let tensors = Pair {
            path: &wpath,
            a: (a_name, &a),
            b: (b_name, &b),
            limits,
            peft: &peft,
        };
        match target {
            Target::Dense(projs) => {
                let in_dim = dims(cfg, projs[0]).1;
                let outs: Vec<usize> = projs.iter().map(|&p| dims(cfg, p).0).collect();
                let read = tensors.read(module, in_dim, outs.iter().sum(), 1)?;
                let rank = read.rank;
                let mut row = 0;
                for (&p, &out) in projs.iter().zip(&outs) {
                    let mut b_part = read.b[row * rank..(row + out) * rank].to_vec();
                    row += out;
                    if permute {
                        match p {
                            Proj::Q => {
                                b_part = interleave_heads(&b_part, cfg.n_heads, cfg.head_dim, rank)
                            }
                            Proj::K => {
                                b_part =
                                    interleave_heads(&b_part, cfg.n_kv_heads, cfg.head_dim, rank)
                            }
                            _ => {}
                        }
                    }
                    let slot = &mut layers[layer][p.index()];
                    if slot.is_some() {
                        return Err(malformed(
                            &wpath,
                            format!("layer {layer}'s {} is adapted twice", p.hf_name()),
                        ));
                    }
                    *slot = Some(read.matrix(read.a.clone(), b_part, in_dim, out));
                }
                max_rank = max_rank.max(rank);
            }
            Target::Expert(e, part) => {
                let (out, in_dim) = expert_dims(cfg, part);
                let read = tensors.read(module, in_dim, out, 1)?;
                max_rank = max_rank.max(read.rank);
                let m = read.matrix(read.a.clone(), read.b.clone(), in_dim, out);
                put_expert(cfg, &wpath, &mut experts[layer], layer, e, part, m)?;
            }
            Target::FusedExperts => {
                let n = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
                let (h, ff) = (cfg.hidden_size, expert_dims(cfg, ExpertPart::Down).1);
                let in_dim = a.shape().get(1).copied().unwrap_or(0);
                let out = b.shape().first().copied().unwrap_or(0);
                let (param, parts) = if (in_dim, out) == (h, 2 * ff) {
                    ("gate_up_proj", &[ExpertPart::Gate, ExpertPart::Up][..])
                } else if (in_dim, out) == (ff, h) {
                    ("down_proj", &[ExpertPart::Down][..])
                } else {
                    // Neither parameter's (in, out): name lora_A against gate_up's.
                    return Err(LoraError::Shape {
                        path: wpath.clone(),
                        tensor: a_name.clone(),
                        got: a.shape().to_vec(),
                        want: vec![a.shape().first().copied().unwrap_or(0), h],
                    });
                };
                let key = format!("{}.{param}", module.trim_end_matches(".base_layer"));
                let read = tensors.read(&key, in_dim, out, n)?;
                let (r, cols) = (read.rank, n * read.rank);
                max_rank = max_rank.max(r);
                for e in 0..n {
                    let a_e = read.a[e * r * in_dim..(e + 1) * r * in_dim].to_vec();
                    // Expert e's B: columns k*n + e of lora_B, k < r.
                    let b_e: Vec<f32> = (0..out)
                        .flat_map(|o| (0..r).map(move |k| (o, k)))
                        .map(|(o, k)| read.b[o * cols + k * n + e])
                        .collect();
                    let mut row = 0;
                    for (pi, &part) in parts.iter().enumerate() {
                        let part_out = expert_dims(cfg, part).0;
                        let b_part = if is_gpt_oss(cfg) && parts.len() == 2 {
                            // gpt-oss interleaves them: gate is output 2j, up 2j + 1.
                            (0..part_out)
                                .flat_map(|j| &b_e[(2 * j + pi) * r..(2 * j + pi + 1) * r])
                                .copied()
                                .collect()
                        } else {
                            b_e[row * r..(row + part_out) * r].to_vec()
                        };
                        row += part_out;
                        let m = read.matrix(a_e.clone(), b_part, in_dim, part_out);
                        put_expert(cfg, &wpath, &mut experts[layer], layer, e, part, m)?;
                    }
                }
            }
        }
    }
    Ok(HostLora {
        path: dir.to_path_buf(),
        rank: max_rank,
        layers,
        experts,
    })
}

/// `(out, in)` of one matrix of an expert of `cfg`.
fn expert_dims(cfg: &DecoderConfig, part: ExpertPart) -> (usize, usize) {
    let ff = cfg.moe.as_ref().map_or(0, |m| m.expert_ff);
    match part {
        ExpertPart::Gate | ExpertPart::Up => (ff, cfg.hidden_size),
        ExpertPart::Down => (cfg.hidden_size, ff),
    }
}

/// Stores expert `e`'s matrix `part` of a layer, refusing it twice.
fn put_expert(
    cfg: &DecoderConfig,
    path: &Path,
    layer_experts: &mut Vec<ExpertLora>,
    layer: usize,
    e: usize,
    part: ExpertPart,
    m: LoraMatrix,
) -> LoraResult<()> {
    if layer_experts.is_empty() {
        let n = cfg.moe.as_ref().map_or(0, |m| m.n_experts);
        *layer_experts = vec![Default::default(); n];
    }
    let slot = layer_experts
        .get_mut(e)
        .map(|x| &mut x[part.index()])
        .ok_or_else(|| malformed(path, format!("layer {layer} has no expert {e}")))?;
    if slot.is_some() {
        return Err(malformed(
            path,
            format!("layer {layer}'s expert {e} {part:?} is adapted twice"),
        ));
    }
    *slot = Some(m);
    Ok(())
}

/// One module's `lora_A` and `lora_B` tensors, before they are checked.
struct Pair<'a> {
    path: &'a Path,
    a: (&'a String, &'a safetensors::tensor::TensorView<'a>),
    b: (&'a String, &'a safetensors::tensor::TensorView<'a>),
    limits: LoraLimits,
    peft: &'a PeftConfig,
}

/// A checked pair as f32, with its rank (per expert) and scale.
struct ReadPair {
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    scale: f32,
}

impl ReadPair {
    fn matrix(&self, a: Vec<f32>, b: Vec<f32>, in_dim: usize, out_dim: usize) -> LoraMatrix {
        LoraMatrix {
            rank: self.rank,
            a,
            b,
            scale: self.scale,
            in_dim,
            out_dim,
        }
    }
}

impl Pair<'_> {
    /// Checks the pair against `in_dim`, `out` and `n` stacked experts
    /// (`A: [n * r, in]`, `B: [out, n * r]`; `n` is 1 for one projection)
    /// and the configured rank of `module`, and reads it as f32.
    fn read(&self, module: &str, in_dim: usize, out: usize, n: usize) -> LoraResult<ReadPair> {
        let ((a_name, a), (b_name, b)) = (self.a, self.b);
        let path = self.path;
        let rows = a.shape().first().copied().unwrap_or(0);
        let rank = rows / n.max(1);
        if rank > self.limits.max_rank {
            return Err(LoraError::RankTooLarge {
                path: path.to_path_buf(),
                rank,
                max: self.limits.max_rank,
            });
        }
        let shape_err = |tensor: &str, got: &[usize], want: Vec<usize>| LoraError::Shape {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            got: got.to_vec(),
            want,
        };
        if rank == 0 || a.shape() != [n * rank, in_dim] {
            return Err(shape_err(a_name, a.shape(), vec![n * rank.max(1), in_dim]));
        }
        if b.shape() != [out, n * rank] {
            return Err(shape_err(b_name, b.shape(), vec![out, n * rank]));
        }
        let want_rank = self.peft.rank_of(module);
        if rank != want_rank {
            return Err(malformed(
                path,
                format!(
                    "module '{module}' has rank {rank}, but adapter_config.json gives {want_rank}"
                ),
            ));
        }
        Ok(ReadPair {
            rank,
            a: to_f32(path, a_name, a)?,
            b: to_f32(path, b_name, b)?,
            scale: self.peft.scale(module, rank),
        })
    }
}
