//! The engine: one loaded model served on its own thread to many concurrent
//! requests.
//!
//! [`Engine::start`] moves the model onto a dedicated OS thread that loops:
//! take new requests, drop cancelled or expired ones, ask the scheduler for a
//! step, run it, sample a token for every sequence that reached its last
//! position, check stops and stream the results. [`Engine::submit`] is cheap
//! and callable from any thread or async task; each request gets its own
//! channel of [`Event`]s back. Dropping the [`RequestStream`] cancels the
//! request: the engine notices at its next step and frees the request's KV
//! blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_backend::{Backend, KvDtype, KvSpec};
use kiln_model::chat::ChatTemplate;
use kiln_model::decoder::Decoder;
use kiln_model::tokenizer::Tokenizer;
use kiln_model::LoadedModel;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::adapters::{Adapters, Resolved, Uploaded};
use crate::block_manager::BlockManager;
use crate::detok::IncrementalDetokenizer;
use crate::guided::{Compiled, Guide, GuideState};
use crate::metrics::{EngineMetrics, MetricsSnapshot};
use crate::request::{Event, FinishReason, Request, TokenOutput, Usage};
use crate::sampling::{token_logprob, Sampler};
use crate::scheduler::{Plan, RowUse, Scheduler, SchedulerConfig, SeqKv};
use crate::spec::{ProposalRequest, SpecConfig, Speculator};
use crate::stops::StopStrings;

/// How much KV cache to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCapacity {
    /// Room for this many tokens (over all sequences).
    Tokens(usize),
    /// As many blocks as fit in this many bytes.
    Bytes(usize),
    /// A share of the memory available once the weights are loaded (see
    /// [`crate::kv_size`]); refused at start when not even one sequence of
    /// the model's length fits.
    FreeMemory,
}

/// The engine's limits; each has a `serving.properties` counterpart.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch (`option.max_rolling_batch_size`).
    pub max_running: usize,
    /// Most tokens computed per step, bounding prefill chunks (`option.max_rolling_batch_prefill_tokens`).
    pub max_step_tokens: usize,
    /// Most requests waiting to start (`job_queue_size`) while the batch is
    /// full; free batch slots take requests on top of it, so a burst on an
    /// idle engine is refused only past `max_waiting + max_running`.
    pub max_waiting: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_capacity: KvCapacity,
    /// Speculative decoding (`option.speculative_config`); `None` is off.
    pub speculative: Option<SpecConfig>,
    /// How keys and values are stored (`--kv-cache-dtype`, `option.kv_cache_dtype`).
    pub kv_dtype: KvDtype,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_step_tokens: 512,
            max_waiting: 1000,
            block_size: 16,
            kv_capacity: KvCapacity::Bytes(1 << 30),
            speculative: None,
            kv_dtype: KvDtype::Auto,
        }
    }
}

/// Facts about a started engine, for logs and the management API.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    pub backend: String,
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Tokens the KV cache holds in all.
    pub kv_tokens: usize,
    pub kv_bytes: usize,
    /// How keys and values are stored.
    pub kv_dtype: KvDtype,
    /// Longest prompt + output one request may have.
    pub max_model_len: usize,
    pub max_running: usize,
    pub max_step_tokens: usize,
    pub max_waiting: usize,
    pub vocab_size: usize,
    pub eos_ids: Vec<u32>,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request itself is unacceptable (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The request can never fit in the KV cache (HTTP 507).
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full; try again later (HTTP 503).
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    /// The engine has stopped (HTTP 503 / 424).
    #[error("the engine has stopped")]
    Stopped,
}

/// The events of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    rx: UnboundedReceiver<Event>,
}

impl RequestStream {
    /// The next event, waiting asynchronously; `None` after `Finished`.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, blocking the thread (not for async contexts).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

enum Command {
    Submit {
        id: u64,
        req: Request,
        /// The request's compiled constraint, if it has one.
        guide: Option<llguidance::Matcher>,
        tx: UnboundedSender<Event>,
        arrival: Instant,
        /// The LoRA adapter the request uses, if any.
        adapter: Option<Resolved>,
    },
}

/// A handle to a running engine. Clones share the engine; when every handle
/// is gone the engine finishes the requests it has and its thread exits.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    /// The LoRA adapter this handle's submissions use ([`Engine::with_adapter`]).
    adapter: Option<Arc<str>>,
}

struct Shared {
    tx: std::sync::Mutex<Option<mpsc::Sender<Command>>>,
    next_id: AtomicU64,
    /// Requests submitted and not yet running.
    queued: Arc<AtomicUsize>,
    /// Requests submitted and not yet finished (running, queued or preempted).
    unfinished: Arc<AtomicUsize>,
    /// Set by [`Engine::abort_all`].
    abort: Arc<AtomicBool>,
    metrics: Arc<EngineMetrics>,
    info: EngineInfo,
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<Arc<ChatTemplate>>,
    /// Built at the first constrained request (the token trie costs a pass
    /// over the vocabulary), or why it cannot be.
    guide: OnceLock<Result<Guide, String>>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The model's LoRA adapters (`crate::adapters`).
    adapters: Arc<Adapters>,
}

impl Engine {
    /// Allocates the KV cache and starts the engine thread.
    pub fn start<B: Backend + 'static>(
        backend: B,
        model: LoadedModel<B>,
        cfg: EngineConfig,
    ) -> crate::Result<Engine> {
        Self::start_inner(backend, model.into(), cfg, None)
    }

    /// [`Self::start`] with a draft model (on `draft_backend`, over a KV
    /// cache of its own as large as `cfg.kv_capacity`) guessing for the
    /// target, for `cfg.speculative`'s `draft_model` method. The draft must
    /// share the target's tokenizer; its vocabulary size is checked.
    pub fn start_with_draft<B: Backend + 'static>(
        backend: B,
        model: LoadedModel<B>,
        cfg: EngineConfig,
        draft_backend: B,
        draft: LoadedModel<B>,
    ) -> crate::Result<Engine> {
        let (dc, tc) = (draft.decoder.config(), model.decoder.config());
        if dc.vocab_size != tc.vocab_size {
            return Err(crate::EngineError::Invalid(format!(
                "the draft model's vocabulary has {} tokens and the target's {}: a draft must share the target's tokenizer",
                dc.vocab_size, tc.vocab_size
            )));
        }
        let blocks = draft_kv_blocks(&cfg, dc, &draft_backend)?;
        let proposer = crate::spec::draft::DraftProposer::new(
            draft_backend,
            draft.decoder,
            blocks,
            cfg.block_size,
        )?;
        Self::start_inner(backend, model.into(), cfg, Some(Box::new(proposer)))
    }

    /// [`Self::start_with_draft`] for a model drafting for itself (DJL's
    /// `option.speculative_draft_model` naming the target, used to measure
    /// speculation's overhead): the draft runs the target's own weights,
    /// loaded once and shared, over a KV cache of its own, rather than a
    /// second copy of the model. `draft_backend` must be able to run the
    /// target's weights (the CPU backend always can).
    pub fn start_self_draft<B: Backend + 'static>(
        backend: B,
        model: LoadedModel<B>,
        cfg: EngineConfig,
        draft_backend: B,
    ) -> crate::Result<Engine> {
        let (target, proposer) = self_draft(model, &cfg, draft_backend)?;
        Self::start_inner(backend, target, cfg, Some(Box::new(proposer)))
    }

    fn start_inner<B: Backend + 'static>(
        backend: B,
        model: Target<B>,
        cfg: EngineConfig,
        draft: Option<Box<dyn crate::spec::Proposer>>,
    ) -> crate::Result<Engine> {
        let dcfg = model.decoder.config().clone();
        let max_model_len = model.decoder.max_positions();
        if cfg.block_size == 0 || cfg.max_running == 0 || cfg.max_step_tokens == 0 {
            return Err(crate::EngineError::Invalid(
                "block size, batch size and step tokens must be at least 1".into(),
            ));
        }
        let mut spec = KvSpec {
            n_layers: dcfg.n_layers,
            num_blocks: 0,
            block_size: cfg.block_size,
            n_kv_heads: dcfg.n_kv_heads,
            head_dim: dcfg.head_dim,
        };
        let token_bytes = backend.kv_token_bytes(&spec, cfg.kv_dtype);
        let tokens = match cfg.kv_capacity {
            KvCapacity::Tokens(t) => t,
            KvCapacity::Bytes(b) => b / token_bytes.max(1),
            KvCapacity::FreeMemory => match crate::kv_size::mem_available_after_weights() {
                Some(avail) => crate::kv_size::tokens_from_free_memory(
                    avail,
                    token_bytes,
                    cfg.kv_dtype,
                    cfg.block_size,
                    max_model_len,
                )
                .map_err(|e| crate::EngineError::Invalid(e.to_string()))?,
                None => (crate::kv_size::KV_FALLBACK_BYTES as usize) / token_bytes.max(1),
            },
        };
        spec.num_blocks = tokens / cfg.block_size;
        if spec.num_blocks == 0 {
            return Err(crate::EngineError::Invalid(format!(
                "the KV cache capacity {:?} holds no block of {} tokens",
                cfg.kv_capacity, cfg.block_size
            )));
        }
        let kv = backend.alloc_kv_cache_as(&spec, cfg.kv_dtype)?;
        let info = EngineInfo {
            backend: backend.name(),
            kv_blocks: spec.num_blocks,
            block_size: cfg.block_size,
            kv_tokens: spec.slots(),
            kv_bytes: spec.slots() * token_bytes,
            kv_dtype: cfg.kv_dtype,
            max_model_len,
            max_running: cfg.max_running,
            max_step_tokens: cfg.max_step_tokens,
            max_waiting: cfg.max_waiting,
            vocab_size: dcfg.vocab_size,
            eos_ids: model.eos_ids.clone(),
        };
        tracing::info!(
            "KV cache: {} blocks of {} tokens ({} tokens, {} MiB, {} bytes per token, kv_cache_dtype {}) on {}",
            info.kv_blocks,
            info.block_size,
            info.kv_tokens,
            info.kv_bytes >> 20,
            token_bytes,
            info.kv_dtype,
            info.backend
        );
        let speculator = Speculator::from_config(cfg.speculative.as_ref(), draft)
            .map_err(crate::EngineError::Invalid)?;
        let metrics = Arc::new(EngineMetrics::default());
        if let Some(s) = &speculator {
            metrics.spec.configure(s.name(), s.k);
        }
        metrics
            .kv_blocks_total
            .store(spec.num_blocks as u64, Ordering::Relaxed);
        let tokenizer = Arc::new(model.tokenizer);
        let chat_template = model.chat_template.map(Arc::new);
        let queued = Arc::new(AtomicUsize::new(0));
        let unfinished = Arc::new(AtomicUsize::new(0));
        let abort = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let adapters = Arc::new(Adapters::new(dcfg.clone(), info.backend.clone()));
        let worker = Worker {
            adapters: adapters.clone(),
            lora: Uploaded::default(),
            backend,
            decoder: model.decoder,
            kv,
            sched: Scheduler::new(
                SchedulerConfig {
                    max_running: cfg.max_running,
                    max_step_tokens: cfg.max_step_tokens,
                },
                BlockManager::new(spec.num_blocks, cfg.block_size),
            ),
            active: HashMap::new(),
            rx,
            tokenizer: tokenizer.clone(),
            eos_ids: model.eos_ids,
            metrics: metrics.clone(),
            queued: queued.clone(),
            unfinished: unfinished.clone(),
            abort: abort.clone(),
            max_model_len,
            spec: speculator,
            profile: crate::spec::profile::PhaseTimes::new(
                "engine",
                &["propose", "schedule", "forward", "choose"],
                crate::spec::profile::profile_requested(),
            ),
        };
        let thread = std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                crate::EngineError::Invalid(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Engine {
            shared: Arc::new(Shared {
                tx: std::sync::Mutex::new(Some(tx)),
                next_id: AtomicU64::new(1),
                queued,
                unfinished,
                abort,
                metrics,
                info,
                tokenizer,
                chat_template,
                guide: OnceLock::new(),
                thread: std::sync::Mutex::new(Some(thread)),
                adapters,
            }),
            adapter: None,
        })
    }

    /// The model's LoRA adapters (managed through `crate::adapters`' methods).
    pub(crate) fn adapter_registry(&self) -> &Arc<Adapters> {
        &self.shared.adapters
    }

    /// Facts about the engine (KV cache size, limits).
    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.shared.chat_template.as_ref()
    }

    /// The constraint compiler for this model's vocabulary, built on first use.
    pub fn guide(&self) -> Result<&Guide, SubmitError> {
        let info = &self.shared.info;
        self.shared
            .guide
            .get_or_init(|| {
                Guide::new(
                    self.shared.tokenizer.clone(),
                    info.vocab_size,
                    &info.eos_ids,
                )
            })
            .as_ref()
            .map_err(|e| SubmitError::Invalid(format!("constrained decoding is unavailable: {e}")))
    }

    /// The constraint compiler if it is built already: lets an async caller
    /// avoid building it (a pass over the vocabulary) on its own thread.
    pub fn guide_if_built(&self) -> Option<Result<&Guide, SubmitError>> {
        self.shared.guide.get().map(|g| {
            g.as_ref().map_err(|e| {
                SubmitError::Invalid(format!("constrained decoding is unavailable: {e}"))
            })
        })
    }

    /// A copy of the engine's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut s = self.shared.metrics.snapshot();
        // The queue's length as of now: requests still in the channel count,
        // and so do preempted ones (published at the last step).
        s.waiting = self.queued() as u64
            + self
                .shared
                .metrics
                .preempted_waiting
                .load(Ordering::Relaxed);
        s
    }

    /// Requests accepted and not yet running.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Checks a request and queues it, compiling its constraint (if any) on
    /// the way, without a time limit.
    pub fn submit(&self, req: Request) -> Result<RequestStream, SubmitError> {
        self.submit_compiled(req, None)
    }

    /// Like [`Self::submit`], with the request's constraint already compiled
    /// (by [`Guide::compile_in_background`], within the caller's limits);
    /// `None` compiles `req.constraint` here, if it has one.
    pub fn submit_compiled(
        &self,
        req: Request,
        compiled: Option<Compiled>,
    ) -> Result<RequestStream, SubmitError> {
        let adapter = self.adapter.clone();
        self.submit_adapter(req, compiled, adapter.as_deref())
    }

    /// A handle to the same engine whose submissions use the LoRA adapter
    /// registered as `name` (the server resolves a request's adapter to one).
    pub fn with_adapter(&self, name: &str) -> Engine {
        Engine {
            shared: self.shared.clone(),
            adapter: Some(name.into()),
        }
    }

    /// The adapter of this handle, if it has one.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter.as_deref()
    }

    /// Like [`Self::submit_compiled`], with the request's rows on the LoRA
    /// adapter registered as `adapter` (`None`: the base model).
    pub fn submit_adapter(
        &self,
        req: Request,
        compiled: Option<Compiled>,
        adapter: Option<&str>,
    ) -> Result<RequestStream, SubmitError> {
        let info = &self.shared.info;
        req.sampling.validate().map_err(SubmitError::Invalid)?;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                info.vocab_size
            )));
        }
        if let Some(&(t, _)) = req
            .sampling
            .logit_bias
            .iter()
            .find(|&&(t, _)| t as usize >= info.vocab_size)
        {
            return Err(SubmitError::Invalid(format!(
                "logit_bias names token id {t}, outside the vocabulary of {}",
                info.vocab_size
            )));
        }
        if req.stop.max_new_tokens == 0 {
            return Err(SubmitError::Invalid(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let limit = req
            .stop
            .max_total_tokens
            .map_or(info.max_model_len, |t| t.min(info.max_model_len));
        if req.prompt.len() >= limit {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the limit for prompt and output is {limit}",
                req.prompt.len()
            )));
        }
        let longest = (req.prompt.len() + req.stop.max_new_tokens).min(limit);
        if longest.div_ceil(info.block_size) > info.kv_blocks {
            return Err(SubmitError::TooLarge(format!(
                "a request of up to {longest} tokens cannot fit in the KV cache of {} tokens",
                info.kv_tokens
            )));
        }
        // Compile the constraint here, not on the engine thread: a bad schema
        // is the caller's error, and compiling must not stall the engine loop.
        let guide = match (compiled, &req.constraint) {
            (Some(g), _) => Some(g.into_matcher()),
            (None, Some(c)) => Some(
                self.guide()?
                    .compile(c)
                    .map_err(|e| SubmitError::Invalid(e.to_string()))?
                    .into_matcher(),
            ),
            (None, None) => None,
        };
        let adapter = adapter
            .map(|a| self.shared.adapters.resolve(a))
            .transpose()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        // Reserve a place before sending, so the bound holds under races:
        // the queue's length plus the batch slots that are free, i.e. at most
        // `max_waiting + max_running` requests unfinished.
        let u = &self.shared.unfinished;
        if u.fetch_add(1, Ordering::SeqCst) >= info.max_waiting.saturating_add(info.max_running) {
            u.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(self.queued()));
        }
        let q = &self.shared.queued;
        q.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cmd = Command::Submit {
            id,
            req,
            guide,
            tx,
            arrival: Instant::now(),
            adapter,
        };
        let sent = match self.shared.tx.lock() {
            Ok(guard) => guard.as_ref().is_some_and(|tx| tx.send(cmd).is_ok()),
            Err(_) => false,
        };
        if !sent {
            q.fetch_sub(1, Ordering::SeqCst);
            u.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(RequestStream { rx })
    }

    /// Ends every request now, running or queued, with reason `Error` and a
    /// message saying the server stopped (so that streams get a last line
    /// rather than a cut), and every request submitted after it too. For the
    /// end of a shutdown's grace period.
    pub fn abort_all(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
    }

    /// Stops accepting requests, lets the running and queued ones finish, and
    /// waits for the engine thread to exit.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.shared.tx.lock() {
            tx.take();
        }
        let handle = self.shared.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle: close the channel; the thread drains and exits on its own.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

/// Per-request state the engine keeps besides the scheduler's.
struct Active {
    req: Request,
    tx: UnboundedSender<Event>,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    prompt_len: usize,
    generated: usize,
    /// Last token of prompt + output allowed.
    max_len: usize,
    arrival: Instant,
    last_token_at: Option<Instant>,
    started: bool,
    /// Log-probabilities of prompt tokens 1.. while they are computed (empty
    /// unless the request asked for them).
    prompt_logprobs: Vec<f32>,
    /// Their alternatives, when the request asked for top log-probabilities.
    prompt_top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The grammar the output must follow, if any.
    guide: Option<GuideState>,
    /// Registration id of its LoRA adapter (0: none).
    adapter: u32,
}

/// What the engine keeps of a loaded model: its decoder behind an [`Arc`]
/// (shared with the draft when the model drafts for itself), tokenizer,
/// chat template and end-of-sequence ids.
struct Target<B: Backend> {
    decoder: Arc<Decoder<B>>,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
}

impl<B: Backend> From<LoadedModel<B>> for Target<B> {
    fn from(m: LoadedModel<B>) -> Self {
        Target {
            decoder: Arc::new(m.decoder),
            tokenizer: m.tokenizer,
            chat_template: m.chat_template,
            eos_ids: m.eos_ids,
        }
    }
}

/// The draft's KV cache size in blocks: `cfg.kv_capacity` in the draft's
/// own bytes per token, the fixed fallback size where the target's is taken
/// from free memory (measured after the draft is loaded).
fn draft_kv_blocks<B: Backend>(
    cfg: &EngineConfig,
    dc: &kiln_model::config::DecoderConfig,
    draft_backend: &B,
) -> crate::Result<usize> {
    if cfg.block_size == 0 {
        return Err(crate::EngineError::Invalid(
            "block size, batch size and step tokens must be at least 1".into(),
        ));
    }
    let token_bytes = KvSpec {
        n_layers: dc.n_layers,
        num_blocks: 0,
        block_size: cfg.block_size,
        n_kv_heads: dc.n_kv_heads,
        head_dim: dc.head_dim,
    }
    .bytes_per_token(draft_backend.kv_element_bytes());
    let tokens = match cfg.kv_capacity {
        KvCapacity::Tokens(t) => t,
        KvCapacity::Bytes(b) => b / token_bytes.max(1),
        // The target's share of free memory is measured after the draft's
        // cache is allocated; the draft keeps the fixed fallback size.
        KvCapacity::FreeMemory => (crate::kv_size::KV_FALLBACK_BYTES as usize) / token_bytes.max(1),
    };
    Ok((tokens / cfg.block_size).max(1))
}

/// The target and a draft proposer running the same decoder: one load, two
/// holders of its [`Arc`], two KV caches.
fn self_draft<B: Backend>(
    model: LoadedModel<B>,
    cfg: &EngineConfig,
    draft_backend: B,
) -> crate::Result<(Target<B>, crate::spec::draft::DraftProposer<B>)> {
    let target = Target::from(model);
    let blocks = draft_kv_blocks(cfg, target.decoder.config(), &draft_backend)?;
    let proposer = crate::spec::draft::DraftProposer::new(
        draft_backend,
        target.decoder.clone(),
        blocks,
        cfg.block_size,
    )?;
    Ok((target, proposer))
}

struct Worker<B: Backend> {
    backend: B,
    decoder: Arc<Decoder<B>>,
    kv: B::KvCache,
    sched: Scheduler,
    active: HashMap<u64, Active>,
    rx: mpsc::Receiver<Command>,
    tokenizer: Arc<Tokenizer>,
    eos_ids: Vec<u32>,
    metrics: Arc<EngineMetrics>,
    queued: Arc<AtomicUsize>,
    unfinished: Arc<AtomicUsize>,
    abort: Arc<AtomicBool>,
    max_model_len: usize,
    adapters: Arc<Adapters>,
    /// The adapters of unfinished requests, on the backend.
    lora: Uploaded<B>,
    /// Speculative decoding's proposer, when it is on.
    spec: Option<Speculator>,
    /// Per-phase step timings (`KILN_STEP_PROFILE=1`, `crate::spec::profile`).
    profile: crate::spec::profile::PhaseTimes,
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        let mut open = true;
        loop {
            if self.sched.is_idle() {
                if !open {
                    break;
                }
                self.profile.log();
                // Nothing to do: sleep until a request arrives or every handle is gone.
                match self.rx.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.reap();
            self.step();
            self.publish_gauges();
        }
        tracing::debug!("engine thread exiting");
    }

    fn accept(&mut self, cmd: Command) {
        let Command::Submit {
            id,
            req,
            guide,
            tx,
            arrival,
            adapter,
        } = cmd;
        let prompt_len = req.prompt.len();
        let limit = req
            .stop
            .max_total_tokens
            .map_or(self.max_model_len, |t| t.min(self.max_model_len));
        let active = Active {
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            detok: IncrementalDetokenizer::new(&req.prompt, req.skip_special_tokens),
            stops: StopStrings::new(req.stop.stop_strings.clone()),
            max_len: (prompt_len + req.stop.max_new_tokens).min(limit),
            prompt_len,
            generated: 0,
            arrival,
            last_token_at: None,
            started: false,
            prompt_logprobs: if req.prompt_logprobs {
                vec![f32::NAN; prompt_len.saturating_sub(1)]
            } else {
                Vec::new()
            },
            prompt_top_logprobs: if req.prompt_logprobs && req.sampling.top_logprobs > 0 {
                vec![Vec::new(); prompt_len.saturating_sub(1)]
            } else {
                Vec::new()
            },
            guide: guide.map(GuideState::new),
            adapter: adapter.as_ref().map_or(0, |r| r.id),
            tx,
            req,
        };
        let mut seq = SeqKv::new(id, active.req.prompt.clone());
        if let Some(r) = &adapter {
            if let Err(e) = self.lora.acquire(&self.backend, r) {
                let _ = active.tx.send(Event::Finished {
                    reason: FinishReason::Error,
                    usage: Usage::default(),
                    error: Some(e.to_string()),
                });
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.unfinished.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            (seq.adapter, seq.salt) = (r.id, crate::adapters::salt(r.id));
        }
        self.sched.add(if active.req.prompt_logprobs {
            seq.with_prompt_logprobs()
        } else {
            seq
        });
        self.active.insert(id, active);
        self.take_forced(id);
    }

    /// Appends the tokens sequence `id`'s grammar forces before anything is
    /// sampled (a JSON schema's `{"key":`), so that they are computed with
    /// the prompt. Not for requests that want their prompt's
    /// log-probabilities, which arrive with the first sampled token.
    fn take_forced(&mut self, id: u64) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        if a.req.prompt_logprobs {
            return;
        }
        let Some(g) = a.guide.as_mut() else {
            return;
        };
        let forced = g.matcher.consume_ff_tokens();
        if let Some(e) = g.matcher.get_error() {
            return self.fail_grammar(id, &e);
        }
        let done = g.matcher.is_stopped();
        let n = forced.len();
        for (i, tok) in forced.into_iter().enumerate() {
            if self.deliver(id, tok, f32::NAN, Vec::new(), done && i + 1 == n) {
                return;
            }
        }
    }

    /// Drops requests whose client has gone and those past their deadline;
    /// ends every request after [`Engine::abort_all`].
    fn reap(&mut self) {
        if self.abort.load(Ordering::SeqCst) {
            let ids: Vec<u64> = self.active.keys().copied().collect();
            for id in ids {
                self.finish(
                    id,
                    FinishReason::Error,
                    Some("the server stopped before the request finished (its shutdown grace period is over)".into()),
                );
            }
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        for (&id, a) in &self.active {
            if a.tx.is_closed() {
                done.push((id, FinishReason::Cancelled));
            } else if a.req.stop.deadline.is_some_and(|d| now >= d) {
                done.push((id, FinishReason::Deadline));
            }
        }
        for (id, reason) in done {
            self.finish(id, reason, None);
        }
    }

    /// Ends a request: flushes held-back text, sends `Finished`, frees its blocks.
    fn finish(&mut self, id: u64, reason: FinishReason, error: Option<String>) {
        self.finish_after(id, None, reason, error)
    }

    /// Ends a request, sending `last` (its final token) and `Finished` back to
    /// back before any bookkeeping, so a reader that sees the token can
    /// usually see the end right behind it.
    fn finish_after(
        &mut self,
        id: u64,
        last: Option<TokenOutput>,
        reason: FinishReason,
        error: Option<String>,
    ) {
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        if a.adapter != 0 {
            self.lora.release(a.adapter);
        }
        let usage = Usage {
            prompt_tokens: a.prompt_len,
            completion_tokens: a.generated,
            cached_tokens: self.sched.get(id).map_or(0, |s| s.cached_tokens),
        };
        // Sends fail only if the client is gone, which is then moot. Dropping
        // `a` closes the channel, so the stream ends after the last event.
        if let Some(t) = last {
            let _ = a.tx.send(Event::Token(t));
        }
        let _ = a.tx.send(Event::Finished {
            reason,
            usage,
            error,
        });
        self.sched.remove(id);
        if let Some(s) = self.spec.as_mut() {
            s.release(id);
        }
        if !a.started {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        self.unfinished.fetch_sub(1, Ordering::SeqCst);
        let m = &self.metrics;
        m.requests_finished.fetch_add(1, Ordering::Relaxed);
        if reason == FinishReason::Error {
            m.requests_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn step(&mut self) {
        self.sched.max_adapters = self.adapters.max_loras.load(Ordering::Relaxed);
        let t = Instant::now();
        self.propose_drafts();
        let t = self.profile.lap(0, t);
        let plan = self.sched.schedule();
        if plan.seqs.is_empty() {
            if !self.sched.is_idle() && self.sched.num_running() == 0 {
                // Cannot happen while submit() refuses requests larger than the cache;
                // fail the head of the queue rather than spin.
                if let Some(id) = self.sched.ids().first().copied() {
                    self.finish(
                        id,
                        FinishReason::Error,
                        Some("the KV cache cannot hold this request".into()),
                    );
                }
            }
            return;
        }
        self.note_plan(&plan);
        let (input, uses) = self.sched.step_input(&plan);
        let t = self.profile.lap(1, t);
        // The grammar masks of the sequences sampled in this step are
        // computed on a helper thread while the model runs the step.
        let sampled: Vec<u64> = plan
            .seqs
            .iter()
            .filter(|p| p.sample)
            .map(|p| p.id)
            .collect();
        let masks: Vec<&mut GuideState> = self
            .active
            .iter_mut()
            .filter(|(id, _)| sampled.contains(id))
            .filter_map(|(_, a)| a.guide.as_mut())
            .filter(|g| g.mask.is_none())
            .collect();
        let rows = plan
            .seqs
            .iter()
            .filter_map(|p| self.sched.get(p.id))
            .zip(&input.seqs)
            .map(|(s, q)| {
                (
                    s.adapter,
                    q.query_start as u32..(q.query_start + q.query_len) as u32,
                )
            });
        let lora = self.lora.step(rows);
        let forward = if masks.is_empty() {
            self.decoder
                .forward_lora(&self.backend, &mut self.kv, &input, &lora)
        } else {
            let (decoder, backend, kv) = (&self.decoder, &self.backend, &mut self.kv);
            std::thread::scope(|s| {
                s.spawn(move || masks.into_iter().for_each(GuideState::prepare));
                decoder.forward_lora(backend, kv, &input, &lora)
            })
        };
        drop(lora);
        let t = self.profile.lap(2, t);
        let logits = match forward {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward step failed: {e}");
                for p in &plan.seqs {
                    self.finish(
                        p.id,
                        FinishReason::Error,
                        Some(format!("model failure: {e}")),
                    );
                }
                return;
            }
        };
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        let generated_before = self.metrics.generated_tokens.load(Ordering::Relaxed);
        self.sched.commit(&plan);
        let vocab = logits.len() / input.logit_rows.len().max(1);
        // A sequence's prompt rows come before its sampling row, and its
        // draft's rows right after it.
        let rows: Vec<&[f32]> = logits.chunks_exact(vocab.max(1)).collect();
        let mut i = 0;
        while i < uses.len().min(rows.len()) {
            match uses[i] {
                RowUse::Sample(id) => {
                    let d = uses[i + 1..]
                        .iter()
                        .take_while(|u| matches!(u, RowUse::Draft(x, _) if *x == id))
                        .count();
                    match rows.get(i..=i + d) {
                        Some(r) if d > 0 => self.verify(id, r),
                        _ => self.emit(id, rows[i]),
                    }
                    i += d;
                }
                RowUse::Prompt(id, pos) => self.note_prompt_logprob(id, pos, rows[i]),
                RowUse::Draft(..) => {}
            }
            i += 1;
        }
        if self.profile.is_on() {
            self.profile.lap(3, t);
            let made = self.metrics.generated_tokens.load(Ordering::Relaxed);
            self.profile
                .step_done(made.saturating_sub(generated_before));
        }
    }

    /// Guesses the next tokens of every sequence about to decode
    /// (speculative decoding, `crate::spec`): no more than its length limit
    /// leaves room for, and cut where its grammar would refuse a guess.
    fn propose_drafts(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        let mut batch = Vec::new();
        for id in self.sched.decode_ready() {
            let (Some(a), Some(s)) = (self.active.get(&id), self.sched.get(id)) else {
                continue;
            };
            let k = spec.k.min(a.max_len.saturating_sub(s.tokens.len() + 1));
            let k = spec.backoff.depth(id, k);
            if k > 0 {
                batch.push(ProposalRequest {
                    id,
                    tokens: &s.tokens,
                    k,
                });
            }
        }
        if batch.is_empty() {
            return;
        }
        let drafts = spec.proposer.propose(&batch);
        let asked: Vec<(u64, usize)> = batch.iter().map(|r| (r.id, r.k)).collect();
        for ((id, k), mut draft) in asked.into_iter().zip(drafts) {
            draft.truncate(k);
            if let Some(g) = self.active.get_mut(&id).and_then(|a| a.guide.as_mut()) {
                let ok = g.matcher.validate_tokens(&draft).unwrap_or(0);
                draft.truncate(ok);
            }
            self.sched.set_draft(id, draft);
        }
    }

    /// Chooses sequence `id`'s tokens from its sampling row and its draft's
    /// rows: the first exactly as without speculation, and each next one
    /// only while the token just chosen is the guess the next row was
    /// computed after (`crate::spec::verify`: for sampled requests this is
    /// the rejection-sampling rule).
    fn verify(&mut self, id: u64, rows: &[&[f32]]) {
        let draft = self.sched.take_draft(id);
        let mut accepted = 0;
        for (j, row) in rows.iter().enumerate() {
            let before = self.sched.get(id).map_or(0, |s| s.tokens.len());
            self.emit(id, row);
            let Some(s) = self.sched.get(id) else {
                break; // finished
            };
            let kept = draft
                .get(j)
                .is_some_and(|&g| s.tokens.len() == before + 1 && s.tokens.last() == Some(&g));
            if !kept {
                break;
            }
            accepted += 1;
        }
        self.sched.accept_draft(id, accepted);
        self.metrics.spec.record(draft.len(), accepted);
        if let Some(s) = self.spec.as_mut() {
            s.backoff.record(id, draft.len(), accepted);
        }
    }

    /// Records the log-probability of prompt token `pos` of sequence `id`.
    fn note_prompt_logprob(&mut self, id: u64, pos: usize, logits: &[f32]) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let (Some(&token), Some(slot)) =
            (a.req.prompt.get(pos), a.prompt_logprobs.get_mut(pos - 1))
        else {
            return;
        };
        match a.prompt_top_logprobs.get_mut(pos - 1) {
            Some(top) => {
                let n = a.req.sampling.top_logprobs;
                (*slot, *top) = crate::sampling::token_logprob_and_top(logits, token, n);
            }
            None => *slot = token_logprob(logits, token),
        }
    }

    /// Bookkeeping of admissions and preemptions.
    fn note_plan(&mut self, plan: &Plan) {
        let m = &self.metrics;
        for &id in &plan.admitted {
            if let Some(a) = self.active.get_mut(&id) {
                if !a.started {
                    a.started = true;
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    m.prompt_tokens
                        .fetch_add(a.prompt_len as u64, Ordering::Relaxed);
                }
            }
        }
        m.preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
    }

    /// Samples a token for sequence `id` from its logits (among the tokens
    /// its grammar allows, if it has one) and streams it out, followed by
    /// the tokens the grammar then forces.
    fn emit(&mut self, id: u64, logits: &[f32]) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let Some(g) = a.guide.as_mut() else {
            let choice = a.sampler.sample(logits);
            self.deliver(id, choice.token, choice.logprob, choice.top_logprobs, false);
            return;
        };
        // Normally computed during the step; a sequence that joined the
        // step's sampling rows some other way computes it now.
        g.prepare();
        let mask = match g.mask.take() {
            Some(Ok(m)) if m.num_set() > 0 => m,
            Some(Err(e)) => return self.fail_grammar(id, &e),
            _ => return self.fail_grammar(id, "no token can continue the output"),
        };
        let choice = a.sampler.sample_allowed(logits, Some(&mask));
        let tok = choice.token;
        let ends = self.eos_ids.contains(&tok) || a.req.stop.stop_token_ids.contains(&tok);
        if !ends {
            if let Err(e) = g.matcher.consume_token(tok) {
                return self.fail_grammar(id, &e.to_string());
            }
        }
        let done = g.matcher.is_stopped();
        if self.deliver(id, tok, choice.logprob, choice.top_logprobs, done) {
            return;
        }
        // Tokens the grammar forces: appended without sampling; the next
        // step computes them all at once.
        self.take_forced(id);
    }

    /// Ends a request whose grammar failed.
    fn fail_grammar(&mut self, id: u64, why: &str) {
        let why = crate::guided::client_message(why);
        self.finish(
            id,
            FinishReason::Error,
            Some(format!("{}: {why}", crate::guided::CONSTRAINT_FAILED)),
        );
    }

    /// Appends a chosen token to sequence `id`, streams its text and applies
    /// the stop conditions; `grammar_done` ends the request after it (its
    /// grammar is complete). Returns whether the request finished.
    fn deliver(
        &mut self,
        id: u64,
        tok: u32,
        logprob: f32,
        top_logprobs: Vec<(u32, f32)>,
        grammar_done: bool,
    ) -> bool {
        let Some(a) = self.active.get_mut(&id) else {
            return true;
        };
        self.sched.append(id, tok);
        a.generated += 1;
        let now = Instant::now();
        match a.last_token_at {
            None => self.metrics.time_to_first_token.observe(now - a.arrival),
            Some(t) => self.metrics.inter_token_latency.observe(now - t),
        }
        a.last_token_at = Some(now);
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);

        // A grammar may end with the model's EOS even when `ignore_eos` is set.
        let eos = self.eos_ids.contains(&tok);
        let ends = (eos && (!a.req.stop.ignore_eos || a.guide.is_some()))
            || a.req.stop.stop_token_ids.contains(&tok);
        let mut finish = None;
        let mut text = String::new();
        let mut error = None;
        if ends {
            finish = Some(FinishReason::EosToken);
        } else {
            match a.detok.push(&self.tokenizer, tok) {
                Ok(delta) => {
                    let out = a.stops.push(&delta);
                    text = out.text;
                    if out.matched.is_some() {
                        finish = Some(FinishReason::StopSequence);
                    }
                }
                Err(e) => {
                    finish = Some(FinishReason::Error);
                    error = Some(format!("detokenization failed: {e}"));
                }
            }
            if finish.is_none() && grammar_done {
                finish = Some(FinishReason::EosToken);
            }
            if finish.is_none() && a.prompt_len + a.generated >= a.max_len {
                finish = Some(FinishReason::Length);
            }
        }
        if matches!(finish, Some(FinishReason::EosToken | FinishReason::Length)) {
            // Nothing more is coming: release what was held back.
            if let Ok(rest) = a.detok.flush(&self.tokenizer) {
                let out = a.stops.push(&rest);
                text.push_str(&out.text);
                if out.matched.is_some() {
                    finish = Some(FinishReason::StopSequence);
                }
            }
            if finish != Some(FinishReason::StopSequence) {
                text.push_str(&a.stops.flush());
            }
        }
        let (prompt_logprobs, prompt_top_logprobs) = if a.generated == 1 && a.req.prompt_logprobs {
            self.sched.clear_prompt_logprobs(id);
            let top = std::mem::take(&mut a.prompt_top_logprobs);
            (
                Some(std::mem::take(&mut a.prompt_logprobs)),
                (a.req.sampling.top_logprobs > 0).then_some(top),
            )
        } else {
            (None, None)
        };
        let out = TokenOutput {
            id: tok,
            text,
            logprob,
            top_logprobs,
            last: finish.is_some(),
            prompt_logprobs,
            prompt_top_logprobs,
        };
        match finish {
            Some(reason) => {
                self.finish_after(id, Some(out), reason, error);
                true
            }
            None => {
                let _ = a.tx.send(Event::Token(out));
                false
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.waiting
            .store(self.sched.num_waiting() as u64, Ordering::Relaxed);
        let preempted = self
            .sched
            .waiting_ids()
            .filter(|id| self.active.get(id).is_some_and(|a| a.started))
            .count();
        m.preempted_waiting
            .store(preempted as u64, Ordering::Relaxed);
        m.running
            .store(self.sched.num_running() as u64, Ordering::Relaxed);
        m.kv_blocks_used
            .store(self.sched.blocks.num_used() as u64, Ordering::Relaxed);
        let ps = self.sched.blocks.prefix_stats();
        m.prefix_queried_tokens
            .store(ps.queried_tokens, Ordering::Relaxed);
        m.prefix_hit_tokens.store(ps.hit_tokens, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod self_draft_tests {
    use super::*;
    use kiln_backend::cpu::CpuBackend;

    /// A model drafting for itself is loaded once: the target and the draft
    /// hold the same decoder (two holders of one `Arc`), each with its own
    /// KV cache.
    #[test]
    fn a_self_draft_shares_the_targets_decoder() {
        let dir = kiln_model::goldens::tiny_dir("llama");
        let model = kiln_model::load(
            &CpuBackend::new(),
            &dir,
            &kiln_model::LoadOptions::default(),
        )
        .unwrap();
        let cfg = EngineConfig {
            kv_capacity: KvCapacity::Tokens(64),
            ..EngineConfig::default()
        };
        let (target, proposer) = self_draft(model, &cfg, CpuBackend::new()).unwrap();
        assert!(Arc::ptr_eq(&target.decoder, proposer.decoder()));
        assert_eq!(Arc::strong_count(&target.decoder), 2);
    }
}
