//! Every supported architecture against Hugging Face `transformers`, on tiny
//! random-weight checkpoints written by `scripts/golden/tiny_models.py`
//! (`testdata/tiny/<arch>/`): the logits of the last prompt position, the
//! argmax of every position, and 16 greedy tokens through the KV cache.

use kiln_backend::cpu::CpuBackend;
use kiln_model::fixtures;
use kiln_model::goldens::{check_loaded, ids, run, tiny_dir as dir, LOGIT_TOL};
use kiln_model::{load, LoadOptions};
use serde_json::Value;

fn check(name: &str) {
    let m = load(&CpuBackend::new(), &dir(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    check_loaded(name, &m, "safetensors");
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn llama31_rope_scaling_matches_transformers() {
    check("llama31");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check("qwen3");
}

#[test]
fn phi3_fused_projections_match_transformers() {
    check("phi3");
}

#[test]
fn gpt2_conv1d_and_learned_positions_match_transformers() {
    check("gpt2");
}

#[test]
fn opt_projections_and_position_offset_match_transformers() {
    check("opt");
}

#[test]
fn opt_from_a_pytorch_checkpoint_matches_transformers() {
    // The same weights as `opt/`, as `pytorch_model.bin` read without running pickle code.
    check("opt-bin");
}

#[test]
fn opt_post_layer_norm_matches_transformers() {
    check("opt-postln");
}

#[test]
fn dtype_option_rounds_weights_to_16_bit_precision() {
    let d = dir("llama");
    let logits = |dtype| {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let m = load(&CpuBackend::new(), &d, &opts).expect("load");
        run(&m, &[1, 2, 3, 4, 5], 1).0
    };
    let (full, bf16, f16) = (
        logits(kiln_model::WeightDtype::Auto),
        logits(kiln_model::WeightDtype::Bf16),
        logits(kiln_model::WeightDtype::F16),
    );
    let diff = |a: &[f32], b: &[f32]| fixtures::max_abs_diff("f32 against half logits", b, a);
    // bf16 keeps 8 bits of mantissa, f16 11: both move the logits, bf16 more.
    assert!(
        diff(&full, &bf16) > 1e-4 && diff(&full, &bf16) < 0.5,
        "{}",
        diff(&full, &bf16)
    );
    assert!(diff(&full, &f16) > 1e-6 && diff(&full, &f16) < diff(&full, &bf16));
    assert_eq!(full, logits(kiln_model::WeightDtype::F32));
}

/// Writes a tiny Hugging Face checkpoint as a GGUF file the way llama.cpp's
/// `convert_hf_to_gguf.py` does for these architectures (canonical tensor
/// names, Hugging Face's rotary layout kept for non-llama architectures,
/// Phi-3's fused `attn_qkv` and double-height `ffn_up`, Phi-3's
/// `sliding_window = 0` for "none"), checked once against files that
/// converter wrote for the same checkpoints.
fn to_gguf(name: &str) -> std::path::PathBuf {
    use kiln_model::gguf::{GgufWriter, Value as G};
    use kiln_model::quant::GgmlType;
    use kiln_model::weights::{hf_llama_names, SafetensorsSource, WeightSource};
    let d = dir(name);
    let cfg =
        kiln_model::config::DecoderConfig::from_hf_config(&d.join("config.json")).expect("config");
    let src = SafetensorsSource::open_dir(&d, hf_llama_names).expect("safetensors");
    let mut w = GgufWriter::default();
    let u = |v: usize| G::U32(v as u32);
    let key = |k: &str| format!("{name}.{k}");
    w.meta("general.architecture", G::String(name.into()))
        .meta(&key("block_count"), u(cfg.n_layers))
        .meta(&key("context_length"), u(cfg.max_position_embeddings))
        .meta(&key("embedding_length"), u(cfg.hidden_size))
        .meta(&key("feed_forward_length"), u(cfg.intermediate_size))
        .meta(&key("attention.head_count"), u(cfg.n_heads))
        .meta(&key("attention.head_count_kv"), u(cfg.n_kv_heads))
        .meta(&key("attention.key_length"), u(cfg.head_dim))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            G::F32(cfg.norm_eps),
        )
        .meta(
            &key("rope.freq_base"),
            G::F32(cfg.rope.as_ref().expect("rope").theta as f32),
        )
        .meta(
            &key("rope.dimension_count"),
            u(cfg.rope.as_ref().expect("rope").rot_dim),
        );
    if name == "phi3" {
        w.meta(&key("attention.sliding_window"), G::U32(0));
    }
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap()).unwrap();
    let mut tokens = vec![String::new(); cfg.vocab_size];
    let mut types = vec![G::I32(5); cfg.vocab_size];
    for (t, id) in tok["model"]["vocab"].as_object().unwrap() {
        let i = id.as_u64().unwrap() as usize;
        (tokens[i], types[i]) = (t.clone(), G::I32(1));
    }
    for a in tok["added_tokens"].as_array().unwrap() {
        let i = a["id"].as_u64().unwrap() as usize;
        (tokens[i], types[i]) = (a["content"].as_str().unwrap().to_string(), G::I32(3));
    }
    for (i, t) in tokens.iter_mut().enumerate().filter(|(_, t)| t.is_empty()) {
        *t = format!("[PAD{i}]");
    }
    w.meta("tokenizer.ggml.model", G::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", G::String("gpt-2".into()))
        .meta(
            "tokenizer.ggml.tokens",
            G::Array(tokens.into_iter().map(G::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", G::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            G::Array(vec![G::String("a b".into())]),
        );
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    if src.contains("output.weight") {
        names.push("output.weight".into());
    }
    for l in 0..cfg.n_layers {
        let parts: &[&str] = if name == "phi3" {
            &[
                "attn_norm.weight",
                "attn_qkv.weight",
                "attn_output.weight",
                "ffn_norm.weight",
                "ffn_gate_up.weight",
                "ffn_down.weight",
            ]
        } else {
            &[
                "attn_norm.weight",
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "attn_q_norm.weight",
                "attn_k_norm.weight",
                "attn_output.weight",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ]
        };
        names.extend(
            parts
                .iter()
                .map(|p| format!("blk.{l}.{p}"))
                .filter(|n| src.contains(n)),
        );
    }
    for n in names {
        let t = src.get(&n).expect("tensor");
        let gguf_name = n.replace("ffn_gate_up", "ffn_up");
        let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.tensor(
            &gguf_name,
            t.shape.iter().rev().map(|&d| d as u64).collect(),
            GgmlType::F32,
            bytes,
        );
    }
    let out = std::env::temp_dir().join(format!("kiln-arch-{name}-{}.gguf", std::process::id()));
    std::fs::write(&out, w.to_bytes()).expect("write gguf");
    out
}

#[test]
fn gguf_forms_of_qwen2_qwen3_and_phi3_match_transformers() {
    for name in ["qwen2", "qwen3", "phi3"] {
        let path = to_gguf(name);
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir(name).join("golden.json")).unwrap())
                .unwrap();
        let m = load(&CpuBackend::new(), &path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = std::fs::remove_file(&path);
        let vocab = m.decoder.config().vocab_size;
        for p in golden["prompts"].as_array().unwrap() {
            let (all, greedy) = run(&m, &ids(&p["ids"]), 16);
            let want: Vec<f32> = p["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let diff =
                fixtures::max_abs_diff(&format!("{name} (GGUF)"), &all[all.len() - vocab..], &want);
            assert!(diff < LOGIT_TOL, "{name} (GGUF): logits differ by {diff}");
            assert_eq!(greedy, ids(&p["greedy"]), "{name} (GGUF): greedy tokens");
        }
    }
}
