//! Prepared files: a model converted while loading and written as GGUF at
//! the same time loads back from that file bit for bit (the same logits and
//! greedy tokens as converting again), for a llama quantized to Q4_K, a
//! GPT-2 (whose Conv1D matrices are transposed while loading) quantized to
//! Q8_0, and an OPT rounded to f16; the file says what it was made from; a
//! truncated one is an error naming it.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{GgmlType, StepInput};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
use kiln_model::{load, LoadOptions, LoadedModel, ModelFormat, WeightDtype};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(name)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32
}

/// Every prompt position's logits, then 6 greedy tokens.
fn run(m: &LoadedModel<CpuBackend>) -> (Vec<f32>, Vec<u32>) {
    let prompt = [72, 101, 108, 108, 111, 32, 119, 111];
    let be = CpuBackend::new();
    let (all, mut kv) = fixtures::prefill(&be, &m.decoder, &prompt, 6).expect("prefill");
    let vocab = m.decoder.config().vocab_size;
    let mut next = argmax(&all[all.len() - vocab..]);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + 5 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&m.decoder.forward(&be, &mut kv, &step).expect("decode"));
        out.push(next);
    }
    (all, out)
}

fn info(opts: &LoadOptions) -> PreparedInfo {
    PreparedInfo {
        key: "0123abcd".into(),
        source: "/models/x".into(),
        identity: "[]".into(),
        settings: Settings::of(opts),
        artifact_version: ARTIFACT_VERSION,
    }
}

/// Converts `src` with `opts` while writing the prepared file, then loads
/// that file: both give the same logits and tokens as a plain converting
/// load, and the file describes itself.
fn round_trip(src: &Path, opts: &LoadOptions, out_dir: &Path) -> PathBuf {
    let be = CpuBackend::new();
    let converted = run(&load(&be, src, opts).expect("converting load"));
    let file = out_dir.join("model.gguf");
    let want = info(opts);
    let (while_writing, size) = prepared::load_and_prepare(
        &be,
        src,
        opts,
        &want,
        &file,
        &kiln_model::layouts::Layouts::Off,
    )
    .expect("prepare");
    assert_eq!(size, std::fs::metadata(&file).expect("stat").len());
    assert_eq!(
        run(&while_writing),
        converted,
        "the model loaded while writing"
    );
    assert_eq!(
        std::fs::read_dir(out_dir).expect("ls").count(),
        1,
        "only model.gguf is left (no spool)"
    );

    let got = prepared::read_info(&file)
        .expect("read")
        .expect("a prepared file");
    assert_eq!(got, want);
    assert!(got.matches(opts));
    assert!(!got.matches(&LoadOptions::default()), "other settings");
    let mapped = load(&be, &file, &prepared::as_prepared(opts)).expect("load prepared");
    assert_eq!(mapped.format, ModelFormat::Gguf(file.clone()));
    assert_eq!(
        run(&mapped),
        converted,
        "the prepared file maps to the same model"
    );
    file
}

#[test]
fn a_quantized_llama_round_trips_through_its_prepared_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let spec = TinySpec {
        hidden: 256,
        ffn: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    fixtures::write_tiny_llama_hf(&src, &spec, 7).expect("fixture");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let opts = LoadOptions {
        quantize: Some(GgmlType::Q4K),
        ..LoadOptions::default()
    };
    let file = round_trip(&src, &opts, &out);
    // The same model's chat template and stop ids come along.
    let be = CpuBackend::new();
    let a = load(&be, &src, &opts).expect("load");
    let b = load(&be, &file, &LoadOptions::default()).expect("load");
    assert_eq!(a.eos_ids, b.eos_ids);
    assert_eq!(a.chat_template.is_some(), b.chat_template.is_some());
    assert_eq!(
        a.tokenizer.encode("Hello world", true).expect("encode"),
        b.tokenizer.encode("Hello world", true).expect("encode")
    );

    // Cut off the last tensor's bytes: an error naming the file.
    let len = std::fs::metadata(&file).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(len - 100).expect("truncate");
    let e = match load(&be, &file, &LoadOptions::default()) {
        Ok(_) => panic!("a truncated prepared file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("truncated"), "{e}");
    assert!(prepared::read_info(&file).is_err(), "read_info checks too");
}

#[test]
fn gpt2_and_opt_round_trip_through_their_prepared_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, opts) in [
        (
            "gpt2",
            LoadOptions {
                quantize: Some(GgmlType::Q8_0),
                ..LoadOptions::default()
            },
        ),
        (
            "opt",
            LoadOptions {
                dtype: WeightDtype::F16,
                ..LoadOptions::default()
            },
        ),
    ] {
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).expect("mkdir");
        round_trip(&tiny(name), &opts, &out);
    }
}

#[test]
fn plain_files_are_not_prepared_ones() {
    assert_eq!(prepared::read_info(&tiny("llama")).expect("read"), None);
}

#[test]
fn only_quantizing_or_changing_the_stored_dtype_converts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let with = |dtype: WeightDtype| LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let dir = tmp.path();
    std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float16"}"#).expect("write");
    assert!(!prepared::converts(dir, &LoadOptions::default()));
    assert!(!prepared::converts(dir, &with(WeightDtype::F32)));
    assert!(
        !prepared::converts(dir, &with(WeightDtype::F16)),
        "stored as fp16"
    );
    assert!(prepared::converts(dir, &with(WeightDtype::Bf16)));
    let q = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    assert!(prepared::converts(dir, &q));
    // tiny/llama declares float32 (in `dtype`): fp16 is a conversion.
    assert!(prepared::converts(&tiny("llama"), &with(WeightDtype::F16)));
}
