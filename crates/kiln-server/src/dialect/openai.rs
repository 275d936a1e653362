//! The OpenAI dialect: the bodies of `/v1/completions` and
//! `/v1/chat/completions` (and of the same requests on DJL's LMI routes)
//! read into the request funnel ([`crate::funnel`]), and the engine's events
//! written back as OpenAI's answers and chunks. The routes are
//! [`crate::openai`]'s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;
use kiln_engine::{Engine, Event, FinishReason, Request, TokenOutput, Usage};
use kiln_model::chat::ChatMessage;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::access::AccessRecord;
use crate::error::ApiError;
use crate::funnel::{self, Dialect};
use crate::generation;
use crate::params::Fields;
use crate::prompts::{self, Prompt, PromptInput};

/// What OpenAI's API calls the sampling parameters, and where it differs
/// from DJL's: `max_completion_tokens` (or the older `max_tokens`), `stop`,
/// sampling at temperature 1 unless told otherwise, and temperature "between
/// 0 and 2" (the API reference's bound). `logprobs` depends on the endpoint
/// and is read by [`crate::openai`].
pub const OPENAI: Dialect = Dialect {
    name: "openai",
    max_tokens_keys: &["max_completion_tokens", "max_tokens"],
    max_temperature: 2.0,
    sample_flag: None,
    stop_keys: &["stop"],
    top_logprobs_key: None,
};

/// Most choices (`n`) per request.
const MAX_N: u64 = 16;

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

/// What both endpoints parse from the body before the prompt.
pub(crate) struct Common {
    pub model: String,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The client gave `max_tokens` (or `max_completion_tokens`).
    pub explicit_max_tokens: bool,
    /// The checked sampling parameters (no prompt yet).
    pub params: Request,
}

pub(crate) fn common(f: &Fields, default_max_tokens: usize) -> Result<Common, ApiError> {
    // Empty when absent: `run` then picks the only model served.
    let model = f.str("model")?.unwrap_or_default().to_string();
    let n = f.uint("n", MAX_N)?.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::bad_request("'n' must be at least 1"));
    }
    openai_only_fields(f)?;
    // `best_of` (completions): kiln returns every choice it generates, so
    // only `best_of` equal to `n` (or null) is what it does.
    match f.get("best_of") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(n as u64) => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "'best_of' ({v}) is not supported: kiln does not generate candidates to \
                 pick the best of; leave it out or set it equal to 'n' ({n})"
            )))
        }
    }
    let params = funnel::request(Some(f), &OPENAI, default_max_tokens)?;
    let stream_options = f
        .get("stream_options")
        .map(|v| Fields::new(v, "stream_options"))
        .transpose()?;
    let include_usage = stream_options
        .map(|o| o.bool("include_usage"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    Ok(Common {
        model,
        n,
        stream: f.bool("stream")?.unwrap_or(false),
        include_usage,
        explicit_max_tokens: OPENAI.max_tokens_keys.iter().any(|k| f.has(k)),
        params,
    })
}

/// Fields of OpenAI's request types that only make sense on OpenAI's own
/// service (audio output, stored completions, hosted tools, its tiers):
/// taken where the value asks for what kiln does anyway (text output, no
/// storing, the default tier, in-memory prompt caching, which kiln does on
/// its own and reports in `cached_tokens`), refused with a 400 naming the
/// field otherwise, never silently ignored. `user`, `safety_identifier`
/// and `prompt_cache_key` only identify the caller, which changes no
/// answer: they are checked to be strings.
fn openai_only_fields(f: &Fields) -> Result<(), ApiError> {
    let refuse = |key: &str, v: &Value, why: &str| {
        Err(ApiError::bad_request(format!(
            "'{key}' ({v}) is not supported: {why}"
        )))
    };
    for key in ["user", "safety_identifier", "prompt_cache_key"] {
        f.str(key)?;
    }
    for (key, v) in f.keys().filter_map(|k| f.get(k).map(|v| (k.as_str(), v))) {
        if v.is_null() {
            continue;
        }
        let why = match key {
            "modalities" if v.as_array().is_none_or(|m| m.iter().any(|x| x != "text")) => {
                "kiln answers with text only (\"modalities\": [\"text\"])"
            }
            "audio" => "kiln has no audio output",
            "store" if v != &Value::Bool(false) => "kiln does not store completions",
            "metadata" if v.as_object().is_none_or(|m| !m.is_empty()) => {
                "it tags stored completions, and kiln stores none"
            }
            "service_tier" if !matches!(v.as_str(), Some("auto" | "default")) => {
                "kiln has one tier ('auto' or 'default')"
            }
            "prompt_cache_retention" if v.as_str() != Some("in_memory") => {
                "kiln keeps its prefix cache in memory only ('in_memory')"
            }
            "prompt_cache_options" => "kiln's prefix cache has no options; leave it out",
            "prediction" => "predicted outputs are not implemented",
            "web_search_options" => "kiln has no web search",
            "moderation" => "kiln runs no moderation",
            "verbosity" => "kiln cannot steer an answer's length this way; use max_tokens",
            _ => continue,
        };
        return refuse(key, v, why);
    }
    Ok(())
}

/// Most choices one completions request may ask for (prompts times `n`).
const MAX_CHOICES: usize = 256;

/// What `/v1/completions` reads besides the common fields: the prompts'
/// shape, `echo`, and the fields kiln refuses rather than ignores.
pub(crate) fn completion_options(f: &Fields, n: usize) -> Result<(PromptInput, bool), ApiError> {
    match f.get("suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(
                "'suffix' (insertion between a prompt and a suffix) is not supported",
            ))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'suffix' must be a string, got {other}"
            )))
        }
    }
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && f.has("logprobs") && f.bool("stream")?.unwrap_or(false) {
        return Err(ApiError::bad_request(
            "'echo' with 'logprobs' is answered whole, not streamed; leave out 'stream'",
        ));
    }
    let input = prompts::parse(f.get("prompt"))?;
    if input.len() * n > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "{} prompts with n={n} make {} choices; at most {MAX_CHOICES} are taken in one request",
            input.len(),
            input.len() * n
        )));
    }
    Ok((input, echo))
}

/// The messages of a chat request, checked (also read by `/tokenize`).
pub(crate) fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = match f.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::bad_request("'messages' must be a non-empty list")),
        None => return Err(ApiError::bad_request("'messages' is required")),
    };
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let mf = Fields::new(m, "messages[]")?;
        let role = mf
            .str("role")?
            .ok_or_else(|| ApiError::bad_request(format!("messages[{i}] has no 'role'")))?;
        let content = match mf.get("content") {
            // vLLM renders a null content (an assistant turn that only
            // calls tools) as "" (Qwen3's template needs a string).
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}]: only text content parts are supported"
                            )))
                        }
                    }
                }
                text
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content must be a string or a list of text parts, got {other}"
                )))
            }
        };
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = crate::tools::message_tool_calls(i, &mf)?;
        msg.tool_call_id = mf.str("tool_call_id")?.map(str::to_string);
        msg.name = mf.str("name")?.map(str::to_string);
        // The reasoning an answer came with, sent back on a later turn
        // (gpt-oss's template replays it before a tool call, as llama.cpp
        // hands it over).
        if role == "assistant" {
            msg.thinking = match mf.str("reasoning_content")? {
                Some(r) => Some(r.to_string()),
                None => mf.str("reasoning")?.map(str::to_string),
            };
        }
        messages.push(msg);
    }
    Ok(messages)
}

// The answers: the engine's events written back as OpenAI's JSON, whole
// or streamed as chunks.

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::EosToken | FinishReason::StopSequence | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::Deadline => "length",
        FinishReason::Error => "error",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens.min(u.prompt_tokens)}})
}

/// The model's text for one token id (for log-probability listings).
fn token_text(engine: &Engine, id: u32) -> String {
    engine.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// How a streamed OpenAI answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Server-sent events, `data: {chunk}` each, ending with `data: [DONE]`
    /// (`text/event-stream`): the OpenAI API's framing, on `/v1/...`.
    Sse,
    /// One bare chunk object per line, no `[DONE]`
    /// (`application/jsonlines`): DJL's LMI routes. Its vLLM handler strips
    /// vLLM's `data: ` prefix from every chunk and ends the stream at
    /// `[DONE]` without writing it (`djl_python/lmi_vllm/
    /// request_response_utils.py` `vllm_stream_output_formatter`; each
    /// chunk is sent by `async_utils.py` `create_stream_chunk_output` as
    /// `application/jsonlines`), as its chat schema documents
    /// (`serving/docs/lmi/user_guides/chat_input_output_schema.md`: "The
    /// response is returned token by token as application/jsonlines").
    JsonLines,
}

impl Framing {
    fn frame(self, v: &Value) -> Bytes {
        match self {
            Framing::Sse => Bytes::from(format!("data: {v}\n\n")),
            Framing::JsonLines => Bytes::from(format!("{v}\n")),
        }
    }

    /// Several chunks as one piece of the stream.
    fn frame_all(self, chunks: &[Value]) -> Bytes {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&self.frame(c));
        }
        Bytes::from(out)
    }

    /// What ends the stream.
    fn done(self) -> &'static [u8] {
        match self {
            Framing::Sse => b"data: [DONE]\n\n",
            Framing::JsonLines => b"",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Framing::Sse => "text/event-stream",
            Framing::JsonLines => "application/jsonlines",
        }
    }
}

/// A non-streamed answer: choice `i` answers prompt `i / n`.
pub(crate) fn answer_json(
    ctx: &Ctx,
    done: &[generation::Completion],
    prompts: &[Prompt],
    n: usize,
    echo: bool,
    usage: &Usage,
) -> Value {
    let echo_logprobs = echo && ctx.logprobs;
    let api = ctx.api;
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let text = if echo {
                format!("{}{}", prompts[i / n].text, d.text)
            } else {
                d.text.clone()
            };
            let lp = if echo_logprobs {
                Some(ctx.completion_logprobs(&prompts[i / n].ids, &d.tokens))
            } else {
                ctx.logprobs.then(|| ctx.logprobs_json(&d.tokens))
            };
            match api {
                Api::Completions => json!({"index": i, "text": text, "logprobs": lp,
                    "finish_reason": finish_reason(d.reason)}),
                Api::Chat => {
                    let mut message = json!({"role": "assistant", "content": text});
                    if let Some(parser) = ctx.reasoning {
                        let (reasoning, content) = parser.split(&text);
                        message["content"] = json!(content);
                        message["reasoning_content"] = json!(reasoning);
                    }
                    let mut reason = finish_reason(d.reason);
                    if let (Some(syntax), Some(content)) = (ctx.tools, message["content"].as_str())
                    {
                        // Cut short: an unfinished call is never content.
                        let cut = matches!(d.reason, FinishReason::Length | FinishReason::Deadline);
                        let (content, calls) =
                            crate::tool_parse::parse_output(syntax, content, cut);
                        if cut {
                            message["content"] = json!(content);
                        }
                        if !calls.is_empty() {
                            message["content"] = json!(content);
                            message["tool_calls"] = Value::Array(
                                calls
                                    .iter()
                                    .map(|c| {
                                        json!({"id": crate::tools::call_id(), "type": "function",
                                        "function": {"name": c.name, "arguments": c.arguments}})
                                    })
                                    .collect(),
                            );
                            if reason == "stop" {
                                reason = "tool_calls";
                            }
                        }
                    }
                    json!({"index": i, "message": message,
                    "logprobs": lp, "finish_reason": reason})
                }
            }
        })
        .collect();
    let object = if api == Api::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    json!({"id": ctx.id, "object": object, "created": ctx.created, "model": ctx.model,
    "choices": choices, "usage": usage_json(usage)})
}

/// Response-wide facts.
pub(crate) struct Ctx {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) api: Api,
    pub(crate) engine: Engine,
    pub(crate) logprobs: bool,
    /// `option.reasoning_parser` of the model, on chat requests.
    pub(crate) reasoning: Option<crate::reasoning::ReasoningParser>,
    /// The tool-call syntax to read from the output, when the request has
    /// tools and a choice other than `none`.
    pub(crate) tools: Option<crate::tool_parse::ToolSyntax>,
    /// How a streamed answer is written.
    pub(crate) framing: Framing,
}

impl Ctx {
    fn logprobs_json(&self, tokens: &[TokenOutput]) -> Value {
        match self.api {
            Api::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let text = token_text(&self.engine, t.id);
                        let top: Vec<Value> = t
                            .top_logprobs
                            .iter()
                            .map(|&(id, lp)| {
                                let s = token_text(&self.engine, id);
                                json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                            })
                            .collect();
                        json!({"token": text, "logprob": t.logprob, "bytes": text.as_bytes(), "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content})
            }
            Api::Completions => self.completion_logprobs(&[], tokens),
        }
    }

    /// A completion's `logprobs` in OpenAI's legacy shape: the `prompt`
    /// tokens (with `echo`; none otherwise), then the generated ones. The
    /// first prompt token has nothing before it: its log-probability and
    /// alternatives are null.
    fn completion_logprobs(&self, prompt: &[u32], tokens: &[TokenOutput]) -> Value {
        let first = tokens.first();
        let prompt_lps = first.and_then(|t| t.prompt_logprobs.as_deref());
        let prompt_tops = first.and_then(|t| t.prompt_top_logprobs.as_deref());
        let top_map = |top: &[(u32, f32)]| -> Value {
            Value::Object(
                top.iter()
                    .map(|&(id, lp)| (token_text(&self.engine, id), json!(lp)))
                    .collect(),
            )
        };
        let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        for (k, &id) in prompt.iter().enumerate() {
            let s = token_text(&self.engine, id);
            offsets.push(offset);
            offset += s.len();
            texts.push(s);
            if k == 0 {
                lps.push(Value::Null);
                tops.push(Value::Null);
            } else {
                let lp = prompt_lps.and_then(|v| v.get(k - 1)).copied();
                lps.push(lp.map_or(Value::Null, |v| json!(v)));
                let top = prompt_tops.and_then(|v| v.get(k - 1));
                tops.push(top.map_or_else(|| json!({}), |t| top_map(t)));
            }
        }
        for t in tokens {
            let s = token_text(&self.engine, t.id);
            offsets.push(offset);
            offset += s.len();
            texts.push(s);
            lps.push(json!(t.logprob));
            tops.push(top_map(&t.top_logprobs));
        }
        json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = if self.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }

    /// A chunk for one streamed token (or the final chunk with `finish`).
    fn token_chunk(
        &self,
        index: usize,
        text: &str,
        token: Option<&TokenOutput>,
        finish: Option<FinishReason>,
    ) -> Value {
        let lp = match (self.logprobs, token) {
            (true, Some(t)) => self.logprobs_json(std::slice::from_ref(t)),
            _ => Value::Null,
        };
        let fr = finish
            .map(|r| Value::String(finish_reason(r).into()))
            .unwrap_or(Value::Null);
        let choice = match self.api {
            Api::Completions => {
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": fr})
            }
            Api::Chat => {
                json!({"index": index, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
                "logprobs": lp, "finish_reason": fr})
            }
        };
        self.chunk(json!([choice]))
    }
}

/// Streams `n` choices (as `ctx.framing` says), interleaved as tokens arrive.
pub(crate) fn stream(
    ctx: Ctx,
    streams: Vec<kiln_engine::RequestStream>,
    include_usage: bool,
    echoes: Option<Vec<String>>,
    prompt_tokens: usize,
    rec: Arc<AccessRecord>,
) -> Response {
    let n = streams.len();
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Event)>();
    for (i, mut s) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = s.next().await {
                if tx.send((i, ev)).is_err() {
                    // The client is gone: dropping `s` cancels the request.
                    return;
                }
            }
        });
    }
    drop(tx);
    let ctx = Arc::new(ctx);
    let framing = ctx.framing;
    let mut head = Vec::new();
    for i in 0..n {
        if ctx.api == Api::Chat {
            head.push(ctx.framing.frame(&ctx.chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
            )));
        } else if let Some(p) = echoes.as_ref().and_then(|e| e.get(i)) {
            head.push(ctx.framing.frame(&ctx.token_chunk(i, p, None, None)));
        }
    }
    struct S {
        rx: mpsc::UnboundedReceiver<(usize, Event)>,
        ctx: Arc<Ctx>,
        usage: Usage,
        open: usize,
        include_usage: bool,
        rec: Arc<AccessRecord>,
        finished: bool,
        splitters: Vec<Option<crate::reasoning::Splitter>>,
        tool_streams: Vec<Option<crate::tools::ToolDeltas>>,
    }
    let splitters = (0..n)
        .map(|_| ctx.reasoning.map(crate::reasoning::Splitter::new))
        .collect();
    let tool_streams = (0..n)
        .map(|_| ctx.tools.map(crate::tools::ToolDeltas::new))
        .collect();
    let state = S {
        rx,
        splitters,
        tool_streams,
        ctx,
        usage: Usage {
            prompt_tokens,
            ..Usage::default()
        },
        open: n,
        include_usage,
        rec,
        finished: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let bytes = match s.rx.recv().await {
            Some((i, Event::Token(t))) => {
                let mut chunk = s.ctx.token_chunk(i, &t.text, Some(&t), None);
                if let Some(Some(sp)) = s.splitters.get_mut(i) {
                    crate::reasoning::rewrite_delta(&mut chunk, sp, false);
                }
                match s.tool_streams.get_mut(i) {
                    Some(Some(ts)) => s.ctx.framing.frame_all(&ts.rewrite(chunk, false)),
                    _ => s.ctx.framing.frame(&chunk),
                }
            }
            Some((
                i,
                Event::Finished {
                    reason,
                    usage,
                    error,
                },
            )) => {
                s.open -= 1;
                s.usage.completion_tokens += usage.completion_tokens;
                // The best choice's cache hit (never more than the prompt).
                s.usage.cached_tokens = s
                    .usage
                    .cached_tokens
                    .max(usage.cached_tokens)
                    .min(s.usage.prompt_tokens);
                s.rec.add_tokens_out(usage.completion_tokens);
                let mut out = if reason == FinishReason::Error {
                    let e = ApiError::model_failure(
                        error.unwrap_or_else(|| "generation failed".into()),
                    )
                    .openai();
                    s.ctx.framing.frame(&e.body())
                } else {
                    let mut chunk = s.ctx.token_chunk(i, "", None, Some(reason));
                    if let Some(Some(sp)) = s.splitters.get_mut(i) {
                        crate::reasoning::rewrite_delta(&mut chunk, sp, true);
                    }
                    match s.tool_streams.get_mut(i) {
                        Some(Some(ts)) => s.ctx.framing.frame_all(&ts.rewrite(chunk, true)),
                        _ => s.ctx.framing.frame(&chunk),
                    }
                };
                if s.open == 0 {
                    let mut tail = Vec::from(out.as_ref());
                    if s.include_usage {
                        let mut u = s.ctx.chunk(json!([]));
                        u["usage"] = usage_json(&s.usage);
                        tail.extend_from_slice(&s.ctx.framing.frame(&u));
                    }
                    tail.extend_from_slice(s.ctx.framing.done());
                    out = Bytes::from(tail);
                    s.finished = true;
                }
                out
            }
            None => {
                s.finished = true;
                Bytes::from_static(s.ctx.framing.done())
            }
        };
        Some((Ok::<_, std::convert::Infallible>(bytes), s))
    });
    let head = futures_util::stream::iter(head.into_iter().map(Ok::<_, std::convert::Infallible>));
    let body = futures_util::StreamExt::chain(head, events);
    crate::generation::streamed(body, framing.content_type())
}

#[cfg(test)]
mod fuzz {
    use kiln_model::fuzz::{cases, random_json, run_with};

    use super::*;

    const KEYS: &[&str] = &[
        "model",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "top_p",
        "temperature",
        "stream",
        "stream_options",
        "include_usage",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "echo",
        "suffix",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "tools",
        "functions",
        "response_format",
        "json_schema",
        "schema",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "structured_outputs",
        "presence_penalty",
        "frequency_penalty",
        "ignore_eos",
        "stop_token_ids",
        "top_k",
        "min_p",
        "repetition_penalty",
        "user",
    ];

    /// Every OpenAI body is parsed to an answer, never a panic.
    #[test]
    fn openai_bodies_never_panic() {
        let report = run_with(
            "openai bodies",
            cases(3000),
            |rng, _| random_json(rng, KEYS, 4).to_string().into_bytes(),
            |body| {
                let Ok(v) = crate::body::json(Ok(axum::body::Bytes::copy_from_slice(body))) else {
                    return false;
                };
                let Ok(f) = Fields::new(&v, "") else {
                    return false;
                };
                let chat = common(&f, 4096).is_ok() & chat_messages(&f).is_ok();
                let completion = common(&f, 16)
                    .and_then(|c| completion_options(&f, c.n))
                    .is_ok();
                chat || completion
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, cases(3000));
    }
}

#[cfg(test)]
mod message_tests {
    use super::*;

    /// An assistant turn's `reasoning_content` (or vLLM's `reasoning`)
    /// comes back as the message's `thinking`; other roles keep none.
    #[test]
    fn reasoning_sent_back_becomes_thinking() {
        let v = json!({"messages": [
            {"role": "user", "content": "Weather?", "reasoning_content": "not mine"},
            {"role": "assistant", "content": null, "reasoning_content": "Need the tool.",
             "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "assistant", "content": "Done.", "reasoning": "Easy."},
            {"role": "assistant", "content": "No reasoning."}]});
        let f = Fields::new(&v, "").unwrap();
        let m = chat_messages(&f).unwrap();
        let thinking: Vec<Option<&str>> = m.iter().map(|m| m.thinking.as_deref()).collect();
        assert_eq!(
            thinking,
            [None, Some("Need the tool."), Some("Easy."), None]
        );
        assert_eq!(m[1].content.as_deref(), Some(""));
    }
}
