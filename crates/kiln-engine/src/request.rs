//! What a client hands the engine, and what comes back.

use std::time::Instant;

use crate::guided::Constraint;
use crate::sampling::SamplingParams;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Leave control tokens (`<|im_end|>`) out of the streamed text.
    pub skip_special_tokens: bool,
    /// Report each prompt token's log-probability (DJL's
    /// `decoder_input_details`) with the first generated token. It costs a
    /// logits row per prompt token and skips the prefix cache for this
    /// request, so it is off unless asked for; other requests in the same
    /// steps are unaffected (a row's logits do not depend on the others).
    pub prompt_logprobs: bool,
    /// What the output must match (a JSON schema, a regex, …); `None` for
    /// free text. Checked and compiled by [`crate::Engine::submit`], or
    /// compiled beforehand and given to [`crate::Engine::submit_compiled`].
    pub constraint: Option<Constraint>,
}

impl Request {
    /// A greedy request for `max_new_tokens` tokens with default stops.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_new_tokens,
                ..StopConditions::default()
            },
            skip_special_tokens: true,
            prompt_logprobs: false,
            constraint: None,
        }
    }
}

/// When generation ends (besides the model's end-of-sequence tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Most tokens of prompt plus output (the reference deployment's `seq_length`).
    pub max_total_tokens: Option<usize>,
    /// Texts that end generation; the matched text is not part of the output.
    pub stop_strings: Vec<String>,
    /// Token ids that end generation (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's EOS ids.
    pub ignore_eos: bool,
    /// Give up at this instant (the request finishes with [`FinishReason::Deadline`]).
    pub deadline: Option<Instant>,
}

impl Default for StopConditions {
    fn default() -> Self {
        Self {
            max_new_tokens: 30,
            max_total_tokens: None,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            deadline: None,
        }
    }
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens`, the total-length limit or the model's context was reached.
    Length,
    /// The model produced one of its end-of-sequence tokens (or a `stop_token_ids` id).
    EosToken,
    /// A stop string was produced.
    StopSequence,
    /// The client went away.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
    /// The engine failed to run the model; the event carries the message.
    Error,
}

impl FinishReason {
    /// The name the DJL/LMI schema uses (`length`, `eos_token`, `stop_sequence`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
            FinishReason::Error => "error",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub id: u32,
    /// Text that became final with this token: possibly empty (a character
    /// still incomplete, text held back as a possible stop string, or an
    /// end-of-sequence token). The concatenation over a request is its output.
    pub text: String,
    /// Log-probability of the token under the model's distribution; NaN for
    /// a token a grammar forced, which was appended without computing it.
    pub logprob: f32,
    /// The most likely alternatives with their log-probabilities, if asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    /// The request ends with this token: its `Finished` event follows at once.
    pub last: bool,
    /// On the first token of a request that asked for
    /// [`Request::prompt_logprobs`]: the log-probability of each prompt token
    /// after the first given the tokens before it (one fewer than the prompt's
    /// tokens); `None` otherwise.
    pub prompt_logprobs: Option<Vec<f32>>,
    /// With [`Self::prompt_logprobs`], when the request asked for
    /// alternatives ([`crate::SamplingParams::top_logprobs`]): the most
    /// likely tokens at each of those prompt positions.
    pub prompt_top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// What the engine streams back for a request: tokens, then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(TokenOutput),
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// The error message when `reason` is [`FinishReason::Error`].
        error: Option<String>,
    },
}
