//! CPU-heavy request work off the async runtime's threads, so that a few
//! huge prompts or grammars cannot stall `/ping` and the other connections.
//! Separate pools, so that one kind of work never waits behind another:
//!
//! - [`run`]: tokenization and chat templates, on tokio's blocking pool, at
//!   most one job per CPU at a time (more would only slow each other and the
//!   runtime's own threads); a job keeps its place until it finishes, even
//!   when its client has gone (these jobs are bounded by the body size).
//! - [`compile`]: output constraints (JSON schemas, regexes, grammars), whose
//!   compile time grows faster than their size. Each is limited in size and
//!   in time ([`CompileLimits`]); at most `concurrent` run at once, and a
//!   request that cannot get a place within twice the time limit (time for
//!   the compiles ahead of it to end) gets a 503. A
//!   compile is stopped when its time is up or its client goes away, and
//!   its place is given to the next request at once. llguidance cannot
//!   interrupt the middle of a compile, so a stopped compile's thread may
//!   run on for as long as its size allows (seconds at the default size
//!   limit); compiling threads, stopped ones included, number at most
//!   twice `concurrent`, and new compiles wait for one to end past that.
//!   Small constraints (at most [`SMALL_CONSTRAINT_BYTES`], the usual tool
//!   and response schemas) also have a place of their own, so that slow
//!   large grammars filling every shared place cannot starve them.
//! - [`json_answer`]: large non-streamed answers, built and serialized on
//!   tokio's blocking pool without waiting for a place in [`run`].

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use kiln_engine::{CompileCancel, CompileError, Compiled, Constraint, Engine};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::ApiError;

fn permits() -> Arc<Semaphore> {
    static LIMIT: OnceLock<Arc<Semaphore>> = OnceLock::new();
    LIMIT
        .get_or_init(|| Arc::new(Semaphore::new(cpus())))
        .clone()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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

/// Limits on compiling output constraints (`kiln serve
/// --max-constraint-bytes`, `--constraint-compile-timeout`,
/// `--constraint-compiles`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompileLimits {
    /// Largest constraint, in bytes of text (a grammar, a regex, a JSON
    /// schema as JSON, the choices together); a larger one is a 400 at once.
    pub max_bytes: usize,
    /// Longest a compile may take (a 400 past it); a request waits at most
    /// twice as long for a place to compile (a 503 past it).
    pub timeout: Duration,
    /// Compiles that run at once.
    pub concurrent: usize,
}

/// Default [`CompileLimits::max_bytes`]: room for large tool and response
/// schemas (OpenAI caps a schema's strings at 120,000 characters), while
/// the slowest grammar of this size compiles in a few seconds.
pub const DEFAULT_MAX_CONSTRAINT_BYTES: usize = 128 << 10;
/// Default [`CompileLimits::timeout`].
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(10);
/// Constraints up to this size may also compile in the small lane's own
/// place. Compile time grows with size, so a constraint this small
/// compiles in milliseconds and the lane's place is never held for long.
pub const SMALL_CONSTRAINT_BYTES: usize = 8 << 10;

impl Default for CompileLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_CONSTRAINT_BYTES,
            timeout: DEFAULT_COMPILE_TIMEOUT,
            // Half the CPUs: the other half stays for the model and the
            // tokenization pool.
            concurrent: (cpus() / 2).max(1),
        }
    }
}

struct CompilePool {
    limits: CompileLimits,
    /// Places to compile: held by a request while it waits for its result.
    places: Arc<Semaphore>,
    /// Compiling threads: held by the thread until it really ends, so that
    /// stopped compiles still running count too.
    threads: Arc<Semaphore>,
    /// The small lane's one place (and thread): taken by a small constraint
    /// when it frees up before a shared place does.
    small: Arc<Semaphore>,
}

impl CompilePool {
    fn new(limits: CompileLimits) -> Self {
        let n = limits.concurrent.max(1);
        Self {
            places: Arc::new(Semaphore::new(n)),
            threads: Arc::new(Semaphore::new(2 * n)),
            small: Arc::new(Semaphore::new(1)),
            limits,
        }
    }
}

fn pool_slot() -> &'static Mutex<Option<Arc<CompilePool>>> {
    static POOL: OnceLock<Mutex<Option<Arc<CompilePool>>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(None))
}

/// Sets the limits of [`compile`] (at server start; compiles already
/// running keep the old pool).
pub fn set_compile_limits(limits: CompileLimits) {
    let mut p = pool_slot().lock().unwrap_or_else(|e| e.into_inner());
    *p = Some(Arc::new(CompilePool::new(limits)));
}

fn compile_pool() -> Arc<CompilePool> {
    let mut p = pool_slot().lock().unwrap_or_else(|e| e.into_inner());
    p.get_or_insert_with(|| Arc::new(CompilePool::new(CompileLimits::default())))
        .clone()
}

/// Stops the compile if the request goes away before its result (the
/// future holding it is dropped when the client disconnects).
struct StopIfAbandoned(Option<CompileCancel>);

impl Drop for StopIfAbandoned {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
            tracing::info!("stopped compiling a constraint: its client went away");
        }
    }
}

/// Compiles `c` for `engine`'s model within the [`CompileLimits`]: 400 for
/// a constraint that is too large, invalid or too slow to compile, 503
/// when no place to compile frees up in time.
pub async fn compile(engine: &Engine, c: &Constraint) -> Result<Compiled, ApiError> {
    let pool = compile_pool();
    let lim = &pool.limits;
    let bytes = c.source_len();
    if bytes > lim.max_bytes {
        return Err(ApiError::bad_request(format!(
            "the constraint is {bytes} bytes; the limit is {} (--max-constraint-bytes)",
            lim.max_bytes
        )));
    }
    let guide = match engine.guide_if_built() {
        Some(g) => g?.clone(),
        // The first constrained request builds the token trie (a pass over
        // the vocabulary), off the async threads and outside the budget.
        None => {
            let engine = engine.clone();
            run(move || Ok(engine.guide()?.clone())).await?
        }
    };
    let secs = lim.timeout.as_secs_f64();
    let busy = || {
        ApiError::unavailable(format!(
            "no place to compile the constraint freed up within {} s (at most {} compile at once); try again",
            2.0 * secs,
            lim.concurrent
        ))
    };
    let deadline = Instant::now() + 2 * lim.timeout;
    // `place` is held until the result comes (or the time is up); `thread`
    // until the compiling thread ends. The small lane's one permit is both.
    let shared = async {
        let place = pool.places.clone().acquire_owned().await?;
        let thread = pool.threads.clone().acquire_owned().await?;
        Ok::<_, tokio::sync::AcquireError>((Some(place), thread))
    };
    let acquire = async {
        if bytes <= SMALL_CONSTRAINT_BYTES {
            tokio::select! {
                small = pool.small.clone().acquire_owned() => small.map(|t| (None, t)),
                shared = shared => shared,
            }
        } else {
            shared.await
        }
    };
    let (place, thread) = tokio::time::timeout_at(deadline, acquire)
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let cancel = CompileCancel::default();
    let mut abandoned = StopIfAbandoned(Some(cancel.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = guide.compile_in_background(c.clone(), cancel.clone(), move |r| {
        let _ = tx.send(r);
        drop(thread);
    });
    let result = match started {
        Ok(()) => tokio::time::timeout(lim.timeout, rx).await,
        Err(e) => Ok(Ok(Err(e))),
    };
    abandoned.0 = None;
    drop(place);
    match result {
        Ok(Ok(Ok(compiled))) => Ok(compiled),
        Ok(Ok(Err(e @ CompileError::Invalid(_)))) => Err(ApiError::bad_request(e.to_string())),
        Ok(Ok(Err(e @ CompileError::Thread(_)))) => Err(ApiError::unavailable(e.to_string())),
        Ok(Ok(Err(CompileError::Cancelled))) | Ok(Err(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "compiling the constraint ended without a result",
        )),
        Err(_) => {
            cancel.cancel();
            tracing::warn!(
                bytes,
                "stopped compiling a constraint after {secs} s (--constraint-compile-timeout)"
            );
            Err(ApiError::bad_request(format!(
                "the constraint took longer than {secs} s to compile (--constraint-compile-timeout); \
                 give a smaller or simpler one"
            )))
        }
    }
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
