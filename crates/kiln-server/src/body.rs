//! Request bodies, read once for every API: the body's bytes (with the
//! errors for one too large or too slow), as JSON or as text. What an API
//! makes of the JSON is its dialect's ([`crate::dialect`]); how its errors
//! look is [`ApiError`]'s (`.openai()` for OpenAI's shape).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::Value;

use crate::error::ApiError;

/// The error a request body gets when it takes longer than the body
/// timeout (the connection layer, [`crate::conn`], raises it; the routes
/// answer it with 408 through [`body_error`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s (--body-read-timeout)", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

/// Maps a body-extraction failure to a JSON error (413 for an oversized
/// body, 408 for one that took longer than `--body-read-timeout`).
pub fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<BodyTimeout>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string());
        }
        cause = c.source();
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "the request body is larger than the server's limit (--max-request-bytes)",
        )
    } else {
        ApiError::new(status, format!("cannot read the request body: {e}"))
    }
}

/// A JSON body (the OpenAI routes and `/tokenize`).
pub fn json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(body_error)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// A body that may be text or JSON (DJL's LMI routes), decoded but not yet
/// read as a request.
pub enum Decoded {
    /// Plain text: one prompt with default parameters.
    Text(String),
    /// A JSON value of any shape.
    Json(Value),
}

/// Decodes a body (`content_type` as sent) as text or JSON.
pub fn text_or_json(content_type: Option<&str>, body: &[u8]) -> Result<Decoded, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    // A declared type decides; without one (or with another), a body that
    // looks like JSON is read as JSON. `text/plain` is always a prompt, even
    // one that starts with `[` or `"` (`[INST] …`, a quotation).
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let is_json = match media.as_deref() {
        Some("application/json") => true,
        Some("text/plain") => false,
        _ => matches!(text.trim_start().chars().next(), Some('{' | '[' | '"')),
    };
    if !is_json {
        return Ok(Decoded::Text(text.to_string()));
    }
    serde_json::from_str(text)
        .map(Decoded::Json)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}
