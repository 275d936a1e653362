//! YaRN rotary scaling (Peng et al., 2023), as gpt-oss, Qwen's long-context
//! configs and DeepSeek use it: the high frequencies (many rotations within
//! the original context) keep their value, the low ones are divided by the
//! scaling factor, a linear ramp over the frequency index blends the two
//! in between, and cos/sin are multiplied by an attention factor.
//!
//! The arithmetic follows transformers' `_compute_yarn_parameters`
//! (checked against its numbers in `tests/yarn.rs`); the GGUF keys are
//! llama.cpp's (`{arch}.rope.scaling.*`).

use serde_json::Value as Json;

use crate::gguf::GgufFile;

/// YaRN's parameters, resolved at parse time so the table needs nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnScaling {
    /// Context extension factor: the low frequencies are divided by it.
    pub factor: f64,
    /// Rotations within the original context above which a frequency is
    /// kept as it is (transformers' default 32).
    pub beta_fast: f64,
    /// Rotations below which a frequency is fully divided (default 1).
    pub beta_slow: f64,
    /// The context the model was pre-trained with.
    pub original_max_position: f64,
    /// Multiplier of cos and sin (the paper's `mscale`, `0.1 ln(factor) + 1`
    /// unless the config says otherwise).
    pub attention_factor: f64,
    /// Whether the ramp's ends are rounded to whole indices (floor, ceil):
    /// transformers' default and llama.cpp's only behaviour; gpt-oss turns it off.
    pub truncate: bool,
}

/// `0.1 * mscale * ln(scale) + 1` (1 when not extending).
fn get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The attention factor as transformers infers it when the config gives
/// none: `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when
/// both are given and non-zero (DeepSeek), else `mscale(factor, 1)`.
pub fn default_attention_factor(
    factor: f64,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
) -> f64 {
    match (mscale, mscale_all_dim) {
        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get_mscale(factor, m) / get_mscale(factor, a),
        _ => get_mscale(factor, 1.0),
    }
}

impl YarnScaling {
    /// The frequency index at which `rotations` full turns fit in the
    /// original context, for `dim` rotary dimensions and base `theta`.
    fn correction_dim(&self, rotations: f64, dim: usize, theta: f64) -> f64 {
        dim as f64 * (self.original_max_position / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * theta.ln())
    }

    /// The ramp's ends, in frequency indices.
    fn correction_range(&self, dim: usize, theta: f64) -> (f64, f64) {
        let mut low = self.correction_dim(self.beta_fast, dim, theta);
        let mut high = self.correction_dim(self.beta_slow, dim, theta);
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        (low.max(0.0), high.min(dim as f64 - 1.0))
    }

    /// The inverse frequencies of `rot_dim` rotary dimensions with base
    /// `theta`: index `i`'s plain frequency `theta^(-2i/rot_dim)` where
    /// the ramp is 0, divided by `factor` where it is 1, blended linearly
    /// between.
    pub fn inv_freq(&self, theta: f64, rot_dim: usize) -> Vec<f64> {
        let (low, mut high) = self.correction_range(rot_dim, theta);
        if low == high {
            high += 0.001; // as transformers: no division by zero
        }
        (0..rot_dim / 2)
            .map(|i| {
                let extrapolated = 1.0 / theta.powf(2.0 * i as f64 / rot_dim as f64);
                let interpolated = extrapolated / self.factor;
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                // ramp 0: keep the frequency (extrapolate); 1: interpolate.
                interpolated * ramp + extrapolated * (1.0 - ramp)
            })
            .collect()
    }

    /// Reads a Hugging Face `rope_scaling` (or `rope_parameters`) object of
    /// type `yarn`; `config` is the whole config.json, for
    /// `max_position_embeddings` and a top-level
    /// `original_max_position_embeddings`.
    pub fn from_hf(v: &Json, config: &Json) -> Result<Self, String> {
        let num = |k: &str| -> Result<Option<f64>, String> {
            match v.get(k) {
                None | Some(Json::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("rope_scaling 'yarn': '{k}' is not a number")),
            }
        };
        let max_pos = config.get("max_position_embeddings").and_then(Json::as_f64);
        let original = match num("original_max_position_embeddings")? {
            Some(o) => o,
            None => config
                .get("original_max_position_embeddings")
                .and_then(Json::as_f64)
                .or(max_pos)
                .ok_or("rope_scaling 'yarn' needs 'original_max_position_embeddings'")?,
        };
        let factor = match num("factor")? {
            Some(f) => f,
            // DeepSeek-V3 style: the factor is the ratio of the contexts.
            None => max_pos.ok_or("rope_scaling 'yarn' needs a 'factor'")? / original,
        };
        let attention_factor = match num("attention_factor")? {
            Some(a) => a,
            None => default_attention_factor(factor, num("mscale")?, num("mscale_all_dim")?),
        };
        // transformers reads `beta_fast or 32`: zero means the default too.
        let or_default = |x: Option<f64>, d: f64| x.filter(|&b| b != 0.0).unwrap_or(d);
        let truncate = match v.get("truncate") {
            None | Some(Json::Null) => true,
            Some(t) => t
                .as_bool()
                .ok_or("rope_scaling 'yarn': 'truncate' is not a boolean")?,
        };
        Self {
            factor,
            beta_fast: or_default(num("beta_fast")?, 32.0),
            beta_slow: or_default(num("beta_slow")?, 1.0),
            original_max_position: original,
            attention_factor,
            truncate,
        }
        .checked()
    }

    /// Reads llama.cpp's keys for `rope.scaling.type = yarn` of
    /// architecture `arch`: `.factor` (required), `.original_context_length`
    /// (else `context_length`), `.yarn_beta_fast` / `.yarn_beta_slow`,
    /// `.yarn_attn_factor` (an explicit attention factor, as the converter
    /// writes transformers' `attention_factor`), `.yarn_log_multiplier`
    /// (llama.cpp's `mscale_all_dim`, with `mscale` 1) and `.attn_factor`
    /// (a further multiplier). llama.cpp always truncates the ramp; gpt-oss
    /// was trained without (its config says `truncate: false`, as OpenAI's
    /// reference code computes), so a `gpt-oss` file does not.
    pub fn from_gguf(file: &GgufFile, arch: &str, context_length: usize) -> Result<Self, String> {
        let key = |k: &str| format!("{arch}.rope.scaling.{k}");
        let num = |k: &str| file.get_f64(&key(k));
        let factor =
            num("factor").ok_or_else(|| format!("yarn rope scaling needs '{}'", key("factor")))?;
        let mut attention_factor = match num("yarn_attn_factor") {
            Some(a) => a,
            None => default_attention_factor(factor, Some(1.0), num("yarn_log_multiplier")),
        };
        attention_factor *= num("attn_factor").unwrap_or(1.0);
        Self {
            factor,
            beta_fast: num("yarn_beta_fast").unwrap_or(32.0),
            beta_slow: num("yarn_beta_slow").unwrap_or(1.0),
            original_max_position: file
                .get_u64(&key("original_context_length"))
                .map_or(context_length as f64, |v| v as f64),
            attention_factor,
            truncate: arch != "gpt-oss",
        }
        .checked()
    }

    /// Refuses values that would give NaN or infinite frequencies.
    fn checked(self) -> Result<Self, String> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(self.factor)
            || !ok(self.beta_fast)
            || !ok(self.beta_slow)
            || !ok(self.original_max_position)
            || !ok(self.attention_factor)
        {
            return Err(format!(
                "yarn rope scaling has a value that is not a positive number: {self:?}"
            ));
        }
        Ok(self)
    }
}
