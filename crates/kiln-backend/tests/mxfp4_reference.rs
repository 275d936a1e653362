//! MXFP4 against llama.cpp's Python reference (`gguf.quants`): its
//! dequantization value for value, its quantizer byte for byte, and the CPU
//! backend's products over MXFP4 weights against the dequantized matrix's
//! f32 product. The data is written by `scripts/golden/mxfp4_golden.py`.

use kiln_backend::cpu::{CpuBackend, CpuTensor};
use kiln_backend::quant::{dequantize, mxfp4, GgmlType};
use kiln_backend::{Backend, WeightData};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn f32s(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn golden() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/golden/mxfp4.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read mxfp4.json")).expect("json")
}

/// Every value (products of a small integer and a power of two, subnormal
/// scales included) is the reference's exactly.
#[test]
fn dequantization_matches_the_gguf_reference_exactly() {
    let g = golden();
    let case = &g["dequantize"];
    let bytes = hex(case["bytes_hex"].as_str().expect("bytes"));
    let want = f32s(case["values_hex"].as_str().expect("values"));
    assert_eq!(want.len(), 8 * 32);
    let got = dequantize(GgmlType::MXFP4, &bytes, want.len()).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "element {i}: {a} vs {b}");
    }
}

/// The same rows give the same blocks: exponents, nearest codes and ties.
#[test]
fn quantization_matches_the_gguf_reference_byte_for_byte() {
    let g = golden();
    let case = &g["quantize"];
    let cols = case["cols"].as_u64().expect("cols") as usize;
    let x = f32s(case["input_f32_hex"].as_str().expect("input"));
    let want = hex(case["bytes_hex"].as_str().expect("bytes"));
    let got = mxfp4::quantize(&x, cols).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got
        .chunks(mxfp4::BLOCK_BYTES)
        .zip(want.chunks(mxfp4::BLOCK_BYTES))
        .enumerate()
    {
        assert_eq!(a, b, "block {i}");
    }
}

/// `linear` over MXFP4 weights (repacked, as loading does) is the f32
/// product of the dequantized weights within the 8/16-bit activation
/// quantization's error, for a decode row and for prompt batches; also
/// for weights so small that every block's exponent is 0 or 1, whose
/// scales (2^-128, 2^-127) are subnormal floats.
#[test]
fn linear_over_mxfp4_matches_dequantize_then_f32() {
    let (n, k) = (70, 192);
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let be = CpuBackend::new();
    for (magnitude, exponents) in [(0.1f32, 100..=127u8), (2f32.powi(-124), 0..=1)] {
        // Every other block twice as large: both exponents of the tiny case.
        let w: Vec<f32> = (0..n * k)
            .map(|t| rand() * magnitude * (1 + t / 32 % 2) as f32)
            .collect();
        let bytes = mxfp4::quantize(&w, k).unwrap();
        for b in bytes.chunks_exact(mxfp4::BLOCK_BYTES) {
            assert!(exponents.contains(&b[0]), "exponent {}", b[0]);
        }
        let wd = dequantize(GgmlType::MXFP4, &bytes, n * k).unwrap();
        let weight = be
            .upload_weight(
                n,
                k,
                WeightData::Ggml {
                    ty: GgmlType::MXFP4,
                    bytes: bytes.into(),
                },
            )
            .unwrap();
        for m in [1usize, 5, 17] {
            let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let y = be
                .linear(
                    &CpuTensor::new(vec![m, k], x.clone()).unwrap(),
                    &weight,
                    None,
                )
                .unwrap();
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                for j in 0..n {
                    let row = &wd[j * k..(j + 1) * k];
                    let want: f32 = row.iter().zip(xi).map(|(a, b)| a * b).sum();
                    let mag: f32 = row.iter().zip(xi).map(|(a, b)| (a * b).abs()).sum();
                    assert!(mag > 0.0);
                    let got = y.data[i * n + j];
                    assert!(
                        (got - want).abs() <= 1e-2 * mag,
                        "magnitude {magnitude}, m {m}, row {i}, column {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
