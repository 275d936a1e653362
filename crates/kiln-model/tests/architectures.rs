//! Every supported architecture against Hugging Face `transformers`, on tiny
//! random-weight checkpoints written by `scripts/golden/tiny_models.py`
//! (`testdata/tiny/<arch>/`): the logits of the last prompt position, the
//! argmax of every position, and 16 greedy tokens through the KV cache.

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_backend::StepInput;
use kiln_model::fixtures;
use kiln_model::{load, LoadOptions, LoadedModel};
use serde_json::Value;

/// Both sides compute in f32 from the same weights; what differs is the order
/// of summation.
const LOGIT_TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

/// Prefill (all positions' logits), then greedy decoding one token at a time.
fn run(m: &LoadedModel<CpuBackend>, prompt: &[u32], new_tokens: usize) -> (Vec<f32>, Vec<u32>) {
    let be = CpuBackend::new();
    let (all, mut kv) = fixtures::prefill(&be, &m.decoder, prompt, new_tokens).expect("prefill");
    let vocab = m.decoder.config().vocab_size;
    let mut next = argmax(&all[all.len() - vocab..]);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + new_tokens - 1 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&m.decoder.forward(&be, &mut kv, &step).expect("decode"));
        out.push(next);
    }
    (all, out)
}

fn check(name: &str) {
    let d = dir(name);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).expect("golden.json"))
            .expect("parse golden.json");
    let m = load(&CpuBackend::new(), &d, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let vocab = m.decoder.config().vocab_size;
    let n = golden["new_tokens"].as_u64().expect("new_tokens") as usize;
    for (pi, p) in golden["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .enumerate()
    {
        let prompt = ids(&p["ids"]);
        let (all, greedy) = run(&m, &prompt, n);
        let want: Vec<f32> = p["last_logits"]
            .as_array()
            .expect("last_logits")
            .iter()
            .map(|v| v.as_f64().expect("float") as f32)
            .collect();
        let last = &all[all.len() - vocab..];
        let diff = last
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < LOGIT_TOL,
            "{name} prompt {pi}: last-position logits differ by {diff}"
        );
        let got_argmax: Vec<u32> = all.chunks_exact(vocab).map(argmax).collect();
        assert_eq!(
            got_argmax,
            ids(&p["argmax"]),
            "{name} prompt {pi}: argmax per position"
        );
        assert_eq!(
            greedy,
            ids(&p["greedy"]),
            "{name} prompt {pi}: greedy tokens"
        );
    }
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
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    // bf16 keeps 8 bits of mantissa, f16 11: both move the logits, bf16 more.
    assert!(
        diff(&full, &bf16) > 1e-4 && diff(&full, &bf16) < 0.5,
        "{}",
        diff(&full, &bf16)
    );
    assert!(diff(&full, &f16) > 1e-6 && diff(&full, &f16) < diff(&full, &bf16));
    assert_eq!(full, logits(kiln_model::WeightDtype::F32));
}
