//! Reranking with cross-encoders: `POST /v1/rerank` and `/rerank` in the
//! shape Cohere, Jina and vLLM clients send (`query`, `documents`, `top_n`,
//! `return_documents`). A model directory whose `config.json` names
//! `BertForSequenceClassification` or `XLMRobertaForSequenceClassification`
//! (bge-reranker) is served here, beside the engines.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_backend::cpu::CpuBackend;
use kiln_model::encoder::CrossEncoder;
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::encoder_pool::EncoderPool;
use crate::encoder_request::{self as req, Role};
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
pub type Rerankers = EncoderPool<Reranker>;

/// Whether the model at `url` is a cross-encoder this module serves.
pub fn claims(url: &str) -> bool {
    let path = Path::new(url).join("config.json");
    path.is_file()
        && std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|c| CrossEncoder::<CpuBackend>::is_cross_encoder(&c))
}

impl Reranker {
    /// Loads the cross-encoder in directory `url`.
    pub fn load(url: &str) -> Result<Self, String> {
        let backend = CpuBackend::new();
        let model = CrossEncoder::load(Path::new(url), &backend).map_err(|e| e.to_string())?;
        Ok(Self { model, backend })
    }
}

impl Rerankers {
    /// Loads the cross-encoder in directory `url` as `name`.
    pub fn load(&self, name: &str, url: &str) -> Result<(), String> {
        self.insert(name, url, Reranker::load(url)?)
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
    let obj = req::object(
        v,
        &["model", "query", "documents", "top_n", "return_documents"],
    )?;
    let model = req::model_field(obj)?;
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
    let request = parse_request(&crate::body::json(body)?)?;
    let m = req::resolve(
        &st,
        &st.rerankers,
        Role::Rerank,
        request.model.clone(),
        &rec,
    )?;
    let name = m.name.clone();
    let query = request.query.clone();
    let docs = request.documents.clone();
    let (logits, tokens) = req::run(m, "rerank", move |m, cancel| {
        let r = &m.model;
        let pairs = docs
            .iter()
            .map(|d| {
                r.model
                    .encode_pair(&query, d)
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        r.model
            .check(&pairs)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let lens: Vec<usize> = pairs.iter().map(|p| p.0.len()).collect();
        let mut logits = Vec::with_capacity(pairs.len());
        for batch in req::batches(&lens, req::BATCH_TOKENS) {
            cancel.check()?;
            let n = batch.len();
            let part = r.model.logits(&r.backend, &pairs[batch]);
            logits.extend(part.map_err(req::embed_error)?);
            m.stats.inputs.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok((logits, lens.iter().sum::<usize>()))
    })
    .await?;
    rec.add_tokens_in(tokens);
    // One label: the score is its sigmoid, as sentence-transformers' CrossEncoder gives.
    let mut order: Vec<(usize, f32)> = logits
        .iter()
        .map(|&l| 1.0 / (1.0 + (-l).exp()))
        .enumerate()
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(request.top_n.unwrap_or(order.len()));
    let results: Vec<Value> = order
        .into_iter()
        .map(|(i, score)| {
            let mut r = json!({"index": i, "relevance_score": score});
            if request.return_documents {
                r["document"] = json!({"text": request.documents[i]});
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
