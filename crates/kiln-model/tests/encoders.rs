//! Embedding models against sentence-transformers: the tiny random
//! checkpoints and goldens that `scripts/golden/tiny_encoders.py` writes
//! (`testdata/tiny/{bert,xlmr,qwen3_embed}`): tokenization (prompts and the
//! decoder's EOS included), embeddings within 1e-4 of
//! `SentenceTransformer.encode`, and batches bit-identical to single inputs.

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_model::encoder::{EmbedError, EmbeddingModel, EncoderKind, InputError, Pooling};
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(name)
}

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden json")
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids_at(v, "ids")
}

fn ids_at(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_model(name: &str, kind: EncoderKind, pooling: Pooling, normalize: bool) {
    let be = CpuBackend::new();
    let m = EmbeddingModel::load(&dir(name), &be).expect("load");
    assert_eq!(m.encoder().unwrap().config.kind, kind);
    assert_eq!(m.sentence.pooling, pooling);
    assert_eq!(m.sentence.normalize, normalize);
    let g = golden(name);
    let texts = g["texts"].as_array().unwrap();
    let mut all_ids = Vec::new();
    let mut singles = Vec::new();
    for t in texts {
        let ids = ids_of(t);
        assert_eq!(
            m.tokenize(t["text"].as_str().unwrap()).unwrap(),
            ids,
            "{name}: token ids of {:?}",
            t["text"]
        );
        let got = m.embed(&be, &[&ids]).expect("embed").remove(0);
        let want: Vec<f32> = t["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name} {:?}: max |diff| {diff}", t["text"]);
        if normalize {
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{name}: norm {norm}");
        }
        all_ids.push(ids);
        singles.push(got);
    }
    // Batched: the same bits as one at a time, in any order.
    let refs: Vec<&[u32]> = all_ids.iter().map(|v| v.as_slice()).collect();
    assert_eq!(m.embed(&be, &refs).unwrap(), singles, "{name}: batch");
    let rev: Vec<&[u32]> = refs.iter().rev().copied().collect();
    let mut back = m.embed(&be, &rev).unwrap();
    back.reverse();
    assert_eq!(back, singles, "{name}: reversed batch");
}

#[test]
fn bert_mean_pooling_normalized_matches_sentence_transformers() {
    check_model("bert", EncoderKind::Bert, Pooling::Mean, true);
}

#[test]
fn xlmr_cls_pooling_matches_sentence_transformers() {
    check_model("xlmr", EncoderKind::XlmRoberta, Pooling::Cls, false);
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let be = CpuBackend::new();
    let m = EmbeddingModel::load(&dir("bert"), &be).expect("load");
    let vocab = m.encoder().unwrap().config.vocab_size as u32;
    match m.embed(&be, &[&[2, 3], &[2, vocab]]) {
        Err(EmbedError::Input(InputError::BadToken { index: 1, id, .. })) => assert_eq!(id, vocab),
        other => panic!("expected a bad token error, got {other:?}"),
    }
    let long = vec![5u32; m.max_tokens + 1];
    match m.embed(&be, &[&long]) {
        Err(EmbedError::Input(InputError::TooLong { len, max, .. })) => {
            assert_eq!((len, max), (m.max_tokens + 1, m.max_tokens))
        }
        other => panic!("expected a too-long error, got {other:?}"),
    }
    assert!(matches!(
        m.embed(&be, &[&[]]),
        Err(EmbedError::Input(InputError::Empty { index: 0 }))
    ));
}

#[test]
fn missing_tensor_is_named() {
    let tmp = std::env::temp_dir().join(format!("kiln-enc-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir("bert").join(f), tmp.join(f)).unwrap();
    }
    // A checkpoint with one tensor: every other one is missing.
    let src =
        kiln_model::weights::SafetensorsSource::open_dir(&dir("bert"), |n| Some(n.into())).unwrap();
    use kiln_model::weights::WeightSource;
    let t = src.get("embeddings.word_embeddings.weight").unwrap();
    let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &bytes)
            .unwrap();
    safetensors::serialize_to_file(
        [("embeddings.word_embeddings.weight", view)],
        None,
        &tmp.join("model.safetensors"),
    )
    .unwrap();
    let err = EmbeddingModel::load(&tmp, &CpuBackend::new())
        .err()
        .expect("load must fail");
    assert!(err.to_string().contains("is missing"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bert_cross_encoder_logits_match_transformers() {
    check_cross_encoder("bert_rerank");
}

#[test]
fn xlmr_cross_encoder_logits_match_transformers() {
    check_cross_encoder("xlmr_rerank");
}

fn check_cross_encoder(name: &str) {
    use kiln_model::encoder::CrossEncoder;
    let be = CpuBackend::new();
    let m = CrossEncoder::load(&dir(name), &be).expect("load");
    let g = golden(name);
    let query = g["query"].as_str().unwrap();
    let mut pairs = Vec::new();
    let mut want = Vec::new();
    for p in g["pairs"].as_array().unwrap() {
        let (ids, types) = m
            .encode_pair(query, p["document"].as_str().unwrap())
            .unwrap();
        assert_eq!(ids, ids_of(p));
        let want_types: Vec<u32> = p["type_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(types, want_types);
        pairs.push((ids, types));
        want.push(p["logit"].as_f64().unwrap() as f32);
        // sentence-transformers' CrossEncoder score is the sigmoid of the logit.
        let score = p["score"].as_f64().unwrap() as f32;
        let logit = *want.last().unwrap();
        assert!((1.0 / (1.0 + (-logit).exp()) - score).abs() < 1e-6);
    }
    let got = m.logits(&be, &pairs).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{name}: logit {g} vs {w}");
    }
    // One pair at a time: the same bits.
    for (i, p) in pairs.iter().enumerate() {
        assert_eq!(
            m.logits(&be, std::slice::from_ref(p)).unwrap(),
            vec![got[i]]
        );
    }
}

fn floats_at(v: &Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn qwen3_decoder_embedder_matches_sentence_transformers() {
    let be = CpuBackend::new();
    let m = EmbeddingModel::load(&dir("qwen3_embed"), &be).expect("load");
    assert!(m.encoder().is_none());
    assert_eq!(m.sentence.pooling, Pooling::LastToken);
    assert!(m.sentence.normalize);
    assert_eq!(m.prompts.default.as_deref(), Some("query"));
    assert_eq!(m.dim(), 64);
    let g = golden("qwen3_embed");
    let eos = g["eos"].as_u64().unwrap() as u32;
    let mut all = Vec::new();
    let mut singles = Vec::new();
    for t in g["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        // The default prompt ("query"), then prompt_name "document".
        for (key, name) in [("", None), ("document_", Some("document"))] {
            let ids = m.tokenize(&m.prompted(text, name).unwrap()).unwrap();
            assert_eq!(
                ids,
                ids_at(t, &format!("{key}ids")),
                "ids of {text:?} {name:?}"
            );
            assert_eq!(ids.last(), Some(&eos));
            let got = m.embed(&be, &[&ids]).unwrap().remove(0);
            let d = max_diff(&got, &floats_at(t, &format!("{key}embedding")));
            assert!(d < 1e-4, "{text:?} {name:?}: max |diff| {d}");
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
            all.push(ids);
            singles.push(got);
        }
    }
    let refs: Vec<&[u32]> = all.iter().map(Vec::as_slice).collect();
    assert_eq!(m.embed(&be, &refs).unwrap(), singles, "batch");
    let rev: Vec<&[u32]> = refs.iter().rev().copied().collect();
    let mut back = m.embed(&be, &rev).unwrap();
    back.reverse();
    assert_eq!(back, singles, "reversed batch");
    let e = m.prompted("x", Some("passage")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "prompt_name 'passage' is not one of the model's prompts (document, query)"
    );
}

#[test]
fn decoder_embedder_appends_eos_when_the_tokenizer_does_not() {
    let tmp = std::env::temp_dir().join(format!("kiln-qwen3-noeos-{}", std::process::id()));
    let src = dir("qwen3_embed");
    for sub in ["", "1_Pooling", "2_Normalize"] {
        std::fs::create_dir_all(tmp.join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), tmp.join(sub).join(f.file_name())).unwrap();
            }
        }
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["post_processor"] = Value::Null;
    std::fs::write(tmp.join("tokenizer.json"), tok.to_string()).unwrap();
    let be = CpuBackend::new();
    let m = EmbeddingModel::load(&tmp, &be).expect("load");
    let g = golden("qwen3_embed");
    let t = &g["texts"][1];
    let ids = m
        .tokenize(
            &m.prompted(t["text"].as_str().unwrap(), Some("document"))
                .unwrap(),
        )
        .unwrap();
    assert_eq!(ids, ids_at(t, "document_ids"));
    std::fs::remove_dir_all(&tmp).unwrap();
}
