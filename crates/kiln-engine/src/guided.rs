//! Constrained ("guided") decoding: output that must match a JSON schema, a
//! regular expression, one of a list of choices or a Lark grammar.
//!
//! [`Guide`] is built once per engine from the model's own tokenizer (each
//! id's exact bytes, see [`Tokenizer::token_bytes`]) and compiles a request's
//! [`Constraint`] into a [`Matcher`] with `llguidance`. The engine keeps the
//! matcher with its sequence: before a step it computes the set of tokens the
//! grammar allows next (on a helper thread, while the model runs the step),
//! masks every other token out before sampling, feeds the chosen token back,
//! and appends the tokens the grammar forces without sampling them.

use std::sync::Arc;

use kiln_model::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object` response format).
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these texts.
    Choice(Vec<String>),
    /// Text of this grammar, in llguidance's Lark dialect.
    Grammar(String),
}

impl Constraint {
    /// The grammar `llguidance` compiles. JSON is written compactly (no
    /// optional whitespace) unless the schema's `x-guidance` says otherwise:
    /// a small model left free to add whitespace can spend its whole token
    /// budget on newlines.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                let mut schema = schema.clone();
                match &mut schema {
                    Value::Object(map) => {
                        map.entry("x-guidance")
                            .or_insert_with(|| json!({"whitespace_flexible": false}));
                    }
                    Value::Bool(_) => {}
                    other => {
                        return Err(format!(
                            "the JSON schema must be an object or a boolean, got {other}"
                        ))
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": {"whitespace_flexible": false}}),
            ),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            Constraint::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// Compiles constraints for one model's vocabulary.
#[derive(Clone)]
pub struct Guide {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl Guide {
    /// Builds the token trie from `tokenizer` for a model whose logits rows
    /// have `vocab_size` entries (ids past the tokenizer's are never allowed);
    /// `eos_ids` are the ids that end a sequence, the first one being the one
    /// the grammar asks for when it is complete.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, String> {
        let n = vocab_size.max(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = tokenizer
            .token_bytes(n)
            .into_iter()
            .map(|t| {
                if t.special {
                    // llguidance's convention: a special token is its text
                    // after a 0xFF byte, which no text contains.
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(&t.bytes);
                    b
                } else {
                    t.bytes
                }
            })
            .collect();
        let eos = eos_ids
            .iter()
            .copied()
            .find(|&e| (e as usize) < n)
            .ok_or("the model has no end-of-sequence token, which a grammar needs")?;
        let mut info = TokRxInfo::new(n as u32, eos);
        info.tok_bos = tokenizer.bos_id();
        let eos_all: Vec<TokenId> = eos_ids
            .iter()
            .copied()
            .filter(|&e| (e as usize) < n)
            .collect();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_all);
        let env: llguidance::toktrie::TokEnv = Arc::new(KilnTokEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Compiles `c`; the error names what is wrong with it (a schema
    /// keyword llguidance does not support, a bad regex, a grammar syntax
    /// error).
    pub fn compile(&self, c: &Constraint) -> Result<Matcher, String> {
        let grammar = c.grammar()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(matcher),
        }
    }

    /// Ids in the grammar's vocabulary (the model's logits row, or the
    /// tokenizer's ids if it has more); masks have this many entries.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }
}

/// llguidance's view of kiln's tokenizer: the trie of token bytes, and
/// tokenization through kiln's own pipeline (so forced tokens are the ones
/// the model would see for the same text).
struct KilnTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for KilnTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            // A text the tokenizer refuses is spelled greedily from the trie.
            self.tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// A sequence's grammar state in the engine.
pub(crate) struct GuideState {
    pub matcher: Matcher,
    /// The tokens allowed next, computed for the sequence's current tokens;
    /// `None` until computed (and again after each token).
    pub mask: Option<Result<SimpleVob, String>>,
}

impl GuideState {
    pub fn new(matcher: Matcher) -> Self {
        Self {
            matcher,
            mask: None,
        }
    }

    /// Computes the mask if it is not there yet. A panic inside the
    /// grammar engine becomes this request's error, not the engine's end.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            let m = &mut self.matcher;
            let mask = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                m.compute_mask_or_eos().map_err(|e| e.to_string())
            }))
            .unwrap_or_else(|_| Err("the grammar engine failed (a panic)".into()));
            self.mask = Some(mask);
        }
    }
}
