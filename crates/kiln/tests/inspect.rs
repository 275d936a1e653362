//! `kiln inspect` answers the sizing question from a config alone.

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

#[test]
fn opt_13b_needs_25_7_gb_of_bf16_weights() {
    let (ok, out) = inspect(&[
        "testdata/configs/opt-13b",
        "--dtype",
        "bf16",
        "--memory",
        "16GiB",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("architecture:  opt"), "{out}");
    assert!(out.contains("weights:       25.7 GB in bf16"), "{out}");
    assert!(out.contains("does not fit in 16GiB"), "{out}");

    let (ok, out) = inspect(&[
        "testdata/configs/opt-13b/config.json",
        "--dtype",
        "bf16",
        "--memory",
        "32GiB",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("fits in 32GiB"), "{out}");

    let (ok, out) = inspect(&[
        "testdata/configs/opt-13b",
        "--dtype",
        "bf16",
        "--memory",
        "32GiB",
        "--json",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["parameters"], 12_853_473_280u64);
    assert_eq!(v["fits"], true);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let (ok, out) = inspect(&["testdata/configs/opt-13b", "--memory", "lots"]);
    assert!(!ok && out.contains("--memory 'lots'"), "{out}");
    let (ok, out) = inspect(&["testdata/configs/does-not-exist"]);
    assert!(!ok && out.contains("does-not-exist"), "{out}");
}

#[test]
fn no_argument_inspects_the_default_model_with_the_cpu_kv_size() {
    let (ok, out) = inspect(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("SmolLM2-135M-Instruct"), "{out}");
    // The CPU backend keeps the KV cache in f16 by default: 30 layers x 3
    // KV heads x 64 x 2 (K and V) x 2 bytes = 23,040 bytes a token, 23.6 MB
    // per 1K tokens (47.2 MB, 32-bit, while the cache was f32).
    assert!(out.contains("23.6 MB per 1K tokens (16-bit)"), "{out}");
}
