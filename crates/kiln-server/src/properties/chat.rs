//! The chat-side keys of DJL's current LMI (vLLM) handler:
//! `option.enable_auto_tool_choice`, `option.tool_call_parser`,
//! `option.reasoning_parser` and `option.enable_stateful_sessions` (and
//! what kiln does with `option.enable_streaming` under
//! `option.rolling_batch=disable`).
//!
//! DJL hands the first three to vLLM (`djl_python/properties_manager/
//! vllm_rb_properties.py`, which checks the parser names against vLLM's
//! registries, and `lmi_vllm/vllm_async_service.py`, which passes them to
//! `OpenAIServingChat`). What kiln does with each:
//! - tool calling is not built yet, so `enable_auto_tool_choice=true` is
//!   refused at load (a model served without it would answer every tool
//!   request with an error, which an operator who set the key would not
//!   expect); `tool_call_parser` is checked against vLLM's parser names and
//!   kept for when it is;
//! - `reasoning_parser` `qwen3` and `deepseek_r1` are implemented
//!   ([`crate::reasoning`]); vLLM's other names are refused by name;
//! - SageMaker stateful sessions ([`crate::sessions`]) are on unless
//!   `enable_stateful_sessions=false`, as in DJL;
//! - DJL's non-rolling-batch streaming (`enable_streaming` with
//!   `rolling_batch=disable`) is served as DJL frames it, `{"outputs":
//!   [...]}` lines ([`crate::lmi_outputs`]).

use super::Builder;
use crate::reasoning::ReasoningParser;

/// vLLM's built-in tool-call parser names (its `ToolParserManager`
/// registry, as listed in vLLM's tool-calling documentation that DJL's
/// `tool_calling.md` points to).
pub const TOOL_CALL_PARSERS: &[&str] = &[
    "hermes",
    "mistral",
    "llama3_json",
    "llama4_json",
    "llama4_pythonic",
    "pythonic",
    "granite",
    "granite-20b-fc",
    "internlm",
    "jamba",
    "xlam",
    "minimax",
    "deepseek_v3",
    "deepseek_v31",
    "kimi_k2",
    "hunyuan_a13b",
    "glm45",
    "qwen3_coder",
    "qwen3_xml",
    "phi4_mini_json",
    "openai",
    "step3",
    "seed_oss",
    "longcat",
];

/// vLLM's reasoning-parser names that kiln does not implement.
const OTHER_REASONING_PARSERS: &[&str] = &[
    "deepseek_v3",
    "granite",
    "hunyuan_a13b",
    "mistral",
    "glm45",
    "gpt_oss",
    "step3",
    "ernie45",
    "seed_oss",
    "olmo3",
    "minimax_m2",
];

/// A validated `option.tool_call_parser` name (kept for tool calling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallParser(String);

impl ToolCallParser {
    /// The parser's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The chat settings of a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatOptions {
    /// `option.tool_call_parser`, checked against vLLM's names.
    pub tool_call_parser: Option<ToolCallParser>,
    /// `option.reasoning_parser`: how to split a reasoning model's output.
    pub reasoning_parser: Option<ReasoningParser>,
    /// `option.enable_stateful_sessions` and `option.sessions_expiration`.
    pub sessions: SessionOptions,
}

/// SageMaker stateful sessions ([`crate::sessions`]): on unless
/// `option.enable_stateful_sessions=false`, as in DJL's LMI handler, and
/// ending `option.sessions_expiration` seconds after they begin (DJL's
/// default, 20 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Sessions can be created, and requests may name one.
    pub enabled: bool,
    /// Seconds a session lives.
    pub expiration_s: u64,
}

impl SessionOptions {
    /// DJL's `sessions_expiration` default: 20 minutes.
    pub const DEFAULT_EXPIRATION_S: u64 = 20 * 60;
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            expiration_s: Self::DEFAULT_EXPIRATION_S,
        }
    }
}

impl Builder {
    /// Reads and checks the chat-side keys (see the module documentation).
    pub(super) fn chat_options(&mut self) -> ChatOptions {
        let auto_tools = self.boolean("option.enable_auto_tool_choice");
        if let Some((true, p)) = &auto_tools {
            self.problem(
                p,
                "asks for tool calling, which kiln does not implement yet; remove it (requests \
                 with 'tools' are refused with a clear error either way)",
            );
        }
        let tool_call_parser = self.entry("option.tool_call_parser").and_then(|p| {
            if !TOOL_CALL_PARSERS.contains(&p.value.as_str()) {
                self.problem(
                    &p,
                    &format!("is not one of {}", TOOL_CALL_PARSERS.join(", ")),
                );
                return None;
            }
            if !matches!(auto_tools, Some((true, _))) {
                self.warn(
                    &p,
                    "has no effect without option.enable_auto_tool_choice=true",
                );
            }
            Some(ToolCallParser(p.value))
        });
        let reasoning_parser = self.entry("option.reasoning_parser").and_then(|p| {
            let parsed = ReasoningParser::parse(&p.value);
            if parsed.is_none() {
                let why = if OTHER_REASONING_PARSERS.contains(&p.value.as_str()) {
                    format!(
                        "is a vLLM reasoning parser that kiln does not implement; kiln implements {}",
                        ReasoningParser::ALLOWED
                    )
                } else {
                    format!("is not one of {}", ReasoningParser::ALLOWED)
                };
                self.problem(&p, &why);
            }
            parsed
        });
        let enabled = self
            .boolean("option.enable_stateful_sessions")
            .is_none_or(|(on, _)| on);
        let expiration_s = self
            .count_at_least("option.sessions_expiration", 1)
            .map_or(SessionOptions::DEFAULT_EXPIRATION_S, |(n, _)| n as u64);
        let sessions = SessionOptions {
            enabled,
            expiration_s,
        };
        ChatOptions {
            tool_call_parser,
            reasoning_parser,
            sessions,
        }
    }
}
