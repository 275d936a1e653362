//! Tiny random-weight models written on the fly, for tests.
//!
//! Tests of loading, error paths, batching and scheduling need a real model
//! file but not a good one: these writers produce a llama-shaped checkpoint of
//! a few thousand parameters, either as a GGUF file or as a Hugging Face
//! directory (config.json + model.safetensors + tokenizer.json), from the same
//! seeded weights. The two forms differ exactly as real checkpoints do: GGUF
//! stores the q/k rows permuted for interleaved rotary pairs, Hugging Face
//! stores them for half-split pairs, so the same logits from both check rope
//! layouts and both loaders at once.
//!
//! The tokenizer is byte-level BPE with the 256 byte tokens and no merges,
//! plus three ChatML control tokens, so any text encodes.
//!
//! A test tool, not part of the library users get: compiled only with the
//! `test-support` feature, which every crate's `[dev-dependencies]` turns on.

use std::path::Path;

use crate::gguf::{GgufWriter, Value};
use crate::quant::GgmlType;
use crate::{ModelError, Result};

/// Shape of a tiny llama model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub max_positions: usize,
    /// The output projection reuses the embedding matrix.
    pub tied: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 48,
            max_positions: 512,
            tied: false,
        }
    }
}

/// Control tokens appended after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Vocabulary size of every fixture.
pub const VOCAB: usize = 256 + SPECIAL_TOKENS.len();
/// The fixture's end-of-sequence id (`<|im_end|>`).
pub const EOS_ID: u32 = 258;

const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One tensor under kiln's canonical (GGUF) name, row-major, in Hugging Face layout.
pub struct FixtureTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies.
pub fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    // Non-printable bytes take the code points from 256 up, in byte order.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

/// The fixture's weights: seeded uniform values scaled like a real initialisation.
pub fn tiny_llama_tensors(spec: &TinySpec, seed: u64) -> Vec<FixtureTensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let h = spec.hidden;
    let hd = h / spec.heads;
    let (q, kv, ff) = (h, spec.kv_heads * hd, spec.ffn);
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = rand(n, scale).into_iter().map(|v| v + offset).collect();
        out.push(FixtureTensor { name, shape, data });
    };
    let w = 1.0 / (h as f32).sqrt();
    push("token_embd.weight".into(), vec![VOCAB, h], 1.0, 0.0);
    for i in 0..spec.layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        push(p("attn_norm.weight"), vec![h], 0.1, 1.0);
        push(p("attn_q.weight"), vec![q, h], w, 0.0);
        push(p("attn_k.weight"), vec![kv, h], w, 0.0);
        push(p("attn_v.weight"), vec![kv, h], w, 0.0);
        push(p("attn_output.weight"), vec![h, q], w, 0.0);
        push(p("ffn_norm.weight"), vec![h], 0.1, 1.0);
        push(p("ffn_gate.weight"), vec![ff, h], w, 0.0);
        push(p("ffn_up.weight"), vec![ff, h], w, 0.0);
        push(
            p("ffn_down.weight"),
            vec![h, ff],
            1.0 / (ff as f32).sqrt(),
            0.0,
        );
    }
    push("output_norm.weight".into(), vec![h], 0.1, 1.0);
    if !spec.tied {
        push("output.weight".into(), vec![VOCAB, h], w, 0.0);
    }
    out
}

/// Reorders the rows of each head from half-split rotary pairs (`i`, `i + d/2`)
/// to interleaved ones (`2i`, `2i + 1`), as llama.cpp's converter does.
fn interleave_heads(t: &FixtureTensor, head_dim: usize) -> Vec<f32> {
    let cols = t.shape[1];
    let half = head_dim / 2;
    let mut out = vec![0f32; t.data.len()];
    for (head, rows) in t.data.chunks_exact(head_dim * cols).enumerate() {
        for i in 0..half {
            for (dst, src) in [(2 * i, i), (2 * i + 1, i + half)] {
                let d = (head * head_dim + dst) * cols;
                out[d..d + cols].copy_from_slice(&rows[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

/// The fixture's vocabulary in byte-level spelling.
fn vocab_tokens() -> Vec<String> {
    (0..=255u8)
        .map(|b| byte_to_char(b).to_string())
        .chain(SPECIAL_TOKENS.iter().map(|s| s.to_string()))
        .collect()
}

/// The fixture as GGUF bytes (F32 tensors, GPT-2-style tokenizer metadata).
pub fn tiny_llama_gguf_bytes(spec: &TinySpec, seed: u64) -> Vec<u8> {
    gguf_bytes(spec, seed, None, false)
}

/// The fixture's GGUF; `matrices` replaces every matrix by random blocks of
/// a format (see [`tiny_llama_gguf_in_format`]).
fn gguf_bytes(
    spec: &TinySpec,
    seed: u64,
    matrices: Option<(GgmlType, u64)>,
    dequantized: bool,
) -> Vec<u8> {
    let hd = spec.hidden / spec.heads;
    let mut w = GgufWriter::default();
    let u32v = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", u32v(spec.layers))
        .meta("llama.context_length", u32v(spec.max_positions))
        .meta("llama.embedding_length", u32v(spec.hidden))
        .meta("llama.feed_forward_length", u32v(spec.ffn))
        .meta("llama.attention.head_count", u32v(spec.heads))
        .meta("llama.attention.head_count_kv", u32v(spec.kv_heads))
        .meta("llama.rope.freq_base", Value::F32(10000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("llama.vocab_size", u32v(VOCAB))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("gpt-2".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vocab_tokens().into_iter().map(Value::String).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(
                (0..VOCAB)
                    .map(|i| Value::I32(if i < 256 { 1 } else { 3 }))
                    .collect(),
            ),
        )
        .meta("tokenizer.ggml.merges", Value::Array(Vec::new()))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(257))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta("tokenizer.chat_template", Value::String(CHATML.into()));
    for t in tiny_llama_tensors(spec, seed) {
        let data = if t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_k.weight") {
            interleave_heads(&t, hd)
        } else {
            t.data
        };
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        match matrices {
            Some((ty, seed)) if t.shape.len() == 2 => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let blocks = random_blocks(ty, rows * cols / ty.block().0, seed ^ rows as u64);
                let bytes = if dequantized {
                    kiln_backend::quant::dequantize(ty, &blocks, rows * cols)
                        .expect("whole blocks of a known format")
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect()
                } else {
                    blocks
                };
                let stored = if dequantized { GgmlType::F32 } else { ty };
                w.tensor(&t.name, dims, stored, bytes);
            }
            _ => {
                let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.tensor(&t.name, dims, GgmlType::F32, bytes);
            }
        }
    }
    w.to_bytes()
}

/// The fixture with every matrix in format `ty`: random blocks (seeded,
/// with small f16 scales) rather than a quantization of the f32 weights, so
/// any format can be made without a quantizer. With `dequantized`, the same
/// matrices are stored as their F32 values instead: the twin a native
/// kernel's results are compared with.
pub fn tiny_llama_gguf_in_format(
    spec: &TinySpec,
    seed: u64,
    ty: GgmlType,
    dequantized: bool,
) -> Vec<u8> {
    gguf_bytes(spec, seed, Some((ty, seed)), dequantized)
}

/// `n` blocks of `ty` (or `n` values of a float format) of seeded random
/// bytes, with every f16 scale and minimum set to a small positive value.
pub fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let (_, size) = ty.block();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let small = |r: u64, big: bool| {
        let v = (r % 1000) as f32 / 1000.0;
        if big {
            0.002 + 0.01 * v
        } else {
            0.0005 + 0.002 * v
        }
    };
    let mut out = Vec::with_capacity(n * size);
    for _ in 0..n {
        let start = out.len();
        out.extend((0..size).map(|_| next() as u8));
        match ty {
            GgmlType::F32 => {
                let v = small(next(), true) - 0.007;
                out[start..].copy_from_slice(&v.to_le_bytes());
            }
            GgmlType::F16 => {
                let v = half::f16::from_f32(small(next(), true) - 0.007);
                out[start..].copy_from_slice(&v.to_le_bytes());
            }
            GgmlType::BF16 => {
                let v = half::bf16::from_f32(small(next(), true) - 0.007);
                out[start..].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                // The super-block formats multiply their f16 scales by
                // sub-scales of up to 6 bits: keep theirs smaller.
                let big = ty.block().0 == 32;
                for &o in ty.f16_fields() {
                    let v = half::f16::from_f32(small(next(), big));
                    out[start + o..start + o + 2].copy_from_slice(&v.to_le_bytes());
                }
                if ty == GgmlType::MXFP4 {
                    // Its scale is an E8M0 exponent: 2^-10 .. 2^-7.
                    out[start] = 118 + (next() % 4) as u8;
                }
            }
        }
    }
    out
}

/// Writes the fixture as a GGUF file.
pub fn write_tiny_llama_gguf(path: &Path, spec: &TinySpec, seed: u64) -> Result<()> {
    std::fs::write(path, tiny_llama_gguf_bytes(spec, seed)).map_err(io_err(path))
}

/// Writes the fixture as a Hugging Face directory with f32 safetensors.
pub fn write_tiny_llama_hf(dir: &Path, spec: &TinySpec, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied,
        "bos_token_id": 257,
        "eos_token_id": EOS_ID,
    });
    write_json(&dir.join("config.json"), &config)?;

    let tensors = tiny_llama_tensors(spec, seed);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let name = crate::weights::hf_llama_names(&t.name).unwrap_or_else(|| t.name.clone());
            (
                name,
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let path = dir.join("model.safetensors");
    let format_err = |e: safetensors::SafeTensorError| ModelError::Format {
        path: path.clone(),
        msg: e.to_string(),
    };
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data);
            Ok((name.clone(), view.map_err(format_err)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let st = safetensors::serialize(views, None).map_err(format_err)?;
    std::fs::write(&path, st).map_err(io_err(&path))?;

    let vocab: serde_json::Map<String, serde_json::Value> = vocab_tokens()
        .into_iter()
        .take(256)
        .enumerate()
        .map(|(i, t)| (t, i.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []},
    });
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}),
    )
}

/// Block size of the caches [`prefill`] makes.
pub const TEST_BLOCK_SIZE: usize = 16;

/// Runs `tokens` through `decoder` in one step over a fresh KV cache with room
/// for `extra` more tokens (positions `0..`, blocks in order), returning the
/// logits of every position and the cache for decoding on.
pub fn prefill<B: kiln_backend::Backend>(
    be: &B,
    decoder: &crate::decoder::Decoder<B>,
    tokens: &[u32],
    extra: usize,
) -> Result<(Vec<f32>, B::KvCache)> {
    let cfg = decoder.config();
    let spec = kiln_backend::KvSpec {
        n_layers: cfg.n_layers,
        num_blocks: (tokens.len() + extra).div_ceil(TEST_BLOCK_SIZE),
        block_size: TEST_BLOCK_SIZE,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = be.alloc_kv_cache(&spec)?;
    let mut step = kiln_backend::StepInput::single_sequence(0, tokens, TEST_BLOCK_SIZE);
    step.logit_rows = (0..tokens.len() as u32).collect();
    let logits = decoder.forward(be, &mut kv, &step)?;
    Ok((logits, kv))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, v.to_string()).map_err(io_err(path))
}

/// The largest absolute difference between two lists of values that should
/// be the same (logits against a golden file, one form of a model against
/// another), for tests.
///
/// Panics, naming `what`, when the lengths differ (a truncated golden would
/// otherwise compare nothing) or when any value on either side is NaN or
/// infinite: `fold(0.0, f32::max)` would drop a NaN, since `f32::max`
/// returns the other operand, and pass a broken computation.
#[track_caller]
pub fn max_abs_diff(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values against {} expected",
        got.len(),
        want.len()
    );
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && w.is_finite(),
            "{what}: value {i} is not finite: got {g}, expected {w}"
        );
        worst = worst.max((g - w).abs());
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
    }

    #[test]
    fn interleaving_moves_half_split_pairs_next_to_each_other() {
        // One head of dim 4 with 1 column: rows [a, b, c, d] pair (a,c) and (b,d).
        let t = FixtureTensor {
            name: "q".into(),
            shape: vec![4, 1],
            data: vec![0.0, 1.0, 2.0, 3.0],
        };
        assert_eq!(interleave_heads(&t, 4), vec![0.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn max_abs_diff_fails_on_nan_and_on_short_lists() {
        assert_eq!(max_abs_diff("ok", &[1.0, -2.0], &[1.5, -2.0]), 0.5);
        for (got, want) in [
            (vec![1.0, f32::NAN], vec![1.0, 2.0]),
            (vec![1.0, 2.0], vec![f32::INFINITY, 2.0]),
            (vec![1.0], vec![1.0, 2.0]),
        ] {
            let r = std::panic::catch_unwind(|| max_abs_diff("bad", &got, &want));
            assert!(r.is_err(), "{got:?} vs {want:?} passed");
        }
    }
}
