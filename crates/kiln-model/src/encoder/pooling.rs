//! Sentence-transformers pooling and normalisation: how a sequence of token
//! states becomes one embedding, read from the checkpoint's `modules.json`,
//! `1_Pooling/config.json` and the presence of a `Normalize` module.

use crate::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

/// How token states are reduced to one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average of all tokens' states (special tokens included, as
    /// sentence-transformers does).
    Mean,
    /// The first token's state (`[CLS]` / `<s>`).
    Cls,
    /// The last token's state (decoder embedders such as Qwen3-Embedding).
    LastToken,
}

impl Pooling {
    /// Parses a mode name as sentence-transformers writes it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "mean" => Some(Self::Mean),
            "cls" => Some(Self::Cls),
            "lasttoken" | "last_token" | "last" => Some(Self::LastToken),
            _ => None,
        }
    }

    /// Reduces `states: [n, dim]` to one `dim` vector.
    pub fn apply(self, states: &[f32], dim: usize) -> Vec<f32> {
        let n = states.len().checked_div(dim).unwrap_or(0);
        if n == 0 {
            return vec![0.0; dim];
        }
        match self {
            Self::Cls => states[..dim].to_vec(),
            Self::LastToken => states[(n - 1) * dim..n * dim].to_vec(),
            Self::Mean => {
                let mut sum = vec![0f32; dim];
                for row in states.chunks_exact(dim) {
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                sum.iter_mut().for_each(|s| *s /= n as f32);
                sum
            }
        }
    }
}

/// Scales `v` to unit L2 length (as torch's `F.normalize`, eps 1e-12).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// What the sentence-transformers files say to do after the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    pub normalize: bool,
}

impl SentenceConfig {
    /// Reads `modules.json` and its pooling module's config in `dir`. `None`
    /// when the directory is not a sentence-transformers checkpoint.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(None);
        }
        let modules = crate::loader::read_json(&modules_path)?;
        let err = |path: &Path, msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let list = modules
            .as_array()
            .ok_or_else(|| err(&modules_path, "not a list of modules".into()))?;
        let mut pooling = None;
        let mut normalize = false;
        for m in list {
            let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
            let sub = m.get("path").and_then(Value::as_str).unwrap_or("");
            if ty.ends_with(".Pooling") {
                if sub.contains("..") || sub.starts_with('/') {
                    return Err(err(
                        &modules_path,
                        format!("module path '{sub}' leaves the model directory"),
                    ));
                }
                let path = dir.join(sub).join("config.json");
                pooling = Some(Self::pooling_mode(
                    &crate::loader::read_json(&path)?,
                    &path,
                )?);
            } else if ty.ends_with(".Normalize") {
                normalize = true;
            }
        }
        let pooling = pooling.ok_or_else(|| err(&modules_path, "no Pooling module".into()))?;
        Ok(Some(Self { pooling, normalize }))
    }

    /// The mode of a `1_Pooling/config.json`: `pooling_mode` (newer
    /// sentence-transformers) or one of the `pooling_mode_*` flags (older).
    fn pooling_mode(cfg: &Value, path: &Path) -> Result<Pooling> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        if cfg.get("include_prompt").and_then(Value::as_bool) == Some(false) {
            // The prompt's tokens would have to be left out of the pool.
            return Err(err("include_prompt false is not supported".into()));
        }
        if let Some(name) = cfg.get("pooling_mode").and_then(Value::as_str) {
            return Pooling::parse(name)
                .ok_or_else(|| err(format!("pooling mode '{name}' is not supported")));
        }
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        let set: Vec<Pooling> = [
            ("pooling_mode_mean_tokens", Pooling::Mean),
            ("pooling_mode_cls_token", Pooling::Cls),
            ("pooling_mode_lasttoken", Pooling::LastToken),
        ]
        .into_iter()
        .filter(|(k, _)| flag(k))
        .map(|(_, p)| p)
        .collect();
        for unsupported in [
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
        ] {
            if flag(unsupported) {
                return Err(err(format!("{unsupported} is not supported")));
            }
        }
        match set[..] {
            [one] => Ok(one),
            [] => Err(err("no pooling mode is set".into())),
            _ => Err(err("several pooling modes at once are not supported".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pools() {
        let s = [1.0, 2.0, 3.0, 6.0];
        assert_eq!(Pooling::Mean.apply(&s, 2), vec![2.0, 4.0]);
        assert_eq!(Pooling::Cls.apply(&s, 2), vec![1.0, 2.0]);
        assert_eq!(Pooling::LastToken.apply(&s, 2), vec![3.0, 6.0]);
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
    }

    #[test]
    fn old_and_new_pooling_configs() {
        let p = Path::new("c.json");
        let old = json!({"word_embedding_dimension": 8, "pooling_mode_cls_token": true,
                         "pooling_mode_mean_tokens": false});
        assert_eq!(SentenceConfig::pooling_mode(&old, p).unwrap(), Pooling::Cls);
        let new = json!({"pooling_mode": "lasttoken"});
        assert_eq!(
            SentenceConfig::pooling_mode(&new, p).unwrap(),
            Pooling::LastToken
        );
        let max = json!({"pooling_mode_max_tokens": true});
        let e = SentenceConfig::pooling_mode(&max, p).unwrap_err();
        assert!(e.to_string().contains("max_tokens"), "{e}");
        let e = SentenceConfig::pooling_mode(&json!({"pooling_mode": "weird"}), p).unwrap_err();
        assert!(e.to_string().contains("weird"), "{e}");
    }
}
