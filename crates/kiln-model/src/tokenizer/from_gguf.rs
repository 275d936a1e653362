//! The GGUF-to-`tokenizers` converter: a GGUF file's tokenizer (its
//! vocabulary, merges and token types in `tokenizer.ggml.*` metadata) becomes
//! a Hugging Face `tokenizers` pipeline at load.
//!
//! The GGUF conversion follows llama.cpp (`llama-vocab.cpp`), whose test cases
//! are the reference (`tests/tokenizer_reference.rs`):
//!
//! - `gpt2` vocabularies become byte-level BPE: the text is cut by the list of
//!   split regexes llama.cpp picks for `tokenizer.ggml.pre` (each regex cuts
//!   every piece the previous ones left, keeping both matches and the text
//!   between them), bytes are mapped to the GPT-2 byte alphabet, and the
//!   `tokenizer.ggml.merges` are applied by rank.
//! - `llama` vocabularies are SentencePiece BPE: spaces become `▁` (with one
//!   prepended when `add_space_prefix`), adjacent pieces are merged while the
//!   merged piece is in the vocabulary, highest `tokenizer.ggml.scores` first,
//!   and characters the vocabulary lacks fall back to `<0xNN>` byte tokens.
//!   The `tokenizers` BPE model takes ranked merges rather than scores, so
//!   the merges are derived from the scores at load (every split of every
//!   piece into two pieces, ranked by the merged piece's score).
//! - Control and unknown tokens become special added tokens (matched as whole
//!   strings in the input, dropped by `decode(.., skip_special = true)`),
//!   user-defined tokens become ordinary added tokens.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufFile, Value};
use crate::{ModelError, Result};

use super::{is_byte_level_char, VerbatimPiece};

// ---------------------------------------------------------------------------
// GGUF metadata
// ---------------------------------------------------------------------------

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Texts that end generation when they are control tokens, as llama.cpp
/// lists them. `</s>` is not here: it ends generation only when it is the EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
];

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Unlisted values (0, "undefined") count as normal, as in llama.cpp.
    fn from_gguf(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Typed access to metadata; every error names the file and the key.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ModelError {
        ModelError::Format {
            path: self.file.path().to_path_buf(),
            msg: format!("{key}: {msg}"),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        self.err(key, "missing from the metadata")
    }

    /// A string value; `None` when absent.
    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "not a string")),
        }
    }

    /// A boolean value; `None` when absent.
    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "not a boolean")),
        }
    }

    /// The elements of an array value; `None` when absent.
    fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.err(key, "not an array")),
        }
    }

    /// An array whose every element is converted by `f` (named `what` in errors).
    fn array_of<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| f(v).ok_or_else(|| self.err(key, format!("element {i} is not {what}"))))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// A token id that must name one of `n_vocab` tokens; `None` when absent
    /// or negative (some converters write -1 for "none"). An id past the
    /// vocabulary is ignored with a warning, as llama.cpp does.
    fn token_id(&self, key: &str, n_vocab: usize) -> Result<Option<u32>> {
        let Some(v) = self.file.get(key) else {
            return Ok(None);
        };
        let id = v.as_i64().ok_or_else(|| self.err(key, "not an integer"))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
            Ok(id) => {
                tracing::warn!(
                    "{}: {key} = {id} is outside the vocabulary of {n_vocab}; ignored",
                    self.file.path().display()
                );
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }
}

/// How a byte-level BPE vocabulary cuts text before merging, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy)]
struct PreTokenizerSpec {
    /// Applied in order, each to every piece the previous ones produced.
    regexes: &'static [&'static str],
    /// A piece that is itself a token is emitted whole, merges or not.
    ignore_merges: bool,
    /// Whether a BOS is added when the metadata does not say.
    add_bos: bool,
}

/// What kind of model the vocabulary drives, with its model-specific data.
enum VocabKind {
    /// `gpt2`: byte-level BPE with ranked merges.
    ByteLevelBpe {
        merges: Vec<(String, String)>,
        pre: PreTokenizerSpec,
    },
    /// `llama`: SentencePiece BPE driven by piece scores.
    SentencePiece {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// The tokenizer part of a GGUF file's metadata, read and checked.
pub(super) struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    kind: VocabKind,
    pub(super) bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// phi-3's added tokens swallow the whitespace after them (llama.cpp sets
    /// RSTRIP on them by model name; its Hugging Face tokenizer does the same).
    rstrip_added: bool,
}

impl GgufVocab {
    pub(super) fn read(file: &GgufFile) -> Result<Self> {
        let meta = Meta { file };
        let model = meta
            .string(KEY_MODEL)?
            .ok_or_else(|| meta.missing(KEY_MODEL))?;
        let tokens = read_tokens(&meta)?;
        let n = tokens.len();
        let mut types = read_token_types(&meta, n)?;
        promote_end_of_generation(&tokens, &mut types);

        let kind = match model {
            "gpt2" => VocabKind::ByteLevelBpe {
                merges: read_merges(&meta)?,
                pre: pre_tokenizer_spec(meta.string(KEY_PRE)?),
            },
            "llama" => VocabKind::SentencePiece {
                scores: read_scores(&meta, n)?,
                add_space_prefix: meta.flag(KEY_ADD_SPACE_PREFIX)?.unwrap_or(true),
            },
            other => {
                return Err(meta.err(
                    KEY_MODEL,
                    format!("unsupported tokenizer model '{other}' (supported: 'gpt2', 'llama')"),
                ))
            }
        };

        // llama.cpp's defaults when the keys are absent: SentencePiece
        // vocabularies have <unk>=0, <s>=1, </s>=2 and add a BOS.
        let is_spm = matches!(kind, VocabKind::SentencePiece { .. });
        let spm_default = |id: u32| (is_spm && (id as usize) < n).then_some(id);
        let default_add_bos = match &kind {
            VocabKind::ByteLevelBpe { pre, .. } => pre.add_bos,
            VocabKind::SentencePiece { .. } => true,
        };
        let name = meta
            .string("general.name")
            .ok()
            .flatten()
            .unwrap_or("")
            .to_lowercase();
        Ok(Self {
            bos: meta.token_id(KEY_BOS, n)?.or(spm_default(1)),
            eos: meta.token_id(KEY_EOS, n)?.or(spm_default(2)),
            eot: meta.token_id(KEY_EOT, n)?,
            eom: meta.token_id(KEY_EOM, n)?,
            unk: meta.token_id(KEY_UNK, n)?.or(spm_default(0)),
            add_bos: meta.flag(KEY_ADD_BOS)?.unwrap_or(default_add_bos),
            add_eos: meta.flag(KEY_ADD_EOS)?.unwrap_or(false),
            rstrip_added: name.contains("phi-3") || name.contains("phi3"),
            tokens,
            types,
            kind,
        })
    }

    /// The `tokenizers` pipeline; errors are messages for the caller to wrap.
    pub(super) fn build(&self) -> std::result::Result<tokenizers::Tokenizer, String> {
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let duplicates = self.tokens.len() - vocab.len();
        if duplicates > 0 {
            // The later id wins the text, as in llama.cpp; the earlier ones cannot be produced.
            tracing::warn!("GGUF vocabulary has {duplicates} duplicate token texts");
        }
        let mut tok = match &self.kind {
            VocabKind::ByteLevelBpe { merges, pre } => byte_level_pipeline(vocab, merges, pre)?,
            VocabKind::SentencePiece {
                scores,
                add_space_prefix,
            } => self.sentencepiece_pipeline(vocab, scores, *add_space_prefix)?,
        };
        if let Some(post) = self.post_processor()? {
            tok.with_post_processor(Some(post));
        }
        let (special, normal) = self.added_tokens();
        tok.add_special_tokens(special).map_err(|e| e.to_string())?;
        tok.add_tokens(normal).map_err(|e| e.to_string())?;
        Ok(tok)
    }

    fn sentencepiece_pipeline(
        &self,
        vocab: Vocab,
        scores: &[f32],
        add_space_prefix: bool,
    ) -> std::result::Result<tokenizers::Tokenizer, String> {
        let merges = merges_from_scores(&self.tokens, scores, &vocab);
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let model = builder.build().map_err(|e| e.to_string())?;
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_normalizer(Some(spm_normalizer(add_space_prefix)?))
            .map_err(|e| e.to_string())?;
        tok.with_decoder(Some(spm_decoder(add_space_prefix)?));
        Ok(tok)
    }

    /// BOS and/or EOS around every encoded sequence, as the metadata asks.
    fn post_processor(&self) -> std::result::Result<Option<TemplateProcessing>, String> {
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = self.eos.filter(|_| self.add_eos);
        if self.add_bos && bos.is_none() {
            tracing::warn!(
                "{KEY_ADD_BOS} is set but the vocabulary has no BOS token; none is added"
            );
        }
        if bos.is_none() && eos.is_none() {
            return Ok(None);
        }
        // Template names, not token texts: a token text may contain `:` or `$`,
        // which the template syntax would misread.
        let mut single = Vec::new();
        let mut specials = Vec::new();
        for (name, id) in [("BOS", bos), ("$A", None), ("EOS", eos)] {
            match id {
                Some(id) => {
                    single.push(name);
                    let text = self.tokens[id as usize].clone();
                    specials.push(SpecialToken::new(name.into(), vec![id], vec![text]));
                }
                None if name == "$A" => single.push(name),
                None => {}
            }
        }
        // A pair is both sequences framed the same way, the second with type id 1.
        let mut pair = single.clone();
        pair.extend(single.iter().map(|&p| if p == "$A" { "$B:1" } else { p }));
        let specials = specials
            .into_iter()
            .collect::<tokenizers::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| e.to_string())?
            .special_tokens(specials)
            .build()
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// (special, ordinary) added tokens: control and unknown tokens, then
    /// user-defined ones. All match the raw input text, before normalization.
    fn added_tokens(&self) -> (Vec<AddedToken>, Vec<AddedToken>) {
        let mut special = Vec::new();
        let mut normal = Vec::new();
        for (text, ty) in self.tokens.iter().zip(&self.types) {
            let is_special = match ty {
                TokenType::Control | TokenType::Unknown => true,
                TokenType::UserDefined => false,
                _ => continue,
            };
            let rstrip =
                self.rstrip_added && !matches!(text.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
            let token = AddedToken::from(text.clone(), is_special)
                .normalized(false)
                .rstrip(rstrip);
            if is_special {
                special.push(token);
            } else {
                normal.push(token);
            }
        }
        (special, normal)
    }

    /// EOS, EOT and EOM ids, then control tokens that are well-known
    /// end-of-generation markers; no duplicates.
    pub(super) fn end_of_generation_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.eos, self.eot, self.eom]
            .into_iter()
            .flatten()
            .collect();
        let markers: Vec<(u32, &str)> = self
            .tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (text, ty))| {
                **ty == TokenType::Control && END_OF_GENERATION.contains(&text.as_str())
            })
            .map(|(id, (text, _))| (id as u32, text.as_str()))
            .collect();
        // gpt-oss (harmony) ends a message with <|end|> but a turn with
        // <|return|> or <|call|>: there <|end|> must not stop generation.
        let has = |t: &str| markers.iter().any(|(_, m)| *m == t);
        let harmony = has("<|return|>") && has("<|call|>");
        for (id, text) in markers {
            let harmony_end = harmony && text == "<|end|>";
            if !harmony_end && !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Added tokens the byte-level decoder would garble, decoded as their text.
    pub(super) fn verbatim_pieces(&self) -> HashMap<u32, VerbatimPiece> {
        if !matches!(self.kind, VocabKind::ByteLevelBpe { .. }) {
            return HashMap::new();
        }
        self.tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (text, ty))| {
                matches!(
                    ty,
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined
                ) && byte_level_garbles(text)
            })
            .map(|(id, (text, ty))| {
                let piece = VerbatimPiece {
                    text: text.clone(),
                    special: *ty != TokenType::UserDefined,
                };
                (id as u32, piece)
            })
            .collect()
    }
}

/// `tokenizer.ggml.tokens`; an empty text becomes `[EMPTY_<id>]` as in llama.cpp,
/// so that every id keeps a distinct entry.
fn read_tokens(meta: &Meta) -> Result<Vec<String>> {
    let mut tokens = meta
        .array_of(KEY_TOKENS, "a string", |v| v.as_str().map(String::from))?
        .ok_or_else(|| meta.missing(KEY_TOKENS))?;
    if tokens.is_empty() {
        return Err(meta.err(KEY_TOKENS, "the vocabulary is empty"));
    }
    for (id, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[EMPTY_{id}]");
        }
    }
    Ok(tokens)
}

/// `tokenizer.ggml.token_type`, one per token; all normal when absent.
fn read_token_types(meta: &Meta, n: usize) -> Result<Vec<TokenType>> {
    match meta.array_of(KEY_TOKEN_TYPE, "an integer", |v| {
        v.as_i64().map(TokenType::from_gguf)
    })? {
        None => Ok(vec![TokenType::Normal; n]),
        Some(types) if types.len() == n => Ok(types),
        Some(types) => Err(meta.err(
            KEY_TOKEN_TYPE,
            format!("has {} entries for {n} tokens", types.len()),
        )),
    }
}

/// `tokenizer.ggml.scores`, one per token; required by SentencePiece vocabularies.
fn read_scores(meta: &Meta, n: usize) -> Result<Vec<f32>> {
    let scores = meta
        .array_of(KEY_SCORES, "a number", |v| v.as_f64().map(|x| x as f32))?
        .ok_or_else(|| meta.missing(KEY_SCORES))?;
    if scores.len() != n {
        return Err(meta.err(
            KEY_SCORES,
            format!("has {} entries for {n} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

/// `tokenizer.ggml.merges` as (left, right) pairs, in rank order.
fn read_merges(meta: &Meta) -> Result<Vec<(String, String)>> {
    let merges = meta
        .array_of(KEY_MERGES, "a string", |v| v.as_str().map(String::from))?
        .ok_or_else(|| meta.missing(KEY_MERGES))?;
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            split_merge(m).ok_or_else(|| {
                meta.err(
                    KEY_MERGES,
                    format!("element {i} ({m:?}) is not 'left right'"),
                )
            })
        })
        .collect()
}

/// Splits `"left right"` at the first space after the first character, as
/// llama.cpp does, so that a left side that is itself a space still parses.
fn split_merge(m: &str) -> Option<(String, String)> {
    let first = m.chars().next()?.len_utf8();
    let pos = first + m[first..].find(' ')?;
    Some((m[..pos].to_string(), m[pos + 1..].to_string()))
}

/// llama.cpp treats a token whose text is an end-of-generation marker as a
/// control token whatever its declared type (some converters mark
/// `<|im_end|>` normal or user-defined); so do we, so that it is matched as a
/// special token and skipped by `decode(.., skip_special)`.
fn promote_end_of_generation(tokens: &[String], types: &mut [TokenType]) {
    for (text, ty) in tokens.iter().zip(types.iter_mut()) {
        if *ty != TokenType::Byte && END_OF_GENERATION.contains(&text.as_str()) {
            *ty = TokenType::Control;
        }
    }
}

// ---------------------------------------------------------------------------
// Byte-level BPE (`gpt2`)
// ---------------------------------------------------------------------------

/// The GPT-2 split regex (llama.cpp's spelling: without the final `\s+`
/// alternative, which changes nothing since unmatched text stays a piece).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3 (`(?i:'s|...)` spelled out, as llama.cpp does).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: Llama 3's, with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5: Qwen2's, with combining marks kept in words.
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Tekken (Mistral Nemo) and GPT-4o (Llama 4): the regexes of their
/// `tokenizer.json`. llama.cpp runs rewritten approximations because
/// `std::regex` lacks `\p{Lu}` and friends; fancy-regex runs the originals.
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// CJK ideographs and Hangul, as DeepSeek's first-generation tokenizers isolate them.
const RE_DEEPSEEK_CJK: &str = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+";

/// llama.cpp's list for `pre = "default"` (and for a missing `pre`).
const PRE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    "[0-9][0-9][0-9]",
];
const PRE_GPT2: &[&str] = &[RE_GPT2];
const PRE_LLAMA3: &[&str] = &[RE_LLAMA3];
const PRE_QWEN2: &[&str] = &[RE_QWEN2];
const PRE_QWEN35: &[&str] = &[RE_QWEN35];
const PRE_STARCODER: &[&str] = &[r"\p{N}", RE_GPT2];
const PRE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"];
const PRE_DEEPSEEK_LLM: &[&str] = &[
    r"[\r\n]",
    // Letters of cased scripts. Spelled as code points: several (U+1F7D,
    // U+2126, U+212A) have canonical equivalents that editors silently
    // substitute, which would turn the ranges into different ones.
    concat!(
        r"\s?[",
        r"A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}",
        r"\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}",
        r"\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}",
        r"\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}",
        r"\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}",
        r"\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}",
        r"\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}",
        r"\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}",
        r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}",
        r"\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}",
        r"\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}",
        r"\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}",
        r"\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}",
        r"\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}",
        r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}",
        "]+",
    ),
    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
    r"\s+$",
    RE_DEEPSEEK_CJK,
    r"\p{N}+",
];
const PRE_DEEPSEEK_CODER: &[&str] = &[
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    RE_DEEPSEEK_CJK,
    r"\p{N}",
];
const PRE_DEEPSEEK3: &[&str] = &[
    r"\p{N}{1,3}",
    r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const PRE_BLOOM: &[&str] = &[r" ?[^(\s|.,!?…。，、।۔،)]+"];

/// The split regexes for `tokenizer.ggml.pre`, following llama.cpp's table.
/// An unknown name is a warning and falls back to GPT-2's regex.
fn pre_tokenizer_spec(pre: Option<&str>) -> PreTokenizerSpec {
    let spec = |regexes, ignore_merges, add_bos| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos,
    };
    let Some(pre) = pre else {
        tracing::warn!("GGUF has no {KEY_PRE}; using llama.cpp's default pre-tokenizer");
        return spec(PRE_DEFAULT, false, false);
    };
    match pre {
        "default" => spec(PRE_DEFAULT, false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "exaone4" => spec(PRE_GPT2, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(PRE_LLAMA3, true, true),
        "dbrx" | "smaug-bpe" => spec(PRE_LLAMA3, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez" | "hunyuan"
        | "solar-open" => spec(PRE_QWEN2, false, false),
        "qwen35" => spec(PRE_QWEN35, false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(PRE_STARCODER, false, false),
        "falcon" => spec(PRE_FALCON, false, false),
        "deepseek-llm" => spec(PRE_DEEPSEEK_LLM, false, false),
        "deepseek-coder" => spec(PRE_DEEPSEEK_CODER, false, false),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            spec(PRE_DEEPSEEK3, false, false)
        }
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(PRE_BLOOM, false, false),
        "tekken" => spec(&[RE_TEKKEN], true, true),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => spec(&[RE_GPT4O], false, false),
        other => {
            tracing::warn!("unknown {KEY_PRE} '{other}'; falling back to the GPT-2 pre-tokenizer");
            spec(PRE_GPT2, false, false)
        }
    }
}

/// Byte-level BPE: regex splits, then bytes as GPT-2 characters, then merges.
fn byte_level_pipeline(
    vocab: Vocab,
    merges: &[(String, String)],
    pre: &PreTokenizerSpec,
) -> std::result::Result<tokenizers::Tokenizer, String> {
    let merges = usable_merges(merges, &vocab);
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut steps = Vec::with_capacity(pre.regexes.len() + 1);
    for re in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("split regex {re:?}: {e}"))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    // The regexes did the splitting; ByteLevel only maps bytes to characters.
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(tok)
}

/// The merges `tokenizers` can hold: both sides and the result in the
/// vocabulary, first rank of a repeated pair kept (llama.cpp keeps the first
/// too). A merge llama.cpp could apply but whose result is not a token would
/// end up as single bytes there; dropping it is the closest we can do.
fn usable_merges(merges: &[(String, String)], vocab: &Vocab) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let usable: Vec<(String, String)> = merges
        .iter()
        .filter(|(a, b)| {
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else {
                return false;
            };
            vocab.contains_key(&format!("{a}{b}")) && seen.insert((ia, ib))
        })
        .cloned()
        .collect();
    if usable.len() < merges.len() {
        tracing::warn!(
            "{} of {} GGUF merges skipped (a side or the result is not a token, or the pair repeats)",
            merges.len() - usable.len(),
            merges.len()
        );
    }
    usable
}

/// Whether the byte-level decoder would turn `text` into something else:
/// it maps a token back to bytes when every character is one of the 256
/// byte-level characters, which changes the text as soon as one of them is
/// not printable ASCII (e.g. a user-defined `ø` would decode to byte 0xF8).
/// llama.cpp prints added tokens as their text; so do we.
fn byte_level_garbles(text: &str) -> bool {
    text.chars().all(is_byte_level_char) && text.chars().any(|c| !c.is_ascii_graphic())
}

// ---------------------------------------------------------------------------
// SentencePiece BPE (`llama`)
// ---------------------------------------------------------------------------

/// Ranked merges equivalent to llama.cpp's score-driven merging: every way to
/// split each token into two tokens, best merged score first (then lower id).
///
/// llama.cpp merges, at each step, the adjacent pair whose concatenation is
/// the highest-scoring token; ranking pairs by that score reproduces it. The
/// one difference is a tie between different tokens of equal score (llama's
/// runs of `▁` all score -1e9), which llama.cpp breaks by position and we by
/// rank; the reference cases show no divergence.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        // Skip the shadowed copy of a duplicated text: its id cannot be produced.
        if vocab.get(text) != Some(&(id as u32)) {
            continue;
        }
        for (cut, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(cut);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// Spaces become `▁`, with one put in front of each run of text when
/// `add_space_prefix` (the text after an added token counts as a new run, as
/// in llama.cpp).
fn spm_normalizer(add_space_prefix: bool) -> std::result::Result<NormalizerWrapper, String> {
    let replace = Replace::new(" ", "▁").map_err(|e| e.to_string())?;
    if !add_space_prefix {
        return Ok(replace.into());
    }
    let steps = vec![Prepend::new("▁".into()).into(), replace.into()];
    Ok(NormalizerSequence::new(steps).into())
}

/// `▁` back to spaces, `<0xNN>` tokens back to bytes, and the leading space
/// the encoder added removed.
fn spm_decoder(add_space_prefix: bool) -> std::result::Result<DecoderWrapper, String> {
    let replace = Replace::new("▁", " ").map_err(|e| e.to_string())?;
    let mut steps: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_tokens_that_byte_level_decoding_garbles() {
        assert!(byte_level_garbles("ø"));
        assert!(!byte_level_garbles("<|im_start|>"));
        // A space is not a byte-level character, so the decoder keeps the text as is.
        assert!(!byte_level_garbles("   "));
        assert!(!byte_level_garbles("<｜end▁of▁sentence｜>"));
    }

    #[test]
    fn merges_split_after_the_first_character() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn score_merges_rank_the_best_result_first() {
        let tokens: Vec<String> = ["a", "b", "ab", "abb", "bb"].map(String::from).into();
        let scores = [0.0, 0.0, -1.0, -3.0, -2.0];
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let expected: Vec<(String, String)> = [("a", "b"), ("b", "b"), ("a", "bb"), ("ab", "b")]
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .into();
        assert_eq!(merges, expected);
    }
}
