//! The Anthropic Messages dialect: the bodies of `/v1/messages` and
//! `/v1/messages/count_tokens` read into chat messages, tools and the
//! request funnel ([`crate::funnel`]), and the engine's output written back
//! as Anthropic's content blocks, whole or as its stream events. The routes
//! are [`crate::messages`]'s.
//!
//! Every field of Anthropic's request is either honoured or refused with a
//! 400 naming it (see [`TOP_LEVEL`]); what kiln does with the fields that
//! have no exact local meaning (`thinking`, `cache_control`, `metadata`) is
//! said where each is read.

use kiln_engine::{FinishReason, Request};
use kiln_model::chat::ChatMessage;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::funnel::{self, Dialect};
use crate::params::Fields;
use crate::reasoning::{ReasoningParser, Splitter};
use crate::tool_parse::{ToolEvent, ToolStream, ToolSyntax};
use crate::tools::ToolRequest;

/// What Anthropic's API calls the sampling parameters, and where it differs
/// from OpenAI's: `max_tokens` (required, checked by [`parse`]),
/// `stop_sequences`, temperature from 0 to 1 (the API reference's bound),
/// sampling at temperature 1 unless told otherwise.
pub const ANTHROPIC: Dialect = Dialect {
    name: "anthropic",
    max_tokens_keys: &["max_tokens"],
    max_temperature: 1.0,
    sample_flag: None,
    stop_keys: &["stop_sequences"],
    top_logprobs_key: None,
};

/// The request fields kiln takes on `/v1/messages`; any other is refused
/// with a 400 naming it.
pub const TOP_LEVEL: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "cache_control",
];

/// The fields `/v1/messages/count_tokens` takes (Anthropic's: no sampling).
pub const COUNT_TOKENS_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "cache_control",
];

/// Fields of Anthropic's reference that kiln does not implement, with why
/// (a 400 says so rather than calling them unknown).
const NOT_SUPPORTED: &[(&str, &str)] = &[
    ("service_tier", "kiln has one service tier"),
    ("container", "kiln runs no code-execution containers"),
    ("mcp_servers", "kiln connects to no MCP servers"),
    ("context_management", "kiln does not edit the context"),
    ("diagnostics", "kiln has no diagnostics to return"),
    ("inference_geo", "kiln runs where it is started"),
    ("speed", "kiln has one speed"),
    ("user_profile_id", "kiln has no user profiles"),
    ("workspace_id", "kiln has no workspaces"),
];

/// Refuses a key of `f` outside `allowed`, naming it.
fn only_known(f: &Fields, allowed: &[&str], what: &str) -> Result<(), ApiError> {
    for k in f.keys() {
        if allowed.contains(&k.as_str()) {
            continue;
        }
        if let Some((_, why)) = NOT_SUPPORTED.iter().find(|(n, _)| n == k) {
            return Err(ApiError::bad_request(format!(
                "'{k}' is not supported: {why}"
            )));
        }
        return Err(ApiError::bad_request(format!(
            "{what}: unknown field '{}'",
            f.name(k)
        )));
    }
    Ok(())
}

/// `cache_control` on a block: Anthropic's `{"type": "ephemeral", "ttl"?}`.
/// kiln caches every prompt prefix by itself (the engine's prefix cache),
/// so a breakpoint asks for nothing more; a malformed one is refused.
fn check_cache_control(v: Option<&Value>, at: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(c) if c.get("type").and_then(Value::as_str) == Some("ephemeral") => {
            match c.get("ttl") {
                None | Some(Value::Null) => Ok(()),
                Some(Value::String(t)) if t == "5m" || t == "1h" => Ok(()),
                Some(t) => Err(ApiError::bad_request(format!(
                    "{at}.cache_control.ttl must be '5m' or '1h', got {t}"
                ))),
            }
        }
        Some(c) => Err(ApiError::bad_request(format!(
            "{at}.cache_control must be {{\"type\": \"ephemeral\"}}, got {c}"
        ))),
    }
}

/// A content block as an object with its `type`, keys checked.
fn block<'a>(
    v: &'a Value,
    at: &str,
    allowed: &[&str],
) -> Result<(&'a Map<String, Value>, &'a str), ApiError> {
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request(format!("{at} must be a content block object")))?;
    let kind = m
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("{at} has no 'type'")))?;
    // A null field is an absent one (clients dump their models with nulls).
    for (k, v) in m {
        if k != "type" && !v.is_null() && !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{at}: unknown field '{k}' in a '{kind}' block"
            )));
        }
    }
    check_cache_control(m.get("cache_control"), at)?;
    Ok((m, kind))
}

/// The text of a `text` block (`citations` are refused: kiln cites nothing).
fn text_of(m: &Map<String, Value>, at: &str) -> Result<String, ApiError> {
    if m.get("citations").is_some_and(|c| !c.is_null()) {
        return Err(ApiError::bad_request(format!(
            "{at}.citations: citations are not supported"
        )));
    }
    match m.get("text") {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(ApiError::bad_request(format!(
            "{at}.text must be a string, got {}",
            other.unwrap_or(&Value::Null)
        ))),
    }
}

/// The refusal for a block type kiln does not take.
fn unsupported_block(kind: &str, at: &str) -> ApiError {
    let why = match kind {
        "image" | "document" | "search_result" | "container_upload" => {
            "kiln serves text-only models"
        }
        "redacted_thinking" => "kiln never redacts thinking, so it takes none back",
        _ => "this block type is not supported here",
    };
    ApiError::bad_request(format!(
        "{at}: '{kind}' content blocks are not supported ({why})"
    ))
}

const TEXT_KEYS: &[&str] = &["text", "cache_control", "citations"];
const TOOL_USE_KEYS: &[&str] = &["id", "name", "input", "cache_control", "caller"];
const TOOL_RESULT_KEYS: &[&str] = &["tool_use_id", "content", "is_error", "cache_control"];
const THINKING_KEYS: &[&str] = &["thinking", "signature"];

/// `system`: a string or a list of text blocks (joined by newlines).
fn system(f: &Fields) -> Result<Option<String>, ApiError> {
    match f.get("system") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                let at = format!("system[{j}]");
                let (m, kind) = block(b, &at, TEXT_KEYS)?;
                if kind != "text" {
                    return Err(ApiError::bad_request(format!(
                        "{at}: 'system' takes text blocks only, got '{kind}'"
                    )));
                }
                parts.push(text_of(m, &at)?);
            }
            Ok(Some(parts.join("\n")))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "'system' must be a string or a list of text blocks, got {other}"
        ))),
    }
}

/// The content of a `tool_result`: a string or text blocks. An error result
/// (`is_error`) reaches the model marked as one: its text follows `Error: `.
fn tool_result_text(m: &Map<String, Value>, at: &str) -> Result<String, ApiError> {
    let text = match m.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (k, p) in parts.iter().enumerate() {
                let pat = format!("{at}.content[{k}]");
                let (pm, kind) = block(p, &pat, TEXT_KEYS)?;
                if kind != "text" {
                    return Err(unsupported_block(kind, &pat));
                }
                text.push_str(&text_of(pm, &pat)?);
            }
            text
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "{at}.content must be a string or a list of text blocks, got {other}"
            )))
        }
    };
    match m.get("is_error") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(text),
        Some(Value::Bool(true)) => Ok(format!("Error: {text}")),
        Some(other) => Err(ApiError::bad_request(format!(
            "{at}.is_error must be true or false, got {other}"
        ))),
    }
}

/// The conversation: `system` and `messages` as the chat template's
/// messages. A user turn's `tool_result` blocks become `tool` messages
/// (answering the `tool_use` of the same id); an assistant turn's
/// `tool_use` blocks become its `tool_calls`; `thinking` blocks of earlier
/// assistant turns are dropped, as Anthropic drops them from the context.
/// Returns the messages and the text of a final assistant turn (Anthropic's
/// prefill: the answer continues it), which is not among the messages.
pub(crate) fn conversation(f: &Fields) -> Result<(Vec<ChatMessage>, Option<String>), ApiError> {
    let msgs = match f.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::bad_request("'messages' must be a non-empty list")),
        None => return Err(ApiError::bad_request("'messages' is required")),
    };
    let mut out = Vec::with_capacity(msgs.len() + 1);
    if let Some(s) = system(f)? {
        out.push(ChatMessage::new("system", s));
    }
    // tool_use id -> function name, for the tool results that answer them.
    let mut call_names: Vec<(String, String)> = Vec::new();
    let mut prefill = None;
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let mf = Fields::new(m, "messages[]")?;
        only_known(&mf, &["role", "content"], &at)?;
        let role = match mf.str("role")? {
            Some(r @ ("user" | "assistant")) => r,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "{at}.role must be 'user' or 'assistant', got '{other}' (the system \
                     prompt is the top-level 'system' field)"
                )))
            }
            None => return Err(ApiError::bad_request(format!("{at} has no 'role'"))),
        };
        let blocks: Vec<Value> = match mf.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(b)) => b.clone(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "{at}.content must be a string or a list of content blocks, got {}",
                    other.unwrap_or(&Value::Null)
                )))
            }
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{j}]");
            let kind = b.get("type").and_then(Value::as_str).unwrap_or_default();
            match (role, kind) {
                (_, "text") => {
                    let (bm, _) = block(b, &bat, TEXT_KEYS)?;
                    text.push_str(&text_of(bm, &bat)?);
                }
                ("assistant", "tool_use") => {
                    let (bm, _) = block(b, &bat, TOOL_USE_KEYS)?;
                    // The client called it (`direct`): the only caller kiln has.
                    match bm.get("caller") {
                        None | Some(Value::Null) => {}
                        Some(c) if c.get("type").and_then(Value::as_str) == Some("direct") => {}
                        Some(c) => {
                            return Err(ApiError::bad_request(format!(
                                "{bat}.caller must be {{\"type\": \"direct\"}}, got {c}"
                            )))
                        }
                    }
                    let id = bm.get("id").and_then(Value::as_str);
                    let name = bm.get("name").and_then(Value::as_str);
                    let (Some(id), Some(name)) = (id, name) else {
                        return Err(ApiError::bad_request(format!(
                            "{bat}: a tool_use block needs a string 'id' and 'name'"
                        )));
                    };
                    let input = match bm.get("input") {
                        Some(v @ Value::Object(_)) => v.clone(),
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "{bat}.input must be an object, got {}",
                                other.unwrap_or(&Value::Null)
                            )))
                        }
                    };
                    call_names.push((id.to_string(), name.to_string()));
                    calls.push(json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": input}}));
                }
                ("assistant", "thinking") => {
                    block(b, &bat, THINKING_KEYS)?;
                }
                ("user", "tool_result") => {
                    let (bm, _) = block(b, &bat, TOOL_RESULT_KEYS)?;
                    let id = bm
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            ApiError::bad_request(format!("{bat}.tool_use_id must be a string"))
                        })?;
                    let name = call_names
                        .iter()
                        .rev()
                        .find(|(c, _)| c == id)
                        .map(|(_, n)| n.clone())
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "{bat}: tool_result answers '{id}', which no tool_use block of \
                                 an earlier assistant turn has"
                            ))
                        })?;
                    let mut msg = ChatMessage::new("tool", tool_result_text(bm, &bat)?);
                    msg.tool_call_id = Some(id.to_string());
                    msg.name = Some(name);
                    out.push(msg);
                }
                ("user", "tool_use" | "thinking") | ("assistant", "tool_result") => {
                    return Err(ApiError::bad_request(format!(
                        "{bat}: a {role} turn cannot hold a '{kind}' block"
                    )))
                }
                (_, "") => return Err(ApiError::bad_request(format!("{bat} has no 'type'"))),
                _ => return Err(unsupported_block(kind, &bat)),
            }
        }
        let last = i + 1 == msgs.len();
        if role == "assistant" && last && calls.is_empty() {
            prefill = Some(text);
            continue;
        }
        if role == "user" && text.is_empty() && blocks.iter().all(|b| b["type"] == "tool_result") {
            // Only tool results: they are the turn.
            continue;
        }
        // An assistant turn of calls only keeps "" as its content, as vLLM
        // renders a null content (templates such as SmolLM2's need a string).
        let mut msg = ChatMessage::new(role, text);
        if !calls.is_empty() {
            msg.tool_calls = Some(calls);
        }
        out.push(msg);
    }
    Ok((out, prefill))
}

/// `tools` and `tool_choice`, read as Anthropic defines them and checked by
/// the chat route's own rules ([`crate::tools::parse`]): each tool becomes
/// a function whose parameters are its `input_schema`; `auto`, `any`,
/// `tool` and `none` become OpenAI's `auto`, `required`, a named function
/// and `none`; `disable_parallel_tool_use` allows one call at most.
pub(crate) fn tools(f: &Fields) -> Result<Option<ToolRequest>, ApiError> {
    let mut functions = Vec::new();
    match f.get("tools") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, t) in list.iter().enumerate() {
                let at = format!("tools[{i}]");
                let m = t
                    .as_object()
                    .ok_or_else(|| ApiError::bad_request(format!("{at} must be an object")))?;
                match m.get("type").and_then(Value::as_str) {
                    None | Some("custom") => {}
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "{at}: '{other}' tools (Anthropic's server tools) are not \
                             supported; give client tools with a name and an input_schema"
                        )))
                    }
                }
                for (k, v) in m {
                    if !v.is_null()
                        && ![
                            "type",
                            "name",
                            "description",
                            "input_schema",
                            "cache_control",
                        ]
                        .contains(&k.as_str())
                    {
                        return Err(ApiError::bad_request(format!("{at}: unknown field '{k}'")));
                    }
                }
                check_cache_control(m.get("cache_control"), &at)?;
                let schema = match m.get("input_schema") {
                    Some(s @ Value::Object(_)) => s.clone(),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "{at}.input_schema must be a JSON schema object, got {}",
                            other.unwrap_or(&Value::Null)
                        )))
                    }
                };
                let mut fun = json!({"name": m.get("name").cloned().unwrap_or(Value::Null),
                    "parameters": schema});
                if let Some(d) = m.get("description") {
                    fun["description"] = d.clone();
                }
                functions.push(json!({"type": "function", "function": fun}));
            }
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'tools' must be a list of tools, got {other}"
            )))
        }
    }
    let mut openai = json!({"tools": functions});
    if let Some(c) = f.get("tool_choice") {
        let cf = Fields::new(c, "tool_choice")?;
        let kind = cf.str("type")?.unwrap_or_default();
        let allowed: &[&str] = match kind {
            "auto" | "any" => &["type", "disable_parallel_tool_use"],
            "tool" => &["type", "name", "disable_parallel_tool_use"],
            "none" => &["type"],
            other => {
                return Err(ApiError::bad_request(format!(
                    "'tool_choice.type' must be auto, any, tool or none, got '{other}'"
                )))
            }
        };
        only_known(&cf, allowed, "tool_choice")?;
        openai["tool_choice"] = match kind {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            _ => {
                let name = cf.str("name")?.ok_or_else(|| {
                    ApiError::bad_request("'tool_choice' of type 'tool' needs a 'name'")
                })?;
                json!({"type": "function", "function": {"name": name}})
            }
        };
        if let Some(d) = cf.bool("disable_parallel_tool_use")? {
            openai["parallel_tool_calls"] = json!(!d);
        }
    }
    crate::tools::parse(&Fields::new(&openai, "")?)
}

/// What `thinking` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Thinking {
    /// Absent or `{"type": "disabled"}`.
    Off,
    /// `{"type": "enabled", "budget_tokens": N}`.
    On,
}

/// Reads `thinking`. Enabled thinking needs `budget_tokens` of at least
/// 1024 and below `max_tokens` (the reference's rules). kiln does not stop
/// the thinking at the budget: `max_tokens` bounds thinking and answer
/// together, and the README says so.
pub(crate) fn thinking(f: &Fields, max_tokens: Option<usize>) -> Result<Thinking, ApiError> {
    let Some(t) = f.get("thinking") else {
        return Ok(Thinking::Off);
    };
    let tf = Fields::new(t, "thinking")?;
    match tf.str("type")? {
        Some("disabled") => {
            only_known(&tf, &["type"], "thinking")?;
            Ok(Thinking::Off)
        }
        Some("enabled") => {
            only_known(&tf, &["type", "budget_tokens"], "thinking")?;
            let budget = tf
                .uint("budget_tokens", funnel::MAX_NEW_TOKENS)?
                .ok_or_else(|| ApiError::bad_request("'thinking.budget_tokens' is required"))?;
            if budget < 1024 {
                return Err(ApiError::bad_request(format!(
                    "'thinking.budget_tokens' must be at least 1024, got {budget}"
                )));
            }
            if let Some(m) = max_tokens {
                if budget as usize >= m {
                    return Err(ApiError::bad_request(format!(
                        "'max_tokens' ({m}) must be greater than 'thinking.budget_tokens' \
                         ({budget})"
                    )));
                }
            }
            Ok(Thinking::On)
        }
        Some("adaptive") => {
            // The model decides whether and how long to think: what a
            // reasoning model does with thinking switched on.
            only_known(&tf, &["type", "display"], "thinking")?;
            match tf.str("display")? {
                None | Some("summarized") => Ok(Thinking::On),
                Some(other) => Err(ApiError::bad_request(format!(
                    "'thinking.display' '{other}' is not supported: kiln returns thinking \
                     as it is ('summarized')"
                ))),
            }
        }
        other => Err(ApiError::bad_request(format!(
            "'thinking.type' must be enabled, adaptive or disabled, got {}",
            other.map_or_else(|| "nothing".to_string(), |s| format!("'{s}'"))
        ))),
    }
}

/// `output_config`: `format` (`{"type": "json_schema", "schema": {...}}`,
/// Anthropic's structured outputs) constrains the answer to the schema, as
/// the chat route's `response_format` does; `effort` is refused (kiln has
/// no effort levels).
pub(crate) fn output_format(f: &Fields) -> Result<Option<kiln_engine::Constraint>, ApiError> {
    let Some(c) = f.get("output_config") else {
        return Ok(None);
    };
    let cf = Fields::new(c, "output_config")?;
    if cf.has("effort") {
        return Err(ApiError::bad_request(
            "'output_config.effort' is not supported: kiln has no effort levels",
        ));
    }
    only_known(&cf, &["format", "effort"], "output_config")?;
    let Some(format) = cf.get("format") else {
        return Ok(None);
    };
    let ff = Fields::new(format, "output_config.format")?;
    only_known(&ff, &["type", "schema"], "output_config.format")?;
    if ff.str("type")? != Some("json_schema") {
        return Err(ApiError::bad_request(
            "'output_config.format.type' must be 'json_schema'",
        ));
    }
    match ff.get("schema") {
        Some(s @ Value::Object(_)) => Ok(Some(kiln_engine::Constraint::JsonSchema(s.clone()))),
        other => Err(ApiError::bad_request(format!(
            "'output_config.format.schema' must be a JSON schema object, got {}",
            other.unwrap_or(&Value::Null)
        ))),
    }
}

/// A `/v1/messages` body, checked.
pub(crate) struct Parsed {
    /// `model` (empty: the only model served).
    pub model: String,
    /// `stream`: answer with server-sent events.
    pub stream: bool,
    /// The checked sampling parameters (no prompt yet).
    pub params: Request,
    /// What `thinking` asks for.
    pub thinking: Thinking,
    /// `tools` and `tool_choice` in the chat route's terms (`None`: no tools).
    pub tools: Option<ToolRequest>,
}

/// Reads a `/v1/messages` body's fields other than the conversation.
pub(crate) fn parse(f: &Fields) -> Result<Parsed, ApiError> {
    only_known(f, TOP_LEVEL, "the request")?;
    if !f.has("max_tokens") {
        return Err(ApiError::bad_request("'max_tokens' is required"));
    }
    match f.get("stop_sequences") {
        None | Some(Value::Array(_)) => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'stop_sequences' must be a list of strings, got {other}"
            )))
        }
    }
    if let Some(m) = f.get("metadata") {
        // Anthropic reads `user_id` to detect abuse; kiln logs it.
        let mf = Fields::new(m, "metadata")?;
        only_known(&mf, &["user_id"], "metadata")?;
        if let Some(user) = mf.str("user_id")? {
            tracing::debug!(user_id = user, "a /v1/messages request");
        }
    }
    check_cache_control(f.get("cache_control"), "the request")?;
    let mut params = funnel::request(Some(f), &ANTHROPIC, 1)?;
    params.constraint = output_format(f)?;
    let thinking = thinking(f, Some(params.stop.max_new_tokens))?;
    Ok(Parsed {
        model: f.str("model")?.unwrap_or_default().to_string(),
        stream: f.bool("stream")?.unwrap_or(false),
        params,
        thinking,
        tools: tools(f)?,
    })
}

// The answer: the engine's output as content blocks.

/// A `msg_` id, as Anthropic's look.
pub(crate) fn message_id() -> String {
    crate::tools::call_id().replacen("call_", "msg_", 1)
}

/// A `toolu_` id for a `tool_use` block.
fn tool_use_id() -> String {
    crate::tools::call_id().replacen("call_", "toolu_", 1)
}

/// One step of a message's content, in the stream's terms.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BlockEvent {
    /// `content_block_start`: the block's index and its empty shape.
    Start(usize, Value),
    /// `content_block_delta`: the index and the delta.
    Delta(usize, Value),
    /// `content_block_stop`.
    Stop(usize),
}

impl BlockEvent {
    /// The event's SSE name and data.
    pub(crate) fn json(&self) -> (&'static str, Value) {
        match self {
            BlockEvent::Start(i, b) => (
                "content_block_start",
                json!({"type": "content_block_start", "index": i, "content_block": b}),
            ),
            BlockEvent::Delta(i, d) => (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i, "delta": d}),
            ),
            BlockEvent::Stop(i) => (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
}

/// Turns an output, pushed whole or token by token, into content blocks:
/// thinking (where the model has a reasoning parser), text, and `tool_use`
/// blocks (where the request's tools are read), each opened, filled and
/// closed in order. The same events make the whole answer ([`assemble`]).
pub(crate) struct Blocks {
    splitter: Option<Splitter>,
    tools: Option<ToolStream>,
    /// At most one call (`disable_parallel_tool_use`): later calls are dropped.
    one_call: bool,
    open: Option<(usize, Open)>,
    /// The `tool_use` block a streamed call (harmony) is writing into;
    /// `Some(None)`: a call being dropped (`one_call`).
    call: Option<Option<usize>>,
    next: usize,
    calls: usize,
}

impl Blocks {
    /// Blocks for an output read with `reasoning` and `tools`.
    pub(crate) fn new(
        reasoning: Option<ReasoningParser>,
        tools: Option<ToolSyntax>,
        one_call: bool,
    ) -> Self {
        Self {
            splitter: reasoning.map(Splitter::new),
            tools: tools.map(ToolStream::new),
            one_call,
            open: None,
            call: None,
            next: 0,
            calls: 0,
        }
    }

    /// `tool_use` blocks given out so far.
    pub(crate) fn calls(&self) -> usize {
        self.calls
    }

    /// The next piece of output.
    pub(crate) fn push(&mut self, text: &str) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        let (reasoning, content) = match &mut self.splitter {
            Some(s) => s.push(text),
            None => (String::new(), text.to_string()),
        };
        self.write(Open::Thinking, &reasoning, &mut out);
        self.content(&content, None, &mut out);
        out
    }

    /// The end of the output: what was held back, and the last block
    /// closed. `cut`: the output was cut short (`max_tokens`, the request
    /// timeout), so text the tool parser still holds is the start of a call
    /// that never finished (or of its marker): it is dropped, never given
    /// out as text.
    pub(crate) fn finish(&mut self, cut: bool) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        let (reasoning, content) = match &mut self.splitter {
            Some(s) => s.finish(),
            None => (String::new(), String::new()),
        };
        self.write(Open::Thinking, &reasoning, &mut out);
        self.content(&content, Some(cut), &mut out);
        self.close(&mut out);
        out
    }

    /// Content text through the tool parser; `end`: the output ends here
    /// (and was cut short, if true).
    fn content(&mut self, text: &str, end: Option<bool>, out: &mut Vec<BlockEvent>) {
        let Some(ts) = &mut self.tools else {
            self.write(Open::Text, text, out);
            return;
        };
        let mut events = ts.push(text);
        match end {
            None => {}
            Some(false) => events.extend(ts.finish()),
            Some(true) => events.extend(
                ts.finish()
                    .into_iter()
                    .filter(|e| matches!(e, ToolEvent::Call(_))),
            ),
        }
        for e in events {
            match e {
                ToolEvent::Content(t) => self.write(Open::Text, &t, out),
                ToolEvent::Call(call) => {
                    if self.one_call && self.calls > 0 {
                        continue;
                    }
                    self.close(out);
                    let i = self.next;
                    self.next += 1;
                    self.calls += 1;
                    out.push(BlockEvent::Start(
                        i,
                        json!({"type": "tool_use", "id": tool_use_id(), "name": call.name,
                            "input": {}}),
                    ));
                    out.push(BlockEvent::Delta(
                        i,
                        json!({"type": "input_json_delta", "partial_json": call.arguments}),
                    ));
                    out.push(BlockEvent::Stop(i));
                }
                ToolEvent::CallStart { name } => {
                    self.close(out);
                    if self.one_call && self.calls > 0 {
                        self.call = Some(None);
                        continue;
                    }
                    let i = self.next;
                    self.next += 1;
                    self.calls += 1;
                    self.call = Some(Some(i));
                    out.push(BlockEvent::Start(
                        i,
                        json!({"type": "tool_use", "id": tool_use_id(), "name": name,
                            "input": {}}),
                    ));
                }
                ToolEvent::CallArguments(a) => {
                    if let Some(Some(i)) = self.call {
                        out.push(BlockEvent::Delta(
                            i,
                            json!({"type": "input_json_delta", "partial_json": a}),
                        ));
                    }
                }
            }
        }
    }

    /// Appends `text` to a block of `kind`, opening one (and closing another)
    /// as needed; nothing for empty text.
    fn write(&mut self, kind: Open, text: &str, out: &mut Vec<BlockEvent>) {
        if text.is_empty() {
            return;
        }
        let i = match self.open {
            Some((i, k)) if k == kind => i,
            _ => {
                self.close(out);
                let i = self.next;
                self.next += 1;
                self.open = Some((i, kind));
                out.push(BlockEvent::Start(
                    i,
                    match kind {
                        Open::Text => json!({"type": "text", "text": ""}),
                        Open::Thinking => json!({"type": "thinking", "thinking": "",
                            "signature": ""}),
                    },
                ));
                i
            }
        };
        out.push(BlockEvent::Delta(
            i,
            match kind {
                Open::Text => json!({"type": "text_delta", "text": text}),
                Open::Thinking => json!({"type": "thinking_delta", "thinking": text}),
            },
        ));
    }

    fn close(&mut self, out: &mut Vec<BlockEvent>) {
        if let Some((i, _)) = self.open.take() {
            out.push(BlockEvent::Stop(i));
        }
        if let Some(Some(i)) = self.call.take() {
            out.push(BlockEvent::Stop(i));
        }
    }
}

/// The content blocks that `events` build (a whole answer's `content`).
pub(crate) fn assemble(events: &[BlockEvent]) -> Vec<Value> {
    let mut blocks: Vec<Value> = Vec::new();
    let mut partial: Vec<String> = Vec::new();
    for e in events {
        match e {
            BlockEvent::Start(_, b) => {
                blocks.push(b.clone());
                partial.push(String::new());
            }
            BlockEvent::Delta(i, d) => {
                let (Some(b), Some(p)) = (blocks.get_mut(*i), partial.get_mut(*i)) else {
                    continue;
                };
                let piece = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                match d["type"].as_str() {
                    Some("text_delta") => append(&mut b["text"], &piece("text")),
                    Some("thinking_delta") => append(&mut b["thinking"], &piece("thinking")),
                    Some("input_json_delta") => p.push_str(&piece("partial_json")),
                    _ => {}
                }
            }
            BlockEvent::Stop(i) => {
                if let (Some(b), Some(p)) = (blocks.get_mut(*i), partial.get(*i)) {
                    if b["type"] == "tool_use" && !p.is_empty() {
                        b["input"] =
                            serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.clone()));
                    }
                }
            }
        }
    }
    blocks
}

fn append(v: &mut Value, s: &str) {
    let mut t = v.as_str().unwrap_or_default().to_string();
    t.push_str(s);
    *v = Value::String(t);
}

/// `stop_reason` and `stop_sequence` for a finished output: `max_tokens`
/// when cut at the limit (or at the server's request timeout), even after
/// complete calls (as Anthropic's API: the turn may have been cut in a
/// call), `tool_use` when it made calls, `stop_sequence` with the sequence
/// that matched (`matched`), else `end_turn`.
pub(crate) fn stop_reason(
    reason: FinishReason,
    calls: usize,
    matched: Option<String>,
) -> (&'static str, Value) {
    match reason {
        FinishReason::Length | FinishReason::Deadline => ("max_tokens", Value::Null),
        _ if calls > 0 => ("tool_use", Value::Null),
        FinishReason::StopSequence => ("stop_sequence", matched.map_or(Value::Null, Value::String)),
        _ => ("end_turn", Value::Null),
    }
}

/// Which of `stops` ended an output: the engine cuts the text where the
/// first complete stop sequence begins, so the tokens' full text (`raw`)
/// continues the output's `text` with it; the one that completes first
/// (the shortest there) matched.
pub(crate) fn matched_stop(stops: &[String], text: &str, raw: &str) -> Option<String> {
    let rest = raw.strip_prefix(text).unwrap_or_default();
    let at_cut = stops
        .iter()
        .filter(|s| !s.is_empty() && rest.starts_with(s.as_str()))
        .min_by_key(|s| s.len());
    if let Some(s) = at_cut {
        return Some(s.clone());
    }
    // A tokenizer whose whole decode differs from the streamed text: the
    // first stop sequence the tail holds, or the only one given.
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| rest.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, s)| (*at, s.len()))
        .map(|(_, s)| s.clone())
        .or_else(|| (stops.len() == 1).then(|| stops[0].clone()))
}

/// Anthropic's `usage`: `input_tokens` counts the prompt tokens not read
/// from the cache, `cache_read_input_tokens` those that were (kiln's prefix
/// cache; never more than the prompt), so that their sum is the prompt, as
/// in Anthropic's accounting. kiln writes no cache entries on request, so
/// `cache_creation_input_tokens` is 0.
pub(crate) fn usage_json(prompt: usize, cached: usize, output: usize) -> Value {
    let cached = cached.min(prompt);
    json!({"input_tokens": prompt - cached, "output_tokens": output,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ToolChoice;
    use axum::http::StatusCode;

    fn read(v: Value) -> Result<Parsed, String> {
        let f = Fields::new(&v, "").map_err(|e| e.message)?;
        parse(&f).map_err(|e| e.message)
    }

    fn conv(v: Value) -> Result<(Vec<ChatMessage>, Option<String>), String> {
        let f = Fields::new(&v, "").map_err(|e| e.message)?;
        conversation(&f).map_err(|e| e.message)
    }

    fn hi() -> Value {
        json!([{"role": "user", "content": "Hi"}])
    }

    #[test]
    fn fields_are_honoured_or_refused_by_name() {
        let p = read(json!({"model": "m", "messages": hi(), "max_tokens": 7,
            "stop_sequences": ["a", "b"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "metadata": {"user_id": "u"}, "stream": true}))
        .unwrap();
        assert_eq!(p.params.stop.max_new_tokens, 7);
        assert_eq!(p.params.stop.stop_strings, ["a", "b"]);
        assert_eq!(p.params.sampling.temperature, 0.5);
        assert_eq!(p.params.sampling.top_k, 5);
        assert!((p.params.sampling.top_p - 0.9).abs() < 1e-6);
        assert!(p.stream && p.model == "m" && p.thinking == Thinking::Off);
        let p = read(json!({"messages": hi(), "max_tokens": 1})).unwrap();
        assert_eq!(p.params.sampling.temperature, 1.0, "Anthropic's default");
        for (body, needle) in [
            (json!({"messages": hi()}), "'max_tokens' is required"),
            (
                json!({"messages": hi(), "max_tokens": 0}),
                "'max_tokens' must be at least 1",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "n": 2}),
                "unknown field 'n'",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "seed": 2}),
                "unknown field 'seed'",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "service_tier": "auto"}),
                "'service_tier' is not supported",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "temperature": 1.5}),
                "'temperature' must be a number from 0 to 1",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "stop_sequences": "x"}),
                "must be a list of strings",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "metadata": {"x": 1}}),
                "unknown field 'metadata.x'",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "thinking": {"type": "enabled"}}),
                "budget_tokens' is required",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5000, "thinking": {"type": "enabled", "budget_tokens": 100}}),
                "at least 1024",
            ),
            (
                json!({"messages": hi(), "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}}),
                "must be greater than",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "tool_choice": {"type": "any"}}),
                "needs 'tools'",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "tool_choice": {"type": "maybe"}}),
                "auto, any, tool or none",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "tools": [{"name": "a"}]}),
                "input_schema",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "w"}]}),
                "server tools",
            ),
        ] {
            let e = read(body.clone())
                .err()
                .unwrap_or_else(|| panic!("took {body}"));
            assert!(e.contains(needle), "{body}: {e}");
        }
        let p = read(json!({"messages": hi(), "max_tokens": 4000,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}))
        .unwrap();
        assert_eq!(p.thinking, Thinking::On);
        let p = read(
            json!({"messages": hi(), "max_tokens": 40, "thinking": {"type": "adaptive"},
            "cache_control": {"type": "ephemeral"}}),
        )
        .unwrap();
        assert_eq!(p.thinking, Thinking::On);
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let p = read(json!({"messages": hi(), "max_tokens": 40,
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}))
        .unwrap();
        assert_eq!(
            p.params.constraint,
            Some(kiln_engine::Constraint::JsonSchema(schema))
        );
        for (body, needle) in [
            (
                json!({"messages": hi(), "max_tokens": 5, "output_config": {"effort": "high"}}),
                "effort",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "output_config": {"format": {"type": "text"}}}),
                "json_schema",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "thinking": {"type": "between_tools"}}),
                "'between_tools'",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "speed": "fast"}),
                "'speed' is not supported",
            ),
            (
                json!({"messages": hi(), "max_tokens": 5, "cache_control": {"type": "forever"}}),
                "ephemeral",
            ),
        ] {
            let e = read(body.clone())
                .err()
                .unwrap_or_else(|| panic!("took {body}"));
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn tool_choices_map_to_the_chat_routes_choices() {
        let tools = json!([{"name": "get_weather", "description": "d",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
        let choice = |c: Value| {
            let p = read(json!({"messages": hi(), "max_tokens": 5, "tools": tools,
                "tool_choice": c}))
            .unwrap();
            let t = p.tools.unwrap();
            (t.choice, t.parallel)
        };
        assert_eq!(choice(json!({"type": "auto"})), (ToolChoice::Auto, true));
        assert_eq!(
            choice(json!({"type": "any", "disable_parallel_tool_use": true})),
            (ToolChoice::Required, false)
        );
        assert_eq!(
            choice(json!({"type": "tool", "name": "get_weather"})),
            (ToolChoice::Named("get_weather".into()), true)
        );
        assert_eq!(choice(json!({"type": "none"})), (ToolChoice::None, true));
        let t = read(json!({"messages": hi(), "max_tokens": 5, "tools": tools}))
            .unwrap()
            .tools
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Auto, "Anthropic's default with tools");
        assert_eq!(t.tools[0]["function"]["parameters"]["type"], "object");
        assert_eq!(t.tools[0]["function"]["description"], "d");
        let e = read(json!({"messages": hi(), "max_tokens": 5, "tools": tools,
            "tool_choice": {"type": "tool", "name": "other"}}))
        .err()
        .unwrap();
        assert!(e.contains("'other'"), "{e}");
    }

    #[test]
    fn conversations_become_template_messages() {
        let (m, prefill) = conv(json!({"system": [{"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Let me look.", "citations": null},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"},
                    "caller": {"type": "direct"}, "toolset_name": null}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "sunny"}]}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": "rain", "is_error": true}, {"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": "It is"}]}))
        .unwrap();
        assert_eq!(prefill.as_deref(), Some("It is"));
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "tool", "tool", "user"]
        );
        assert_eq!(m[0].content.as_deref(), Some("Be brief.\nBe kind."));
        assert_eq!(m[2].content.as_deref(), Some("Let me look."));
        let calls = m[2].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"]["city"], "Paris");
        assert_eq!(calls[0]["id"], "toolu_1");
        assert_eq!(m[3].content.as_deref(), Some("sunny"));
        assert_eq!(m[3].name.as_deref(), Some("get_weather"));
        assert_eq!(m[4].content.as_deref(), Some("Error: rain"));
        assert_eq!(m[5].content.as_deref(), Some("And?"));
        for (messages, needle) in [
            (
                json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
                "'image' content blocks are not supported",
            ),
            (
                json!([{"role": "user", "content": [{"type": "document"}]}]),
                "'document'",
            ),
            (
                json!([{"role": "system", "content": "x"}]),
                "top-level 'system'",
            ),
            (
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}]),
                "'nope'",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": "a", "extra": 1}]}]),
                "unknown field 'extra'",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": "a", "citations": []}]}]),
                "citations",
            ),
            (
                json!([{"role": "user", "content": "a", "name": "x"}]),
                "unknown field",
            ),
            (json!([{"role": "user", "content": 3}]), "string or a list"),
            (json!([]), "non-empty"),
        ] {
            let e = conv(json!({"messages": messages}))
                .err()
                .unwrap_or_else(|| panic!("{messages}"));
            assert!(e.contains(needle), "{messages}: {e}");
        }
    }

    /// Pushes `text` in pieces of `step` characters; returns the events.
    fn run(b: &mut Blocks, text: &str, step: usize) -> Vec<BlockEvent> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for piece in chars.chunks(step) {
            out.extend(b.push(&piece.iter().collect::<String>()));
        }
        out.extend(b.finish(false));
        out
    }

    #[test]
    fn blocks_are_the_same_however_the_output_is_cut() {
        let text = "<think>Paris is in France.</think>Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        for step in [1, 2, 5, 1000] {
            let mut b = Blocks::new(
                Some(ReasoningParser::Qwen3),
                Some(ToolSyntax::Hermes),
                false,
            );
            let events = run(&mut b, text, step);
            assert_eq!(b.calls(), 1);
            // Every block starts, gets deltas, stops, in index order.
            let mut open = None;
            let mut seen = 0;
            for e in &events {
                match e {
                    BlockEvent::Start(i, _) => {
                        assert_eq!((open, *i), (None, seen), "step {step}: {events:?}");
                        open = Some(*i);
                        seen += 1;
                    }
                    BlockEvent::Delta(i, _) => assert_eq!(open, Some(*i)),
                    BlockEvent::Stop(i) => {
                        assert_eq!(open, Some(*i));
                        open = None;
                    }
                }
            }
            assert_eq!(open, None);
            let blocks = assemble(&events);
            assert_eq!(blocks.len(), 3, "step {step}: {blocks:?}");
            assert_eq!(
                blocks[0],
                json!({"type": "thinking", "thinking": "Paris is in France.", "signature": ""})
            );
            assert_eq!(blocks[1], json!({"type": "text", "text": "Let me check."}));
            assert_eq!(blocks[2]["type"], "tool_use");
            assert_eq!(blocks[2]["name"], "get_weather");
            assert_eq!(blocks[2]["input"], json!({"city": "Paris"}));
            assert!(blocks[2]["id"].as_str().unwrap().starts_with("toolu_"));
        }
    }

    #[test]
    fn one_call_only_when_parallel_use_is_disabled() {
        let call = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n";
        let text = format!("{call}{call}");
        let mut b = Blocks::new(None, Some(ToolSyntax::Hermes), true);
        let blocks = assemble(&run(&mut b, &text, 3));
        let uses = blocks.iter().filter(|b| b["type"] == "tool_use").count();
        assert_eq!((uses, b.calls()), (1, 1), "{blocks:?}");
        let mut b = Blocks::new(None, Some(ToolSyntax::Hermes), false);
        run(&mut b, &text, 3);
        assert_eq!(b.calls(), 2);
    }

    #[test]
    fn a_call_cut_short_is_never_text() {
        let call = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n";
        let half = "<tool_call>\n{\"name\": \"b\", \"argu";
        for step in [1, 4, 100] {
            let mut b = Blocks::new(None, Some(ToolSyntax::Hermes), false);
            let chars: Vec<char> = format!("Sure. {call}{half}").chars().collect();
            let mut events = Vec::new();
            for piece in chars.chunks(step) {
                events.extend(b.push(&piece.iter().collect::<String>()));
            }
            events.extend(b.finish(true));
            let blocks = assemble(&events);
            assert_eq!(blocks.len(), 2, "step {step}: {blocks:?}");
            assert_eq!(blocks[0], json!({"type": "text", "text": "Sure. "}));
            assert_eq!(blocks[1]["name"], "a");
            // Not cut (the model ended there): the unparsed text stays text.
            let mut b = Blocks::new(None, Some(ToolSyntax::Hermes), false);
            let mut events = b.push(half);
            events.extend(b.finish(false));
            assert_eq!(assemble(&events), [json!({"type": "text", "text": half})]);
        }
        assert_eq!(stop_reason(FinishReason::Length, 1, None).0, "max_tokens");
        assert_eq!(stop_reason(FinishReason::Deadline, 0, None).0, "max_tokens");
    }

    #[test]
    fn plain_text_is_one_text_block() {
        let mut b = Blocks::new(None, None, false);
        let events = run(&mut b, "Hello there", 1);
        assert_eq!(
            events.first(),
            Some(&BlockEvent::Start(0, json!({"type": "text", "text": ""})))
        );
        assert_eq!(events.last(), Some(&BlockEvent::Stop(0)));
        assert_eq!(
            assemble(&events),
            [json!({"type": "text", "text": "Hello there"})]
        );
        let mut b = Blocks::new(None, None, false);
        assert!(run(&mut b, "", 1).is_empty(), "no output, no block");
    }

    #[test]
    fn stop_reasons_and_the_matched_sequence() {
        let stops = vec!["END".to_string(), "EN".to_string(), "xyz".to_string()];
        assert_eq!(matched_stop(&stops, "abc ", "abc END"), Some("EN".into()));
        assert_eq!(matched_stop(&stops, "abc", "abcxyz!"), Some("xyz".into()));
        assert_eq!(
            matched_stop(&["only".into()], "a", "b"),
            Some("only".into())
        );
        assert_eq!(matched_stop(&stops, "a", "b"), None);
        assert_eq!(
            stop_reason(FinishReason::StopSequence, 0, Some("EN".into())),
            ("stop_sequence", json!("EN"))
        );
        assert_eq!(stop_reason(FinishReason::Length, 0, None).0, "max_tokens");
        assert_eq!(stop_reason(FinishReason::EosToken, 0, None).0, "end_turn");
        assert_eq!(stop_reason(FinishReason::EosToken, 2, None).0, "tool_use");
    }

    #[test]
    fn usage_splits_the_prompt_into_cached_and_not() {
        assert_eq!(
            usage_json(37, 48, 5),
            json!({"input_tokens": 0, "output_tokens": 5,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 37})
        );
        assert_eq!(usage_json(37, 16, 5)["input_tokens"], 21);
    }

    #[test]
    fn errors_have_anthropics_shape_and_types() {
        let e = ApiError::bad_request("bad").anthropic();
        assert_eq!(
            e.body(),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})
        );
        for (status, kind) in [
            (401, "authentication_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (503, "overloaded_error"),
            (424, "api_error"),
            (408, "timeout_error"),
            (422, "invalid_request_error"),
            (500, "api_error"),
        ] {
            let s = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                crate::error::anthropic_body(s, "m")["error"]["type"],
                kind,
                "{status}"
            );
        }
    }
}

#[cfg(test)]
mod fuzz {
    use kiln_model::fuzz::{cases, random_json, run_with};

    use super::*;

    const KEYS: &[&str] = &[
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "user_id",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "budget_tokens",
        "role",
        "content",
        "type",
        "text",
        "id",
        "name",
        "input",
        "input_schema",
        "tool_use_id",
        "is_error",
        "cache_control",
        "disable_parallel_tool_use",
        "output_config",
        "format",
        "schema",
        "caller",
        "display",
    ];

    /// Every Anthropic body is read to an answer, never a panic.
    #[test]
    fn anthropic_bodies_never_panic() {
        let report = run_with(
            "anthropic bodies",
            cases(3000),
            |rng, _| random_json(rng, KEYS, 4).to_string().into_bytes(),
            |body| {
                let Ok(v) = crate::body::json(Ok(axum::body::Bytes::copy_from_slice(body))) else {
                    return false;
                };
                let Ok(f) = Fields::new(&v, "") else {
                    return false;
                };
                parse(&f).is_ok() & conversation(&f).is_ok()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, cases(3000));
    }
}
