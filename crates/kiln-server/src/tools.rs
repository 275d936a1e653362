//! Tool calling on chat requests: the `tools`, `tool_choice` and
//! `parallel_tool_calls` fields, read and checked as vLLM's OpenAI server
//! reads them, and the grammar that makes `required` and named choices hold.
//!
//! What each choice does (vLLM's rules, `vllm/entrypoints/openai/
//! serving_chat.py` and `protocol.py`):
//! - `none`: the tools are still rendered into the prompt (vLLM's default,
//!   `exclude_tools_when_tool_choice_none=False`), the output is never read
//!   for calls;
//! - `auto` (the default when `tools` is given): the model chooses; its
//!   output is parsed for calls. It needs `option.enable_auto_tool_choice=
//!   true` on the model (vLLM's `--enable-auto-tool-choice`), else a 400;
//! - `required` and a named function work whatever the setting: the output
//!   is constrained by a grammar to the model's own call syntax
//!   ([`ToolSyntax`]) with arguments valid against the function's
//!   `parameters` schema (vLLM constrains to a JSON list instead; kiln keeps
//!   the syntax the model was trained on so the same parser reads it).

use kiln_engine::Constraint;
use serde_json::{json, Value};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ApiError;
use crate::params::Fields;
use crate::tool_parse::{ToolEvent, ToolStream, ToolSyntax};

/// Most tools one request may list.
const MAX_TOOLS: usize = 128;

/// What the client allows the model to do with the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call: the output is all content.
    None,
    /// The model decides.
    Auto,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this function.
    Named(String),
}

/// A chat request's tool fields.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    /// The tools as given (rendered into the prompt by the template).
    pub tools: Vec<Value>,
    /// `tool_choice`.
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): more than one call allowed.
    pub parallel: bool,
}

impl ToolRequest {
    /// Whether the output is to be read for calls.
    pub fn parses(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar for `required` and named choices (`None` otherwise;
    /// harmony's markers are written as the special tokens they are).
    pub fn constraint(&self, syntax: ToolSyntax) -> Option<Constraint> {
        let allowed: Vec<&Value> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(n) => self
                .tools
                .iter()
                .filter(|t| tool_name(t) == Some(n))
                .collect(),
        };
        // A named function is called once (as OpenAI and vLLM answer it);
        // repeating it would only run into `max_tokens`.
        let parallel = self.parallel && self.choice == ToolChoice::Required;
        Some(Constraint::Grammar(grammar(syntax, &allowed, parallel)))
    }
}

impl ToolRequest {
    /// The shortest text of one call each `required`/named choice allows,
    /// written in `syntax` (one per allowed function; none for other
    /// choices): the route refuses a `max_tokens` that cannot
    /// hold the shortest of them, as a grammar-constrained call would be
    /// cut before it could close.
    pub fn minimal_calls(&self, syntax: ToolSyntax) -> Vec<String> {
        let allowed: Vec<&Value> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return Vec::new(),
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(n) => self
                .tools
                .iter()
                .filter(|t| tool_name(t) == Some(n))
                .collect(),
        };
        let (args_key, open, close) = match syntax {
            ToolSyntax::Hermes => ("arguments", "<tool_call>\n", "\n</tool_call>"),
            ToolSyntax::Llama3Json => ("parameters", "", ""),
            ToolSyntax::Mistral => ("arguments", "[TOOL_CALLS][", "]"),
            ToolSyntax::Harmony => ("", "", ""),
        };
        allowed
            .iter()
            .map(|t| {
                let schema = t.get("function").and_then(|f| f.get("parameters"));
                let args = schema.map_or(json!({}), minimal_value);
                let name = tool_name(t).unwrap_or_default();
                if syntax == ToolSyntax::Harmony {
                    return crate::harmony::call_text(name, &args.to_string());
                }
                format!("{open}{{\"name\": \"{name}\", \"{args_key}\": {args}}}{close}")
            })
            .collect()
    }
}

/// A short value valid against simple schemas (the required properties
/// of objects, the lower bounds of arrays and strings): a lower bound on
/// what a schema-constrained value takes, not an exact minimum.
fn minimal_value(schema: &Value) -> Value {
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts.first().and_then(Value::as_str).unwrap_or("null"),
        _ => {
            if let Some(v) = schema.get("enum").and_then(|e| e.get(0)) {
                return v.clone();
            }
            if let Some(v) = schema.get("const") {
                return v.clone();
            }
            "object"
        }
    };
    match ty {
        "object" => {
            let props = schema.get("properties");
            let required = schema.get("required").and_then(Value::as_array);
            let mut m = serde_json::Map::new();
            for r in required.into_iter().flatten().filter_map(Value::as_str) {
                let sub = props.and_then(|p| p.get(r)).unwrap_or(&Value::Null);
                m.insert(r.to_string(), minimal_value(sub));
            }
            Value::Object(m)
        }
        "string" => {
            if let Some(v) = schema.get("enum").and_then(|e| e.get(0)) {
                return v.clone();
            }
            let n = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            json!("a".repeat(n.min(64) as usize))
        }
        "integer" | "number" => json!(0),
        "boolean" => json!(false),
        "array" => json!([]),
        _ => Value::Null,
    }
}

/// Refuses a `required`/named choice whose `max_tokens` cannot hold the
/// shortest call it allows (a 400 naming both numbers), instead of
/// answering with a call cut short.
pub fn check_room(
    engine: &kiln_engine::Engine,
    t: &ToolRequest,
    syntax: ToolSyntax,
    max_new_tokens: usize,
    f: &Fields,
) -> Result<(), ApiError> {
    let mut shortest: Option<usize> = None;
    for text in t.minimal_calls(syntax) {
        let n = crate::generation::encode(engine, &text, false)?.len();
        shortest = Some(shortest.map_or(n, |s| s.min(n)));
    }
    match shortest {
        Some(need) if need > max_new_tokens => {
            let key = ["max_completion_tokens", "max_tokens"]
                .into_iter()
                .find(|k| f.has(k))
                .unwrap_or("max_tokens");
            Err(ApiError::bad_request(format!(
                "'{key}' is {max_new_tokens}, but the shortest tool call that tool_choice \
                 allows takes at least {need} tokens; raise '{key}' (a call cut short \
                 would not parse)"
            )))
        }
        _ => Ok(()),
    }
}

/// The function name of a checked tool.
fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the
/// request has no tools (and no tool choice other than `none`).
pub fn parse(f: &Fields) -> Result<Option<ToolRequest>, ApiError> {
    if f.has("functions") || f.has("function_call") {
        return Err(ApiError::bad_request(
            "'functions' and 'function_call' (OpenAI's deprecated function calling) are not \
             supported; use 'tools' and 'tool_choice'",
        ));
    }
    let tools = match f.get("tools") {
        None => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'tools' must be a list of tools, got {other}"
            )))
        }
    };
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::bad_request(format!(
            "'tools' lists {} tools; at most {MAX_TOOLS} are taken",
            tools.len()
        )));
    }
    for (i, t) in tools.iter().enumerate() {
        check_tool(i, t)?;
    }
    let choice = match f.get("tool_choice") {
        None => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::bad_request(format!(
                    "'tool_choice' must be none, auto, required or {{\"type\": \"function\", \
                     \"function\": {{\"name\": ...}}}}, got '{other}'"
                )))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|fun| fun.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "'tool_choice' must be {{\"type\": \"function\", \"function\": \
                         {{\"name\": ...}}}}, got {v}"
                    ))
                })?;
            if !tools.iter().any(|t| tool_name(t) == Some(name)) {
                return Err(ApiError::bad_request(format!(
                    "'tool_choice' names the function '{name}', which is not in 'tools'"
                )));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'tool_choice' must be a string or an object, got {other}"
            )))
        }
    };
    if tools.is_empty() && choice != ToolChoice::None {
        // vLLM: "When using `tool_choice`, `tools` must be set."
        return Err(ApiError::bad_request(
            "'tool_choice' needs 'tools' (it is only 'none' without them)",
        ));
    }
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    if tools.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolRequest {
        tools,
        choice,
        parallel,
    }))
}

/// The `function` object of a tool or a tool call and its `name`, or the
/// error `bad` words for whichever is missing.
fn function_and_name(
    v: &Value,
    bad: impl Fn(&str) -> ApiError,
) -> Result<(&serde_json::Map<String, Value>, &str), ApiError> {
    let fun = v
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("'function' must be an object"))?;
    let name = fun
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'function.name' is required"))?;
    Ok((fun, name))
}

/// Checks one tool: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`, the name OpenAI's `^[a-zA-Z0-9_-]{1,64}$`.
fn check_tool(i: usize, t: &Value) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("tools[{i}]: {why}"));
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("only tools of type 'function' are supported"));
    }
    let (fun, name) = function_and_name(t, bad)?;
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        return Err(bad(&format!(
            "function name '{name}' must be 1 to 64 letters, digits, '_' or '-'"
        )));
    }
    match fun.get("parameters") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(bad(&format!(
            "'function.parameters' must be a JSON schema object, got {other}"
        ))),
    }
}

/// A fresh call id, `call_` and 24 hex digits (OpenAI's ids look alike).
pub fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("call_{:016x}{:08x}", t, n as u32)
}

/// An earlier assistant turn's `tool_calls`, as the template is given them:
/// each `{"id", "type": "function", "function": {"name", "arguments"}}` with
/// the client's JSON-text `arguments` parsed into an object, as vLLM does
/// before rendering (Hugging Face templates print them with `tojson`).
pub fn message_tool_calls(i: usize, m: &Fields) -> Result<Option<Vec<Value>>, ApiError> {
    let calls = match m.get("tool_calls") {
        None => return Ok(None),
        Some(Value::Array(c)) => c,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].tool_calls must be a list, got {other}"
            )))
        }
    };
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let bad =
            |why: &str| ApiError::bad_request(format!("messages[{i}].tool_calls[{j}]: {why}"));
        let (fun, name) = function_and_name(c, bad)?;
        let arguments = match fun.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|e| bad(&format!("'function.arguments' is not JSON: {e}")))?,
            Some(v) => v.clone(),
        };
        let mut call = json!({"type": "function",
            "function": {"name": name, "arguments": arguments}});
        if let Some(id) = c.get("id") {
            call["id"] = id.clone();
        }
        out.push(call);
    }
    Ok(Some(out))
}

/// Rewrites a streamed choice's chunks into content and `delta.tool_calls`
/// chunks: a call comes out as one chunk with its index, id, type and name
/// (arguments empty), then its arguments in pieces as the model writes
/// them, as OpenAI and vLLM's streaming parsers send them.
#[derive(Debug)]
pub struct ToolDeltas {
    stream: ToolStream,
}

impl ToolDeltas {
    /// For output in `syntax`.
    pub fn new(syntax: ToolSyntax) -> Self {
        Self {
            stream: ToolStream::new(syntax),
        }
    }

    /// The chunks to send for `chunk` (a chat chunk whose delta may carry
    /// `content`); `end` marks the choice's last chunk, which keeps the
    /// finish reason (`tool_calls` once a call was made) and comes last.
    pub fn rewrite(&mut self, mut chunk: Value, end: bool) -> Vec<Value> {
        let text = chunk["choices"][0]["delta"]
            .as_object_mut()
            .and_then(|d| d.remove("content"))
            .and_then(|c| c.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut events = self.stream.push(&text);
        let cut = chunk["choices"][0]["finish_reason"] == "length";
        if end {
            events.extend(if cut {
                self.stream.finish_cut()
            } else {
                self.stream.finish()
            });
        }
        let mut template = chunk.clone();
        template["choices"][0]["logprobs"] = Value::Null;
        template["choices"][0]["finish_reason"] = Value::Null;
        let mut before = Vec::new();
        let mut first_content = None;
        let mut index = self.stream.calls() - count_calls(&events);
        for (k, e) in events.into_iter().enumerate() {
            match e {
                ToolEvent::Content(t) if k == 0 && !end => first_content = Some(t),
                ToolEvent::Content(t) => {
                    let mut c = template.clone();
                    c["choices"][0]["delta"] = json!({"content": t});
                    before.push(c);
                }
                // A streamed call (harmony): its head now, then its
                // arguments as they come, under the last started index.
                ToolEvent::CallStart { name } => {
                    let mut head = template.clone();
                    head["choices"][0]["delta"] = json!({"tool_calls": [{"index": index,
                        "id": call_id(), "type": "function",
                        "function": {"name": name, "arguments": ""}}]});
                    before.push(head);
                    index += 1;
                }
                ToolEvent::CallArguments(a) => {
                    let mut args = template.clone();
                    args["choices"][0]["delta"] = json!({"tool_calls": [{"index": index.saturating_sub(1),
                        "function": {"arguments": a}}]});
                    before.push(args);
                }
                ToolEvent::Call(call) => {
                    let mut head = template.clone();
                    head["choices"][0]["delta"] = json!({"tool_calls": [{"index": index,
                        "id": call_id(), "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]});
                    let mut args = template.clone();
                    args["choices"][0]["delta"] = json!({"tool_calls": [{"index": index,
                        "function": {"arguments": call.arguments}}]});
                    before.push(head);
                    before.push(args);
                    index += 1;
                }
            }
        }
        if let Some(t) = first_content {
            chunk["choices"][0]["delta"]["content"] = json!(t);
        }
        if end {
            // A call cut short keeps `length` (its arguments are unfinished).
            if self.stream.calls() > 0 && chunk["choices"][0]["finish_reason"] == "stop" {
                chunk["choices"][0]["finish_reason"] = json!("tool_calls");
            }
            before.push(chunk);
            return before;
        }
        let empty = chunk["choices"][0]["delta"]
            .as_object()
            .is_none_or(|d| d.is_empty());
        let mut out = Vec::new();
        if !empty || !chunk["choices"][0]["logprobs"].is_null() {
            out.push(chunk);
        }
        out.extend(before);
        out
    }
}

fn count_calls(events: &[ToolEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, ToolEvent::Call(_) | ToolEvent::CallStart { .. }))
        .count()
}

/// The JSON schema a call's arguments are held to: the function's
/// `parameters` (any object without), compact unless it says otherwise.
fn args_schema(t: &Value) -> Value {
    let mut schema = t
        .get("function")
        .and_then(|f| f.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// A Lark string literal of `s`.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The grammar of one or more calls (more only if `parallel`) to `tools`,
/// written in `syntax`, each call's arguments valid against its function's
/// `parameters` (compact JSON, like the other JSON constraints).
fn grammar(syntax: ToolSyntax, tools: &[&Value], parallel: bool) -> String {
    if syntax == ToolSyntax::Harmony {
        let calls: Vec<(&str, Value)> = tools
            .iter()
            .map(|t| (tool_name(t).unwrap_or_default(), args_schema(t)))
            .collect();
        return crate::harmony::call_grammar(&calls);
    }
    let (args_key, open, sep, close, call_open, call_close) = match syntax {
        ToolSyntax::Hermes => ("arguments", "", "\n", "", "<tool_call>\n", "\n</tool_call>"),
        ToolSyntax::Llama3Json => ("parameters", "", "; ", "", "", ""),
        ToolSyntax::Mistral => ("arguments", "[TOOL_CALLS][", ", ", "]", "", ""),
        // Not reached: harmony's grammar is written above.
        ToolSyntax::Harmony => ("arguments", "", "\n", "", "", ""),
    };
    let mut g = String::new();
    let more = if parallel {
        format!(" ({} call)*", lit(sep))
    } else {
        String::new()
    };
    g.push_str(&format!("start: {} call{more} {}\n", lit(open), lit(close)));
    let alts: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!(
        "call: {} ({}) {}\n",
        lit(call_open),
        alts.join(" | "),
        lit(call_close)
    ));
    for (i, t) in tools.iter().enumerate() {
        let name = tool_name(t).unwrap_or_default();
        let schema = args_schema(t);
        let head = format!("{{\"name\": \"{name}\", \"{args_key}\": ");
        g.push_str(&format!("call_{i}: {} args_{i} \"}}\"\n", lit(&head)));
        g.push_str(&format!("args_{i}: %json {schema}\n"));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(v: Value) -> Result<Option<ToolRequest>, String> {
        let f = Fields::new(&v, "").map_err(|e| e.message)?;
        parse(&f).map_err(|e| e.message)
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn choices_are_read_as_vllm_reads_them() {
        let t = read(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel);
        let t = read(json!({"tools": [weather()], "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert!(!t.parses());
        let t = read(
            json!({"tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Required);
        assert!(!t.parallel);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = read(json!({"tools": [weather()], "tool_choice": named}))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert!(read(json!({"tool_choice": "none"})).unwrap().is_none());
        assert!(read(json!({})).unwrap().is_none());
    }

    #[test]
    fn bad_tool_fields_are_refused() {
        for (body, needle) in [
            (json!({"tool_choice": "required"}), "needs 'tools'"),
            (
                json!({"tools": [weather()], "tool_choice": "always"}),
                "always",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
                "'other'",
            ),
            (json!({"tools": [{"type": "retrieval"}]}), "type 'function'"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "'a b'",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": 3}}]}),
                "parameters",
            ),
            (json!({"tools": {}}), "list"),
            (json!({"functions": []}), "deprecated"),
        ] {
            let e = read(body.clone()).expect_err(&body.to_string());
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn grammar_lists_each_allowed_function() {
        let other = json!({"type": "function", "function": {"name": "get_time"}});
        let t = read(json!({"tools": [weather(), other], "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        let Some(Constraint::Grammar(g)) = t.constraint(ToolSyntax::Hermes) else {
            panic!("no grammar")
        };
        assert!(g.contains(r#""<tool_call>\n""#), "{g}");
        assert!(g.contains("get_weather") && g.contains("get_time"), "{g}");
        assert!(g.contains("(\"\\n\" call)*"), "{g}");
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let t = read(json!({"tools": [weather(), other], "tool_choice": named, "parallel_tool_calls": false}))
            .unwrap()
            .unwrap();
        let Some(Constraint::Grammar(g)) = t.constraint(ToolSyntax::Llama3Json) else {
            panic!("no grammar")
        };
        assert!(
            !g.contains("get_weather") && g.contains("\\\"parameters\\\""),
            "{g}"
        );
        assert!(!g.contains(")*"), "{g}");
        let t = read(json!({"tools": [weather()], "tool_choice": "auto"}))
            .unwrap()
            .unwrap();
        assert!(t.constraint(ToolSyntax::Hermes).is_none());
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;

    fn chunk(text: &str, finish: Option<&str>) -> Value {
        json!({"id": "x", "choices": [{"index": 0, "delta": {"content": text},
            "logprobs": null, "finish_reason": finish}]})
    }

    #[test]
    fn streamed_deltas_assemble_to_the_parsed_calls() {
        let text = "Sure. <tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 3, 7, 200] {
            let mut d = ToolDeltas::new(ToolSyntax::Hermes);
            let mut out = Vec::new();
            let bytes: Vec<char> = text.chars().collect();
            for piece in bytes.chunks(step) {
                out.extend(d.rewrite(chunk(&piece.iter().collect::<String>(), None), false));
            }
            out.extend(d.rewrite(chunk("", Some("stop")), true));
            let mut content = String::new();
            let mut calls: Vec<(String, String)> = Vec::new();
            for c in &out {
                let delta = &c["choices"][0]["delta"];
                content.push_str(delta["content"].as_str().unwrap_or_default());
                for t in delta["tool_calls"].as_array().into_iter().flatten() {
                    let i = t["index"].as_u64().unwrap() as usize;
                    if i == calls.len() {
                        calls.push((
                            t["function"]["name"].as_str().unwrap().into(),
                            String::new(),
                        ));
                    }
                    calls[i]
                        .1
                        .push_str(t["function"]["arguments"].as_str().unwrap());
                }
            }
            assert_eq!(content, "Sure. ", "step {step}");
            let calls: Vec<(String, Value)> = calls
                .into_iter()
                .map(|(n, a)| (n, serde_json::from_str(&a).expect("arguments parse")))
                .collect();
            assert_eq!(
                calls,
                vec![("a".into(), json!({"k": 1})), ("b".into(), json!({}))],
                "step {step}"
            );
            let last = out.last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        }
    }
}
