//! Middleware around every route: API keys, the access log and per-route
//! counters.
//!
//! A request's access-log line is written when its response body has been
//! sent (or abandoned), so streamed responses are logged with their real
//! duration and token counts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::state::AppState;

/// What a handler tells the access log about its request.
#[derive(Debug, Default)]
pub struct AccessRecord {
    model: Mutex<Option<String>>,
    tokens_in: AtomicUsize,
    tokens_out: AtomicUsize,
}

impl AccessRecord {
    /// The model the request addressed.
    pub fn set_model(&self, name: &str) {
        if let Ok(mut m) = self.model.lock() {
            *m = Some(name.to_string());
        }
    }

    /// Adds prompt tokens.
    pub fn add_tokens_in(&self, n: usize) {
        self.tokens_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds generated tokens.
    pub fn add_tokens_out(&self, n: usize) {
        self.tokens_out.fetch_add(n, Ordering::Relaxed);
    }
}

/// `access.log`: one line per request.
pub struct AccessLog {
    file: Mutex<std::fs::File>,
}

impl AccessLog {
    /// Opens (appends to) `dir/access.log`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("access.log"))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    fn write(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut f) = self.file.lock() {
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!("cannot write the access log: {e}");
            }
        }
    }
}

/// Writes the access-log line and counts the request when dropped.
struct Done {
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    client: Option<SocketAddr>,
    method: String,
    path: String,
    route: String,
    status: StatusCode,
    start: Instant,
}

impl Drop for Done {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.st
            .http
            .observe(&self.route, self.status.as_u16(), elapsed);
        let Some(log) = &self.st.access_log else {
            return;
        };
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let model = self
            .rec
            .model
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .unwrap_or_else(|| "-".into());
        log.write(&format!(
            "{} {} \"{} {}\" model={} status={} tokens_in={} tokens_out={} latency_ms={:.1}",
            kiln_model::chat::format_utc(secs, "%Y-%m-%dT%H:%M:%SZ"),
            self.client
                .map_or_else(|| "-".to_string(), |c| c.ip().to_string()),
            self.method,
            self.path,
            model,
            self.status.as_u16(),
            self.rec.tokens_in.load(Ordering::Relaxed),
            self.rec.tokens_out.load(Ordering::Relaxed),
            elapsed.as_secs_f64() * 1e3,
        ));
    }
}

/// Logs and counts every request (outermost layer).
pub async fn track(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let rec = Arc::new(AccessRecord::default());
    req.extensions_mut().insert(rec.clone());
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    let done = Done {
        st,
        rec,
        client,
        method,
        path,
        route,
        status: resp.status(),
        start,
    };
    let (parts, body) = resp.into_parts();
    // The guard rides along with the body and fires when the body is finished or dropped.
    let stream = body.into_data_stream().map(move |chunk| {
        let _ = &done;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Routes answered without an API key: health checks, which orchestrators
/// probe without credentials, and `/metrics`, which LLM routers (the Gateway
/// API Inference Extension, llm-d) scrape without credentials, as vLLM
/// serves it. DJL's `/server/metrics` still needs the key.
pub const OPEN_ROUTES: [&str; 4] = ["/ping", "/health", "/health/ready", "/metrics"];

/// The header Anthropic's API and clients carry the API key in.
pub const X_API_KEY: &str = "x-api-key";

/// Requires `Authorization: Bearer <key>` (or `x-api-key: <key>`, as
/// Anthropic's clients send it) on every route but [`OPEN_ROUTES`] when
/// keys are configured.
pub async fn authorize(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if st.config.api_keys.is_empty() || OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    // Anthropic's clients send the key as `x-api-key`: taken alike.
    let x_api_key = req
        .headers()
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let known = |t: &str| st.config.api_keys.iter().any(|k| k == t);
    if token.is_some_and(known) || x_api_key.is_some_and(known) {
        return next.run(req).await;
    }
    let mut err = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "this server requires an API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
    );
    let path = req.uri().path();
    if path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize" {
        err = err.openai();
    }
    if crate::error::is_anthropic_path(path) {
        err = err.anthropic();
    }
    let mut resp = err.into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// The token of an `Authorization: Bearer <token>` value. The scheme name is
/// case-insensitive (RFC 9110, section 11.1), so `bearer` and `BEARER` count.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k", "bearer k", "BEARER k", "bEaReR   k  "] {
            assert_eq!(bearer_token(v), Some("k"), "{v:?}");
        }
        for v in ["Basic k", "Bearerk", "k", "Bearer ", ""] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }
}
