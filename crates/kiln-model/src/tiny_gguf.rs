//! The pieces every family's test writes when it turns a tiny checkpoint
//! under `testdata/tiny/` into the GGUF file llama.cpp's
//! `convert_hf_to_gguf.py` would write for it: the common `<arch>.*`
//! hyperparameter keys, the byte-level GPT-2 vocabulary from its
//! `tokenizer.json`, llama's q/k row order, F32 tensors, and a temporary
//! file of its own per call.
//!
//! A test tool (feature `test-support`), shared so that the GGUF writers of
//! `tests/architectures.rs`, `gemma.rs`, `moe.rs`, `gpt_oss.rs` and
//! `lora.rs` keep only what their family adds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value as Json;

use crate::config::DecoderConfig;
use crate::gguf::{GgufWriter, Value};
use crate::quant::GgmlType;

/// `general.architecture` and the `<arch>.*` keys every decoder has:
/// layers, context, widths, heads, head size and the RMS norm's epsilon.
pub fn write_hparams(w: &mut GgufWriter, arch: &str, cfg: &DecoderConfig) {
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", Value::String(arch.into()))
        .meta(&key("block_count"), u(cfg.n_layers))
        .meta(&key("context_length"), u(cfg.max_position_embeddings))
        .meta(&key("embedding_length"), u(cfg.hidden_size))
        .meta(&key("feed_forward_length"), u(cfg.intermediate_size))
        .meta(&key("attention.head_count"), u(cfg.n_heads))
        .meta(&key("attention.head_count_kv"), u(cfg.n_kv_heads))
        .meta(&key("attention.key_length"), u(cfg.head_dim))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.norm_eps),
        );
}

/// The plain rotary keys (`rope.freq_base`, `rope.dimension_count`) of a
/// config without rope scaling.
pub fn write_rope(w: &mut GgufWriter, arch: &str, cfg: &DecoderConfig) {
    let rope = cfg.rope.as_ref().expect("rope");
    w.meta(
        &format!("{arch}.rope.freq_base"),
        Value::F32(rope.theta as f32),
    )
    .meta(
        &format!("{arch}.rope.dimension_count"),
        Value::U32(rope.rot_dim as u32),
    );
}

/// The checkpoint's byte-level vocabulary (`d/tokenizer.json`) as a GGUF
/// `gpt2` tokenizer of `vocab_size` tokens: vocabulary entries normal (1),
/// added tokens control (3), the ids no entry names `[PAD<id>]` unused (5),
/// and one merge (llama.cpp's BPE wants at least one).
pub fn write_gpt2_vocab(w: &mut GgufWriter, d: &Path, vocab_size: usize) {
    let path = d.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tok: Json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![Value::I32(5); vocab_size];
    for (t, id) in tok["model"]["vocab"].as_object().expect("vocab") {
        let i = id.as_u64().expect("id") as usize;
        (tokens[i], types[i]) = (t.clone(), Value::I32(1));
    }
    for a in tok["added_tokens"].as_array().expect("added_tokens") {
        let i = a["id"].as_u64().expect("id") as usize;
        let content = a["content"].as_str().expect("content").to_string();
        (tokens[i], types[i]) = (content, Value::I32(3));
    }
    for (i, t) in tokens.iter_mut().enumerate().filter(|(_, t)| t.is_empty()) {
        *t = format!("[PAD{i}]");
    }
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("gpt-2".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        );
}

/// Rows of a llama q or k matrix (`heads` heads, `cols` a row) in the order
/// llama.cpp's converter writes them (rotary pairs adjacent): row
/// `h*hd + 2i + j` is Hugging Face's row `h*hd + j*hd/2 + i`.
pub fn permute_qk_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let hd = data.len() / cols / heads;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// An F32 tensor of row-major `shape` (GGUF lists the dimensions fastest first).
pub fn put_f32(w: &mut GgufWriter, name: &str, shape: &[usize], data: &[f32]) {
    w.tensor(
        name,
        shape.iter().rev().map(|&d| d as u64).collect(),
        GgmlType::F32,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
}

/// Writes `w` to `kiln-<stem>-<pid>-<call>.gguf` in the temporary directory:
/// tests run in parallel and may write the same form, so one name per call.
pub fn write_temp(w: &GgufWriter, stem: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("kiln-{stem}-{}-{call}.gguf", std::process::id()));
    std::fs::write(&out, w.to_bytes()).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    out
}

/// The GGUF file llama.cpp's converter writes for the tiny Gemma 2 or 3
/// checkpoint in `d` (`name` is `gemma2` or `gemma3`): the family's keys
/// (sliding window, soft-caps or the two rotary bases), the norms' `1 +`
/// folded into their weights, F32 tensors; written to a temporary file
/// named after `tag`.
pub fn gemma(name: &str, d: &Path, tag: &str) -> PathBuf {
    use crate::weights::{hf_gemma_names, SafetensorsSource, WeightSource};
    use Value as G;
    let d = d.to_path_buf();
    let hf: Json =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open_dir(&d, hf_gemma_names).expect("safetensors");
    let n = |k: &str| hf[k].as_u64().unwrap_or_else(|| panic!("{k}")) as u32;
    let mut w = GgufWriter::default();
    let key = |k: &str| format!("{name}.{k}");
    w.meta("general.architecture", G::String(name.into()))
        .meta(&key("context_length"), G::U32(n("max_position_embeddings")))
        .meta(&key("embedding_length"), G::U32(n("hidden_size")))
        .meta(&key("block_count"), G::U32(n("num_hidden_layers")))
        .meta(&key("feed_forward_length"), G::U32(n("intermediate_size")))
        .meta(
            &key("attention.head_count"),
            G::U32(n("num_attention_heads")),
        )
        .meta(
            &key("attention.head_count_kv"),
            G::U32(n("num_key_value_heads")),
        )
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            G::F32(hf["rms_norm_eps"].as_f64().unwrap() as f32),
        )
        .meta(&key("attention.key_length"), G::U32(n("head_dim")))
        .meta(&key("attention.value_length"), G::U32(n("head_dim")))
        .meta(
            &key("attention.sliding_window"),
            G::U32(n("sliding_window")),
        );
    let f = |k: &str| G::F32(hf[k].as_f64().unwrap() as f32);
    if name == "gemma2" {
        w.meta(&key("attn_logit_softcapping"), f("attn_logit_softcapping"))
            .meta(
                &key("final_logit_softcapping"),
                f("final_logit_softcapping"),
            );
    } else {
        let rope = &hf["rope_parameters"];
        let full = &rope["full_attention"];
        let theta = |p: &Json| G::F32(p["rope_theta"].as_f64().unwrap() as f32);
        assert_eq!(full["rope_type"], "linear");
        w.meta(&key("rope.freq_base"), theta(full))
            .meta(&key("rope.scaling.type"), G::String("linear".into()))
            .meta(
                &key("rope.scaling.factor"),
                G::F32(full["factor"].as_f64().unwrap() as f32),
            )
            .meta(
                &key("rope.freq_base_swa"),
                theta(&rope["sliding_attention"]),
            );
    }
    write_gpt2_vocab(&mut w, &d, n("vocab_size") as usize);
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    assert!(
        !src.contains("output.weight"),
        "{name}: tied, no lm_head in the file"
    );
    for l in 0..n("num_hidden_layers") {
        for part in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_q_norm",
            "attn_k_norm",
            "attn_output",
            "post_attention_norm",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        ] {
            let t = format!("blk.{l}.{part}.weight");
            if src.contains(&t) {
                names.push(t);
            }
        }
    }
    for t in names {
        let mut h = src.get(&t).expect("tensor");
        if t.ends_with("norm.weight") {
            h.data.iter_mut().for_each(|v| *v += 1.0);
        }
        put_f32(&mut w, &t, &h.shape, &h.data);
    }
    write_temp(&w, &format!("gemma-{tag}"))
}

/// The GGUF file llama.cpp's converter (`GptOssModel`) writes for the tiny
/// gpt-oss checkpoint in `d`: architecture `gpt-oss`, YaRN as
/// `rope.scaling.*`, the window, the pre-FFN norm as
/// `blk.N.post_attention_norm`, sinks, the router with its bias, and each
/// layer's experts as 3-D `ffn_{gate,up,down}_exps` with their biases.
/// `put_experts` writes the three expert matrices of each layer (F32 or a
/// quantized form); every other tensor is F32. Named after `tag`.
pub fn gpt_oss(
    d: &Path,
    tag: &str,
    mut put_experts: impl FnMut(&mut GgufWriter, &str, &[usize], &[f32]),
) -> PathBuf {
    use crate::weights::{SafetensorsSource, WeightSource};
    use Value as G;
    let cfg = DecoderConfig::from_hf_config(&d.join("config.json")).expect("config");
    let moe = cfg.moe.clone().expect("experts");
    let src = crate::gpt_oss::HfExperts {
        inner: SafetensorsSource::open_dir(d, crate::weights::hf_names(&cfg.arch))
            .expect("safetensors"),
    };
    let hf: Json =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let yarn = &hf["rope_parameters"];
    let arch = "gpt-oss";
    let mut w = GgufWriter::default();
    let u = |v: usize| G::U32(v as u32);
    let f = |v: &Json| G::F32(v.as_f64().expect("number") as f32);
    let key = |k: &str| format!("{arch}.{k}");
    write_hparams(&mut w, arch, &cfg);
    w.meta(&key("attention.value_length"), u(cfg.head_dim))
        .meta(&key("rope.freq_base"), f(&yarn["rope_theta"]))
        .meta(&key("rope.scaling.type"), G::String("yarn".into()))
        .meta(&key("rope.scaling.factor"), f(&yarn["factor"]))
        .meta(
            &key("rope.scaling.original_context_length"),
            u(yarn["original_max_position_embeddings"].as_u64().unwrap() as usize),
        )
        .meta(&key("expert_count"), u(moe.n_experts))
        .meta(&key("expert_used_count"), u(moe.n_experts_used))
        .meta(&key("expert_feed_forward_length"), u(moe.expert_ff));
    w.meta(
        &key("attention.sliding_window"),
        u(hf["sliding_window"].as_u64().unwrap() as usize),
    );
    write_gpt2_vocab(&mut w, d, cfg.vocab_size);
    // (GGUF name, canonical name it is read from)
    let mut names: Vec<(String, String)> =
        ["token_embd.weight", "output_norm.weight", "output.weight"]
            .iter()
            .map(|n| (n.to_string(), n.to_string()))
            .collect();
    for l in 0..cfg.n_layers {
        for p in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_q.bias",
            "attn_k.weight",
            "attn_k.bias",
            "attn_v.weight",
            "attn_v.bias",
            "attn_output.weight",
            "attn_output.bias",
            "attn_sinks.weight",
            "ffn_gate_inp.weight",
            "ffn_gate_inp.bias",
            "ffn_gate_exps.weight",
            "ffn_gate_exps.bias",
            "ffn_up_exps.weight",
            "ffn_up_exps.bias",
            "ffn_down_exps.weight",
            "ffn_down_exps.bias",
        ] {
            let n = format!("blk.{l}.{p}");
            names.push((n.clone(), n));
        }
        names.push((
            format!("blk.{l}.post_attention_norm.weight"),
            format!("blk.{l}.ffn_norm.weight"),
        ));
    }
    for (gguf_name, canonical) in names {
        let t = src.get(&canonical).expect(&canonical);
        if gguf_name.ends_with("_exps.weight") {
            put_experts(&mut w, &gguf_name, &t.shape, &t.data);
        } else {
            put_f32(&mut w, &gguf_name, &t.shape, &t.data);
        }
    }
    write_temp(&w, &format!("gpt-oss-{tag}"))
}
