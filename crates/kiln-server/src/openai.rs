//! The OpenAI API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (server-sent events with `[DONE]` when
//! `stream` is set). Errors use OpenAI's shape. The same bodies on DJL's
//! LMI routes stream the same chunks as JSON lines ([`Framing`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::future::join_all;
use kiln_engine::{Engine, Event, FinishReason, Request, TokenOutput, Usage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::access::AccessRecord;
use crate::dialect::openai::{chat_messages, common, completion_options, Common};
use crate::error::ApiError;
use crate::funnel::{with_prompt, MAX_TOP_LOGPROBS};
use crate::generation;
use crate::params::Fields;
use crate::prompts::{self, Prompt};
use crate::state::AppState;

pub(crate) use crate::dialect::openai::Api;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens}})
}

/// `GET /v1/models`.
pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = st
        .registry
        .all()
        .iter()
        .map(|m| {
            let created = m
                .registered_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            json!({"id": m.name, "object": "model", "created": created, "owned_by": "kiln"})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `n` copies of a prompt to submit (seeds `seed`, `seed + 1`, … when given).
fn copies(prompt: &[u32], c: &Common) -> Vec<Request> {
    (0..c.n)
        .map(|i| {
            let mut r = with_prompt(&c.params, prompt.to_vec());
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
            r
        })
        .collect()
}

/// The model's text for one token id (for log-probability listings).
fn token_text(engine: &Engine, id: u32) -> String {
    engine.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// `POST /v1/completions`.
pub async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(st, rec, body, Api::Completions)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(st, rec, body, Api::Chat)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

/// The messages of a chat request (and its tools), rendered with the
/// model's template.
fn chat_prompt(engine: &Engine, f: &Fields, tools: Option<&[Value]>) -> Result<Prompt, ApiError> {
    let messages = chat_messages(f)?;
    let template = engine.chat_template().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    let text = template
        .render_tools(&messages, tools, true, &serde_json::Map::new())
        .map_err(|e| ApiError::bad_request(format!("cannot apply the chat template: {e}")))?;
    // The template writes every special token itself.
    Ok(Prompt {
        ids: generation::encode(engine, &text, false)?,
        text,
    })
}

async fn run(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    run_value(
        st,
        rec,
        Arc::new(crate::body::json(body)?),
        api,
        None,
        Framing::Sse,
    )
    .await
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

/// Answers a parsed OpenAI body; `route_model`, when given, is the model the
/// route named (DJL's LMI routes), which the body's `model` cannot change.
/// A streamed answer is written as `framing` says.
pub(crate) async fn run_value(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    v: Arc<Value>,
    api: Api,
    route_model: Option<&str>,
    framing: Framing,
) -> Result<Response, ApiError> {
    let f = Fields::new(&v, "")?;
    let mut c = common(&f, if api == Api::Chat { 4096 } else { 16 })?;
    if let Some(m) = route_model {
        c.model = m.to_string();
    }
    if c.model.is_empty() {
        c.model = st.registry.only_model()?;
    }
    rec.set_model(&c.model);
    let engine = st.registry.engine(&c.model)?;
    let top_logprobs = match api {
        Api::Completions => f.uint("logprobs", MAX_TOP_LOGPROBS)?.map(|n| n as usize),
        Api::Chat => match f.bool("logprobs")? {
            Some(true) => Some(f.uint("top_logprobs", MAX_TOP_LOGPROBS)?.unwrap_or(0) as usize),
            _ => None,
        },
    };
    c.params.sampling.top_logprobs = top_logprobs.unwrap_or(0);
    let tools = match api {
        Api::Chat => crate::tools::parse(&f)?,
        Api::Completions => None,
    };
    let mut tool_syntax = None;
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
                 option.enable_auto_tool_choice=true in the model's serving.properties, as \
                 vLLM needs --enable-auto-tool-choice; 'required', a named function and \
                 'none' work without it",
            ));
        }
        let syntax = match &options.tool_call_parser {
            Some(p) => p.syntax(),
            None => engine
                .chat_template()
                .map(|tpl| crate::tool_parse::ToolSyntax::from_template(tpl.source()))
                .unwrap_or(crate::tool_parse::ToolSyntax::Hermes),
        };
        if let Some(g) = t.constraint(syntax) {
            if c.params.constraint.is_some() {
                return Err(ApiError::bad_request(
                    "tool_choice 'required' or a named function constrains the output to a \
                     tool call; it cannot be combined with another output constraint",
                ));
            }
            c.params.constraint = Some(g);
        }
        tool_syntax = t.parses().then_some(syntax);
        // Mistral's `[TOOL_CALLS]` is a special token: keep it in the text
        // (as vLLM does for its mistral parser), or no call could be read.
        if tool_syntax == Some(crate::tool_parse::ToolSyntax::Mistral) {
            c.params.skip_special_tokens = false;
        }
    }
    let tool_list = tools.map(|t| t.tools);
    let (input, echo) = match api {
        Api::Completions => {
            let (input, echo) = completion_options(&f, c.n)?;
            (Some(input), echo)
        }
        Api::Chat => (None, false),
    };
    let prompts: Vec<Prompt> = {
        let (engine, v) = (engine.clone(), v.clone());
        crate::cpu::run(move || match input {
            Some(input) => prompts::tokenize(&engine, input),
            None => Ok(vec![chat_prompt(
                &engine,
                &Fields::new(&v, "")?,
                tool_list.as_deref(),
            )?]),
        })
        .await?
    };
    if !c.explicit_max_tokens {
        // Without max_tokens the answer may run to the end of the context, but
        // the default must not ask for more than the KV cache can ever hold,
        // or every such request would be refused (507) on a small cache.
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let room = engine.info().kv_tokens.saturating_sub(longest).max(1);
        c.params.stop.max_new_tokens = c.params.stop.max_new_tokens.min(room);
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    rec.add_tokens_in(prompt_tokens * c.n);
    // Choice `k` answers prompt `k / n`, as OpenAI indexes them.
    let jobs = prompts.iter().flat_map(|p| copies(&p.ids, &c)).collect();
    // `echo` with `logprobs` reports the prompt's tokens too (their
    // log-probabilities computed with the prompt, as vLLM does).
    let echo_logprobs = echo && top_logprobs.is_some();
    let streams =
        generation::submit_all(&engine, jobs, st.config.request_timeout, echo_logprobs).await?;
    let id = format!(
        "{}-{}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let ctx = Ctx {
        id,
        created: now(),
        model: c.model.clone(),
        api,
        engine,
        logprobs: top_logprobs.is_some(),
        reasoning: match api {
            Api::Chat => crate::reasoning::for_model(&st, &c.model),
            Api::Completions => None,
        },
        tools: tool_syntax,
        framing,
    };
    if c.stream {
        let echoes = echo.then(|| {
            prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.text.clone(), c.n))
                .collect()
        });
        return Ok(stream(
            ctx,
            streams,
            c.include_usage,
            echoes,
            prompt_tokens,
            rec,
        ));
    }
    let done = join_all(streams.into_iter().map(generation::complete)).await;
    if let Some(e) = done.iter().find_map(generation::failure) {
        return Err(e);
    }
    let usage = Usage {
        prompt_tokens,
        completion_tokens: done.iter().map(|d| d.usage.completion_tokens).sum(),
        // Cached tokens: each prompt's best choice, summed over the prompts.
        cached_tokens: done
            .chunks(c.n)
            .map(|ch| ch.iter().map(|d| d.usage.cached_tokens).max().unwrap_or(0))
            .sum(),
    };
    rec.add_tokens_out(usage.completion_tokens);
    // The choices look up the text of every token (and of every
    // alternative with `top_logprobs`): built and serialized off the async
    // threads, with the answer.
    let n = c.n;
    crate::cpu::json_answer(move || Ok(answer_json(&ctx, &done, &prompts, n, echo, &usage))).await
}

/// A non-streamed answer: choice `i` answers prompt `i / n`.
fn answer_json(
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
                        let (content, calls) = crate::tool_parse::parse(syntax, content);
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
                            reason = "tool_calls";
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
struct Ctx {
    id: String,
    created: u64,
    model: String,
    api: Api,
    engine: Engine,
    logprobs: bool,
    /// `option.reasoning_parser` of the model, on chat requests.
    reasoning: Option<crate::reasoning::ReasoningParser>,
    /// The tool-call syntax to read from the output, when the request has
    /// tools and a choice other than `none`.
    tools: Option<crate::tool_parse::ToolSyntax>,
    /// How a streamed answer is written.
    framing: Framing,
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
fn stream(
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
