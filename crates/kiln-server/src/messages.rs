//! Anthropic's Messages API: `POST /v1/messages` (whole, or streamed as
//! Anthropic's server-sent events) and `POST /v1/messages/count_tokens`.
//! Errors use Anthropic's shape. The bodies are read and the answers
//! written by the Anthropic dialect ([`crate::dialect::anthropic`]); this
//! module finds the model, renders the conversation with its chat template
//! and submits it, as [`crate::openai`] does for chat completions.
//!
//! A streamed answer is `message_start`, `ping`, then each content block's
//! `content_block_start`, `content_block_delta`s and `content_block_stop`,
//! then `message_delta` (stop reason, usage) and `message_stop`; a failure
//! after the stream began is an `error` event, which ends it. Dropping the
//! stream (the client going away) drops the engine's request stream, which
//! cancels the request.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_engine::{Engine, Event, FinishReason, RequestStream};
use kiln_model::chat::ChatMessage;
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::dialect::anthropic::{
    self, assemble, matched_stop, stop_reason, usage_json, BlockEvent, Blocks, Thinking,
};
use crate::error::ApiError;
use crate::funnel::with_prompt;
use crate::generation;
use crate::params::Fields;
use crate::reasoning::ReasoningParser;
use crate::state::AppState;
use crate::tool_parse::ToolSyntax;
use crate::tools::{ToolChoice, ToolRequest};

/// `POST /v1/messages`.
pub async fn messages(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(st, rec, body)
        .await
        .unwrap_or_else(|e| e.anthropic().into_response())
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, the tokens of
/// the prompt that `/v1/messages` would submit for the same conversation
/// and tools.
pub async fn count_tokens(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    count(st, rec, body)
        .await
        .unwrap_or_else(|e| e.anthropic().into_response())
}

/// The request's model: its `model`, or the only model served.
fn model_name(st: &AppState, given: &str, rec: &AccessRecord) -> Result<String, ApiError> {
    let model = if given.is_empty() {
        st.registry.only_model()?
    } else {
        given.to_string()
    };
    rec.set_model(&model);
    Ok(model)
}

/// What the prompt is rendered from.
struct Conversation {
    messages: Vec<ChatMessage>,
    prefill: Option<String>,
    tools: Option<Vec<Value>>,
    /// The template's `enable_thinking`, for models with a reasoning parser.
    enable_thinking: Option<bool>,
}

/// The conversation rendered with the model's chat template (and tools),
/// tokenized; a final assistant turn is continued, not closed.
fn render(engine: &Engine, c: &Conversation) -> Result<Vec<u32>, ApiError> {
    let template = engine.chat_template().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template, which /v1/messages needs")
    })?;
    let mut kwargs = serde_json::Map::new();
    if let Some(on) = c.enable_thinking {
        kwargs.insert("enable_thinking".into(), json!(on));
    }
    let mut text = template
        .render_tools(&c.messages, c.tools.as_deref(), true, &kwargs)
        .map_err(|e| ApiError::bad_request(format!("cannot apply the chat template: {e}")))?;
    if let Some(p) = &c.prefill {
        text.push_str(p);
    }
    // The template writes every special token itself.
    generation::encode(engine, &text, false)
}

/// Reads the conversation and tools of `f` and renders them off the async
/// threads.
async fn prompt(
    engine: &Engine,
    v: Arc<Value>,
    reasoning: Option<ReasoningParser>,
    thinking: Thinking,
) -> Result<Vec<u32>, ApiError> {
    let engine = engine.clone();
    crate::cpu::run(move || {
        let f = Fields::new(&v, "")?;
        let (messages, prefill) = anthropic::conversation(&f)?;
        let tools = anthropic::tools(&f)?.map(|t| t.tools);
        let c = Conversation {
            messages,
            prefill,
            tools,
            enable_thinking: reasoning.map(|_| thinking == Thinking::On),
        };
        render(&engine, &c)
    })
    .await
}

/// Refuses `thinking` on a model that cannot think (no reasoning parser).
fn check_thinking(
    thinking: Thinking,
    reasoning: Option<ReasoningParser>,
    model: &str,
) -> Result<(), ApiError> {
    if thinking == Thinking::On && reasoning.is_none() {
        return Err(ApiError::bad_request(format!(
            "'thinking' is enabled, but model '{model}' has no reasoning parser \
             (option.reasoning_parser in its serving.properties), so kiln cannot tell its \
             thinking from its answer"
        )));
    }
    Ok(())
}

/// The syntax to read calls in, as the chat route chooses it (the model's
/// `option.tool_call_parser`, else its template's), and the chat route's
/// rule for `auto`.
fn tool_syntax(
    st: &AppState,
    model: &str,
    engine: &Engine,
    t: &ToolRequest,
) -> Result<ToolSyntax, ApiError> {
    let options = st
        .registry
        .get(model)
        .ok()
        .and_then(|e| e.properties.as_ref().map(|p| p.chat.clone()))
        .unwrap_or_default();
    if t.choice == ToolChoice::Auto && !options.auto_tool_choice {
        return Err(ApiError::bad_request(
            "tool_choice 'auto' (the default when 'tools' is given) needs \
             option.enable_auto_tool_choice=true in the model's serving.properties, as vLLM \
             needs --enable-auto-tool-choice; 'any', a named tool and 'none' work without it",
        ));
    }
    Ok(match &options.tool_call_parser {
        Some(p) => p.syntax(),
        None => engine
            .chat_template()
            .map(|tpl| ToolSyntax::from_template(tpl.source()))
            .unwrap_or(ToolSyntax::Hermes),
    })
}

async fn run(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = Arc::new(crate::body::json(body)?);
    let f = Fields::new(&v, "")?;
    let mut p = anthropic::parse(&f)?;
    // The conversation's shape is checked before the model is looked up.
    anthropic::conversation(&f)?;
    let model = model_name(&st, &p.model, &rec)?;
    let engine = st.registry.engine(&model)?;
    let reasoning = crate::reasoning::for_model(&st, &model);
    check_thinking(p.thinking, reasoning, &model)?;
    let mut tools = None;
    let mut one_call = false;
    if let Some(t) = &p.tools {
        let syntax = tool_syntax(&st, &model, &engine, t)?;
        if let Some(g) = t.constraint(syntax) {
            if p.params.constraint.is_some() {
                return Err(ApiError::bad_request(
                    "a tool_choice of 'any' or a named tool constrains the output to a tool \
                     call; it cannot be combined with 'output_config.format'",
                ));
            }
            p.params.constraint = Some(g);
        }
        if syntax == ToolSyntax::Mistral {
            // `[TOOL_CALLS]` is a special token: kept, or no call could be read.
            p.params.skip_special_tokens = false;
        }
        tools = t.parses().then_some(syntax);
        one_call = !t.parallel;
    }
    let ids = prompt(&engine, v.clone(), reasoning, p.thinking).await?;
    let prompt_tokens = ids.len();
    rec.add_tokens_in(prompt_tokens);
    let stops = p.params.stop.stop_strings.clone();
    let job = with_prompt(&p.params, ids);
    let mut streams =
        generation::submit_all(&engine, vec![job], st.config.request_timeout, false).await?;
    let stream = streams
        .pop()
        .ok_or_else(|| ApiError::model_failure("the engine took no request"))?;
    let ctx = Ctx {
        id: anthropic::message_id(),
        model,
        engine,
        prompt_tokens,
        stops,
        blocks: Blocks::new(reasoning, tools, one_call),
    };
    if p.stream {
        return Ok(stream_answer(ctx, stream, rec));
    }
    let done = generation::complete(stream).await;
    if let Some(e) = generation::failure(&done) {
        return Err(e);
    }
    rec.add_tokens_out(done.usage.completion_tokens);
    let ids: Vec<u32> = done.tokens.iter().map(|t| t.id).collect();
    crate::cpu::json_answer(move || {
        let mut ctx = ctx;
        let mut events = ctx.blocks.push(&done.text);
        events.extend(ctx.blocks.finish(cut(done.reason)));
        let (reason, sequence) = ctx.stop(done.reason, &done.text, &ids);
        Ok(
            json!({"id": ctx.id, "type": "message", "role": "assistant", "model": ctx.model,
            "content": assemble(&events), "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage_json(ctx.prompt_tokens, done.usage.cached_tokens,
                done.usage.completion_tokens)}),
        )
    })
    .await
}

async fn count(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = Arc::new(crate::body::json(body)?);
    let f = Fields::new(&v, "")?;
    for k in f.keys() {
        if !anthropic::COUNT_TOKENS_FIELDS.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "count_tokens: unknown field '{k}'"
            )));
        }
    }
    anthropic::conversation(&f)?;
    anthropic::tools(&f)?;
    let thinking = anthropic::thinking(&f, None)?;
    let model = model_name(&st, f.str("model")?.unwrap_or_default(), &rec)?;
    let engine = st.registry.engine(&model)?;
    let reasoning = crate::reasoning::for_model(&st, &model);
    check_thinking(thinking, reasoning, &model)?;
    let ids = prompt(&engine, v.clone(), reasoning, thinking).await?;
    Ok(Json(json!({"input_tokens": ids.len()})).into_response())
}

/// One answer's facts and its content blocks as they are built.
struct Ctx {
    id: String,
    model: String,
    engine: Engine,
    prompt_tokens: usize,
    /// The request's stop sequences (to name the one that matched).
    stops: Vec<String>,
    blocks: Blocks,
}

impl Ctx {
    /// `stop_reason` and `stop_sequence` for an output (`text`, the tokens
    /// `ids`) that ended for `reason`.
    fn stop(&self, reason: FinishReason, text: &str, ids: &[u32]) -> (&'static str, Value) {
        let matched = (reason == FinishReason::StopSequence)
            .then(|| {
                let raw = self
                    .engine
                    .tokenizer()
                    .decode(ids, true)
                    .unwrap_or_default();
                matched_stop(&self.stops, text, &raw)
            })
            .flatten();
        stop_reason(reason, self.blocks.calls(), matched)
    }
}

/// Whether an output ending for `reason` was cut short (a call in it may
/// be unfinished).
fn cut(reason: FinishReason) -> bool {
    matches!(reason, FinishReason::Length | FinishReason::Deadline)
}

/// One server-sent event.
fn sse(name: &str, data: &Value) -> Vec<u8> {
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

fn sse_blocks(events: &[BlockEvent], out: &mut Vec<u8>) {
    for e in events {
        let (name, data) = e.json();
        out.extend_from_slice(&sse(name, &data));
    }
}

/// The `error` event for a failure after the stream began.
fn error_event(e: ApiError) -> Vec<u8> {
    sse("error", &e.anthropic().body())
}

/// Streams the answer as Anthropic's events.
fn stream_answer(ctx: Ctx, stream: RequestStream, rec: Arc<AccessRecord>) -> Response {
    let mut head = sse(
        "message_start",
        &json!({"type": "message_start", "message": {"id": ctx.id, "type": "message",
            "role": "assistant", "model": ctx.model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": usage_json(ctx.prompt_tokens, 0, 0)}}),
    );
    head.extend_from_slice(&sse("ping", &json!({"type": "ping"})));
    struct S {
        ctx: Ctx,
        stream: RequestStream,
        rec: Arc<AccessRecord>,
        text: String,
        ids: Vec<u32>,
        finished: bool,
    }
    let state = S {
        ctx,
        stream,
        rec,
        text: String::new(),
        ids: Vec::new(),
        finished: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let mut out = Vec::new();
        match s.stream.next().await {
            Some(Event::Token(t)) => {
                s.ids.push(t.id);
                s.text.push_str(&t.text);
                sse_blocks(&s.ctx.blocks.push(&t.text), &mut out);
            }
            Some(Event::Finished {
                reason,
                usage,
                error,
            }) => {
                s.finished = true;
                s.rec.add_tokens_out(usage.completion_tokens);
                if reason == FinishReason::Error {
                    let c = generation::Completion {
                        text: String::new(),
                        tokens: Vec::new(),
                        reason,
                        usage,
                        error,
                    };
                    let e = generation::failure(&c)
                        .unwrap_or_else(|| ApiError::model_failure("generation failed"));
                    out = error_event(e);
                } else {
                    sse_blocks(&s.ctx.blocks.finish(cut(reason)), &mut out);
                    let (stop, sequence) = s.ctx.stop(reason, &s.text, &s.ids);
                    out.extend_from_slice(&sse(
                        "message_delta",
                        &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop, "stop_sequence": sequence},
                            "usage": usage_json(s.ctx.prompt_tokens, usage.cached_tokens,
                                usage.completion_tokens)}),
                    ));
                    out.extend_from_slice(&sse("message_stop", &json!({"type": "message_stop"})));
                }
            }
            None => {
                s.finished = true;
                out = error_event(ApiError::model_failure(
                    "the engine stopped before the request finished",
                ));
            }
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), s))
    });
    let head =
        futures_util::stream::once(
            async move { Ok::<_, std::convert::Infallible>(Bytes::from(head)) },
        );
    generation::streamed(
        futures_util::StreamExt::chain(head, events),
        "text/event-stream",
    )
}
