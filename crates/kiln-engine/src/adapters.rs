//! LoRA adapters of one engine: which are registered, which are held in
//! memory, and which a step's rows use.
//!
//! Registering reads and checks an adapter at once (on the caller's
//! thread), so a bad one is refused before any request names it — unless
//! it is registered with DJL's `preload=false`, which only checks that its
//! two files exist and reads it at its first request. Host copies are kept
//! for at most `max_cpu_loras` adapters, evicted least recently used and
//! read again from their directory when a request names them; a pinned
//! adapter (DJL's `pin=true`, which implies preload) is never evicted, and
//! when every slot is pinned another adapter cannot be held (registering or
//! using it is refused with [`AdapterError::AllPinned`]). The engine thread uploads an adapter to the backend when a request
//! using it arrives and drops it when the last such request finishes; the
//! scheduler keeps at most `max_loras` distinct adapters in the running
//! batch (requests for another adapter wait). Each registration gets its
//! own id, which also salts the prefix cache: keys and values computed
//! under an adapter are never reused for the base model or another adapter
//! (or a re-registered one of the same name).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_backend::Backend;
use kiln_model::config::DecoderConfig;
use kiln_model::lora::peft::{CONFIG_FILE, WEIGHTS_FILE};
use kiln_model::lora::{read_peft, HostLora, LoraAdapter, LoraError, LoraLimits, LoraStep};

/// DJL's LoRA settings (`option.max_loras`, `option.max_lora_rank`,
/// `option.max_cpu_loras`); adapters are enabled once these are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Most distinct adapters in one running batch.
    pub max_loras: usize,
    /// Largest rank accepted.
    pub max_lora_rank: usize,
    /// Most adapters whose weights are held in memory.
    pub max_cpu_loras: usize,
}

impl Default for AdapterLimits {
    /// DJL's and vLLM's defaults: 4 adapters per batch, rank 16, and as many
    /// in memory as per batch.
    fn default() -> Self {
        Self {
            max_loras: 4,
            max_lora_rank: 16,
            max_cpu_loras: 4,
        }
    }
}

/// Why an adapter operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The model was started without `option.enable_lora`.
    #[error("LoRA adapters are not enabled for this model (set option.enable_lora=true)")]
    Disabled,
    /// The adapter's name cannot be used.
    #[error("invalid adapter name '{0}': use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'")]
    InvalidName(String),
    /// An adapter of that name is registered already.
    #[error("adapter '{0}' is already registered")]
    Exists(String),
    /// No adapter of that name is registered.
    #[error("adapter '{0}' is not registered")]
    NotFound(String),
    /// The adapter's files were refused.
    #[error(transparent)]
    Load(#[from] LoraError),
    /// The engine's device cannot run adapters.
    #[error("LoRA adapters are not implemented on {0} yet")]
    Device(String),
    /// Every one of the `max_cpu_loras` memory slots holds a pinned adapter,
    /// so another adapter cannot be loaded (or one more pinned).
    #[error("adapter '{name}' cannot be loaded: all {max} of option.max_cpu_loras's slots hold pinned adapters ({}); unpin one (POST …/adapters/<name>/update?pin=false) or raise option.max_cpu_loras", .pinned.join(", "))]
    AllPinned {
        name: String,
        max: usize,
        pinned: Vec<String>,
    },
}

/// How an adapter is registered: DJL's `preload` and `pin` query parameters
/// of `POST /models/{model}/adapters` (and of its `update`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterOptions {
    /// Read the weights at registration (DJL's default) rather than at the
    /// adapter's first request.
    pub preload: bool,
    /// Never evict the weights from memory (`max_cpu_loras`'s LRU); implies
    /// `preload`.
    pub pin: bool,
}

impl Default for AdapterOptions {
    /// DJL's defaults: `preload=true`, `pin=false`.
    fn default() -> Self {
        Self {
            preload: true,
            pin: false,
        }
    }
}

/// What the management API shows of an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    /// The directory it was read from.
    pub src: PathBuf,
    /// Its largest rank.
    pub rank: usize,
    /// Whether its weights are held in memory now (or will be read again
    /// from `src` at its next request).
    pub loaded: bool,
    /// Whether it is pinned in memory (DJL's `pin`).
    pub pin: bool,
}

/// Checks an adapter name (it appears in URLs and as an OpenAI `model`).
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::InvalidName(name.to_string()))
    }
}

struct Entry {
    dir: PathBuf,
    id: u32,
    /// Its largest rank; 0 until it is first read (`preload=false`).
    rank: usize,
    host: Option<Arc<HostLora>>,
    last_used: u64,
    pinned: bool,
}

impl Entry {
    fn info(&self, name: &str) -> AdapterInfo {
        AdapterInfo {
            name: name.to_string(),
            src: self.dir.clone(),
            rank: self.rank,
            loaded: self.host.is_some(),
            pin: self.pinned,
        }
    }
}

#[derive(Default)]
struct Registry {
    limits: Option<AdapterLimits>,
    entries: BTreeMap<String, Entry>,
    next_id: u32,
    clock: u64,
}

impl Registry {
    /// Adapter `name`'s entry, stamped as used now (the clock ticks), for
    /// least-recently-used eviction.
    fn touch(&mut self, name: &str) -> Result<&mut Entry, AdapterError> {
        self.clock += 1;
        let clock = self.clock;
        let e = self
            .entries
            .get_mut(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        e.last_used = clock;
        Ok(e)
    }

    /// Refuses to hold `name`'s weights (pinned or not, as `pin` says) when
    /// pinned adapters other than it already fill `max_cpu_loras`'s slots:
    /// nothing could be evicted to make room.
    fn check_room(&self, name: &str) -> Result<(), AdapterError> {
        let Some(l) = self.limits else { return Ok(()) };
        let pinned: Vec<String> = self
            .entries
            .iter()
            .filter(|(n, e)| e.pinned && n.as_str() != name)
            .map(|(n, _)| n.clone())
            .collect();
        // A pinned adapter needs a slot of its own; another needs one free
        // of pins, even if only while it is used.
        if pinned.len() >= l.max_cpu_loras {
            return Err(AdapterError::AllPinned {
                name: name.to_string(),
                max: l.max_cpu_loras,
                pinned,
            });
        }
        Ok(())
    }

    /// Drops host copies beyond `max_cpu_loras`, least recently used first,
    /// never `keep`'s nor a pinned adapter's.
    fn evict(&mut self, keep: &str) {
        let Some(l) = self.limits else { return };
        loop {
            let held = self.entries.values().filter(|e| e.host.is_some()).count();
            if held <= l.max_cpu_loras {
                return;
            }
            let victim = self
                .entries
                .iter_mut()
                .filter(|(n, e)| e.host.is_some() && !e.pinned && n.as_str() != keep)
                .min_by_key(|(_, e)| e.last_used);
            match victim {
                Some((n, e)) => {
                    tracing::info!("adapter '{n}' evicted from memory (max_cpu_loras)");
                    e.host = None;
                }
                None => return,
            }
        }
    }
}

/// An adapter a request uses: its registration's id and its weights.
#[derive(Clone)]
pub(crate) struct Resolved {
    pub id: u32,
    pub host: Arc<HostLora>,
}

/// The prefix-cache root of sequences on adapter `id` (0: the base model's).
pub(crate) fn salt(id: u32) -> u64 {
    if id == 0 {
        0
    } else {
        0x9E37_79B9_7F4A_7C15 ^ (u64::from(id).wrapping_mul(0xBF58_476D_1CE4_E5B9))
    }
}

/// The adapters of one engine, shared by its handles and its thread.
pub(crate) struct Adapters {
    cfg: DecoderConfig,
    backend: String,
    registry: Mutex<Registry>,
    /// `max_loras`, read by the engine thread each step (`usize::MAX` while disabled).
    pub max_loras: AtomicUsize,
}

impl Adapters {
    pub fn new(cfg: DecoderConfig, backend: String) -> Self {
        Self {
            cfg,
            backend,
            registry: Mutex::new(Registry {
                next_id: 1,
                ..Registry::default()
            }),
            max_loras: AtomicUsize::new(usize::MAX),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enable(&self, limits: AdapterLimits) -> Result<(), AdapterError> {
        if self.backend.starts_with("cuda") {
            return Err(AdapterError::Device(self.backend.clone()));
        }
        self.lock().limits = Some(limits);
        self.max_loras
            .store(limits.max_loras.max(1), Ordering::Relaxed);
        Ok(())
    }

    pub fn limits(&self) -> Option<AdapterLimits> {
        self.lock().limits
    }

    fn read(&self, dir: &Path, limits: AdapterLimits) -> Result<HostLora, AdapterError> {
        Ok(read_peft(
            dir,
            &self.cfg,
            LoraLimits {
                max_rank: limits.max_lora_rank,
            },
        )?)
    }

    /// Registers the adapter in `dir` as `name`, reading it now when
    /// `opts` preloads or pins it (else checking only that its files are
    /// there); `replace` allows an existing registration of that name to be
    /// replaced (running requests keep the weights they started with).
    pub fn register(
        &self,
        name: &str,
        dir: &Path,
        replace: bool,
        opts: AdapterOptions,
    ) -> Result<AdapterInfo, AdapterError> {
        check_name(name)?;
        let limits = self.lock().limits.ok_or(AdapterError::Disabled)?;
        let preload = opts.preload || opts.pin;
        {
            let r = self.lock();
            match (r.entries.contains_key(name), replace) {
                (true, false) => return Err(AdapterError::Exists(name.to_string())),
                (false, true) => return Err(AdapterError::NotFound(name.to_string())),
                _ => {}
            }
            if preload {
                r.check_room(name)?;
            }
        }
        let host = if preload {
            Some(Arc::new(self.read(dir, limits)?))
        } else {
            for f in [CONFIG_FILE, WEIGHTS_FILE] {
                let path = dir.join(f);
                if !path.is_file() {
                    return Err(LoraError::Missing { path }.into());
                }
            }
            None
        };
        let mut r = self.lock();
        if !replace && r.entries.contains_key(name) {
            return Err(AdapterError::Exists(name.to_string()));
        }
        if preload {
            r.check_room(name)?;
        }
        let (id, clock) = (r.next_id, r.clock + 1);
        r.next_id += 1;
        r.clock = clock;
        let entry = Entry {
            dir: dir.to_path_buf(),
            id,
            rank: host.as_ref().map_or(0, |h| h.rank),
            host,
            last_used: clock,
            pinned: opts.pin,
        };
        let info = entry.info(name);
        r.entries.insert(name.to_string(), entry);
        r.evict(name);
        tracing::info!(
            "adapter '{name}' registered from {} (rank {}, preload {preload}, pin {})",
            dir.display(),
            info.rank,
            opts.pin
        );
        Ok(info)
    }

    /// Changes adapter `name`'s `pin` and `preload` (`None`: as it is)
    /// without reading it again unless it must now be held and is not.
    /// `preload=false` leaves weights already held in place.
    pub fn set_options(
        &self,
        name: &str,
        pin: Option<bool>,
        preload: Option<bool>,
    ) -> Result<AdapterInfo, AdapterError> {
        let mut r = self.lock();
        let limits = r.limits.ok_or(AdapterError::Disabled)?;
        let e = r
            .entries
            .get(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        let pin = pin.unwrap_or(e.pinned);
        if (pin && !e.pinned) || (e.host.is_none() && (pin || preload == Some(true))) {
            r.check_room(name)?;
        }
        if e.host.is_none() && (pin || preload == Some(true)) {
            let dir = e.dir.clone();
            drop(r);
            let h = Arc::new(self.read(&dir, limits)?);
            r = self.lock();
            r.check_room(name)?;
            let e = r
                .entries
                .get_mut(name)
                .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
            e.rank = h.rank;
            e.host = Some(h);
        }
        let e = r.touch(name)?;
        e.pinned = pin;
        let info = e.info(name);
        r.evict(name);
        Ok(info)
    }

    /// Whether adapter `name` is pinned (`None`: not registered).
    pub fn pinned(&self, name: &str) -> Option<bool> {
        self.lock().entries.get(name).map(|e| e.pinned)
    }

    /// Forgets adapter `name`; requests already running with it finish.
    pub fn unregister(&self, name: &str) -> Result<(), AdapterError> {
        match self.lock().entries.remove(name) {
            Some(_) => Ok(()),
            None => Err(AdapterError::NotFound(name.to_string())),
        }
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.lock().entries.iter().map(|(n, e)| e.info(n)).collect()
    }

    /// The weights of adapter `name` for a request, read again from its
    /// directory if they were evicted.
    pub fn resolve(&self, name: &str) -> Result<Resolved, AdapterError> {
        let mut r = self.lock();
        let limits = r.limits.ok_or(AdapterError::Disabled)?;
        let e = r.touch(name)?;
        let host = match &e.host {
            Some(h) => h.clone(),
            None => {
                let dir = e.dir.clone();
                r.check_room(name)?;
                drop(r);
                let h = Arc::new(self.read(&dir, limits)?);
                r = self.lock();
                let Some(e) = r.entries.get_mut(name) else {
                    return Err(AdapterError::NotFound(name.to_string()));
                };
                e.rank = h.rank;
                e.host = Some(h.clone());
                r.evict(name);
                h
            }
        };
        let id = r.entries.get(name).map_or(0, |e| e.id);
        Ok(Resolved { id, host })
    }
}

/// The adapters uploaded on the engine thread, each with how many of its
/// requests are unfinished.
pub(crate) struct Uploaded<B: Backend> {
    map: HashMap<u32, (LoraAdapter<B>, usize)>,
}

impl<B: Backend> Default for Uploaded<B> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<B: Backend> Uploaded<B> {
    /// Takes a reference to `r`'s weights on `be`, uploading them the first time.
    pub fn acquire(&mut self, be: &B, r: &Resolved) -> Result<(), LoraError> {
        match self.map.get_mut(&r.id) {
            Some((_, n)) => *n += 1,
            None => {
                let a = LoraAdapter::upload(be, &r.host)?;
                self.map.insert(r.id, (a, 1));
            }
        }
        Ok(())
    }

    /// Drops a reference to adapter `id`, freeing it with the last.
    pub fn release(&mut self, id: u32) {
        if let Some((_, n)) = self.map.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.map.remove(&id);
            }
        }
    }

    /// The step's groups: for each `(adapter id, rows)` with an id other
    /// than 0, the adapter and its rows.
    pub fn step(
        &self,
        rows: impl IntoIterator<Item = (u32, std::ops::Range<u32>)>,
    ) -> LoraStep<'_, B> {
        let mut groups: Vec<(&LoraAdapter<B>, Vec<u32>)> = Vec::new();
        let mut index: HashMap<u32, usize> = HashMap::new();
        for (id, range) in rows {
            let Some((a, _)) = self.map.get(&id) else {
                continue;
            };
            let i = *index.entry(id).or_insert_with(|| {
                groups.push((a, Vec::new()));
                groups.len() - 1
            });
            groups[i].1.extend(range);
        }
        LoraStep::new(groups)
    }
}

/// The adapter management an engine offers (DJL's adapters API and vLLM's
/// `/v1/load_lora_adapter` sit on these).
impl crate::Engine {
    /// Turns adapters on with `limits` (`option.enable_lora`); refused on
    /// CUDA, where adapters are not implemented yet.
    pub fn enable_adapters(&self, limits: AdapterLimits) -> Result<(), AdapterError> {
        self.adapter_registry().enable(limits)
    }

    /// The adapter limits, or `None` while adapters are off.
    pub fn adapter_limits(&self) -> Option<AdapterLimits> {
        self.adapter_registry().limits()
    }

    /// Reads the PEFT adapter in `dir`, checks it against the model and
    /// registers it as `name`. Blocking (reads files): call it off async threads.
    pub fn register_adapter(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        self.register_adapter_with(name, dir, AdapterOptions::default())
    }

    /// [`Engine::register_adapter`] with DJL's `preload` and `pin`: without
    /// preload only the files' presence is checked now and the weights are
    /// read at the first request; a pinned adapter is never evicted.
    pub fn register_adapter_with(
        &self,
        name: &str,
        dir: &Path,
        opts: AdapterOptions,
    ) -> Result<AdapterInfo, AdapterError> {
        self.adapter_registry().register(name, dir, false, opts)
    }

    /// Replaces the registered adapter `name` with the one in `dir`, read
    /// now; it stays pinned if it was.
    pub fn update_adapter(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        self.update_adapter_with(name, Some(dir), None, None)
    }

    /// DJL's update: with `dir`, the adapter is registered again from it
    /// (`pin` as given or as it was, `preload` as given or true); without,
    /// only its `pin` and `preload` change (loading it if it must now be held).
    pub fn update_adapter_with(
        &self,
        name: &str,
        dir: Option<&Path>,
        pin: Option<bool>,
        preload: Option<bool>,
    ) -> Result<AdapterInfo, AdapterError> {
        let reg = self.adapter_registry();
        match dir {
            Some(dir) => {
                let was = reg
                    .pinned(name)
                    .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
                let opts = AdapterOptions {
                    preload: preload.unwrap_or(true),
                    pin: pin.unwrap_or(was),
                };
                reg.register(name, dir, true, opts)
            }
            None => reg.set_options(name, pin, preload),
        }
    }

    /// Forgets adapter `name`.
    pub fn unregister_adapter(&self, name: &str) -> Result<(), AdapterError> {
        self.adapter_registry().unregister(name)
    }

    /// The registered adapters, by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.adapter_registry().list()
    }

    /// The registered adapter `name`.
    pub fn adapter(&self, name: &str) -> Option<AdapterInfo> {
        self.adapters().into_iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::BlockManager;
    use crate::scheduler::{Scheduler, SchedulerConfig, SeqKv};

    fn seq(id: u64, adapter: u32) -> SeqKv {
        let mut s = SeqKv::new(id, (0..8).collect());
        (s.adapter, s.salt) = (adapter, salt(adapter));
        s
    }

    #[test]
    fn max_loras_keeps_other_adapters_waiting_in_order() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_running: 8,
                max_step_tokens: 1000,
            },
            BlockManager::new(64, 4),
        );
        s.max_adapters = 2;
        for (id, a) in [(1, 1), (2, 2), (3, 3), (4, 0), (5, 1), (6, 4)] {
            s.add(seq(id, a));
        }
        // Adapters 1 and 2 fill the batch's two places; 3 and 4 wait, the
        // base and more rows of adapter 1 do not.
        assert_eq!(s.schedule().admitted, vec![1, 2, 4, 5]);
        assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![3, 6]);
        s.remove(2);
        assert_eq!(s.schedule().admitted, vec![3]);
        s.remove(1);
        s.remove(5);
        assert_eq!(s.schedule().admitted, vec![6]);
    }

    #[test]
    fn salts_are_distinct_and_the_base_keeps_zero() {
        assert_eq!(salt(0), 0);
        let s: std::collections::HashSet<u64> = (1..1000).map(salt).collect();
        assert_eq!(s.len(), 999);
        assert!(!s.contains(&0));
    }
}
