//! Loading models from disk: both checkpoint formats give the same model, and
//! every kind of broken file is a clear error naming the file (and tensor).

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::gguf::{GgufWriter, Value};
use kiln_model::{load, LoadOptions, LoadedModel};

/// A fresh temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-load-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(path: &Path) -> String {
    match load(&CpuBackend::new(), path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded, but should have failed", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Logits of every position of `tokens`, one forward step.
fn all_logits(m: &LoadedModel<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    fixtures::prefill(&CpuBackend::new(), &m.decoder, tokens, 0)
        .unwrap()
        .0
}

#[test]
fn gguf_and_safetensors_forms_of_one_model_give_the_same_logits() {
    let dir = TempDir::new("same");
    let spec = TinySpec::default();
    let gguf = dir.0.join("tiny.gguf");
    fixtures::write_tiny_llama_gguf(&gguf, &spec, 7).unwrap();
    let hf = dir.0.join("hf");
    fixtures::write_tiny_llama_hf(&hf, &spec, 7).unwrap();
    let be = CpuBackend::new();
    let a = load(&be, &gguf, &LoadOptions::default()).unwrap();
    let b = load(&be, &hf, &LoadOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 256) as u32).collect();
    let (la, lb) = (all_logits(&a, &tokens), all_logits(&b, &tokens));
    assert_eq!(la.len(), tokens.len() * fixtures::VOCAB);
    let max_diff = fixtures::max_abs_diff("GGUF against HF logits", &la, &lb);
    assert!(
        max_diff < 1e-4,
        "GGUF (interleaved rope) and HF (half-split rope) differ by {max_diff}"
    );
    // The logits depend on position, so rope is actually doing something.
    assert!(la[..fixtures::VOCAB] != la[fixtures::VOCAB..2 * fixtures::VOCAB]);
    assert!(a.eos_ids.contains(&fixtures::EOS_ID), "{:?}", a.eos_ids);
    assert!(b.eos_ids.contains(&fixtures::EOS_ID), "{:?}", b.eos_ids);
}

#[test]
fn not_a_gguf_file_is_named() {
    let dir = TempDir::new("magic");
    let p = dir.0.join("model.gguf");
    std::fs::write(&p, b"this is not a model at all").unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("model.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
}

#[test]
fn truncated_gguf_names_the_tensor_that_runs_past_the_end() {
    let dir = TempDir::new("trunc");
    let p = dir.0.join("cut.gguf");
    let bytes = fixtures::tiny_llama_gguf_bytes(&TinySpec::default(), 1);
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    assert!(e.contains("tensor '"), "should name a tensor: {e}");
    // Cut inside the header: still an error, not a panic.
    std::fs::write(&p, &bytes[..300]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}

/// Rewrites the fixture's GGUF with one tensor changed or dropped.
fn gguf_with(dir: &Path, name: &str, edit: impl Fn(&str, Vec<u64>) -> Option<Vec<u64>>) -> PathBuf {
    let src = dir.join("src.gguf");
    fixtures::write_tiny_llama_gguf(&src, &TinySpec::default(), 3).unwrap();
    let f = kiln_model::gguf::GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::default();
    for (k, v) in &f.metadata {
        w.meta(k, v.clone());
    }
    for (tname, info) in &f.tensors {
        let Some(dims) = edit(tname, info.dims.clone()) else {
            continue;
        };
        let numel: u64 = dims.iter().product();
        w.tensor(tname, dims, info.ggml_type, vec![0u8; numel as usize * 4]);
    }
    let p = dir.join(name);
    std::fs::write(&p, w.to_bytes()).unwrap();
    p
}

#[test]
fn missing_tensor_is_named() {
    let dir = TempDir::new("missing");
    let p = gguf_with(&dir.0, "m.gguf", |n, d| {
        (n != "blk.1.ffn_up.weight").then_some(d)
    });
    let e = load_err(&p);
    assert!(
        e.contains("m.gguf") && e.contains("blk.1.ffn_up.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_is_named_with_both_shapes() {
    let dir = TempDir::new("shape");
    let p = gguf_with(&dir.0, "s.gguf", |n, d| {
        Some(if n == "blk.0.attn_v.weight" {
            vec![d[0], d[1] + 1]
        } else {
            d
        })
    });
    let e = load_err(&p);
    assert!(
        e.contains("blk.0.attn_v.weight") && e.contains("config implies"),
        "{e}"
    );
}

#[test]
fn bad_metadata_is_named() {
    let dir = TempDir::new("meta");
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("llama".into()));
    let p = dir.0.join("meta.gguf");
    std::fs::write(&p, w.to_bytes()).unwrap();
    let e = load_err(&p);
    assert!(
        e.contains("meta.gguf") && e.contains("llama.embedding_length"),
        "{e}"
    );

    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("mamba".into()));
    std::fs::write(&p, w.to_bytes()).unwrap();
    let e = load_err(&p);
    assert!(e.contains("mamba"), "{e}");
}

#[test]
fn broken_hugging_face_directories_are_named() {
    let dir = TempDir::new("hf");
    let hf = dir.0.join("model");
    fixtures::write_tiny_llama_hf(&hf, &TinySpec::default(), 5).unwrap();

    // A corrupt safetensors header.
    let st = hf.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = load_err(&hf);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    // Truncated tensor data.
    std::fs::write(&st, &good[..good.len() - 64]).unwrap();
    let e = load_err(&hf);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&st, &good).unwrap();

    // config.json that is not JSON, then one missing a key.
    let cfg = hf.join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = load_err(&hf);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    std::fs::write(
        &cfg,
        good_cfg.replace("\"num_hidden_layers\"", "\"layers\""),
    )
    .unwrap();
    let e = load_err(&hf);
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );
    std::fs::write(&cfg, &good_cfg).unwrap();

    // No weights at all.
    std::fs::remove_file(&st).unwrap();
    let e = load_err(&hf);
    assert!(e.contains("model.safetensors"), "{e}");

    // Not a model directory.
    let e = load_err(&dir.0);
    assert!(e.contains("no model here"), "{e}");
}

#[test]
fn a_huge_config_json_is_refused_naming_the_limit() {
    let dir = std::env::temp_dir().join(format!("kiln-huge-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    // Sparse: 2 GB of nothing, which used to be read whole before failing.
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(2 << 30).unwrap();
    let e = kiln_model::config::DecoderConfig::from_hf_config(&path).unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.to_string().contains("byte limit for a config.json"),
        "{e}"
    );
}
