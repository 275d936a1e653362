//! Models of real published shapes with random weights, built in memory.
//!
//! Exists so that speed and memory can be measured at the sizes people
//! deploy (`kiln bench --dummy-weights --arch llama3-8b`) with no
//! checkpoint on disk: no download, no conversion step, no disk space, and
//! the same shapes on every machine (a GPU check needs nothing copied to
//! it). Each [`Shape`] is the published `config.json` of a real model, read
//! by the same [`DecoderConfig::from_hf_json`] a checkpoint's is; the
//! weights are generated tensor by tensor as the decoder asks for them,
//! directly in the chosen block format (random codes under valid, finite f16
//! scales, sized so activations stay in range), so 8 GB of Q8_0 takes
//! seconds rather than the minutes quantizing random floats would. The
//! tokenizer is the embedded default model's (SmolLM2's 49152 ids), its
//! vocabulary padded to the shape's with unused `[PAD<id>]` tokens, as
//! llama.cpp's converter pads a vocabulary shorter than the embedding
//! (`scripts/bench/scale_gguf.py` pads the fixture files the same way).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_backend::quant::{block_dequantizer, row_bytes, GgmlType};
use kiln_backend::{Backend, WeightData};
use rayon::prelude::*;
use serde_json::{json, Value as Json};

use crate::config::{DecoderConfig, NormKind};
use crate::decoder::Decoder;
use crate::gguf::GgufFile;
use crate::layouts::Layouts;
use crate::loader::{LoadOptions, LoadedModel, ModelFormat, WeightDtype};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;
use crate::{HostTensor, ModelError, Result};

/// A named model shape: a published model's configuration and its
/// published parameter count (which a test checks kiln's count against).
pub struct Shape {
    /// The `--arch` name.
    pub name: &'static str,
    /// The model whose shape this is, and where its numbers come from.
    pub source: &'static str,
    /// The published parameter count (every expert of a mixture counted).
    pub params: u64,
    dims: Dims,
}

/// The `config.json` fields of a shape that differ between models; the
/// rest follow from its family ([`Dims::config_json`]).
#[derive(Clone, Copy)]
struct Dims {
    family: Family,
    vocab: u64,
    hidden: u64,
    /// `intermediate_size` (OPT's `ffn_dim`).
    ffn: u64,
    layers: u64,
    heads: u64,
    /// Llama and Qwen3-MoE only (OPT has as many as query heads).
    kv_heads: u64,
    /// When the config states it (else hidden / heads).
    head_dim: Option<u64>,
    max_positions: u64,
    rope_theta: f64,
    /// Llama and Qwen3-MoE only (OPT always ties).
    tied: bool,
    /// Llama 3's rope scaling factor (its other numbers are the same in
    /// every Llama 3 config).
    llama3_rope: Option<f64>,
}

/// The architectures the shapes come in.
#[derive(Clone, Copy)]
enum Family {
    Llama,
    /// OPT: learned positions, layer norms, biases, ReLU.
    Opt,
    /// Qwen3-MoE: (experts, experts per token, expert `intermediate_size`).
    Qwen3Moe(u64, u64, u64),
}

impl Dims {
    /// The `config.json` of these numbers, as the model's family writes it.
    fn config_json(&self) -> Json {
        let d = self;
        let mut c = match d.family {
            Family::Opt => {
                return json!({"model_type": "opt", "vocab_size": d.vocab,
                    "hidden_size": d.hidden, "ffn_dim": d.ffn, "num_hidden_layers": d.layers,
                    "num_attention_heads": d.heads, "max_position_embeddings": d.max_positions,
                    "word_embed_proj_dim": d.hidden, "do_layer_norm_before": true,
                    "activation_function": "relu", "enable_bias": true})
            }
            Family::Llama => json!({"model_type": "llama", "rms_norm_eps": 1e-5}),
            Family::Qwen3Moe(experts, per_token, expert_ff) => {
                json!({"model_type": "qwen3_moe", "moe_intermediate_size": expert_ff,
                    "num_experts": experts, "num_experts_per_tok": per_token,
                    "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
                    "rms_norm_eps": 1e-6})
            }
        };
        let fields = [
            ("vocab_size", json!(d.vocab)),
            ("hidden_size", json!(d.hidden)),
            ("intermediate_size", json!(d.ffn)),
            ("num_hidden_layers", json!(d.layers)),
            ("num_attention_heads", json!(d.heads)),
            ("num_key_value_heads", json!(d.kv_heads)),
            ("max_position_embeddings", json!(d.max_positions)),
            ("rope_theta", json!(d.rope_theta)),
            ("tie_word_embeddings", json!(d.tied)),
        ];
        for (k, v) in fields {
            c[k] = v;
        }
        if let Some(h) = d.head_dim {
            c["head_dim"] = json!(h);
        }
        if let Some(factor) = d.llama3_rope {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192});
        }
        c
    }
}

/// One row of [`SHAPES`]: `(name, source, params)` and the numbers in
/// [`Dims`]' field order.
#[allow(clippy::too_many_arguments)]
const fn shape_row(
    (name, source, params): (&'static str, &'static str, u64),
    family: Family,
    (vocab, hidden, ffn, layers): (u64, u64, u64, u64),
    (heads, kv_heads, head_dim): (u64, u64, Option<u64>),
    max_positions: u64,
    rope_theta: f64,
    tied: bool,
    llama3_rope: Option<f64>,
) -> Shape {
    Shape {
        name,
        source,
        params,
        dims: Dims {
            family,
            vocab,
            hidden,
            ffn,
            layers,
            heads,
            kv_heads,
            head_dim,
            max_positions,
            rope_theta,
            tied,
            llama3_rope,
        },
    }
}

/// Every shape `--arch` accepts. The config numbers are those of each
/// model's `config.json` on the Hugging Face Hub (fields kiln reads; the
/// rest are left out); the parameter counts are the Hub's safetensors
/// totals for the same repositories. Columns: (name, source, params),
/// family, (vocab, hidden, ffn, layers), (heads, kv heads, head_dim),
/// context, rope theta, tied embeddings, Llama 3 rope factor.
pub const SHAPES: &[Shape] = &[
    shape_row(
        (
            "tiny",
            "a two-layer Llama for tests (not a published model)",
            26_346_752,
        ),
        Family::Llama,
        (49152, 256, 512, 2),
        (4, 2, None),
        2048,
        10000.0,
        false,
        None,
    ),
    shape_row(
        (
            "tiny-opt",
            "a two-layer OPT for tests (not a published model)",
            14_449_152,
        ),
        Family::Opt,
        (50272, 256, 512, 2),
        (4, 4, None),
        2048,
        0.0,
        true,
        None,
    ),
    shape_row(
        (
            "tiny-moe",
            "a two-layer Qwen3-MoE for tests (not a published model)",
            27_137_536,
        ),
        Family::Qwen3Moe(8, 2, 128),
        (49152, 256, 512, 2),
        (4, 2, Some(64)),
        2048,
        1000000.0,
        false,
        None,
    ),
    shape_row(
        (
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M config.json",
            134_515_008,
        ),
        Family::Llama,
        (49152, 576, 1536, 30),
        (9, 3, None),
        8192,
        100000.0,
        true,
        None,
    ),
    shape_row(
        (
            "llama3-1b",
            "meta-llama/Llama-3.2-1B config.json",
            1_235_814_400,
        ),
        Family::Llama,
        (128256, 2048, 8192, 16),
        (32, 8, Some(64)),
        131072,
        500000.0,
        true,
        Some(32.0),
    ),
    shape_row(
        (
            "llama3-3b",
            "meta-llama/Llama-3.2-3B config.json",
            3_212_749_824,
        ),
        Family::Llama,
        (128256, 3072, 8192, 28),
        (24, 8, Some(128)),
        131072,
        500000.0,
        true,
        Some(32.0),
    ),
    shape_row(
        (
            "llama3-8b",
            "meta-llama/Llama-3.1-8B config.json",
            8_030_261_248,
        ),
        Family::Llama,
        (128256, 4096, 14336, 32),
        (32, 8, None),
        131072,
        500000.0,
        false,
        Some(8.0),
    ),
    shape_row(
        ("opt-13b", "facebook/opt-13b config.json", 12_853_473_280),
        Family::Opt,
        (50272, 5120, 20480, 40),
        (40, 40, None),
        2048,
        0.0,
        true,
        None,
    ),
    shape_row(
        (
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B config.json",
            30_532_122_624,
        ),
        Family::Qwen3Moe(128, 8, 768),
        (151936, 2048, 6144, 48),
        (32, 4, Some(128)),
        40960,
        1000000.0,
        false,
        None,
    ),
];

/// The shape named `name`, or an error that lists the names.
pub fn shape(name: &str) -> Result<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        ModelError::Config {
            path: PathBuf::from(format!("--arch {name}")),
            msg: format!("no such shape; use one of {}", names.join(", ")),
        }
    })
}

impl Shape {
    /// The decoder configuration, read from the published config as a
    /// checkpoint's would be.
    pub fn config(&self) -> Result<DecoderConfig> {
        DecoderConfig::from_hf_json(&self.dims.config_json(), Path::new(self.name))
    }
}

/// What one generated tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A weight matrix (or a stack of expert matrices) in a block format.
    Matrix(GgmlType),
    /// A norm's weight: ones.
    NormWeight,
    /// A bias or a norm's bias: small random values.
    Bias,
    /// A learned position table: small random values.
    Table,
}

/// One tensor of a generated model, by kiln's canonical name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    /// Row-major; a stack of experts is `[experts, rows, cols]`.
    pub shape: Vec<usize>,
    pub kind: Kind,
}

impl Tensor {
    /// Number of values.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes it takes in memory (vectors in f32).
    pub fn bytes(&self) -> u64 {
        match self.kind {
            Kind::Matrix(ty) => {
                let (block, size) = ty.block();
                self.numel() / block as u64 * size as u64
            }
            _ => self.numel() * 4,
        }
    }
}

/// The float format matrices are generated in when nothing is quantized:
/// `--dtype` if it names one, else f16 (as checkpoints are stored).
fn float_format(dtype: WeightDtype) -> GgmlType {
    match dtype {
        WeightDtype::F32 => GgmlType::F32,
        WeightDtype::Bf16 => GgmlType::BF16,
        WeightDtype::F16 | WeightDtype::Auto => GgmlType::F16,
    }
}

/// Every tensor the decoder reads for `cfg`, each matrix in the format
/// kiln's own load-time quantization would give it (`crate::convert`'s
/// rule): `quantize` for every matrix and the token embedding, Q6_K for
/// the output head (or the tied embedding) unless the target is Q8_0, the
/// router as stored; a matrix whose rows are not whole blocks stays float.
pub fn tensors(cfg: &DecoderConfig, opts: &LoadOptions) -> Vec<Tensor> {
    let float = float_format(opts.dtype);
    let tied = cfg.tie_word_embeddings;
    let matrix = |name: &str, shape: Vec<usize>| {
        let cols = shape.last().copied().unwrap_or(0);
        let fits = |ty: GgmlType| cols.is_multiple_of(ty.block().0);
        let ty = match opts.quantize {
            None => float,
            Some(_) if name.ends_with("ffn_gate_inp.weight") => float,
            Some(to) => {
                let head = name == "output.weight" || (name == "token_embd.weight" && tied);
                let want = if head && to != GgmlType::Q8_0 {
                    GgmlType::Q6K
                } else {
                    to
                };
                [want, to, float]
                    .into_iter()
                    .find(|&t| fits(t))
                    .unwrap_or(float)
            }
        };
        Tensor {
            name: name.to_string(),
            shape,
            kind: Kind::Matrix(ty),
        }
    };
    let vector = |name: String, n: usize, kind: Kind| Tensor {
        name,
        shape: vec![n],
        kind,
    };
    let (h, e, ff) = (cfg.hidden_size, cfg.embed_dim, cfg.intermediate_size);
    let q = cfg.n_heads * cfg.head_dim;
    let kv = cfg.n_kv_heads * cfg.head_dim;
    let mut out = vec![matrix("token_embd.weight", vec![cfg.vocab_size, e])];
    if let Some(offset) = cfg.learned_positions {
        out.push(Tensor {
            name: "pos_embd.weight".into(),
            shape: vec![cfg.max_position_embeddings + offset, h],
            kind: Kind::Table,
        });
    }
    if e != h {
        out.push(matrix("proj_in.weight", vec![h, e]));
        out.push(matrix("proj_out.weight", vec![e, h]));
    }
    let norm = |out: &mut Vec<Tensor>, name: String| {
        out.push(vector(format!("{name}.weight"), h, Kind::NormWeight));
        if cfg.norm == NormKind::Layer {
            out.push(vector(format!("{name}.bias"), h, Kind::Bias));
        }
    };
    let linear = |out: &mut Vec<Tensor>, name: String, rows: usize, cols: usize, bias: bool| {
        out.push(matrix(&format!("{name}.weight"), vec![rows, cols]));
        if bias {
            out.push(vector(format!("{name}.bias"), rows, Kind::Bias));
        }
    };
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        norm(&mut out, p("attn_norm"));
        linear(&mut out, p("attn_q"), q, h, cfg.qkv_bias);
        linear(&mut out, p("attn_k"), kv, h, cfg.qkv_bias);
        linear(&mut out, p("attn_v"), kv, h, cfg.qkv_bias);
        if cfg.qk_norm {
            out.push(vector(
                p("attn_q_norm.weight"),
                cfg.head_dim,
                Kind::NormWeight,
            ));
            out.push(vector(
                p("attn_k_norm.weight"),
                cfg.head_dim,
                Kind::NormWeight,
            ));
        }
        if cfg.attn_sinks {
            out.push(vector(p("attn_sinks.weight"), cfg.n_heads, Kind::Bias));
        }
        linear(&mut out, p("attn_output"), h, q, cfg.out_bias);
        norm(&mut out, p("ffn_norm"));
        if cfg.post_norms {
            norm(&mut out, p("post_attention_norm"));
            norm(&mut out, p("post_ffw_norm"));
        }
        match cfg.moe.as_ref().filter(|m| m.is_sparse(i)) {
            Some(m) => {
                let (n, eff) = (m.n_experts, m.expert_ff);
                linear(&mut out, p("ffn_gate_inp"), n, h, m.router_bias);
                out.push(matrix(&p("ffn_gate_exps.weight"), vec![n, eff, h]));
                out.push(matrix(&p("ffn_up_exps.weight"), vec![n, eff, h]));
                out.push(matrix(&p("ffn_down_exps.weight"), vec![n, h, eff]));
                if let Some(sff) = m.shared_expert_ff {
                    out.push(matrix(&p("ffn_gate_shexp.weight"), vec![sff, h]));
                    out.push(matrix(&p("ffn_up_shexp.weight"), vec![sff, h]));
                    out.push(matrix(&p("ffn_down_shexp.weight"), vec![h, sff]));
                    if m.shared_expert_gate {
                        out.push(matrix(&p("ffn_gate_inp_shexp.weight"), vec![1, h]));
                    }
                }
            }
            None => {
                if cfg.gated_ffn {
                    linear(&mut out, p("ffn_gate"), ff, h, cfg.mlp_bias);
                }
                linear(&mut out, p("ffn_up"), ff, h, cfg.mlp_bias);
                linear(&mut out, p("ffn_down"), h, ff, cfg.mlp_bias);
            }
        }
    }
    if cfg.final_norm {
        norm(&mut out, "output_norm".into());
    }
    if !tied {
        out.push(matrix("output.weight", vec![cfg.vocab_size, e]));
    }
    out
}

/// Bytes of weights one decoded token reads, from each tensor's name and
/// size in memory: everything but the token embedding (one row of it is
/// read, unless it doubles as the output head) and the position table (one
/// row), and of a mixture-of-experts layer's expert stacks only the share
/// of the experts a token is routed to. Divided into a measured read
/// bandwidth it gives the decode floor: the fastest a token can be made.
pub fn bytes_read_per_token<'a>(
    cfg: &DecoderConfig,
    tensors: impl IntoIterator<Item = (&'a str, u64)>,
) -> u64 {
    let mut has_output = false;
    let mut embed = 0;
    let mut total = 0u64;
    for (name, bytes) in tensors {
        match name {
            "token_embd.weight" => embed = bytes,
            "pos_embd.weight" => {}
            _ if name.contains("_exps.") => {
                let (used, n) = cfg
                    .moe
                    .as_ref()
                    .map_or((1, 1), |m| (m.n_experts_used, m.n_experts.max(1)));
                total += bytes * used as u64 / n as u64;
            }
            _ => {
                has_output |= name == "output.weight";
                total += bytes;
            }
        }
    }
    if has_output {
        total
    } else {
        total + embed
    }
}

/// A seeded xorshift64 generator: fast, and the same weights on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }
}

/// Bytes each parallel task fills.
const CHUNK: usize = 1 << 20;

/// `len` bytes of seeded random data, filled on all threads.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut r = Rng::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut words = c.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&r.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = r.next().to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&last[..n]);
    });
    out
}

/// Rewrites every 16- or 32-bit float of random `bytes` into a finite value
/// of magnitude 2^-8 .. 2^-6 (random sign and mantissa): random bit
/// patterns would hold infinities and NaNs.
fn tame_floats(ty: GgmlType, bytes: &mut [u8]) {
    bytes.par_chunks_mut(CHUNK).for_each(|c| match ty {
        GgmlType::F32 => c.chunks_exact_mut(4).for_each(|v| {
            let r = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            let e = 127 - 8 + ((r >> 23) & 1);
            v.copy_from_slice(&((r & 0x807F_FFFF) | (e << 23)).to_le_bytes());
        }),
        GgmlType::F16 => c.chunks_exact_mut(2).for_each(|v| {
            let r = u16::from_le_bytes([v[0], v[1]]);
            let e = 15 - 8 + ((r >> 10) & 1);
            v.copy_from_slice(&((r & 0x83FF) | (e << 10)).to_le_bytes());
        }),
        GgmlType::BF16 => c.chunks_exact_mut(2).for_each(|v| {
            let r = u16::from_le_bytes([v[0], v[1]]);
            let e = 127 - 8 + ((r >> 7) & 1);
            v.copy_from_slice(&((r & 0x807F) | (e << 7)).to_le_bytes());
        }),
        _ => {}
    });
}

/// The f16 value every scale (and minimum) field of a `ty` block gets, so
/// that the weights' root mean square is about `1 / sqrt(cols)` (what keeps
/// a random network's activations in range): measured by decoding random
/// blocks with every field at 1.
fn block_scale(ty: GgmlType, cols: usize) -> Result<half::f16> {
    let unsupported = || ModelError::Format {
        path: PathBuf::from("--dummy-weights"),
        msg: format!("random weights in {ty:?} are not supported"),
    };
    let dequantize = block_dequantizer(ty).ok_or_else(unsupported)?;
    if ty.f16_fields().is_empty() {
        return Err(unsupported());
    }
    let (block, size) = ty.block();
    let mut sample = random_bytes(size * 64, 0x5CA1E);
    let one = half::f16::ONE.to_le_bytes();
    let mut sum = 0f64;
    let mut values = vec![0f32; block];
    for b in sample.chunks_exact_mut(size) {
        for &o in ty.f16_fields() {
            b[o..o + 2].copy_from_slice(&one);
        }
        dequantize(b, &mut values);
        sum += values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    }
    let rms = (sum / (64 * block) as f64).sqrt().max(1e-6);
    let target = 1.0 / (cols.max(1) as f64).sqrt();
    Ok(half::f16::from_f64(target / rms))
}

/// A `shape` matrix (or stack of them) of random weights in `ty`.
fn random_matrix(ty: GgmlType, shape: &[usize], seed: u64) -> Result<Vec<u8>> {
    let cols = shape.last().copied().unwrap_or(0);
    let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
    let row = row_bytes(ty, cols).ok_or_else(|| ModelError::Format {
        path: PathBuf::from("--dummy-weights"),
        msg: format!("rows of {cols} values are not whole {ty:?} blocks"),
    })?;
    let mut bytes = random_bytes(rows * row, seed);
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        tame_floats(ty, &mut bytes);
        return Ok(bytes);
    }
    let scale = block_scale(ty, cols)?.to_le_bytes();
    let size = ty.block().1;
    let fields = ty.f16_fields();
    bytes.par_chunks_mut(size * 4096).for_each(|c| {
        for b in c.chunks_exact_mut(size) {
            for &o in fields {
                b[o..o + 2].copy_from_slice(&scale);
            }
        }
    });
    Ok(bytes)
}

/// The weights of a generated model, answering the decoder's requests by
/// kiln's canonical names: each tensor is made when it is asked for, so
/// memory holds the model once (as the backend keeps it), never twice.
pub struct DummyWeights {
    shape: &'static str,
    tensors: BTreeMap<String, (usize, Tensor)>,
}

impl DummyWeights {
    /// The weights of `cfg`'s tensors ([`tensors`]) for the shape named `shape`.
    pub fn new(shape: &'static str, cfg: &DecoderConfig, opts: &LoadOptions) -> Self {
        let tensors = tensors(cfg, opts)
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), (i, t)))
            .collect();
        DummyWeights { shape, tensors }
    }

    fn find(&self, name: &str) -> Result<&(usize, Tensor)> {
        self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            path: self.describe().into(),
            tensor: name.to_string(),
            msg: "not a tensor of this shape".into(),
        })
    }
}

impl WeightSource for DummyWeights {
    fn get(&self, name: &str) -> Result<HostTensor> {
        let (i, t) = self.find(name)?;
        let n = t.numel() as usize;
        let data = match t.kind {
            Kind::NormWeight => vec![1.0; n],
            Kind::Bias | Kind::Table => {
                let mut r = Rng::new(0xB1A5 ^ *i as u64);
                (0..n)
                    .map(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.04 - 0.02)
                    .collect()
            }
            Kind::Matrix(ty) => {
                let bytes = random_matrix(ty, &t.shape, *i as u64)?;
                kiln_backend::quant::dequantize(ty, &bytes, n).map_err(|msg| {
                    ModelError::Tensor {
                        path: self.describe().into(),
                        tensor: name.to_string(),
                        msg,
                    }
                })?
            }
        };
        Ok(HostTensor::new(t.shape.clone(), data))
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let (i, t) = self.find(name)?;
        match t.kind {
            Kind::Matrix(ty) => {
                let bytes = random_matrix(ty, &t.shape, *i as u64)?;
                Ok((
                    t.shape.clone(),
                    WeightData::Ggml {
                        ty,
                        bytes: bytes.into(),
                    },
                ))
            }
            _ => {
                let t = self.get(name)?;
                Ok((t.shape, WeightData::F32(t.data)))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        format!("random weights of the {} shape", self.shape)
    }
}

/// Pads a GGUF tokenizer's vocabulary to `vocab` ids with unused
/// `[PAD<id>]` tokens (token type 5, llama.cpp's `UNUSED`), so that every
/// id the model can produce is one the tokenizer knows; a longer
/// vocabulary is left as it is.
pub fn pad_vocabulary(gguf: &mut GgufFile, vocab: usize) {
    use crate::gguf::Value;
    let have = match gguf.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => return,
    };
    let pad = have..vocab;
    if let Some(Value::Array(tokens)) = gguf.metadata.get_mut("tokenizer.ggml.tokens") {
        tokens.extend(pad.clone().map(|i| Value::String(format!("[PAD{i}]"))));
    }
    if let Some(Value::Array(types)) = gguf.metadata.get_mut("tokenizer.ggml.token_type") {
        types.extend(pad.clone().map(|_| Value::I32(5)));
    }
    if let Some(Value::Array(scores)) = gguf.metadata.get_mut("tokenizer.ggml.scores") {
        scores.extend(pad.map(|_| Value::F32(0.0)));
    }
}

/// Builds the model of `shape` with random weights onto `backend`, in the
/// formats `opts` asks for (`quantize`, else `dtype`, else f16), with the
/// default model's tokenizer read from `tokenizer_gguf`, padded to the
/// shape's vocabulary ([`pad_vocabulary`]).
pub fn load<B: Backend>(
    backend: &B,
    shape: &'static Shape,
    opts: &LoadOptions,
    tokenizer_gguf: &Path,
) -> Result<LoadedModel<B>> {
    let cfg = shape.config()?;
    let mut gguf = GgufFile::open(tokenizer_gguf)?;
    pad_vocabulary(&mut gguf, cfg.vocab_size);
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let max_positions = opts.max_positions.map_or(cfg.max_position_embeddings, |m| {
        m.min(cfg.max_position_embeddings)
    });
    let src = DummyWeights::new(shape.name, &cfg, opts);
    let t0 = std::time::Instant::now();
    let decoder = Decoder::load_with(backend, cfg, &src, max_positions, &Layouts::Off)?;
    tracing::info!(
        "generated random weights of {} in {:.2?}",
        shape.name,
        t0.elapsed()
    );
    let eos_ids = tokenizer.eos_ids().to_vec();
    Ok(LoadedModel {
        decoder,
        tokenizer,
        chat_template: None,
        eos_ids,
        format: ModelFormat::Gguf(tokenizer_gguf.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape's parameter count, by kiln's counter (what `kiln
    /// inspect` prints), is the published one; and the generated tensors
    /// are exactly the ones counted.
    #[test]
    fn each_shape_has_its_published_parameter_count() {
        for s in SHAPES {
            let cfg = s.config().unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(cfg.param_count(), s.params, "{}", s.name);
            let sum: u64 = tensors(&cfg, &LoadOptions::default())
                .iter()
                .map(Tensor::numel)
                .sum();
            assert_eq!(sum, s.params, "{}: generated tensors", s.name);
        }
    }

    /// The default model's tokenizer padded to Llama 3's vocabulary knows
    /// every id, encodes as before, and decodes a padding id to its name.
    #[test]
    fn a_padded_vocabulary_keeps_the_tokenizer() {
        let Ok(path) = crate::default_model::default_model_path() else {
            panic!("the default model is missing (scripts/fetch-assets.sh)")
        };
        let mut gguf = GgufFile::open(&path).unwrap();
        let plain = Tokenizer::from_gguf(&gguf).unwrap();
        pad_vocabulary(&mut gguf, 128_256);
        let padded = Tokenizer::from_gguf(&gguf).unwrap();
        assert_eq!((plain.vocab_size(), padded.vocab_size()), (49_152, 128_256));
        let text = "The kiln fires at 1200 degrees.";
        assert_eq!(
            plain.encode(text, false).unwrap(),
            padded.encode(text, false).unwrap()
        );
        assert_eq!(padded.id_to_token(128_255).as_deref(), Some("[PAD128255]"));
    }

    /// Published figures beside the counts: Qwen3-30B-A3B's "3.3B
    /// activated" parameters, and the shapes' defining numbers.
    #[test]
    fn shapes_read_as_the_published_models() {
        let moe = shape("qwen3-30b-a3b").and_then(Shape::config).unwrap();
        let active = moe.active_param_count() as f64;
        assert_eq!((active / 1e8).floor(), 33.0, "{active}");
        let opt = shape("opt-13b").and_then(Shape::config).unwrap();
        assert_eq!(
            (opt.hidden_size, opt.n_layers, opt.intermediate_size),
            (5120, 40, 20480)
        );
        assert!(opt.tie_word_embeddings && opt.learned_positions == Some(2));
        let l8 = shape("llama3-8b").and_then(Shape::config).unwrap();
        assert_eq!((l8.n_heads, l8.n_kv_heads, l8.head_dim), (32, 8, 128));
        let err = shape("llama9")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("use one of tiny, tiny-opt, tiny-moe, smollm2-135m, llama3-1b"),
            "{err}"
        );
    }

    /// Quantized formats follow the load-time quantizer's rule: the target
    /// everywhere, Q6_K for the head unless the target is Q8_0, the router
    /// as stored.
    #[test]
    fn formats_follow_the_quantizers_rule() {
        let kind = |ts: &[Tensor], name: &str| ts.iter().find(|t| t.name == name).map(|t| t.kind);
        let q4 = LoadOptions {
            quantize: Some(GgmlType::Q4_0),
            ..LoadOptions::default()
        };
        let l1 = shape("llama3-1b").and_then(Shape::config).unwrap();
        let ts = tensors(&l1, &q4);
        assert_eq!(
            kind(&ts, "token_embd.weight"),
            Some(Kind::Matrix(GgmlType::Q6K))
        );
        assert_eq!(
            kind(&ts, "blk.3.ffn_down.weight"),
            Some(Kind::Matrix(GgmlType::Q4_0))
        );
        assert_eq!(kind(&ts, "output.weight"), None);
        let q8 = LoadOptions {
            quantize: Some(GgmlType::Q8_0),
            ..LoadOptions::default()
        };
        let moe = shape("qwen3-30b-a3b").and_then(Shape::config).unwrap();
        let ts = tensors(&moe, &q8);
        assert_eq!(
            kind(&ts, "output.weight"),
            Some(Kind::Matrix(GgmlType::Q8_0))
        );
        assert_eq!(
            kind(&ts, "blk.0.ffn_gate_inp.weight"),
            Some(Kind::Matrix(GgmlType::F16))
        );
        let bf = LoadOptions {
            dtype: WeightDtype::Bf16,
            ..LoadOptions::default()
        };
        let ts = tensors(&l1, &bf);
        assert_eq!(
            kind(&ts, "blk.0.attn_q.weight"),
            Some(Kind::Matrix(GgmlType::BF16))
        );
    }

    /// Generated matrices decode to finite weights of about the intended
    /// size in every format `--quantize` and `--dtype` name.
    #[test]
    fn generated_weights_are_finite_and_scaled() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::F32,
        ] {
            let (rows, cols) = (8, 1024);
            let bytes = random_matrix(ty, &[rows, cols], 7).unwrap();
            let v = kiln_backend::quant::dequantize(ty, &bytes, rows * cols).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{ty:?}");
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            assert!(rms > 0.002 && rms < 0.1, "{ty:?}: rms {rms}");
            assert_eq!(
                bytes,
                random_matrix(ty, &[rows, cols], 7).unwrap(),
                "{ty:?}"
            );
        }
    }

    /// The decode floor's bytes: an untied head is read and the embedding
    /// is not; a tied embedding is read as the head; of expert stacks only
    /// the routed share.
    #[test]
    fn bytes_per_token_count_what_decode_reads() {
        let l1 = shape("llama3-1b").and_then(Shape::config).unwrap();
        let q8 = LoadOptions {
            quantize: Some(GgmlType::Q8_0),
            ..LoadOptions::default()
        };
        let ts = tensors(&l1, &q8);
        let all: u64 = ts.iter().map(Tensor::bytes).sum();
        let per = bytes_read_per_token(&l1, ts.iter().map(|t| (t.name.as_str(), t.bytes())));
        assert_eq!(per, all, "tied: the embedding is the head");
        let l8 = shape("llama3-8b").and_then(Shape::config).unwrap();
        let ts = tensors(&l8, &q8);
        let all: u64 = ts.iter().map(Tensor::bytes).sum();
        let per = bytes_read_per_token(&l8, ts.iter().map(|t| (t.name.as_str(), t.bytes())));
        assert_eq!(all - per, 128256 * 4096 / 32 * 34);
        let moe = shape("qwen3-30b-a3b").and_then(Shape::config).unwrap();
        let ts = tensors(&moe, &q8);
        let per = bytes_read_per_token(&moe, ts.iter().map(|t| (t.name.as_str(), t.bytes())));
        let experts: u64 = ts
            .iter()
            .filter(|t| t.name.contains("_exps."))
            .map(Tensor::bytes)
            .sum();
        let rest: u64 = ts
            .iter()
            .filter(|t| !t.name.contains("_exps.") && t.name != "token_embd.weight")
            .map(Tensor::bytes)
            .sum();
        assert_eq!(per, rest + experts / 16);
    }
}
