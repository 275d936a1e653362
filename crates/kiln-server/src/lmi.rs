//! The DJL Serving inference routes: `POST /predictions/{model}[/{version}]`,
//! `POST /invocations?model_name=`, `POST /models/{name}/invoke`.
//!
//! Bodies are read by the LMI dialect ([`crate::dialect::lmi`]); an OpenAI
//! body goes straight to the OpenAI answer ([`crate::openai::run_value`]),
//! for the model the route names, with the LMI routes' error codes
//! ([`crate::djl_status`]). Responses:
//! `{"generated_text", "details"?}` (a list for list input); streams as JSON
//! lines `{"token": {id, text, log_prob, logprob}}` whose last line also
//! carries `generated_text` (and `details`), or as server-sent events.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::future::join_all;
use serde_json::Value;

use crate::access::AccessRecord;
use crate::body::body_error;
use crate::dialect::lmi::{output_json, parse_any, Parsed, StreamMode};
use crate::djl_status;
use crate::error::ApiError;
use crate::funnel::with_prompt;
use crate::generation::{self, Events};
use crate::openai::Framing;
use crate::properties::OutputFormatter;
use crate::state::AppState;

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

async fn infer(
    st: Arc<AppState>,
    model: &str,
    rec: Arc<AccessRecord>,
    client: Option<IpAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    rec.set_model(model);
    if let Some(m) = st.embedders.get(model) {
        return crate::embeddings::lmi(m, rec, body).await;
    }
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
            // DJL's LMI handler answers these in OpenAI's shapes, its
            // streams as JSON lines unless the client or the model asks
            // for server-sent events.
            let framing = if sse {
                Framing::Sse
            } else {
                Framing::JsonLines
            };
            return crate::openai::run_value(st, rec, v, api, Some(model), framing)
                .await
                .map_err(djl_status::validation);
        }
        Parsed::Session(r) => {
            return entry
                .sessions
                .answer(r, &headers, client)
                .map_err(djl_status::validation)
        }
    };
    let engine = crate::adapters::lmi_engine(entry.engine()?, &headers, &body)
        .map_err(djl_status::validation)?;
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
            .map(|p| with_prompt(&req.params, p))
            .collect();
        let streams = generation::submit_all(&engine, jobs, timeout, false)
            .await
            .map_err(djl_status::validation)?;
        let events = streams.into_iter().map(Events::new).collect();
        return Ok(crate::lmi_outputs::response(events, rec));
    }
    if req.stream {
        let prompt = prompts.into_iter().next().unwrap_or_default();
        let stream = generation::submit_all(
            &engine,
            vec![with_prompt(&req.params, prompt)],
            timeout,
            false,
        )
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
        .map(|p| with_prompt(&req.params, p.clone()))
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
