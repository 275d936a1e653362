//! What `/v1/embeddings`, the LMI route for embedding models and
//! `/v1/rerank` share: the body's object and field checks, finding the
//! model a request names (or the only one of its kind), text inputs checked
//! and tokenized, and the model's errors mapped to 4xx / 424.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::access::AccessRecord;
use crate::encoder_pool::{EncoderPool, EncoderStats, PoolEntry};
use crate::error::ApiError;
use crate::state::AppState;
use kiln_model::encoder::EmbedError;

/// Which kind of encoder a route serves, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Rerank,
}

impl Role {
    fn noun(self) -> &'static str {
        match self {
            Self::Embedding => "embedding model",
            Self::Rerank => "reranker",
        }
    }

    fn wrong_kind(self, name: &str) -> String {
        match self {
            Self::Embedding => format!("model '{name}' is not an embedding model"),
            Self::Rerank => format!("model '{name}' is not a reranker (a cross-encoder)"),
        }
    }
}

/// The body as a JSON object whose keys are all in `accepted`; any other
/// key is refused by name (no field is silently ignored).
pub fn object<'a>(v: &'a Value, accepted: &[&str]) -> Result<&'a Map<String, Value>, ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| !accepted.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown field '{k}' (accepted: {})",
            accepted.join(", ")
        )));
    }
    Ok(obj)
}

/// The optional `model` string of a body.
pub fn model_field(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request("'model' must be a string")),
    }
}

/// The model of `pool` a request names, or the only one when it names none;
/// a model of another kind is a 400 saying so, an unknown name a 404. The
/// access record gets the name.
pub fn resolve<T>(
    st: &AppState,
    pool: &EncoderPool<T>,
    role: Role,
    requested: Option<String>,
    rec: &AccessRecord,
) -> Result<Arc<PoolEntry<T>>, ApiError> {
    let name = match requested {
        Some(m) => m,
        None => match &pool.names()[..] {
            [one] => one.clone(),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "'model' is required unless exactly one {} is served",
                    role.noun()
                )))
            }
        },
    };
    rec.set_model(&name);
    if let Some(m) = pool.get(&name) {
        return Ok(m);
    }
    let elsewhere = st.registry.get(&name).is_ok()
        || st.embedders.get(&name).is_some()
        || st.rerankers.get(&name).is_some();
    if elsewhere {
        return Err(ApiError::bad_request(role.wrong_kind(&name)));
    }
    Err(ApiError::unknown_model(&name))
}

/// A list of strings from `v` (one string is a list of one), with at most
/// `max` items; `what` names the field in the error.
pub fn texts(v: Option<&Value>, what: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "'{what}' must be a string or a list of 1 to {max} strings"
        ))
    };
    match v {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= max => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// Token ids of each text through `tokenize`; an empty string is refused
/// (it would embed only the special tokens).
pub fn tokenize_all(
    texts: &[String],
    what: &str,
    tokenize: impl Fn(&str) -> kiln_model::Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    texts
        .iter()
        .map(|t| {
            if t.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "'{what}' must not contain empty strings"
                )));
            }
            tokenize(t).map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .collect()
}

/// A bad input is the request's fault (400); anything else the model's (424).
pub fn embed_error(e: EmbedError) -> ApiError {
    match e {
        EmbedError::Input(e) => ApiError::bad_request(e.to_string()),
        EmbedError::Model(e) => ApiError::model_failure(e.to_string()),
    }
}

/// Set when the client of a request has gone away; the work checks it
/// between batches and stops.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Whether the client has gone.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// An error (that no client will read) once the client has gone.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.is_set() {
            return Err(ApiError::unavailable("the client went away"));
        }
        Ok(())
    }
}

/// The most sequences of one encoder forward pass. A request's inputs run
/// in batches (the vectors are the same bits in any batch), so a client
/// that leaves stops its work within one batch.
pub const BATCH_SEQS: usize = 32;
/// The most tokens of one cross-encoder forward pass (an embedding model
/// says its own: [`kiln_model::encoder::EmbeddingModel::batch_tokens`]).
pub const BATCH_TOKENS: usize = 16384;

/// Consecutive index ranges of `lens` of at most [`BATCH_SEQS`] sequences
/// and `max_tokens` tokens (one longer sequence is a batch alone).
pub fn batches(lens: &[usize], max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &n) in lens.iter().enumerate() {
        if i > start && (i - start == BATCH_SEQS || tokens + n > max_tokens) {
            out.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += n;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// Counts a request as waiting, then running, then finished or cancelled,
/// and sets its [`Cancel`] if the request's future is dropped (the client
/// disconnected) before the work is done.
struct Watch<'a> {
    stats: &'a EncoderStats,
    cancel: Cancel,
    waiting: bool,
    started: bool,
    done: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.cancel.0.store(true, Ordering::SeqCst);
        if self.waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if !self.started {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Runs `work` on model `m` on a blocking thread, one request at a time
/// per model (in arrival order). If the client goes away while the request
/// waits, it is dropped before any work; while it runs, `work` sees its
/// [`Cancel`] set and stops at its next batch.
pub async fn run<M: Send + Sync + 'static, T: Send + 'static>(
    m: Arc<PoolEntry<M>>,
    what: &'static str,
    work: impl FnOnce(&PoolEntry<M>, &Cancel) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let cancel = Cancel::default();
    m.stats.waiting.fetch_add(1, Ordering::SeqCst);
    let mut watch = Watch {
        stats: &m.stats,
        cancel: cancel.clone(),
        waiting: true,
        started: false,
        done: false,
    };
    let permit = m
        .gate
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable(format!("the {what} model is being removed")))?;
    m.stats.waiting.fetch_sub(1, Ordering::SeqCst);
    watch.waiting = false;
    watch.started = true;
    let entry = m.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let stats = &entry.stats;
        stats.running.fetch_add(1, Ordering::SeqCst);
        let r = work(&entry, &cancel);
        stats.running.fetch_sub(1, Ordering::SeqCst);
        let counter = if cancel.is_set() {
            &stats.cancelled
        } else {
            &stats.finished
        };
        counter.fetch_add(1, Ordering::SeqCst);
        r
    })
    .await;
    watch.done = true;
    joined.map_err(|e| ApiError::model_failure(format!("{what} task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_and_bad_models_are_named() {
        let e = object(&json!({"a": 1, "b": 2}), &["a"]).unwrap_err();
        assert_eq!(e.message, "unknown field 'b' (accepted: a)");
        let e = object(&json!([1]), &["a"]).unwrap_err();
        assert_eq!(e.message, "the body must be a JSON object");
        let o = json!({"model": 3});
        let e = model_field(o.as_object().unwrap()).unwrap_err();
        assert_eq!(e.message, "'model' must be a string");
    }

    #[test]
    fn batches_cut_by_count_and_tokens() {
        assert!(batches(&[], BATCH_TOKENS).is_empty());
        assert_eq!(batches(&[5; 70], BATCH_TOKENS), vec![0..32, 32..64, 64..70]);
        let big = BATCH_TOKENS - 10;
        assert_eq!(
            batches(&[big, 20, 5, BATCH_TOKENS + 1, 1], BATCH_TOKENS),
            vec![0..1, 1..3, 3..4, 4..5]
        );
    }

    #[test]
    fn texts_take_a_string_or_a_bounded_list() {
        assert_eq!(texts(Some(&json!("a")), "x", 2).unwrap(), vec!["a"]);
        assert_eq!(
            texts(Some(&json!(["a", "b"])), "x", 2).unwrap(),
            vec!["a", "b"]
        );
        for bad in [json!([]), json!(["a", "b", "c"]), json!([1]), json!(null)] {
            let e = texts(Some(&bad), "x", 2).unwrap_err();
            assert_eq!(
                e.message, "'x' must be a string or a list of 1 to 2 strings",
                "{bad}"
            );
        }
        let e = tokenize_all(&["".into()], "x", |_| Ok(vec![1])).unwrap_err();
        assert_eq!(e.message, "'x' must not contain empty strings");
    }
}
