//! Tokenizers: text to token ids and back.
//!
//! Every tokenizer is a Hugging Face `tokenizers` pipeline. A `tokenizer.json`
//! loads as it is; a GGUF file's tokenizer (its vocabulary, merges and token
//! types in `tokenizer.ggml.*` metadata) is converted into the same pipeline
//! at load, so both sources share one encode/decode path.
//!
//! The converter from GGUF metadata lives in `from_gguf`; this module is the
//! facade every caller uses, plus the reading of token strings as bytes
//! (which constrained decoding needs).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

mod from_gguf;

use from_gguf::GgufVocab;

/// A loaded tokenizer plus the special ids generation needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// Added tokens that the decoder would garble, decoded as their text instead
    /// (see `from_gguf::byte_level_garbles`). Empty for most vocabularies.
    verbatim: HashMap<u32, VerbatimPiece>,
}

/// The text an added token decodes to, and whether `skip_special` drops it.
#[derive(Debug, Clone)]
struct VerbatimPiece {
    text: String,
    special: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

impl Tokenizer {
    /// Loads `tokenizer.json`, with BOS/EOS from `tokenizer_config.json` when given.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let bytes = crate::files::read_bounded(
            tokenizer_json,
            crate::files::MAX_TOKENIZER_BYTES,
            "a tokenizer.json",
        )?;
        let cfg = tokenizer_config.map(crate::loader::read_json).transpose()?;
        Self::from_hf_bytes(&bytes, cfg.as_ref(), tokenizer_json)
    }

    /// A `tokenizer.json`'s bytes, with BOS/EOS from a parsed
    /// `tokenizer_config.json`; `origin` names where the bytes came from in
    /// errors (a file, or a prepared model that embeds them).
    pub fn from_hf_bytes(
        bytes: &[u8],
        tokenizer_config: Option<&serde_json::Value>,
        origin: &Path,
    ) -> Result<Self> {
        let bad = |msg: String| ModelError::Format {
            path: origin.to_path_buf(),
            msg: format!("cannot load tokenizer: {msg}"),
        };
        // The `tokenizers` crate panics on some malformed files (an `expect`
        // in its decoder section, found by tests/fuzz.rs): an error here.
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|p| bad(format!("the file is malformed ({})", panic_text(&*p))))?
            .map_err(|e| bad(e.to_string()))?;
        let mut tok = Self {
            inner,
            bos_id: None,
            eos_ids: Vec::new(),
            verbatim: HashMap::new(),
        };
        if let Some(cfg) = tokenizer_config {
            tok.bos_id = special_token_name(cfg.get("bos_token")).and_then(|t| tok.token_to_id(&t));
            if let Some(id) =
                special_token_name(cfg.get("eos_token")).and_then(|t| tok.token_to_id(&t))
            {
                tok.eos_ids.push(id);
            }
        }
        Ok(tok)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Missing or malformed metadata is a [`ModelError::Format`] naming the key.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let vocab = GgufVocab::read(file)?;
        let inner = vocab.build().map_err(|msg| ModelError::Format {
            path: file.path().to_path_buf(),
            msg: format!("cannot build the tokenizer from tokenizer.ggml.* metadata: {msg}"),
        })?;
        Ok(Self {
            inner,
            bos_id: vocab.bos,
            eos_ids: vocab.end_of_generation_ids(),
            verbatim: vocab.verbatim_pieces(),
        })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer adds around a
    /// sequence (a BOS for llama-style tokenizers). Special-token strings in the
    /// text (`<|im_start|>`) become their ids, unless turned off with
    /// [`Tokenizer::set_parse_special`].
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether [`Tokenizer::encode`] turns the text of special (control) tokens
    /// into their ids; on by default. Off, `<|im_start|>` in the input is
    /// tokenized as ordinary text (llama.cpp's `parse_special = false`), which
    /// is what untrusted user text wants. User-defined tokens match either way.
    pub fn set_parse_special(&mut self, parse: bool) {
        self.inner.set_encode_special_tokens(!parse);
    }

    /// Text of `ids`; `skip_special` drops control tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if self.verbatim.is_empty() {
            return self.inner.decode(ids, skip_special).map_err(tok_err);
        }
        // Decode the runs between verbatim tokens with the pipeline, and the
        // verbatim tokens as their text.
        let mut out = String::new();
        let mut start = 0;
        for (i, id) in ids.iter().enumerate() {
            if let Some(piece) = self.verbatim.get(id) {
                out += &self
                    .inner
                    .decode(&ids[start..i], skip_special)
                    .map_err(tok_err)?;
                if !(skip_special && piece.special) {
                    out += &piece.text;
                }
                start = i + 1;
            }
        }
        out += &self
            .inner
            .decode(&ids[start..], skip_special)
            .map_err(tok_err)?;
        Ok(out)
    }

    /// The token string of an id (in the vocabulary's own spelling, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Ids that end a sequence.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The exact bytes every id from 0 to `n - 1` stands for, so that a
    /// grammar engine can build its token trie from this tokenizer rather
    /// than load a second one: byte-level characters (`Ġ`) and byte-fallback
    /// tokens (`<0x0A>`) become the bytes they decode to, SentencePiece's `▁`
    /// a space, added tokens their text. Ids the tokenizer does not know
    /// (a model's padded vocabulary) get no bytes.
    pub fn token_bytes(&self, n: usize) -> Vec<TokenBytes> {
        let added = self.inner.get_added_tokens_decoder();
        let kind = PieceKind::of(self.inner.get_decoder());
        (0..n)
            .map(|i| {
                let id = i as u32;
                if let Some(p) = self.verbatim.get(&id) {
                    return TokenBytes {
                        bytes: p.text.as_bytes().to_vec(),
                        special: p.special,
                    };
                }
                if let Some(t) = added.get(&id) {
                    return TokenBytes {
                        bytes: t.content.as_bytes().to_vec(),
                        special: t.special,
                    };
                }
                let bytes = match self.inner.id_to_token(id) {
                    Some(piece) => kind.bytes(&piece),
                    None => Vec::new(),
                };
                TokenBytes {
                    bytes,
                    special: false,
                }
            })
            .collect()
    }
}

/// One token's bytes, for [`Tokenizer::token_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBytes {
    /// What the token adds to the text (a special token's own text).
    pub bytes: Vec<u8>,
    /// A control token (`<|im_end|>`), not text a grammar can produce.
    pub special: bool,
}

/// How a vocabulary spells bytes in its token strings, read from its decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// GPT-2's byte alphabet (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` is one byte.
    SentencePiece,
    /// The token string is its text.
    Plain,
}

impl PieceKind {
    fn of(decoder: Option<&DecoderWrapper>) -> Self {
        let steps: &[DecoderWrapper] = match decoder {
            Some(DecoderWrapper::Sequence(seq)) => seq.get_decoders(),
            Some(d) => std::slice::from_ref(d),
            None => &[],
        };
        if steps
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteLevel(_)))
        {
            Self::ByteLevel
        } else if steps.iter().any(|d| {
            matches!(
                d,
                DecoderWrapper::ByteFallback(_)
                    | DecoderWrapper::Metaspace(_)
                    | DecoderWrapper::Replace(_)
            )
        }) {
            Self::SentencePiece
        } else {
            Self::Plain
        }
    }

    fn bytes(self, piece: &str) -> Vec<u8> {
        match self {
            Self::ByteLevel => piece
                .chars()
                .map(byte_level_byte)
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| piece.as_bytes().to_vec()),
            Self::SentencePiece => match byte_fallback_byte(piece) {
                Some(b) => vec![b],
                None => piece.replace('▁', " ").into_bytes(),
            },
            Self::Plain => piece.as_bytes().to_vec(),
        }
    }
}

/// The byte a GPT-2 byte-level character stands for: printable Latin-1
/// stands for itself, U+0100 onwards for the other 68 bytes in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if is_byte_level_char(c) && code < 0x100 {
        return u8::try_from(code).ok();
    }
    let n = code.checked_sub(0x100)? as usize;
    (0u8..=255)
        .filter(|&b| !is_byte_level_char(char::from(b)))
        .nth(n)
        .filter(|_| is_byte_level_char(c))
}

/// The byte of a `<0xNN>` byte-fallback token.
fn byte_fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// `"<s>"` or `{"content": "<s>", ...}` as `tokenizer_config.json` writes special tokens.
fn special_token_name(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// One of GPT-2's byte characters: printable Latin-1 stands for itself, the
/// other 68 byte values are shifted to U+0100..=U+0143.
fn is_byte_level_char(c: char) -> bool {
    matches!(c as u32, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF | 0x100..=0x143)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_characters_map_back_to_every_byte() {
        let bytes: Vec<u8> = (0x21u32..=0x143)
            .filter_map(char::from_u32)
            .filter_map(byte_level_byte)
            .collect();
        let mut sorted = bytes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "every byte once");
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('€'), None);
        assert_eq!(byte_fallback_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_fallback_byte("<0x0A"), None);
        assert_eq!(PieceKind::SentencePiece.bytes("▁Hello"), b" Hello".to_vec());
    }

    #[test]
    fn byte_level_alphabet_has_256_chars() {
        let n = (0..0x200u32)
            .filter_map(char::from_u32)
            .filter(|&c| is_byte_level_char(c))
            .count();
        assert_eq!(n, 256);
    }
}
