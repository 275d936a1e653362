//! OpenAI bodies on DJL's LMI routes (`/invocations`, `/predictions/{model}`,
//! `/models/{name}/invoke`).
//!
//! DJL's LMI handler reads a JSON object with `prompt` as an OpenAI
//! completions request and one with `messages` (and no `inputs`) as a
//! chat-completions request, and answers in the OpenAI shapes
//! (`djl_python/lmi_vllm/vllm_async_service.py`, `preprocess_request`;
//! `serving/docs/lmi/user_guides/chat_input_output_schema.md`). With
//! `stream` set it writes the chunks as JSON lines, not server-sent events
//! ([`crate::openai::Framing::JsonLines`]); kiln does the same, unless the
//! client asks for `text/event-stream` in `Accept` or the model sets
//! `option.output_formatter=sse`, as for LMI-schema streams. kiln answers
//! them with its OpenAI handlers, for the model the route names; errors keep
//! the LMI routes' shape and codes ([`crate::djl_status`]).

use std::sync::Arc;

use axum::response::Response;
use serde_json::Value;

use crate::access::AccessRecord;
use crate::djl_status;
use crate::error::ApiError;
use crate::openai::{self, Api, Framing};
use crate::state::AppState;

/// Which OpenAI API a JSON body on an LMI route asks for, if any, checked in
/// DJL's order: `prompt`, then `inputs` (the LMI schema; kiln also reads the
/// reference deployment's `text` there), then `messages`.
pub(crate) fn openai_api(v: &Value) -> Option<Api> {
    let o = v.as_object()?;
    if o.contains_key("prompt") {
        Some(Api::Completions)
    } else if o.contains_key("inputs") || o.contains_key("text") {
        None
    } else if o.contains_key("messages") {
        Some(Api::Chat)
    } else {
        None
    }
}

/// Answers an OpenAI body that came in on an LMI route for `model`; `sse`:
/// a streamed answer is written as server-sent events, not JSON lines.
pub(crate) async fn answer(
    st: Arc<AppState>,
    model: &str,
    rec: Arc<AccessRecord>,
    v: Arc<Value>,
    api: Api,
    sse: bool,
) -> Result<Response, ApiError> {
    let framing = if sse {
        Framing::Sse
    } else {
        Framing::JsonLines
    };
    openai::run_value(st, rec, v, api, Some(model), framing)
        .await
        .map_err(djl_status::validation)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bodies_are_routed_in_djls_order() {
        let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(openai_api(&chat) == Some(Api::Chat));
        let tools = json!({"messages": [], "tools": [{"type": "function"}], "tool_choice": "auto"});
        assert!(openai_api(&tools) == Some(Api::Chat));
        assert!(openai_api(&json!({"prompt": "x"})) == Some(Api::Completions));
        // `prompt` wins over `inputs`, `inputs` over `messages`, as in DJL.
        assert!(openai_api(&json!({"prompt": "x", "inputs": "y"})) == Some(Api::Completions));
        assert!(openai_api(&json!({"inputs": "y", "messages": []})).is_none());
        assert!(openai_api(&json!({"text": ["y"], "messages": []})).is_none());
        assert!(openai_api(&json!(["a", "b"])).is_none());
        assert!(openai_api(&json!({"parameters": {}})).is_none());
    }
}
