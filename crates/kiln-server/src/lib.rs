//! kiln-server: the HTTP face of kiln.
//!
//! It speaks DJL Serving's inference and management routes (so existing
//! model stores, `serving.properties` files and clients move over unchanged)
//! and the OpenAI API, on top of one [`kiln_engine::Engine`] per model.
//!
//! - [`properties`] and [`store`]: the model store and its `serving.properties`;
//! - [`registry`]: registered models, loading and unloading;
//! - [`lmi`], [`openai`] (with [`prompts`]), [`messages`], [`tokenize`],
//!   [`management`]: the routes;
//! - [`access`]: API keys, the access log, per-route counters; [`prom`] and
//!   [`prom_vllm`]: metrics text; [`health`]: liveness and readiness probes;
//! - [`conn`]: the accept loop, connection timeouts and the connection cap;
//! - [`cpu`]: tokenization, chat templates and large answers off the async
//!   threads.
//!
//! It does not compute: requests become engine submissions and engine
//! events become response bytes.

pub mod access;
mod adapter_dirs;
pub mod adapters;
pub mod body;
pub mod conn;
pub mod constraints;
pub mod cpu;
pub mod dialect;
pub mod djl_status;
pub mod embeddings;
pub mod encoder_models;
pub mod encoder_pool;
pub mod encoder_request;
pub mod error;
pub mod funnel;
pub mod generation;
pub mod harmony;
#[cfg(test)]
mod harmony_tests;
pub mod health;
pub mod lmi;
pub(crate) mod lmi_outputs;
pub(crate) mod lmi_stream;
pub mod management;
pub mod messages;
pub mod openai;
pub mod params;
pub mod prom;
pub mod prom_vllm;
pub mod prompts;
pub mod properties;
pub mod reasoning;
pub mod registry;
pub mod rerank;
pub mod responses;
pub mod responses_store;
pub mod self_draft;
pub mod sessions;
pub mod state;
pub mod store;
pub mod tokenize;
pub mod tool_parse;
pub mod tools;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{middleware, Router};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::registry::{EngineDefaults, Overrides, Registry};
pub use crate::state::{AppState, ServerConfig};

/// How long, after the grace period, streams get to send their last line.
const FINAL_LINES_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// Log events with this target go to `serving.log` but not to stderr (where
/// the same news is already printed in another form).
pub const FILE_ONLY_LOG_TARGET: &str = "kiln_log_file_only";

/// Every route, with the middleware around them.
pub fn router(st: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .route("/ping", get(management::ping))
        .route("/server/metrics", get(management::metrics))
        .route("/metrics", get(management::metrics))
        .route("/health", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/predictions/{model}", post(lmi::predictions))
        .route(
            "/predictions/{model}/{version}",
            post(lmi::predictions_version),
        )
        .route("/invocations", post(lmi::invocations))
        .route("/models", get(management::list).post(management::register))
        .route(
            "/models/{name}",
            get(management::describe)
                .put(management::scale)
                .delete(management::unregister),
        )
        .route("/models/{name}/invoke", post(lmi::predictions))
        .route(
            "/models/{name}/adapters",
            get(adapters::list).post(adapters::register),
        )
        .route(
            "/models/{name}/adapters/{adapter}",
            get(adapters::describe_one).delete(adapters::unregister),
        )
        .route(
            "/models/{name}/adapters/{adapter}/update",
            post(adapters::update),
        )
        .route("/v1/load_lora_adapter", post(adapters::vllm_load))
        .route("/v1/unload_lora_adapter", post(adapters::vllm_unload))
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/rerank", post(rerank::rerank))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(st.config.max_request_bytes))
        .layer(middleware::from_fn_with_state(
            st.clone(),
            management::guard,
        ))
        .layer(middleware::from_fn_with_state(
            st.clone(),
            refuse_when_stopping,
        ))
        .layer(middleware::from_fn_with_state(
            st.clone(),
            access::authorize,
        ))
        .layer(middleware::from_fn_with_state(st.clone(), access::track));
    if let Some(cors) = cors_layer(&st.config.cors_origins) {
        app = app.layer(cors);
    }
    app.with_state(st)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers(CORS_ALLOW_HEADERS.map(HeaderName::from_static)),
    )
}

/// Request headers a browser may send cross-origin. Listed by name, because
/// `access-control-allow-headers: *` does not cover `Authorization` (Fetch
/// standard), which every client with an API key sends.
pub const CORS_ALLOW_HEADERS: [&str; 11] = [
    "authorization",
    "content-type",
    "accept",
    "accept-language",
    "content-language",
    "openai-organization",
    "openai-project",
    "x-requested-with",
    // Anthropic's clients: the key, the API version and beta flags.
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
];

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    let e = ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    );
    shaped_for(e, uri.path())
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> impl IntoResponse {
    let e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    );
    shaped_for(e, uri.path())
}

/// Anthropic's error shape under `/v1/messages`; the DJL shape elsewhere.
fn shaped_for(e: ApiError, path: &str) -> ApiError {
    if error::is_anthropic_path(path) {
        e.anthropic()
    } else {
        e
    }
}

/// After SIGTERM: inference requests get 503 while in-flight ones finish.
async fn refuse_when_stopping(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    if st.shutting_down.load(Ordering::SeqCst) && req.method() == Method::POST {
        let e = ApiError::unavailable("the server is shutting down");
        return shaped_for(e, req.uri().path()).into_response();
    }
    next.run(req).await
}

/// Builds the shared state and registers the configured models (they load in
/// the background; `/ping` says when they are ready).
pub fn start_state(config: ServerConfig) -> anyhow::Result<Arc<AppState>> {
    cpu::set_compile_limits(config.compile_limits.clone());
    let access_log = match &config.log_dir {
        Some(dir) => Some(access::AccessLog::open(dir)?),
        None => None,
    };
    let st = Arc::new(AppState {
        registry: Registry::new(EngineDefaults {
            kv_cache_bytes: config.kv_cache_bytes,
            kv_cache_dtype: config.kv_cache_dtype,
            job_queue_size: config.job_queue_size,
            memory_budget: config.memory_budget,
            prepared_cache_max: config.prepared_cache_max,
            device: config.device,
            speculative: config.speculative.clone(),
        }),
        http: prom::HttpMetrics::default(),
        access_log,
        shutting_down: AtomicBool::new(false),
        started: Instant::now(),
        embedders: embeddings::Embedders::default(),
        rerankers: rerank::Rerankers::default(),
        model_urls: management::UrlPolicy::new(
            config.model_url_pattern.as_deref(),
            config.model_store.as_deref(),
        )?,
        config,
    });
    let mut models = st.config.models.clone();
    if let Some(store) = &st.config.model_store {
        // `kiln serve` started inside its store writes its logs there.
        let scan = store::scan_except(store, st.config.log_dir.as_deref())?;
        for w in &scan.warnings {
            // The registry says this one when it registers the model.
            let model_py = scan
                .models
                .iter()
                .any(|m| m.has_model_py && *w == store::model_py_warning(&m.dir));
            if !model_py {
                tracing::warn!("{w}");
            }
        }
        for m in scan.models {
            models.push((m.name, m.dir.display().to_string()));
        }
    }
    if models.is_empty() && st.config.model_store.is_none() {
        let path = kiln_model::default_model::default_model_path().map_err(|e| {
            anyhow::anyhow!(
                "{e}; or serve other models with --models NAME=PATH or --model-store DIR"
            )
        })?;
        models.push(("default".into(), path.display().to_string()));
    }
    // One model that cannot be registered (an invalid serving.properties, a
    // missing path) is reported as failed; the others serve, as in DJL.
    for (name, url) in models {
        // The operator's own list may name the same weights twice.
        let o = Overrides {
            allow_duplicate: true,
            ..Overrides::default()
        };
        if rerank::claims(&url) {
            if let Err(msg) = st.rerankers.load(&name, &url) {
                tracing::error!(model = %name, "cannot serve '{name}' ({url}): {msg}");
                st.registry
                    .register_failed(&name, &url, &msg)
                    .map_err(|e| anyhow::anyhow!("model '{name}' ({url}): {}", e.message))?;
            }
            continue;
        }
        if embeddings::claims(&url) {
            // Embedding models are served beside the engines, not by one.
            if let Err(msg) = st.embedders.load(&name, &url) {
                tracing::error!(model = %name, "cannot serve '{name}' ({url}): {msg}");
                st.registry
                    .register_failed(&name, &url, &msg)
                    .map_err(|e| anyhow::anyhow!("model '{name}' ({url}): {}", e.message))?;
            }
            continue;
        }
        if let Err(e) = st.registry.register(&name, &url, o) {
            tracing::error!(model = %name, "cannot serve '{name}' ({url}): {}", e.message);
            st.registry
                .register_failed(&name, &url, &e.message)
                .map_err(|e| anyhow::anyhow!("model '{name}' ({url}): {}", e.message))?;
        }
    }
    Ok(st)
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting connections, lets
/// in-flight requests finish within the grace period, and returns.
pub async fn serve(st: Arc<AppState>) -> anyhow::Result<()> {
    let bind = st.config.bind;
    let listener = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {bind}: {e} (choose another with --host / --port)")
    })?;
    let addr = listener.local_addr()?;
    // One line on stderr, in a fixed form that scripts wait for; the log file
    // gets it too, through a target that the stderr log leaves out.
    eprintln!("kiln: listening on http://{addr}");
    tracing::info!(target: FILE_ONLY_LOG_TARGET, "listening on http://{addr}");
    // Carries the moment the stop signal came.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<Instant>);
    let flag = st.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        flag.shutting_down.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(Some(Instant::now()));
        // A second Ctrl-C does not wait for the grace period.
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("kiln: interrupted again: exiting now");
            std::process::exit(130);
        }
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<Option<Instant>>| async move {
        let _ = rx.wait_for(Option::is_some).await;
    };
    let limits = conn::ConnLimits {
        header_read_timeout: st.config.header_read_timeout,
        body_read_timeout: st.config.body_read_timeout,
        idle_timeout: st.config.idle_timeout,
        write_timeout: st.config.write_timeout,
        max_connections: st
            .config
            .max_connections
            .unwrap_or_else(conn::default_max_connections),
        max_request_bytes: st.config.max_request_bytes,
    };
    tracing::info!(
        "connections: at most {}, header timeout {:?}, body timeout {:?}, idle timeout {:?}, write timeout {:?}",
        limits.max_connections,
        limits.header_read_timeout,
        limits.body_read_timeout,
        limits.idle_timeout,
        limits.write_timeout
    );
    let conns = Arc::new(conn::Connections::new(limits));
    let app = router(st.clone());
    let management = match st.config.management_bind {
        Some(bind) => {
            let l = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {bind} (--management-address): {e}")
            })?;
            let addr = l.local_addr()?;
            eprintln!("kiln: management API on http://{addr}");
            if !addr.ip().is_loopback() && st.config.api_keys.is_empty() {
                tracing::warn!(
                    "the management API on {addr} is open to anyone who can reach it: it can load and unload models; consider --api-key"
                );
            }
            Some(conn::accept_loop(
                l,
                management::Listener::Management,
                app.clone(),
                conns.clone(),
                stop_rx.clone(),
            ))
        }
        None => None,
    };
    if st.config.management_on_inference_port
        && st.config.api_keys.is_empty()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(
            "--management-on-inference-port on {addr} without --api-key: anyone who can reach it can load and unload models"
        );
    }
    let server = {
        let conns = conns.clone();
        let accept = conn::accept_loop(
            listener,
            management::Listener::Inference,
            app,
            conns.clone(),
            stop_rx.clone(),
        );
        async move {
            match management {
                Some(m) => {
                    tokio::join!(accept, m);
                }
                None => accept.await,
            }
            conns.all_closed().await;
        }
    };
    let grace = st.config.grace_period;
    let mut server = std::pin::pin!(server);
    tokio::select! {
        () = server.as_mut() => {},
        _ = async {
            stopped(stop_rx.clone()).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("the grace period of {grace:?} is over; exiting with requests still running");
            // Every request still running ends now with an error, so that its
            // stream gets a last line (and `[DONE]`) instead of being cut; the
            // connections get a moment to send it.
            for m in st.registry.all() {
                if let registry::ModelState::Ready(engine) = m.state() {
                    engine.abort_all();
                }
            }
            let _ = tokio::time::timeout(FINAL_LINES_TIME, server.as_mut()).await;
        }
    }
    // The engines get what is left of the grace period (counted from the
    // signal) to finish, so the process exits within it.
    let left = stop_rx.borrow().map_or(grace, |at| {
        (at + grace).saturating_duration_since(Instant::now())
    });
    let registry_owner = st.clone();
    let _ = tokio::time::timeout(
        left,
        tokio::task::spawn_blocking(move || registry_owner.registry.shutdown_all()),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
