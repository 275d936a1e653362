//! LoRA adapters over HTTP: DJL's adapter management API, vLLM's
//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, the adapters a
//! model directory brings (`adapters/<name>/`, registered at start), and
//! how a request picks one (DJL's `"adapters"` field or SageMaker's
//! `X-Amzn-SageMaker-Adapter-Identifier` header on the LMI routes; an
//! adapter's name as the OpenAI `model`).
//!
//! DJL's routes (`/models/{model}/adapters…`):
//! - `POST ?name=&src=[&preload=&pin=]` registers (200 `{"status": "Adapter
//!   a1 registered"}`); DJL's `preload` (default true) reads the weights
//!   now rather than at the first request, `pin` (default false; implies
//!   preload) keeps them in memory, never evicted by `max_cpu_loras`;
//! - `POST /{adapter}/update[?src=&preload=&pin=]` reads it again (or from
//!   `src`); with only `pin`/`preload`, changes just those;
//! - `GET /{adapter}` describes it (`[{"name", "src", "pin", …}]`), `GET` lists
//!   them (`{"adapters": [...]}`, `limit` and `next_page_token` pages);
//! - `DELETE /{adapter}` unregisters it.
//!
//! An adapter's `src` must pass the same url policy as `POST /models`
//! (403 otherwise). A bad adapter (missing or malformed files, a rank over
//! `option.max_lora_rank`, a module the model lacks, shapes of another
//! model) is a 400 naming the cause, a taken name a 409, an unknown one a
//! 404; the model keeps serving.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::{AdapterError, AdapterInfo, AdapterOptions, Engine};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::{ModelEntry, Registry};
use crate::state::AppState;

/// SageMaker's header naming the adapter of an inference request.
pub const ADAPTER_HEADER: &str = "x-amzn-sagemaker-adapter-identifier";

/// Whether a request changes the adapters (guarded like model management).
pub fn is_mutating(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let path = path.trim_end_matches('/');
    let adapters = path
        .strip_prefix("/models/")
        .is_some_and(|rest| rest.contains("/adapters"));
    (adapters && (*method == Method::POST || *method == Method::DELETE))
        || (*method == Method::POST
            && matches!(path, "/v1/load_lora_adapter" | "/v1/unload_lora_adapter"))
}

fn status_of(e: &AdapterError) -> StatusCode {
    match e {
        AdapterError::Exists(_) => StatusCode::CONFLICT,
        AdapterError::NotFound(_) => StatusCode::NOT_FOUND,
        AdapterError::Disabled
        | AdapterError::InvalidName(_)
        | AdapterError::Load(_)
        | AdapterError::Device(_)
        | AdapterError::AllPinned { .. } => StatusCode::BAD_REQUEST,
    }
}

fn api_error(model: &str, e: AdapterError) -> ApiError {
    let msg = match &e {
        AdapterError::Disabled => format!("model '{model}': {e}"),
        _ => e.to_string(),
    };
    ApiError::new(status_of(&e), msg)
}

fn describe(a: &AdapterInfo) -> Value {
    json!({
        "name": a.name,
        "src": a.src.display().to_string(),
        "rank": a.rank,
        "loaded": a.loaded,
        "pin": a.pin,
    })
}

/// A model's ready engine.
fn engine(st: &AppState, model: &str) -> Result<Engine, ApiError> {
    st.registry.get(model)?.engine()
}

/// Runs a blocking adapter operation (it reads files) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AdapterError> + Send + 'static,
    model: String,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::model_failure(format!("adapter task failed: {e}")))?
        .map_err(|e| api_error(&model, e))
}

/// Checks `src` against the url policy and makes it a path.
fn source(st: &AppState, src: &str) -> Result<PathBuf, ApiError> {
    st.model_urls.check(src)?;
    crate::registry::local_path(src)
}

/// An optional boolean query parameter (`true`/`false`, any case).
fn flag(q: &HashMap<String, String>, key: &str) -> Result<Option<bool>, ApiError> {
    match q.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if v == "true" => Ok(Some(true)),
        Some(v) if v == "false" => Ok(Some(false)),
        Some(v) => Err(ApiError::bad_request(format!(
            "'{key}' must be true or false, got '{v}'"
        ))),
    }
}

fn query<'a>(q: &'a HashMap<String, String>, key: &str) -> Result<&'a str, ApiError> {
    q.get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("'{key}' is required")))
}

/// `POST /models/{model}/adapters?name=&src=[&preload=&pin=]`.
pub async fn register(
    State(st): State<Arc<AppState>>,
    UrlPath(model): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let name = query(&q, "name")?.to_string();
    let src = source(&st, query(&q, "src")?)?;
    let defaults = AdapterOptions::default();
    let opts = AdapterOptions {
        preload: flag(&q, "preload")?.unwrap_or(defaults.preload),
        pin: flag(&q, "pin")?.unwrap_or(defaults.pin),
    };
    let e = engine(&st, &model)?;
    let n = name.clone();
    blocking(move || e.register_adapter_with(&n, &src, opts), model).await?;
    Ok(Json(json!({"status": format!("Adapter {name} registered")})).into_response())
}

/// `POST /models/{model}/adapters/{adapter}/update[?src=&preload=&pin=]`:
/// read again (from `src` if given), or with only `pin`/`preload`, just
/// those changed.
pub async fn update(
    State(st): State<Arc<AppState>>,
    UrlPath((model, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let e = engine(&st, &model)?;
    let current = e
        .adapter(&name)
        .ok_or_else(|| api_error(&model, AdapterError::NotFound(name.clone())))?;
    let (pin, preload) = (flag(&q, "pin")?, flag(&q, "preload")?);
    let src = match q.get("src").filter(|s| !s.is_empty()) {
        Some(s) => Some(source(&st, s)?),
        None if pin.is_some() || preload.is_some() => None,
        None => Some(current.src),
    };
    let n = name.clone();
    blocking(
        move || e.update_adapter_with(&n, src.as_deref(), pin, preload),
        model,
    )
    .await?;
    Ok(Json(json!({"status": format!("Adapter {name} updated")})).into_response())
}

/// `GET /models/{model}/adapters/{adapter}`.
pub async fn describe_one(
    State(st): State<Arc<AppState>>,
    UrlPath((model, name)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let a = engine(&st, &model)?
        .adapter(&name)
        .ok_or_else(|| api_error(&model, AdapterError::NotFound(name)))?;
    Ok(Json(json!([describe(&a)])).into_response())
}

/// `DELETE /models/{model}/adapters/{adapter}`.
pub async fn unregister(
    State(st): State<Arc<AppState>>,
    UrlPath((model, name)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    engine(&st, &model)?
        .unregister_adapter(&name)
        .map_err(|e| api_error(&model, e))?;
    Ok(Json(json!({"status": format!("Adapter {name} unregistered")})).into_response())
}

/// `GET /models/{model}/adapters[?limit=&next_page_token=]`.
pub async fn list(
    State(st): State<Arc<AppState>>,
    UrlPath(model): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let num = |k: &str| -> Result<Option<usize>, ApiError> {
        q.get(k)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("'{k}' must be a whole number")))
            })
            .transpose()
    };
    let limit = num("limit")?.unwrap_or(100).clamp(1, 1000);
    let start = num("next_page_token")?.unwrap_or(0);
    let all = engine(&st, &model)?.adapters();
    let page: Vec<Value> = all.iter().skip(start).take(limit).map(describe).collect();
    let mut body = json!({"adapters": page});
    if start.saturating_add(limit) < all.len() {
        body["nextPageToken"] = Value::String((start + limit).to_string());
    }
    Ok(Json(body).into_response())
}

/// The model a vLLM adapter request is for: its `"model"` (kiln's
/// extension, for servers with several models) or the only model.
fn vllm_model(st: &AppState, v: &Value) -> Result<String, ApiError> {
    match v.get("model") {
        Some(Value::String(m)) => Ok(m.clone()),
        Some(other) => Err(ApiError::bad_request(format!(
            "'model' must be a string, got {other}"
        ))),
        None => st.registry.only_model(),
    }
}

fn vllm_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

fn vllm_str<'a>(v: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(ApiError::bad_request(format!(
            "'{key}' must be a non-empty string, got {other}"
        ))),
        None => Err(ApiError::bad_request(format!("'{key}' is required"))),
    }
}

/// `POST /v1/load_lora_adapter` (`{"lora_name", "lora_path"}`), vLLM's.
pub async fn vllm_load(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = async {
        let v = vllm_body(&body)?;
        let name = vllm_str(&v, "lora_name")?.to_string();
        let src = source(&st, vllm_str(&v, "lora_path")?)?;
        let model = vllm_model(&st, &v)?;
        let e = engine(&st, &model)?;
        let n = name.clone();
        blocking(move || e.register_adapter(&n, &src), model).await?;
        Ok::<_, ApiError>(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }
    .await;
    match r {
        Ok(text) => text.into_response(),
        Err(e) => e.openai().into_response(),
    }
}

/// `POST /v1/unload_lora_adapter` (`{"lora_name"}`), vLLM's.
pub async fn vllm_unload(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = (|| {
        let v = vllm_body(&body)?;
        let name = vllm_str(&v, "lora_name")?.to_string();
        let model = vllm_model(&st, &v)?;
        engine(&st, &model)?
            .unregister_adapter(&name)
            .map_err(|e| api_error(&model, e))?;
        Ok::<_, ApiError>(format!(
            "Success: LoRA adapter '{name}' removed successfully."
        ))
    })();
    match r {
        Ok(text) => text.into_response(),
        Err(e) => e.openai().into_response(),
    }
}

/// `/v1/models` entries of every adapter, each with its `parent` model
/// (vLLM's shape; `root` is the adapter's directory).
pub fn openai_models(registry: &Registry, created: impl Fn(&ModelEntry) -> u64) -> Vec<Value> {
    let mut out = Vec::new();
    for m in registry.all() {
        let Ok(e) = m.engine() else { continue };
        for a in e.adapters() {
            out.push(json!({
                "id": a.name,
                "object": "model",
                "created": created(&m),
                "owned_by": "kiln",
                "root": a.src.display().to_string(),
                "parent": m.name,
            }));
        }
    }
    out
}

/// The engine an LMI request runs on: `engine`, or its handle for the
/// adapter named by SageMaker's header or DJL's `"adapters"` field (a
/// name, or a list of names that are all the same). An unknown adapter is
/// a 400.
pub fn lmi_engine(engine: Engine, headers: &HeaderMap, body: &[u8]) -> Result<Engine, ApiError> {
    let from_header = headers
        .get(ADAPTER_HEADER)
        .map(|v| {
            v.to_str().map(str::to_string).map_err(|_| {
                ApiError::bad_request(format!("the {ADAPTER_HEADER} header is not text"))
            })
        })
        .transpose()?;
    let from_body = match serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("adapters").cloned())
    {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Array(list)) => {
            let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            match names.first() {
                Some(first) if names.len() == list.len() && names.iter().all(|n| n == first) => {
                    Some(first.to_string())
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "'adapters' must be an adapter name (or a list of the same name): \
                         kiln runs one request's inputs on one adapter",
                    ))
                }
            }
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'adapters' must be an adapter name, got {other}"
            )))
        }
    };
    let name = match (from_header, from_body) {
        (None, None) => return Ok(engine),
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::bad_request(format!(
                "the {ADAPTER_HEADER} header ('{h}') and 'adapters' ('{b}') differ"
            )))
        }
        (Some(n), _) | (None, Some(n)) => n,
    };
    if engine.adapter(&name).is_none() {
        return Err(ApiError::bad_request(format!(
            "adapter '{name}' is not registered"
        )));
    }
    Ok(engine.with_adapter(&name))
}
