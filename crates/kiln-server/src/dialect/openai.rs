//! The OpenAI dialect: the bodies of `/v1/completions` and
//! `/v1/chat/completions` (and of the same requests on DJL's LMI routes)
//! read into the request funnel ([`crate::funnel`]). The answers are
//! written by [`crate::openai`].

use kiln_engine::Request;
use kiln_model::chat::ChatMessage;
use serde_json::Value;

use crate::error::ApiError;
use crate::funnel::{self, Dialect};
use crate::params::Fields;
use crate::prompts::{self, PromptInput};

/// What OpenAI's API calls the sampling parameters, and where it differs
/// from DJL's: `max_completion_tokens` (or the older `max_tokens`), `stop`,
/// sampling at temperature 1 unless told otherwise, and temperature "between
/// 0 and 2" (the API reference's bound). `logprobs` depends on the endpoint
/// and is read by [`crate::openai`].
pub const OPENAI: Dialect = Dialect {
    name: "openai",
    max_tokens_keys: &["max_completion_tokens", "max_tokens"],
    max_temperature: 2.0,
    sample_flag: None,
    stop_keys: &["stop"],
    top_logprobs_key: None,
};

/// Most choices (`n`) per request.
const MAX_N: u64 = 16;

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

/// What both endpoints parse from the body before the prompt.
pub(crate) struct Common {
    pub model: String,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The client gave `max_tokens` (or `max_completion_tokens`).
    pub explicit_max_tokens: bool,
    /// The checked sampling parameters (no prompt yet).
    pub params: Request,
}

pub(crate) fn common(f: &Fields, default_max_tokens: usize) -> Result<Common, ApiError> {
    // Empty when absent: `run` then picks the only model served.
    let model = f.str("model")?.unwrap_or_default().to_string();
    let n = f.uint("n", MAX_N)?.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::bad_request("'n' must be at least 1"));
    }
    let params = funnel::request(Some(f), &OPENAI, default_max_tokens)?;
    let stream_options = f
        .get("stream_options")
        .map(|v| Fields::new(v, "stream_options"))
        .transpose()?;
    let include_usage = stream_options
        .map(|o| o.bool("include_usage"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    Ok(Common {
        model,
        n,
        stream: f.bool("stream")?.unwrap_or(false),
        include_usage,
        explicit_max_tokens: OPENAI.max_tokens_keys.iter().any(|k| f.has(k)),
        params,
    })
}

/// Most choices one completions request may ask for (prompts times `n`).
const MAX_CHOICES: usize = 256;

/// What `/v1/completions` reads besides the common fields: the prompts'
/// shape, `echo`, and the fields kiln refuses rather than ignores.
pub(crate) fn completion_options(f: &Fields, n: usize) -> Result<(PromptInput, bool), ApiError> {
    match f.get("suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(
                "'suffix' (insertion between a prompt and a suffix) is not supported",
            ))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'suffix' must be a string, got {other}"
            )))
        }
    }
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && f.has("logprobs") && f.bool("stream")?.unwrap_or(false) {
        return Err(ApiError::bad_request(
            "'echo' with 'logprobs' is answered whole, not streamed; leave out 'stream'",
        ));
    }
    let input = prompts::parse(f.get("prompt"))?;
    if input.len() * n > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "{} prompts with n={n} make {} choices; at most {MAX_CHOICES} are taken in one request",
            input.len(),
            input.len() * n
        )));
    }
    Ok((input, echo))
}

/// The messages of a chat request, checked (also read by `/tokenize`).
pub(crate) fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = match f.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(_) => return Err(ApiError::bad_request("'messages' must be a non-empty list")),
        None => return Err(ApiError::bad_request("'messages' is required")),
    };
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let mf = Fields::new(m, "messages[]")?;
        let role = mf
            .str("role")?
            .ok_or_else(|| ApiError::bad_request(format!("messages[{i}] has no 'role'")))?;
        let content = match mf.get("content") {
            // vLLM renders a null content (an assistant turn that only
            // calls tools) as "" (Qwen3's template needs a string).
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}]: only text content parts are supported"
                            )))
                        }
                    }
                }
                text
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content must be a string or a list of text parts, got {other}"
                )))
            }
        };
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = crate::tools::message_tool_calls(i, &mf)?;
        msg.tool_call_id = mf.str("tool_call_id")?.map(str::to_string);
        msg.name = mf.str("name")?.map(str::to_string);
        messages.push(msg);
    }
    Ok(messages)
}

#[cfg(test)]
mod fuzz {
    use kiln_model::fuzz::{cases, random_json, run_with};

    use super::*;

    const KEYS: &[&str] = &[
        "model",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "top_p",
        "temperature",
        "stream",
        "stream_options",
        "include_usage",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "echo",
        "suffix",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "tools",
        "functions",
        "response_format",
        "json_schema",
        "schema",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "structured_outputs",
        "presence_penalty",
        "frequency_penalty",
        "ignore_eos",
        "stop_token_ids",
        "top_k",
        "min_p",
        "repetition_penalty",
        "user",
    ];

    /// Every OpenAI body is parsed to an answer, never a panic.
    #[test]
    fn openai_bodies_never_panic() {
        let report = run_with(
            "openai bodies",
            cases(3000),
            |rng, _| random_json(rng, KEYS, 4).to_string().into_bytes(),
            |body| {
                let Ok(v) = crate::body::json(Ok(axum::body::Bytes::copy_from_slice(body))) else {
                    return false;
                };
                let Ok(f) = Fields::new(&v, "") else {
                    return false;
                };
                let chat = common(&f, 4096).is_ok() & chat_messages(&f).is_ok();
                let completion = common(&f, 16)
                    .and_then(|c| completion_options(&f, c.n))
                    .is_ok();
                chat || completion
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, cases(3000));
    }
}
