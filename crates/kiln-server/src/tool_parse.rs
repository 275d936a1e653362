//! Reading tool calls out of a model's output: the syntaxes models are
//! trained to write a call in, as vLLM's tool-call parsers of the same names
//! read them (`hermes`, `llama3_json`, `mistral`, and gpt-oss's harmony
//! calls as `openai`, in [`crate::harmony`]), whole or streamed.
//!
//! The same [`ToolStream`] serves both: the whole text is one push, a stream
//! pushes each token's text. Text before a call streams out as content (a
//! possible start of the call marker split across tokens is held back);
//! a call is given out once it is complete, so the calls and the content are
//! the same however the output was cut into pieces. Output that looks like a
//! call but does not parse (bad JSON, no `name`) is given out as content.
//! Harmony calls are the exception: a message addressed to a function is a
//! call by its header, so it is given out as it streams ([`ToolEvent::CallStart`],
//! then its arguments as they come), its arguments the text the model wrote,
//! as vLLM's `openai` parser gives them.

use serde_json::Value;

/// A tool-call syntax kiln can parse and constrain output to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
    /// block per call (Qwen2.5, Qwen3, Hermes; ChatML templates).
    Hermes,
    /// `{"name": ..., "parameters": {...}}` as the whole output, several
    /// separated by `;`, optionally after `<|python_tag|>` (Llama 3.1+).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral), or
    /// the newer `[TOOL_CALLS]name[ARGS]{...}` form.
    Mistral,
    /// gpt-oss's harmony messages addressed `to=functions.NAME`, their body
    /// the JSON arguments (vLLM's `openai` parser; [`crate::harmony`]).
    Harmony,
}

impl ToolSyntax {
    /// The vLLM parser names kiln implements, as listed in errors.
    pub const ALLOWED: &'static str = "hermes, llama3_json, llama4_json, mistral, openai";

    /// The syntax of a vLLM `tool_call_parser` name, if kiln implements it.
    pub fn from_parser_name(name: &str) -> Option<ToolSyntax> {
        match name {
            "hermes" => Some(ToolSyntax::Hermes),
            "llama3_json" | "llama4_json" => Some(ToolSyntax::Llama3Json),
            "mistral" => Some(ToolSyntax::Mistral),
            "openai" => Some(ToolSyntax::Harmony),
            _ => None,
        }
    }

    /// The syntax a chat template teaches its model, read from the template
    /// text: Mistral's `[TOOL_CALLS]`, Hermes' `<tool_call>`, Llama's
    /// `"parameters"` objects (`<|python_tag|>` or a JSON call described in
    /// the template); anything else (ChatML templates without tools, such as
    /// SmolLM2's) gets Hermes, the syntax ChatML models are tuned on.
    pub fn from_template(source: &str) -> ToolSyntax {
        if crate::harmony::is_harmony_template(source) {
            ToolSyntax::Harmony
        } else if source.contains("[TOOL_CALLS]") {
            ToolSyntax::Mistral
        } else if source.contains("<tool_call>") {
            ToolSyntax::Hermes
        } else if source.contains("<|python_tag|>")
            || (source.contains("<|start_header_id|>") && source.contains("parameters"))
        {
            ToolSyntax::Llama3Json
        } else {
            ToolSyntax::Hermes
        }
    }

    /// The text that opens the tool calls (for Llama, an object's `{`).
    fn marker(self) -> &'static str {
        match self {
            ToolSyntax::Hermes => HERMES_OPEN,
            ToolSyntax::Llama3Json => "{",
            ToolSyntax::Mistral => MISTRAL_OPEN,
            ToolSyntax::Harmony => "<|channel|>",
        }
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// One call read from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as compact JSON text (OpenAI's `arguments` string).
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text for the message's `content`.
    Content(String),
    /// A complete call.
    Call(ParsedCall),
    /// A call whose arguments follow as they come (harmony).
    CallStart { name: String },
    /// More of the last started call's arguments.
    CallArguments(String),
}

/// Where a [`ToolStream`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but whitespace yet (Llama decides on the first character).
    Start,
    /// Plain text; a call marker may still come.
    Content,
    /// Inside the calls: held until they are complete.
    Calls,
}

/// Splits an output, whole or streamed, into content and tool calls.
#[derive(Debug, Clone)]
pub struct ToolStream {
    syntax: ToolSyntax,
    phase: Phase,
    held: String,
    calls: usize,
    /// Harmony output is read by its own parser.
    harmony: Option<crate::harmony::ToolCalls>,
}

impl ToolStream {
    /// A stream for output in `syntax`.
    pub fn new(syntax: ToolSyntax) -> Self {
        Self {
            syntax,
            phase: Phase::Start,
            held: String::new(),
            calls: 0,
            harmony: (syntax == ToolSyntax::Harmony).then(Default::default),
        }
    }

    /// Calls given out so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next piece of output.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        if let Some(h) = &mut self.harmony {
            let out = from_harmony(h.push(text));
            self.calls += count_calls(&out);
            return out;
        }
        self.held.push_str(text);
        let mut out = Vec::new();
        self.advance(&mut out);
        out
    }

    /// Ends the output: held text is given out (as calls when it parses).
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        if let Some(h) = &mut self.harmony {
            let out = from_harmony(h.finish());
            self.calls += count_calls(&out);
            return out;
        }
        let mut out = Vec::new();
        self.advance(&mut out);
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Calls => match self.parse_tail(&held) {
                Some(calls) => {
                    for c in calls {
                        self.emit_call(c, &mut out);
                    }
                }
                None => emit_content(held, &mut out),
            },
            // Whitespace between or after calls is not content.
            _ if self.calls > 0 && held.trim().is_empty() => {}
            _ => emit_content(held, &mut out),
        }
        self.phase = Phase::Content;
        out
    }

    fn emit_call(&mut self, call: ParsedCall, out: &mut Vec<ToolEvent>) {
        self.calls += 1;
        out.push(ToolEvent::Call(call));
    }

    /// Gives out what can be decided from the held text.
    fn advance(&mut self, out: &mut Vec<ToolEvent>) {
        loop {
            match self.phase {
                Phase::Start => {
                    let trimmed = self.held.trim_start();
                    if trimmed.is_empty() {
                        return;
                    }
                    if self.syntax == ToolSyntax::Llama3Json {
                        // Llama's calls are the whole output: it is a call
                        // only if it opens with `{` or the python tag.
                        let is_call = trimmed.starts_with('{')
                            || trimmed.starts_with(PYTHON_TAG)
                            || PYTHON_TAG.starts_with(trimmed);
                        if PYTHON_TAG.starts_with(trimmed) && trimmed != PYTHON_TAG {
                            return; // may still be the tag
                        }
                        self.phase = if is_call {
                            Phase::Calls
                        } else {
                            Phase::Content
                        };
                        continue;
                    }
                    self.phase = Phase::Content;
                }
                Phase::Content => {
                    if self.syntax == ToolSyntax::Llama3Json {
                        emit_content(std::mem::take(&mut self.held), out);
                        return;
                    }
                    if self.calls > 0 && self.held.trim().is_empty() {
                        return; // whitespace between calls: wait
                    }
                    let marker = self.syntax.marker();
                    if let Some(at) = self.held.find(marker) {
                        let before: String = self.held.drain(..at).collect();
                        if !(self.calls > 0 && before.trim().is_empty()) {
                            emit_content(before, out);
                        }
                        self.phase = Phase::Calls;
                        continue;
                    }
                    // Keep back a tail that may be the marker's beginning;
                    // whitespace after a call stays held too (it is dropped
                    // if only calls follow it).
                    let cut = self.held.len() - partial_suffix(&self.held, marker);
                    if !(self.calls > 0 && self.held[..cut].trim().is_empty()) {
                        let text: String = self.held.drain(..cut).collect();
                        emit_content(text, out);
                    }
                    return;
                }
                Phase::Calls => {
                    if self.syntax != ToolSyntax::Hermes {
                        return; // complete only at the end
                    }
                    let Some(end) = self.held.find(HERMES_CLOSE) else {
                        return;
                    };
                    let block_end = end + HERMES_CLOSE.len();
                    let block: String = self.held.drain(..block_end).collect();
                    let inner = &block[HERMES_OPEN.len()..end];
                    match call_from_json(inner.trim(), "arguments") {
                        Some(c) => self.emit_call(c, out),
                        None => emit_content(block, out),
                    }
                    self.phase = Phase::Content;
                }
            }
        }
    }

    /// Parses the held calls at the end of the output.
    fn parse_tail(&self, text: &str) -> Option<Vec<ParsedCall>> {
        match self.syntax {
            ToolSyntax::Hermes => {
                // A block the model did not close (it stopped at its end token).
                let inner = text.strip_prefix(HERMES_OPEN)?;
                call_from_json(inner.trim(), "arguments").map(|c| vec![c])
            }
            ToolSyntax::Llama3Json => {
                let body = text.trim_start();
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
                llama_calls(body)
            }
            ToolSyntax::Mistral => {
                let body = text.strip_prefix(MISTRAL_OPEN)?;
                mistral_calls(body)
            }
            // Harmony output never reaches the held text (`push` hands it on).
            ToolSyntax::Harmony => None,
        }
    }
}

/// Harmony's call events as tool-call events.
fn from_harmony(events: Vec<crate::harmony::CallEvent>) -> Vec<ToolEvent> {
    use crate::harmony::CallEvent;
    events
        .into_iter()
        .map(|e| match e {
            CallEvent::Content(t) => ToolEvent::Content(t),
            CallEvent::Start(name) => ToolEvent::CallStart { name },
            CallEvent::Arguments(a) => ToolEvent::CallArguments(a),
        })
        .collect()
}

fn count_calls(events: &[ToolEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, ToolEvent::Call(_) | ToolEvent::CallStart { .. }))
        .count()
}

fn emit_content(text: String, out: &mut Vec<ToolEvent>) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(prev)) = out.last_mut() {
        prev.push_str(&text);
    } else {
        out.push(ToolEvent::Content(text));
    }
}

/// Length of the longest end of `text` that is a proper beginning of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// A call from one JSON object with a string `name` and its arguments under
/// `args_key` (or the other usual key): an object, or JSON text of one.
fn call_from_json(text: &str, args_key: &str) -> Option<ParsedCall> {
    let v: Value = serde_json::from_str(text).ok()?;
    call_from_value(&v, args_key)
}

fn call_from_value(v: &Value, args_key: &str) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get(args_key)
        .or_else(|| v.get("arguments"))
        .or_else(|| v.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(a @ Value::Object(_)) => a.to_string(),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

/// Llama's calls: JSON objects separated by `;` (and whitespace).
fn llama_calls(body: &str) -> Option<Vec<ParsedCall>> {
    let mut calls = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let mut de = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = de.next()?.ok()?;
        calls.push(call_from_value(&v, "parameters")?);
        rest = rest[de.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    (!calls.is_empty()).then_some(calls)
}

/// Mistral's calls after `[TOOL_CALLS]`: a JSON list of calls, or
/// `name[ARGS]{...}` pieces (each after its own `[TOOL_CALLS]`).
fn mistral_calls(body: &str) -> Option<Vec<ParsedCall>> {
    let body = body.trim();
    if body.starts_with('[') {
        let v: Value = serde_json::from_str(body).ok()?;
        let calls: Option<Vec<ParsedCall>> = v
            .as_array()?
            .iter()
            .map(|c| call_from_value(c, "arguments"))
            .collect();
        return calls.filter(|c| !c.is_empty());
    }
    let mut calls = Vec::new();
    for piece in body.split(MISTRAL_OPEN) {
        let (name, args) = piece.split_once("[ARGS]")?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let v = serde_json::json!({"name": name, "arguments": serde_json::from_str::<Value>(args.trim()).ok()?});
        calls.push(call_from_value(&v, "arguments")?);
    }
    (!calls.is_empty()).then_some(calls)
}

/// Parses a whole output: its content (`None` when only calls are there)
/// and its calls.
pub fn parse(syntax: ToolSyntax, text: &str) -> (Option<String>, Vec<ParsedCall>) {
    let mut s = ToolStream::new(syntax);
    let mut events = s.push(text);
    events.extend(s.finish());
    collect(events)
}

/// Joins events into (content, calls).
pub fn collect(events: Vec<ToolEvent>) -> (Option<String>, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(t) => content.push_str(&t),
            ToolEvent::Call(c) => calls.push(c),
            ToolEvent::CallStart { name } => calls.push(ParsedCall {
                name,
                arguments: String::new(),
            }),
            ToolEvent::CallArguments(a) => {
                if let Some(c) = calls.last_mut() {
                    c.arguments.push_str(&a);
                }
            }
        }
    }
    let content = (!content.is_empty() || calls.is_empty()).then_some(content);
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// Streams `text` cut at every `step` bytes (on char boundaries).
    fn streamed(syntax: ToolSyntax, text: &str, step: usize) -> (Option<String>, Vec<ParsedCall>) {
        let mut s = ToolStream::new(syntax);
        let mut events = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            events.extend(s.push(&text[i..j]));
            i = j;
        }
        events.extend(s.finish());
        collect(events)
    }

    /// Checks the whole parse, and that every way of streaming it agrees.
    fn check(syntax: ToolSyntax, text: &str, content: Option<&str>, calls: &[ParsedCall]) {
        let whole = parse(syntax, text);
        assert_eq!(whole.0.as_deref(), content, "{text:?}");
        assert_eq!(whole.1, calls, "{text:?}");
        for step in 1..=text.len().min(24) {
            assert_eq!(
                streamed(syntax, text, step),
                whole,
                "{text:?} in {step}-byte pieces"
            );
        }
    }

    #[test]
    fn hermes_calls_and_content() {
        let h = ToolSyntax::Hermes;
        check(
            h,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            None,
            &[call("get_weather", r#"{"city":"Paris"}"#)],
        );
        check(
            h,
            "Let me look. <tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"x\": 1}, \"name\": \"b\"}\n</tool_call>\n",
            Some("Let me look. "),
            &[call("a", "{}"), call("b", r#"{"x":1}"#)],
        );
        // Arguments given as JSON text, and a block left open at the end.
        check(
            h,
            "<tool_call>{\"name\": \"a\", \"arguments\": \"{\\\"k\\\": [1, 2]}\"}",
            None,
            &[call("a", r#"{"k":[1,2]}"#)],
        );
        check(
            h,
            "plain answer, no < tool calls",
            Some("plain answer, no < tool calls"),
            &[],
        );
    }

    #[test]
    fn malformed_calls_fall_back_to_content() {
        let bad = "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call>";
        check(ToolSyntax::Hermes, bad, Some(bad), &[]);
        let no_name = "<tool_call>{\"arguments\": {}}</tool_call>";
        check(ToolSyntax::Hermes, no_name, Some(no_name), &[]);
        let unclosed = "<tool_call>{\"name\": \"a\", \"argu";
        check(ToolSyntax::Hermes, unclosed, Some(unclosed), &[]);
        let l = "{\"name\": \"a\", \"parameters\": 5}";
        check(ToolSyntax::Llama3Json, l, Some(l), &[]);
        let m = "[TOOL_CALLS][{\"name\": \"a\"";
        check(ToolSyntax::Mistral, m, Some(m), &[]);
    }

    #[test]
    fn llama3_json_calls() {
        let l = ToolSyntax::Llama3Json;
        check(
            l,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            None,
            &[call("get_weather", r#"{"city":"Paris"}"#)],
        );
        check(
            l,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"arguments\": {\"n\": 2}}",
            None,
            &[call("a", "{}"), call("b", r#"{"n":2}"#)],
        );
        // Text first: not a call, even if a call follows.
        let t = "Sure: {\"name\": \"a\", \"parameters\": {}}";
        check(l, t, Some(t), &[]);
    }

    #[test]
    fn mistral_calls() {
        let m = ToolSyntax::Mistral;
        check(
            m,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"b\", \"arguments\": {}}]",
            None,
            &[call("get_weather", r#"{"city":"Paris"}"#), call("b", "{}")],
        );
        check(
            m,
            "Checking.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}",
            Some("Checking."),
            &[call("get_weather", r#"{"city":"Rome"}"#)],
        );
        check(
            m,
            "[TOOL_CALLS is not it",
            Some("[TOOL_CALLS is not it"),
            &[],
        );
    }

    #[test]
    fn syntax_from_names_and_templates() {
        assert_eq!(
            ToolSyntax::from_parser_name("hermes"),
            Some(ToolSyntax::Hermes)
        );
        assert_eq!(
            ToolSyntax::from_parser_name("llama3_json"),
            Some(ToolSyntax::Llama3Json)
        );
        assert_eq!(
            ToolSyntax::from_parser_name("mistral"),
            Some(ToolSyntax::Mistral)
        );
        assert_eq!(ToolSyntax::from_parser_name("pythonic"), None);
        assert_eq!(
            ToolSyntax::from_template("{{ '<tool_call>' }}"),
            ToolSyntax::Hermes
        );
        assert_eq!(
            ToolSyntax::from_template("{{ '[TOOL_CALLS]' }}"),
            ToolSyntax::Mistral
        );
        assert_eq!(
            ToolSyntax::from_template("<|start_header_id|>{{ '\"parameters\": ' }}"),
            ToolSyntax::Llama3Json
        );
        assert_eq!(
            ToolSyntax::from_template("<|im_start|>{{ m.content }}"),
            ToolSyntax::Hermes
        );
    }
}
