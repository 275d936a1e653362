//! GGUF tokenizers against llama.cpp's reference tokenizations.
//!
//! `scripts/fetch-assets.sh --tests` puts llama.cpp's vocab-only GGUFs in
//! `<cache>/testdata/llama-vocab/`: `ggml-vocab-NAME.gguf` with
//! `ggml-vocab-NAME.gguf.inp` (inputs, separated by lines
//! `__ggml_vocab_test__`) and `.gguf.out` (the expected ids, one line per
//! input). llama.cpp's `test-tokenizer-0` tokenizes each input with
//! `add_special = false` and `parse_special = false`, so these tests do too:
//! no BOS, and special-token text is plain text.
//!
//! Missing files fail the tests (with the command to fetch them) rather than
//! skipping them.

use std::path::PathBuf;

use kiln_model::gguf::{GgufFile, GgufWriter, Value};
use kiln_model::tokenizer::Tokenizer;
use kiln_model::ModelError;

/// The separator llama.cpp's test splits `.inp` files on.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// kiln's cache: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`
/// (the rule `scripts/fetch-assets.sh` follows).
fn cache_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("KILN_CACHE") {
        return dir.into();
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kiln");
    }
    PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache/kiln")
}

/// A cached file, or a panic telling the user how to get it.
fn cached(relative: &str) -> PathBuf {
    let path = cache_dir().join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/fetch-assets.sh --tests` to download the test data",
        path.display()
    );
    path
}

/// One reference case: the input text and the ids llama.cpp produces.
struct Case {
    text: String,
    ids: Vec<u32>,
}

/// Reads the cases of `ggml-vocab-NAME.gguf`, split exactly as llama.cpp's
/// test does: the text after the last separator is a case only if non-empty
/// (the files end with a separator, so there is none).
fn read_cases(name: &str) -> Vec<Case> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let inp = read(cached(&format!(
        "testdata/llama-vocab/ggml-vocab-{name}.gguf.inp"
    )));
    let out = read(cached(&format!(
        "testdata/llama-vocab/ggml-vocab-{name}.gguf.out"
    )));

    let mut texts: Vec<&str> = inp.split(SEPARATOR).collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| {
                    id.parse()
                        .unwrap_or_else(|e| panic!("{name}.out: bad id {id:?}: {e}"))
                })
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        expected.len(),
        "{name}: .inp and .out have different case counts"
    );
    texts
        .into_iter()
        .zip(expected)
        .map(|(text, ids)| Case {
            text: text.to_string(),
            ids,
        })
        .collect()
}

/// The vocabulary's tokenizer, set up like llama.cpp's test (`parse_special = false`).
fn load_vocab(name: &str) -> Tokenizer {
    let path = cached(&format!("testdata/llama-vocab/ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    tok.set_parse_special(false);
    tok
}

/// Encodes every case of `name` and compares with llama.cpp's ids; also checks
/// that decoding gives the input back. Cases listed in `known` (by text) may
/// differ; they must say why at the call site. Returns the checked count.
fn check_vocab(name: &str, known: &[&str]) -> usize {
    let tok = load_vocab(name);
    let cases = read_cases(name);
    let mut failures = Vec::new();
    for case in &cases {
        if known.contains(&case.text.as_str()) {
            continue;
        }
        let ids = tok
            .encode(&case.text, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if ids != case.ids {
            failures.push(format!(
                "encode {:?}\n    expected {:?}\n    actual   {:?}",
                case.text, case.ids, ids
            ));
            continue;
        }
        let text = tok
            .decode(&ids, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if text != case.text {
            failures.push(format!("decode {:?} gave {:?}", case.text, text));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    eprintln!(
        "{name}: {} of {} cases match llama.cpp",
        cases.len() - known.len(),
        cases.len()
    );
    cases.len()
}

#[test]
fn gpt_2() {
    check_vocab("gpt-2", &[]);
}

#[test]
fn llama_bpe() {
    check_vocab("llama-bpe", &[]);
}

#[test]
fn qwen2() {
    check_vocab("qwen2", &[]);
}

#[test]
fn llama_spm() {
    check_vocab("llama-spm", &[]);
}

#[test]
fn phi_3() {
    check_vocab("phi-3", &[]);
}

#[test]
fn starcoder() {
    check_vocab("starcoder", &[]);
}

#[test]
fn deepseek_llm() {
    check_vocab("deepseek-llm", &[]);
}

#[test]
fn deepseek_coder() {
    check_vocab("deepseek-coder", &[]);
}

#[test]
fn falcon() {
    check_vocab("falcon", &[]);
}

#[test]
fn mpt() {
    check_vocab("mpt", &[]);
}

#[test]
fn refact() {
    check_vocab("refact", &[]);
}

#[test]
fn command_r() {
    check_vocab("command-r", &[]);
}

#[test]
fn qwen35() {
    check_vocab("qwen35", &[]);
}

// ---------------------------------------------------------------------------
// Special tokens, BOS/EOS and the default model
// ---------------------------------------------------------------------------

/// A vocabulary's tokenizer as the server uses it: special tokens parsed.
fn load_vocab_parsing_special(name: &str) -> Tokenizer {
    let mut tok = load_vocab(name);
    tok.set_parse_special(true);
    tok
}

#[test]
fn smollm2_chat_markers_are_single_tokens() {
    let path = cached("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));

    let text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
    let ids = tok.encode(text, true).expect("encode");
    assert_eq!(
        ids.first(),
        Some(&1),
        "<|im_start|> must be one token: {ids:?}"
    );
    assert_eq!(
        ids[ids.len() - 2],
        2,
        "<|im_end|> must be one token: {ids:?}"
    );
    assert_eq!(
        ids.iter().filter(|&&id| id == 1 || id == 2).count(),
        2,
        "{ids:?}"
    );
    // The GGUF says add_bos_token = false: add_special adds nothing.
    assert_eq!(ids, tok.encode(text, false).expect("encode"));

    assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    assert_eq!(
        tok.decode(&ids, true).expect("decode"),
        "user\nWhat is the capital of France?\n"
    );
    assert_eq!(tok.bos_id(), Some(1));
    assert!(
        tok.eos_ids().contains(&2),
        "<|im_end|> ends generation: {:?}",
        tok.eos_ids()
    );
    assert!(
        tok.eos_ids().contains(&0),
        "<|endoftext|> ends generation: {:?}",
        tok.eos_ids()
    );
}

#[test]
fn control_tokens_match_only_when_parsing_special() {
    let mut tok = load_vocab_parsing_special("qwen2");
    let user = tok.token_to_id("user").expect("'user' is a token");
    assert_eq!(
        tok.encode("<|im_start|>user", false).unwrap(),
        [151644, user]
    );
    assert_eq!(tok.decode(&[151644, user, 151645], true).unwrap(), "user");
    assert_eq!(
        tok.decode(&[151644, user], false).unwrap(),
        "<|im_start|>user"
    );

    tok.set_parse_special(false);
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&151644), "{plain:?}");
    // User-defined tokens match either way, as in llama.cpp.
    assert_eq!(tok.encode("a[PAD151646]", false).unwrap()[1..], [151646]);

    assert!(tok.eos_ids().contains(&151643), "{:?}", tok.eos_ids());
    assert!(tok.eos_ids().contains(&151645), "{:?}", tok.eos_ids());
}

#[test]
fn bos_is_added_as_the_gguf_says() {
    // SentencePiece: add_bos_token = true.
    let spm = load_vocab_parsing_special("llama-spm");
    let with = spm.encode("Hello", true).unwrap();
    assert_eq!(with[0], 1);
    assert_eq!(with[1..], spm.encode("Hello", false).unwrap()[..]);
    assert_eq!(spm.eos_ids(), [2]);

    // Llama 3: no add_bos_token key, llama.cpp's default for llama-bpe is true.
    let llama3 = load_vocab_parsing_special("llama-bpe");
    assert_eq!(llama3.encode("Hello", true).unwrap()[0], 128000);
    let eos = llama3.eos_ids();
    assert!(eos.contains(&128001) && eos.contains(&128009), "{eos:?}");

    // GPT-2: no BOS.
    let gpt2 = load_vocab_parsing_special("gpt-2");
    assert_eq!(
        gpt2.encode("Hello", true).unwrap(),
        gpt2.encode("Hello", false).unwrap()
    );
    assert_eq!(gpt2.eos_ids(), [50256]);
}

#[test]
fn user_defined_tokens_decode_to_their_text() {
    // DeepSeek's user-defined `ø` is also a GPT-2 byte character: a byte-level
    // decoder would turn it into the lone byte 0xF8.
    let tok = load_vocab_parsing_special("deepseek-llm");
    let id = tok.token_to_id("ø").expect("ø is a token");
    assert_eq!(tok.encode("ø", false).unwrap(), [id]);
    assert_eq!(tok.decode(&[id], false).unwrap(), "ø");
    let ids = tok.encode("Hello ø world", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello ø world");
}

#[test]
fn space_prefix_is_added_and_removed() {
    let tok = load_vocab_parsing_special("llama-spm");
    let ids = tok.encode("Hello world", true).unwrap();
    assert_eq!(tok.id_to_token(ids[1]).as_deref(), Some("▁Hello"));
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<s> Hello world");
}

// ---------------------------------------------------------------------------
// Malformed metadata
// ---------------------------------------------------------------------------

/// The tokenizer of a GGUF file holding only `meta`.
fn from_metadata(tag: &str, meta: Vec<(&str, Value)>) -> Result<Tokenizer, ModelError> {
    let mut writer = GgufWriter::default();
    for (key, value) in meta {
        writer.meta(key, value);
    }
    let path =
        std::env::temp_dir().join(format!("kiln-tokenizer-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&path, writer.to_bytes()).expect("write temp GGUF");
    let result = GgufFile::open(&path).and_then(|file| Tokenizer::from_gguf(&file));
    let _ = std::fs::remove_file(&path);
    result
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// Asserts a format error whose message names `key`.
fn assert_format_error(result: Result<Tokenizer, ModelError>, key: &str) {
    match result {
        Err(ModelError::Format { msg, .. }) => {
            assert!(msg.contains(key), "error does not name {key}: {msg}")
        }
        Err(other) => panic!("expected a format error naming {key}, got {other}"),
        Ok(tok) => panic!("expected a format error naming {key}, got {tok:?}"),
    }
}

#[test]
fn malformed_metadata_is_an_error_naming_the_key() {
    let model = |m: &str| ("tokenizer.ggml.model", Value::String(m.into()));
    let tokens = ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"]));
    let merges = ("tokenizer.ggml.merges", strings(&["a b"]));

    let r = from_metadata("no-tokens", vec![model("gpt2"), merges.clone()]);
    assert_format_error(r, "tokenizer.ggml.tokens");

    let r = from_metadata("bogus", vec![model("bogus"), tokens.clone()]);
    assert_format_error(r, "tokenizer.ggml.model");

    let r = from_metadata("no-model", vec![tokens.clone(), merges.clone()]);
    assert_format_error(r, "tokenizer.ggml.model");

    let r = from_metadata("no-merges", vec![model("gpt2"), tokens.clone()]);
    assert_format_error(r, "tokenizer.ggml.merges");

    let numbers = (
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::U32(1), Value::U32(2)]),
    );
    let r = from_metadata("not-strings", vec![model("gpt2"), numbers, merges.clone()]);
    assert_format_error(r, "tokenizer.ggml.tokens");

    let scores = (
        "tokenizer.ggml.scores",
        Value::Array(vec![Value::F32(0.0); 2]),
    );
    let r = from_metadata("short-scores", vec![model("llama"), tokens.clone(), scores]);
    assert_format_error(r, "tokenizer.ggml.scores");

    let types = (
        "tokenizer.ggml.token_type",
        Value::Array(vec![Value::I32(1); 4]),
    );
    let r = from_metadata(
        "long-types",
        vec![model("gpt2"), tokens.clone(), merges.clone(), types],
    );
    assert_format_error(r, "tokenizer.ggml.token_type");

    // And the same minimal vocabulary, well-formed, works.
    let tok = from_metadata("ok", vec![model("gpt2"), tokens, merges]).expect("valid metadata");
    assert_eq!(tok.encode("ab", false).unwrap(), [2]);
}

/// The bytes of each id ([`Tokenizer::token_bytes`], what a grammar engine's
/// token trie is built from) join into the encoded text: byte-level
/// characters, `▁` and `<0xNN>` byte-fallback pieces become the right bytes.
#[test]
fn token_bytes_join_to_the_encoded_text() {
    for name in ["gpt-2", "llama-spm", "qwen2", "phi-3"] {
        let tok = load_vocab(name);
        let pieces = tok.token_bytes(tok.vocab_size());
        let mut checked = 0;
        for case in read_cases(name) {
            let ids = tok.encode(&case.text, false).unwrap();
            let joined: Vec<u8> = ids
                .iter()
                .flat_map(|&id| pieces[id as usize].bytes.clone())
                .collect();
            // SentencePiece vocabularies put a space before the text.
            let spaced = [b" ".as_slice(), case.text.as_bytes()].concat();
            assert!(
                joined == case.text.as_bytes() || joined == spaced,
                "{name}: {:?} joined to {:?}",
                case.text,
                String::from_utf8_lossy(&joined)
            );
            checked += 1;
        }
        assert!(checked > 10, "{name}: {checked} cases");
    }
}
