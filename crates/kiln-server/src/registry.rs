//! The registered models: each a name, where it came from, its settings and
//! its engine once loaded.
//!
//! Registering returns at once with the model in the `Loading` state; a
//! loader thread reads the weights and starts the engine. Requests to a model
//! that is still loading get a 503 (with `Retry-After`); to one that failed,
//! a 424 with the reason. Unregistering removes the name first (new requests
//! get 404) and then drains the engine: requests already running finish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use kiln_engine::{load, Engine, EngineConfig, KvCapacity};
use kiln_model::LoadOptions;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::properties::{ModelLocation, ModelProperties, OutputFormatter};

/// Where a model is in its life.
#[derive(Clone)]
pub enum ModelState {
    Loading,
    Ready(Engine),
    Failed(String),
}

impl ModelState {
    /// `Loading`, `Ready` or `Failed`, as the management API reports it.
    pub fn label(&self) -> &'static str {
        match self {
            ModelState::Loading => "Loading",
            ModelState::Ready(_) => "Healthy",
            ModelState::Failed(_) => "Failed",
        }
    }
}

/// The DJL worker settings of a model (kiln runs one engine per model; these
/// are kept, validated and reported for compatibility).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    pub batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub job_queue_size: usize,
    pub min_workers: usize,
    pub max_workers: usize,
}

/// One registered model.
pub struct ModelEntry {
    pub name: String,
    /// What it was registered from (a directory or a model file).
    pub url: String,
    /// The weights that were (or are being) loaded: for a remote model, its
    /// entry in the download cache (which exists once downloaded).
    pub model_path: PathBuf,
    /// The remote model to download into `model_path` before loading.
    pub source: Option<kiln_sources::Source>,
    /// The model directory's `serving.properties`, if it is a directory.
    pub properties: Option<ModelProperties>,
    pub settings: Mutex<WorkerSettings>,
    pub registered_at: SystemTime,
    /// Registered when the server started (the model store, `--models`), not
    /// through `POST /models` (DJL's `loadedAtStartup`). The server is not
    /// ready until these have loaded; one registered later does not take it
    /// out of service while it loads.
    pub loaded_at_startup: bool,
    /// SageMaker stateful sessions (`option.enable_stateful_sessions`).
    pub sessions: crate::sessions::Sessions,
    state: watch::Sender<ModelState>,
}

impl ModelEntry {
    /// The current state.
    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// The engine, or the error a request to this model gets.
    pub fn engine(&self) -> Result<Engine, ApiError> {
        match self.state() {
            ModelState::Ready(e) => Ok(e),
            ModelState::Loading => Err(ApiError::unavailable(format!(
                "model '{}' is still loading",
                self.name
            ))),
            ModelState::Failed(msg) => Err(ApiError::model_failure(format!(
                "model '{}' failed to load: {msg}",
                self.name
            ))),
        }
    }

    /// Waits until the model is ready or has failed.
    pub async fn wait_loaded(&self) -> ModelState {
        let mut rx = self.state.subscribe();
        loop {
            let s = rx.borrow_and_update().clone();
            if !matches!(s, ModelState::Loading) {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.state();
            }
        }
    }

    /// How the model's LMI-schema requests stream ([`crate::dialect::lmi::StreamMode`]).
    pub(crate) fn stream_mode(&self) -> crate::dialect::lmi::StreamMode {
        use crate::dialect::lmi::StreamMode;
        match &self.properties {
            Some(p) if p.static_batch_streaming() => StreamMode::StaticBatch,
            Some(p) if p.rolling_batch == crate::properties::RollingBatch::Disable => {
                StreamMode::Never
            }
            _ => StreamMode::PerRequest,
        }
    }

    /// How streamed responses are framed when the client does not say.
    pub fn stream_formatter(&self) -> OutputFormatter {
        self.properties
            .as_ref()
            .map_or(OutputFormatter::JsonLines, |p| p.output_formatter_for(true))
    }
}

/// A model's KV cache size: its `option.kv_cache_memory_bytes`, else the
/// server's `--kv-cache-mib` / `--kv-cache-memory-bytes` (`server_bytes`,
/// 0 when unset), else on the CPU vLLM's `VLLM_CPU_KVCACHE_SPACE` (GiB,
/// `cpu_env`) or half the memory left once the weights are loaded. Host
/// memory sizes a host cache only: a GPU keeps the 1 GiB default.
fn kv_capacity(
    model_bytes: Option<u64>,
    server_bytes: usize,
    device: kiln_engine::Device,
    cpu_env: Option<&str>,
) -> Result<KvCapacity, String> {
    let bytes = |b: u64| KvCapacity::Bytes(usize::try_from(b).unwrap_or(usize::MAX));
    Ok(match (model_bytes, server_bytes, device) {
        (Some(b), _, _) => bytes(b),
        (None, b, _) if b > 0 => KvCapacity::Bytes(b),
        (None, _, kiln_engine::Device::Cpu) => {
            match kiln_engine::kv_size::cpu_kvcache_space(cpu_env)? {
                Some(b) => bytes(b),
                None => KvCapacity::FreeMemory,
            }
        }
        (None, _, _) => bytes(kiln_engine::kv_size::KV_FALLBACK_BYTES),
    })
}

#[cfg(test)]
mod kv_capacity_tests {
    use super::*;
    use kiln_engine::Device;

    /// The model's key wins over the server's flag, the flag over vLLM's
    /// CPU variable, the variable over the free-memory default; a GPU
    /// ignores the CPU variable; a bad variable is an error naming it.
    #[test]
    fn each_setting_overrides_the_next() {
        let b = |n: u64| KvCapacity::Bytes(n as usize);
        assert_eq!(
            kv_capacity(Some(7 << 20), 64 << 20, Device::Cpu, Some("2")),
            Ok(b(7 << 20))
        );
        assert_eq!(
            kv_capacity(None, 64 << 20, Device::Cpu, Some("2")),
            Ok(b(64 << 20))
        );
        assert_eq!(kv_capacity(None, 0, Device::Cpu, Some("2")), Ok(b(2 << 30)));
        assert_eq!(
            kv_capacity(None, 0, Device::Cpu, Some("0")),
            Ok(KvCapacity::FreeMemory)
        );
        assert_eq!(
            kv_capacity(None, 0, Device::Cpu, None),
            Ok(KvCapacity::FreeMemory)
        );
        assert_eq!(
            kv_capacity(None, 0, Device::Cuda(0), Some("2")),
            Ok(b(kiln_engine::kv_size::KV_FALLBACK_BYTES))
        );
        let e = kv_capacity(None, 0, Device::Cpu, Some("lots")).unwrap_err();
        assert!(e.contains("VLLM_CPU_KVCACHE_SPACE='lots'"), "{e}");
    }
}

/// Server-wide defaults for engines.
#[derive(Debug, Clone, Default)]
pub struct EngineDefaults {
    /// KV cache per model, in bytes; 0 sizes it from the memory available
    /// after the weights ([`kiln_engine::kv_size`]).
    pub kv_cache_bytes: usize,
    /// How KV caches store keys and values unless a model's
    /// `option.kv_cache_dtype` says (`--kv-cache-dtype`).
    pub kv_cache_dtype: kiln_engine::KvDtype,
    /// `job_queue_size` of models that set none (in their `serving.properties`
    /// or the environment): `kiln serve --job-queue-size`.
    pub job_queue_size: Option<usize>,
    /// Bytes that all models together (weights and KV caches) may take
    /// (`--memory-budget-mib`); `None`: what the system has available.
    pub memory_budget: Option<u64>,
    /// Bytes the prepared-model cache may hold (`--cache-max-gib`).
    pub prepared_cache_max: Option<u64>,
    /// Where models run unless their `option.device` names another (`--device`).
    pub device: kiln_backend::Device,
    /// Speculative decoding of models that set none (`--speculative-config`).
    pub speculative: Option<kiln_engine::SpecConfig>,
}

/// Every registered model, by name.
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ModelEntry>>>,
    defaults: EngineDefaults,
}

/// Optional overrides given at registration (`POST /models?batch_size=…`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub batch_size: Option<usize>,
    pub max_batch_delay_ms: Option<u64>,
    pub job_queue_size: Option<usize>,
    pub min_workers: Option<usize>,
    pub max_workers: Option<usize>,
    /// Register even when another model serves the same weights (each copy
    /// costs its memory again).
    pub allow_duplicate: bool,
    /// Refuse (507) a model that does not fit the memory budget
    /// (registrations through the management API).
    pub check_memory: bool,
    /// Registered while serving (`POST /models`), not at start-up.
    pub at_run_time: bool,
}

/// Whether a model name can be used in URLs as is.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && name != "."
        && name != ".."
}

impl Registry {
    /// An empty registry.
    pub fn new(defaults: EngineDefaults) -> Self {
        Self {
            models: RwLock::new(BTreeMap::new()),
            defaults,
        }
    }

    /// Every model, sorted by name.
    pub fn all(&self) -> Vec<Arc<ModelEntry>> {
        self.models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A model by name.
    pub fn get(&self, name: &str) -> Result<Arc<ModelEntry>, ApiError> {
        self.models
            .read()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .ok_or_else(|| ApiError::unknown_model(name))
    }

    /// The name of the only registered model, for OpenAI requests that name
    /// none (DJL's chat schema makes `model` optional); with none or several,
    /// a 400 that lists the names to choose from.
    pub fn only_model(&self) -> Result<String, ApiError> {
        let mut names: Vec<String> = self.all().iter().map(|m| m.name.clone()).collect();
        names.sort();
        match names.len() {
            1 => Ok(names.remove(0)),
            0 => Err(ApiError::bad_request(
                "'model' is required (no model is served)",
            )),
            _ => Err(ApiError::bad_request(format!(
                "'model' is required when several models are served: {}",
                names.join(", ")
            ))),
        }
    }

    /// The ready engine of a model, or the right error.
    pub fn engine(&self, name: &str) -> Result<Engine, ApiError> {
        match self.get(name) {
            Ok(m) => m.engine(),
            // An OpenAI `model` may name a LoRA adapter of a served model:
            // the first ready model, by name, with an adapter so named.
            Err(e) => {
                let mut models = self.all();
                models.sort_by(|a, b| a.name.cmp(&b.name));
                models
                    .iter()
                    .find_map(|m| {
                        let e = m.engine().ok()?;
                        e.adapter(name).map(|_| e.with_adapter(name))
                    })
                    .ok_or(e)
            }
        }
    }

    /// Registers `url` (a model directory or file) as `name` and starts loading it.
    pub fn register(
        &self,
        name: &str,
        url: &str,
        overrides: Overrides,
    ) -> Result<Arc<ModelEntry>, ApiError> {
        if !valid_model_name(name) {
            return Err(ApiError::bad_request(format!(
                "model name '{name}' must be 1-128 characters of letters, digits, '_', '-' and '.'"
            )));
        }
        let (model_path, properties, source) = match model_url(url)? {
            ModelUrl::Remote(source) => {
                // A remote url is a model directory without a
                // serving.properties: the environment forms still apply.
                let entry = kiln_sources::DownloadDir::from_env().entry(&source);
                let p = ModelProperties::for_model_file(&entry, &crate::properties::process_env)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                (entry, Some(p), Some(source))
            }
            ModelUrl::Local(path) => self.local_model(name, url, path)?,
        };
        if !overrides.allow_duplicate {
            if let Some(other) = self.serving(&model_path) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "model url '{url}' is already served as model '{other}'; add \
                         allow_duplicate=true to load it again under another name"
                    ),
                ));
            }
        }
        if overrides.check_memory {
            self.check_memory(name, &model_path, properties.as_ref())?;
        }
        let settings = worker_settings(properties.as_ref(), &overrides, &self.defaults)?;
        let (tx, _) = watch::channel(ModelState::Loading);
        let sessions = crate::sessions::Sessions::new(
            properties
                .as_ref()
                .map(|p| p.chat.sessions)
                .unwrap_or_default(),
        );
        let entry = Arc::new(ModelEntry {
            name: name.to_string(),
            url: url.to_string(),
            model_path,
            sessions,
            properties,
            settings: Mutex::new(settings),
            source,
            registered_at: SystemTime::now(),
            loaded_at_startup: !overrides.at_run_time,
            state: tx,
        });
        self.insert(entry.clone())?;
        self.spawn_loader(entry.clone());
        Ok(entry)
    }

    /// The weights path, properties and remote source of a model registered
    /// from a local directory or file.
    fn local_model(&self, name: &str, url: &str, path: PathBuf) -> Result<Resolved, ApiError> {
        let meta = std::fs::metadata(&path)
            .map_err(|e| ApiError::bad_request(format!("model url '{url}': {e}")))?;
        if !meta.is_dir() {
            // A model file has no serving.properties, but the environment
            // forms (SERVING_JOB_QUEUE_SIZE, MAX_CONCURRENT_REQUESTS, OPTION_*)
            // still apply, as in DJL.
            let p = ModelProperties::for_model_file(&path, &crate::properties::process_env)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            warn_all(name, &p);
            return Ok((path, Some(p), None));
        }
        let mut p = ModelProperties::load(&path, &crate::properties::process_env)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        // However the directory was registered (model store, --models,
        // POST /models), its model.py is named once, here.
        if path.join(crate::store::MODEL_PY).is_file() {
            p.warnings.push(crate::store::model_py_warning(&path));
        }
        warn_all(name, &p);
        match p
            .resolve()
            .map_err(|e| ApiError::bad_request(e.to_string()))?
        {
            ModelLocation::Local(weights) => Ok((weights, Some(p), None)),
            ModelLocation::Remote(source) => {
                let entry = kiln_sources::DownloadDir::from_env().entry(&source);
                Ok((entry, Some(p), Some(source)))
            }
        }
    }

    /// Refuses a model whose weights and KV cache do not fit: in what is left
    /// of `--memory-budget-mib`, or else in the memory the system has available.
    fn check_memory(
        &self,
        name: &str,
        model_path: &Path,
        properties: Option<&ModelProperties>,
    ) -> Result<(), ApiError> {
        let kv = self.kv_bytes_to_check(properties);
        let weights = weights_bytes(model_path);
        let need = weights + kv;
        let (left, what) = match self.defaults.memory_budget {
            Some(budget) => {
                let used: u64 = self
                    .all()
                    .iter()
                    .filter(|m| !matches!(m.state(), ModelState::Failed(_)))
                    .map(|m| {
                        weights_bytes(&m.model_path) + self.kv_bytes_to_check(m.properties.as_ref())
                    })
                    .sum();
                (
                    budget.saturating_sub(used),
                    "is left of the memory budget (--memory-budget-mib)",
                )
            }
            None => match mem_available() {
                Some(avail) => (avail, "of memory is available"),
                None => return Ok(()),
            },
        };
        if need <= left {
            return Ok(());
        }
        let mib = |b: u64| b >> 20;
        Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "model '{name}' needs about {} MiB ({} MiB of weights and a {} MiB KV cache), but only {} MiB {what}",
                mib(need),
                mib(weights),
                mib(kv),
                mib(left)
            ),
        ))
    }

    /// The KV cache a model with `properties` gets on the CPU, as
    /// [`kv_capacity`] sizes it (its own `option.kv_cache_memory_bytes`
    /// first); 0 where the cache is sized from the memory left once the
    /// weights are loaded, which fits by construction. A malformed
    /// `VLLM_CPU_KVCACHE_SPACE` counts 0 here and fails the load, naming it.
    fn kv_bytes_to_check(&self, properties: Option<&ModelProperties>) -> u64 {
        let env = std::env::var(kiln_engine::kv_size::CPU_KVCACHE_SPACE_VAR).ok();
        match kv_capacity(
            properties.and_then(|p| p.kv_cache_memory_bytes),
            self.defaults.kv_cache_bytes,
            kiln_engine::Device::Cpu,
            env.as_deref(),
        ) {
            Ok(KvCapacity::Bytes(b)) => b as u64,
            _ => 0,
        }
    }

    /// The model that already serves the weights at `model_path`, if any.
    fn serving(&self, model_path: &Path) -> Option<String> {
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let wanted = real(model_path);
        self.all()
            .into_iter()
            .find(|m| !matches!(m.state(), ModelState::Failed(_)) && real(&m.model_path) == wanted)
            .map(|m| m.name.clone())
    }

    fn insert(&self, entry: Arc<ModelEntry>) -> Result<(), ApiError> {
        let mut models = self.models.write().map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "registry lock poisoned")
        })?;
        if models.contains_key(&entry.name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("model '{}' is already registered", entry.name),
            ));
        }
        models.insert(entry.name.clone(), entry);
        Ok(())
    }

    /// Records a model that could not even be registered (its
    /// `serving.properties` is invalid, say) as failed, so that it is
    /// reported (`GET /models`, `/ping`, 424 to its requests) while the other
    /// models serve, as DJL does.
    pub fn register_failed(&self, name: &str, url: &str, message: &str) -> Result<(), ApiError> {
        let (tx, _) = watch::channel(ModelState::Failed(message.to_string()));
        let entry = Arc::new(ModelEntry {
            name: name.to_string(),
            url: url.to_string(),
            model_path: local_path(url).unwrap_or_default(),
            source: None,
            properties: None,
            settings: Mutex::new(worker_settings(
                None,
                &Overrides::default(),
                &self.defaults,
            )?),
            registered_at: SystemTime::now(),
            loaded_at_startup: true,
            sessions: crate::sessions::Sessions::new(Default::default()),
            state: tx,
        });
        self.insert(entry)
    }

    fn spawn_loader(&self, entry: Arc<ModelEntry>) {
        let defaults = self.defaults.clone();
        let timeout = entry
            .properties
            .as_ref()
            .map(|p| p.model_loading_timeout)
            .unwrap_or(Duration::from_secs(3600));
        let loader = entry.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("load-{}", entry.name))
            .spawn(move || {
                let t0 = Instant::now();
                // A panic while loading (a library's, on a malformed file)
                // fails this model instead of leaving it loading forever.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    load_engine(&loader, &defaults)
                }))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!("loading panicked: {what}"))
                });
                let state = match result {
                    Ok(engine) => {
                        tracing::info!(
                            model = %loader.name,
                            "ready in {:.2?}: {} KV blocks of {} tokens",
                            t0.elapsed(),
                            engine.info().kv_blocks,
                            engine.info().block_size
                        );
                        ModelState::Ready(engine)
                    }
                    Err(msg) => {
                        tracing::error!(model = %loader.name, "failed to load: {msg}");
                        ModelState::Failed(msg)
                    }
                };
                // A model that timed out stays failed even if loading finishes later.
                loader.state.send_if_modified(|s| {
                    if matches!(s, ModelState::Loading) {
                        *s = state;
                        true
                    } else {
                        false
                    }
                });
            });
        if let Err(e) = spawned {
            entry.state.send_replace(ModelState::Failed(format!(
                "cannot start a loader thread: {e}"
            )));
            return;
        }
        // The loading timeout (`option.model_loading_timeout`).
        let watched = entry;
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if !matches!(watched.state(), ModelState::Loading) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
            }
            watched.state.send_if_modified(|s| {
                if matches!(s, ModelState::Loading) {
                    *s = ModelState::Failed(format!(
                        "loading took longer than option.model_loading_timeout ({} s)",
                        timeout.as_secs()
                    ));
                    true
                } else {
                    false
                }
            });
        });
    }

    /// Removes a model: new requests get 404 at once; requests in flight finish,
    /// then the engine stops. Returns when it has.
    pub async fn unregister(&self, name: &str) -> Result<(), ApiError> {
        let entry = {
            let mut models = self.models.write().map_err(|_| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "registry lock poisoned")
            })?;
            models
                .remove(name)
                .ok_or_else(|| ApiError::unknown_model(name))?
        };
        if let ModelState::Ready(engine) = entry.state() {
            // Drops the state's clone so that only `engine` holds the handle while draining.
            entry
                .state
                .send_replace(ModelState::Failed("unregistered".into()));
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
        Ok(())
    }

    /// Stops every engine after its requests finish (server shutdown).
    pub fn shutdown_all(&self) {
        for entry in self.all() {
            if let ModelState::Ready(engine) = entry.state() {
                engine.shutdown();
            }
        }
    }
}

/// The DJL worker settings from properties and registration overrides.
fn worker_settings(
    p: Option<&ModelProperties>,
    o: &Overrides,
    defaults: &EngineDefaults,
) -> Result<WorkerSettings, ApiError> {
    let d = ModelProperties::default();
    let p = p.unwrap_or(&d);
    // Registration overrides, then the model's file or environment, then the
    // server's flag, then DJL's default.
    let queue = match (p.raw.get("job_queue_size"), defaults.job_queue_size) {
        (None, Some(n)) => n,
        _ => p.job_queue_size,
    };
    let s = WorkerSettings {
        batch_size: o.batch_size.unwrap_or(p.batch_size),
        max_batch_delay_ms: o
            .max_batch_delay_ms
            .unwrap_or(p.max_batch_delay.as_millis() as u64),
        job_queue_size: o.job_queue_size.unwrap_or(queue),
        min_workers: o.min_workers.unwrap_or(p.min_workers),
        max_workers: o.max_workers.unwrap_or(p.max_workers),
    };
    if s.batch_size == 0 || s.job_queue_size == 0 {
        return Err(ApiError::bad_request(
            "batch_size and job_queue_size must be at least 1",
        ));
    }
    if s.job_queue_size > crate::properties::MAX_JOB_QUEUE_SIZE {
        return Err(ApiError::bad_request(format!(
            "job_queue_size {} is more than the largest queue, {}",
            s.job_queue_size,
            crate::properties::MAX_JOB_QUEUE_SIZE
        )));
    }
    if s.min_workers > s.max_workers {
        return Err(ApiError::bad_request(format!(
            "min_worker {} is more than max_worker {}",
            s.min_workers, s.max_workers
        )));
    }
    Ok(s)
}

/// Bytes of the weight files at `path` (the file itself, or the weight files
/// of a directory), which is what a model's memory map makes resident.
pub fn weights_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            [".gguf", ".safetensors", ".bin", ".pt", ".pth"]
                .iter()
                .any(|ext| name.ends_with(ext))
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// `MemAvailable` of `/proc/meminfo`, in bytes, where there is one.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A local path from a registration url (`/path`, `file:///path`); remote
/// schemes are refused with a clear message.
pub fn local_path(url: &str) -> Result<PathBuf, ApiError> {
    match model_url(url)? {
        ModelUrl::Local(p) => Ok(p),
        ModelUrl::Remote(s) => Err(ApiError::bad_request(format!(
            "model url '{url}' is remote ({s}), not a local path"
        ))),
    }
}

/// A registration's weights path, properties and remote source.
type Resolved = (
    PathBuf,
    Option<ModelProperties>,
    Option<kiln_sources::Source>,
);

/// What a registration url names.
pub enum ModelUrl {
    /// A local directory or model file.
    Local(PathBuf),
    /// A model to download first (`s3://…`, `hf://org/name[@revision]`).
    Remote(kiln_sources::Source),
}

/// Classifies a registration url: `s3://` and `hf://` are remote,
/// `file://` and plain paths local; other schemes are refused.
pub fn model_url(url: &str) -> Result<ModelUrl, ApiError> {
    if let Some(source) = kiln_sources::Source::parse(url) {
        return source
            .map(ModelUrl::Remote)
            .map_err(|e| ApiError::bad_request(format!("model url: {e}")));
    }
    if let Some(p) = url.strip_prefix("file://") {
        return Ok(ModelUrl::Local(PathBuf::from(p)));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(ApiError::bad_request(format!(
            "model url '{url}': {scheme}:// urls are not supported; give a local directory or \
             file, an s3://bucket/prefix or hf://org/name[@revision]"
        )));
    }
    Ok(ModelUrl::Local(Path::new(url).to_path_buf()))
}

fn warn_all(name: &str, p: &ModelProperties) {
    for w in &p.warnings {
        tracing::warn!(model = name, "{w}");
    }
}

/// Loads the weights and starts the engine (runs on the loader thread).
fn load_engine(entry: &ModelEntry, defaults: &EngineDefaults) -> Result<Engine, String> {
    let p = entry.properties.clone().unwrap_or_default();
    let opts = LoadOptions {
        max_positions: p.max_model_len,
        dtype: p.dtype,
        quantize: p.quantize,
    };
    // The same path as the CLI's: device check, download, caches, launch.
    let model = match &entry.source {
        None => load::ModelLocation::Local(entry.model_path.clone()),
        Some(source) => load::ModelLocation::Remote(source.clone()),
    };
    let spec = load::LoadSpec {
        cache_max_bytes: defaults.prepared_cache_max,
        ..load::LoadSpec::new(model, p.device.unwrap_or(defaults.device), opts)
    };
    let model = load::load(&spec).map_err(|e| e.to_string())?.model;
    let settings = entry
        .settings
        .lock()
        .map(|s| s.clone())
        .map_err(|e| e.to_string())?;
    let mut cfg = EngineConfig {
        max_running: p.max_rolling_batch_size,
        max_waiting: settings.job_queue_size,
        kv_capacity: kv_capacity(
            p.kv_cache_memory_bytes,
            defaults.kv_cache_bytes,
            model.device(),
            std::env::var(kiln_engine::kv_size::CPU_KVCACHE_SPACE_VAR)
                .ok()
                .as_deref(),
        )?,
        kv_dtype: p.kv_cache_dtype.unwrap_or(defaults.kv_cache_dtype),
        ..EngineConfig::default()
    };
    if let Some(t) = p.max_rolling_batch_prefill_tokens {
        cfg.max_step_tokens = t;
    }
    cfg.speculative = p
        .speculative
        .clone()
        .or_else(|| defaults.speculative.clone());
    let draft_path = match cfg.speculative.as_ref().map(|s| &s.method) {
        Some(kiln_engine::SpecMethod::DraftModel { model: path }) => Some(path.clone()),
        _ => None,
    };
    let engine = if let Some(path) = draft_path.as_ref().filter(|d| {
        model.device() == kiln_backend::Device::Cpu
            && crate::self_draft::is_target(d, &entry.model_path, p.quantize.is_some())
    }) {
        // The model drafts for itself: one load, shared with the draft.
        tracing::info!(model = %entry.name, "the draft model {path} is the model itself: sharing its weights");
        model.start_self_draft(cfg).map_err(|e| e.to_string())?
    } else if let Some(path) = draft_path.as_ref() {
        // The draft goes through the same load path, on the same device.
        let dspec = load::LoadSpec {
            cache_max_bytes: defaults.prepared_cache_max,
            ..load::LoadSpec::new(
                load::ModelLocation::Local(path.into()),
                p.device.unwrap_or(defaults.device),
                LoadOptions {
                    max_positions: p.max_model_len,
                    dtype: p.dtype,
                    quantize: None,
                },
            )
        };
        let draft = load::load(&dspec)
            .map_err(|e| format!("the draft model {path}: {e}"))?
            .model;
        model
            .start_with_draft(cfg, draft)
            .map_err(|e| e.to_string())?
    } else {
        model.start(cfg).map_err(|e| e.to_string())?
    };
    // Adapters come from the model's directory and its weights' directory.
    let mut roots: Vec<std::path::PathBuf> = entry
        .properties
        .as_ref()
        .map(|p| p.model_dir.clone())
        .into_iter()
        .collect();
    if entry.model_path.is_dir() && !roots.contains(&entry.model_path) {
        roots.push(entry.model_path.clone());
    }
    let limits = entry.properties.as_ref().and_then(|p| p.lora);
    crate::adapter_dirs::on_start(&entry.name, limits, &roots, &engine)?;
    Ok(engine)
}
