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
    /// Inside the calls: read as they stream (see [`scan_region`]).
    Calls,
}

/// The call being read in the held region: how many of the region's calls
/// are given out in full, and whether the next one has started (its
/// [`ToolEvent::CallStart`] given) with how many bytes of its arguments.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    done: usize,
    started: bool,
    emitted: usize,
}

/// Splits an output, whole or streamed, into content and tool calls.
#[derive(Debug, Clone)]
pub struct ToolStream {
    syntax: ToolSyntax,
    phase: Phase,
    held: String,
    calls: usize,
    progress: Progress,
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
            progress: Progress::default(),
            harmony: (syntax == ToolSyntax::Harmony).then(Default::default),
        }
    }

    /// Calls given out so far (started ones included).
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
        self.advance(&mut out, false, false);
        out
    }

    /// Ends an output that ended on its own (an end token, a stop
    /// sequence): held text is given out, as calls when it parses, as
    /// content when it is not a call after all.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        self.end(false)
    }

    /// Ends an output cut short (`max_tokens`, a deadline): a call that
    /// had not started streaming, or its marker, is dropped, never given
    /// out as content; a started call keeps the arguments given so far.
    pub fn finish_cut(&mut self) -> Vec<ToolEvent> {
        self.end(true)
    }

    fn end(&mut self, cut: bool) -> Vec<ToolEvent> {
        if let Some(h) = &mut self.harmony {
            let out = from_harmony(h.finish());
            self.calls += count_calls(&out);
            return out;
        }
        let mut out = Vec::new();
        self.advance(&mut out, true, cut);
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Calls => {
                let region = scan_region(self.syntax, &held, true);
                let given = self.progress.done > 0 || self.progress.started;
                if !given && !cut && region.calls.is_empty() {
                    emit_content(held, &mut out);
                }
                // Otherwise: the region's calls were given out by
                // `advance`; what is left is markup (or a cut call).
            }
            _ => {
                let mut held = held;
                // A cut output may end on the start of a call marker.
                if cut && self.syntax != ToolSyntax::Llama3Json {
                    let keep = held.len() - partial_suffix(&held, self.syntax.marker());
                    held.truncate(keep);
                }
                // Whitespace between or after calls is not content.
                if !(self.calls > 0 && held.trim().is_empty()) {
                    emit_content(held, &mut out);
                }
            }
        }
        self.phase = Phase::Content;
        self.progress = Progress::default();
        out
    }

    /// Gives out what can be decided from the held text; `last`: no more
    /// text comes (`cut`: because the output was cut short).
    fn advance(&mut self, out: &mut Vec<ToolEvent>, last: bool, cut: bool) {
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
                        if PYTHON_TAG.starts_with(trimmed) && trimmed != PYTHON_TAG && !last {
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
                        self.progress = Progress::default();
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
                    let region = scan_region(self.syntax, &self.held, last);
                    self.give_calls(&region, out);
                    let given = self.progress.done > 0 || self.progress.started;
                    match region.end {
                        Some(RegionEnd::Calls(end)) => {
                            self.held.drain(..end);
                        }
                        Some(RegionEnd::Rest(end)) => {
                            // Not a call after all: content, unless part of
                            // it went out as a call, or the output was cut
                            // inside it (a call that never finished).
                            let text: String = self.held.drain(..end).collect();
                            if !(given || cut) {
                                emit_content(text, out);
                            }
                        }
                        None => return,
                    }
                    self.phase = Phase::Content;
                    self.progress = Progress::default();
                }
            }
        }
    }

    /// Gives out the region's calls from where the last push left off:
    /// complete calls whole (a call that does not parse is not a call),
    /// the call being written as its head and then its arguments' text as
    /// it comes, once its name is known and its arguments open with `{`.
    fn give_calls(&mut self, region: &Region, out: &mut Vec<ToolEvent>) {
        let text = &self.held;
        for call in region.calls.iter().skip(self.progress.done) {
            let p = &mut self.progress;
            match call.end {
                Some(_) if !p.started => {
                    // One that does not parse waits for the region's end,
                    // where it is content.
                    let Some(c) = &call.parsed else { return };
                    out.push(ToolEvent::Call(c.clone()));
                    self.calls += 1;
                    p.done += 1;
                }
                Some(_) => {
                    if let Some((s, e)) = call.args {
                        let e = e.unwrap_or(text.len());
                        if s + p.emitted < e {
                            push_args(out, &text[s + p.emitted..e]);
                        }
                    }
                    p.done += 1;
                    p.started = false;
                    p.emitted = 0;
                }
                None => {
                    let (Some(name), Some((s, e))) = (&call.name, call.args) else {
                        return;
                    };
                    if !text[s..].starts_with('{') {
                        return; // given whole when complete
                    }
                    if !p.started {
                        out.push(ToolEvent::CallStart { name: name.clone() });
                        self.calls += 1;
                        p.started = true;
                    }
                    let e = e.unwrap_or(text.len());
                    if s + p.emitted < e {
                        push_args(out, &text[s + p.emitted..e]);
                        p.emitted = e - s;
                    }
                    return;
                }
            }
        }
    }
}

fn push_args(out: &mut Vec<ToolEvent>, text: &str) {
    if let Some(ToolEvent::CallArguments(prev)) = out.last_mut() {
        prev.push_str(text);
    } else {
        out.push(ToolEvent::CallArguments(text.to_string()));
    }
}

/// One call found in the held region.
#[derive(Debug, Clone, Default)]
struct CallScan {
    /// The function's name, once read.
    name: Option<String>,
    /// Where its arguments' text is in the region: start, and end once
    /// the value is complete.
    args: Option<(usize, Option<usize>)>,
    /// The end of the call, once complete.
    end: Option<usize>,
    /// The complete call, when it parses.
    parsed: Option<ParsedCall>,
}

/// How the held region of calls ended.
#[derive(Debug, Clone, Copy)]
enum RegionEnd {
    /// The calls (and their markup) end here.
    Calls(usize),
    /// The region up to here is not a well-formed call: content, unless
    /// part of it was given out as a call already.
    Rest(usize),
}

/// The calls read from the held text in the calls phase.
#[derive(Debug, Default)]
struct Region {
    calls: Vec<CallScan>,
    end: Option<RegionEnd>,
}

/// Reads the calls at the start of `text` (which starts with the syntax's
/// marker; for Llama, the output). `last`: no more text comes, so an
/// unfinished call is final.
fn scan_region(syntax: ToolSyntax, text: &str, last: bool) -> Region {
    let mut r = Region::default();
    match syntax {
        ToolSyntax::Hermes => {
            let body_at = HERMES_OPEN.len().min(text.len());
            let close = text.find(HERMES_CLOSE);
            let i = skip_ws(text, body_at);
            if i < text.len() && text.as_bytes()[i] == b'{' {
                let call = scan_call(text, i, "arguments");
                let complete = call.end;
                let close_after = close.filter(|&c| complete.is_none_or(|e| e <= c));
                r.calls.push(call);
                match (complete, close, close_after) {
                    (Some(_), _, Some(c)) => {
                        r.end = Some(RegionEnd::Calls(c + HERMES_CLOSE.len()));
                    }
                    // The block closed inside an unfinished call.
                    (None, Some(c), _) => {
                        r.calls.pop();
                        r.end = Some(RegionEnd::Rest(c + HERMES_CLOSE.len()));
                    }
                    (Some(e), None, _) if last => {
                        // The model stopped without closing the block.
                        r.end = Some(RegionEnd::Calls(e.max(text.len())));
                    }
                    _ => {}
                }
                if let Some(c) = r.calls.last() {
                    if c.end.is_some() && c.parsed.is_none() {
                        let end = close.map_or(text.len(), |c| c + HERMES_CLOSE.len());
                        if close.is_some() || last {
                            r.calls.pop();
                            r.end = Some(RegionEnd::Rest(end));
                        }
                    }
                }
            } else if let Some(c) = close {
                // Not JSON after the tag: content, once the block ends.
                r.end = Some(RegionEnd::Rest(c + HERMES_CLOSE.len()));
            }
            if r.end.is_none() && last {
                r.end = Some(RegionEnd::Rest(text.len()));
            }
        }
        ToolSyntax::Llama3Json => {
            let mut i = skip_ws(text, 0);
            if text[i..].starts_with(PYTHON_TAG) {
                i += PYTHON_TAG.len();
            }
            scan_list(text, i, "parameters", b';', None, last, &mut r);
        }
        ToolSyntax::Mistral => {
            let i = skip_ws(text, MISTRAL_OPEN.len().min(text.len()));
            if i >= text.len() {
                if last {
                    r.end = Some(RegionEnd::Rest(text.len()));
                }
                return r;
            }
            if text.as_bytes()[i] == b'[' {
                scan_list(text, i + 1, "arguments", b',', Some(b']'), last, &mut r);
            } else {
                scan_named(text, last, &mut r);
            }
        }
        ToolSyntax::Harmony => {}
    }
    r
}

/// Calls written as JSON objects from `i`, separated by `sep` (and
/// whitespace), ended by `close` if given (else by the end of the output).
fn scan_list(
    text: &str,
    mut i: usize,
    args_key: &str,
    sep: u8,
    close: Option<u8>,
    last: bool,
    r: &mut Region,
) {
    loop {
        i = skip_ws(text, i);
        if i >= text.len() {
            if last {
                r.end = Some(if r.calls.is_empty() {
                    RegionEnd::Rest(text.len())
                } else {
                    RegionEnd::Calls(text.len())
                });
            }
            return;
        }
        if close == Some(text.as_bytes()[i]) && !r.calls.is_empty() {
            r.end = Some(RegionEnd::Calls(i + 1));
            return;
        }
        if text.as_bytes()[i] != b'{' {
            return bad(text, i, r);
        }
        let call = scan_call(text, i, args_key);
        let Some(end) = call.end else {
            r.calls.push(call);
            if last {
                r.end = Some(unfinished(r, text));
            }
            return;
        };
        if call.parsed.is_none() {
            return bad(text, i, r);
        }
        r.calls.push(call);
        i = skip_ws(text, end);
        if i >= text.len() {
            if last {
                r.end = Some(RegionEnd::Calls(text.len()));
            }
            return;
        }
        let b = text.as_bytes()[i];
        if b == sep {
            i += 1;
        } else if close == Some(b) {
            r.end = Some(RegionEnd::Calls(i + 1));
            return;
        } else {
            return bad(text, i, r);
        }
    }
}

/// How a region ends whose last call never finished: with only that call,
/// it is content unless it started streaming or was cut short (see
/// `advance`); after whole calls, the calls' markup.
fn unfinished(r: &Region, text: &str) -> RegionEnd {
    if r.calls.len() == 1 {
        RegionEnd::Rest(text.len())
    } else {
        RegionEnd::Calls(text.len())
    }
}

/// Text at `i` that is not a call: with no call before it, the whole
/// region is content; after calls, the calls end there and the rest is
/// content.
fn bad(text: &str, i: usize, r: &mut Region) {
    if r.calls.is_empty() {
        r.end = Some(RegionEnd::Rest(text.len()));
    } else {
        r.end = Some(RegionEnd::Calls(i));
    }
}

/// Mistral's `[TOOL_CALLS]name[ARGS]{...}` calls, each after its marker.
fn scan_named(text: &str, last: bool, r: &mut Region) {
    let mut at = 0;
    loop {
        let Some(body) = text[at..].strip_prefix(MISTRAL_OPEN) else {
            return bad(text, at, r);
        };
        let body_at = at + MISTRAL_OPEN.len();
        let Some(args_tag) = body.find("[ARGS]") else {
            if last || body.len() > 256 {
                bad(text, at, r);
            }
            return;
        };
        let name = body[..args_tag].trim();
        if name.is_empty() {
            return bad(text, at, r);
        }
        let s = skip_ws(text, body_at + args_tag + "[ARGS]".len());
        let mut call = CallScan {
            name: Some(name.to_string()),
            ..CallScan::default()
        };
        if s >= text.len() {
            r.calls.push(call);
            if last {
                r.end = Some(unfinished(r, text));
            }
            return;
        }
        let end = value_end(text, s);
        call.args = Some((s, end));
        call.end = end;
        if let Some(e) = end {
            let v = serde_json::from_str::<Value>(&text[s..e]).ok();
            call.parsed = v.filter(Value::is_object).map(|args| ParsedCall {
                name: name.to_string(),
                arguments: args.to_string(),
            });
            if call.parsed.is_none() {
                return bad(text, at, r);
            }
        }
        r.calls.push(call);
        let Some(e) = end else {
            if last {
                r.end = Some(unfinished(r, text));
            }
            return;
        };
        let next = skip_ws(text, e);
        if next >= text.len() {
            if last {
                r.end = Some(RegionEnd::Calls(text.len()));
            }
            return;
        }
        if !text[next..].starts_with(MISTRAL_OPEN) && !MISTRAL_OPEN.starts_with(&text[next..]) {
            r.end = Some(RegionEnd::Calls(next));
            return;
        }
        if MISTRAL_OPEN.starts_with(&text[next..]) && !last {
            return;
        }
        at = next;
    }
}

fn skip_ws(text: &str, mut i: usize) -> usize {
    let b = text.as_bytes();
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The end of the JSON value starting at `i` (by its brackets and
/// strings; its content is checked when parsed), if it is complete.
fn value_end(text: &str, i: usize) -> Option<usize> {
    let b = text.as_bytes();
    match b.get(i)? {
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut in_str = false;
            let mut esc = false;
            for (k, &c) in b.iter().enumerate().skip(i) {
                if in_str {
                    match (esc, c) {
                        (true, _) => esc = false,
                        (false, b'\\') => esc = true,
                        (false, b'"') => in_str = false,
                        _ => {}
                    }
                    continue;
                }
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(k + 1);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        b'"' => {
            let mut esc = false;
            for (k, &c) in b.iter().enumerate().skip(i + 1) {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, b'\\') => esc = true,
                    (false, b'"') => return Some(k + 1),
                    _ => {}
                }
            }
            None
        }
        _ => {
            // A number or a literal: it ends where a delimiter starts.
            let k = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b';') || c.is_ascii_whitespace())?;
            Some(i + k)
        }
    }
}

/// One call object starting at `i` (`{`): its name and arguments as far as
/// they are written.
fn scan_call(text: &str, i: usize, args_key: &str) -> CallScan {
    let mut c = CallScan::default();
    let Some(end) = value_end(text, i) else {
        // Read the keys written so far.
        let mut k = i + 1;
        loop {
            k = skip_ws(text, k);
            if k >= text.len() || text.as_bytes()[k] != b'"' {
                return c;
            }
            let Some(ke) = value_end(text, k) else {
                return c;
            };
            let key: String = serde_json::from_str(&text[k..ke]).unwrap_or_default();
            k = skip_ws(text, ke);
            if k >= text.len() || text.as_bytes()[k] != b':' {
                return c;
            }
            let vs = skip_ws(text, k + 1);
            if vs >= text.len() {
                return c;
            }
            let ve = value_end(text, vs);
            let is_args = key == args_key || key == "arguments" || key == "parameters";
            if is_args && c.args.is_none() {
                c.args = Some((vs, ve));
            } else if key == "name" {
                if let Some(ve) = ve {
                    c.name = serde_json::from_str::<String>(&text[vs..ve]).ok();
                }
            }
            let Some(ve) = ve else { return c };
            k = skip_ws(text, ve);
            if k >= text.len() || text.as_bytes()[k] != b',' {
                return c;
            }
            k += 1;
        }
    };
    c.end = Some(end);
    let v: Option<Value> = serde_json::from_str(&text[i..end]).ok();
    c.parsed = v.as_ref().and_then(|v| call_from_value(v, args_key));
    if let Some(p) = &c.parsed {
        c.name = Some(p.name.clone());
        // Where the arguments' text is, for a call that began streaming.
        let partial = scan_call(&text[..end - 1], i, args_key);
        c.args = partial.args.map(|(s, e)| (s, e.or(Some(end - 1))));
    }
    c
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

/// Parses a whole output: its content (`None` when only calls are there)
/// and its calls.
pub fn parse(syntax: ToolSyntax, text: &str) -> (Option<String>, Vec<ParsedCall>) {
    parse_output(syntax, text, false)
}

/// Parses a whole output that may have been `cut` short (`max_tokens`):
/// an unfinished call is then never content (see [`ToolStream::finish_cut`]).
pub fn parse_output(
    syntax: ToolSyntax,
    text: &str,
    cut: bool,
) -> (Option<String>, Vec<ParsedCall>) {
    let mut s = ToolStream::new(syntax);
    let mut events = s.push(text);
    events.extend(if cut { s.finish_cut() } else { s.finish() });
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

    /// The same content and calls, arguments compared as JSON values (a
    /// streamed call's arguments are the model's text, a whole call's are
    /// compact JSON).
    fn same(a: &(Option<String>, Vec<ParsedCall>), b: &(Option<String>, Vec<ParsedCall>)) -> bool {
        let args = |c: &ParsedCall| serde_json::from_str::<Value>(&c.arguments).ok();
        a.0 == b.0
            && a.1.len() == b.1.len()
            && a.1
                .iter()
                .zip(&b.1)
                .all(|(x, y)| x.name == y.name && args(x).is_some() && args(x) == args(y))
    }

    /// Checks the whole parse, and that every way of streaming it agrees.
    fn check(syntax: ToolSyntax, text: &str, content: Option<&str>, calls: &[ParsedCall]) {
        let whole = check_whole(syntax, text, content, calls);
        for step in 1..=text.len().min(24) {
            let s = streamed(syntax, text, step);
            assert!(
                same(&s, &whole),
                "{text:?} in {step}-byte pieces: {s:?} vs {whole:?}"
            );
        }
    }

    /// Checks the whole parse only.
    fn check_whole(
        syntax: ToolSyntax,
        text: &str,
        content: Option<&str>,
        calls: &[ParsedCall],
    ) -> (Option<String>, Vec<ParsedCall>) {
        let whole = parse(syntax, text);
        assert_eq!(whole.0.as_deref(), content, "{text:?}");
        assert_eq!(whole.1, calls, "{text:?}");
        whole
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
        // Whole, a call that does not parse is content; streamed, a call
        // whose name and `{` went out is a call (as vLLM streams it), and
        // its markup is never content.
        let bad = "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call>";
        check_whole(ToolSyntax::Hermes, bad, Some(bad), &[]);
        let s = streamed(ToolSyntax::Hermes, bad, 1);
        assert_eq!(s.0, None);
        assert_eq!(s.1[0].name, "a");
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

#[cfg(test)]
#[path = "tool_parse_props.rs"]
mod props;
