//! The status codes of DJL Serving's LMI routes (`/predictions/{model}`,
//! `/invocations`, `/models/{name}/invoke`), which differ from OpenAI's.
//!
//! What DJL Serving does (read in deepjavalibrary/djl-serving, 2026-11):
//!
//! - Its Java front end answers before any handler runs: an unknown model is
//!   404 (`InferenceRequestHandler.predict` throws `ModelNotFoundException`,
//!   which `NettyUtils.sendError` maps to 404); `/invocations` without a
//!   model name while several are served is 400 (`BadRequestException`
//!   "Parameter model_name is required."); a full job queue is 503
//!   (`WlmCapacityException`, `ConfigManager.getThrottleErrorHttpCode`).
//! - Everything the LMI handler itself refuses is 424 with
//!   `{"error": ..., "code": 424}`: the body is decoded inside the Python
//!   handler, so malformed JSON, a payload without `inputs`/`prompt`/
//!   `messages`, a bad parameter value or a prompt over the model's limit all
//!   end there (`djl_python/lmi_vllm/vllm_async_service.py`, `inference`:
//!   "Input parsing failed", code 424; `djl_python/input_parser.py` collects
//!   parse errors that `djl_python/utils.py` `rolling_batch_inference` and
//!   `huggingface.py` return with code 424; `rolling_batch.py`
//!   `stop_on_any_exception` fails the batch's requests with 424). The Java
//!   side (`engines/python/.../Request.addResponse`) turns that `code` into
//!   the HTTP status and writes `{"code", "error"}` as the body.
//! - A failure after a stream has begun cannot change the 200 already sent:
//!   the last line carries `details.finish_reason: "error"` (documented in
//!   `serving/docs/lmi/user_guides/lmi_input_output_schema.md`, "Error
//!   Responses"), see `lmi_stream`.
//!
//! One difference in DJL's own code: its vLLM handler passes on the status
//! of errors that vLLM's OpenAI layer reports (for a too-long prompt, 400
//! in vLLM) through `getattr(response, 'code', ...)`, while its documentation
//! and its other handlers say 424 for request validation. kiln answers 424
//! for every request-validation failure on these routes, as documented.

use axum::http::StatusCode;

use crate::error::ApiError;

/// Turns a request-validation failure (kiln's 400) into DJL's 424 for the
/// LMI routes; other statuses (404, 408, 413, 503, 507, …) pass unchanged.
/// The error keeps DJL's `{"error", "code"}` shape.
pub fn validation(mut e: ApiError) -> ApiError {
    if e.status == StatusCode::BAD_REQUEST {
        e.status = StatusCode::FAILED_DEPENDENCY;
    }
    e.openai = false;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_validation_failures_become_424() {
        let e = validation(ApiError::bad_request("bad top_p").openai());
        assert_eq!(e.status, StatusCode::FAILED_DEPENDENCY);
        assert_eq!(
            e.body(),
            serde_json::json!({"error": "bad top_p", "code": 424})
        );
        for status in [
            StatusCode::NOT_FOUND,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::INSUFFICIENT_STORAGE,
        ] {
            assert_eq!(validation(ApiError::new(status, "x")).status, status);
        }
    }
}
