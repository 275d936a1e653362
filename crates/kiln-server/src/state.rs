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
    /// KV cache per model, in bytes; 0 sizes it from the memory available
    /// after the weights.
    pub kv_cache_bytes: usize,
    /// How KV caches store keys and values (`--kv-cache-dtype`).
    pub kv_cache_dtype: kiln_engine::KvDtype,
    /// From a request's first byte to the end of its head.
    pub header_read_timeout: Duration,
    /// From the end of a request's head to the end of its body.
    pub body_read_timeout: Duration,
    /// How long a connection may stay open with no request and no bytes.
    pub idle_timeout: Duration,
    /// How long a connection's writes may make no progress (its client reads
    /// nothing of the answer) before it is closed.
    pub write_timeout: Duration,
    /// Most connections open at once (`None`: below the file-descriptor limit).
    pub max_connections: Option<usize>,
    /// `job_queue_size` of the models that set none themselves.
    pub job_queue_size: Option<usize>,
    /// Speculative decoding of the models whose serving.properties sets no
    /// `option.speculative_config` (`kiln serve --speculative-config`).
    pub speculative: Option<kiln_engine::SpecConfig>,
    /// Bytes all models together may take (weights and KV caches); checked
    /// when `POST /models` registers one. `None`: the memory available.
    pub memory_budget: Option<u64>,
    /// Bytes the prepared-model cache may hold (`--cache-max-gib`); least
    /// recently used entries beyond it are evicted. `None`: unbounded.
    pub prepared_cache_max: Option<u64>,
    /// A second listener for the management API (DJL's `management_address`),
    /// where the routes that change what is served are always enabled.
    pub management_bind: Option<SocketAddr>,
    /// Serve the routes that change what is served on the inference address
    /// too, without an API key (DJL's default; off in kiln).
    pub management_on_inference_port: bool,
    /// DJL's `model_url_pattern`: a regular expression that every
    /// `POST /models?url=` must match whole. Unset: the url must be a path
    /// inside the model store or kiln's cache.
    pub model_url_pattern: Option<String>,
    /// Where models run unless their `option.device` says otherwise (`--device`).
    pub device: kiln_backend::Device,
    /// Size, time and concurrency limits on compiling output constraints.
    pub compile_limits: crate::cpu::CompileLimits,
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
            kv_cache_dtype: kiln_engine::KvDtype::Auto,
            header_read_timeout: crate::conn::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: crate::conn::DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: crate::conn::DEFAULT_IDLE_TIMEOUT,
            write_timeout: crate::conn::DEFAULT_WRITE_TIMEOUT,
            max_connections: None,
            job_queue_size: None,
            speculative: None,
            memory_budget: None,
            prepared_cache_max: None,
            management_bind: None,
            management_on_inference_port: false,
            model_url_pattern: None,
            device: kiln_backend::Device::Cpu,
            compile_limits: crate::cpu::CompileLimits::default(),
        }
    }
}

/// What handlers share.
pub struct AppState {
    /// The configuration the server started with.
    pub config: ServerConfig,
    /// The registered models.
    pub registry: Registry,
    /// Per-route request counters and latencies.
    pub http: HttpMetrics,
    /// `access.log`, when a log directory is set.
    pub access_log: Option<AccessLog>,
    /// Set on SIGTERM: new inference requests get 503.
    pub shutting_down: AtomicBool,
    /// When the server started.
    pub started: Instant,
    /// Which model urls `POST /models` may register.
    pub model_urls: crate::management::UrlPolicy,
    /// Embedding models (`/v1/embeddings`), held beside the engines.
    pub embedders: crate::embeddings::Embedders,
    /// Cross-encoder rerankers (`/v1/rerank`), held beside the engines.
    pub rerankers: crate::rerank::Rerankers,
}
