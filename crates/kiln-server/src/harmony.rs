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
//! parser and the tool-call parser (`crate::reasoning`,
//! `crate::tool_parse`, which import this module, not the other way).

/// Whether a chat template writes OpenAI's harmony format (gpt-oss).
pub fn is_harmony_template(source: &str) -> bool {
    source.contains(CHANNEL)
}

/// What the tool-call parser makes of harmony output (the tool-call
/// events of `crate::tool_parse` it is mapped to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// Text for the message's `content`.
    Content(String),
    /// A call to this function starts.
    Start(String),
    /// More of the started call's arguments.
    Arguments(String),
}

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
/// given out as it streams: [`CallEvent::Start`] at its header, then
/// its body (the arguments, as the model wrote them) as
/// [`CallEvent::Arguments`].
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
    pub fn push(&mut self, text: &str) -> Vec<CallEvent> {
        let pieces = self.lexer.push(text);
        self.map(pieces)
    }

    /// The output ended.
    pub fn finish(&mut self) -> Vec<CallEvent> {
        let pieces = self.lexer.finish();
        self.map(pieces)
    }

    fn map(&mut self, pieces: Vec<Piece>) -> Vec<CallEvent> {
        let mut out = Vec::new();
        let content = |t: String, out: &mut Vec<CallEvent>| {
            if t.is_empty() {
                return;
            }
            match out.last_mut() {
                Some(CallEvent::Content(prev)) => prev.push_str(&t),
                _ => out.push(CallEvent::Content(t)),
            }
        };
        for p in pieces {
            match p {
                Piece::Text(t) => content(t, &mut out),
                Piece::Open(h) => {
                    self.open = match (&h.recipient, h.channel.as_deref()) {
                        (Some(r), _) => match r.strip_prefix("functions.") {
                            Some(name) if !name.is_empty() => {
                                out.push(CallEvent::Start(name.to_string()));
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
                        Some(CallEvent::Arguments(prev)) => prev.push_str(&t),
                        _ => out.push(CallEvent::Arguments(t)),
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

/// Harmony's markers a tool call is written with, each one special token
/// of gpt-oss's tokenizer (`<|call|>` also ends the turn).
pub const CALL_MARKERS: [&str; 4] = [CHANNEL, CONSTRAIN, MESSAGE, CALL];

const CONSTRAIN: &str = "<|constrain|>";

/// One harmony call to `name` with JSON arguments `args`, as gpt-oss
/// writes it right after the generation prompt's `<|start|>assistant`
/// (OpenAI's harmony guide):
/// `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>`.
pub fn call_text(name: &str, args: &str) -> String {
    format!("{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}{args}{CALL}")
}

/// The grammar (llguidance's Lark) that holds the output to one call of
/// [`call_text`]'s shape to one of `tools` (each a function name and the
/// JSON schema of its arguments): what `tool_choice: "required"` or a named
/// function makes of harmony. The markers are written with Lark's
/// `<|...|>` special-token syntax, since they are special tokens that no
/// text spells; the call comes first, with no analysis message before it
/// (as the other syntaxes' grammars allow no reasoning either), and there
/// is one, because `<|call|>` ends the turn.
pub fn call_grammar(tools: &[(&str, serde_json::Value)]) -> String {
    let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let alts: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
    let mut g = format!("start: {}\n", alts.join(" | "));
    for (i, (name, schema)) in tools.iter().enumerate() {
        g.push_str(&format!(
            "call_{i}: {CHANNEL} {} {CONSTRAIN} \"json\" {MESSAGE} args_{i} {CALL}\n",
            lit(&format!("commentary to=functions.{name} "))
        ));
        g.push_str(&format!("args_{i}: %json {schema}\n"));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn an_overlong_header_is_plain_text() {
        let t = format!("<|channel|>{}<|message|>x", "a".repeat(MAX_HEADER));
        assert_eq!(lex_all_ways(&t), vec![Piece::Text(t.clone())]);
    }
}
