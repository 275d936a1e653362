//! gpt-oss's MXFP4 experts from safetensors: the blocks/scales pair moved
//! into ggml's MXFP4 blocks decodes to exactly the weights transformers
//! decodes from it (`convert_moe_packed_tensors`, data written by
//! `scripts/golden/mxfp4_golden.py`), and `SafetensorsSource` reads the
//! pair from a checkpoint file.

use kiln_backend::quant::dequantize;
use kiln_backend::{GgmlType, WeightData};
use kiln_model::mxfp4::experts_from_hf;
use kiln_model::weights::SafetensorsSource;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect()
}

/// The golden pair: blocks, their shape, scales, their shape, and
/// transformers' weights `[experts, cols, rows]` with their shape.
#[allow(clippy::type_complexity)]
fn golden() -> (
    Vec<u8>,
    Vec<usize>,
    Vec<u8>,
    Vec<usize>,
    Vec<f32>,
    Vec<usize>,
) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/golden/mxfp4.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read mxfp4.json"))
            .expect("json");
    let hf = &json["hf"];
    let w = hex(hf["weight_hex"].as_str().expect("weights"))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (
        hex(hf["blocks_hex"].as_str().expect("blocks")),
        shape(&hf["blocks_shape"]),
        hex(hf["scales_hex"].as_str().expect("scales")),
        shape(&hf["scales_shape"]),
        w,
        shape(&hf["weight_shape"]),
    )
}

/// Each expert's matrix, dequantized by the MXFP4 row of the format table,
/// is transformers' weight (transposed back to rows x cols) exactly.
fn check_against_transformers(experts: &[WeightData], rows: usize, cols: usize) {
    let (_, _, _, _, want, wshape) = golden();
    assert_eq!(wshape, vec![experts.len(), cols, rows]);
    for (e, w) in experts.iter().enumerate() {
        let WeightData::Ggml { ty, bytes } = w else {
            panic!("expert {e} is not block data")
        };
        assert_eq!(*ty, GgmlType::MXFP4);
        let got = dequantize(GgmlType::MXFP4, bytes, rows * cols).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let a = got[r * cols + c];
                let b = want[(e * cols + c) * rows + r];
                // Exactly equal (E2M1's -0 decodes to +0 in ggml's table).
                assert!(a == b, "expert {e} row {r} column {c}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn hf_blocks_and_scales_decode_as_transformers_decodes_them() {
    let (blocks, bshape, scales, sshape, _, _) = golden();
    let m = experts_from_hf(&blocks, &bshape, &scales, &sshape).unwrap();
    assert_eq!(
        (m.rows, m.cols, m.experts.len()),
        (bshape[1], bshape[2] * 32, bshape[0])
    );
    check_against_transformers(&m.experts, m.rows, m.cols);
}

/// A checkpoint holding the pair (as `U8` tensors, beside a float one)
/// gives the same matrices through `SafetensorsSource`; a float tensor
/// under the name, a pair of the wrong shape and a missing pair are
/// refused, naming the tensor and what is wrong.
#[test]
fn safetensors_source_reads_the_pair() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let (blocks, bshape, scales, sshape, _, _) = golden();
    let floats = vec![0u8; 4 * 16];
    let views = vec![
        (
            "model.layers.0.mlp.experts.down_proj_blocks".to_string(),
            TensorView::new(Dtype::U8, bshape.clone(), &blocks).unwrap(),
        ),
        (
            "model.layers.0.mlp.experts.down_proj_scales".to_string(),
            TensorView::new(Dtype::U8, sshape.clone(), &scales).unwrap(),
        ),
        (
            "bad_blocks".to_string(),
            TensorView::new(Dtype::F32, vec![16], &floats).unwrap(),
        ),
        (
            "bad_scales".to_string(),
            TensorView::new(Dtype::U8, vec![1], &floats[..1]).unwrap(),
        ),
        (
            "flat_blocks".to_string(),
            TensorView::new(Dtype::U8, vec![16], &floats[..16]).unwrap(),
        ),
        (
            "flat_scales".to_string(),
            TensorView::new(Dtype::U8, vec![1], &floats[..1]).unwrap(),
        ),
    ];
    let dir = std::env::temp_dir().join(format!("kiln-mxfp4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let src = SafetensorsSource::open_dir(&dir, |n| Some(n.to_string())).unwrap();
    let m = src
        .mxfp4_experts("model.layers.0.mlp.experts.down_proj")
        .unwrap();
    check_against_transformers(&m.experts, m.rows, m.cols);
    let err = src.mxfp4_experts("bad").unwrap_err().to_string();
    assert!(err.contains("must be U8, not F32"), "{err}");
    let err = src.mxfp4_experts("flat").unwrap_err().to_string();
    assert!(
        err.contains("flat_blocks") && err.contains("[16] is not [..., rows, cols / 32, 16]"),
        "{err}"
    );
    let err = src.mxfp4_experts("missing").unwrap_err().to_string();
    assert!(
        err.contains("required tensor 'missing_scales' is missing"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
