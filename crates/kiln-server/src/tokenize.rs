//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes, so that
//! clients and routers written against vLLM can count and inspect tokens
//! with the served model's own tokenizer.
//!
//! - `/tokenize` takes `{"model"?, "prompt": str, "add_special_tokens"?
//!   (default true), "return_token_strs"?}` or, for a chat, `{"model"?,
//!   "messages": [...], "add_generation_prompt"? (default true),
//!   "add_special_tokens"? (default false: the template writes them),
//!   "return_token_strs"?}`, and answers `{"count", "max_model_len",
//!   "tokens", "token_strs"?}`.
//! - `/detokenize` takes `{"model"?, "tokens": [ids]}` and answers
//!   `{"prompt": text}`.
//!
//! Errors use OpenAI's shape, as on the other vLLM-compatible routes.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_engine::Engine;
use serde_json::json;

use crate::access::AccessRecord;
use crate::error::ApiError;
use crate::params::Fields;
use crate::state::AppState;

/// The engine of the request's `model` (or of the only model served).
fn engine_for(st: &AppState, f: &Fields, rec: &AccessRecord) -> Result<Engine, ApiError> {
    let model = match f.str("model")? {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => st.registry.only_model()?,
    };
    rec.set_model(&model);
    st.registry.engine(&model)
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_tokenize(st, rec, body)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

async fn run_tokenize(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = Arc::new(crate::body::json(body)?);
    let f = Fields::new(&v, "")?;
    let engine = engine_for(&st, &f, &rec)?;
    let token_strs = f.bool("return_token_strs")?.unwrap_or(false);
    let ids = {
        let (engine, v) = (engine.clone(), v.clone());
        crate::cpu::run(move || tokens_of(&engine, &Fields::new(&v, "")?)).await?
    };
    rec.add_tokens_in(ids.len());
    // A long prompt's answer is megabytes: built off the async threads.
    crate::cpu::json_answer(move || {
        let strs: Option<Vec<String>> = token_strs.then(|| {
            let tok = engine.tokenizer();
            ids.iter()
                .map(|&id| tok.id_to_token(id).unwrap_or_default())
                .collect()
        });
        let mut out = json!({
            "count": ids.len(),
            "max_model_len": engine.info().max_model_len,
            "tokens": ids,
        });
        if let Some(strs) = strs {
            out["token_strs"] = json!(strs);
        }
        Ok(out)
    })
    .await
}

/// The token ids of a tokenize request: a prompt, or chat messages rendered
/// with the model's template.
fn tokens_of(engine: &Engine, f: &Fields) -> Result<Vec<u32>, ApiError> {
    match (f.has("prompt"), f.has("messages")) {
        (true, true) => Err(ApiError::bad_request(
            "give either 'prompt' or 'messages', not both",
        )),
        (false, false) => Err(ApiError::bad_request("'prompt' or 'messages' is required")),
        (true, false) => {
            let prompt = f.str("prompt")?.unwrap_or_default();
            let special = f.bool("add_special_tokens")?.unwrap_or(true);
            crate::generation::encode(engine, prompt, special)
        }
        (false, true) => {
            if f.bool("continue_final_message")?.unwrap_or(false) {
                return Err(ApiError::bad_request(
                    "'continue_final_message' is not supported",
                ));
            }
            let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
            let special = f.bool("add_special_tokens")?.unwrap_or(false);
            let messages = crate::dialect::openai::chat_messages(f)?;
            let template = engine.chat_template().ok_or_else(|| {
                ApiError::bad_request("this model has no chat template; send 'prompt' instead")
            })?;
            let text = template
                .render(&messages, add_generation_prompt)
                .map_err(|e| {
                    ApiError::bad_request(format!("cannot apply the chat template: {e}"))
                })?;
            crate::generation::encode(engine, &text, special)
        }
    }
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_detokenize(st, rec, body)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

async fn run_detokenize(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = crate::body::json(body)?;
    let f = Fields::new(&v, "")?;
    let engine = engine_for(&st, &f, &rec)?;
    if !f.has("tokens") {
        return Err(ApiError::bad_request(
            "'tokens' (a list of token ids) is required",
        ));
    }
    let ids = f.ids("tokens")?;
    let vocab = engine.info().vocab_size;
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(format!(
            "token id {t} is outside the vocabulary of {vocab}"
        )));
    }
    let prompt = crate::cpu::run(move || {
        engine
            .tokenizer()
            .decode(&ids, false)
            .map_err(|e| ApiError::bad_request(format!("cannot decode the tokens: {e}")))
    })
    .await?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}
