//! Load-time quantization (`LoadOptions::quantize`) of a random-weight f32
//! safetensors llama whose matrices are whole Q4_K super-blocks (hidden 256,
//! ffn 512): the quantized model's logits stay close to the f32 model's, and
//! greedy decoding agrees with it.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{GgmlType, StepInput};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::{load, LoadOptions, LoadedModel};

fn model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-quantize-{}", std::process::id()));
    let spec = TinySpec {
        hidden: 256,
        ffn: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    fixtures::write_tiny_llama_hf(&dir, &spec, 7).expect("write fixture");
    dir
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32
}

/// Last-position logits of the prompt, then `n` greedy tokens.
fn run(m: &LoadedModel<CpuBackend>, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let be = CpuBackend::new();
    let (all, mut kv) = fixtures::prefill(&be, &m.decoder, prompt, n).expect("prefill");
    let vocab = m.decoder.config().vocab_size;
    let last = all[all.len() - vocab..].to_vec();
    let mut next = argmax(&last);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + n - 1 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&m.decoder.forward(&be, &mut kv, &step).expect("decode"));
        out.push(next);
    }
    (last, out)
}

fn load_as(dir: &Path, quantize: Option<GgmlType>) -> LoadedModel<CpuBackend> {
    let opts = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    load(&CpuBackend::new(), dir, &opts).expect("load")
}

/// Largest logit difference relative to the largest f32 logit (failing on
/// unequal lengths and on any value that is not finite).
#[track_caller]
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let worst = fixtures::max_abs_diff("quantized against f32 logits", b, a);
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "all f32 logits are zero");
    worst / scale
}

#[test]
fn quantized_models_stay_close_to_f32() {
    let dir = model_dir();
    let prompt = [72, 101, 108, 108, 111, 32, 119, 111];
    let (full, full_tokens) = run(&load_as(&dir, None), &prompt, 8);
    let mut diffs = Vec::new();
    for (ty, tol) in [
        (GgmlType::Q8_0, 0.02),
        (GgmlType::Q6K, 0.05),
        (GgmlType::Q4K, 0.15),
        (GgmlType::Q4_0, 0.2),
    ] {
        let (logits, tokens) = run(&load_as(&dir, Some(ty)), &prompt, 8);
        let d = rel_diff(&full, &logits);
        eprintln!(
            "{ty:?}: max |logit diff| / max |logit| = {d:.4}, tokens {tokens:?} vs {full_tokens:?}"
        );
        // Not bit-identical: the weights really were converted.
        assert!(d > 0.0, "{ty:?} left the weights as they were");
        assert!(d <= tol, "{ty:?}: relative logit error {d} above {tol}");
        diffs.push(d);
        if ty == GgmlType::Q8_0 {
            assert_eq!(tokens, full_tokens, "Q8_0 greedy tokens");
        }
    }
    // More bits, closer logits.
    assert!(diffs[0] < diffs[2] && diffs[1] < diffs[2], "{diffs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
