//! `kiln bench --dummy-weights --arch NAME` (issue 25): a published shape
//! with random weights and no file runs through the engine end to end, and
//! `--bandwidth` measures the read bandwidth the decode floor divides.

mod support;

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    // The tokenizer is the default model's: fail with how to fetch it.
    support::model_file();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_MODEL")
        .env("KILN_LAYOUT_CACHE", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run kiln: {e}"))
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

const SMALL_RUN: &[&str] = &[
    "--prompt-tokens",
    "16",
    "--gen-tokens",
    "4",
    "--repeats",
    "1",
    "--concurrency",
    "2",
    "--batch-prompt-tokens",
    "8",
    "--batch-gen-tokens",
    "3",
    "--json",
];

/// The tiny shape in Q8_0: every measurement runs and produces tokens, the
/// parameter count is the shape's, and the bytes a token reads are its
/// matrices in Q8_0 (34 bytes per 32 weights; the untied embedding not
/// read) plus its f32 norms.
#[test]
fn the_tiny_shape_runs_end_to_end_in_q8_0() {
    let mut args = vec![
        "bench",
        "--dummy-weights",
        "--arch",
        "tiny",
        "--quantize",
        "q8_0",
    ];
    args.extend_from_slice(SMALL_RUN);
    let v = json(&kiln(&args));
    assert_eq!(v["params"].as_u64(), Some(26_346_752), "{v}");
    assert_eq!(v["dummy_arch"].as_str(), Some("tiny"), "{v}");
    // 2 layers of q, k, v, o, gate, up, down, and the output head.
    let matrices = 2 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 512) + 49152 * 256;
    let norms = (2 * 2 * 256 + 256) * 4;
    assert_eq!(
        v["decode_bytes_per_token"].as_u64(),
        Some((matrices / 32 * 34 + norms) as u64),
        "{v}"
    );
    for key in ["prompt_tok_s", "decode_tok_s"] {
        let x = v[key].as_f64().unwrap_or(0.0);
        assert!(x.is_finite() && x > 0.0, "{key}: {v}");
    }
    let conc = &v["concurrency"][0];
    assert_eq!(conc["concurrency"].as_u64(), Some(2), "{v}");
    assert!(conc["output_tok_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    assert!(v["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
}

/// The other families' paths: OPT (learned positions, biases, layer
/// norms, tied head) and a mixture of experts (stacked experts, router,
/// q/k norms), each in a 4-bit format, with their parameter counts.
#[test]
fn opt_and_moe_shapes_run_end_to_end() {
    for (arch, quantize, params) in [
        ("tiny-opt", "q4_0", 14_449_152),
        ("tiny-moe", "q4_k_m", 27_137_536),
    ] {
        let mut args = vec![
            "bench",
            "--dummy-weights",
            "--arch",
            arch,
            "--quantize",
            quantize,
        ];
        args.extend_from_slice(SMALL_RUN);
        let v = json(&kiln(&args));
        assert_eq!(v["params"].as_u64(), Some(params), "{arch}: {v}");
        assert!(
            v["decode_tok_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{arch}: {v}"
        );
        assert!(
            v["prompt_tok_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{arch}: {v}"
        );
    }
}

/// Float weights by default (f16) and with `--dtype bf16`: the tiny
/// shape's matrices at two bytes a weight.
#[test]
fn the_tiny_shape_runs_in_16_bit_floats() {
    for dtype in [None, Some("bf16")] {
        let mut args = vec!["bench", "--dummy-weights", "--arch", "tiny"];
        if let Some(d) = dtype {
            args.extend_from_slice(&["--dtype", d]);
        }
        args.extend_from_slice(SMALL_RUN);
        let v = json(&kiln(&args));
        let matrices = 2 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 512) + 49152 * 256;
        let norms = (2 * 2 * 256 + 256) * 4;
        assert_eq!(
            v["decode_bytes_per_token"].as_u64(),
            Some((matrices * 2 + norms) as u64),
            "{dtype:?}: {v}"
        );
        assert!(v["decode_tok_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    }
}

/// Bad uses are refused with what to do.
#[test]
fn unknown_shapes_and_a_model_beside_them_are_refused() {
    let o = kiln(&["bench", "--dummy-weights", "--arch", "llama9"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no such shape; use one of tiny, tiny-opt, tiny-moe, smollm2-135m"),
        "{err}"
    );
    let o = kiln(&[
        "bench",
        "--dummy-weights",
        "--arch",
        "tiny",
        "--model",
        "x.gguf",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("leave out --model"), "{err}");
    let o = kiln(&["bench", "--dummy-weights"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--arch"));
}

/// `--bandwidth` measures without loading a model.
#[test]
fn bandwidth_is_measured_on_the_threads_asked_for() {
    let v = json(&kiln(&[
        "bench",
        "--bandwidth",
        "--bandwidth-mib",
        "64",
        "--threads",
        "1",
        "--json",
    ]));
    assert_eq!(v["threads"].as_u64(), Some(1), "{v}");
    assert_eq!(v["bytes"].as_u64(), Some(64 << 20), "{v}");
    let best = v["bandwidth_gb_s"].as_f64().unwrap_or(0.0);
    assert!(best > 0.1, "{v}");
    // Each way of asking ahead is reported, and the headline is their best.
    let ways: Vec<f64> = ["plain_gb_s", "near_gb_s", "near_and_far_gb_s"]
        .iter()
        .map(|k| v[*k].as_f64().unwrap_or(0.0))
        .collect();
    assert!(ways.iter().all(|&w| w > 0.1 && w <= best), "{v}");
    assert!(ways.contains(&best), "{v}");
}
