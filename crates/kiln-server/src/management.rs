//! Health, metrics and the DJL management API: `GET /ping`,
//! `GET /server/metrics`, `GET /models`, `GET /models/{name}`,
//! `POST /models?url=…`, `PUT /models/{name}`, `DELETE /models/{name}`.
//!
//! # Safe by default
//!
//! The read-only routes are served wherever DJL serves them. The routes that
//! change what is served (`POST /models`, `PUT` and `DELETE /models/{name}`)
//! are served only where enabled: on the `--management-address` listener, on
//! the inference address when an API key is required there, or with
//! `--management-on-inference-port`; elsewhere they answer 403 naming these
//! options, and always 403 to a browser page from an origin that CORS does
//! not allow. `POST /models?url=` takes only urls that `--model-url-pattern`
//! matches, or by default paths inside the model store or kiln's cache;
//! a refusal says nothing about what exists outside them.

use std::collections::HashMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::registry::{ModelEntry, ModelState, Overrides};
use crate::state::AppState;

/// Which listener a request came in on (set per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The inference address (`--host` / `--port`).
    Inference,
    /// The `--management-address` listener.
    Management,
}

/// Whether a request changes what is served.
pub fn is_mutating(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let path = path.trim_end_matches('/');
    let one_model = path
        .strip_prefix("/models/")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
    (*method == Method::POST && path == "/models")
        || ((*method == Method::PUT || *method == Method::DELETE) && one_model)
        || crate::adapters::is_mutating(method, path)
}

/// Refuses the routes that change what is served where they are not
/// enabled (see the module docs).
pub async fn guard(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !is_mutating(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed = st
            .config
            .cors_origins
            .iter()
            .any(|o| o == "*" || origin.as_bytes() == o.as_bytes());
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "model management is not allowed from this origin (see --cors-origin)",
            )
            .into_response();
        }
    }
    let on_management = req.extensions().get::<Listener>() == Some(&Listener::Management);
    if on_management || !st.config.api_keys.is_empty() || st.config.management_on_inference_port {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::FORBIDDEN,
        "changing the served models is disabled on this address; enable it with \
         --management-address HOST:PORT (a separate listener), with --api-key (then \
         callers need the key), or with --management-on-inference-port",
    )
    .into_response()
}

/// Which urls `POST /models?url=` may register.
#[derive(Debug)]
pub struct UrlPolicy {
    /// `--model-url-pattern`, matched against the whole url.
    pattern: Option<regex::Regex>,
    /// Otherwise: directories the url's path must be inside.
    roots: Vec<PathBuf>,
}

impl UrlPolicy {
    /// The policy of `--model-url-pattern` (anchored at both ends), or, when
    /// it is unset, of the model store and kiln's cache.
    pub fn new(pattern: Option<&str>, model_store: Option<&FsPath>) -> anyhow::Result<Self> {
        let pattern = pattern
            .map(|p| {
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| anyhow::anyhow!("--model-url-pattern '{p}': {e}"))
            })
            .transpose()?;
        let mut roots = Vec::new();
        for dir in model_store
            .map(FsPath::to_path_buf)
            .into_iter()
            .chain([kiln_model::default_model::cache_dir()])
        {
            let abs = std::fs::canonicalize(&dir)
                .or_else(|_| std::path::absolute(&dir))
                .unwrap_or(dir);
            roots.push(lexical(&abs));
        }
        Ok(Self { pattern, roots })
    }

    /// Refuses a url the policy does not allow (403), without saying
    /// anything about what exists at it.
    pub fn check(&self, url: &str) -> Result<(), ApiError> {
        if let Some(re) = &self.pattern {
            if re.is_match(url) {
                return Ok(());
            }
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("model url '{url}' does not match --model-url-pattern"),
            ));
        }
        let refuse = || {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "model url '{url}' is not inside the model store or kiln's cache; \
                     allow other urls with --model-url-pattern REGEX"
                ),
            )
        };
        // Remote urls are allowed only by --model-url-pattern.
        let crate::registry::ModelUrl::Local(path) = crate::registry::model_url(url)? else {
            return Err(refuse());
        };
        let abs = std::path::absolute(&path).map_err(|_| refuse())?;
        let inside = |p: &FsPath| self.roots.iter().any(|r| p.starts_with(r));
        if !inside(&lexical(&abs)) {
            return Err(refuse());
        }
        // A link inside that leads outside is outside.
        if let Ok(real) = std::fs::canonicalize(&abs) {
            if !inside(&real) {
                return Err(refuse());
            }
        }
        Ok(())
    }
}

/// `path` with `.` and `..` resolved without touching the file system.
fn lexical(path: &FsPath) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `GET /ping`, the health check:
/// - 503 (`Loading`, naming them) while any model registered at start-up is
///   still loading;
/// - 500 (`Unhealthy`) when models are registered and every one has failed;
/// - otherwise 200 (`Healthy`): a model that failed to load is reported under
///   `failed` but does not take the working ones out of service, and one
///   being registered through `POST /models` is reported under `loading`
///   (DJL answers 200 while such a model is pending, its `ModelManager.
///   workerStatus` and `InferenceRequestHandler` ping: `hasPending` is not
///   a failure).
pub async fn ping(State(st): State<Arc<AppState>>) -> Response {
    let mut loading = Vec::new();
    let mut starting = false;
    let mut ready = 0;
    let mut failed = serde_json::Map::new();
    for m in st.registry.all() {
        match m.state() {
            ModelState::Loading => {
                starting |= m.loaded_at_startup;
                loading.push(m.name.clone());
            }
            ModelState::Failed(msg) => {
                failed.insert(m.name.clone(), Value::String(msg));
            }
            ModelState::Ready(_) => ready += 1,
        }
    }
    if starting {
        let mut body = json!({"status": "Loading", "loading": loading});
        if !failed.is_empty() {
            body["failed"] = Value::Object(failed);
        }
        return ApiResponse::unavailable(body);
    }
    if ready == 0 && !failed.is_empty() {
        let mut body = json!({"status": "Unhealthy", "failed": failed});
        crate::health::note_loading(&mut body, &loading);
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
    }
    let mut body = json!({"status": "Healthy"});
    crate::health::note_loading(&mut body, &loading);
    if !failed.is_empty() {
        body["failed"] = Value::Object(failed);
    }
    Json(body).into_response()
}

/// A 503 with `Retry-After`, for a body that is not an error message.
struct ApiResponse;

impl ApiResponse {
    fn unavailable(body: Value) -> Response {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        r
    }
}

/// `GET /server/metrics`.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::prom::render(&st),
    )
        .into_response()
}

fn query_usize(q: &HashMap<String, String>, key: &str) -> Result<Option<usize>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!(
                    "query parameter '{key}' must be a non-negative integer, got '{v}'"
                ))
            })
        })
        .transpose()
}

fn query_bool(q: &HashMap<String, String>, key: &str) -> Result<Option<bool>, ApiError> {
    q.get(key)
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(ApiError::bad_request(format!(
                "query parameter '{key}' must be true or false, got '{v}'"
            ))),
        })
        .transpose()
}

/// `GET /models?limit=&next_page_token=`.
pub async fn list(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = query_usize(&q, "limit")?.unwrap_or(100).clamp(1, 1000);
    let start = query_usize(&q, "next_page_token")?.unwrap_or(0);
    let mut all: Vec<(String, Value)> = st
        .registry
        .all()
        .iter()
        .map(|m| {
            let row = json!({"modelName": m.name, "modelUrl": m.url, "status": m.state().label()});
            (m.name.clone(), row)
        })
        .collect();
    // Embedding models and rerankers are listed with the engines, by name.
    all.extend(crate::encoder_models::list_rows(&st));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|r| r.1.clone())
        .collect();
    let mut body = json!({"models": page});
    if start + limit < all.len() {
        body["nextPageToken"] = Value::String((start + limit).to_string());
    }
    Ok(Json(body).into_response())
}

/// A model as DJL's `GET /models/{name}` describes it: one workflow of the
/// model's name holding the model, whose worker group is kiln's one engine.
/// kiln's own fields (path, properties, warnings, engine figures) sit
/// inside the model object, beside DJL's.
fn describe_json(m: &ModelEntry) -> Value {
    let s = m.settings.lock().map(|s| s.clone()).ok();
    let state = m.state();
    let started = m
        .registered_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let worker_status = match state {
        ModelState::Ready(_) => "READY",
        ModelState::Loading => "STARTING",
        ModelState::Failed(_) => "FAILED",
    };
    let mut d = json!({
        "modelName": m.name,
        "modelUrl": m.url,
        "modelPath": m.model_path.display().to_string(),
        "engineType": "kiln",
        "status": state.label(),
        "batchSize": s.as_ref().map(|s| s.batch_size),
        "maxBatchDelay": s.as_ref().map(|s| s.max_batch_delay_ms),
        // kiln never retries a request on another worker.
        "maxRetryTimeout": 0,
        "queueSize": s.as_ref().map(|s| s.job_queue_size),
        "jobQueueSize": s.as_ref().map(|s| s.job_queue_size),
        "requestInQueue": 0,
        "loadedAtStartup": m.loaded_at_startup,
        "workerGroups": [{
            "device": {"deviceType": "cpu", "deviceId": -1},
            "minWorkers": s.as_ref().map(|s| s.min_workers),
            "maxWorkers": s.as_ref().map(|s| s.max_workers),
            "workers": [{
                "id": 1,
                "startTime": kiln_model::chat::format_utc(started, "%Y-%m-%dT%H:%M:%SZ"),
                "status": worker_status,
            }],
        }],
    });
    if let Some(p) = &m.properties {
        d["properties"] = json!(p.raw);
        if !p.warnings.is_empty() {
            d["warnings"] = json!(p.warnings);
        }
    }
    match state {
        ModelState::Ready(e) => {
            let info = e.info();
            let mt = e.metrics();
            d["requestInQueue"] = json!(mt.waiting);
            d["requestInFlight"] = json!(mt.running);
            d["kiln"] = json!({
                "backend": info.backend,
                "maxRollingBatchSize": info.max_running,
                "maxRollingBatchPrefillTokens": info.max_step_tokens,
                "maxModelLen": info.max_model_len,
                "kvCache": {"blocks": info.kv_blocks, "blockSize": info.block_size, "tokens": info.kv_tokens,
                    "bytes": info.kv_bytes, "blocksUsed": mt.kv_blocks_used,
                    "prefixCacheHitTokens": mt.prefix_hit_tokens, "prefixCacheQueriedTokens": mt.prefix_queried_tokens},
                "promptTokens": mt.prompt_tokens,
                "generatedTokens": mt.generated_tokens,
                "requestsFinished": mt.requests_finished,
            });
        }
        ModelState::Failed(msg) => d["error"] = json!(msg),
        ModelState::Loading => {}
    }
    json!({"workflowName": m.name, "version": Value::Null, "models": [d]})
}

/// `GET /models/{name}`: a one-element list, as DJL answers.
pub async fn describe(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(d) = crate::encoder_models::describe(&st, &name) {
        return Ok(Json(json!([d])).into_response());
    }
    let m = st.registry.get(&name)?;
    Ok(Json(json!([describe_json(&m)])).into_response())
}

/// The name a model registered from `url` gets when `model_name` is not
/// given: the file stem of a local path, the last segment of an `s3://`
/// prefix or of a Hub id.
fn default_model_name(url: &str) -> Result<String, ApiError> {
    let stem = match crate::registry::model_url(url)? {
        crate::registry::ModelUrl::Local(path) => {
            path.file_stem().and_then(|s| s.to_str()).map(String::from)
        }
        crate::registry::ModelUrl::Remote(source) => match source {
            kiln_sources::Source::S3 { bucket, prefix } => Some(
                prefix
                    .rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(&bucket)
                    .to_string(),
            ),
            kiln_sources::Source::Hub { repo, .. } => repo.rsplit('/').next().map(String::from),
        },
    };
    stem.ok_or_else(|| {
        ApiError::bad_request("cannot derive a model name from 'url': give 'model_name'")
    })
}

/// `POST /models?url=&model_name=&batch_size=&max_batch_delay=&job_queue_size=&min_worker=&max_worker=&synchronous=`.
pub async fn register(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let url = q.get("url").filter(|u| !u.is_empty()).ok_or_else(|| {
        ApiError::bad_request("query parameter 'url' (a model directory or file) is required")
    })?;
    st.model_urls.check(url)?;
    let name = match q.get("model_name") {
        Some(n) => n.clone(),
        None => default_model_name(url)?,
    };
    let overrides = Overrides {
        batch_size: query_usize(&q, "batch_size")?,
        max_batch_delay_ms: query_usize(&q, "max_batch_delay")?.map(|v| v as u64),
        job_queue_size: query_usize(&q, "job_queue_size")?,
        min_workers: query_usize(&q, "min_worker")?,
        max_workers: query_usize(&q, "max_worker")?,
        allow_duplicate: query_bool(&q, "allow_duplicate")?.unwrap_or(false),
        check_memory: true,
        at_run_time: true,
    };
    let synchronous = query_bool(&q, "synchronous")?.unwrap_or(true);
    if let Some(r) = crate::encoder_models::register(&st, &name, url, synchronous).await {
        return r;
    }
    crate::encoder_models::check_free(&st, &name)?;
    let entry = st.registry.register(&name, url, overrides)?;
    if !synchronous {
        let body = json!({"status": format!("Model \"{name}\" registration scheduled.")});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    match entry.wait_loaded().await {
        ModelState::Ready(_) => {
            Ok(Json(json!({"status": format!("Model \"{name}\" registered.")})).into_response())
        }
        ModelState::Failed(msg) => {
            // A synchronous registration that failed leaves nothing behind, so it can be retried.
            let _ = st.registry.unregister(&name).await;
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("model '{name}' failed to load: {msg}"),
            ))
        }
        ModelState::Loading => Err(ApiError::unavailable(format!(
            "model '{name}' is still loading"
        ))),
    }
}

/// `PUT /models/{name}?min_worker=&max_worker=`: kiln runs one engine per
/// model, which batches continuously; worker counts are validated and
/// recorded but do not start more engines.
pub async fn scale(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let m = st.registry.get(&name)?;
    let min = query_usize(&q, "min_worker")?;
    let max = query_usize(&q, "max_worker")?;
    let mut s = m
        .settings
        .lock()
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "settings lock poisoned"))?;
    let (new_min, new_max) = (min.unwrap_or(s.min_workers), max.unwrap_or(s.max_workers));
    if new_min > new_max {
        return Err(ApiError::bad_request(format!(
            "min_worker {new_min} is more than max_worker {new_max}"
        )));
    }
    s.min_workers = new_min;
    s.max_workers = new_max;
    Ok(Json(json!({
        "status": format!("Model \"{name}\" worker settings updated (min {new_min}, max {new_max})."),
        "note": "kiln serves each model with one engine that batches requests continuously; worker counts are recorded but do not change the number of engines.",
    }))
    .into_response())
}

/// `DELETE /models/{name}`: stops taking requests, lets in-flight ones finish, then unloads.
pub async fn unregister(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if !crate::encoder_models::unregister(&st, &name) {
        st.registry.unregister(&name).await?;
    }
    Ok(Json(json!({"status": format!("Model \"{name}\" unregistered")})).into_response())
}
