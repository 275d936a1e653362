//! Where a model's properties are read from: its `serving.properties`
//! file, `HF_MODEL_ID`, or the environment alone for a model file.

use std::path::Path;

use super::builder::{env_value, Builder};
use super::error::PropertiesError;
use super::lexer::{decode, parse_properties, read_bounded};
use super::model::ModelProperties;
use super::raw::{Origin, RawProperty};

/// The file DJL Serving reads in each model directory.
pub const PROPERTIES_FILE: &str = "serving.properties";

impl ModelProperties {
    /// Reads `model_dir/serving.properties` if there is one (a model directory
    /// without one gets the defaults), applies the environment and validates.
    pub fn load(
        model_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        let path = model_dir.join(PROPERTIES_FILE);
        if !path.is_file() {
            return Self::build(model_dir, None, Vec::new(), env);
        }
        let bytes = read_bounded(&path).map_err(|source| PropertiesError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&decode(&bytes), &path, env)
    }

    /// Parses `text` as the contents of the properties file `path` (whose
    /// directory is the model directory), applies the environment and validates.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        let entries = parse_properties(text).map_err(|e| PropertiesError::Syntax {
            path: path.to_path_buf(),
            line: e.line,
            message: e.message,
        })?;
        let raw = entries
            .into_iter()
            .map(|p| RawProperty {
                key: p.key,
                value: p.value,
                origin: Origin::File {
                    path: path.to_path_buf(),
                    line: p.line,
                },
            })
            .collect();
        let model_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        Self::build(model_dir, Some(path), raw, env)
    }

    /// The model that DJL adds for `HF_MODEL_ID` when it is not a local
    /// directory: `option.model_id` from `HF_MODEL_ID`, `option.revision` from
    /// `HF_REVISION`, `option.task` from `HF_TASK` (these win over `OPTION_*`,
    /// as the `serving.properties` DJL writes for them does), then the usual
    /// environment forms. `None` when `HF_MODEL_ID` is unset or empty. Relative
    /// paths are taken from `base_dir`. When `HF_MODEL_ID` is a local
    /// directory, load that directory with [`Self::load`] instead (see
    /// `store::hf_model`).
    pub fn from_hf_model_id(
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<ModelProperties>, PropertiesError> {
        let Some(model_id) = env_value(env, "HF_MODEL_ID") else {
            return Ok(None);
        };
        let mut raw = vec![RawProperty {
            key: "option.model_id".to_string(),
            value: model_id.trim().to_string(),
            origin: Origin::Env {
                var: "HF_MODEL_ID".to_string(),
            },
        }];
        for (var, key) in [
            ("HF_REVISION", "option.revision"),
            ("HF_TASK", "option.task"),
        ] {
            if let Some(value) = env_value(env, var) {
                raw.push(RawProperty {
                    key: key.to_string(),
                    value,
                    origin: Origin::Env {
                        var: var.to_string(),
                    },
                });
            }
        }
        Self::build(base_dir, None, raw, env).map(Some)
    }

    /// The settings of a model given as a single file (no directory, so no
    /// `serving.properties`): the environment forms (`SERVING_JOB_QUEUE_SIZE`,
    /// `MAX_CONCURRENT_REQUESTS`, `OPTION_*`, …) and the defaults.
    pub fn for_model_file(
        model_file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        let dir = match model_file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        Self::build(dir, None, Vec::new(), env)
    }

    fn build(
        model_dir: &Path,
        properties_file: Option<&Path>,
        entries: Vec<RawProperty>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        let mut b = Builder {
            raw: Vec::new(),
            warnings: Vec::new(),
            problems: Vec::new(),
        };
        b.collect(entries, env);
        b.validate(model_dir, properties_file, env)
    }
}
