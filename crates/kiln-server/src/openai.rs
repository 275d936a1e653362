//! The OpenAI API's routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (server-sent events with `[DONE]` when
//! `stream` is set). Errors use OpenAI's shape. The same bodies on DJL's
//! LMI routes stream the same chunks as JSON lines ([`Framing`]). The
//! bodies are read and the answers written by the OpenAI dialect
//! ([`crate::dialect::openai`]); this module finds the model, renders the
//! prompts and submits them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::future::join_all;
use kiln_engine::{Engine, Request, Usage};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::dialect::openai::{
    answer_json, chat_messages, common, completion_options, stream, Common, Ctx,
};
use crate::error::ApiError;
use crate::funnel::{with_prompt, MAX_TOP_LOGPROBS};
use crate::generation;
use crate::params::Fields;
use crate::prompts::{self, Prompt};
use crate::state::AppState;

pub(crate) use crate::dialect::openai::{Api, Framing};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let mut data: Vec<Value> = st
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
    data.extend(crate::adapters::openai_models(&st.registry, |m| {
        m.registered_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }));
    // Embedding models and rerankers too, in one list sorted by name.
    data.extend(
        crate::encoder_models::openai_entries(&st)
            .into_iter()
            .map(|e| e.1),
    );
    data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
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
    // OpenAI's `reasoning_effort`, handed to the template as vLLM does
    // (gpt-oss's harmony system message writes it; others ignore it).
    let mut kwargs = serde_json::Map::new();
    if let Some(effort) = f.str("reasoning_effort")? {
        if !matches!(effort, "low" | "medium" | "high") {
            return Err(ApiError::bad_request(format!(
                "'reasoning_effort' must be 'low', 'medium' or 'high', got '{effort}'"
            )));
        }
        kwargs.insert("reasoning_effort".into(), effort.into());
    }
    let text = template
        .render_tools(&messages, tools, true, &kwargs)
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
        if syntax == crate::tool_parse::ToolSyntax::Harmony
            && matches!(
                t.choice,
                crate::tools::ToolChoice::Required | crate::tools::ToolChoice::Named(_)
            )
        {
            // The grammar writes harmony's markers as the special tokens
            // they are in gpt-oss's tokenizer: a model without them cannot.
            let tok = engine.tokenizer();
            if let Some(m) = crate::harmony::CALL_MARKERS
                .iter()
                .find(|m| tok.token_to_id(m).is_none())
            {
                return Err(ApiError::bad_request(format!(
                    "tool_choice 'required' or a named function with gpt-oss's harmony tool \
                     calls needs harmony's special tokens in the model's tokenizer, which has \
                     no '{m}'; use 'auto'"
                )));
            }
        }
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
    let reasoning = match api {
        Api::Chat => crate::reasoning::for_chat(&st, &c.model, &engine),
        Api::Completions => None,
    };
    // Harmony's channel and call markers are special tokens too: kept for
    // the gpt-oss parsers, which take them out of what the client sees.
    if tool_syntax == Some(crate::tool_parse::ToolSyntax::Harmony)
        || reasoning == Some(crate::reasoning::ReasoningParser::GptOss)
    {
        c.params.skip_special_tokens = false;
    }
    let tool_request = tools.clone();
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
    if let (Some(t), Some(syntax)) = (&tool_request, tool_syntax) {
        crate::tools::check_room(&engine, t, syntax, c.params.stop.max_new_tokens, &f)?;
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
        reasoning,
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
