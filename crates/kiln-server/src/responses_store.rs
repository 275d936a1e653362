//! Stored responses for `/v1/responses`: what `previous_response_id`,
//! `GET /v1/responses/{id}` and `DELETE /v1/responses/{id}` read. OpenAI
//! keeps responses for 30 days; a self-hosted server must not grow without
//! bound, so kiln keeps them in memory, bounded both in count (the oldest is
//! evicted first) and in age (an expired response is gone), with two
//! settings read once from the environment:
//!
//! - `KILN_RESPONSES_MAX_STORED` (default 1024; 0 stores nothing),
//! - `KILN_RESPONSES_TTL_SECS` (default 3600),
//! - `KILN_RESPONSES_MAX_STORED_MIB` (default 256): the JSON size of all
//!   stored responses and their conversations together, the oldest evicted
//!   first (a conversation is stored whole with each of its responses).
//!
//! Nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Default most responses kept.
pub const DEFAULT_MAX_STORED: usize = 1024;
/// Default age after which a stored response is gone.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default most bytes (JSON) kept in all.
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// One stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The response object as `GET /v1/responses/{id}` answers it.
    pub response: Value,
    /// The request's own input items (ids added), for `input_items`.
    pub input_items: Vec<Value>,
    /// The whole conversation up to and including this response's output,
    /// as input items: what a `previous_response_id` to it continues.
    pub history: Vec<Value>,
}

/// The bounded store.
#[derive(Debug)]
pub struct ResponseStore {
    max: usize,
    ttl: Duration,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each response with when it was stored and its size.
    map: HashMap<String, (Instant, usize, Stored)>,
    /// The sizes of the stored responses, summed.
    bytes: usize,
    /// Ids in insertion order (the oldest first).
    order: VecDeque<String>,
}

impl ResponseStore {
    /// A store keeping at most `max` responses, `max_bytes` in all, for
    /// at most `ttl`.
    pub fn new(max: usize, ttl: Duration, max_bytes: usize) -> Self {
        Self {
            max,
            ttl,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The process's store, its bounds read from the environment once.
    pub fn global() -> &'static ResponseStore {
        static S: OnceLock<ResponseStore> = OnceLock::new();
        S.get_or_init(|| {
            let max = setting("KILN_RESPONSES_MAX_STORED", DEFAULT_MAX_STORED as u64) as usize;
            let ttl =
                Duration::from_secs(setting("KILN_RESPONSES_TTL_SECS", DEFAULT_TTL.as_secs()));
            let mib = setting(
                "KILN_RESPONSES_MAX_STORED_MIB",
                (DEFAULT_MAX_BYTES >> 20) as u64,
            );
            let max_bytes = usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
            ResponseStore::new(max, ttl, max_bytes)
        })
    }

    /// How long a response is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `stored` under `id`, evicting the oldest beyond the count bound.
    pub fn put(&self, id: String, stored: Stored) {
        if self.max == 0 {
            return;
        }
        let size = size(&stored);
        if size > self.max_bytes {
            tracing::warn!(
                "response {id} is {size} bytes, more than the store's bound \
                 (KILN_RESPONSES_MAX_STORED_MIB); not stored"
            );
            return;
        }
        let mut g = self.lock();
        Self::expire(&mut g, self.ttl);
        match g.map.insert(id.clone(), (Instant::now(), size, stored)) {
            None => g.order.push_back(id),
            Some((_, old, _)) => g.bytes -= old,
        }
        g.bytes += size;
        while g.order.len() > self.max || g.bytes > self.max_bytes {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.remove(&old);
        }
    }

    /// The response stored under `id`, if it is there and not expired.
    pub fn get(&self, id: &str) -> Option<Stored> {
        let mut g = self.lock();
        Self::expire(&mut g, self.ttl);
        g.map.get(id).map(|(_, _, s)| s.clone())
    }

    /// Removes `id`; whether it was there.
    pub fn delete(&self, id: &str) -> bool {
        let mut g = self.lock();
        Self::expire(&mut g, self.ttl);
        let had = g.remove(id);
        if had {
            g.order.retain(|k| k != id);
        }
        had
    }

    /// Drops the responses older than `ttl` (the oldest are at the front).
    fn expire(g: &mut Inner, ttl: Duration) {
        while let Some(id) = g.order.front() {
            let old = g.map.get(id).is_none_or(|(t, _, _)| t.elapsed() >= ttl);
            if !old {
                break;
            }
            if let Some(id) = g.order.pop_front() {
                g.remove(&id);
            }
        }
    }
}

impl Inner {
    /// Drops `id` from the map (not from `order`); whether it was there.
    fn remove(&mut self, id: &str) -> bool {
        match self.map.remove(id) {
            Some((_, size, _)) => {
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
}

/// A stored response's size: its JSON, input items and conversation.
fn size(s: &Stored) -> usize {
    let json = |v: &Value| serde_json::to_string(v).map_or(0, |t| t.len());
    json(&s.response)
        + s.input_items.iter().map(json).sum::<usize>()
        + s.history.iter().map(json).sum::<usize>()
}

/// A non-negative integer setting from the environment; an unreadable one
/// is reported and the default used.
fn setting(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!("{name}={v:?} is not a non-negative integer; using {default}");
            default
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(n: u64) -> Stored {
        Stored {
            response: serde_json::json!({"n": n}),
            input_items: Vec::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn the_oldest_goes_first_beyond_the_count() {
        let s = ResponseStore::new(2, Duration::from_secs(60), 1 << 20);
        s.put("a".into(), one(1));
        s.put("b".into(), one(2));
        s.put("c".into(), one(3));
        assert!(s.get("a").is_none());
        assert_eq!(s.get("b").unwrap().response["n"], 2);
        assert_eq!(s.get("c").unwrap().response["n"], 3);
        assert!(s.delete("b"));
        assert!(!s.delete("b"));
        assert!(s.get("b").is_none());
    }

    #[test]
    fn the_oldest_goes_first_beyond_the_bytes() {
        let one_size = size(&one(1));
        let s = ResponseStore::new(100, Duration::from_secs(60), 2 * one_size + 1);
        s.put("a".into(), one(1));
        s.put("b".into(), one(2));
        assert!(s.get("a").is_some());
        s.put("c".into(), one(3));
        assert!(s.get("a").is_none());
        assert!(s.get("b").is_some() && s.get("c").is_some());
        // One larger than the whole bound is not stored (and evicts nothing).
        let mut big = one(4);
        big.history = vec![serde_json::json!("x".repeat(4 * one_size))];
        s.put("d".into(), big);
        assert!(s.get("d").is_none());
        assert!(s.get("b").is_some() && s.get("c").is_some());
        assert!(s.delete("b") && s.delete("c"));
        assert_eq!(s.lock().bytes, 0);
    }

    #[test]
    fn expired_responses_are_gone() {
        let s = ResponseStore::new(8, Duration::from_millis(30), 1 << 20);
        s.put("a".into(), one(1));
        assert!(s.get("a").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.get("a").is_none());
    }

    #[test]
    fn a_zero_bound_stores_nothing() {
        let s = ResponseStore::new(0, Duration::from_secs(60), 1 << 20);
        s.put("a".into(), one(1));
        assert!(s.get("a").is_none());
    }
}
