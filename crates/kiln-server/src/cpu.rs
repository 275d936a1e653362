//! CPU-heavy request work (tokenization, chat templates) off the async
//! runtime's threads, so that a few huge prompts cannot stall `/ping` and the
//! other connections.
//!
//! The work runs on tokio's blocking pool, at most one job per CPU at a time
//! (more would only slow each other and the runtime's own threads); a job
//! keeps its place until it finishes, even when its client has gone.

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
