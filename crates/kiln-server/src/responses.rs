//! The OpenAI Responses API's routes: `POST /v1/responses` (whole, or
//! server-sent events with the API's event types), `GET` and `DELETE
//! /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`. The body
//! is read and the answer written by [`crate::dialect::responses`]; this
//! module finds the model, continues a stored conversation
//! (`previous_response_id`, [`crate::responses_store`]), renders the prompt
//! with the model's chat template, submits, and stores the answer. Errors
//! use OpenAI's shape; keys, body limits, metrics and the access log come
//! from the router's layers as on every route, and a client that goes away
//! cancels its request (its stream is dropped).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_engine::{Engine, Event, FinishReason, RequestStream};
use serde_json::{json, Map, Value};

use crate::access::AccessRecord;
use crate::dialect::responses::{self as dialect, new_id, Create, Writer};
use crate::error::ApiError;
use crate::funnel::with_prompt;
use crate::generation;
use crate::params::Fields;
use crate::reasoning::ReasoningParser;
use crate::responses_store::{ResponseStore, Stored};
use crate::state::AppState;
use crate::tool_parse::ToolSyntax;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn not_found(id: &str) -> ApiError {
    let ttl = ResponseStore::global().ttl().as_secs();
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "response '{id}' not found: it was never stored (unknown id, or created with \
             store: false), was deleted, or left the bounded store (kept {ttl} s, oldest \
             evicted first)"
        ),
    )
    .openai()
}

/// `POST /v1/responses`.
pub async fn create(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(st, rec, body)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

/// `GET /v1/responses/{id}`.
pub async fn get(Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    if let Some(q) = q.filter(|q| !q.is_empty()) {
        return ApiError::bad_request(format!(
            "query parameters are not supported on GET /v1/responses/{{id}} (got '{q}'); a \
             stored response is answered whole"
        ))
        .openai()
        .into_response();
    }
    match ResponseStore::global().get(&id) {
        Some(s) => Json(s.response).into_response(),
        None => not_found(&id).into_response(),
    }
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(Path(id): Path<String>) -> Response {
    if ResponseStore::global().delete(&id) {
        Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
    } else {
        not_found(&id).into_response()
    }
}

/// `GET /v1/responses/{id}/input_items`: the request's own input items,
/// with `limit` (1 to 100, default 20), `order` (`desc` by default) and
/// `after` (an item id) as the API pages them.
pub async fn input_items(Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    list_input_items(&id, q.as_deref().unwrap_or("")).unwrap_or_else(|e| e.openai().into_response())
}

fn list_input_items(id: &str, query: &str) -> Result<Response, ApiError> {
    let (mut limit, mut desc, mut after) = (20usize, true, None::<String>);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "'limit' must be an integer from 1 to 100, got '{v}'"
                        ))
                    })?
            }
            "order" => {
                desc = match v {
                    "asc" => false,
                    "desc" => true,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "'order' must be asc or desc, got '{v}'"
                        )))
                    }
                }
            }
            "after" => after = Some(v.to_string()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "query parameter '{other}' is not supported (kiln takes limit, order, after)"
                )))
            }
        }
    }
    let stored = ResponseStore::global()
        .get(id)
        .ok_or_else(|| not_found(id))?;
    let mut items = stored.input_items;
    if desc {
        items.reverse();
    }
    if let Some(a) = after {
        let at = items
            .iter()
            .position(|i| i["id"].as_str() == Some(a.as_str()))
            .ok_or_else(|| {
                ApiError::bad_request(format!("'after' names no input item of {id}: '{a}'"))
            })?;
        items.drain(..=at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(json!({"object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more, "data": items}))
    .into_response())
}

/// What the answer needs besides the engine's events.
struct Ctx {
    id: String,
    created: u64,
    model: String,
    echo: Map<String, Value>,
    store: bool,
    /// The conversation before this response's output.
    history: Vec<Value>,
    input: Vec<Value>,
    prompt_tokens: usize,
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolSyntax>,
}

impl Ctx {
    /// The final response object, stored when asked.
    fn finish(&self, w: &Writer, status: &str, usage: &kiln_engine::Usage) -> Value {
        let usage = dialect::usage_json(
            self.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            w.reasoning_tokens,
        );
        let v = dialect::response_json(
            &self.id,
            self.created,
            &self.model,
            status,
            &w.output,
            usage,
            &self.echo,
        );
        if self.store {
            let mut history = self.history.clone();
            history.extend(w.output.iter().cloned());
            ResponseStore::global().put(
                self.id.clone(),
                Stored {
                    response: v.clone(),
                    input_items: self.input.clone(),
                    history,
                },
            );
        }
        v
    }
}

/// A finished output's status.
fn status(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::Deadline => "incomplete",
        _ => "completed",
    }
}

/// The template variables `reasoning.effort` sets: `reasoning_effort`
/// where the template reads it (gpt-oss), else `enable_thinking` (Qwen3:
/// off for `none`); a template with neither cannot honour it (400).
fn effort_vars(engine: &Engine, effort: Option<&str>) -> Result<Map<String, Value>, ApiError> {
    let mut m = Map::new();
    let Some(e) = effort else { return Ok(m) };
    let src = engine.chat_template().map(|t| t.source()).unwrap_or("");
    if src.contains("reasoning_effort") {
        m.insert("reasoning_effort".into(), json!(e));
    } else if src.contains("enable_thinking") {
        m.insert("enable_thinking".into(), json!(e != "none"));
    } else {
        return Err(ApiError::bad_request(
            "'reasoning.effort' needs a model whose chat template reads reasoning_effort or \
             enable_thinking; this model's does not",
        ));
    }
    Ok(m)
}

async fn run(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = crate::body::json(body)?;
    let f = Fields::new(&v, "")?;
    let mut c: Create = dialect::parse(&f)?;
    if c.model.is_empty() {
        c.model = st.registry.only_model()?;
    }
    rec.set_model(&c.model);
    let engine = st.registry.engine(&c.model)?;
    let mut history = match &c.previous_response_id {
        Some(prev) => {
            ResponseStore::global()
                .get(prev)
                .ok_or_else(|| not_found(prev))?
                .history
        }
        None => Vec::new(),
    };
    history.extend(c.input.iter().cloned());

    // Tools, checked by the chat route's rules.
    let tools = crate::tools::parse(&Fields::new(&c.chat_tools, "")?)?;
    let mut tool_syntax = None;
    let mut params = c.params.clone();
    params.constraint = c.constraint.clone();
    if let Some(t) = &tools {
        let options = st
            .registry
            .get(&c.model)
            .ok()
            .and_then(|e| e.properties.as_ref().map(|p| p.chat.clone()))
            .unwrap_or_default();
        if t.choice == crate::tools::ToolChoice::Auto && !options.auto_tool_choice {
            return Err(ApiError::bad_request(
                "tool_choice 'auto' (the default when 'tools' is given) needs \
                 option.enable_auto_tool_choice=true in the model's serving.properties; \
                 'required', a named function and 'none' work without it",
            ));
        }
        let syntax = match &options.tool_call_parser {
            Some(p) => p.syntax(),
            None => engine
                .chat_template()
                .map(|tpl| ToolSyntax::from_template(tpl.source()))
                .unwrap_or(ToolSyntax::Hermes),
        };
        if let Some(g) = t.constraint(syntax) {
            if params.constraint.is_some() {
                return Err(ApiError::bad_request(
                    "tool_choice 'required' or a named function constrains the output to a \
                     tool call; it cannot be combined with text.format",
                ));
            }
            params.constraint = Some(g);
        }
        tool_syntax = t.parses().then_some(syntax);
        if tool_syntax == Some(ToolSyntax::Mistral) {
            params.skip_special_tokens = false;
        }
    }
    let tool_list = tools.map(|t| t.tools);
    let extra = effort_vars(&engine, c.effort.as_deref())?;

    // The prompt; with `truncation: auto`, the oldest turns go first until
    // it leaves room to answer.
    let ids = {
        let (engine, items, instructions, truncate) = (
            engine.clone(),
            history.clone(),
            c.instructions.clone(),
            c.truncate,
        );
        crate::cpu::run(move || {
            let template = engine.chat_template().ok_or_else(|| {
                ApiError::bad_request("this model has no chat template; use /v1/completions")
            })?;
            let mut messages = dialect::messages(instructions.as_deref(), &items);
            let limit = engine.info().max_model_len;
            loop {
                let text = template
                    .render_tools(&messages, tool_list.as_deref(), true, &extra)
                    .map_err(|e| {
                        ApiError::bad_request(format!("cannot apply the chat template: {e}"))
                    })?;
                let ids = generation::encode(&engine, &text, false)?;
                if !truncate || ids.len() < limit {
                    return Ok(ids);
                }
                let Some(first) = messages.iter().position(|m| m.role != "system") else {
                    return Ok(ids);
                };
                if messages.len() - first <= 1 {
                    // The last turn alone is too long: the engine says so.
                    return Ok(ids);
                }
                messages.remove(first);
            }
        })
        .await?
    };
    if !c.explicit_max_tokens {
        let room = engine.info().kv_tokens.saturating_sub(ids.len()).max(1);
        params.stop.max_new_tokens = params.stop.max_new_tokens.min(room);
    }
    let prompt_tokens = ids.len();
    rec.add_tokens_in(prompt_tokens);
    let mut streams = generation::submit_all(
        &engine,
        vec![with_prompt(&params, ids)],
        st.config.request_timeout,
        false,
    )
    .await?;
    let stream = streams
        .pop()
        .ok_or_else(|| ApiError::model_failure("the engine took no request"))?;
    let ctx = Ctx {
        id: new_id("resp"),
        created: now(),
        model: c.model.clone(),
        echo: c.echo,
        store: c.store,
        history,
        input: c.input,
        prompt_tokens,
        reasoning: crate::reasoning::for_model(&st, &c.model),
        tools: tool_syntax,
    };
    if c.stream {
        return Ok(stream_answer(ctx, stream, rec));
    }
    let done = generation::complete(stream).await;
    if let Some(e) = generation::failure(&done) {
        return Err(e);
    }
    rec.add_tokens_out(done.usage.completion_tokens);
    let mut w = Writer::new(ctx.reasoning, ctx.tools);
    w.push(&done.text);
    let s = status(done.reason);
    w.finish(s);
    Ok(Json(ctx.finish(&w, s, &done.usage)).into_response())
}

/// One server-sent event, named by its type as the API sends them.
fn sse(v: &Value) -> Vec<u8> {
    let ty = v["type"].as_str().unwrap_or("message");
    format!("event: {ty}\ndata: {v}\n\n").into_bytes()
}

fn frames(events: &[Value]) -> Bytes {
    let mut out = Vec::new();
    for e in events {
        out.extend_from_slice(&sse(e));
    }
    Bytes::from(out)
}

/// Streams the answer: `response.created`, `response.in_progress`, the
/// output items' events, then `response.completed` (or
/// `response.incomplete`; on a failure `error` and `response.failed`).
fn stream_answer(ctx: Ctx, stream: RequestStream, rec: Arc<AccessRecord>) -> Response {
    let mut w = Writer::new(ctx.reasoning, ctx.tools);
    let start = dialect::response_json(
        &ctx.id,
        ctx.created,
        &ctx.model,
        "in_progress",
        &[],
        Value::Null,
        &ctx.echo,
    );
    let head = vec![
        w.event("response.created", json!({"response": start.clone()})),
        w.event("response.in_progress", json!({"response": start})),
    ];
    struct S {
        stream: RequestStream,
        w: Writer,
        ctx: Ctx,
        rec: Arc<AccessRecord>,
        head: Option<Vec<Value>>,
        finished: bool,
    }
    let state = S {
        stream,
        w,
        ctx,
        rec,
        head: Some(head),
        finished: false,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        if let Some(h) = s.head.take() {
            return Some((Ok::<_, std::convert::Infallible>(frames(&h)), s));
        }
        if s.finished {
            return None;
        }
        let events = match s.stream.next().await {
            Some(Event::Token(t)) => s.w.push(&t.text),
            Some(Event::Finished {
                reason,
                usage,
                error,
            }) => {
                s.finished = true;
                s.rec.add_tokens_out(usage.completion_tokens);
                if reason == FinishReason::Error {
                    failed(&mut s.w, &s.ctx, error, &usage)
                } else {
                    let st = status(reason);
                    let mut ev = s.w.finish(st);
                    let v = s.ctx.finish(&s.w, st, &usage);
                    let ty = if st == "incomplete" {
                        "response.incomplete"
                    } else {
                        "response.completed"
                    };
                    ev.push(s.w.event(ty, json!({"response": v})));
                    ev
                }
            }
            None => {
                s.finished = true;
                failed(
                    &mut s.w,
                    &s.ctx,
                    Some("the engine stopped before the request finished".into()),
                    &kiln_engine::Usage::default(),
                )
            }
        };
        Some((Ok(frames(&events)), s))
    });
    generation::streamed(body, "text/event-stream")
}

/// The events of a failed generation: `error`, then `response.failed`.
fn failed(
    w: &mut Writer,
    ctx: &Ctx,
    error: Option<String>,
    usage: &kiln_engine::Usage,
) -> Vec<Value> {
    let message = error.unwrap_or_else(|| "generation failed".into());
    let mut ev = vec![w.event(
        "error",
        json!({"code": "server_error", "message": message, "param": null}),
    )];
    let mut v = dialect::response_json(
        &ctx.id,
        ctx.created,
        &ctx.model,
        "failed",
        &w.output,
        dialect::usage_json(ctx.prompt_tokens, usage.completion_tokens, 0, 0),
        &ctx.echo,
    );
    v["error"] = json!({"code": "server_error", "message": message});
    ev.push(w.event("response.failed", json!({"response": v})));
    ev
}
