//! Every weight format the CPU backend computes with, end to end: a tiny
//! random-weight model whose matrices are stored in that format gives the
//! logits of its twin whose matrices are the same values stored as F32.

use kiln_backend::cpu::CpuBackend;
use kiln_backend::quant::WEIGHT_FORMATS;
use kiln_backend::GgmlType;
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::{load, LoadOptions};

/// Rows of 256 so that the super-block formats (Q2_K..Q6_K) fit every matrix.
const SPEC: TinySpec = TinySpec {
    hidden: 256,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    ffn: 512,
    max_positions: 512,
    tied: false,
};

fn logits(bytes: Vec<u8>, tag: &str, tokens: &[u32]) -> Vec<f32> {
    let path = std::env::temp_dir().join(format!("kiln-formats-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let be = CpuBackend::new();
    let m = load(&be, &path, &LoadOptions::default()).unwrap();
    let out = fixtures::prefill(&be, &m.decoder, tokens, 0).unwrap().0;
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn every_format_gives_the_logits_of_its_dequantized_twin() {
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 % 256) as u32).collect();
    for ty in WEIGHT_FORMATS {
        let tag = format!("{ty:?}");
        let native = logits(
            fixtures::tiny_llama_gguf_in_format(&SPEC, 5, ty, false),
            &tag,
            &tokens,
        );
        let twin = logits(
            fixtures::tiny_llama_gguf_in_format(&SPEC, 5, ty, true),
            &format!("{tag}-f32"),
            &tokens,
        );
        // (Fails on any NaN or infinity on either side, and on unequal lengths.)
        let worst = fixtures::max_abs_diff(&tag, &native, &twin);
        let scale = twin.iter().fold(0f32, |a, v| a.max(v.abs()));
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            // Float formats widen to f32 exactly and compute the same sequence.
            assert_eq!(worst, 0.0, "{ty:?}: logits differ from the F32 twin");
        } else {
            // Block formats multiply 16-bit activations: each within 1/65534
            // of its block's largest value, so logits move by ~1e-4 relative.
            assert!(
                worst <= 1e-3 * scale.max(1.0),
                "{ty:?}: logits differ by {worst} (largest logit {scale})"
            );
        }
        assert!(scale > 0.0, "{ty:?}");
    }
}
