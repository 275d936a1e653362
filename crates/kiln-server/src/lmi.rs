//! The DJL Serving inference routes: `POST /predictions/{model}[/{version}]`,
//! `POST /invocations?model_name=`, `POST /models/{name}/invoke`.
//!
//! Bodies accepted: the LMI schema (`{"inputs": str | [str], "parameters":
//! {...}, "stream": bool}`), the reference deployment's `{"text": [...],
//! "seq_length": N}` (a batch; `seq_length` limits prompt + output), a bare
//! JSON string or list of strings, and plain text. Responses:
//! `{"generated_text", "details"?}` (a list for list input); streams as JSON
//! lines `{"token": {id, text, log_prob, logprob}}` whose last line also
//! carries `generated_text` (and `details`), or as server-sent events.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::future::join_all;
use kiln_engine::{Engine, FinishReason, SamplingParams, TokenOutput};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::djl_status;
use crate::error::ApiError;
use crate::generation::{self, Completion, Events, GenParams};
use crate::params::Fields;
use crate::properties::OutputFormatter;
use crate::state::AppState;

/// Most new tokens one request may ask for.
const MAX_NEW_TOKENS: u64 = 1 << 20;
/// Most prompts in one batch request.
const MAX_BATCH: usize = 256;
/// Most stop sequences one request may give (as the OpenAI routes allow).
const MAX_STOP_SEQUENCES: usize = 16;

/// A parsed inference request.
#[derive(Debug, Clone)]
pub struct LmiRequest {
    pub inputs: Vec<String>,
    /// The input was a list (the response is a list too).
    pub batch: bool,
    pub params: GenParams,
    pub details: bool,
    /// `parameters.decoder_input_details`: with `details`, the prompt's
    /// tokens and their log-probabilities as `details.prefill`.
    pub decoder_input_details: bool,
    pub return_full_text: bool,
    pub stream: bool,
}

/// A request body, decoded but not yet read as a request.
enum Decoded {
    /// Plain text: one prompt with default parameters.
    Text(String),
    Json(Value),
}

/// Decodes a body (`content_type` as sent) as text or JSON.
fn decode(content_type: Option<&str>, body: &[u8]) -> Result<Decoded, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    // A declared type decides; without one (or with another), a body that
    // looks like JSON is read as JSON. `text/plain` is always a prompt, even
    // one that starts with `[` or `"` (`[INST] …`, a quotation).
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let is_json = match media.as_deref() {
        Some("application/json") => true,
        Some("text/plain") => false,
        _ => matches!(text.trim_start().chars().next(), Some('{' | '[' | '"')),
    };
    if !is_json {
        return Ok(Decoded::Text(text.to_string()));
    }
    serde_json::from_str(text)
        .map(Decoded::Json)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// Parses a request body (`content_type` as sent) in the LMI schema, for a
/// rolling-batch model.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<LmiRequest, ApiError> {
    match decode(content_type, body)? {
        Decoded::Text(t) => plain(t),
        Decoded::Json(v) => parse_json(&v, StreamMode::PerRequest),
    }
}

/// How a model's LMI-schema requests stream, which depends on the DJL
/// handler that `option.rolling_batch` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamMode {
    /// Rolling batch (the default): a request streams when its body says
    /// `"stream": true`, and then takes one input.
    PerRequest,
    /// `option.rolling_batch=disable` with `option.enable_streaming`: every
    /// request streams, a list of inputs too ([`crate::lmi_outputs`]).
    StaticBatch,
    /// `option.rolling_batch=disable` without `option.enable_streaming`:
    /// the body's `stream` is not read and every request is answered as
    /// JSON. DJL's input parser reads only `inputs` and `parameters` when
    /// rolling batch is off (`djl_python/input_parser.py`,
    /// `parse_text_inputs_params`: "per request streaming is only supported
    /// by rolling batch"; `stream` is read only by
    /// `parse_lmi_default_request_rolling_batch`).
    Never,
}

/// What a body on an LMI route asks for.
pub(crate) enum Parsed {
    /// The LMI schema (or plain text, or the reference deployment's body).
    Lmi(Box<LmiRequest>),
    /// An OpenAI completions or chat-completions body (`prompt` / `messages`).
    OpenAi(Arc<Value>, crate::openai::Api),
    /// A SageMaker session request (`requestType`, [`crate::sessions`]).
    Session(crate::sessions::SessionRequest),
}

/// Parses a body on an LMI route: DJL's LMI handler reads a JSON object
/// with `prompt` as an OpenAI completions request, else one with `inputs`
/// in the LMI schema, else one with `messages` as a chat-completions
/// request, else one with `requestType` as a session request
/// (`djl_python/lmi_vllm/vllm_async_service.py`, `preprocess_request`, in
/// that order). `mode` says how the model streams LMI-schema requests.
pub(crate) fn parse_any(
    content_type: Option<&str>,
    body: &[u8],
    mode: StreamMode,
) -> Result<Parsed, ApiError> {
    let v = match decode(content_type, body)? {
        Decoded::Text(t) => return plain(t).map(|r| Parsed::Lmi(Box::new(r))),
        Decoded::Json(v) => v,
    };
    if let Some(api) = crate::lmi_chat::openai_api(&v) {
        return Ok(Parsed::OpenAi(Arc::new(v), api));
    }
    if let Some(t) = v.get("requestType").filter(|_| v.get("inputs").is_none()) {
        return crate::sessions::SessionRequest::parse(t).map(Parsed::Session);
    }
    parse_json(&v, mode).map(|r| Parsed::Lmi(Box::new(r)))
}

/// A plain-text body: one prompt with default parameters.
fn plain(text: String) -> Result<LmiRequest, ApiError> {
    Ok(LmiRequest {
        inputs: vec![text],
        batch: false,
        params: gen_params(None, None)?,
        details: false,
        decoder_input_details: false,
        return_full_text: false,
        stream: false,
    })
}

/// Reads a JSON body in the LMI schema, for a model that streams as `mode`
/// says.
fn parse_json(v: &Value, mode: StreamMode) -> Result<LmiRequest, ApiError> {
    let (inputs, batch, params, seq_length, stream) = match v {
        Value::String(s) => (vec![s.clone()], false, None, None, false),
        Value::Array(_) => (strings(v, "the request")?, true, None, None, false),
        Value::Object(_) => {
            let f = Fields::new(v, "")?;
            let (inputs, batch, seq) = if let Some(i) = f.get("inputs") {
                match i {
                    Value::String(s) => (vec![s.clone()], false, None),
                    Value::Array(_) => (strings(i, "inputs")?, true, None),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "'inputs' must be a string or a list of strings, got {other}"
                        )))
                    }
                }
            } else if let Some(t) = f.get("text") {
                // The reference deployment's body: a batch of texts and a total length.
                let seq = f.uint("seq_length", MAX_NEW_TOKENS)?;
                if seq == Some(0) {
                    return Err(ApiError::bad_request("'seq_length' must be at least 1"));
                }
                match t {
                    Value::String(s) => (vec![s.clone()], true, seq),
                    Value::Array(_) => (strings(t, "text")?, true, seq),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "'text' must be a string or a list of strings, got {other}"
                        )))
                    }
                }
            } else if f.has("requestType") {
                return Err(ApiError::bad_request(
                    "SageMaker stateful sessions ('requestType') are not supported: \
                     kiln refuses option.enable_stateful_sessions=true",
                ));
            } else {
                return Err(ApiError::bad_request(
                    "expected 'inputs' (a string or a list of strings), 'prompt' (a completions request), \
                     'messages' (a chat-completions request), or the reference body's 'text' and 'seq_length'",
                ));
            };
            let stream = match mode {
                StreamMode::Never => false,
                _ => f.bool("stream")?.unwrap_or(false),
            };
            (inputs, batch, f.get("parameters"), seq, stream)
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "expected a JSON object, got {other}"
            )))
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::bad_request("the list of inputs is empty"));
    }
    if inputs.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BATCH} inputs per request"
        )));
    }
    if inputs.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request("an input is an empty string"));
    }
    let pf = params.map(|p| Fields::new(p, "parameters")).transpose()?;
    let mut gp = gen_params(pf.as_ref(), seq_length)?;
    if let Some(seq) = seq_length {
        gp.max_total_tokens = Some(seq as usize);
        if pf.as_ref().is_none_or(|f| !f.has("max_new_tokens")) {
            gp.max_new_tokens = seq as usize;
        }
    }
    let details = pf
        .as_ref()
        .map(|f| f.bool("details"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    let return_full_text = pf
        .as_ref()
        .map(|f| f.bool("return_full_text"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    if stream && batch && mode != StreamMode::StaticBatch {
        return Err(ApiError::bad_request(
            "streaming takes one input, not a list",
        ));
    }
    let decoder_input_details = pf
        .as_ref()
        .map(|f| f.bool("decoder_input_details"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    // DJL's schema: "decoder_input_details ... cannot be used with streaming"
    // (serving/docs/lmi/user_guides/lmi_input_output_schema.md).
    if decoder_input_details && stream {
        return Err(ApiError::bad_request(
            "'parameters.decoder_input_details' cannot be used with streaming",
        ));
    }
    Ok(LmiRequest {
        inputs,
        batch,
        params: gp,
        details,
        decoder_input_details,
        return_full_text,
        stream,
    })
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, ApiError> {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|i| match i {
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::bad_request(format!(
                "{what} must be a list of strings, found {other}"
            ))),
        })
        .collect()
}

/// LMI `parameters` (all optional).
fn gen_params(f: Option<&Fields>, seq_length: Option<u64>) -> Result<GenParams, ApiError> {
    let default_new = seq_length.unwrap_or(30) as usize;
    let Some(f) = f else {
        return Ok(GenParams {
            max_new_tokens: default_new,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            max_total_tokens: None,
            ignore_eos: false,
            constraint: None,
            skip_special_tokens: true,
        });
    };
    let max_new_tokens = f
        .uint("max_new_tokens", MAX_NEW_TOKENS)?
        .map_or(default_new, |n| n as usize);
    if max_new_tokens == 0 {
        return Err(ApiError::bad_request(
            "'parameters.max_new_tokens' must be at least 1",
        ));
    }
    // LMI samples only with do_sample=true; otherwise it decodes greedily.
    let do_sample = f.bool("do_sample")?.unwrap_or(false);
    let temperature = f.float("temperature", 0.0, 100.0)?;
    let top_p = f.float("top_p", 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::bad_request(
            "'parameters.top_p' must be greater than 0",
        ));
    }
    let top_k = match f.get("top_k") {
        Some(v) if v.as_i64() == Some(-1) => 0,
        _ => f.uint("top_k", u32::MAX as u64)?.unwrap_or(0) as usize,
    };
    let sampling = SamplingParams {
        temperature: if do_sample {
            temperature.unwrap_or(1.0) as f32
        } else {
            0.0
        },
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k,
        min_p: f.float("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repetition_penalty: f.float("repetition_penalty", 1e-3, 100.0)?.unwrap_or(1.0) as f32,
        presence_penalty: f.float("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        frequency_penalty: f.float("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        seed: f.uint("seed", u64::MAX)?,
        top_logprobs: f.uint("top_n_tokens", 20)?.unwrap_or(0) as usize,
    };
    let mut stop_strings = f.strings("stop_sequences")?;
    stop_strings.extend(f.strings("stop")?);
    if stop_strings.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::bad_request(format!(
            "'parameters.stop_sequences' takes at most {MAX_STOP_SEQUENCES} sequences, got {}",
            stop_strings.len()
        )));
    }
    Ok(GenParams {
        max_new_tokens,
        sampling,
        stop_strings,
        stop_token_ids: f.ids("stop_token_ids")?,
        max_total_tokens: None,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        constraint: crate::constraints::parse(f)?,
        skip_special_tokens: true,
    })
}

/// An LMI token object. Its log-probability is written under both names
/// DJL uses: `log_prob`, as its LMI schema documents it
/// (`serving/docs/lmi/user_guides/lmi_input_output_schema.md`, and its
/// rolling-batch handlers' `request_io.py` `Token.as_dict`), and
/// `logprob`, as its current vLLM handler writes it
/// (`djl_python/lmi_vllm/request_response_utils.py`:
/// `convert_completion_logprobs_to_tgi_tokens`,
/// `convert_completion_chunk_response_to_lmi_schema`), so that a client
/// written against either finds it.
pub(crate) fn token_json(t: &TokenOutput) -> Value {
    lp_token(t.id, &t.text, json!(t.logprob))
}

/// A token object with `log_prob` and `logprob` both set to `lp`.
pub(crate) fn lp_token(id: impl Into<Value>, text: &str, lp: Value) -> Value {
    json!({"id": id.into(), "text": text, "log_prob": lp.clone(), "logprob": lp})
}

pub(crate) fn details_json(
    reason: FinishReason,
    tokens: &[TokenOutput],
    prompt: &str,
    with_tokens: bool,
) -> Value {
    let mut d = json!({
        "finish_reason": reason.as_str(),
        "generated_tokens": tokens.len(),
        "inputs": prompt,
    });
    if with_tokens {
        d["tokens"] = tokens.iter().map(token_json).collect();
    }
    d
}

/// `details.prefill`: the prompt tokens as token objects ([`token_json`]'s
/// keys). The first prompt token has no log-probability (nothing precedes
/// it). DJL's current vLLM handler leaves it out
/// (`djl_python/lmi_vllm/request_response_utils.py`,
/// `convert_completion_prefill_to_tgi_prefill` skips vLLM's `None` entry),
/// and so does kiln by default; with `first_token`
/// (`option.prefill_first_token=true`) it is written with a null
/// log-probability, as DJL's schema documents and its rolling-batch handler
/// writes it (`djl_python/rolling_batch/rolling_batch_vllm_utils.py`
/// `prompt_tokens_details`, `log_prob = None` at index 0).
fn prefill_json(engine: &Engine, prompt: &[u32], c: &Completion, first_token: bool) -> Value {
    let logprobs = c
        .tokens
        .first()
        .and_then(|t| t.prompt_logprobs.as_deref())
        .unwrap_or_default();
    prompt
        .iter()
        .enumerate()
        .skip(usize::from(!first_token))
        .map(|(i, &id)| {
            let text = engine.tokenizer().decode(&[id], false).unwrap_or_default();
            let lp = i.checked_sub(1).and_then(|j| logprobs.get(j));
            lp_token(id, &text, json!(lp))
        })
        .collect()
}

fn output_json(
    c: &Completion,
    prompt: &str,
    prompt_ids: &[u32],
    req: &LmiRequest,
    engine: &Engine,
    prefill_first_token: bool,
) -> Value {
    let text = if req.return_full_text {
        format!("{prompt}{}", c.text)
    } else {
        c.text.clone()
    };
    let mut o = json!({"generated_text": text});
    if req.details {
        o["details"] = details_json(c.reason, &c.tokens, prompt, true);
        if req.decoder_input_details {
            o["details"]["prefill"] = prefill_json(engine, prompt_ids, c, prefill_first_token);
        }
    }
    o
}

/// The client's address, where the connection layer recorded it.
type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

fn peer_ip(peer: Peer) -> Option<IpAddr> {
    peer.map(|Extension(ConnectInfo(a))| a.ip())
}

/// `POST /predictions/{model}` and `POST /models/{model}/invoke`.
pub async fn predictions(
    State(st): State<Arc<AppState>>,
    Path(model): Path<String>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer(st, &model, rec, peer_ip(peer), headers, body).await
}

/// `POST /predictions/{model}/{version}` (kiln keeps one version per name).
pub async fn predictions_version(
    State(st): State<Arc<AppState>>,
    Path((model, _version)): Path<(String, String)>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer(st, &model, rec, peer_ip(peer), headers, body).await
}

/// `POST /invocations?model_name=` (the name may be left out when one model is served).
pub async fn invocations(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let name = match q.get("model_name") {
        Some(n) => n.clone(),
        None => match st.registry.all().as_slice() {
            [only] => only.name.clone(),
            [] => return ApiError::unavailable("no model is registered").into_response(),
            _ => {
                return ApiError::bad_request(
                    "several models are served: name one with ?model_name=",
                )
                .into_response()
            }
        },
    };
    infer(st, &name, rec, peer_ip(peer), headers, body).await
}

/// Maps a body-extraction failure to a JSON error (413 for an oversized
/// body, 408 for one that took longer than `--body-read-timeout`).
pub fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<crate::conn::BodyTimeout>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string());
        }
        cause = c.source();
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "the request body is larger than the server's limit (--max-request-bytes)",
        )
    } else {
        ApiError::new(status, format!("cannot read the request body: {e}"))
    }
}

async fn infer(
    st: Arc<AppState>,
    model: &str,
    rec: Arc<AccessRecord>,
    client: Option<IpAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    rec.set_model(model);
    match infer_inner(st, model, rec, client, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn infer_inner(
    st: Arc<AppState>,
    model: &str,
    rec: Arc<AccessRecord>,
    client: Option<IpAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = st.registry.get(model)?;
    let body = body.map_err(body_error)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // Request validation fails with DJL's 424 on these routes (djl_status).
    entry
        .sessions
        .check(&headers)
        .map_err(djl_status::validation)?;
    let mode = entry.stream_mode();
    let static_batch = mode == StreamMode::StaticBatch;
    // A stream is framed as server-sent events when the client or the
    // model's `option.output_formatter` asks; else as JSON lines.
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
        || entry.stream_formatter() == OutputFormatter::Sse;
    let req = match parse_any(content_type, &body, mode).map_err(djl_status::validation)? {
        Parsed::Lmi(req) => *req,
        Parsed::OpenAi(v, api) => {
            return crate::lmi_chat::answer(st, model, rec, v, api, sse).await
        }
        Parsed::Session(r) => {
            return entry
                .sessions
                .answer(r, &headers, client)
                .map_err(djl_status::validation)
        }
    };
    let engine = entry.engine()?;
    let prompts: Vec<Vec<u32>> = {
        let (engine, inputs) = (engine.clone(), req.inputs.clone());
        crate::cpu::run(move || {
            inputs
                .iter()
                .map(|t| generation::encode(&engine, t, true))
                .collect::<Result<_, _>>()
        })
        .await
        .map_err(djl_status::validation)?
    };
    rec.add_tokens_in(prompts.iter().map(Vec::len).sum());
    let timeout = st.config.request_timeout;
    if static_batch {
        // Every input submitted before any is read, so they run together.
        let jobs = prompts
            .into_iter()
            .map(|p| (p, req.params.clone()))
            .collect();
        let streams = generation::submit_all(&engine, jobs, timeout, false)
            .await
            .map_err(djl_status::validation)?;
        let events = streams.into_iter().map(Events::new).collect();
        return Ok(crate::lmi_outputs::response(events, rec));
    }
    if req.stream {
        let prompt = prompts.into_iter().next().unwrap_or_default();
        let stream =
            generation::submit_all(&engine, vec![(prompt, req.params.clone())], timeout, false)
                .await
                .map_err(djl_status::validation)?
                .pop()
                .ok_or_else(|| ApiError::model_failure("no request was submitted"))?;
        return Ok(crate::lmi_stream::response(
            Events::new(stream),
            req,
            sse,
            rec,
        ));
    }
    // Submit every prompt before waiting on any, so they are batched together.
    let prefill = req.details && req.decoder_input_details;
    let prefill_first_token = entry
        .properties
        .as_ref()
        .is_some_and(|p| p.prefill_first_token);
    let jobs = prompts
        .iter()
        .map(|p| (p.clone(), req.params.clone()))
        .collect();
    let streams = generation::submit_all(&engine, jobs, timeout, prefill)
        .await
        .map_err(djl_status::validation)?;
    let done = join_all(streams.into_iter().map(generation::complete)).await;
    rec.add_tokens_out(done.iter().map(|c| c.usage.completion_tokens).sum());
    if let Some(e) = done.iter().find_map(generation::failure) {
        return Err(djl_status::validation(e));
    }
    // Built and serialized off the async threads: `prefill` decodes every
    // prompt token, and a batch of long answers with details is megabytes.
    crate::cpu::json_answer(move || {
        let mut outputs =
            done.iter()
                .zip(req.inputs.iter().zip(&prompts))
                .map(|(c, (prompt, ids))| {
                    output_json(c, prompt, ids, &req, &engine, prefill_first_token)
                });
        Ok(if req.batch {
            Value::Array(outputs.collect())
        } else {
            outputs.next().unwrap_or(Value::Null)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(body: &str) -> String {
        parse(Some("application/json"), body.as_bytes())
            .unwrap_err()
            .message
    }

    #[test]
    fn accepts_the_lmi_reference_and_plain_bodies() {
        let r = parse(Some("application/json"), br#"{"inputs": "Hi", "parameters": {"max_new_tokens": 5, "do_sample": true, "temperature": 0.5, "stop_sequences": ["\n"]}}"#).unwrap();
        assert_eq!(
            (r.inputs.len(), r.batch, r.params.max_new_tokens),
            (1, false, 5)
        );
        assert_eq!(r.params.sampling.temperature, 0.5);
        assert_eq!(r.params.stop_strings, vec!["\n".to_string()]);

        let r = parse(None, br#"{"seq_length": 64, "text": ["a", "b"]}"#).unwrap();
        assert_eq!((r.inputs.len(), r.batch), (2, true));
        assert_eq!(
            (r.params.max_total_tokens, r.params.max_new_tokens),
            (Some(64), 64)
        );

        let r = parse(Some("text/plain"), b"Once upon a time").unwrap();
        assert_eq!(r.inputs, vec!["Once upon a time".to_string()]);
        assert_eq!(r.params.max_new_tokens, 30);
        assert_eq!(
            r.params.sampling.temperature, 0.0,
            "greedy unless do_sample"
        );
    }

    #[test]
    fn text_plain_is_a_prompt_whatever_its_first_character() {
        for body in ["[INST] Hello [/INST]", "\"Quoted,\" she said", "{not json"] {
            for ct in ["text/plain", "text/plain; charset=utf-8", "Text/Plain"] {
                let r = parse(Some(ct), body.as_bytes()).unwrap();
                assert_eq!(r.inputs, vec![body.to_string()], "{ct}");
            }
        }
        // Undeclared JSON is still JSON.
        let r = parse(None, br#"["a", "b"]"#).unwrap();
        assert_eq!(r.inputs.len(), 2);
        let r = parse(Some("application/json; charset=utf-8"), br#""x""#).unwrap();
        assert_eq!(r.inputs, vec!["x".to_string()]);
    }

    /// Like the OpenAI routes, at most 16 stop sequences.
    #[test]
    fn stop_sequences_are_capped() {
        let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let body = serde_json::json!({"inputs": "x", "parameters": {"stop_sequences": stops}});
        assert!(bad(&body.to_string()).contains("at most 16"));
        let body =
            serde_json::json!({"inputs": "x", "parameters": {"stop_sequences": &stops[..16]}});
        assert_eq!(
            parse(None, body.to_string().as_bytes())
                .unwrap()
                .params
                .stop_strings
                .len(),
            16
        );
    }

    #[test]
    fn malformed_bodies_name_the_problem() {
        assert!(bad("{not json").contains("invalid JSON"));
        assert!(bad(r#"{"inputs": 5}"#).contains("'inputs'"));
        assert!(bad(r#"{"inputs": []}"#).contains("empty"));
        assert!(bad(r#"{"inputs": ["a", 3]}"#).contains("list of strings"));
        assert!(bad(r#"{"prompt": "x"}"#).contains("expected 'inputs'"));
        assert!(bad(r#"{"inputs": "x", "parameters": 3}"#).contains("'parameters'"));
        assert!(
            bad(r#"{"inputs": "x", "parameters": {"max_new_tokens": 0}}"#)
                .contains("max_new_tokens")
        );
        assert!(
            bad(r#"{"inputs": "x", "parameters": {"max_new_tokens": -3}}"#)
                .contains("max_new_tokens")
        );
        assert!(
            bad(r#"{"inputs": "x", "parameters": {"temperature": -1}}"#).contains("temperature")
        );
        assert!(bad(r#"{"inputs": "x", "parameters": {"top_p": 0}}"#).contains("top_p"));
        assert!(
            bad(r#"{"inputs": "x", "parameters": {"stop_sequences": [1]}}"#)
                .contains("stop_sequences")
        );
        assert!(bad(r#"{"inputs": "x", "stream": "yes"}"#).contains("stream"));
        assert!(bad(r#"{"inputs": ["a", "b"], "stream": true}"#).contains("one input"));
        assert!(bad(r#"{"text": ["a"], "seq_length": 0}"#).contains("seq_length"));
        assert!(bad(r#"{"inputs": ""}"#).contains("empty"));
        assert!(bad("   ").contains("empty"));
        assert!(parse(None, &[0xff, 0xfe])
            .unwrap_err()
            .message
            .contains("UTF-8"));
    }

    const KEYS: &[&str] = &[
        "inputs",
        "parameters",
        "stream",
        "text",
        "seq_length",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "stop_sequences",
        "details",
        "return_full_text",
        "top_n_tokens",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
    ];

    /// Every LMI body, well-formed JSON of any shape or mutated bytes, is
    /// parsed to a request or a 400, never a panic.
    #[test]
    fn lmi_bodies_never_panic() {
        use kiln_model::fuzz::{cases, check_seeds, mutate, random_json, run_with};
        let seeds = [
            br#"{"inputs": "Hi", "parameters": {"max_new_tokens": 5, "do_sample": true, "temperature": 0.5, "stop_sequences": ["\n"]}}"#.to_vec(),
            br#"{"text": ["a", "b"], "seq_length": 64}"#.to_vec(),
            br#"["a", "b"]"#.to_vec(),
        ];
        // The seeds are requests (so their mutations start on the success
        // path), and a share of the cases must parse too: with the default
        // cases and seed 1318, 538 and 2083 of 3000 (no content type, JSON,
        // text) do; a quarter of the least is required.
        check_seeds("lmi seeds", &seeds, |body| {
            parse(Some("application/json"), body).is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for ct in [None, Some("application/json"), Some("text/plain")] {
            let name = format!("lmi bodies ({ct:?})");
            let r = run_with(
                &name,
                cases(3000),
                |rng, case| {
                    if case % 2 == 0 {
                        random_json(rng, KEYS, 4).to_string().into_bytes()
                    } else {
                        mutate(rng, &seeds[case % seeds.len()], 4096)
                    }
                },
                |body| parse(ct, body).is_ok(),
            )
            .and_then(|r| r.require_accepted(&name, 0.04))
            .unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{name}: {r:?}");
        }
    }
}
