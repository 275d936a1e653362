//! Embedding models and rerankers in the model lists and the management
//! API, as DJL shows every model it serves: `GET /v1/models`, `GET /models`
//! and `GET /models/{name}` list and describe them; `POST /models?url=`
//! loads one at run time (a directory that [`crate::rerank::claims`] or
//! [`crate::embeddings::claims`]); `DELETE /models/{name}` removes it
//! (requests holding it finish first).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::embeddings::Embedder;
use crate::encoder_pool::{EncoderStats, PoolEntry};
use crate::error::ApiError;
use crate::rerank::Reranker;
use crate::state::AppState;

/// What the lists say about one served encoder.
struct Row<'a> {
    name: &'a str,
    url: &'a str,
    registered_at: SystemTime,
    stats: &'a EncoderStats,
    /// DJL's `option.task` for it.
    task: &'static str,
    /// Embedding size, or `None` for a reranker.
    dim: Option<usize>,
}

fn row_of_embedder(e: &PoolEntry<Embedder>) -> Row<'_> {
    Row {
        name: &e.name,
        url: &e.url,
        registered_at: e.registered_at,
        stats: &e.stats,
        task: "text_embedding",
        dim: Some(e.model.model.dim()),
    }
}

fn row_of_reranker(e: &PoolEntry<Reranker>) -> Row<'_> {
    Row {
        name: &e.name,
        url: &e.url,
        registered_at: e.registered_at,
        stats: &e.stats,
        task: "text_classification",
        dim: None,
    }
}

/// Calls `f` on every served encoder, sorted by name.
fn each<T>(st: &AppState, mut f: impl FnMut(&Row) -> T) -> Vec<(String, T)> {
    let embedders = st.embedders.all();
    let rerankers = st.rerankers.all();
    let mut out: Vec<(String, T)> = embedders
        .iter()
        .map(|e| row_of_embedder(e))
        .chain(rerankers.iter().map(|e| row_of_reranker(e)))
        .map(|r| (r.name.to_string(), f(&r)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn created(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `/v1/models` entries of the served encoders, by name.
pub fn openai_entries(st: &AppState) -> Vec<(String, Value)> {
    each(st, |r| {
        json!({"id": r.name, "object": "model", "created": created(r.registered_at),
               "owned_by": "kiln"})
    })
}

/// `GET /models` rows of the served encoders (always loaded: `Healthy`), by name.
pub fn list_rows(st: &AppState) -> Vec<(String, Value)> {
    each(
        st,
        |r| json!({"modelName": r.name, "modelUrl": r.url, "status": "Healthy"}),
    )
}

/// `GET /models/{name}` for a served encoder: DJL's workflow shape, with
/// the request counts, or `None` when no encoder has that name.
pub fn describe(st: &AppState, name: &str) -> Option<Value> {
    let e = st.embedders.get(name);
    let r = st.rerankers.get(name);
    let row = match (&e, &r) {
        (Some(e), _) => row_of_embedder(e),
        (None, Some(r)) => row_of_reranker(r),
        (None, None) => return None,
    };
    let s = row.stats;
    let start = kiln_model::chat::format_utc(created(row.registered_at), "%Y-%m-%dT%H:%M:%SZ");
    let d = json!({
        "modelName": row.name,
        "modelUrl": row.url,
        "engineType": "kiln",
        "status": "Healthy",
        "requestInQueue": s.waiting.load(Ordering::SeqCst),
        "requestInFlight": s.running.load(Ordering::SeqCst),
        "workerGroups": [{
            "device": {"deviceType": "cpu", "deviceId": -1},
            "minWorkers": 1,
            "maxWorkers": 1,
            "workers": [{"id": 1, "startTime": start, "status": "READY"}],
        }],
        "kiln": {
            "task": row.task,
            "dimensions": row.dim,
            "requestsFinished": s.finished.load(Ordering::SeqCst),
            "requestsCancelled": s.cancelled.load(Ordering::SeqCst),
            "inputsComputed": s.inputs.load(Ordering::SeqCst),
        },
    });
    Some(json!({"workflowName": row.name, "version": Value::Null, "models": [d]}))
}

/// A 409 when an encoder already has `name` (checked before a generation
/// model is registered under it).
pub fn check_free(st: &AppState, name: &str) -> Result<(), ApiError> {
    if st.embedders.get(name).is_some() || st.rerankers.get(name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("model '{name}' is already registered"),
        ));
    }
    Ok(())
}

/// Which pool a directory's model goes to, if it is an encoder.
#[derive(Clone, Copy)]
enum Kind {
    Embedding,
    Rerank,
}

fn kind_of(url: &str) -> Option<Kind> {
    if crate::rerank::claims(url) {
        Some(Kind::Rerank)
    } else if crate::embeddings::claims(url) {
        Some(Kind::Embedding)
    } else {
        None
    }
}

fn load(st: &AppState, kind: Kind, name: &str, url: &str) -> Result<(), String> {
    match kind {
        Kind::Embedding => st.embedders.load(name, url),
        Kind::Rerank => st.rerankers.load(name, url),
    }
}

/// `POST /models?url=` for an encoder directory: loads it (on a blocking
/// thread) and answers as DJL does; `None` when `url` is not an encoder,
/// for the registry to take. With `synchronous=false` the answer is 202
/// and a load that fails is reported under the name as a failed model.
pub async fn register(
    st: &Arc<AppState>,
    name: &str,
    url: &str,
    synchronous: bool,
) -> Option<Result<Response, ApiError>> {
    let kind = kind_of(url)?;
    Some(register_kind(st, kind, name, url, synchronous).await)
}

async fn register_kind(
    st: &Arc<AppState>,
    kind: Kind,
    name: &str,
    url: &str,
    synchronous: bool,
) -> Result<Response, ApiError> {
    if !crate::registry::valid_model_name(name) {
        return Err(ApiError::bad_request(format!(
            "model name '{name}' must be 1-128 characters of letters, digits, '_', '-' and '.'"
        )));
    }
    check_free(st, name)?;
    if st.registry.get(name).is_ok() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("model '{name}' is already registered"),
        ));
    }
    let (st2, n, u) = (st.clone(), name.to_string(), url.to_string());
    let job = tokio::task::spawn_blocking(move || {
        let r = load(&st2, kind, &n, &u);
        if let Err(msg) = &r {
            tracing::error!(model = %n, "cannot serve '{n}' ({u}): {msg}");
        }
        r
    });
    if !synchronous {
        let (st3, n, u) = (st.clone(), name.to_string(), url.to_string());
        tokio::spawn(async move {
            if let Ok(Err(msg)) = job.await {
                let _ = st3.registry.register_failed(&n, &u, &msg);
            }
        });
        let body = json!({"status": format!("Model \"{name}\" registration scheduled.")});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    match job.await {
        Ok(Ok(())) => {
            tracing::info!(model = %name, url, "registered encoder");
            Ok(Json(json!({"status": format!("Model \"{name}\" registered.")})).into_response())
        }
        Ok(Err(msg)) => Err(ApiError::bad_request(format!(
            "model '{name}' failed to load: {msg}"
        ))),
        Err(e) => Err(ApiError::model_failure(format!(
            "model '{name}' failed to load: {e}"
        ))),
    }
}

/// `DELETE /models/{name}` for an encoder: `true` when one was removed.
pub fn unregister(st: &AppState, name: &str) -> bool {
    st.embedders.remove(name).is_some() || st.rerankers.remove(name).is_some()
}
