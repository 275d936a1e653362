//! OpenAI's harmony format (gpt-oss), read from a model's output: the
//! `analysis` channel is reasoning, `final` (and `commentary` without a
//! recipient, a preamble) is content, and a message addressed
//! `to=functions.NAME` is a tool call whose body is its JSON arguments.
//!
//! The chat template's generation prompt ends with `<|start|>assistant`,
//! so the output is a run of messages like
//! `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...`,
//! a call `<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>`
//! (the recipient may also sit in the role part: `<|start|>assistant
//! to=functions.get_weather<|channel|>commentary json<|message|>`), as
//! OpenAI's harmony guide, llama.cpp's gpt-oss parser and vLLM's
//! `openai_gptoss` / `openai` parsers read it. The markers are special
//! tokens, so the text must keep them (`skip_special_tokens` off); the
//! end tokens `<|return|>` and `<|call|>` usually stop generation and are
//! then not in the text, so a message may also end with the output.
//!
//! [`Lexer`] cuts the text, whole or streamed, into the same pieces
//! whatever the cut points (a marker split across deltas is held back);
//! [`ReasoningSplit`] and [`ToolCalls`] map the pieces for the reasoning
//! parser and the tool-call parser.

use crate::tool_parse::ToolEvent;

const START: &str = "<|start|>";
const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
const END: &str = "<|end|>";
const CALL: &str = "<|call|>";
const RETURN: &str = "<|return|>";
/// The recipient in the role part of the output's first message (its
/// `<|start|>assistant` was in the prompt).
const ROLE_RECIPIENT: &str = " to=";
/// Longest header read before the text is taken for plain text: a real
/// one is a role, a channel, a recipient and a content type.
const MAX_HEADER: usize = 512;

/// A message's header: what its `<|message|>` was preceded by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `analysis`, `commentary`, `final` (or whatever the model wrote).
    pub channel: Option<String>,
    /// `functions.NAME`, `browser.search`, ... when the message is a call.
    pub recipient: Option<String>,
    /// The header's text as written, `<|message|>` included.
    pub raw: String,
}

impl Header {
    fn parse(raw: String) -> Self {
        // A name runs to the next space or marker.
        let word = |s: &str| -> String {
            let end = s
                .find(|c: char| c.is_whitespace() || c == '<')
                .unwrap_or(s.len());
            s[..end].to_string()
        };
        let channel = raw.find(CHANNEL).map(|at| word(&raw[at + CHANNEL.len()..]));
        let recipient = raw
            .find("to=")
            .filter(|&at| at == 0 || raw[..at].ends_with(|c: char| c.is_whitespace()))
            .map(|at| word(&raw[at + 3..]))
            .filter(|r| !r.is_empty());
        Header {
            channel,
            recipient,
            raw,
        }
    }
}

/// A piece of harmony output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text outside any message (or markup that does not make a header).
    Text(String),
    /// A message starts.
    Open(Header),
    /// Text of the open message's body.
    Body(String),
    /// The open message ends, with its end marker (empty when the next
    /// message or the output's end closes it).
    Close(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Between,
    Header,
    Body,
}

/// Cuts harmony output into [`Piece`]s, whole or streamed.
#[derive(Debug, Clone)]
pub struct Lexer {
    state: State,
    held: String,
    /// Nothing given out yet: the first message may open with its recipient.
    at_start: bool,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer {
            state: State::Between,
            held: String::new(),
            at_start: true,
        }
    }
}

/// Length of the longest end of `text` that is a proper beginning of one of `markers`.
fn partial_suffix(text: &str, markers: &[&str]) -> usize {
    markers
        .iter()
        .map(|m| {
            (1..m.len().min(text.len() + 1))
                .rev()
                .find(|&n| {
                    text.is_char_boundary(text.len() - n) && m.starts_with(&text[text.len() - n..])
                })
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

/// The first of `markers` in `text`: (where, which).
fn first_of<'m>(text: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter_map(|m| text.find(m).map(|at| (at, *m)))
        .min_by_key(|&(at, _)| at)
}

impl Lexer {
    /// Takes the next piece of output.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        self.advance(false, &mut out);
        out
    }

    /// The output ended: everything held is given out.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.advance(true, &mut out);
        out
    }

    fn text(&mut self, t: String, out: &mut Vec<Piece>) {
        if t.is_empty() {
            return;
        }
        self.at_start = false;
        match out.last_mut() {
            Some(Piece::Text(prev)) => prev.push_str(&t),
            _ => out.push(Piece::Text(t)),
        }
    }

    fn advance(&mut self, end: bool, out: &mut Vec<Piece>) {
        loop {
            match self.state {
                State::Between => {
                    let mut openers = vec![START, CHANNEL];
                    if self.at_start {
                        openers.push(ROLE_RECIPIENT);
                    }
                    match first_of(&self.held, &openers) {
                        Some((0, _)) => {
                            self.at_start = false;
                            self.state = State::Header;
                        }
                        Some((at, _)) => {
                            let t: String = self.held.drain(..at).collect();
                            self.text(t, out);
                        }
                        None => {
                            let keep = if end {
                                0
                            } else {
                                partial_suffix(&self.held, &openers)
                            };
                            let t: String = self.held.drain(..self.held.len() - keep).collect();
                            self.text(t, out);
                            return;
                        }
                    }
                }
                State::Header => {
                    // The header runs to `<|message|>`; another message's
                    // start or an end marker inside it means it was not one.
                    let full = self.held.len() >= MAX_HEADER + MESSAGE.len();
                    let mut cut = self.held.len().min(MAX_HEADER + MESSAGE.len());
                    while !self.held.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    let window = &self.held[..cut];
                    let found = window.find(MESSAGE);
                    let scope = &window[1..found.unwrap_or(window.len())];
                    let broken = [START, END, CALL, RETURN].iter().any(|m| scope.contains(m));
                    match found {
                        Some(at) if !broken => {
                            let raw: String = self.held.drain(..at + MESSAGE.len()).collect();
                            out.push(Piece::Open(Header::parse(raw)));
                            self.state = State::Body;
                        }
                        _ if broken || end || full => {
                            // Not a header: its opener is plain text.
                            let opener = [START, CHANNEL, ROLE_RECIPIENT]
                                .into_iter()
                                .find(|m| self.held.starts_with(m))
                                .map_or(1, str::len);
                            let t: String = self.held.drain(..opener).collect();
                            self.text(t, out);
                            self.state = State::Between;
                        }
                        _ => return,
                    }
                }
                State::Body => {
                    // End markers are the message's; a new start or channel
                    // (a model that left out `<|end|>`) belongs to the next.
                    let markers = [END, CALL, RETURN, START, CHANNEL];
                    match first_of(&self.held, &markers) {
                        Some((at, m)) => {
                            let body: String = self.held.drain(..at).collect();
                            if !body.is_empty() {
                                out.push(Piece::Body(body));
                            }
                            let close = if [END, CALL, RETURN].contains(&m) {
                                self.held.drain(..m.len()).collect()
                            } else {
                                String::new()
                            };
                            out.push(Piece::Close(close));
                            self.state = State::Between;
                        }
                        None => {
                            let keep = if end {
                                0
                            } else {
                                partial_suffix(&self.held, &markers)
                            };
                            let body: String = self.held.drain(..self.held.len() - keep).collect();
                            if !body.is_empty() {
                                out.push(Piece::Body(body));
                            }
                            if end {
                                out.push(Piece::Close(String::new()));
                                self.state = State::Between;
                                continue;
                            }
                            return;
                        }
                    }
                }
            }
            if end && self.held.is_empty() && self.state == State::Between {
                return;
            }
        }
    }
}

/// What the open message's text is for the reasoning parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Content,
    /// A call: passed on whole, markup included, for the tool parser.
    Raw,
}

/// The `openai_gptoss` reasoning parser: analysis to reasoning, final and
/// preambles to content without their markup, calls passed on as written
/// (so the tool-call parser after it can read them).
#[derive(Debug, Clone)]
pub struct ReasoningSplit {
    lexer: Lexer,
    kind: Kind,
}

impl Default for ReasoningSplit {
    fn default() -> Self {
        ReasoningSplit {
            lexer: Lexer::default(),
            kind: Kind::Content,
        }
    }
}

impl ReasoningSplit {
    /// Takes the next piece of output: the (reasoning, content) now certain.
    pub fn push(&mut self, text: &str) -> (String, String) {
        let pieces = self.lexer.push(text);
        self.map(pieces)
    }

    /// The output ended.
    pub fn finish(&mut self) -> (String, String) {
        let pieces = self.lexer.finish();
        self.map(pieces)
    }

    fn map(&mut self, pieces: Vec<Piece>) -> (String, String) {
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            match p {
                Piece::Text(t) => c.push_str(&t),
                Piece::Open(h) => {
                    self.kind = if h.recipient.is_some() {
                        c.push_str(&h.raw);
                        Kind::Raw
                    } else if h.channel.as_deref() == Some("analysis") {
                        Kind::Reasoning
                    } else {
                        Kind::Content
                    };
                }
                Piece::Body(t) if self.kind == Kind::Reasoning => r.push_str(&t),
                Piece::Body(t) => c.push_str(&t),
                Piece::Close(t) => {
                    if self.kind == Kind::Raw {
                        c.push_str(&t);
                    }
                    self.kind = Kind::Content;
                }
            }
        }
        (r, c)
    }
}

/// What the open message is for the tool-call parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Plain text or a final/preamble body: content.
    Content,
    /// Analysis (reasoning the request did not ask to split): dropped.
    Skip,
    /// A call to a function: its arguments stream out.
    Call,
    /// A message to a tool that is not a function (a built-in such as
    /// `browser.search`): content as written.
    Raw,
}

/// The `openai` tool-call parser: a message to `functions.NAME` is a call,
/// given out as it streams: [`ToolEvent::CallStart`] at its header, then
/// its body (the arguments, as the model wrote them) as
/// [`ToolEvent::CallArguments`].
#[derive(Debug, Clone)]
pub struct ToolCalls {
    lexer: Lexer,
    open: Open,
}

impl Default for ToolCalls {
    fn default() -> Self {
        ToolCalls {
            lexer: Lexer::default(),
            open: Open::Content,
        }
    }
}

impl ToolCalls {
    /// Takes the next piece of output.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        let pieces = self.lexer.push(text);
        self.map(pieces)
    }

    /// The output ended.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let pieces = self.lexer.finish();
        self.map(pieces)
    }

    fn map(&mut self, pieces: Vec<Piece>) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        let content = |t: String, out: &mut Vec<ToolEvent>| {
            if t.is_empty() {
                return;
            }
            match out.last_mut() {
                Some(ToolEvent::Content(prev)) => prev.push_str(&t),
                _ => out.push(ToolEvent::Content(t)),
            }
        };
        for p in pieces {
            match p {
                Piece::Text(t) => content(t, &mut out),
                Piece::Open(h) => {
                    self.open = match (&h.recipient, h.channel.as_deref()) {
                        (Some(r), _) => match r.strip_prefix("functions.") {
                            Some(name) if !name.is_empty() => {
                                out.push(ToolEvent::CallStart {
                                    name: name.to_string(),
                                });
                                Open::Call
                            }
                            _ => {
                                content(h.raw, &mut out);
                                Open::Raw
                            }
                        },
                        (None, Some("analysis")) => Open::Skip,
                        (None, _) => Open::Content,
                    }
                }
                Piece::Body(t) => match self.open {
                    Open::Call => match out.last_mut() {
                        Some(ToolEvent::CallArguments(prev)) => prev.push_str(&t),
                        _ => out.push(ToolEvent::CallArguments(t)),
                    },
                    Open::Skip => {}
                    Open::Content | Open::Raw => content(t, &mut out),
                },
                Piece::Close(end) => {
                    if self.open == Open::Raw {
                        content(end, &mut out);
                    }
                    self.open = Open::Content;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool_parse::ParsedCall;

    /// The pieces of `text` fed whole, and as two pieces cut at every
    /// character boundary, and a character at a time: the same, once
    /// neighbouring pieces of one kind are joined.
    fn lex_all_ways(text: &str) -> Vec<Piece> {
        let run = |parts: &[&str]| {
            let mut l = Lexer::default();
            let mut out = Vec::new();
            for p in parts {
                out.extend(l.push(p));
            }
            out.extend(l.finish());
            join(out)
        };
        let whole = run(&[text]);
        for (i, _) in text.char_indices().skip(1) {
            assert_eq!(run(&[&text[..i], &text[i..]]), whole, "{text:?} cut at {i}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs), whole, "{text:?} a character at a time");
        whole
    }

    fn join(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (Some(Piece::Body(a)), Piece::Body(b)) => a.push_str(&b),
                (_, p) => out.push(p),
            }
        }
        out
    }

    fn open(channel: &str, recipient: Option<&str>, raw: &str) -> Piece {
        Piece::Open(Header {
            channel: Some(channel.into()),
            recipient: recipient.map(Into::into),
            raw: raw.into(),
        })
    }

    #[test]
    fn messages_are_cut_the_same_however_the_text_arrives() {
        let t = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 20 °C.";
        assert_eq!(
            lex_all_ways(t),
            vec![
                open("analysis", None, "<|channel|>analysis<|message|>"),
                Piece::Body("Need weather.".into()),
                Piece::Close("<|end|>".into()),
                open(
                    "final",
                    None,
                    "<|start|>assistant<|channel|>final<|message|>"
                ),
                Piece::Body("Sunny, 20 °C.".into()),
                Piece::Close(String::new()),
            ]
        );
        // Recipient in the channel part, and in the role part.
        let t = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>";
        assert_eq!(
            lex_all_ways(t)[0],
            open(
                "commentary",
                Some("functions.get_weather"),
                "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            )
        );
        let t = " to=functions.f<|channel|>commentary json<|message|>{}";
        assert_eq!(
            lex_all_ways(t)[0],
            open(
                "commentary",
                Some("functions.f"),
                " to=functions.f<|channel|>commentary json<|message|>"
            )
        );
        // Plain text (no harmony at all), and markup that is not a header.
        assert_eq!(
            lex_all_ways("just text"),
            vec![Piece::Text("just text".into())]
        );
        assert_eq!(
            lex_all_ways("a <|start|>b<|end|>c"),
            vec![Piece::Text("a <|start|>b<|end|>c".into())]
        );
        // A message the model did not end before the next one.
        assert_eq!(
            lex_all_ways("<|channel|>analysis<|message|>x<|start|>assistant<|channel|>final<|message|>y<|return|>"),
            vec![
                open("analysis", None, "<|channel|>analysis<|message|>"),
                Piece::Body("x".into()),
                Piece::Close(String::new()),
                open("final", None, "<|start|>assistant<|channel|>final<|message|>"),
                Piece::Body("y".into()),
                Piece::Close("<|return|>".into()),
            ]
        );
    }

    /// Every way of cutting `text` the tests try: whole, two pieces at
    /// every character boundary, a character at a time, and token-like
    /// pieces (each marker alone, the text between in pieces of three).
    fn cuts(text: &str) -> Vec<Vec<String>> {
        let mut all = vec![vec![text.to_string()]];
        for (i, _) in text.char_indices().skip(1) {
            all.push(vec![text[..i].to_string(), text[i..].to_string()]);
        }
        all.push(text.chars().map(String::from).collect());
        let mut tokens = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if rest.starts_with("<|") {
                let end = rest.find("|>").map_or(rest.len(), |e| e + 2);
                tokens.push(rest[..end].to_string());
                rest = &rest[end..];
            } else {
                let n = rest.char_indices().nth(3).map_or(rest.len(), |(i, _)| i);
                let n = rest[..n].find("<|").unwrap_or(n);
                tokens.push(rest[..n].to_string());
                rest = &rest[n..];
            }
        }
        all.push(tokens);
        all
    }

    const ANALYSIS_CALL: &str = "<|channel|>analysis<|message|>User wants weather. Call tool.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": [1, 2]}<|call|>";
    const CALL_MESSAGE: &str = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": [1, 2]}<|call|>";

    /// The `openai_gptoss` reasoning split of whole outputs, and the same
    /// streamed however the output is cut.
    #[test]
    fn reasoning_split_whole_and_streamed() {
        use crate::reasoning::{ReasoningParser, Splitter};
        let g = ReasoningParser::GptOss;
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "<|channel|>analysis<|message|>Need 2+2.<|end|><|start|>assistant<|channel|>final<|message|>4, é 猫.",
                Some("Need 2+2."),
                "4, é 猫.",
            ),
            // Low reasoning effort: only a final message.
            ("<|channel|>final<|message|>Hi.<|return|>", None, "Hi."),
            // Cut off while thinking.
            ("<|channel|>analysis<|message|>Let me", Some("Let me"), ""),
            // A call passes on as written, for the tool-call parser.
            (ANALYSIS_CALL, Some("User wants weather. Call tool."), CALL_MESSAGE),
            // A preamble (commentary without recipient) is content.
            (
                "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|> Done.",
                None,
                "Checking. Done.",
            ),
            // No harmony markup at all: content.
            ("plain <|text", None, "plain <|text"),
        ];
        for &(text, want_r, want_c) in cases {
            let whole = g.split(text);
            assert_eq!(
                whole,
                (want_r.map(String::from), want_c.to_string()),
                "{text:?}"
            );
            for cut in cuts(text) {
                let mut s = Splitter::new(g);
                let (mut r, mut c) = (String::new(), String::new());
                for piece in &cut {
                    let (a, b) = s.push(piece);
                    r.push_str(&a);
                    c.push_str(&b);
                }
                let (a, b) = s.finish();
                r.push_str(&a);
                c.push_str(&b);
                assert_eq!(
                    ((!r.is_empty()).then_some(r), c),
                    whole,
                    "{text:?} cut as {cut:?}"
                );
            }
        }
        assert_eq!(ReasoningParser::parse("openai_gptoss"), Some(g));
        assert_eq!(g.as_str(), "openai_gptoss");
    }

    fn call(name: &str, args: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// The `openai` tool-call parser on whole outputs (with or without the
    /// reasoning parser before it), and the same streamed however cut.
    #[test]
    fn tool_calls_whole_and_streamed() {
        use crate::tool_parse::{collect, parse, ToolStream, ToolSyntax};
        let h = ToolSyntax::Harmony;
        // Arguments are the text the model wrote, as vLLM's parser gives them.
        let paris = call("get_weather", r#"{"city": "Paris", "days": [1, 2]}"#);
        let cases: Vec<(String, Option<String>, Vec<ParsedCall>)> = vec![
            // The raw output (no reasoning parser): analysis is dropped.
            (ANALYSIS_CALL.into(), None, vec![paris.clone()]),
            // What the reasoning parser passes on.
            (CALL_MESSAGE.into(), None, vec![paris.clone()]),
            // Recipient in the role part, content type without
            // <|constrain|>, and no <|call|> (it stopped generation).
            (
                " to=functions.f<|channel|>commentary json<|message|>{\"a\": null}".into(),
                None,
                vec![call("f", r#"{"a": null}"#)],
            ),
            // Two calls in one output.
            (
                format!("{CALL_MESSAGE}<|start|>assistant to=functions.b<|channel|>commentary<|message|>{{}}<|call|>"),
                None,
                vec![paris.clone(), call("b", "{}")],
            ),
            // A final answer: content only.
            (
                "<|channel|>analysis<|message|>easy<|end|><|start|>assistant<|channel|>final<|message|>Paris.".into(),
                Some("Paris.".into()),
                vec![],
            ),
            // A message to a function is a call, whatever its body (cut
            // short here by the token limit).
            (
                "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"k\": [1".into(),
                None,
                vec![call("f", r#"{"k": [1"#)],
            ),
            // A built-in tool (not a function): content, as written.
            (
                "<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|call|>".into(),
                Some("<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|call|>".into()),
                vec![],
            ),
        ];
        for (text, want_c, want_calls) in cases {
            let whole = parse(h, &text);
            assert_eq!(whole, (want_c, want_calls), "{text:?}");
            for cut in cuts(&text) {
                let mut s = ToolStream::new(h);
                let mut events = Vec::new();
                for piece in &cut {
                    events.extend(s.push(piece));
                }
                events.extend(s.finish());
                assert_eq!(s.calls(), whole.1.len());
                assert_eq!(collect(events), whole, "{text:?} cut as {cut:?}");
            }
        }
        // Arguments stream out as they come, before the call ends.
        let mut s = ToolStream::new(h);
        let mut events = s.push("<|channel|>commentary to=functions.f json<|message|>");
        events.extend(s.push("{\"city\": \"Par"));
        assert_eq!(
            events,
            vec![
                ToolEvent::CallStart { name: "f".into() },
                ToolEvent::CallArguments("{\"city\": \"Par".into())
            ]
        );
        assert_eq!(
            s.push("is\"}"),
            vec![ToolEvent::CallArguments("is\"}".into())]
        );
        assert_eq!(s.push("<|call|>"), vec![]);
        assert_eq!(s.calls(), 1);
        assert_eq!(ToolSyntax::from_parser_name("openai"), Some(h));
        assert_eq!(
            ToolSyntax::from_template("{{- \"<|start|>assistant<|channel|>\" }}"),
            h
        );
    }

    /// The streamed chat answer as the OpenAI route builds it (reasoning
    /// split, then tool deltas), token by token: reasoning_content, no
    /// content, one call whose arguments come in more than one delta
    /// when the output does, finish reason tool_calls.
    #[test]
    fn streamed_chat_deltas_carry_reasoning_and_the_call() {
        use crate::reasoning::{rewrite_delta, ReasoningParser, Splitter};
        use crate::tool_parse::ToolSyntax;
        use crate::tools::ToolDeltas;
        let chunk = |text: &str, finish: Option<&str>| {
            serde_json::json!({"id": "x", "choices": [{"index": 0, "delta": {"content": text},
                "logprobs": null, "finish_reason": finish}]})
        };
        for cut in cuts(ANALYSIS_CALL).into_iter().rev().take(3) {
            let mut sp = Splitter::new(ReasoningParser::GptOss);
            let mut td = ToolDeltas::new(ToolSyntax::Harmony);
            let mut out = Vec::new();
            for piece in &cut {
                let mut c = chunk(piece, None);
                rewrite_delta(&mut c, &mut sp, false);
                out.extend(td.rewrite(c, false));
            }
            let mut c = chunk("", Some("stop"));
            rewrite_delta(&mut c, &mut sp, true);
            out.extend(td.rewrite(c, true));
            let (mut reasoning, mut content, mut calls) =
                (String::new(), String::new(), Vec::new());
            let mut arg_deltas = 0;
            for c in &out {
                let d = &c["choices"][0]["delta"];
                reasoning.push_str(d["reasoning_content"].as_str().unwrap_or_default());
                content.push_str(d["content"].as_str().unwrap_or_default());
                for t in d["tool_calls"].as_array().into_iter().flatten() {
                    if let Some(name) = t["function"]["name"].as_str() {
                        calls.push((name.to_string(), String::new()));
                    }
                    assert_eq!(t["index"], 0);
                    let last = calls.last_mut().expect("a call's name comes first");
                    let a = t["function"]["arguments"].as_str().unwrap_or_default();
                    arg_deltas += usize::from(!a.is_empty());
                    last.1.push_str(a);
                }
            }
            assert_eq!(reasoning, "User wants weather. Call tool.", "{cut:?}");
            assert_eq!(content, "", "{cut:?}");
            assert_eq!(
                calls,
                vec![(
                    "get_weather".to_string(),
                    r#"{"city": "Paris", "days": [1, 2]}"#.to_string()
                )]
            );
            if cut.len() > 3 {
                assert!(
                    arg_deltas > 1,
                    "arguments in {arg_deltas} delta(s) for {cut:?}"
                );
            }
            assert_eq!(
                out.last().unwrap()["choices"][0]["finish_reason"],
                "tool_calls"
            );
        }
    }

    #[test]
    fn an_overlong_header_is_plain_text() {
        let t = format!("<|channel|>{}<|message|>x", "a".repeat(MAX_HEADER));
        assert_eq!(lex_all_ways(&t), vec![Piece::Text(t.clone())]);
    }
}
