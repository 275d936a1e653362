//! The server's configuration and the state every handler shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::access::AccessLog;
use crate::prom::HttpMetrics;
use crate::registry::Registry;

/// Everything `kiln serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:8080).
    pub bind: SocketAddr,
    /// A DJL model store: one model per subdirectory.
    pub model_store: Option<PathBuf>,
    /// Models named on the command line: `(name, url)`.
    pub models: Vec<(String, String)>,
    /// Bearer tokens accepted; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS (`*` for any); empty means CORS is off.
    pub cors_origins: Vec<String>,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Longest a request may take before it finishes with reason `deadline`.
    pub request_timeout: Duration,
    /// After SIGTERM, how long in-flight requests may take before the server exits anyway.
    pub grace_period: Duration,
    /// Where `serving.log` and `access.log` go, if anywhere.
    pub log_dir: Option<PathBuf>,
    /// KV cache per model, in bytes.
    pub kv_cache_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model_store: None,
            models: Vec::new(),
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            max_request_bytes: 4 << 20,
            request_timeout: Duration::from_secs(600),
            grace_period: Duration::from_secs(30),
            log_dir: None,
            kv_cache_bytes: 1 << 30,
        }
    }
}

/// What handlers share.
pub struct AppState {
    pub config: ServerConfig,
    pub registry: Registry,
    pub http: HttpMetrics,
    pub access_log: Option<AccessLog>,
    /// Set on SIGTERM: new inference requests get 503.
    pub shutting_down: AtomicBool,
    pub started: Instant,
}
