//! Dequantization of every ggml block format kiln reads, against llama.cpp's
//! Python reference (`gguf.quants.dequantize`) on random blocks; the data is
//! written by `scripts/golden/quant_golden.py`.

use kiln_backend::quant::{dequantize, GgmlType};

fn ty(name: &str) -> GgmlType {
    match name {
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q5_0" => GgmlType::Q5_0,
        "Q5_1" => GgmlType::Q5_1,
        "Q8_0" => GgmlType::Q8_0,
        "Q4_K" => GgmlType::Q4K,
        "Q5_K" => GgmlType::Q5K,
        "Q6_K" => GgmlType::Q6K,
        "Q2_K" => GgmlType::Q2K,
        "Q3_K" => GgmlType::Q3K,
        other => panic!("unexpected type {other} in quant_blocks.json"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn dequantization_matches_the_gguf_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/golden/quant_blocks.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read quant_blocks.json"))
            .expect("json");
    let cases = json["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["type"].as_str().expect("type");
        let want: Vec<f32> = case["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_f64().expect("float") as f32)
            .collect();
        let got = dequantize(
            ty(name),
            &hex(case["bytes_hex"].as_str().expect("hex")),
            want.len(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{name} element {i}: {g} vs {w}"
            );
        }
    }
}
