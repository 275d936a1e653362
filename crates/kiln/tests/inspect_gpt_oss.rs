//! `kiln inspect` on gpt-oss-20b's published config.json
//! (`testdata/configs/gpt-oss-20b`): total and active parameters counted
//! with gpt-oss's biases (attention, router, experts) and attention sinks.

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

/// OpenAI's model card: gpt-oss-20b has 20.91B parameters, 3.61B active.
/// The card's active count leaves out the token embedding table (a token
/// reads one row of it); kiln's active count, as for Qwen3-30B-A3B and
/// Mixtral, includes it: 3.61B + 201088 x 2880.
#[test]
fn gpt_oss_20b_gives_its_published_total_and_active_parameters() {
    let (ok, out) = inspect(&["testdata/configs/gpt-oss-20b", "--dtype", "bf16", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["parameters"], 20_914_757_184u64);
    let active = v["active_parameters"].as_u64().unwrap();
    let embedding = 201_088u64 * 2880;
    assert_eq!(active, 3_608_307_264 + embedding);
    assert_eq!(v["experts"], 32);
    assert_eq!(v["experts_per_token"], 4);
    let (ok, out) = inspect(&["testdata/configs/gpt-oss-20b", "--dtype", "bf16"]);
    assert!(ok, "{out}");
    assert!(out.contains("parameters:    20.91B"), "{out}");
    assert!(
        out.contains(
            "experts:       32 per MoE layer (24 of 24 layers), 4 per token, FFN 2880 each"
        ),
        "{out}"
    );
}
