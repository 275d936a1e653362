//! The models served beside the engines, by name: embedding models and
//! cross-encoder rerankers. One generic store holds either kind, with when
//! and from where each was loaded, so that `/v1/embeddings`, `/v1/rerank`
//! and the management routes see them the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::sync::Semaphore;

/// What a model's requests did, for `GET /models/{name}` (DJL's
/// `requestInQueue` / `requestInFlight`, and kiln's counts).
#[derive(Default)]
pub struct EncoderStats {
    /// Requests waiting for the model.
    pub waiting: AtomicUsize,
    /// Requests being computed (0 or 1: one batch at a time).
    pub running: AtomicUsize,
    /// Requests answered (or refused after they started).
    pub finished: AtomicU64,
    /// Requests whose client went away first: dropped from the queue, or
    /// stopped between two batches of their inputs.
    pub cancelled: AtomicU64,
    /// Inputs (sequences, or query-document pairs) computed.
    pub inputs: AtomicU64,
}

/// One model of a pool, with where it came from.
pub struct PoolEntry<T> {
    pub name: String,
    /// The url (directory) it was loaded from.
    pub url: String,
    pub registered_at: SystemTime,
    pub model: T,
    pub stats: EncoderStats,
    /// One request computes at a time (the CPU backend already uses every
    /// core for one batch); the others wait here, where a client that
    /// leaves drops its request before any work is done.
    pub gate: Arc<Semaphore>,
}

/// Models of one kind, by name.
pub struct EncoderPool<T> {
    models: RwLock<BTreeMap<String, Arc<PoolEntry<T>>>>,
}

impl<T> Default for EncoderPool<T> {
    fn default() -> Self {
        Self {
            models: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<T> EncoderPool<T> {
    /// Adds a loaded model as `name`; a name already taken is refused.
    pub fn insert(&self, name: &str, url: &str, model: T) -> Result<(), String> {
        let mut models = self
            .models
            .write()
            .map_err(|_| "lock poisoned".to_string())?;
        if models.contains_key(name) {
            return Err(format!("model '{name}' is already registered"));
        }
        models.insert(
            name.to_string(),
            Arc::new(PoolEntry {
                name: name.to_string(),
                url: url.to_string(),
                registered_at: SystemTime::now(),
                model,
                stats: EncoderStats::default(),
                gate: Arc::new(Semaphore::new(1)),
            }),
        );
        Ok(())
    }

    /// A model by name.
    pub fn get(&self, name: &str) -> Option<Arc<PoolEntry<T>>> {
        self.models.read().ok()?.get(name).cloned()
    }

    /// Removes a model; requests holding it finish with it.
    pub fn remove(&self, name: &str) -> Option<Arc<PoolEntry<T>>> {
        self.models.write().ok()?.remove(name)
    }

    /// Every model, sorted by name.
    pub fn all(&self) -> Vec<Arc<PoolEntry<T>>> {
        self.models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The names of every model, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}
