//! YaRN rotary scaling against transformers: the inverse frequencies and
//! attention factor of `_compute_yarn_parameters` and the cos/sin of the
//! models' rotary modules (`testdata/golden/yarn.json`, written by
//! `scripts/golden/yarn_golden.py`), read through kiln's config.json and
//! GGUF parsing and its rotary table (`RopeConfig::table`).

use std::path::{Path, PathBuf};

use kiln_model::config::{DecoderConfig, RopeScaling};
use kiln_model::gguf::{GgufFile, GgufWriter, Value as Gv};
use kiln_model::yarn::YarnScaling;
use serde_json::{json, Value};

fn golden() -> Vec<Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/yarn.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("yarn.json")).unwrap();
    v["cases"].as_array().expect("cases").clone()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// A case's config.json with what the decoder config needs besides rope
/// (gpt-oss's family is wired separately: its rope is read as llama's).
fn config_json(case: &Value) -> Value {
    let mut c = case["config"].clone();
    let o = c.as_object_mut().unwrap();
    if o["model_type"] == "gpt_oss" {
        o.insert("model_type".into(), json!("llama"));
    }
    o.insert("vocab_size".into(), json!(32));
    o.insert("num_hidden_layers".into(), json!(1));
    o.insert("intermediate_size".into(), json!(64));
    c
}

/// Every case, parsed from its config.json: transformers' inverse
/// frequencies (computed there in f32, so within a few f32 ulp) and
/// attention factor, and `RopeConfig::table`'s cos and sin at each position
/// within what torch's f32 angle (position times frequency, rounded to
/// f32) carries: a few ulp of the angle, times the attention factor.
#[test]
fn yarn_tables_match_transformers() {
    for case in golden() {
        let name = case["name"].as_str().unwrap();
        let cfg = DecoderConfig::from_hf_json(&config_json(&case), Path::new("config.json"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let rope = cfg.rope.as_ref().expect("rope");
        let RopeScaling::Yarn(y) = &rope.scaling else {
            panic!("{name}: {:?}", rope.scaling)
        };
        let want_af = case["attention_factor"].as_f64().unwrap();
        assert!(
            (y.attention_factor - want_af).abs() < 1e-12,
            "{name}: {} vs {want_af}",
            y.attention_factor
        );
        let want = floats(&case["inv_freq"]);
        let got = y.inv_freq(rope.theta, rope.rot_dim);
        assert_eq!(got.len(), want.len(), "{name}: frequencies");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 4e-7 * w.abs(),
                "{name}: inv_freq[{i}] {g} vs {w}"
            );
        }
        let positions: Vec<usize> = case["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        let max_pos = positions.iter().max().unwrap() + 1;
        let table = cfg.rope.as_ref().expect("rope").table(max_pos);
        let (rd, half) = (rope.rot_dim, rope.rot_dim / 2);
        for (k, &p) in positions.iter().enumerate() {
            let (cos, sin) = (floats(&case["cos"][k]), floats(&case["sin"][k]));
            let row = &table[p * rd..(p + 1) * rd];
            for i in 0..half {
                let angle = p as f64 * want[i];
                let tol = want_af * (3.0 * angle * f32::EPSILON as f64 + 1e-6);
                let (gc, gs) = (row[i] as f64, row[half + i] as f64);
                assert!(
                    (gc - cos[i]).abs() <= tol,
                    "{name}: cos pos {p} freq {i}: {gc} vs {}",
                    cos[i]
                );
                assert!(
                    (gs - sin[i]).abs() <= tol,
                    "{name}: sin pos {p} freq {i}: {gs} vs {}",
                    sin[i]
                );
            }
        }
        // The attention factor really scales the table (a model whose
        // factor is not 1 must not pass with a plain table).
        if (want_af - 1.0).abs() > 0.01 {
            let c1 = row_norm(&table[rd..2 * rd], half);
            assert!(
                (c1 - want_af).abs() < 1e-5,
                "{name}: |cos, sin| at position 1 = {c1}"
            );
        }
    }
}

/// `sqrt(cos^2 + sin^2)` of a row's first frequency: the attention factor.
fn row_norm(row: &[f32], half: usize) -> f64 {
    ((row[0] as f64).powi(2) + (row[half] as f64).powi(2)).sqrt()
}

/// gpt-oss's ramp is not truncated: with `truncate` (transformers' default,
/// llama.cpp's only way) its frequencies come out measurably different, so
/// the flag is read and used.
#[test]
fn gpt_oss_ramp_is_not_truncated() {
    let case = golden()
        .into_iter()
        .find(|c| c["name"] == "gpt_oss")
        .unwrap();
    let cfg = DecoderConfig::from_hf_json(&config_json(&case), Path::new("config.json")).unwrap();
    let rope = cfg.rope.unwrap();
    let RopeScaling::Yarn(y) = rope.scaling else {
        panic!()
    };
    assert!(!y.truncate);
    let truncated = YarnScaling {
        truncate: true,
        ..y.clone()
    };
    let (a, b) = (
        y.inv_freq(rope.theta, rope.rot_dim),
        truncated.inv_freq(rope.theta, rope.rot_dim),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x)
        .fold(0f64, f64::max);
    assert!(
        worst > 0.01,
        "truncating changed the frequencies by only {worst}"
    );
}

/// A qwen2 GGUF with llama.cpp's yarn keys (as convert_hf_to_gguf.py writes
/// them from the config.json) gives the same table as the config.json,
/// bit for bit.
#[test]
fn gguf_yarn_keys_give_the_config_json_table() {
    let case = golden()
        .into_iter()
        .find(|c| c["name"] == "qwen2_yarn")
        .unwrap();
    let hf = DecoderConfig::from_hf_json(&config_json(&case), Path::new("config.json")).unwrap();
    let c = &case["config"];
    let u = |k: &str| Gv::U32(c[k].as_u64().unwrap() as u32);
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Gv::String("qwen2".into()))
        .meta("qwen2.block_count", Gv::U32(1))
        .meta("qwen2.context_length", u("max_position_embeddings"))
        .meta("qwen2.embedding_length", u("hidden_size"))
        .meta("qwen2.feed_forward_length", Gv::U32(64))
        .meta("qwen2.attention.head_count", u("num_attention_heads"))
        .meta("qwen2.attention.head_count_kv", u("num_key_value_heads"))
        .meta("qwen2.rope.freq_base", Gv::F32(1e6))
        .meta("qwen2.vocab_size", Gv::U32(32))
        .meta("qwen2.rope.scaling.type", Gv::String("yarn".into()))
        .meta("qwen2.rope.scaling.factor", Gv::F32(4.0))
        .meta("qwen2.rope.scaling.original_context_length", Gv::U32(32768));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, w.to_bytes()).unwrap();
    let g = DecoderConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(
        g.rope.as_ref().unwrap().scaling,
        hf.rope.as_ref().unwrap().scaling
    );
    let (a, b) = (
        g.rope.as_ref().unwrap().table(300),
        hf.rope.as_ref().unwrap().table(300),
    );
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));

    // A yarn file without its factor is refused with the key's name.
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Gv::String("qwen2".into()))
        .meta("qwen2.block_count", Gv::U32(1))
        .meta("qwen2.context_length", Gv::U32(4096))
        .meta("qwen2.embedding_length", Gv::U32(64))
        .meta("qwen2.feed_forward_length", Gv::U32(64))
        .meta("qwen2.attention.head_count", Gv::U32(4))
        .meta("qwen2.vocab_size", Gv::U32(32))
        .meta("qwen2.rope.scaling.type", Gv::String("yarn".into()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let e = DecoderConfig::from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("qwen2.rope.scaling.factor"), "{e}");
}

/// llama.cpp's GGUF attention-factor keys: `yarn_log_multiplier` as
/// `mscale_all_dim` (with `mscale` 1), an explicit `yarn_attn_factor`, and
/// `attn_factor` multiplying either; and config.json's DeepSeek-style
/// factor from the ratio of the contexts when `factor` is null.
#[test]
fn attention_factor_sources() {
    let f = 40f64;
    let m = |s: f64| 0.1 * s * f.ln() + 1.0;
    assert!(
        (kiln_model::yarn::default_attention_factor(f, Some(1.0), Some(0.707)) - m(1.0) / m(0.707))
            .abs()
            < 1e-15
    );
    assert_eq!(
        kiln_model::yarn::default_attention_factor(f, Some(1.0), Some(0.0)),
        m(1.0)
    );
    assert_eq!(
        kiln_model::yarn::default_attention_factor(0.5, None, None),
        1.0
    );
    let cfg = json!({"max_position_embeddings": 163840});
    let y = YarnScaling::from_hf(
        &json!({"rope_type": "yarn", "factor": null, "original_max_position_embeddings": 4096}),
        &cfg,
    )
    .unwrap();
    assert_eq!(y.factor, 40.0);
    assert!((y.attention_factor - m(1.0)).abs() < 1e-15);
    let e = YarnScaling::from_hf(&json!({"rope_type": "yarn", "factor": -2.0}), &cfg).unwrap_err();
    assert!(e.contains("not a positive number"), "{e}");
    let e = YarnScaling::from_hf(
        &json!({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}),
        &cfg,
    )
    .unwrap_err();
    assert!(e.contains("truncate"), "{e}");
}

/// The tiny gpt-oss checkpoint's config.json (`testdata/tiny/gpt_oss`,
/// written by `scripts/golden/tiny_gpt_oss.py`, transformers 5's
/// `rope_parameters` spelling) gives YaRN with its parameters, and the
/// family's own fields read as transformers wrote them.
#[test]
fn tiny_gpt_oss_config_reads() {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny/gpt_oss/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // The family itself is wired elsewhere: its rope reads as llama's.
    cfg["model_type"] = json!("llama");
    let c = DecoderConfig::from_hf_json(&cfg, &p).unwrap();
    let rope = c.rope.unwrap();
    assert_eq!(rope.theta, 150000.0);
    let RopeScaling::Yarn(y) = rope.scaling else {
        panic!("{:?}", rope.scaling)
    };
    assert_eq!(
        (y.factor, y.original_max_position, y.truncate),
        (4.0, 64.0, false)
    );
    assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    assert_eq!(
        kiln_model::gpt_oss::clamped_swiglu(&cfg).unwrap(),
        kiln_backend::Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 0.5
        }
    );
    assert_eq!(
        kiln_model::gpt_oss::layer_windows(&cfg, 2).unwrap(),
        [Some(8), None]
    );
}
