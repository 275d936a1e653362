//! Embedding models and `/v1/embeddings` (OpenAI's shape).
//!
//! An embedding model is a model-store entry (or `--models NAME=DIR`) whose
//! `config.json` is a BERT-style encoder (`model_type` bert / xlm-roberta),
//! or whose `serving.properties` says `option.task=text_embedding` as DJL's
//! LMI does. Such entries are held here, beside the generation registry,
//! and never reach the engine: an embedding is one forward pass, with no KV
//! cache and no scheduling.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_backend::cpu::CpuBackend;
use kiln_model::encoder::{l2_normalize, EmbeddingModel};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::encoder_pool::{EncoderPool, PoolEntry};
use crate::encoder_request::{self as req, Role};
use crate::error::ApiError;
use crate::state::AppState;

/// The most inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// One loaded embedding model.
pub struct Embedder {
    pub model: EmbeddingModel<CpuBackend>,
    backend: CpuBackend,
    /// The output sizes `dimensions` may ask for: `Some(empty)` for any size
    /// up to the model's, `None` when the model is not trained for
    /// truncation (`dimensions` is refused). From `config.json`'s
    /// `is_matryoshka` / `matryoshka_dimensions`, the fields vLLM reads.
    pub matryoshka: Option<Vec<usize>>,
}

/// Every embedding model, by name.
pub type Embedders = EncoderPool<Embedder>;

/// Whether the model at `url` (a local directory) is an embedding model.
pub fn claims(url: &str) -> bool {
    let dir = Path::new(url);
    dir.is_dir() && (kiln_model::encoder::is_encoder_dir(dir) || task_is_embedding(dir))
}

/// `option.task=text_embedding` (or `embedding`) in `serving.properties`.
fn task_is_embedding(dir: &Path) -> bool {
    let Ok(text) = kiln_model::files::read_text_bounded(
        &dir.join("serving.properties"),
        1 << 20,
        "a serving.properties",
    ) else {
        return false;
    };
    text.lines().any(|l| {
        let mut kv = l.splitn(2, '=');
        kv.next().map(str::trim) == Some("option.task")
            && matches!(
                kv.next().map(str::trim),
                Some("text_embedding" | "embedding")
            )
    })
}

fn matryoshka(dir: &Path) -> Option<Vec<usize>> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let cfg: Value = serde_json::from_str(&text).ok()?;
    if let Some(list) = cfg.get("matryoshka_dimensions").and_then(Value::as_array) {
        return Some(
            list.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect(),
        );
    }
    (cfg.get("is_matryoshka").and_then(Value::as_bool) == Some(true)).then(Vec::new)
}

impl Embedder {
    /// Loads the embedding model in directory `url`.
    pub fn load(url: &str) -> Result<Self, String> {
        let dir = Path::new(url);
        if !kiln_model::encoder::is_encoder_dir(dir) {
            return Err(format!(
                "{url}: option.task=text_embedding needs a BERT or XLM-RoBERTa checkpoint \
                 (config.json model_type bert / xlm-roberta) or a qwen3 / qwen2 / llama / mistral \
                 checkpoint with sentence-transformers files (modules.json)"
            ));
        }
        let backend = CpuBackend::new();
        let model = EmbeddingModel::load(dir, &backend).map_err(|e| e.to_string())?;
        Ok(Self {
            model,
            backend,
            matryoshka: matryoshka(dir),
        })
    }
}

impl Embedders {
    /// Loads the embedding model in directory `url` as `name`.
    pub fn load(&self, name: &str, url: &str) -> Result<(), String> {
        self.insert(name, url, Embedder::load(url)?)
    }
}

/// The inputs of a request, as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

/// How vectors are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    /// Little-endian f32 bytes in standard base64 (what OpenAI's clients decode).
    Base64,
}

/// A parsed `/v1/embeddings` body.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Inputs,
    pub encoding: Encoding,
    pub dimensions: Option<usize>,
    /// kiln's extension (TEI's `/embed` field): which sentence-transformers
    /// prompt goes before text inputs; `None` is the model's default prompt.
    pub prompt_name: Option<String>,
}

fn ids_of(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

/// Parses and checks a request body; every field is used or refused.
pub fn parse_request(v: &Value) -> Result<EmbeddingRequest, ApiError> {
    let obj = req::object(
        v,
        &[
            "model",
            "input",
            "encoding_format",
            "dimensions",
            "user",
            "prompt_name",
        ],
    )?;
    let model = req::model_field(obj)?;
    let bad_input = || {
        ApiError::bad_request(
            "'input' must be a string, a list of strings, a list of token ids or a list of token-id lists",
        )
    };
    let input = match obj.get("input") {
        None => return Err(ApiError::bad_request("'input' is required")),
        Some(Value::String(s)) => Inputs::Texts(vec![s.clone()]),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad_request("'input' must not be an empty list"))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Inputs::Texts(
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        ),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            Inputs::Ids(vec![ids_of(&Value::Array(a.clone())).ok_or_else(bad_input)?])
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => Inputs::Ids(
            a.iter()
                .map(ids_of)
                .collect::<Option<_>>()
                .ok_or_else(bad_input)?,
        ),
        Some(_) => return Err(bad_input()),
    };
    let n = match &input {
        Inputs::Texts(t) => t.len(),
        Inputs::Ids(i) => i.len(),
    };
    if n > MAX_INPUTS {
        return Err(ApiError::bad_request(format!(
            "'input' has {n} items, more than {MAX_INPUTS}"
        )));
    }
    let encoding = match obj.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'encoding_format' must be 'float' or 'base64', not {other}"
            )))
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => match d.as_u64() {
            Some(d) if d >= 1 => Some(usize::try_from(d).unwrap_or(usize::MAX)),
            _ => {
                return Err(ApiError::bad_request(
                    "'dimensions' must be a positive integer",
                ))
            }
        },
    };
    if let Some(Value::String(_)) | None | Some(Value::Null) = obj.get("user") {
    } else {
        return Err(ApiError::bad_request("'user' must be a string"));
    }
    let prompt_name = match obj.get("prompt_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad_request("'prompt_name' must be a string")),
    };
    Ok(EmbeddingRequest {
        model,
        input,
        encoding,
        dimensions,
        prompt_name,
    })
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Cuts `v` to `dims` values and, for a model whose embeddings are
/// normalised, scales the cut vector back to unit length.
pub fn truncate(v: &mut Vec<f32>, dims: usize, normalize: bool) {
    v.truncate(dims);
    if normalize {
        l2_normalize(v);
    }
}

/// Tokenizes (text inputs) and embeds on a blocking thread, in batches
/// that stop when the client leaves: the vectors and the number of tokens
/// they took.
async fn compute(
    m: Arc<PoolEntry<Embedder>>,
    input: Inputs,
    prompt_name: Option<String>,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    req::run(m, "embedding", move |m, cancel| {
        let e = &m.model;
        let ids = match input {
            // Token ids are the model's input as they stand (no prompt).
            Inputs::Ids(ids) => ids,
            Inputs::Texts(texts) => {
                if texts.iter().any(String::is_empty) {
                    return Err(ApiError::bad_request(
                        "'input' must not contain empty strings",
                    ));
                }
                let texts = texts
                    .iter()
                    .map(|t| e.model.prompted(t, prompt_name.as_deref()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                req::tokenize_all(&texts, "input", |t| e.model.tokenize(t))?
            }
        };
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        e.model
            .check(&refs)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let mut vecs = Vec::with_capacity(ids.len());
        for batch in req::batches(&lens, e.model.batch_tokens()) {
            cancel.check()?;
            let n = batch.len();
            vecs.extend(
                e.model
                    .embed(&e.backend, &refs[batch])
                    .map_err(req::embed_error)?,
            );
            m.stats.inputs.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok((vecs, lens.iter().sum()))
    })
    .await
}

/// DJL's LMI route for an embedding model (`POST /predictions/{model}`):
/// `{"inputs": "text"}` or `{"inputs": ["a", "b"]}`, answered with a list of
/// vectors (one per input, a list of one for a single string), errors in
/// DJL's shape.
pub async fn lmi(
    model: Arc<PoolEntry<Embedder>>,
    rec: Arc<AccessRecord>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let v = crate::body::json(body)?;
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| k.as_str() != "inputs") {
            return Err(ApiError::bad_request(format!(
                "unknown field '{k}' (an embedding model takes only 'inputs')"
            )));
        }
        let input = Inputs::Texts(req::texts(obj.get("inputs"), "inputs", MAX_INPUTS)?);
        let (vecs, tokens) = compute(model, input, None).await?;
        rec.add_tokens_in(tokens);
        Ok(Json(json!(vecs)).into_response())
    };
    run.await.unwrap_or_else(|e: ApiError| e.into_response())
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
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
    let v = crate::body::json(body)?;
    let request = parse_request(&v)?;
    let m = req::resolve(&st, &st.embedders, Role::Embedding, request.model, &rec)?;
    let name = m.name.clone();
    let dim = m.model.model.dim();
    if let Some(d) = request.dimensions {
        match &m.model.matryoshka {
            None => {
                return Err(ApiError::bad_request(format!(
                    "model '{name}' does not support 'dimensions' (it is not marked as matryoshka)"
                )))
            }
            Some(allowed) if !allowed.is_empty() && !allowed.contains(&d) => {
                return Err(ApiError::bad_request(format!(
                    "model '{name}' supports 'dimensions' of {allowed:?}, not {d}"
                )))
            }
            Some(_) if d > dim => {
                return Err(ApiError::bad_request(format!(
                    "'dimensions' {d} is more than the model's {dim}"
                )))
            }
            Some(_) => {}
        }
    }
    let normalize = m.model.model.sentence.normalize;
    let (vecs, tokens) = compute(m, request.input, request.prompt_name).await?;
    rec.add_tokens_in(tokens);
    let data: Vec<Value> = vecs
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            if let Some(d) = request.dimensions {
                truncate(&mut v, d, normalize);
            }
            let embedding = match request.encoding {
                Encoding::Float => json!(v),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64(&bytes))
                }
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn inputs_of_every_shape() {
        let p = |v: Value| parse_request(&v).map(|r| r.input);
        assert_eq!(
            p(json!({"input": "a"})).unwrap(),
            Inputs::Texts(vec!["a".into()])
        );
        assert_eq!(
            p(json!({"input": ["a", "b"]})).unwrap(),
            Inputs::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            p(json!({"input": [1, 2]})).unwrap(),
            Inputs::Ids(vec![vec![1, 2]])
        );
        assert_eq!(
            p(json!({"input": [[1], [2, 3]]})).unwrap(),
            Inputs::Ids(vec![vec![1], vec![2, 3]])
        );
        for bad in [
            json!({"input": []}),
            json!({"input": [1, "a"]}),
            json!({"input": [-1]}),
            json!({}),
            json!({"input": "a", "encoding_format": "int8"}),
            json!({"input": "a", "dimensions": 0}),
            json!({"input": "a", "temperature": 1}),
        ] {
            assert!(parse_request(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn truncation_renormalises() {
        let mut v = vec![0.6, 0.8, 0.0];
        truncate(&mut v, 1, true);
        assert_eq!(v, vec![1.0]);
        let mut v = vec![0.6, 0.8, 0.0];
        truncate(&mut v, 1, false);
        assert_eq!(v, vec![0.6]);
    }
}
