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
//!
//! Compiling is the costly part and its input comes from clients, so it is
//! guarded: it runs on a thread of its own whose stack grows with the
//! constraint (llguidance's Lark compiler recurses once per nested rule, and
//! a few thousand nested rules overflow an ordinary 2 MiB stack, which
//! aborts the process); it can be stopped from outside ([`CompileCancel`]);
//! it ends by taking the grammar's first step, so a constraint that cannot
//! produce anything (a `$ref` cycle, a regex too large for the lexer) is
//! refused at compile time rather than failing mid-generation; and its
//! errors are short and free of llguidance's internal state and panic
//! backtraces (those go to the log).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use kiln_model::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{CancellationHandle, Matcher, ParserFactory};
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
    /// The size of the constraint's text in bytes (a JSON schema as compact
    /// JSON, choices together), for size limits: compile time and the
    /// compiler's stack depth grow with it.
    pub fn source_len(&self) -> usize {
        match self {
            Constraint::JsonSchema(schema) => schema.to_string().len(),
            Constraint::JsonObject => 0,
            Constraint::Regex(s) | Constraint::Grammar(s) => s.len(),
            Constraint::Choice(choices) => choices.iter().map(|c| c.len() + 1).sum(),
        }
    }

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

/// Why a constraint was not compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The constraint is wrong, or beyond what the grammar engine can do
    /// (a client's error): a short message naming the problem.
    #[error("invalid constraint: {0}")]
    Invalid(String),
    /// Stopped through its [`CompileCancel`].
    #[error("compiling the constraint was stopped")]
    Cancelled,
    /// No thread could be started to compile on.
    #[error("cannot start a thread to compile the constraint: {0}")]
    Thread(String),
}

/// Stops a compile from another thread (its caller's time ran out, or its
/// client went away): the compile ends at its next phase, or inside the
/// computation of its first step. Clones stop the same compile.
#[derive(Clone, Debug, Default)]
pub struct CompileCancel(Arc<Mutex<CancelState>>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: bool,
    /// The matcher whose first step is being computed, if it has started.
    step: Option<CancellationHandle>,
}

impl CompileCancel {
    /// Asks the compile to stop (it does at its next check).
    pub fn cancel(&self) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.cancelled = true;
        if let Some(h) = &st.step {
            h.cancel();
        }
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).cancelled
    }

    fn check(&self) -> Result<(), CompileError> {
        if self.is_cancelled() {
            Err(CompileError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Lets [`Self::cancel`] interrupt the matcher behind `h` from now on.
    fn watch(&self, h: CancellationHandle) -> Result<(), CompileError> {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if st.cancelled {
            return Err(CompileError::Cancelled);
        }
        st.step = Some(h);
        Ok(())
    }
}

/// A constraint compiled for one model's vocabulary, whose first step has
/// been computed without error. Clones are independent matchers over the
/// same compiled grammar (for the `n` choices or inputs that share it).
#[derive(Clone)]
pub struct Compiled {
    matcher: Matcher,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").finish_non_exhaustive()
    }
}

impl Compiled {
    pub(crate) fn into_matcher(self) -> Matcher {
        self.matcher
    }
}

/// Stack for a compiling thread: a base, plus 1 KiB per byte of constraint
/// (measured: a chain of 13,000 nested rules in 128 KiB of Lark needs
/// between 32 and 64 MiB, about 4 KiB per rule of 7 to 10 bytes). It is
/// address space; only the pages a compile touches take memory.
fn compile_stack(source_len: usize) -> usize {
    (8usize << 20).saturating_add(source_len.saturating_mul(1024))
}

/// Longest error message passed on to a client; llguidance's messages can
/// quote the whole line of grammar they fail on.
const MAX_MESSAGE: usize = 400;

/// A grammar engine error as a client may see it: llguidance's parser
/// state dump (`<state>…`, `<grammar>…`, or its `<non-verbose/>` stand-in)
/// cut off, a panic (whose message
/// carries a backtrace with source paths) replaced by a plain sentence,
/// and the rest shortened. The full text goes to the log.
pub(crate) fn client_message(raw: &str) -> String {
    if raw.starts_with("panic:") || raw.contains("<backtrace>") {
        tracing::warn!("the grammar engine panicked on a constraint: {raw}");
        return "the grammar engine cannot handle this constraint (an internal limit was hit; \
                make it smaller or simpler)"
            .into();
    }
    let cut = ["<state>", "<grammar>", "<non-verbose/>"]
        .iter()
        .filter_map(|m| raw.find(m))
        .min()
        .unwrap_or(raw.len());
    if cut < raw.len() {
        tracing::debug!("grammar engine error: {raw}");
    }
    let msg = raw[..cut].trim_end();
    if msg.len() <= MAX_MESSAGE {
        return msg.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

/// How the error message of a request whose constraint failed during
/// generation begins: the grammar engine hit one of its limits part way
/// (too many alternatives alive at once, say), which is the constraint's
/// fault, not the model's.
pub const CONSTRAINT_FAILED: &str = "constrained decoding failed";

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
        // Errors without the parser's state and grammar appended: clients
        // see them.
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Compiles `c` on a thread of its own and waits for it (see
    /// [`Self::compile_in_background`]); the error names what is wrong
    /// with it (a schema keyword llguidance does not support, a bad regex, a
    /// grammar syntax error, a grammar that cannot produce anything).
    pub fn compile(&self, c: &Constraint) -> Result<Compiled, CompileError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.compile_in_background(c.clone(), CompileCancel::default(), move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| {
            CompileError::Thread("the compiling thread ended without a result".into())
        })?
    }

    /// Starts compiling `c` on a new thread, with a stack deep enough for
    /// its nesting, and returns at once; `done` gets the result on that
    /// thread, which ends right after it (so whatever `done` holds is
    /// released when the work really stops). `cancel` stops it early.
    pub fn compile_in_background(
        &self,
        c: Constraint,
        cancel: CompileCancel,
        done: impl FnOnce(Result<Compiled, CompileError>) + Send + 'static,
    ) -> Result<(), CompileError> {
        let guide = self.clone();
        std::thread::Builder::new()
            .name("kiln-grammar".into())
            .stack_size(compile_stack(c.source_len()))
            .spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(|| guide.compile_here(&c, &cancel)))
                    .unwrap_or_else(|_| {
                        Err(CompileError::Invalid(client_message(
                            "panic: while compiling a constraint",
                        )))
                    });
                done(r)
            })
            .map(drop)
            .map_err(|e| CompileError::Thread(e.to_string()))
    }

    /// Compiles on the calling thread, then takes the grammar's first step
    /// (its forced tokens and the mask after them) on a copy: a constraint
    /// that fails there would otherwise fail at the request's first token.
    fn compile_here(
        &self,
        c: &Constraint,
        cancel: &CompileCancel,
    ) -> Result<Compiled, CompileError> {
        let invalid = |e: &str| CompileError::Invalid(client_message(e));
        let grammar = c.grammar().map_err(|e| invalid(&e))?;
        cancel.check()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(&e.to_string()))?;
        cancel.check()?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(&e));
        }
        let mut first = matcher.clone().into_cancellable();
        if let Some(h) = first.cancellation_handle() {
            cancel.watch(h)?;
        }
        first.consume_ff_tokens();
        let step = match first.get_error() {
            Some(e) => Err(e),
            None => first.compute_mask_or_eos().map_err(|e| e.to_string()),
        };
        cancel.check()?;
        match step {
            Err(e) => Err(invalid(&format!(
                "it cannot produce a first token ({})",
                client_message(&e)
            ))),
            Ok(mask) if mask.num_set() == 0 => Err(invalid("no output can satisfy it")),
            Ok(_) => Ok(Compiled { matcher }),
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
            let mask = catch_unwind(AssertUnwindSafe(|| {
                m.compute_mask_or_eos()
                    .map_err(|e| client_message(&e.to_string()))
            }))
            .unwrap_or_else(|_| Err("the grammar engine failed (a panic)".into()));
            self.mask = Some(mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_drop_dumps_backtraces_and_length() {
        assert_eq!(
            client_message("lexer error: too many expressions constructed\n<non-verbose/>"),
            "lexer error: too many expressions constructed"
        );
        assert_eq!(
            client_message(
                "NoExtensionBias\n<state>\nTokens: ⟦⟧\nParser: {}</state><grammar>\n</grammar>"
            ),
            "NoExtensionBias"
        );
        let panic = "panic: assertion failed: x < y\n<backtrace>\n   0: llguidance::a\n             at /rustc/abc/library/std/src/panicking.rs:1:1\n</backtrace>";
        let m = client_message(panic);
        assert!(m.contains("cannot handle this constraint"), "{m}");
        assert!(
            !m.contains("panic") && !m.contains(".rs") && !m.contains("rustc"),
            "{m}"
        );
        // Long messages (a quoted line of grammar) are cut on a character
        // boundary.
        let long = format!("bad grammar at {}", "é".repeat(1000));
        let m = client_message(&long);
        assert!(m.len() <= MAX_MESSAGE + '…'.len_utf8(), "{}", m.len());
        assert!(m.ends_with('…'));
    }

    #[test]
    fn source_len_counts_the_constraint_text() {
        assert_eq!(Constraint::Regex("[0-9]+".into()).source_len(), 6);
        assert_eq!(
            Constraint::Choice(vec!["ab".into(), "c".into()]).source_len(),
            5
        );
        assert_eq!(
            Constraint::JsonSchema(json!({"type": "object"})).source_len(),
            17
        );
        assert_eq!(Constraint::JsonObject.source_len(), 0);
    }
}
