//! Incremental detokenization: text deltas as tokens arrive, never cutting a
//! UTF-8 character in half.
//!
//! Byte-level tokenizers split multi-byte characters (Japanese, emoji) across
//! tokens, and SentencePiece decoders treat a sequence's first token
//! specially, so decoding each token alone is wrong. Instead we decode a
//! short window of recent tokens twice — without and with the newest ones —
//! and emit the difference once it no longer ends in an incomplete character.

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
}

const REPLACEMENT: char = '\u{FFFD}';

impl IncrementalDetokenizer {
    /// A decoder whose output starts after `context` (for example the prompt);
    /// a few context tokens are kept so the first delta decodes in context.
    pub fn new(context: &[u32], skip_special: bool) -> Self {
        let keep = context.len().min(6);
        let ids = context[context.len() - keep..].to_vec();
        Self {
            prefix_offset: 0,
            read_offset: ids.len(),
            ids,
            skip_special,
        }
    }

    /// Adds one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.ends_with(REPLACEMENT) || full.len() <= prefix.len() || !full.starts_with(&prefix) {
            // Either a character is still incomplete, or the window's decoding is not yet
            // stable: wait for more tokens.
            if !full.starts_with(&prefix) {
                return self.resync(tok, &prefix, &full);
            }
            return Ok(String::new());
        }
        let delta = full[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(delta)
    }

    /// Emits whatever is pending at the end of generation, even an incomplete
    /// character (as U+FFFD), so nothing is silently dropped.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }

    /// The decoder changed earlier text (rare normalisation effects): emit the
    /// part after the longest common prefix and restart the window.
    fn resync(&mut self, _tok: &Tokenizer, prefix: &str, full: &str) -> Result<String> {
        let common = prefix
            .char_indices()
            .zip(full.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        let delta = full[common..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(delta)
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
