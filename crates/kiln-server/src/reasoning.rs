//! `option.reasoning_parser`: a reasoning model's thinking, written between
//! `<think>` and `</think>`, is answered as the chat message's
//! `reasoning_content` rather than its `content` (and streamed as
//! `delta.reasoning_content`), as DJL does through vLLM's reasoning parsers
//! (`djl_python/properties_manager/vllm_rb_properties.py`
//! `reasoning_parser`, passed to vLLM's `OpenAIServingChat`).
//!
//! Two conventions, by parser name:
//! - `qwen3`: the model writes both tags itself; text without a complete
//!   `<think>...</think>` is all content (thinking switched off).
//! - `deepseek_r1`: the chat template opens `<think>` in the prompt, so the
//!   output starts inside the thinking; everything before `</think>` is
//!   reasoning (a leading `<think>` is dropped), and output that never
//!   closes it is all reasoning.
//! - `openai_gptoss` (gpt-oss's harmony format, [`crate::harmony`]): the
//!   `analysis` channel is reasoning, the `final` channel content; calls
//!   (messages `to=functions.NAME`) pass on as written for the `openai`
//!   tool-call parser. Its markers are special tokens: the server keeps
//!   them in the text for this parser. A model whose chat template writes
//!   harmony gets this parser without `option.reasoning_parser` too
//!   ([`for_chat`]).

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// A reasoning-output convention kiln can split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// Qwen3: `<think>...</think>` written by the model.
    Qwen3,
    /// DeepSeek-R1: thinking starts in the prompt and ends at `</think>`.
    DeepSeekR1,
    /// gpt-oss: harmony channels (vLLM's `openai_gptoss`).
    GptOss,
}

impl ReasoningParser {
    /// The names kiln implements, as listed in errors.
    pub const ALLOWED: &'static str = "qwen3, deepseek_r1, openai_gptoss";

    /// Parses a parser name (vLLM's spelling).
    pub fn parse(name: &str) -> Option<ReasoningParser> {
        match name {
            "qwen3" => Some(ReasoningParser::Qwen3),
            "deepseek_r1" => Some(ReasoningParser::DeepSeekR1),
            "openai_gptoss" | "gpt_oss" => Some(ReasoningParser::GptOss),
            _ => None,
        }
    }

    /// The name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningParser::Qwen3 => "qwen3",
            ReasoningParser::DeepSeekR1 => "deepseek_r1",
            ReasoningParser::GptOss => "openai_gptoss",
        }
    }

    /// Splits a whole output into (reasoning, content).
    pub fn split(self, text: &str) -> (Option<String>, String) {
        let mut s = Splitter::new(self);
        let (mut r, mut c) = s.push(text);
        let (r2, c2) = s.finish();
        r.push_str(&r2);
        c.push_str(&c2);
        match (self, s.saw_close) {
            // Qwen3 without a closed block: the output is plain content.
            (ReasoningParser::Qwen3, false) => (None, text.to_string()),
            _ => ((!r.is_empty()).then_some(r), c),
        }
    }
}

/// Where a streamed output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet: the output may still open with `<think>`.
    Start,
    Reasoning,
    Content,
}

/// Splits a streamed output into reasoning and content deltas, holding back
/// text that may be the start of a tag split across tokens.
#[derive(Debug, Clone)]
pub struct Splitter {
    parser: ReasoningParser,
    phase: Phase,
    held: String,
    saw_close: bool,
    /// gpt-oss's channels are read by their own parser.
    harmony: Option<crate::harmony::ReasoningSplit>,
}

impl Splitter {
    /// A splitter at the start of an output.
    pub fn new(parser: ReasoningParser) -> Self {
        Self {
            parser,
            phase: Phase::Start,
            held: String::new(),
            saw_close: false,
            harmony: (parser == ReasoningParser::GptOss).then(Default::default),
        }
    }

    /// Takes the next piece of output; returns the (reasoning, content)
    /// text that is now certain.
    pub fn push(&mut self, delta: &str) -> (String, String) {
        if let Some(h) = &mut self.harmony {
            return h.push(delta);
        }
        self.held.push_str(delta);
        let (mut r, mut c) = (String::new(), String::new());
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if OPEN.starts_with(t) {
                        // Maybe the opening tag, still arriving.
                        return (r, c);
                    } else {
                        self.phase = match self.parser {
                            ReasoningParser::DeepSeekR1 => Phase::Reasoning,
                            // Qwen3 without `<think>`: plain content.
                            ReasoningParser::Qwen3 | ReasoningParser::GptOss => Phase::Content,
                        };
                    }
                }
                Phase::Reasoning => {
                    if let Some(at) = self.held.find(CLOSE) {
                        r.push_str(&self.held[..at]);
                        self.held = self.held[at + CLOSE.len()..].to_string();
                        self.saw_close = true;
                        self.phase = Phase::Content;
                    } else {
                        let keep = partial_suffix(&self.held, CLOSE);
                        let cut = self.held.len() - keep;
                        r.push_str(&self.held[..cut]);
                        self.held.drain(..cut);
                        return (r, c);
                    }
                }
                Phase::Content => {
                    c.push_str(&self.held);
                    self.held.clear();
                    return (r, c);
                }
            }
        }
    }

    /// The end of the output: releases what was held back.
    pub fn finish(&mut self) -> (String, String) {
        if let Some(h) = &mut self.harmony {
            return h.finish();
        }
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Reasoning => (held, String::new()),
            Phase::Start if self.parser == ReasoningParser::DeepSeekR1 => (held, String::new()),
            _ => (String::new(), held),
        }
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// The `option.reasoning_parser` of a served model, if it sets one.
pub(crate) fn for_model(st: &crate::state::AppState, model: &str) -> Option<ReasoningParser> {
    let entry = st.registry.get(model).ok()?;
    entry.properties.as_ref()?.chat.reasoning_parser
}

/// The reasoning parser of a chat answer: the model's
/// `option.reasoning_parser`, else `openai_gptoss` when its chat template
/// writes harmony (`<|channel|>`): gpt-oss's answers are always channels,
/// and vLLM always splits them.
pub(crate) fn for_chat(
    st: &crate::state::AppState,
    model: &str,
    engine: &kiln_engine::Engine,
) -> Option<ReasoningParser> {
    for_model(st, model).or_else(|| {
        engine
            .chat_template()
            .filter(|t| crate::harmony::is_harmony_template(t.source()))
            .map(|_| ReasoningParser::GptOss)
    })
}

/// Rewrites a chat chunk's `delta.content` with a splitter: the text goes to
/// `reasoning_content` and/or `content`; `end` releases held-back text too.
pub fn rewrite_delta(chunk: &mut serde_json::Value, splitter: &mut Splitter, end: bool) {
    let Some(delta) = chunk
        .get_mut("choices")
        .and_then(|c| c.get_mut(0))
        .and_then(|c| c.get_mut("delta"))
        .and_then(|d| d.as_object_mut())
    else {
        return;
    };
    let text = delta
        .remove("content")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let (mut r, mut c) = splitter.push(&text);
    if end {
        let (r2, c2) = splitter.finish();
        r.push_str(&r2);
        c.push_str(&c2);
    }
    let no_reasoning = r.is_empty();
    if !no_reasoning {
        delta.insert("reasoning_content".into(), r.into());
    }
    if !c.is_empty() || (!end && no_reasoning) {
        delta.insert("content".into(), c.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_outputs_split_by_convention() {
        let q = ReasoningParser::Qwen3;
        assert_eq!(
            q.split("<think>\nLet me see.\n</think>\n\nParis."),
            (Some("\nLet me see.\n".into()), "\n\nParis.".into())
        );
        assert_eq!(q.split("Paris."), (None, "Paris.".into()));
        // An unclosed block is not reasoning for qwen3.
        assert_eq!(q.split("<think>cut off"), (None, "<think>cut off".into()));
        let d = ReasoningParser::DeepSeekR1;
        assert_eq!(
            d.split("Hmm, 2+2.</think>4"),
            (Some("Hmm, 2+2.".into()), "4".into())
        );
        assert_eq!(
            d.split("<think>Hmm.</think>4"),
            (Some("Hmm.".into()), "4".into())
        );
        assert_eq!(
            d.split("still thinking"),
            (Some("still thinking".into()), "".into())
        );
        assert_eq!(ReasoningParser::parse("qwen3"), Some(q));
        assert_eq!(ReasoningParser::parse("deepseek_r1"), Some(d));
        assert_eq!(ReasoningParser::parse("granite"), None);
    }

    /// However the output is cut into deltas (tags split across them
    /// included), the streamed pieces add up to the whole-output split.
    #[test]
    fn streaming_in_any_pieces_equals_the_whole_split() {
        let texts = [
            "<think>\nLet me see: é and 猫.\n</think>\n\nParis.",
            "Hmm, 2+2 <thin is not a tag.</think>4 </think> again",
            "no tags at all",
            "<thi",
            "</think>",
        ];
        for parser in [ReasoningParser::Qwen3, ReasoningParser::DeepSeekR1] {
            for text in texts {
                let (want_r, want_c) = parser.split(text);
                let chars: Vec<(usize, char)> = text.char_indices().collect();
                for step in 1..=4 {
                    let mut s = Splitter::new(parser);
                    let (mut r, mut c) = (String::new(), String::new());
                    for piece in chars.chunks(step) {
                        let start = piece[0].0;
                        let end = piece.last().map_or(start, |&(i, ch)| i + ch.len_utf8());
                        let (a, b) = s.push(&text[start..end]);
                        r.push_str(&a);
                        c.push_str(&b);
                    }
                    let (a, b) = s.finish();
                    r.push_str(&a);
                    c.push_str(&b);
                    if parser == ReasoningParser::Qwen3 && !s.saw_close {
                        // Streamed qwen3 output without a closed block: what
                        // was sent as reasoning cannot be taken back; the
                        // whole split calls it content.
                        assert_eq!(
                            format!("{r}{c}").replace(OPEN, ""),
                            want_c.replace(OPEN, "")
                        );
                        continue;
                    }
                    assert_eq!(
                        ((!r.is_empty()).then_some(r.clone()), c.clone()),
                        (want_r.clone(), want_c.clone()),
                        "{parser:?} {text:?} in pieces of {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_are_rewritten_in_place() {
        let mut s = Splitter::new(ReasoningParser::DeepSeekR1);
        let mut chunk =
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": "Hmm</th"}}]});
        rewrite_delta(&mut chunk, &mut s, false);
        assert_eq!(
            chunk["choices"][0]["delta"],
            serde_json::json!({"reasoning_content": "Hmm"})
        );
        let mut chunk =
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": "ink>4"}}]});
        rewrite_delta(&mut chunk, &mut s, false);
        assert_eq!(
            chunk["choices"][0]["delta"],
            serde_json::json!({"content": "4"})
        );
        let mut end = serde_json::json!({"choices": [{"index": 0, "delta": {}}]});
        rewrite_delta(&mut end, &mut s, true);
        assert_eq!(end["choices"][0]["delta"], serde_json::json!({}));
    }
}
