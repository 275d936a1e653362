//! The `prompt` of `POST /v1/completions` in the four forms OpenAI accepts:
//! a string, a list of strings, a list of token ids, or a list of lists of
//! token ids. Each prompt of a list gets its own `n` choices.

use kiln_engine::Engine;
use serde_json::Value;

use crate::error::ApiError;
use crate::generation;

/// Most prompts in one request.
pub const MAX_PROMPTS: usize = 256;

/// A prompt's shape as sent, checked but not yet tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// One or more texts.
    Texts(Vec<String>),
    /// One or more token-id sequences.
    Ids(Vec<Vec<u32>>),
}

impl PromptInput {
    /// How many prompts there are.
    pub fn len(&self) -> usize {
        match self {
            PromptInput::Texts(t) => t.len(),
            PromptInput::Ids(i) => i.len(),
        }
    }

    /// Whether there is no prompt (never true for a parsed input).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tokenized prompt and its text (what `echo` prepends).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
}

/// A token id from JSON, or why it is not one.
fn token_id(v: &Value, at: &str) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| ApiError::bad_request(format!("{at} must be a token id, got {v}")))
}

/// A non-empty list of token ids.
fn id_list(items: &[Value], at: &str) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{at} must not be an empty list of token ids"
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| token_id(v, &format!("{at}[{i}]")))
        .collect()
}

/// Checks the shape of `prompt` (absent, empty, mixed or too many are 400s).
pub fn parse(prompt: Option<&Value>) -> Result<PromptInput, ApiError> {
    let too_many = |n: usize| {
        ApiError::bad_request(format!(
            "'prompt' holds {n} prompts; at most {MAX_PROMPTS} are taken in one request"
        ))
    };
    match prompt {
        None => Err(ApiError::bad_request("'prompt' is required")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(ApiError::bad_request("'prompt' must not be empty"))
        }
        Some(Value::String(s)) => Ok(PromptInput::Texts(vec![s.clone()])),
        Some(Value::Array(items)) => match items.first() {
            None => Err(ApiError::bad_request("'prompt' must not be an empty list")),
            Some(Value::String(_)) => {
                if items.len() > MAX_PROMPTS {
                    return Err(too_many(items.len()));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) if !s.is_empty() => Ok(s.clone()),
                        Value::String(_) => Err(ApiError::bad_request(format!(
                            "prompt[{i}] must not be empty"
                        ))),
                        other => Err(ApiError::bad_request(format!(
                            "prompt[{i}] must be a string like the other prompts, got {other}"
                        ))),
                    })
                    .collect::<Result<_, _>>()
                    .map(PromptInput::Texts)
            }
            Some(Value::Array(_)) => {
                if items.len() > MAX_PROMPTS {
                    return Err(too_many(items.len()));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::Array(ids) => id_list(ids, &format!("prompt[{i}]")),
                        other => Err(ApiError::bad_request(format!(
                            "prompt[{i}] must be a list of token ids like the other prompts, got {other}"
                        ))),
                    })
                    .collect::<Result<_, _>>()
                    .map(PromptInput::Ids)
            }
            Some(_) => Ok(PromptInput::Ids(vec![id_list(items, "prompt")?])),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "'prompt' must be a string, a list of strings, a list of token ids or a list \
             of lists of token ids, got {other}"
        ))),
    }
}

/// Tokenizes texts (with the tokenizer's BOS where it adds one) and decodes
/// id prompts (for `echo`); ids are checked against the vocabulary on submission.
pub fn tokenize(engine: &Engine, input: PromptInput) -> Result<Vec<Prompt>, ApiError> {
    match input {
        PromptInput::Texts(texts) => texts
            .into_iter()
            .map(|text| {
                Ok(Prompt {
                    ids: generation::encode(engine, &text, true)?,
                    text,
                })
            })
            .collect(),
        PromptInput::Ids(lists) => Ok(lists
            .into_iter()
            .map(|ids| Prompt {
                text: engine.tokenizer().decode(&ids, false).unwrap_or_default(),
                ids,
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ok(v: Value) -> PromptInput {
        parse(Some(&v)).unwrap_or_else(|e| panic!("{v}: {}", e.message))
    }

    fn err(v: Value) -> String {
        parse(Some(&v)).unwrap_err().message
    }

    #[test]
    fn each_openai_form_parses() {
        assert_eq!(ok(json!("Hi")), PromptInput::Texts(vec!["Hi".into()]));
        assert_eq!(
            ok(json!(["a", "b"])),
            PromptInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(ok(json!([1, 2, 3])), PromptInput::Ids(vec![vec![1, 2, 3]]));
        assert_eq!(
            ok(json!([[1, 2], [3]])),
            PromptInput::Ids(vec![vec![1, 2], vec![3]])
        );
    }

    #[test]
    fn bad_shapes_are_refused_naming_the_element() {
        assert!(parse(None).unwrap_err().message.contains("required"));
        assert!(err(json!("")).contains("empty"));
        assert!(err(json!([])).contains("empty list"));
        assert!(err(json!(["a", 1])).contains("prompt[1]"));
        assert!(err(json!(["a", ""])).contains("prompt[1] must not be empty"));
        assert!(err(json!([[1], "a"])).contains("prompt[1]"));
        assert!(err(json!([[1], []])).contains("prompt[1] must not be an empty"));
        assert!(err(json!([1, -2])).contains("prompt[1]"));
        assert!(err(json!([1, 4294967296u64])).contains("token id"));
        assert!(err(json!([[1, 2.5]])).contains("prompt[0][1]"));
        assert!(err(json!({"a": 1})).contains("a list of strings"));
        assert!(err(json!([{"a": 1}])).contains("token id"));
        let many: Vec<String> = (0..=MAX_PROMPTS).map(|i| i.to_string()).collect();
        assert!(err(json!(many)).contains(&format!("at most {MAX_PROMPTS}")));
    }
}
