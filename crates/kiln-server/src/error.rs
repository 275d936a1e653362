//! Errors as clients see them: a status code and a JSON body
//! `{"error": "...", "code": N}` (the DJL shape), OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` on `/v1` routes, or
//! Anthropic's `{"type": "error", "error": {"type", "message"}}` on
//! `/v1/messages`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_engine::SubmitError;

/// Seconds a client is told to wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Render in OpenAI's error shape.
    pub openai: bool,
    /// Render in Anthropic's error shape (wins over `openai`).
    pub anthropic: bool,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            openai: false,
            anthropic: false,
        }
    }

    /// 400: the request is malformed or asks for something invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such model.
    pub fn unknown_model(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("model '{name}' is not registered"),
        )
    }

    /// 503: try again later (queue full, model loading, server stopping).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 424: the model failed while serving the request.
    pub fn model_failure(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FAILED_DEPENDENCY, message)
    }

    /// The same error in OpenAI's shape.
    pub fn openai(mut self) -> Self {
        self.openai = true;
        self
    }

    /// The same error in Anthropic's shape (the Messages API's routes).
    pub fn anthropic(mut self) -> Self {
        self.anthropic = true;
        self
    }

    /// The JSON body of this error.
    pub fn body(&self) -> serde_json::Value {
        if self.anthropic {
            return anthropic_body(self.status, &self.message);
        }
        if self.openai {
            let kind = match self.status.as_u16() {
                400 | 404 | 413 | 422 => "invalid_request_error",
                401 => "authentication_error",
                503 | 429 => "server_busy",
                _ => "server_error",
            };
            serde_json::json!({"error": {"message": self.message, "type": kind, "param": null,
                "code": self.status.as_u16()}})
        } else {
            serde_json::json!({"error": self.message, "code": self.status.as_u16()})
        }
    }
}

/// Whether `path` is one of Anthropic's Messages API routes, whose errors
/// (the API-key and body-size refusals included) take Anthropic's shape.
pub fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// The Anthropic error body for `status`: `{"type": "error", "error":
/// {"type", "message"}}` with the error types of Anthropic's reference.
pub fn anthropic_body(status: StatusCode, message: &str) -> serde_json::Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        408 | 504 => "timeout_error",
        503 | 529 => "overloaded_error",
        // The model failed while answering (DJL's 424): a server error.
        424 => "api_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let status = match e {
            SubmitError::Invalid(_) => StatusCode::BAD_REQUEST,
            SubmitError::TooLarge(_) => StatusCode::INSUFFICIENT_STORAGE,
            SubmitError::QueueFull(_) | SubmitError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}
