//! Every supported architecture against Hugging Face `transformers`, on tiny
//! random-weight checkpoints written by `scripts/golden/tiny_models.py`
//! (`testdata/tiny/<arch>/`): the logits of the last prompt position, the
//! argmax of every position, and 16 greedy tokens through the KV cache.

use kiln_backend::cpu::CpuBackend;
use kiln_model::fixtures;
use kiln_model::goldens::{check_loaded, run, tiny_dir as dir};
use kiln_model::tiny_gguf;
use kiln_model::{load, LoadOptions};

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
    use kiln_model::weights::{hf_llama_names, SafetensorsSource, WeightSource};
    let d = dir(name);
    let cfg =
        kiln_model::config::DecoderConfig::from_hf_config(&d.join("config.json")).expect("config");
    let src = SafetensorsSource::open_dir(&d, hf_llama_names).expect("safetensors");
    let mut w = GgufWriter::default();
    tiny_gguf::write_hparams(&mut w, name, &cfg);
    tiny_gguf::write_rope(&mut w, name, &cfg);
    if name == "phi3" {
        w.meta(&format!("{name}.attention.sliding_window"), G::U32(0));
    }
    tiny_gguf::write_gpt2_vocab(&mut w, &d, cfg.vocab_size);
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
        tiny_gguf::put_f32(
            &mut w,
            &n.replace("ffn_gate_up", "ffn_up"),
            &t.shape,
            &t.data,
        );
    }
    tiny_gguf::write_temp(&w, &format!("arch-{name}"))
}

#[test]
fn gguf_forms_of_qwen2_qwen3_and_phi3_match_transformers() {
    for name in ["qwen2", "qwen3", "phi3"] {
        let path = to_gguf(name);
        let m = load(&CpuBackend::new(), &path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = std::fs::remove_file(&path);
        // Last-position logits within LOGIT_TOL, every position's argmax
        // (near ties aside) and the greedy tokens.
        check_loaded(name, &m, "GGUF");
    }
}
