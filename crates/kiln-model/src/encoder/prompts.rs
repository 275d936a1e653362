//! sentence-transformers prompts: `prompts` (name -> text put before each
//! input) and `default_prompt_name` of `config_sentence_transformers.json`,
//! applied as `SentenceTransformer.encode` applies them (the prompt string
//! concatenated before the text, then tokenized together).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::InputError;
use crate::{ModelError, Result};

/// A model's named prompts and the one used when a request names none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompts {
    pub prompts: BTreeMap<String, String>,
    /// `default_prompt_name`, checked to be one of `prompts`.
    pub default: Option<String>,
}

/// The most prompts, and the longest prompt, a config may hold.
const MAX_PROMPTS: usize = 256;
const MAX_PROMPT_BYTES: usize = 64 << 10;

impl Prompts {
    /// Reads `config_sentence_transformers.json` in `dir`; none there, or no
    /// `prompts` in it, is no prompts.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config_sentence_transformers.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::from_json(&crate::loader::read_json(&path)?, &path)
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let mut prompts = BTreeMap::new();
        match v.get("prompts") {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) if o.len() <= MAX_PROMPTS => {
                for (k, p) in o {
                    match p.as_str() {
                        Some(p) if p.len() <= MAX_PROMPT_BYTES => {
                            prompts.insert(k.clone(), p.to_string());
                        }
                        _ => {
                            return Err(err(format!(
                                "prompt '{k}' must be a string of at most {MAX_PROMPT_BYTES} bytes"
                            )))
                        }
                    }
                }
            }
            Some(_) => {
                return Err(err(format!(
                    "'prompts' must be an object of at most {MAX_PROMPTS} strings"
                )))
            }
        }
        let default = match v.get("default_prompt_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) if prompts.contains_key(name) => Some(name.clone()),
            Some(other) => {
                return Err(err(format!(
                    "default_prompt_name {other} is not one of 'prompts'"
                )))
            }
        };
        Ok(Self { prompts, default })
    }

    /// `text` with prompt `name` before it; `None` takes the default prompt
    /// (if any). An unknown name is the request's error.
    pub fn apply(&self, text: &str, name: Option<&str>) -> Result<String, InputError> {
        let name = match name {
            Some(n) => Some(n),
            None => self.default.as_deref(),
        };
        let Some(name) = name else {
            return Ok(text.to_string());
        };
        match self.prompts.get(name) {
            Some(p) => Ok(format!("{p}{text}")),
            None => Err(InputError::UnknownPrompt {
                name: name.to_string(),
                known: if self.prompts.is_empty() {
                    "it has none".into()
                } else {
                    self.prompts
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_and_named_prompts() {
        let p = Path::new("c.json");
        let v =
            json!({"prompts": {"query": "Q: ", "document": ""}, "default_prompt_name": "query"});
        let pr = Prompts::from_json(&v, p).unwrap();
        assert_eq!(pr.apply("x", None).unwrap(), "Q: x");
        assert_eq!(pr.apply("x", Some("document")).unwrap(), "x");
        let e = pr.apply("x", Some("passage")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prompt_name 'passage' is not one of the model's prompts (document, query)"
        );
        let none = Prompts::from_json(&json!({}), p).unwrap();
        assert_eq!(none.apply("x", None).unwrap(), "x");
        let e = none.apply("x", Some("query")).unwrap_err();
        assert!(e.to_string().contains("it has none"), "{e}");
        let bad = json!({"prompts": {"a": "A"}, "default_prompt_name": "b"});
        assert!(Prompts::from_json(&bad, p).is_err());
    }
}
