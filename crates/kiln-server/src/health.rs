//! `GET /health` and `GET /health/ready`: the probes an orchestrator asks.
//!
//! Kubernetes restarts a container whose liveness probe fails and routes
//! traffic (and LLM routers such as the Gateway API Inference Extension pick
//! endpoints) only to pods whose readiness probe passes. So the two answer
//! different questions:
//! - `/health`: is the process serving HTTP? Always 200 while it answers,
//!   also while it drains after SIGTERM (restarting it then would cut the
//!   requests it is finishing).
//! - `/health/ready`: should it get new requests? 200 only when every
//!   registered model can serve; 503 naming each model that cannot (loading
//!   or failed), when no model is registered, or while the server drains.
//!   A model being registered through `POST /models` is the exception: the
//!   others serve meanwhile, so it is listed under `loading` but keeps
//!   nothing out of service (once loaded or failed it counts like the rest).
//!
//! DJL's `/ping` stays as it was (200 as long as one model serves).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::registry::ModelState;
use crate::state::AppState;

/// `GET /health`: liveness.
pub async fn live() -> Response {
    Json(json!({"status": "Healthy"})).into_response()
}

/// `GET /health/ready`: readiness (see the module docs).
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let (ready, not_ready, loading) = readiness(&st);
    if st.shutting_down.load(Ordering::SeqCst) {
        return unavailable(json!({
            "status": "Stopping",
            "error": "the server is shutting down and takes no new requests",
        }));
    }
    if ready.is_empty() && not_ready.is_empty() {
        if !loading.is_empty() {
            return unavailable(json!({
                "status": "Unready",
                "error": "no model can serve yet",
                "loading": loading,
            }));
        }
        return unavailable(json!({
            "status": "Unready",
            "error": "no model is registered",
        }));
    }
    if !not_ready.is_empty() {
        let names: Vec<&String> = not_ready.keys().collect();
        let error = format!(
            "not every model can serve: {}",
            names
                .iter()
                .map(|n| format!(
                    "'{n}' ({})",
                    not_ready[*n]["status"].as_str().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut body = json!({
            "status": "Unready",
            "error": error,
            "ready": ready,
            "not_ready": not_ready,
        });
        note_loading(&mut body, &loading);
        return unavailable(body);
    }
    let mut body = json!({"status": "Ready", "ready": ready});
    note_loading(&mut body, &loading);
    Json(body).into_response()
}

/// Names, under `loading`, the models still loading that keep nothing out
/// of service (those registered through `POST /models`), when there are any:
/// in `/health/ready` and `/ping` alike.
pub(crate) fn note_loading(body: &mut Value, loading: &[String]) {
    if !loading.is_empty() {
        body["loading"] = json!(loading);
    }
}

/// The models that can serve, those that cannot with their state and
/// reason, and those registered at run time that are still loading.
fn readiness(st: &AppState) -> (Vec<String>, Map<String, Value>, Vec<String>) {
    let mut ready = Vec::new();
    let mut not_ready = Map::new();
    let mut loading = Vec::new();
    for m in st.registry.all() {
        match m.state() {
            ModelState::Ready(_) => ready.push(m.name.clone()),
            ModelState::Loading if !m.loaded_at_startup => loading.push(m.name.clone()),
            ModelState::Loading => {
                not_ready.insert(m.name.clone(), json!({"status": "Loading"}));
            }
            ModelState::Failed(why) => {
                not_ready.insert(m.name.clone(), json!({"status": "Failed", "reason": why}));
            }
        }
    }
    (ready, not_ready, loading)
}

/// A 503 with `Retry-After`.
fn unavailable(body: Value) -> Response {
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}
