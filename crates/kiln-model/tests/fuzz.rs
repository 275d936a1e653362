//! Fuzzing the readers of model files: GGUF, safetensors directories (header,
//! config.json, tokenizer.json), PyTorch checkpoints (zip + pickle), and chat
//! templates given hostile messages. Each gets mutated copies of valid seeds
//! and must answer with a value or an error, never a panic. Every seed must
//! itself be accepted, and a share of the mutated inputs too (stated per
//! target, well under what the default seed gives): otherwise the mutations
//! only exercise the first error and the run proves little. `KILN_FUZZ_CASES`
//! raises the number of cases (see FUZZING.md).

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_model::chat::{ChatMessage, ChatTemplate};
use kiln_model::fixtures::{tiny_llama_gguf_bytes, TinySpec};
use kiln_model::fuzz::{cases, check_seeds, mutate, read_torch_checkpoint, run, run_with};
use kiln_model::gguf::GgufFile;
use kiln_model::LoadOptions;

// The least share of cases each target must accept: about a quarter of
// what the default cases and seed give (in the comments), which leaves room
// for other seeds and stricter parsers, not for a target whose inputs all
// fail the first check.
const MIN_GGUF: f64 = 0.05; // 80 of 400
const MIN_SAFETENSORS: f64 = 0.04; // 44 of 300
const MIN_CONFIG: f64 = 0.015; // 16 of 300
const MIN_TOKENIZER: f64 = 0.015; // 13 of 200
const MIN_TORCH: f64 = 0.02; // 169 of 2000
const MIN_CHAT: f64 = 0.5; // 2000 of 2000

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts() -> LoadOptions {
    LoadOptions {
        // Keeps per-position tables small whatever the file claims.
        max_positions: Some(64),
        ..LoadOptions::default()
    }
}

#[test]
fn gguf_files_never_panic() {
    let dir = scratch("gguf");
    let path = dir.join("model.gguf");
    let seeds = vec![
        tiny_llama_gguf_bytes(&TinySpec::default(), 1),
        tiny_llama_gguf_bytes(
            &TinySpec {
                tied: false,
                ..TinySpec::default()
            },
            2,
        ),
    ];
    let backend = CpuBackend::new();
    let report = run("gguf", &seeds, cases(400), 1 << 20, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let Ok(g) = GgufFile::open(&path) else {
            return false;
        };
        for info in g.tensors.values() {
            let _ = g.tensor_bytes(info);
        }
        kiln_model::load(&backend, &path, &opts()).is_ok()
    })
    .and_then(|r| r.require_accepted("gguf", MIN_GGUF))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("gguf: {report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of a tiny Hugging Face model directory with one file replaced;
/// at least `min_share` of the cases must load.
fn hf_target(file: &str, cases_n: usize, max_len: usize, min_share: f64) {
    let src = repo().join("testdata/tiny/llama");
    let dir = scratch(&format!("hf-{file}"));
    // The checkpoint's files (its folder also holds LoRA adapters' folders).
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let seed = std::fs::read(src.join(file)).unwrap();
    let backend = CpuBackend::new();
    let report = run(file, &[seed], cases_n, max_len, |bytes| {
        std::fs::write(dir.join(file), bytes).unwrap();
        kiln_model::load(&backend, &dir, &opts()).is_ok()
    })
    .and_then(|r| r.require_accepted(file, min_share))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{file}: {report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn safetensors_headers_never_panic() {
    hf_target("model.safetensors", cases(300), 1 << 20, MIN_SAFETENSORS);
}

#[test]
fn config_json_never_panics() {
    hf_target("config.json", cases(300), 1 << 16, MIN_CONFIG);
}

#[test]
fn tokenizer_json_never_panics() {
    hf_target("tokenizer.json", cases(200), 1 << 16, MIN_TOKENIZER);
}

#[test]
fn torch_checkpoints_never_panic() {
    let dir = repo().join("testdata/torch");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let good: Vec<Vec<u8>> = [
        "dtypes.bin",
        "views.bin",
        "module.bin",
        "nested.bin",
        "zip64.bin",
    ]
    .iter()
    .map(|f| read(f))
    .collect();
    // A refused pickle too, so that mutations also start inside the
    // refusal path: it must stay refused.
    let evil = read("evil_stack_global.bin");
    let target = |bytes: &[u8]| read_torch_checkpoint(bytes.to_vec());
    assert!(!target(&evil), "evil_stack_global.bin was accepted");
    check_seeds("torch", &good, &target).unwrap_or_else(|e| panic!("{e}"));
    let seeds: Vec<&[u8]> = good.iter().map(Vec::as_slice).chain([&evil[..]]).collect();
    let report = run_with(
        "torch",
        cases(2000),
        |rng, case| {
            let seed = seeds[case % seeds.len()];
            if rng.one_in(50) {
                seed.to_vec()
            } else {
                mutate(rng, seed, 1 << 16)
            }
        },
        target,
    )
    .and_then(|r| r.require_accepted("torch", MIN_TORCH))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("torch: {report:?}");
}

#[test]
fn chat_templates_never_panic_on_hostile_messages() {
    let mut templates = vec![ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<s>",
        "</s>",
    )
    .unwrap()];
    // The default model's own template, when it is in the cache.
    if let Ok(path) = kiln_model::default_model::default_model_path() {
        let g = GgufFile::open(&path).unwrap();
        if let Some(src) = g.get_str("tokenizer.chat_template") {
            templates.push(ChatTemplate::new(src, "<|im_start|>", "<|im_end|>").unwrap());
        }
    }
    let roles = [
        "system",
        "user",
        "assistant",
        "tool",
        "",
        "<|im_end|>",
        "{{",
    ];
    let report = run_with(
        "chat templates",
        cases(2000),
        |rng, _| {
            let v = kiln_model::fuzz::random_json(rng, &["role", "content"], 1);
            let mut out = v.to_string().into_bytes();
            out.push(rng.below(roles.len()) as u8);
            out.push(rng.below(8) as u8);
            out
        },
        |bytes| {
            let (&n, rest) = bytes.split_last().unwrap();
            let (&role, text) = rest.split_last().unwrap();
            let text = String::from_utf8_lossy(text);
            let messages: Vec<ChatMessage> = (0..n as usize)
                .map(|i| {
                    ChatMessage::new(roles[(role as usize + i) % roles.len()], text.repeat(i % 3))
                })
                .collect();
            let mut ok = true;
            for t in &templates {
                ok &= t.render(&messages, n % 2 == 0).is_ok();
            }
            ok
        },
    )
    .and_then(|r| r.require_accepted("chat templates", MIN_CHAT))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("chat templates: {report:?}");
}
