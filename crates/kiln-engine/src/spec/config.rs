//! How a model is told to speculate: vLLM's `speculative_config` JSON
//! (`--speculative-config`, `option.speculative_config`) or DJL's
//! `option.speculative_draft_model` with `option.speculative_length`, both
//! read into one [`SpecConfig`].

use serde_json::{Map, Value};

/// Most tokens one step may guess per sequence: each costs a logits row.
pub const MAX_SPECULATIVE_TOKENS: usize = 32;

/// DJL's default `option.speculative_length`.
pub const DJL_DEFAULT_SPECULATIVE_LENGTH: usize = 5;

/// vLLM's `prompt_lookup_min`/`max` when neither is given.
pub const DEFAULT_PROMPT_LOOKUP: usize = 5;

/// Where guesses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup: suffixes of `min..=max` tokens looked up earlier in the sequence.
    Ngram { min: usize, max: usize },
    /// A smaller model with the same tokenizer, run greedily ahead of the
    /// target (a path or model id, resolved like the target's).
    DraftModel { model: String },
}

/// A model's speculative decoding settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Tokens guessed per step and sequence (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
}

impl SpecConfig {
    /// Prompt lookup of `min..=max`-token suffixes, `k` guesses per step.
    pub fn ngram(k: usize, min: usize, max: usize) -> Self {
        Self {
            method: SpecMethod::Ngram { min, max },
            num_speculative_tokens: k,
        }
    }

    /// The method's name as vLLM spells it.
    pub fn method_name(&self) -> &'static str {
        match self.method {
            SpecMethod::Ngram { .. } => "ngram",
            SpecMethod::DraftModel { .. } => "draft_model",
        }
    }

    /// Checks the numbers, so a bad value is refused at start, not mid-run.
    pub fn validate(&self) -> Result<(), String> {
        let k = self.num_speculative_tokens;
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            return Err(format!(
                "num_speculative_tokens must be in 1..={MAX_SPECULATIVE_TOKENS}, got {k}"
            ));
        }
        match &self.method {
            SpecMethod::Ngram { min, max } => {
                if *min < 1 || max < min {
                    return Err(format!(
                        "prompt_lookup_min must be at least 1 and at most prompt_lookup_max, got {min} and {max}"
                    ));
                }
            }
            SpecMethod::DraftModel { model } => {
                if model.trim().is_empty() {
                    return Err("the draft model is empty".into());
                }
            }
        }
        Ok(())
    }

    /// Reads vLLM's `speculative_config` JSON object: `method` (`ngram` or
    /// `draft_model`; without it, a `model` means a draft model, and the
    /// `model` values `ngram` / `[ngram]` of older vLLM mean prompt lookup),
    /// `model`, `num_speculative_tokens` (required), `prompt_lookup_min` and
    /// `prompt_lookup_max` (either defaults to the other, both to 5).
    /// Methods kiln does not implement and unknown keys are refused.
    pub fn from_vllm_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("speculative_config is not JSON: {e}"))?;
        let Value::Object(map) = v else {
            return Err("speculative_config must be a JSON object".into());
        };
        Self::from_vllm_map(&map)
    }

    fn from_vllm_map(map: &Map<String, Value>) -> Result<Self, String> {
        const KNOWN: [&str; 5] = [
            "method",
            "model",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
        ];
        if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!(
                "speculative_config key \"{k}\" is not supported (kiln reads {})",
                KNOWN.join(", ")
            ));
        }
        let string = |key: &str| -> Result<Option<String>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!(
                    "speculative_config \"{key}\" must be a string, got {other}"
                )),
            }
        };
        let count = |key: &str| -> Result<Option<usize>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n.min(usize::MAX as u64) as usize))
                    .ok_or_else(|| {
                        format!("speculative_config \"{key}\" must be a whole number, got {v}")
                    }),
            }
        };
        let model = string("model")?;
        let method = match (string("method")?.as_deref(), model.as_deref()) {
            (Some("ngram"), _) | (None, Some("ngram" | "[ngram]")) => "ngram",
            (Some("draft_model"), Some(_)) | (None, Some(_)) => "draft_model",
            (Some("draft_model"), None) => {
                return Err("speculative_config method \"draft_model\" needs a \"model\"".into())
            }
            (None, None) => {
                return Err(
                    "speculative_config needs a \"method\" (ngram or draft_model) or a \"model\""
                        .into(),
                )
            }
            (Some(other), _) => {
                return Err(format!(
                    "speculative_config method \"{other}\" is not implemented (kiln supports ngram and draft_model)"
                ))
            }
        };
        let k = count("num_speculative_tokens")?
            .ok_or("speculative_config needs \"num_speculative_tokens\"")?;
        let cfg = if method == "ngram" {
            let (min, max) = match (count("prompt_lookup_min")?, count("prompt_lookup_max")?) {
                (None, None) => (DEFAULT_PROMPT_LOOKUP, DEFAULT_PROMPT_LOOKUP),
                (Some(m), None) => (m, m),
                (None, Some(m)) => (m, m),
                (Some(a), Some(b)) => (a, b),
            };
            SpecConfig::ngram(k, min, max)
        } else {
            if map.contains_key("prompt_lookup_min") || map.contains_key("prompt_lookup_max") {
                return Err(
                    "speculative_config prompt_lookup_min/max apply to the ngram method only"
                        .into(),
                );
            }
            SpecConfig {
                method: SpecMethod::DraftModel {
                    model: model.unwrap_or_default(),
                },
                num_speculative_tokens: k,
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// DJL's spelling: `option.speculative_draft_model` and
    /// `option.speculative_length` (default 5).
    pub fn from_djl(draft_model: &str, speculative_length: Option<usize>) -> Result<Self, String> {
        let cfg = SpecConfig {
            method: SpecMethod::DraftModel {
                model: draft_model.to_string(),
            },
            num_speculative_tokens: speculative_length.unwrap_or(DJL_DEFAULT_SPECULATIVE_LENGTH),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SpecConfig, String> {
        SpecConfig::from_vllm_json(s)
    }

    #[test]
    fn vllm_spellings() {
        assert_eq!(
            parse(r#"{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}"#),
            Ok(SpecConfig::ngram(5, 4, 4))
        );
        assert_eq!(
            parse(
                r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}"#
            ),
            Ok(SpecConfig::ngram(3, 2, 4))
        );
        assert_eq!(
            parse(r#"{"model": "[ngram]", "num_speculative_tokens": 3}"#),
            Ok(SpecConfig::ngram(3, 5, 5))
        );
        let draft = SpecConfig {
            method: SpecMethod::DraftModel {
                model: "/models/small".into(),
            },
            num_speculative_tokens: 4,
        };
        assert_eq!(
            parse(r#"{"model": "/models/small", "num_speculative_tokens": 4}"#),
            Ok(draft.clone())
        );
        assert_eq!(
            parse(
                r#"{"method": "draft_model", "model": "/models/small", "num_speculative_tokens": 4}"#
            ),
            Ok(draft.clone())
        );
        assert_eq!(SpecConfig::from_djl("/models/small", Some(4)), Ok(draft));
        assert_eq!(
            SpecConfig::from_djl("m", None).map(|c| c.num_speculative_tokens),
            Ok(5)
        );
    }

    #[test]
    fn bad_configs_are_refused_with_reasons() {
        let cases = [
            ("[1]", "must be a JSON object"),
            ("{", "is not JSON"),
            (
                r#"{"method": "eagle3", "model": "x", "num_speculative_tokens": 4}"#,
                "\"eagle3\" is not implemented",
            ),
            (r#"{"method": "ngram"}"#, "needs \"num_speculative_tokens\""),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 0}"#,
                "must be in 1..=32",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 99}"#,
                "must be in 1..=32",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": -1}"#,
                "must be a whole number",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}"#,
                "at most prompt_lookup_max",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}"#,
                "at least 1",
            ),
            (
                r#"{"method": "draft_model", "num_speculative_tokens": 2}"#,
                "needs a \"model\"",
            ),
            (r#"{"num_speculative_tokens": 2}"#, "needs a \"method\""),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "foo": 1}"#,
                "key \"foo\" is not supported",
            ),
            (
                r#"{"model": "m", "num_speculative_tokens": 2, "prompt_lookup_max": 2}"#,
                "ngram method only",
            ),
            (
                r#"{"model": 3, "num_speculative_tokens": 2}"#,
                "must be a string",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(SpecConfig::from_djl(" ", None)
            .unwrap_err()
            .contains("empty"));
    }
}
