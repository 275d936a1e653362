//! kiln's quantizers against llama.cpp's Python reference
//! (`gguf.quants.quantize`): the same f32 rows must give the same block
//! bytes. The data is written by `scripts/golden/quantize_golden.py`.

use kiln_backend::quant::GgmlType;
use kiln_backend::quantize::quantize;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn blocks_match_the_gguf_reference_byte_for_byte() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/golden/quantize_blocks.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read quantize_blocks.json"))
            .expect("json");
    let cols = json["cols"].as_u64().expect("cols") as usize;
    let x: Vec<f32> = hex(json["input_f32_hex"].as_str().expect("input"))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let cases = json["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["type"].as_str().expect("type");
        let ty = match name {
            "Q8_0" => GgmlType::Q8_0,
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            other => panic!("unexpected type {other}"),
        };
        let want = hex(case["bytes_hex"].as_str().expect("bytes"));
        let got = quantize(ty, &x, cols).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.len(), want.len(), "{name}");
        let (_, block) = ty.block();
        for (i, (g, w)) in got.chunks(block).zip(want.chunks(block)).enumerate() {
            assert_eq!(g, w, "{name} block {i}");
        }
    }
}
