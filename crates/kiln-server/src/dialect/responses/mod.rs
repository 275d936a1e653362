//! The OpenAI Responses dialect (`POST /v1/responses`): the create body read
//! and checked into the request funnel ([`crate::funnel`]), its input items
//! turned into chat messages for the model's template, and the engine's
//! output written back as the API's output items, whole or as its streamed
//! events (`response.created` … `response.completed`, each with its
//! `sequence_number`). The routes are [`crate::responses`]'s.
//!
//! Every field of the create body that kiln takes is honoured; any other is
//! a 400 naming it, never ignored (see [`ACCEPTED`]).

use kiln_engine::{Constraint, Request};
use kiln_model::chat::ChatMessage;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::funnel::{self, Dialect};
use crate::params::Fields;

mod writer;
pub use writer::{new_id, response_json, usage_json, Writer};

/// The Responses API's names: `max_output_tokens`, no stop sequences,
/// temperature from 0 to 2 (sampling at 1 unless told otherwise).
pub const RESPONSES: Dialect = Dialect {
    name: "responses",
    max_tokens_keys: &["max_output_tokens"],
    max_temperature: 2.0,
    sample_flag: None,
    stop_keys: &[],
    top_logprobs_key: None,
};

/// The create-body fields kiln takes; any other non-null field is refused.
pub const ACCEPTED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "store",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "metadata",
    "user",
    "parallel_tool_calls",
    "truncation",
];

/// Most metadata pairs, and their key and value lengths (the API's bounds).
const MAX_METADATA: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

/// A checked create body.
#[derive(Debug)]
pub struct Create {
    /// Empty when absent: the route picks the only model served.
    pub model: String,
    pub stream: bool,
    /// `store` (default true).
    pub store: bool,
    pub previous_response_id: Option<String>,
    pub instructions: Option<String>,
    /// The request's input items, checked and in canonical form (ids added).
    pub input: Vec<Value>,
    /// The tool fields in the chat API's shape, for [`crate::tools::parse`].
    pub chat_tools: Value,
    /// `text.format` as an output constraint.
    pub constraint: Option<Constraint>,
    /// `reasoning.effort`.
    pub effort: Option<String>,
    /// `truncation: "auto"`: drop the oldest turns when the prompt is too long.
    pub truncate: bool,
    /// The checked sampling parameters (no prompt yet).
    pub params: Request,
    /// The client gave `max_output_tokens`.
    pub explicit_max_tokens: bool,
    /// The settings a response object echoes.
    pub echo: Map<String, Value>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// Reads a create body.
pub fn parse(f: &Fields) -> Result<Create, ApiError> {
    // An empty `include` asks for nothing extra: the same as leaving it out.
    let empty_include = |k: &str| {
        k == "include"
            && f.get(k)
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty)
    };
    if let Some(k) = f
        .keys()
        .find(|k| f.has(k) && !ACCEPTED.contains(&k.as_str()) && !empty_include(k))
    {
        return Err(bad(format!(
            "'{k}' is not supported by kiln's /v1/responses (it takes {})",
            ACCEPTED.join(", ")
        )));
    }
    let model = f.str("model")?.unwrap_or_default().to_string();
    let input = match f.get("input") {
        None => return Err(bad("'input' is required")),
        Some(Value::String(s)) => vec![message_item("user", s)],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, it)| input_item(i, it))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(format!(
                "'input' must be a string or a list of input items, got {other}"
            )))
        }
    };
    let params = funnel::request(Some(f), &RESPONSES, 4096)?;
    let (chat_tools, tools_echo, choice_echo) = tools(f)?;
    let (constraint, text_echo) = text_format(f)?;
    let (effort, reasoning_echo) = reasoning(f)?;
    let metadata = metadata(f)?;
    let truncation = f.str("truncation")?.unwrap_or("disabled");
    let truncate = match truncation {
        "disabled" => false,
        "auto" => true,
        other => {
            return Err(bad(format!(
                "'truncation' must be 'auto' or 'disabled', got '{other}'"
            )))
        }
    };
    let store = f.bool("store")?.unwrap_or(true);
    let previous_response_id = f.str("previous_response_id")?.map(str::to_string);
    let instructions = f.str("instructions")?.map(str::to_string);
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    let user = f.str("user")?;
    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(instructions));
    echo.insert(
        "max_output_tokens".into(),
        json!(f.get("max_output_tokens")),
    );
    echo.insert("metadata".into(), metadata);
    echo.insert("parallel_tool_calls".into(), json!(parallel));
    echo.insert("previous_response_id".into(), json!(previous_response_id));
    echo.insert("reasoning".into(), reasoning_echo);
    echo.insert("store".into(), json!(store));
    echo.insert(
        "temperature".into(),
        json!(f.get("temperature").cloned().unwrap_or(json!(1.0))),
    );
    echo.insert("text".into(), text_echo);
    echo.insert("tool_choice".into(), choice_echo);
    echo.insert("tools".into(), tools_echo);
    echo.insert(
        "top_p".into(),
        json!(f.get("top_p").cloned().unwrap_or(json!(1.0))),
    );
    echo.insert("truncation".into(), json!(truncation));
    echo.insert("user".into(), json!(user));
    Ok(Create {
        model,
        stream: f.bool("stream")?.unwrap_or(false),
        store,
        previous_response_id,
        instructions,
        input,
        chat_tools,
        constraint,
        effort,
        truncate,
        explicit_max_tokens: f.has("max_output_tokens"),
        params,
        echo,
    })
}

/// A message input item in canonical form.
fn message_item(role: &str, text: &str) -> Value {
    let kind = if role == "assistant" {
        "output_text"
    } else {
        "input_text"
    };
    json!({"type": "message", "id": new_id("msg"), "role": role, "status": "completed",
        "content": [{"type": kind, "text": text}]})
}

/// One input item, checked, in canonical form.
fn input_item(i: usize, item: &Value) -> Result<Value, ApiError> {
    let at = format!("input[{i}]");
    let obj = item
        .as_object()
        .ok_or_else(|| bad(format!("'{at}' must be an object, got {item}")))?;
    let ty = match obj.get("type") {
        None | Some(Value::Null) => "message",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(bad(format!("'{at}.type' must be a string, got {other}"))),
    };
    let string = |key: &str| -> Result<&str, ApiError> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(bad(format!("'{at}.{key}' is required"))),
            Some(other) => Err(bad(format!("'{at}.{key}' must be a string, got {other}"))),
        }
    };
    let id = |prefix: &str| match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        _ => new_id(prefix),
    };
    match ty {
        "message" => {
            let role = string("role")?;
            if !["user", "system", "developer", "assistant"].contains(&role) {
                return Err(bad(format!(
                    "'{at}.role' must be user, system, developer or assistant, got '{role}'"
                )));
            }
            let text = match obj.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                        match (kind, p.get("text").and_then(Value::as_str)) {
                            ("input_text" | "output_text", Some(t)) => text.push_str(t),
                            ("input_image" | "input_file" | "input_audio", _) => {
                                return Err(bad(format!(
                                    "'{at}.content[{j}]': '{kind}' parts are not supported; \
                                     kiln serves text-only models"
                                )))
                            }
                            _ => {
                                return Err(bad(format!(
                                    "'{at}.content[{j}]' must be an input_text or output_text \
                                     part with 'text', got {p}"
                                )))
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) => return Err(bad(format!("'{at}.content' is required"))),
                Some(other) => {
                    return Err(bad(format!(
                        "'{at}.content' must be a string or a list of content parts, got {other}"
                    )))
                }
            };
            let mut m = message_item(role, &text);
            m["id"] = json!(id("msg"));
            Ok(m)
        }
        "function_call" => {
            let (call_id, name, arguments) =
                (string("call_id")?, string("name")?, string("arguments")?);
            serde_json::from_str::<Value>(arguments)
                .map_err(|e| bad(format!("'{at}.arguments' is not JSON: {e}")))?;
            Ok(
                json!({"type": "function_call", "id": id("fc"), "call_id": call_id,
                "name": name, "arguments": arguments, "status": "completed"}),
            )
        }
        "function_call_output" => {
            let call_id = string("call_id")?;
            let output = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("input_text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(format!(
                                    "'{at}.output[{j}]' must be an input_text part (kiln \
                                     serves text-only models), got {p}"
                                )))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(bad(format!(
                        "'{at}.output' must be a string or a list of input_text parts"
                    )))
                }
            };
            Ok(
                json!({"type": "function_call_output", "id": id("fco"), "call_id": call_id,
                "output": output, "status": "completed"}),
            )
        }
        // A reasoning item sent back by the client (as the API asks): kept
        // in the conversation, not rendered, as chat templates drop the
        // thinking of earlier turns.
        "reasoning" => {
            let mut r = item.clone();
            r["id"] = json!(id("rs"));
            Ok(r)
        }
        other => Err(bad(format!(
            "'{at}.type' '{other}' is not supported (kiln takes message, function_call, \
             function_call_output and reasoning items)"
        ))),
    }
}

/// The text of a canonical message item.
fn item_text(item: &Value) -> String {
    item["content"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// Canonical items (a stored conversation, then the request's input) as the
/// chat messages the template renders: `developer` is `system`, function
/// calls join the assistant turn before them, outputs are `tool` messages.
pub fn messages(instructions: Option<&str>, items: &[Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::new();
    if let Some(i) = instructions {
        out.push(ChatMessage::new("system", i));
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for item in items {
        match item["type"].as_str() {
            Some("message") => {
                let role = match item["role"].as_str() {
                    Some("developer") => "system",
                    Some(r) => r,
                    None => "user",
                };
                out.push(ChatMessage::new(role, item_text(item)));
            }
            Some("function_call") => {
                let name = item["name"].as_str().unwrap_or_default().to_string();
                let call_id = item["call_id"].as_str().unwrap_or_default().to_string();
                let args: Value = item["arguments"]
                    .as_str()
                    .and_then(|a| serde_json::from_str(a).ok())
                    .unwrap_or_else(|| json!({}));
                names.push((call_id.clone(), name.clone()));
                let call = json!({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}});
                match out.last_mut() {
                    Some(m) if m.role == "assistant" => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => {
                        let mut m = ChatMessage::new("assistant", "");
                        m.tool_calls = Some(vec![call]);
                        out.push(m);
                    }
                }
            }
            Some("function_call_output") => {
                let call_id = item["call_id"].as_str().unwrap_or_default().to_string();
                let mut m = ChatMessage::new("tool", item["output"].as_str().unwrap_or_default());
                m.name = names
                    .iter()
                    .find(|(id, _)| *id == call_id)
                    .map(|(_, n)| n.clone());
                m.tool_call_id = Some(call_id);
                out.push(m);
            }
            _ => {}
        }
    }
    out
}

/// `tools`, `tool_choice` and `parallel_tool_calls` in the chat API's
/// shape, with the echo of the first two.
fn tools(f: &Fields) -> Result<(Value, Value, Value), ApiError> {
    let list = match f.get("tools") {
        None => Vec::new(),
        Some(Value::Array(l)) => l.clone(),
        Some(other) => return Err(bad(format!("'tools' must be a list, got {other}"))),
    };
    let mut chat = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let tf = Fields::new(t, "tools[]")?;
        let ty = tf.str("type")?.unwrap_or("");
        if ty != "function" {
            return Err(bad(format!(
                "tools[{i}]: only function tools are supported, got type '{ty}'"
            )));
        }
        const KEYS: &[&str] = &["type", "name", "description", "parameters", "strict"];
        if let Some(k) = tf.keys().find(|k| tf.has(k) && !KEYS.contains(&k.as_str())) {
            return Err(bad(format!(
                "tools[{i}].{k} is not supported (a function tool has {})",
                KEYS.join(", ")
            )));
        }
        let name = tf
            .str("name")?
            .ok_or_else(|| bad(format!("tools[{i}].name is required")))?;
        let mut fun = json!({"name": name});
        if let Some(d) = tf.str("description")? {
            fun["description"] = json!(d);
        }
        if let Some(p) = tf.get("parameters") {
            fun["parameters"] = p.clone();
        }
        if let Some(s) = tf.bool("strict")? {
            fun["strict"] = json!(s);
        }
        chat.push(json!({"type": "function", "function": fun}));
    }
    let (choice, echo) = match f.get("tool_choice") {
        // The API echoes `auto` when no choice is given.
        None => (None, json!("auto")),
        Some(v @ Value::String(_)) => (Some(v.clone()), v.clone()),
        Some(v @ Value::Object(o)) => {
            match (
                o.get("type").and_then(Value::as_str),
                o.get("name").and_then(Value::as_str),
            ) {
                (Some("function"), Some(name)) => (
                    Some(json!({"type": "function", "function": {"name": name}})),
                    v.clone(),
                ),
                _ => {
                    return Err(bad(format!(
                        "'tool_choice' must be none, auto, required or {{\"type\": \"function\", \
                         \"name\": ...}}, got {v}"
                    )))
                }
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "'tool_choice' must be a string or an object, got {other}"
            )))
        }
    };
    // `auto` and `none` without tools choose nothing: the API takes them.
    let choice = choice.filter(|c| !(list.is_empty() && (c == "auto" || c == "none")));
    let mut v = json!({"tools": chat});
    if let Some(c) = choice {
        v["tool_choice"] = c;
    }
    if let Some(p) = f.bool("parallel_tool_calls")? {
        v["parallel_tool_calls"] = json!(p);
    }
    Ok((v, Value::Array(list), echo))
}

/// `text.format` as an output constraint, and the `text` echo.
fn text_format(f: &Fields) -> Result<(Option<Constraint>, Value), ApiError> {
    let Some(text) = f.get("text") else {
        return Ok((None, json!({"format": {"type": "text"}})));
    };
    let tf = Fields::new(text, "text")?;
    if let Some(k) = tf.keys().find(|k| tf.has(k) && k.as_str() != "format") {
        return Err(bad(format!(
            "'text.{k}' is not supported (kiln takes text.format)"
        )));
    }
    let Some(format) = tf.get("format") else {
        return Ok((None, json!({"format": {"type": "text"}})));
    };
    let ff = Fields::new(format, "text.format")?;
    let ty = ff
        .str("type")?
        .ok_or_else(|| bad("'text.format.type' is required"))?;
    let allowed: &[&str] = match ty {
        "text" | "json_object" => &["type"],
        "json_schema" => &["type", "name", "schema", "description", "strict"],
        other => {
            return Err(bad(format!(
                "'text.format.type' must be text, json_object or json_schema, got '{other}'"
            )))
        }
    };
    if let Some(k) = ff
        .keys()
        .find(|k| ff.has(k) && !allowed.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "'text.format.{k}' is not supported with type '{ty}'"
        )));
    }
    let c = match ty {
        "text" => None,
        "json_object" => Some(Constraint::JsonObject),
        _ => {
            ff.str("name")?
                .ok_or_else(|| bad("'text.format.name' is required with type 'json_schema'"))?;
            ff.str("description")?;
            // The schema is enforced whether `strict` is set or not.
            ff.bool("strict")?;
            match ff.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    Some(Constraint::JsonSchema(s.clone()))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "'text.format.schema' must be a JSON schema object, got {other}"
                    )))
                }
                None => return Err(bad("'text.format.schema' is required")),
            }
        }
    };
    Ok((c, json!({"format": format})))
}

/// `reasoning`: the effort (applied by the route through the template) and
/// the echo. kiln writes no summaries: the reasoning text is the reasoning
/// item's `content`, so asking for a summary is refused.
fn reasoning(f: &Fields) -> Result<(Option<String>, Value), ApiError> {
    let Some(r) = f.get("reasoning") else {
        return Ok((None, json!({"effort": null, "summary": null})));
    };
    let rf = Fields::new(r, "reasoning")?;
    if let Some(k) = rf
        .keys()
        .find(|k| rf.has(k) && !["effort", "summary"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "'reasoning.{k}' is not supported (kiln takes reasoning.effort)"
        )));
    }
    if rf.has("summary") {
        return Err(bad(
            "'reasoning.summary' is not supported: kiln writes no reasoning summaries; the \
             model's reasoning text comes as the reasoning item's content",
        ));
    }
    let effort = rf.str("effort")?;
    const EFFORTS: &[&str] = &["none", "minimal", "low", "medium", "high", "xhigh"];
    if let Some(e) = effort {
        if !EFFORTS.contains(&e) {
            return Err(bad(format!(
                "'reasoning.effort' must be one of {}, got '{e}'",
                EFFORTS.join(", ")
            )));
        }
    }
    Ok((
        effort.map(str::to_string),
        json!({"effort": effort, "summary": null}),
    ))
}

/// `metadata`: at most 16 string pairs, within the API's lengths.
fn metadata(f: &Fields) -> Result<Value, ApiError> {
    let Some(m) = f.get("metadata") else {
        return Ok(json!({}));
    };
    let map = m
        .as_object()
        .ok_or_else(|| bad(format!("'metadata' must be an object, got {m}")))?;
    if map.len() > MAX_METADATA {
        return Err(bad(format!(
            "'metadata' takes at most {MAX_METADATA} pairs, got {}",
            map.len()
        )));
    }
    for (k, v) in map {
        if k.chars().count() > MAX_METADATA_KEY {
            return Err(bad(format!(
                "'metadata' keys are at most {MAX_METADATA_KEY} characters"
            )));
        }
        match v.as_str() {
            Some(s) if s.chars().count() <= MAX_METADATA_VALUE => {}
            _ => {
                return Err(bad(format!(
                    "'metadata.{k}' must be a string of at most {MAX_METADATA_VALUE} characters"
                )))
            }
        }
    }
    Ok(m.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(v: Value) -> Result<Create, String> {
        let f = Fields::new(&v, "").map_err(|e| e.message)?;
        parse(&f).map_err(|e| e.message)
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_by_name() {
        for (body, needle) in [
            (
                json!({"input": "x", "top_k": 3}),
                "'top_k' is not supported",
            ),
            (json!({"input": "x", "background": true}), "'background'"),
            (
                json!({"input": "x", "text": {"verbosity": "low"}}),
                "'text.verbosity'",
            ),
            (
                json!({"input": "x", "reasoning": {"summary": "auto"}}),
                "'reasoning.summary'",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "only function tools",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image",
                    "image_url": "http://x"}]}]}),
                "'input_image' parts are not supported",
            ),
            (
                json!({"input": "x", "truncation": "middle"}),
                "'truncation'",
            ),
            (json!({}), "'input' is required"),
            (json!({"input": "x", "temperature": 3}), "'temperature'"),
        ] {
            let e = read(body.clone())
                .err()
                .unwrap_or_else(|| panic!("took {body}"));
            assert!(e.contains(needle), "{body}: {e}");
        }
        // Null is absent, as everywhere.
        assert!(read(json!({"input": "x", "background": null})).is_ok());
        // What asks for nothing is taken: an empty include, a choice without tools.
        assert!(read(json!({"input": "x", "include": []})).is_ok());
        assert!(read(json!({"input": "x", "include": ["x"]}))
            .unwrap_err()
            .contains("'include'"));
        assert!(read(json!({"input": "x", "tool_choice": "auto"})).is_ok());
    }

    #[test]
    fn input_items_become_chat_messages() {
        let c = read(json!({"input": [
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}
        ], "instructions": "sys", "max_output_tokens": 9}))
        .unwrap();
        assert_eq!(c.params.stop.max_new_tokens, 9);
        let m = messages(c.instructions.as_deref(), &c.input);
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(m[2].content.as_deref(), Some("hi"));
        let call = &m[3].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["arguments"]["a"], 1);
        assert_eq!(m[4].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(m[4].name.as_deref(), Some("f"));
    }

    #[test]
    fn text_format_json_schema_is_a_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let c = read(
            json!({"input": "x", "text": {"format": {"type": "json_schema",
            "name": "n", "schema": schema, "strict": true}}}),
        )
        .unwrap();
        assert_eq!(c.constraint, Some(Constraint::JsonSchema(schema)));
        let c = read(json!({"input": "x", "text": {"format": {"type": "json_object"}}})).unwrap();
        assert_eq!(c.constraint, Some(Constraint::JsonObject));
    }
}

#[cfg(test)]
mod fuzz {
    use kiln_model::fuzz::{cases, random_json, run_with};

    use super::*;

    const KEYS: &[&str] = &[
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "store",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "tools",
        "tool_choice",
        "text",
        "format",
        "schema",
        "reasoning",
        "effort",
        "metadata",
        "user",
        "parallel_tool_calls",
        "truncation",
        "type",
        "role",
        "content",
        "name",
        "call_id",
        "arguments",
        "output",
        "parameters",
    ];

    /// Every Responses body is parsed to an answer, never a panic, and an
    /// accepted one converts to chat messages.
    #[test]
    fn responses_bodies_never_panic() {
        let report = run_with(
            "responses bodies",
            cases(3000),
            |rng, _| random_json(rng, KEYS, 4).to_string().into_bytes(),
            |body| {
                let Ok(v) = crate::body::json(Ok(axum::body::Bytes::copy_from_slice(body))) else {
                    return false;
                };
                let Ok(f) = Fields::new(&v, "") else {
                    return false;
                };
                match parse(&f) {
                    Ok(c) => {
                        messages(c.instructions.as_deref(), &c.input);
                        true
                    }
                    Err(_) => false,
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, cases(3000));
    }
}
