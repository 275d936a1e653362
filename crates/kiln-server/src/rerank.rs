//! Reranking with cross-encoders: `POST /v1/rerank` and `/rerank` in the
//! shape Cohere, Jina and vLLM clients send (`query`, `documents`, `top_n`,
//! `return_documents`). A model directory whose `config.json` names
//! `BertForSequenceClassification` is served here, beside the engines.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_backend::cpu::CpuBackend;
use kiln_model::encoder::{CrossEncoder, EmbedError};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::error::ApiError;
use crate::state::AppState;

/// The most documents one request may carry.
pub const MAX_DOCUMENTS: usize = 1000;

/// One loaded reranker.
pub struct Reranker {
    pub model: CrossEncoder<CpuBackend>,
    backend: CpuBackend,
}

/// Every reranker, by name.
#[derive(Default)]
pub struct Rerankers {
    models: RwLock<BTreeMap<String, Arc<Reranker>>>,
}

/// Whether the model at `url` is a cross-encoder this module serves.
pub fn claims(url: &str) -> bool {
    let path = Path::new(url).join("config.json");
    path.is_file()
        && std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|c| CrossEncoder::<CpuBackend>::is_cross_encoder(&c))
}

impl Rerankers {
    /// Loads the cross-encoder in directory `url` as `name`.
    pub fn load(&self, name: &str, url: &str) -> Result<(), String> {
        let backend = CpuBackend::new();
        let model = CrossEncoder::load(Path::new(url), &backend).map_err(|e| e.to_string())?;
        let mut models = self
            .models
            .write()
            .map_err(|_| "lock poisoned".to_string())?;
        if models.contains_key(name) {
            return Err(format!("model '{name}' is already registered"));
        }
        models.insert(name.to_string(), Arc::new(Reranker { model, backend }));
        Ok(())
    }

    /// A model by name.
    pub fn get(&self, name: &str) -> Option<Arc<Reranker>> {
        self.models.read().ok()?.get(name).cloned()
    }

    /// The names of every reranker, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A parsed rerank body.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<String>,
    pub top_n: Option<usize>,
    pub return_documents: bool,
}

/// Parses and checks a rerank body; every field is used or refused.
pub fn parse_request(v: &Value) -> Result<RerankRequest, ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "model" | "query" | "documents" | "top_n" | "return_documents"
        ) {
            return Err(ApiError::bad_request(format!(
                "unknown field '{k}' (accepted: model, query, documents, top_n, return_documents)"
            )));
        }
    }
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad_request("'model' must be a string")),
    };
    let query = match obj.get("query") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ApiError::bad_request("'query' must be a non-empty string")),
    };
    let docs = obj
        .get("documents")
        .and_then(Value::as_array)
        .filter(|d| !d.is_empty() && d.len() <= MAX_DOCUMENTS)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "'documents' must be a list of 1 to {MAX_DOCUMENTS} documents"
            ))
        })?;
    let documents = docs
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => match o.get("text") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(ApiError::bad_request(format!(
                    "documents[{i}] must be a string or an object with a 'text' string"
                ))),
            },
            _ => Err(ApiError::bad_request(format!(
                "documents[{i}] must be a string or an object with a 'text' string"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let top_n = match obj.get("top_n") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .filter(|&n| n >= 1)
                .ok_or_else(|| ApiError::bad_request("'top_n' must be a positive integer"))?
                as usize,
        ),
    };
    let return_documents = match obj.get("return_documents") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'return_documents' must be a boolean",
            ))
        }
    };
    Ok(RerankRequest {
        model,
        query,
        documents,
        top_n,
        return_documents,
    })
}

/// `POST /v1/rerank` and `/rerank`.
pub async fn rerank(
    State(st): State<Arc<AppState>>,
    Extension(rec): Extension<Arc<AccessRecord>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(st, rec, body)
        .await
        .unwrap_or_else(|e| e.openai().into_response())
}

async fn run(
    st: Arc<AppState>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_request(&crate::body::json(body)?)?;
    let name = match &req.model {
        Some(m) => m.clone(),
        None => match st.rerankers.names()[..] {
            [ref one] => one.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "'model' is required unless exactly one reranker is served",
                ))
            }
        },
    };
    rec.set_model(&name);
    let Some(m) = st.rerankers.get(&name) else {
        if st.registry.get(&name).is_ok() || st.embedders.get(&name).is_some() {
            return Err(ApiError::bad_request(format!(
                "model '{name}' is not a reranker (a cross-encoder)"
            )));
        }
        return Err(ApiError::unknown_model(&name));
    };
    let query = req.query.clone();
    let docs = req.documents.clone();
    let (logits, tokens) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let pairs = docs
            .iter()
            .map(|d| {
                m.model
                    .encode_pair(&query, d)
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tokens: usize = pairs.iter().map(|p| p.0.len()).sum();
        let logits = m.model.logits(&m.backend, &pairs).map_err(|e| match e {
            EmbedError::Input(e) => ApiError::bad_request(e.to_string()),
            EmbedError::Model(e) => ApiError::model_failure(e.to_string()),
        })?;
        Ok((logits, tokens))
    })
    .await
    .map_err(|e| ApiError::model_failure(format!("rerank task failed: {e}")))??;
    rec.add_tokens_in(tokens);
    // One label: the score is its sigmoid, as sentence-transformers' CrossEncoder gives.
    let mut order: Vec<(usize, f32)> = logits
        .iter()
        .map(|&l| 1.0 / (1.0 + (-l).exp()))
        .enumerate()
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(req.top_n.unwrap_or(order.len()));
    let results: Vec<Value> = order
        .into_iter()
        .map(|(i, score)| {
            let mut r = json!({"index": i, "relevance_score": score});
            if req.return_documents {
                r["document"] = json!({"text": req.documents[i]});
            }
            r
        })
        .collect();
    Ok(Json(json!({
        "id": format!("rerank-{}", uuid_like()),
        "model": name,
        "results": results,
        "usage": {"total_tokens": tokens},
    }))
    .into_response())
}

/// A unique-enough id for a response (time and a counter).
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{t:x}{:x}", N.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cohere_and_jina_shapes() {
        let r = parse_request(&json!({"model": "m", "query": "q",
            "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": false}))
        .unwrap();
        assert_eq!(r.documents, vec!["a", "b"]);
        assert_eq!((r.top_n, r.return_documents), (Some(1), false));
        for bad in [
            json!({"query": "q", "documents": []}),
            json!({"query": "", "documents": ["a"]}),
            json!({"query": "q", "documents": [1]}),
            json!({"query": "q", "documents": ["a"], "top_n": 0}),
            json!({"query": "q", "documents": ["a"], "rank_fields": ["x"]}),
        ] {
            assert!(parse_request(&bad).is_err(), "{bad}");
        }
    }
}
