//! Incremental detokenization: text deltas as tokens arrive, never cutting a
//! UTF-8 character in half.
//!
//! Byte-level tokenizers split multi-byte characters (Japanese, emoji) across
//! tokens, and SentencePiece decoders treat a sequence's first token
//! specially, so decoding each token alone is wrong. Instead we decode a
//! short window of recent tokens twice — without and with the newest ones —
//! and emit the difference once it no longer ends in an incomplete character.
//!
//! The concatenated deltas and the final [`IncrementalDetokenizer::flush`]
//! equal the decode of all generated ids at once (after the context's text),
//! with one exception: Hugging Face's `ByteFallback` decoder (Llama 2,
//! Mistral) turns *every* byte of a run of `<0xNN>` tokens into U+FFFD once
//! the run is not valid UTF-8, so a whole-sequence decode of ids that end
//! mid-character or hold stray bytes replaces characters that the stream had
//! already, correctly, let out; the stream keeps them and replaces only the
//! bad bytes. Tests: `tests/detok_multibyte.rs` (GPT-2, Mistral, Qwen3 and
//! SmolLM2 tokenizers on Japanese, emoji and mixed text).

use kiln_model::tokenizer::Tokenizer;

use crate::Result;

/// Streaming decoder state for one sequence.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this have had their text emitted.
    read_offset: usize,
    skip_special: bool,
    /// The context window has not yet been checked to start on a character boundary.
    unsettled: bool,
}

const REPLACEMENT: char = '\u{FFFD}';

/// Tokens that may wait for a character to complete. A UTF-8 character has at
/// most 4 bytes, so text that is valid completes far sooner; only bytes that
/// never form a character (or a long run of tokens that decode to nothing)
/// reach this, and are then let out as they decode.
const MAX_PENDING: usize = 16;

/// The text `full` adds after `prefix`, which has already been emitted.
///
/// Normally `full` extends `prefix`. Hugging Face's `ByteFallback` decoder is
/// the exception: once a run of `<0xNN>` byte tokens is not valid UTF-8, it
/// replaces every byte of the run with U+FFFD, including characters of the run
/// that were complete (and emitted) before. The emitted text cannot be taken
/// back, so skip the common start and then one replacement per byte of the
/// rewritten emitted text: nothing is emitted twice, and the stream keeps the
/// characters the whole-sequence decode replaces.
fn new_text<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    let mut rest = &full[common..];
    for _ in 0..prefix.len() - common {
        match rest.strip_prefix(REPLACEMENT) {
            Some(r) => rest = r,
            None => break,
        }
    }
    rest
}

impl IncrementalDetokenizer {
    /// A decoder whose output starts after `context` (for example the prompt);
    /// a few context tokens are kept so the first delta decodes in context.
    pub fn new(context: &[u32], skip_special: bool) -> Self {
        let keep = context.len().min(6);
        let ids = context[context.len() - keep..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            unsettled: !ids.is_empty(),
            ids,
            skip_special,
        }
    }

    /// Adds one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.unsettled {
            self.settle_context(tok)?;
        }
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        // Wait while the text ends in an incomplete character (decoded as U+FFFD;
        // while it is incomplete, a byte-fallback decoder may also have replaced
        // complete characters of the same byte run, so `full` need not start with
        // `prefix` yet), or while the new tokens added no text. A sequence that
        // never completes (bytes that are not UTF-8) is let out after
        // `MAX_PENDING` tokens, so the window stays short.
        let pending = self.ids.len() - self.read_offset;
        if (full.ends_with(REPLACEMENT) || full == prefix) && pending < MAX_PENDING {
            return Ok(String::new());
        }
        let delta = new_text(&prefix, &full).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(delta)
    }

    /// Emits whatever is pending at the end of generation, even an incomplete
    /// character (as U+FFFD), so nothing is silently dropped.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(new_text(&prefix, &full).to_string())
    }

    /// Makes the context window start and end on character boundaries, once,
    /// before the first generated token: the smallest start and the largest end
    /// whose text neither starts nor ends with U+FFFD (usually the whole window,
    /// checked with one decode).
    ///
    /// A window starting inside a character is harmful with a byte-fallback
    /// decoder, which replaces a whole run of byte tokens once the run is
    /// invalid, generated bytes of the same run included. A context ending
    /// inside a character (a prompt given as token ids) is completed by the
    /// generated tokens: its last bytes become pending, and the character is
    /// emitted with them. When no such window exists, it is kept as it is.
    fn settle_context(&mut self, tok: &Tokenizer) -> Result<()> {
        self.unsettled = false;
        let (first, last) = (self.prefix_offset, self.read_offset);
        for end in (first + 1..=last).rev() {
            for start in first..end {
                let text = tok.decode(&self.ids[start..end], self.skip_special)?;
                if !text.starts_with(REPLACEMENT) && !text.ends_with(REPLACEMENT) {
                    self.prefix_offset = start;
                    self.read_offset = end;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Keeps memory bounded for long generations.
    fn compact(&mut self) {
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    /// A SentencePiece-style tokenizer with byte fallback (like Llama 2's and
    /// Mistral's): `<unk>`, `<s>`, `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>`
    /// (ids 3..=258), then `▁` (259), `a` (260) and `▁a` (261).
    fn byte_fallback_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
        }
        for (i, t) in ["▁", "a", "▁a"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(259 + i));
        }
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "vocab": vocab, "merges": ["▁ a"]}
        });
        let path = std::env::temp_dir().join(format!(
            "kiln-detok-byte-fallback-{}-{:?}.json",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, tokenizer.to_string()).unwrap();
        let tok = Tokenizer::from_hf_files(&path, None).unwrap();
        let _ = std::fs::remove_file(&path);
        tok
    }

    /// Byte-token ids of `text`.
    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(|b| 3 + u32::from(b)).collect()
    }

    /// Streams `ids` after `context`: every delta, then the flush.
    fn stream(tok: &Tokenizer, context: &[u32], ids: &[u32]) -> (Vec<String>, String) {
        let mut d = IncrementalDetokenizer::new(context, true);
        let deltas = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        (deltas, d.flush(tok).unwrap())
    }

    #[test]
    fn the_tokenizer_replaces_a_whole_invalid_byte_run() {
        // What the fixes below are about: a complete character followed by the
        // start of the next decodes as replacements only.
        let tok = byte_fallback_tokenizer();
        let ids = bytes("🇯🇵");
        assert_eq!(tok.decode(&ids[..4], true).unwrap(), "🇯");
        assert_eq!(tok.decode(&ids[..5], true).unwrap(), "\u{FFFD}".repeat(5));
        assert_eq!(tok.decode(&ids, true).unwrap(), "🇯🇵");
    }

    #[test]
    fn adjacent_byte_fallback_characters_stream_intact() {
        // Before the fix, "🇯" was emitted and then the rewritten run as "�����"
        // (taken for a decoder normalisation and resynchronised).
        let tok = byte_fallback_tokenizer();
        let ids = bytes("🇯🇵𠮷吾");
        let (deltas, rest) = stream(&tok, &[], &ids);
        for d in &deltas {
            assert!(!d.contains(REPLACEMENT), "{deltas:?}");
        }
        assert_eq!(deltas.concat() + &rest, "🇯🇵𠮷吾");
        assert_eq!(rest, "");
    }

    #[test]
    fn a_context_window_starting_mid_character_is_trimmed() {
        // The last 6 context tokens start inside "𠮷" (4 bytes): undecodable on
        // its own, it would turn the generated bytes of the same run into "�" too.
        let tok = byte_fallback_tokenizer();
        let context = [vec![261], bytes("𠮷吾")].concat();
        let (deltas, rest) = stream(&tok, &context, &bytes("猫🗼"));
        assert_eq!(deltas.concat() + &rest, "猫🗼");
        assert!(
            deltas.iter().all(|d| !d.contains(REPLACEMENT)),
            "{deltas:?}"
        );
        // A context that ends inside a character: the generated byte completes it.
        let context = [vec![261], bytes("輩")[..2].to_vec()].concat();
        let (deltas, rest) = stream(&tok, &context, &[bytes("輩")[2], 261]);
        assert_eq!(deltas.concat() + &rest, "輩 a");
        // With nothing to complete it, the pending bytes are flushed as replacements.
        let (deltas, rest) = stream(&tok, &context, &[261]);
        assert_eq!(deltas.concat() + &rest, "\u{FFFD}\u{FFFD} a");
        // A context that is all broken is kept as it is.
        let context = bytes("輩")[1..].to_vec();
        let (deltas, rest) = stream(&tok, &context, &[261]);
        assert_eq!(deltas.concat() + &rest, " a");
    }

    #[test]
    fn invalid_bytes_are_emitted_once_without_growing_the_window() {
        let tok = byte_fallback_tokenizer();
        let mut d = IncrementalDetokenizer::new(&[], true);
        let mut out = String::new();
        for _ in 0..1000 {
            // A lone continuation byte never completes a character.
            out += &d.push(&tok, 3 + 0x80).unwrap();
            assert!(d.ids.len() - d.prefix_offset <= 2 * MAX_PENDING);
            assert!(d.ids.len() <= 64 + 2 * MAX_PENDING + 1);
        }
        out += &d.flush(&tok).unwrap();
        assert_eq!(out, "\u{FFFD}".repeat(1000));
    }

    #[test]
    fn a_long_generation_decodes_a_short_window() {
        let tok = byte_fallback_tokenizer();
        let mut d = IncrementalDetokenizer::new(&[261; 100], true);
        let mut out = String::new();
        for _ in 0..1000 {
            out += &d.push(&tok, 261).unwrap();
            assert!(
                d.ids.len() - d.prefix_offset <= 2,
                "window of {}",
                d.ids.len() - d.prefix_offset
            );
            assert!(d.ids.len() <= 66);
        }
        out += &d.flush(&tok).unwrap();
        assert_eq!(out, " a".repeat(1000));
    }

    #[test]
    fn a_rewritten_run_is_not_emitted_twice() {
        // "\n\n" is complete and emitted; the invalid byte after it makes the
        // tokenizer decode the run as "���". The stream keeps "\n\n" and adds
        // one replacement for the bad byte, never "\n\n���".
        let tok = byte_fallback_tokenizer();
        let ids = [bytes("\n\n"), vec![3 + 0x87, 261]].concat();
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            "\u{FFFD}\u{FFFD}\u{FFFD} a"
        );
        let (deltas, rest) = stream(&tok, &[], &ids);
        assert_eq!(deltas.concat() + &rest, "\n\n\u{FFFD} a");
    }

    #[test]
    fn flush_emits_an_incomplete_character_as_replacements() {
        let tok = byte_fallback_tokenizer();
        let ids = [vec![261], bytes("吾")[..2].to_vec()].concat();
        let (deltas, rest) = stream(&tok, &[], &ids);
        assert_eq!(deltas.concat(), "a");
        assert_eq!(rest, "\u{FFFD}\u{FFFD}");
        assert_eq!(deltas.concat() + &rest, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn skipped_special_tokens_keep_the_spaces_around_them() {
        let tok = byte_fallback_tokenizer();
        let ids = [261, 2, 261, 1, 2, 259, 260];
        let (deltas, rest) = stream(&tok, &[], &ids);
        assert_eq!(deltas.concat() + &rest, "a a a");
        assert_eq!(tok.decode(&ids, true).unwrap(), "a a a");
    }
}
