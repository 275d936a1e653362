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
//! - `enable_auto_tool_choice=true` lets requests use `tool_choice: "auto"`
//!   (without it they get a 400, as in vLLM; [`crate::tools`]);
//!   `tool_call_parser` picks the call syntax read from the output
//!   ([`crate::tool_parse::ToolSyntax`]): `hermes`, `llama3_json`,
//!   `llama4_json`, `mistral` and `openai` (gpt-oss's harmony calls) are
//!   implemented, vLLM's other names are
//!   refused by name (unset, the syntax is chosen from the chat template);
//! - `reasoning_parser` `qwen3`, `deepseek_r1` and `openai_gptoss` are implemented
//!   ([`crate::reasoning`]); vLLM's other names are refused by name;
//! - SageMaker stateful sessions ([`crate::sessions`]) are on unless
//!   `enable_stateful_sessions=false`, as in DJL;
//! - DJL's non-rolling-batch streaming (`enable_streaming` with
//!   `rolling_batch=disable`) is served as DJL frames it, `{"outputs":
//!   [...]}` lines ([`crate::lmi_outputs`]).

use super::builder::Builder;
use crate::reasoning::ReasoningParser;
use crate::tool_parse::ToolSyntax;

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
    "step3",
    "ernie45",
    "seed_oss",
    "olmo3",
    "minimax_m2",
    "kimi_k2",
    "minimax_m2_append_think",
];

/// A validated `option.tool_call_parser`: vLLM's name and the syntax kiln
/// reads for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallParser(String, ToolSyntax);

impl ToolCallParser {
    /// The parser's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The call syntax it reads.
    pub fn syntax(&self) -> ToolSyntax {
        self.1
    }
}

/// The chat settings of a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatOptions {
    /// `option.tool_call_parser`, checked against vLLM's names.
    pub tool_call_parser: Option<ToolCallParser>,
    /// `option.enable_auto_tool_choice`: `tool_choice: "auto"` is allowed.
    pub auto_tool_choice: bool,
    /// `option.reasoning_parser`: how to split a reasoning model's output.
    pub reasoning_parser: Option<ReasoningParser>,
    /// `option.enable_stateful_sessions` and `option.sessions_expiration`.
    pub sessions: SessionOptions,
}

/// Live sessions a model keeps at most; creating one more is refused.
pub const MAX_SESSIONS: usize = 100_000;

/// Live sessions one client address may have created, unless
/// `option.max_sessions_per_client` says otherwise: a tenth of the table.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: usize = MAX_SESSIONS / 10;

/// SageMaker stateful sessions ([`crate::sessions`]): on unless
/// `option.enable_stateful_sessions=false`, as in DJL's LMI handler, and
/// ending `option.sessions_expiration` seconds after they begin (DJL's
/// default, 20 minutes). `option.max_sessions_per_client` (kiln's own)
/// bounds the sessions one client address may hold; `option.sessions_path`
/// (where DJL keeps session files) is accepted and unused, kiln keeping
/// sessions in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Sessions can be created, and requests may name one.
    pub enabled: bool,
    /// Seconds a session lives.
    pub expiration_s: u64,
    /// Live sessions one client address may have created.
    pub max_per_client: usize,
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
            max_per_client: DEFAULT_MAX_SESSIONS_PER_CLIENT,
        }
    }
}

impl Builder {
    /// Reads and checks the chat-side keys (see the module documentation).
    pub(super) fn chat_options(&mut self) -> ChatOptions {
        let auto_tools = self.boolean("option.enable_auto_tool_choice");
        let tool_call_parser = self.entry("option.tool_call_parser").and_then(|p| {
            if !TOOL_CALL_PARSERS.contains(&p.value.as_str()) {
                self.problem(
                    &p,
                    &format!("is not one of {}", TOOL_CALL_PARSERS.join(", ")),
                );
                return None;
            }
            let Some(syntax) = ToolSyntax::from_parser_name(&p.value) else {
                self.problem(
                    &p,
                    &format!(
                        "is a vLLM tool-call parser that kiln does not implement; kiln \
                         implements {}",
                        ToolSyntax::ALLOWED
                    ),
                );
                return None;
            };
            Some(ToolCallParser(p.value, syntax))
        });
        let reasoning_parser_entry = self.entry("option.reasoning_parser");
        let reasoning_parser = reasoning_parser_entry.clone().and_then(|p| {
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
        // DJL's rolling-batch vLLM handler splits reasoning only with
        // `enable_reasoning=true`, whose validator then requires a parser
        // (`vllm_rb_properties.py` `validate_reasoning_parser`); its current
        // handler (`lmi_vllm/vllm_async_service.py`) passes
        // `reasoning_parser` to vLLM whatever `enable_reasoning` says. kiln
        // refuses `true` without a parser, and splits whenever a parser is set.
        match (
            self.boolean("option.enable_reasoning"),
            &reasoning_parser_entry,
        ) {
            (Some((true, p)), None) => self.problem(
                &p,
                &format!(
                    "needs option.reasoning_parser (one of {}), as in DJL",
                    ReasoningParser::ALLOWED
                ),
            ),
            (Some((false, p)), Some(_)) => self.warn(
                &p,
                "option.reasoning_parser is set, so reasoning is still split from the \
                 content, as DJL's current vLLM handler does",
            ),
            _ => {}
        }
        let enabled = self
            .boolean("option.enable_stateful_sessions")
            .is_none_or(|(on, _)| on);
        let expiration_s = self
            .count_at_least("option.sessions_expiration", 1)
            .map_or(SessionOptions::DEFAULT_EXPIRATION_S, |(n, _)| n as u64);
        let max_sessions = MAX_SESSIONS;
        let max_per_client = self
            .int(
                "option.max_sessions_per_client",
                1,
                max_sessions as i64,
                &format!("a whole number from 1 to {max_sessions}"),
            )
            .map_or(DEFAULT_MAX_SESSIONS_PER_CLIENT, |(n, _)| {
                usize::try_from(n).unwrap_or(max_sessions)
            });
        if let Some(p) = self.entry("option.sessions_path") {
            self.warn(
                &p,
                "kiln keeps sessions in memory (they end with the server); no session files \
                 are written",
            );
        }
        let sessions = SessionOptions {
            enabled,
            expiration_s,
            max_per_client,
        };
        ChatOptions {
            tool_call_parser,
            auto_tool_choice: matches!(auto_tools, Some((true, _))),
            reasoning_parser,
            sessions,
        }
    }
}
