//! The request funnel: every API's sampling parameters are read and checked
//! here, once, into the engine's own [`Request`], which is what every
//! inference route submits.
//!
//! What differs between APIs (field names, defaults, the caps where the
//! API's reference differs) is a [`Dialect`], declared by the API's own
//! module ([`crate::dialect::lmi::LMI`], [`crate::dialect::openai::OPENAI`]);
//! the rules themselves live only here. Adding a sampling parameter touches
//! the engine's `SamplingParams` or `StopConditions`, [`request`] below, and
//! at most one line of each [`Dialect`] whose API names it differently.

use kiln_engine::{Request, SamplingParams, StopConditions};

use crate::error::ApiError;
use crate::params::Fields;

/// Most new tokens one request may ask for, in every API.
pub const MAX_NEW_TOKENS: u64 = 1 << 20;

/// Most stop sequences one request may give, in every API. OpenAI's API
/// documents up to 4 and vLLM (whose extensions kiln's `/v1` follows) sets
/// no limit; DJL sets none either. kiln has taken 16 on both since its
/// first release, and a lower cap would refuse requests that work today.
pub const MAX_STOP_SEQUENCES: usize = 16;

/// Most alternatives per token (`top_logprobs`, `top_n_tokens`), as
/// OpenAI's API allows.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// What one API calls the sampling parameters, and where its reference
/// implementation sets a different default or cap. Everything that is the
/// same in every API is in [`request`], not here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dialect {
    /// The API's name, for logs and test messages.
    pub name: &'static str,
    /// The keys that give the most new tokens, the first present winning
    /// (OpenAI's `max_completion_tokens` replaces its `max_tokens`).
    pub max_tokens_keys: &'static [&'static str],
    /// Highest temperature taken.
    pub max_temperature: f64,
    /// The flag without which the request decodes greedily whatever its
    /// temperature (LMI's `do_sample`); `None`: sampling at the
    /// temperature given, 1 by default.
    pub sample_flag: Option<&'static str>,
    /// The keys that list stop sequences (all read, in order); the first
    /// names them in errors.
    pub stop_keys: &'static [&'static str],
    /// The key asking for the top alternatives of each generated token, when
    /// the API has one that every endpoint reads the same way (LMI's
    /// `top_n_tokens`); OpenAI's `logprobs` depends on the endpoint and is
    /// read by its module.
    pub top_logprobs_key: Option<&'static str>,
}

/// Reads and checks the sampling parameters in `f` (none: a body without
/// parameters, all defaults) as `dialect` names them, into an engine
/// request with no prompt yet. `default_max_new_tokens` is the dialect's
/// default for the endpoint (it differs between OpenAI's completions and
/// chat, and LMI's reference body sets it with `seq_length`).
pub fn request(
    f: Option<&Fields>,
    dialect: &Dialect,
    default_max_new_tokens: usize,
) -> Result<Request, ApiError> {
    let Some(f) = f else {
        let mut r = Request::greedy(Vec::new(), default_max_new_tokens);
        if dialect.sample_flag.is_none() {
            r.sampling.temperature = 1.0;
        }
        return Ok(r);
    };
    let mut max_tokens = None;
    for key in dialect.max_tokens_keys {
        if let Some(n) = f.uint(key, MAX_NEW_TOKENS)? {
            if n == 0 {
                return Err(ApiError::bad_request(format!(
                    "'{}' must be at least 1",
                    f.name(key)
                )));
            }
            max_tokens = Some(n as usize);
            break;
        }
    }
    let max_new_tokens = max_tokens.unwrap_or(default_max_new_tokens);
    let sample = match dialect.sample_flag {
        Some(flag) => f.bool(flag)?.unwrap_or(false),
        None => true,
    };
    let temperature = f.float("temperature", 0.0, dialect.max_temperature)?;
    let top_p = f.float("top_p", 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::bad_request(format!(
            "'{}' must be greater than 0",
            f.name("top_p")
        )));
    }
    // vLLM's sampling parameters (which both DJL's LMI handler and kiln's
    // `/v1` extensions follow) take -1 as "no top-k", like 0.
    let top_k = match f.get("top_k") {
        Some(v) if v.as_i64() == Some(-1) => 0,
        _ => f.uint("top_k", u32::MAX as u64)?.unwrap_or(0) as usize,
    };
    let top_logprobs = match dialect.top_logprobs_key {
        Some(key) => f.uint(key, MAX_TOP_LOGPROBS)?.unwrap_or(0) as usize,
        None => 0,
    };
    let sampling = SamplingParams {
        temperature: if sample {
            temperature.unwrap_or(1.0) as f32
        } else {
            0.0
        },
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k,
        min_p: f.float("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repetition_penalty: f.float("repetition_penalty", 1e-3, 100.0)?.unwrap_or(1.0) as f32,
        presence_penalty: f.float("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        frequency_penalty: f.float("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        seed: f.uint("seed", u64::MAX)?,
        top_logprobs,
        logit_bias: logit_bias(f)?,
    };
    let mut stop_strings = Vec::new();
    for key in dialect.stop_keys {
        stop_strings.extend(f.strings(key)?);
    }
    if stop_strings.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::bad_request(format!(
            "'{}' takes at most {MAX_STOP_SEQUENCES} sequences, got {}",
            f.name(dialect.stop_keys.first().copied().unwrap_or("stop")),
            stop_strings.len()
        )));
    }
    Ok(Request {
        prompt: Vec::new(),
        sampling,
        stop: StopConditions {
            max_new_tokens,
            stop_strings,
            stop_token_ids: f.ids("stop_token_ids")?,
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
            ..StopConditions::default()
        },
        skip_special_tokens: true,
        prompt_logprobs: false,
        constraint: crate::constraints::parse(f)?,
    })
}

/// Most entries `logit_bias` may list.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// OpenAI's `logit_bias`: an object from token ids (as strings) to biases
/// in [-100, 100]. The ids are checked against the model's vocabulary on
/// submit (a 400 naming the id).
fn logit_bias(f: &Fields) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match f.get("logit_bias") {
        None => return Ok(Vec::new()),
        Some(serde_json::Value::Object(m)) => m,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'{}' must be an object from token ids to biases, got {other}",
                f.name("logit_bias")
            )))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::bad_request(format!(
            "'{}' lists {} tokens; at most {MAX_LOGIT_BIAS} are taken",
            f.name("logit_bias"),
            map.len()
        )));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::bad_request(format!(
                "'{}' keys must be token ids, got '{k}'",
                f.name("logit_bias")
            ))
        })?;
        let bias = v
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "'{}' of token {id} must be a number from -100 to 100, got {v}",
                    f.name("logit_bias")
                ))
            })?;
        out.push((id, bias as f32));
    }
    Ok(out)
}

/// `template` for `prompt`: the one copy each submitted request makes of
/// the checked parameters.
pub fn with_prompt(template: &Request, prompt: Vec<u32>) -> Request {
    Request {
        prompt,
        ..template.clone()
    }
}
