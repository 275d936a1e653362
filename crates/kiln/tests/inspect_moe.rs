//! `kiln inspect` on mixture-of-experts models: total parameters (every
//! expert), active parameters (the experts one token reads), and the
//! memory each needs.

use std::process::Command;

fn inspect(args: &[&str]) -> (bool, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("inspect")
        .args(args)
        .current_dir(root)
        .output()
        .expect("run kiln inspect");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out) = inspect(&a);
    assert!(ok, "{out}");
    serde_json::from_str(out.trim()).expect("json")
}

/// The published totals: Qwen3-30B-A3B 30.5B parameters, 3.3B active;
/// Mixtral-8x7B 46.7B, 12.9B active.
#[test]
fn published_moe_configs_give_their_total_and_active_parameters() {
    let v = json(&["testdata/configs/qwen3-30b-a3b", "--dtype", "bf16"]);
    assert_eq!(v["parameters"], 30_532_122_624u64);
    assert_eq!(v["active_parameters"], 3_353_032_704u64);
    assert_eq!(v["experts"], 128);
    assert_eq!(v["experts_per_token"], 8);
    assert_eq!(v["weight_bytes"], 2 * 30_532_122_624u64);
    let active = v["active_weight_bytes"].as_u64().unwrap();
    assert!(active.abs_diff(2 * 3_353_032_704) <= 1, "{active}");

    let v = json(&["testdata/configs/mixtral-8x7b", "--dtype", "bf16"]);
    assert_eq!(v["parameters"], 46_702_792_704u64);
    assert_eq!(v["active_parameters"], 12_879_925_248u64);

    let (ok, out) = inspect(&[
        "testdata/configs/qwen3-30b-a3b",
        "--dtype",
        "bf16",
        "--memory",
        "48GiB",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("parameters:    30.53B"), "{out}");
    assert!(
        out.contains(
            "experts:       128 per MoE layer (48 of 48 layers), 8 per token, FFN 768 each"
        ),
        "{out}"
    );
    assert!(
        out.contains("active:        3.35B parameters per token"),
        "{out}"
    );
    assert!(out.contains("weights:       61.1 GB in bf16"), "{out}");
    assert!(
        out.contains("per token:     6.7 GB of weights read"),
        "{out}"
    );
    assert!(out.contains("does not fit in 48GiB"), "{out}");
}

/// The tiny checkpoints: the count is the file's tensors (golden.json's
/// `n_params`), the stored bytes are the file's, and the active share is
/// the top-2 experts' of 8 (4 for Qwen2-MoE, plus its shared expert).
#[test]
fn tiny_moe_checkpoints_report_file_sizes_and_active_shares() {
    for name in ["qwen3moe", "mixtral", "qwen2moe"] {
        let dir = format!("testdata/tiny/{name}");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("../../{dir}/golden.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let v = json(&[&dir]);
        let total = v["parameters"].as_u64().unwrap();
        assert_eq!(total, golden["n_params"].as_u64().unwrap(), "{name}");
        let active = v["active_parameters"].as_u64().unwrap();
        let (experts, ff) = (v["experts"].as_u64().unwrap(), 32u64);
        assert_eq!(total - active, 2 * (experts - 2) * 3 * 64 * ff, "{name}");
        assert_eq!(v["shared_expert"], name == "qwen2moe", "{name}");
        // f32 weights: 4 bytes a parameter, and the active share of them.
        assert_eq!(v["weight_bytes"], 4 * total, "{name}");
        let ab = v["active_weight_bytes"].as_u64().unwrap();
        assert!(ab.abs_diff(4 * active) <= 1, "{name}: {ab}");
    }
}

/// A dense model has no expert lines, and its active count is its total.
#[test]
fn dense_models_report_every_parameter_as_active() {
    let v = json(&["testdata/configs/opt-13b", "--dtype", "bf16"]);
    assert_eq!(v["active_parameters"], v["parameters"]);
    assert!(v["experts"].is_null());
    let (ok, out) = inspect(&["testdata/configs/opt-13b", "--dtype", "bf16"]);
    assert!(
        ok && !out.contains("experts:") && !out.contains("per token:"),
        "{out}"
    );
}
