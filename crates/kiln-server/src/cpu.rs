//! CPU-heavy request work (tokenization, chat templates) off the async
//! runtime's threads, so that a few huge prompts cannot stall `/ping` and the
//! other connections.
//!
//! The work runs on tokio's blocking pool, at most one job per CPU at a time
//! (more would only slow each other and the runtime's own threads); a job
//! keeps its place until it finishes, even when its client has gone.
//!
//! Large non-streamed answers are built and serialized there too
//! ([`json_answer`]).

use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use tokio::sync::Semaphore;

use crate::error::ApiError;

fn permits() -> Arc<Semaphore> {
    static LIMIT: OnceLock<Arc<Semaphore>> = OnceLock::new();
    LIMIT
        .get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            Arc::new(Semaphore::new(n))
        })
        .clone()
}

/// Runs `job` on the blocking pool, waiting for a free place first.
pub async fn run<T, F>(job: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let permit = permits()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        job()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("preparing the request failed: {e}"),
        )
    })?
}

/// Builds a JSON answer off the async threads: `job` makes the value (which
/// may look up the text of every token and its alternatives), and it is
/// serialized and dropped there too, so a many-megabyte answer (`n: 16`
/// with `top_logprobs`) cannot stall `/ping` and the other connections.
///
/// It runs on tokio's blocking pool without waiting for a place beside
/// request preparation ([`run`]): the generation is paid for already, and
/// the number of answers being built is bounded by the engines' batches.
pub async fn json_answer<F>(job: F) -> Result<axum::response::Response, ApiError>
where
    F: FnOnce() -> Result<serde_json::Value, ApiError> + Send + 'static,
{
    use axum::response::IntoResponse;
    let bytes = tokio::task::spawn_blocking(move || {
        let value = job()?;
        serde_json::to_vec(&value).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the answer: {e}"),
            )
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("building the answer failed: {e}"),
        )
    })??;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response())
}
