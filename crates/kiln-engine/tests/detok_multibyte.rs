//! The incremental detokenizer against real tokenizers that split characters
//! across tokens: Japanese, emoji and mixed text must stream out with no
//! broken character in any delta, and the deltas must add up to exactly what
//! decoding all the ids at once gives.
//!
//! Tokenizers (from the cache; `scripts/fetch-assets.sh --tests` fetches them):
//! - GPT-2 byte-level BPE, built here from OpenAI's `encoder.json` and `vocab.bpe`;
//! - Mistral 7B, SentencePiece BPE with byte fallback (`tokenizer.json`);
//! - Qwen3, byte-level BPE with a large CJK vocabulary (`tokenizer.json`);
//! - the default model's (SmolLM2), converted from its GGUF metadata.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_engine::detok::IncrementalDetokenizer;
use kiln_model::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

const JAPANESE: &str = "吾輩は猫である。名前はまだ無い。東京タワー🗼𠮷野家";
const MIXED: &str = "Hello, world! 👋🏽 Café déjà vu: naïve 日本語のテキストと emoji 🇯🇵👨‍👩‍👧‍👦 \
                     mixed — Ünïcödé ∑≠∞ 🤖\n한국어 텍스트, 中文「引号」。 done 🎉🎉";
/// Rare characters and new emoji, which even large vocabularies split.
const RARE: &str = "𠀋𡈽𡌛 🫠🪿 ꙮ 鬱 龘 𩸽";
const PROMPT: &str = "Translate into Japanese and keep the emoji 🗼: ";
const TEXTS: [&str; 3] = [JAPANESE, MIXED, RARE];

fn tokenizer_dir(name: &str) -> PathBuf {
    kiln_model::default_model::cache_dir()
        .join("testdata/tokenizers")
        .join(name)
}

fn require(path: &Path) -> &Path {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-assets.sh --tests to fetch the test tokenizers",
        path.display()
    );
    path
}

/// GPT-2's tokenizer.json, assembled from `encoder.json` and `vocab.bpe` the
/// way Hugging Face's `gpt2` repository has it.
fn gpt2_tokenizer_json(dir: &Path) -> Value {
    let vocab: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(require(&dir.join("encoder.json"))).unwrap())
            .unwrap();
    let merges: Vec<Value> = std::fs::read_to_string(require(&dir.join("vocab.bpe")))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(Value::from)
        .collect();
    assert_eq!((vocab.len(), merges.len()), (50257, 50000));
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": merges}
    })
}

fn gpt2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let json = gpt2_tokenizer_json(&tokenizer_dir("gpt2"));
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gpt2-tokenizer-{}.json", std::process::id()));
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let tok = Tokenizer::from_hf_files(&path, None).unwrap();
        let _ = std::fs::remove_file(&path);
        tok
    })
}

fn hf(name: &str) -> Tokenizer {
    let dir = tokenizer_dir(name);
    Tokenizer::from_hf_files(
        require(&dir.join("tokenizer.json")),
        Some(require(&dir.join("tokenizer_config.json"))),
    )
    .unwrap()
}

fn mistral() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| hf("mistral"))
}

fn qwen3() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| hf("qwen3"))
}

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = kiln_model::default_model::default_model_path()
            .unwrap_or_else(|e| panic!("{e} (scripts/fetch-assets.sh --tests fetches it)"));
        let file = kiln_model::gguf::GgufFile::open(&path).unwrap();
        Tokenizer::from_gguf(&file).unwrap()
    })
}

/// Feeds `ids` one at a time after `context`; returns every delta and the flush.
fn stream(
    tok: &Tokenizer,
    context: &[u32],
    ids: &[u32],
    skip_special: bool,
) -> (Vec<String>, String) {
    let mut d = IncrementalDetokenizer::new(context, skip_special);
    let deltas = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
    (deltas, d.flush(tok).unwrap())
}

/// `text` without its trailing U+FFFD characters (an incomplete character decodes to some).
fn complete_part(text: &str) -> &str {
    text.trim_end_matches('\u{FFFD}')
}

/// The text is tokenized so that some character is cut between tokens: some
/// id decodes alone to a replacement character. Returns how many such ids.
fn split_tokens(tok: &Tokenizer, ids: &[u32]) -> usize {
    ids.iter()
        .filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count()
}

fn round_trips_one_token_at_a_time(tok: &Tokenizer) {
    let mut split = 0;
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "the tokenizer round-trips"
        );
        split += split_tokens(tok, &ids);
        for skip_special in [true, false] {
            let (deltas, rest) = stream(tok, &[], &ids, skip_special);
            let mut so_far = String::new();
            let mut waiting = 0;
            for (i, delta) in deltas.iter().enumerate() {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "delta {i} {delta:?} breaks a character"
                );
                so_far += delta;
                assert!(text.starts_with(&so_far), "after token {i}: {so_far:?}");
                // Text is held back only while a character is incomplete, and
                // then only for a few tokens.
                let decoded = tok.decode(&ids[..=i], skip_special).unwrap();
                if !decoded.contains('\u{FFFD}') {
                    assert_eq!(so_far, decoded, "after token {i}");
                }
                waiting = if delta.is_empty() { waiting + 1 } else { 0 };
                assert!(
                    waiting <= 4,
                    "token {i} is the {waiting}th in a row held back"
                );
            }
            assert_eq!(rest, "", "nothing is pending after complete text");
            assert_eq!(so_far, text);
        }
    }
    assert!(
        split > 0,
        "no token holds part of a character: the test would prove nothing"
    );
}

fn streams_after_a_prompt(tok: &Tokenizer) {
    for prompt in [PROMPT, JAPANESE, "🗼"] {
        let context = tok.encode(prompt, false).unwrap();
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap();
            let (deltas, rest) = stream(tok, &context, &ids, true);
            for delta in &deltas {
                assert!(!delta.contains('\u{FFFD}'), "{delta:?} breaks a character");
            }
            let all: Vec<u32> = context.iter().chain(&ids).copied().collect();
            let full = tok.decode(&all, true).unwrap();
            let prompt_text = tok.decode(&context, true).unwrap();
            let want = full.strip_prefix(prompt_text.as_str()).unwrap();
            let got = deltas.concat() + &rest;
            assert_eq!(got, want, "after the prompt {prompt:?}");
            // SentencePiece puts a space before the continuation; byte-level adds nothing.
            assert_eq!(got.trim_start(), text);
        }
    }
}

fn ending_mid_character_flushes_replacements(tok: &Tokenizer, byte_fallback: bool) {
    let mut cuts = 0;
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        for end in 1..ids.len() {
            let cut = &ids[..end];
            let decoded = tok.decode(cut, true).unwrap();
            if !decoded.ends_with('\u{FFFD}') {
                continue;
            }
            cuts += 1;
            let (deltas, rest) = stream(tok, &[], cut, true);
            let streamed = deltas.concat();
            assert!(!streamed.contains('\u{FFFD}'), "{streamed:?}");
            assert!(rest.ends_with('\u{FFFD}'), "flush gave {rest:?}");
            // Nothing is lost or duplicated.
            let got = streamed.clone() + &rest;
            if byte_fallback && got != decoded {
                assert!(
                    same_but_for_byte_fallback_runs(&got, &decoded),
                    "{got:?} vs {decoded:?}"
                );
            } else {
                assert_eq!(got, decoded);
            }
            assert!(text.starts_with(complete_part(&got)));
        }
    }
    assert!(cuts > 0, "no sequence ended mid-character");
}

/// Tiny deterministic generator for shuffling.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Whether `streamed` is `full` except where Hugging Face's `ByteFallback`
/// decoder, seeing a whole run of byte tokens at once, replaced each byte of
/// characters the stream had already let out (see `detok::new_text`).
fn same_but_for_byte_fallback_runs(streamed: &str, full: &str) -> bool {
    let mut f = full.chars().peekable();
    for c in streamed.chars() {
        if f.peek() == Some(&c) {
            f.next();
            continue;
        }
        for _ in 0..c.len_utf8() {
            if f.next() != Some('\u{FFFD}') {
                return false;
            }
        }
    }
    f.next().is_none()
}

/// A sampling model can emit any ids, including bytes that never form a
/// character: whatever comes, the deltas add up to the full decode (byte-level
/// tokenizers), or to it up to the byte-fallback replacements above.
fn arbitrary_sequences_add_up_to_the_full_decode(tok: &Tokenizer, byte_fallback: bool) {
    let mut pool: Vec<u32> = TEXTS
        .iter()
        .flat_map(|t| tok.encode(t, false).unwrap())
        .collect();
    pool.extend(tok.eos_ids());
    let mut rng = Lcg(7);
    let mut exact = 0;
    for round in 0..300 {
        let len = 1 + rng.below(24);
        let ids: Vec<u32> = (0..len).map(|_| pool[rng.below(pool.len())]).collect();
        let skip_special = round % 2 == 0;
        let context = &pool[..rng.below(8)];
        let (deltas, rest) = stream(tok, context, &ids, skip_special);
        let all: Vec<u32> = context.iter().chain(&ids).copied().collect();
        let full = tok.decode(&all, skip_special).unwrap();
        let prompt_text = tok.decode(context, skip_special).unwrap();
        let got = deltas.concat() + &rest;
        if prompt_text.ends_with('\u{FFFD}') {
            // The prompt ends inside a character, which the generated ids may
            // complete: there is no "text after the prompt" to compare with
            // (detok's unit tests cover this).
            continue;
        }
        let Some(want) = full.strip_prefix(prompt_text.as_str()) else {
            // Only a byte-fallback decoder rewrites the prompt's text: generated
            // bytes made its last run of byte tokens invalid.
            assert!(byte_fallback, "{full:?} does not extend {prompt_text:?}");
            continue;
        };
        if byte_fallback && got != want {
            assert!(
                same_but_for_byte_fallback_runs(&got, want),
                "ids {ids:?} after {context:?}: {got:?} vs {want:?}"
            );
        } else {
            assert_eq!(got, want, "ids {ids:?} after {context:?}");
            exact += 1;
        }
    }
    assert!(exact > 100, "only {exact} sequences compared exactly");
}

/// A long generation (over the window's compaction, many times) streams exactly.
fn long_generations_stream_exactly(tok: &Tokenizer) {
    let ids = tok.encode(&MIXED.repeat(60), false).unwrap();
    assert!(ids.len() > 2000);
    let (deltas, rest) = stream(tok, &[], &ids, true);
    assert_eq!(deltas.concat() + &rest, MIXED.repeat(60));
}

macro_rules! detok_tests {
    ($($name:ident => $tok:expr, byte_fallback: $byte_fallback:expr;)*) => {
        $(mod $name {
            use super::*;

            #[test]
            fn round_trips_one_token_at_a_time() {
                super::round_trips_one_token_at_a_time($tok);
            }

            #[test]
            fn streams_after_a_prompt() {
                super::streams_after_a_prompt($tok);
            }

            #[test]
            fn ending_mid_character_flushes_replacements() {
                super::ending_mid_character_flushes_replacements($tok, $byte_fallback);
            }

            #[test]
            fn arbitrary_sequences_add_up_to_the_full_decode() {
                super::arbitrary_sequences_add_up_to_the_full_decode($tok, $byte_fallback);
            }

            #[test]
            fn long_generations_stream_exactly() {
                super::long_generations_stream_exactly($tok);
            }
        })*
    };
}

detok_tests! {
    gpt2_bpe => gpt2(), byte_fallback: false;
    mistral_byte_fallback => mistral(), byte_fallback: true;
    qwen3_bpe => qwen3(), byte_fallback: false;
    smollm2_gguf => smollm2(), byte_fallback: false;
}
