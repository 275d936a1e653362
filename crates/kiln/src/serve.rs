//! `kiln serve`: the model server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kiln_server::ServerConfig;

/// Arguments of `kiln serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A DJL model store: each subdirectory is a model (with its serving.properties).
    #[arg(long, env = "KILN_MODEL_STORE")]
    pub model_store: Option<PathBuf>,
    /// Models to serve, as `name=path` (a model directory or file), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Address to bind (127.0.0.1 unless told otherwise; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1", env = "KILN_HOST")]
    pub host: IpAddr,
    /// Port (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080, env = "KILN_PORT")]
    pub port: u16,
    /// API keys accepted as `Authorization: Bearer <key>` (comma-separated); none = open.
    #[arg(
        long,
        env = "KILN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,
    /// Origins allowed to call from browsers (CORS), comma-separated, or `*`; none = CORS off.
    #[arg(long, value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
    /// Seconds a request may run before it is finished with reason `deadline`.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub grace_period: u64,
    /// Where to write serving.log and access.log (default: logs/ when serving a model store).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// KV cache per model, in MiB (default: half the memory available once
    /// the weights are loaded, at most 32 GiB).
    #[arg(long, conflicts_with = "kv_cache_memory_bytes")]
    pub kv_cache_mib: Option<usize>,
    /// KV cache per model in vLLM's spelling of bytes (`4G` is 4 GiB,
    /// `25.6k` is 25600 bytes; `--kv-cache-memory-bytes` in vLLM); the same
    /// setting as `--kv-cache-mib`.
    #[arg(long)]
    pub kv_cache_memory_bytes: Option<String>,
    /// How the KV cache stores keys and values: auto (f16 on the CPU),
    /// f16, f32 or q8_0 (vLLM's fp8 spellings are refused: use q8_0).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: kiln_engine::KvDtype,
    /// Where models run unless their serving.properties sets
    /// `option.device`: cpu, cuda or cuda:N (a GPU; needs a kiln built with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu", env = "KILN_DEVICE", value_parser = crate::model_args::parse_device)]
    pub device: kiln_engine::Device,
    /// Seconds from a request's first byte to the end of its headers before
    /// the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds from the end of a request's headers to the end of its body
    /// before the request fails with 408.
    #[arg(long, default_value_t = 60.0)]
    pub body_read_timeout: f64,
    /// Seconds a connection may stay open with no request in progress and
    /// nothing sent (keep-alive idle timeout).
    #[arg(long, default_value_t = 60.0)]
    pub idle_timeout: f64,
    /// Seconds a connection's writes may make no progress (its client reads
    /// nothing of the answer) before it is closed; a stream that is slow
    /// because generation is slow is not affected.
    #[arg(long, default_value_t = 60.0)]
    pub write_timeout: f64,
    /// Most client connections open at once; over it the connection idle (or
    /// not reading its answer) longest is closed (default: the open-file
    /// limit less 128).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Requests each model queues beyond its free batch slots, for models
    /// whose serving.properties (or SERVING_JOB_QUEUE_SIZE /
    /// MAX_CONCURRENT_REQUESTS) sets no `job_queue_size` (default 1000).
    #[arg(long)]
    pub job_queue_size: Option<usize>,
    /// A second address (HOST:PORT) for the management API (DJL's
    /// management_address), where loading and unloading models is enabled.
    #[arg(long, env = "KILN_MANAGEMENT_ADDRESS")]
    pub management_address: Option<SocketAddr>,
    /// Enable loading and unloading models (POST /models, PUT and DELETE
    /// /models/NAME) on the inference address without an API key, as DJL
    /// does (warned about when that address is not loopback).
    #[arg(long)]
    pub management_on_inference_port: bool,
    /// A regular expression that every `POST /models?url=` must match whole
    /// (DJL's model_url_pattern); default: paths inside the model store or
    /// kiln's cache. `.*` allows any.
    #[arg(long)]
    pub model_url_pattern: Option<String>,
    /// MiB that all models together (weight files and KV caches) may take;
    /// `POST /models` refuses (507) a model over it. Default: the memory
    /// the system has available when the model is registered.
    #[arg(long)]
    pub memory_budget_mib: Option<u64>,
    /// GiB the prepared-model cache (`$KILN_CACHE/prepared`) may hold; the
    /// least recently used entries beyond it are evicted. Default: unbounded.
    #[arg(long, env = "KILN_CACHE_MAX_GIB", value_parser = kiln_engine::load::parse_cache_max_gib)]
    pub cache_max_gib: Option<u64>,
    /// Largest output constraint (grammar, regex, JSON schema, choices), in
    /// bytes; a larger one is refused (400).
    #[arg(long, default_value_t = kiln_server::cpu::DEFAULT_MAX_CONSTRAINT_BYTES)]
    pub max_constraint_bytes: usize,
    /// Seconds an output constraint may take to compile (400 past it); it
    /// may wait twice as long for a place to compile (503 past it).
    #[arg(long, default_value_t = kiln_server::cpu::DEFAULT_COMPILE_TIMEOUT.as_secs_f64())]
    pub constraint_compile_timeout: f64,
    /// Output constraints compiled at once (default: half the CPUs).
    #[arg(long)]
    pub constraint_compiles: Option<usize>,
    /// Speculative decoding for models whose serving.properties sets none,
    /// as vLLM's JSON: '{"method": "ngram", "num_speculative_tokens": 4,
    /// "prompt_lookup_max": 3}' or '{"model": "/path/to/draft",
    /// "num_speculative_tokens": 4}' (a local draft model sharing the
    /// target's tokenizer).
    #[arg(long, value_parser = parse_speculative_config)]
    pub speculative_config: Option<kiln_engine::SpecConfig>,
}

/// `--speculative-config`: vLLM's JSON (a draft model must be a local path).
fn parse_speculative_config(s: &str) -> Result<kiln_engine::SpecConfig, String> {
    let mut c = kiln_engine::SpecConfig::from_vllm_json(s)?;
    if let kiln_engine::SpecMethod::DraftModel { model } = &mut c.method {
        let path = std::path::absolute(model.as_str())
            .map_err(|e| format!("the draft model {model}: {e}"))?;
        if !path.exists() {
            return Err(format!(
                "the draft model {model} is not a local file or directory; kiln does not implement fetching draft models yet"
            ));
        }
        *model = path.to_string_lossy().into_owned();
    }
    Ok(c)
}

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} {s}: expected a positive number of seconds"))
}

/// The KV cache per model the flags ask for, in bytes (0: none given, so
/// each model's own setting or the memory left decides).
fn kv_cache_bytes(args: &Args) -> anyhow::Result<usize> {
    if let Some(text) = &args.kv_cache_memory_bytes {
        let b = kiln_engine::kv_size::parse_memory_bytes(text)
            .map_err(|e| anyhow::anyhow!("--kv-cache-memory-bytes {e}"))?;
        return Ok(usize::try_from(b).unwrap_or(usize::MAX));
    }
    Ok(args.kv_cache_mib.map_or(0, |m| m.max(1) << 20))
}

/// The server configuration these arguments describe.
pub fn config(args: &Args) -> anyhow::Result<ServerConfig> {
    let models = args
        .models
        .iter()
        .map(|m| match m.split_once('=') {
            Some((name, url)) => Ok((name.to_string(), url.to_string())),
            None => {
                let name = std::path::Path::new(m)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .with_context(|| format!("--models '{m}': give it as name=path"))?;
                Ok((name.to_string(), m.clone()))
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log_dir = args
        .log_dir
        .clone()
        .or_else(|| args.model_store.as_ref().map(|_| PathBuf::from("logs")));
    Ok(ServerConfig {
        bind: SocketAddr::new(args.host, args.port),
        model_store: args.model_store.clone(),
        models,
        api_keys: args
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
        cors_origins: args.cors_origin.clone(),
        max_request_bytes: args.max_request_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
        grace_period: Duration::from_secs(args.grace_period),
        log_dir,
        kv_cache_bytes: kv_cache_bytes(args)?,
        kv_cache_dtype: args.kv_cache_dtype,
        header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
        body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
        idle_timeout: seconds("idle-timeout", args.idle_timeout)?,
        write_timeout: seconds("write-timeout", args.write_timeout)?,
        memory_budget: args.memory_budget_mib.map(|m| m << 20),
        prepared_cache_max: args.cache_max_gib,
        management_bind: args.management_address,
        management_on_inference_port: args.management_on_inference_port,
        model_url_pattern: args.model_url_pattern.clone(),
        device: args.device,
        job_queue_size: match args.job_queue_size {
            Some(0) => anyhow::bail!("--job-queue-size must be at least 1"),
            Some(n) if n > kiln_server::properties::MAX_JOB_QUEUE_SIZE => anyhow::bail!(
                "--job-queue-size {n} is more than the largest queue, {}",
                kiln_server::properties::MAX_JOB_QUEUE_SIZE
            ),
            n => n,
        },
        speculative: args.speculative_config.clone(),
        max_connections: match args.max_connections {
            Some(0) => anyhow::bail!("--max-connections must be at least 1"),
            n => n,
        },
        compile_limits: {
            let default = kiln_server::cpu::CompileLimits::default();
            kiln_server::cpu::CompileLimits {
                max_bytes: args.max_constraint_bytes,
                timeout: seconds(
                    "constraint-compile-timeout",
                    args.constraint_compile_timeout,
                )?,
                concurrent: match args.constraint_compiles {
                    Some(0) => anyhow::bail!("--constraint-compiles must be at least 1"),
                    Some(n) => n,
                    None => default.concurrent,
                },
            }
        },
    })
}

/// Runs `kiln serve` (logging is set up by the caller, see `main`).
pub fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    // An unusable --device is an error at start, not a failed model later.
    kiln_engine::launch::check_device(cfg.device)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kiln-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let st = kiln_server::start_state(cfg)?;
        kiln_server::serve(st).await
    })
}
