//! `serving.properties`: DJL Serving's per-model configuration, read the way
//! DJL reads it, validated, and mapped onto what kiln does.
//!
//! # Where a value comes from
//!
//! For each key, highest precedence first (this is DJL Serving's order, see
//! `ModelInfo.loadServingProperties`, `SageMakerCompatibility` and the LMI
//! container's entrypoint script):
//!
//! 1. `SAGEMAKER_STARTUP_TIMEOUT`, `SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS` and
//!    `SAGEMAKER_NUM_MODEL_WORKERS`, which DJL writes over the file.
//! 2. The model's `serving.properties` file. **The file wins over the other
//!    environment forms**, as in DJL ("Configurations specified in the
//!    serving.properties files will override configurations specified in
//!    environment variables"); a variable that the file shadows is reported in
//!    [`ModelProperties::warnings`] so that nobody wonders why it did nothing.
//! 3. `OPTION_<KEY>` for `option.<key>` (upper snake case; `OPTION_ENTRYPOINT`
//!    is `option.entryPoint`, `OPTION_ENGINE` is `engine`) and `SERVING_<KEY>`
//!    for the server-level keys a model may override (`job_queue_size`,
//!    `batch_size`, `max_batch_delay`, `max_idle_time`, `load_on_devices`).
//! 4. The LMI container's aliases: `HF_MODEL_TRUST_REMOTE_CODE`,
//!    `TENSOR_PARALLEL_DEGREE` (then `SM_NUM_GPUS`), `PIPELINE_PARALLEL_DEGREE`,
//!    `MAX_BATCH_SIZE` (`option.max_rolling_batch_size`),
//!    `MAX_CONCURRENT_REQUESTS` (`job_queue_size`), `MAX_BATCH_PREFILL_TOKENS`,
//!    `HF_MODEL_QUANTIZE`.
//! 5. Defaults ([`defaults`]); `MODEL_LOADING_TIMEOUT` and `PREDICT_TIMEOUT`
//!    replace the two timeout defaults, as in DJL's Python engine.
//!
//! Empty environment values are ignored, as in DJL. `HF_MODEL_ID` does not
//! change the models of the store: like DJL, it adds one more model, whose
//! properties [`ModelProperties::from_hf_model_id`] builds (`HF_REVISION` and
//! `HF_TASK` go with it); see also `store::hf_model`.
//!
//! # What kiln does with them
//!
//! kiln runs one engine per model on one device, batching continuously, so the
//! settings for DJL's worker processes, tensor parallelism and static batching
//! are accepted, validated, and reported as not needed. Unknown keys are
//! warnings that name the key (with a suggestion when it looks like a typo),
//! never silence and never errors. Values of the keys kiln uses are validated,
//! and a bad one is an error naming the file and line (or the variable), the
//! key, the value, and what is allowed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod chat;
pub use chat::{ChatOptions, SessionOptions, ToolCallParser};

/// The file DJL Serving reads in each model directory.
pub const PROPERTIES_FILE: &str = "serving.properties";

/// Default values, matching the DJL LMI containers where kiln behaves the same.
pub mod defaults {
    /// `option.max_rolling_batch_size` (DJL `LmiConfigRecommender`: 32, or
    /// [`MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM`] when `option.rolling_batch` is
    /// `vllm` or `trtllm`).
    pub const MAX_ROLLING_BATCH_SIZE: usize = 32;
    /// `option.max_rolling_batch_size` when `option.rolling_batch` names vllm or trtllm.
    pub const MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM: usize = 256;
    /// `job_queue_size` (DJL `WlmConfigManager`).
    pub const JOB_QUEUE_SIZE: usize = 1000;
    /// `batch_size` (DJL `WlmConfigManager`).
    pub const BATCH_SIZE: usize = 1;
    /// `max_batch_delay` in milliseconds (DJL `WlmConfigManager`).
    pub const MAX_BATCH_DELAY_MS: u64 = 100;
    /// `minWorkers` (DJL `ModelInfo`).
    pub const MIN_WORKERS: usize = 1;
    /// `option.model_loading_timeout` in seconds: the LMI images set
    /// `MODEL_LOADING_TIMEOUT=1200` (the Python engine's own default is 240).
    pub const MODEL_LOADING_TIMEOUT_S: u64 = 1200;
    /// `option.predict_timeout` in seconds: the LMI images set `PREDICT_TIMEOUT=240`.
    pub const PREDICT_TIMEOUT_S: u64 = 240;
}

/// The largest `job_queue_size` accepted wherever it is given
/// (`serving.properties`, `SERVING_JOB_QUEUE_SIZE`, `MAX_CONCURRENT_REQUESTS`,
/// `kiln serve --job-queue-size`, `POST /models?job_queue_size=`). The
/// engine admits up to `job_queue_size + max_rolling_batch_size` requests;
/// a value near `usize::MAX` would overflow that sum and refuse every
/// request, so larger values are refused where they are read.
pub const MAX_JOB_QUEUE_SIZE: usize = u32::MAX as usize;

// ---------------------------------------------------------------------------
// The `.properties` format
// ---------------------------------------------------------------------------

/// One `key=value` entry of a `.properties` file, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// The key.
    pub key: String,
    /// The value, with surrounding (unescaped) whitespace removed.
    pub value: String,
    /// The 1-based line on which the entry starts.
    pub line: usize,
}

/// A syntax error in a `.properties` text (only malformed `\u` escapes are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line on which the entry starts.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses Java `.properties` text into its entries, in file order (a key set
/// twice appears twice; the later one wins when they are applied).
///
/// Follows `java.util.Properties.load`: `key=value`, `key:value` and
/// `key value`; `#` and `!` comment lines; blank lines; a line ending in an odd
/// number of backslashes continues on the next, whose leading whitespace is
/// dropped; escapes `\t \n \r \f \uXXXX` (UTF-16 surrogate pairs included) and
/// `\` before any other character for that character. Unlike Java, trailing
/// unescaped whitespace of a value is removed too.
pub fn parse_properties(text: &str) -> Result<Vec<Property>, ParseError> {
    let mut entries = Vec::new();
    // (first line, text so far) of a logical line being continued.
    let mut pending: Option<(usize, String)> = None;
    for (index, physical) in physical_lines(text).into_iter().enumerate() {
        let stripped = physical.trim_start_matches(is_blank);
        let (start, mut logical) = match pending.take() {
            Some(p) => p,
            None => {
                if stripped.is_empty() || stripped.starts_with('#') || stripped.starts_with('!') {
                    continue;
                }
                (index + 1, String::new())
            }
        };
        let backslashes = stripped.chars().rev().take_while(|&c| c == '\\').count();
        if backslashes % 2 == 1 {
            logical.push_str(&stripped[..stripped.len() - 1]);
            pending = Some((start, logical));
        } else {
            logical.push_str(stripped);
            entries.push(parse_entry(start, &logical)?);
        }
    }
    if let Some((start, logical)) = pending {
        entries.push(parse_entry(start, &logical)?);
    }
    Ok(entries)
}

/// Whitespace as `.properties` counts it.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0c')
}

/// Splits on `\n`, `\r\n` and `\r`.
fn physical_lines(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut lines = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&text[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&text[start..i]);
                i += 1;
                if bytes.get(i) == Some(&b'\n') {
                    i += 1;
                }
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Splits one logical line (escapes still in place) into key and value.
fn parse_entry(line: usize, logical: &str) -> Result<Property, ParseError> {
    let chars: Vec<char> = logical.chars().collect();
    let mut key_end = chars.len();
    let mut has_separator = false;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '=' | ':' => {
                key_end = i;
                has_separator = true;
                break;
            }
            c if is_blank(c) => {
                key_end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let mut value_start = if has_separator { key_end + 1 } else { key_end };
    // Whitespace and at most one separator lie between key and value.
    while let Some(&c) = chars.get(value_start) {
        if is_blank(c) {
            value_start += 1;
        } else if !has_separator && (c == '=' || c == ':') {
            has_separator = true;
            value_start += 1;
        } else {
            break;
        }
    }
    let key: String = unescape(&chars[..key_end], line)?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let mut value = unescape(&chars[value_start.min(chars.len())..], line)?;
    while matches!(value.last(), Some(&(c, false)) if c.is_whitespace()) {
        value.pop();
    }
    Ok(Property {
        key,
        value: value.into_iter().map(|(c, _)| c).collect(),
        line,
    })
}

/// Resolves escapes; each character comes with whether it was escaped.
fn unescape(chars: &[char], line: usize) -> Result<Vec<(char, bool)>, ParseError> {
    let error = |message: &str| ParseError {
        line,
        message: message.to_string(),
    };
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '\\' {
            out.push((chars[i], false));
            i += 1;
            continue;
        }
        let Some(&next) = chars.get(i + 1) else {
            out.push(('\\', false));
            break;
        };
        i += 2;
        let c = match next {
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            'f' => '\x0c',
            'u' => {
                let high = hex4(chars, i).ok_or_else(|| error("malformed \\uXXXX escape"))?;
                i += 4;
                if (0xD800..0xDC00).contains(&high) {
                    let low = (chars.get(i) == Some(&'\\') && chars.get(i + 1) == Some(&'u'))
                        .then(|| hex4(chars, i + 2))
                        .flatten()
                        .filter(|low| (0xDC00..0xE000).contains(low))
                        .ok_or_else(|| error("unpaired UTF-16 surrogate in \\u escape"))?;
                    i += 6;
                    let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                    char::from_u32(code).ok_or_else(|| error("invalid \\u escape"))?
                } else {
                    char::from_u32(high)
                        .ok_or_else(|| error("unpaired UTF-16 surrogate in \\u escape"))?
                }
            }
            other => other,
        };
        out.push((c, true));
    }
    Ok(out)
}

/// Four hex digits at `at`.
fn hex4(chars: &[char], at: usize) -> Option<u32> {
    let digits = chars.get(at..at + 4)?;
    digits
        .iter()
        .try_fold(0u32, |acc, c| Some(acc * 16 + c.to_digit(16)?))
}

/// Decodes a properties file: UTF-8 (a byte-order mark is dropped), or
/// ISO-8859-1 (what Java's `Properties.load(InputStream)` assumes) when the
/// bytes are not valid UTF-8.
fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

// ---------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------

/// `engine`: how DJL runs the model's Python handler. kiln always runs its own
/// engine; the value only decides which warning to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// `Python` (the LMI default).
    Python,
    /// `MPI`: DJL's multi-process launcher for lmi-dist, TensorRT-LLM, DeepSpeed.
    Mpi,
    /// `DeepSpeed` (deprecated in DJL).
    DeepSpeed,
    /// Any other DJL engine name (`PyTorch`, `OnnxRuntime`, …), kept as written.
    Other(String),
}

impl Engine {
    fn parse(value: &str) -> Engine {
        match value.to_ascii_lowercase().as_str() {
            "python" => Engine::Python,
            "mpi" => Engine::Mpi,
            "deepspeed" => Engine::DeepSpeed,
            _ => Engine::Other(value.to_string()),
        }
    }

    /// The name as DJL spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Engine::Python => "Python",
            Engine::Mpi => "MPI",
            Engine::DeepSpeed => "DeepSpeed",
            Engine::Other(name) => name,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.dtype`: the data type for the weights. The same type, and the
/// same table of names, as the CLI's `--dtype` and `kiln inspect` use.
pub use kiln_model::WeightDtype as Dtype;

/// `option.rolling_batch`: which continuous-batching library DJL uses. Every
/// value runs on kiln's own continuous-batching engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RollingBatch {
    /// `auto` (the default): let the server choose.
    #[default]
    Auto,
    /// `disable`: DJL batches statically (or not at all).
    Disable,
    /// `scheduler`: DJL's own Hugging Face scheduler.
    Scheduler,
    /// `lmi-dist`.
    LmiDist,
    /// `vllm`.
    Vllm,
    /// `deepspeed`.
    DeepSpeed,
    /// `trtllm`: TensorRT-LLM.
    TrtLlm,
    /// `tnx`: Transformers NeuronX.
    Tnx,
}

impl RollingBatch {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str =
        "auto, disable, scheduler, lmi-dist, vllm, deepspeed, trtllm, tnx";

    /// Parses a value (case-insensitive).
    pub fn parse(value: &str) -> Option<RollingBatch> {
        Some(match value.to_ascii_lowercase().as_str() {
            "auto" => RollingBatch::Auto,
            "disable" => RollingBatch::Disable,
            "scheduler" => RollingBatch::Scheduler,
            "lmi-dist" => RollingBatch::LmiDist,
            "vllm" => RollingBatch::Vllm,
            "deepspeed" => RollingBatch::DeepSpeed,
            "trtllm" => RollingBatch::TrtLlm,
            "tnx" => RollingBatch::Tnx,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RollingBatch::Auto => "auto",
            RollingBatch::Disable => "disable",
            RollingBatch::Scheduler => "scheduler",
            RollingBatch::LmiDist => "lmi-dist",
            RollingBatch::Vllm => "vllm",
            RollingBatch::DeepSpeed => "deepspeed",
            RollingBatch::TrtLlm => "trtllm",
            RollingBatch::Tnx => "tnx",
        }
    }
}

impl fmt::Display for RollingBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.enable_streaming` (deprecated in DJL since 0.25: rolling batch
/// streams when the request asks for it, which is what kiln does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Streaming {
    /// `false` (the default).
    #[default]
    False,
    /// `true`.
    True,
    /// `huggingface`: Hugging Face-style streamed output.
    HuggingFace,
}

impl Streaming {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str = "true, false, huggingface";

    /// Parses a value (case-insensitive, as DJL lowercases it).
    pub fn parse(value: &str) -> Option<Streaming> {
        Some(match value.to_ascii_lowercase().as_str() {
            "false" => Streaming::False,
            "true" => Streaming::True,
            "huggingface" => Streaming::HuggingFace,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Streaming::False => "false",
            Streaming::True => "true",
            Streaming::HuggingFace => "huggingface",
        }
    }
}

impl fmt::Display for Streaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.output_formatter`: the body format of generation responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormatter {
    /// One JSON document (`application/json`), the default.
    #[default]
    Json,
    /// JSON lines (`application/jsonlines`).
    JsonLines,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

impl OutputFormatter {
    /// The accepted values, as listed in errors.
    pub const ALLOWED: &'static str = "json, jsonlines, sse";

    /// DJL formatter names that kiln accepts but does not implement: it warns
    /// and uses the default format instead, as DJL does for a formatter it
    /// does not know.
    pub const DJL_ONLY: &'static [&'static str] =
        &["json_chat", "jsonlines_chat", "3p", "3p_stream", "none"];

    /// Parses a value (exact, as DJL compares it).
    pub fn parse(value: &str) -> Option<OutputFormatter> {
        Some(match value {
            "json" => OutputFormatter::Json,
            "jsonlines" => OutputFormatter::JsonLines,
            "sse" => OutputFormatter::Sse,
            _ => return None,
        })
    }

    /// The DJL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormatter::Json => "json",
            OutputFormatter::JsonLines => "jsonlines",
            OutputFormatter::Sse => "sse",
        }
    }

    /// The response `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormatter::Json => "application/json",
            OutputFormatter::JsonLines => "application/jsonlines",
            OutputFormatter::Sse => "text/event-stream",
        }
    }
}

impl fmt::Display for OutputFormatter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `option.tensor_parallel_degree`: how many devices DJL shards the model over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorParallelDegree {
    /// `max` (or `-1`): all devices of the machine.
    Max,
    /// A fixed number of devices.
    Degree(u32),
}

impl fmt::Display for TensorParallelDegree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorParallelDegree::Max => f.write_str("max"),
            TensorParallelDegree::Degree(n) => write!(f, "{n}"),
        }
    }
}

/// Where the weights come from, classified from `option.model_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory or file: absolute, or relative to the model directory.
    LocalPath(PathBuf),
    /// A Hugging Face Hub id (`org/name` or `name`), with `option.revision`.
    HuggingFace {
        /// The model id.
        id: String,
        /// The commit, branch or tag, when given.
        revision: Option<String>,
    },
    /// An `s3://bucket/prefix` URL.
    S3(String),
    /// No `option.model_id`: the weights are in the model directory itself.
    InDirectory,
}

/// Where a model's weights are once its properties are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// On this machine already.
    Local(PathBuf),
    /// To be downloaded into the cache first.
    Remote(kiln_sources::Source),
}

impl ModelSource {
    /// Classifies an `option.model_id` value. Relative paths are taken from
    /// `model_dir`; a value shaped like a Hugging Face id is a local path when a
    /// directory or file of that name exists in `model_dir`.
    pub fn classify(
        value: &str,
        revision: Option<&str>,
        model_dir: &Path,
    ) -> Result<ModelSource, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(ModelSource::InDirectory);
        }
        if let Some(rest) = value.strip_prefix("s3://") {
            if rest.trim_matches('/').is_empty() {
                return Err("is an S3 URL without a bucket".to_string());
            }
            return Ok(ModelSource::S3(value.to_string()));
        }
        if value.starts_with("djl://") {
            return Err("is a DJL model zoo URL, which kiln does not serve: \
                 use a local path, a Hugging Face id or an s3:// URL"
                .to_string());
        }
        if let Some(path) = value.strip_prefix("file://") {
            return Ok(ModelSource::LocalPath(model_dir.join(path)));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(format!(
                "is a {scheme}:// URL; kiln reads local paths, Hugging Face ids and s3:// URLs"
            ));
        }
        let path = Path::new(value);
        if path.is_absolute() || value.starts_with('.') || model_dir.join(path).exists() {
            return Ok(ModelSource::LocalPath(model_dir.join(path)));
        }
        if is_hf_id(value) {
            return Ok(ModelSource::HuggingFace {
                id: value.to_string(),
                revision: revision.map(str::to_string),
            });
        }
        Ok(ModelSource::LocalPath(model_dir.join(path)))
    }
}

/// Whether `value` has the shape of a Hugging Face Hub id: `name` or
/// `namespace/name`, each of `[A-Za-z0-9_.-]`, not starting or ending with
/// `.` or `-`, without `..` or `--`, names at most 96 characters.
pub fn is_hf_id(value: &str) -> bool {
    kiln_sources::looks_like_hub_id(value)
}

// ---------------------------------------------------------------------------
// Origins, errors
// ---------------------------------------------------------------------------

/// Where a value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a properties file.
    File {
        /// The file, as it was given.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
    },
    /// An environment variable.
    Env {
        /// The variable's name.
        var: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
        }
    }
}

/// One entry of the effective configuration: every key the file set, and
/// every known key that the environment supplied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawProperty {
    /// The key, as in `serving.properties` (`option.dtype`, `minWorkers`, …).
    pub key: String,
    /// The value as written (unescaped and trimmed).
    pub value: String,
    /// Where it was set.
    pub origin: Origin,
}

/// The effective configuration as written: every key the file set (in file
/// order), then the known keys that the environment supplied. Serializes as a
/// JSON object of key to value, in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawProperties(Vec<RawProperty>);

impl RawProperties {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|p| p.value.as_str())
    }

    /// The entry for `key`, with its origin.
    pub fn entry(&self, key: &str) -> Option<&RawProperty> {
        self.0.iter().find(|p| p.key == key)
    }

    /// The entries, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, RawProperty> {
        self.0.iter()
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a RawProperties {
    type Item = &'a RawProperty;
    type IntoIter = std::slice::Iter<'a, RawProperty>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl serde::Serialize for RawProperties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for p in &self.0 {
            map.serialize_entry(&p.key, &p.value)?;
        }
        map.end()
    }
}

/// One bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the value was set.
    pub origin: Origin,
    /// The key.
    pub key: String,
    /// What is wrong, starting with the key and value, e.g.
    /// `option.dtype = 'fp8' is not one of auto, fp32, fp16, bf16`.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Why a model's properties cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    /// The properties file exists but cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid `.properties` text.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// One or more values are invalid (one line each).
    #[error("{}", join_problems(problems))]
    Invalid {
        /// Every bad value found, in file order then environment.
        problems: Vec<Problem>,
    },
    /// `option.model_id` names a remote model in a way that cannot be fetched.
    #[error("{origin}: option.model_id = '{value}': {source}")]
    BadSource {
        /// Where `option.model_id` was set.
        origin: Origin,
        /// The value.
        value: String,
        /// What is wrong with it.
        #[source]
        source: Box<kiln_sources::SourceError>,
    },
    /// `option.model_id` is a local path that does not exist.
    #[error("{origin}: option.model_id = '{value}': {} does not exist", path.display())]
    LocalPathMissing {
        /// Where `option.model_id` was set.
        origin: Origin,
        /// The value.
        value: String,
        /// The path it resolves to.
        path: PathBuf,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

// ---------------------------------------------------------------------------
// Known keys
// ---------------------------------------------------------------------------

/// The keys kiln reads.
const TYPED_KEYS: &[&str] = &[
    "engine",
    "option.model_id",
    "option.revision",
    "option.trust_remote_code",
    "option.dtype",
    "option.quantize",
    "option.device",
    "option.tensor_parallel_degree",
    "option.pipeline_parallel_degree",
    "option.rolling_batch",
    "option.max_rolling_batch_size",
    "option.max_rolling_batch_prefill_tokens",
    "option.max_model_len",
    "option.n_positions",
    "option.max_input_len",
    "option.max_output_len",
    "option.enable_streaming",
    "option.output_formatter",
    "option.enable_auto_tool_choice",
    "option.tool_call_parser",
    "option.reasoning_parser",
    "option.enable_reasoning",
    "option.enable_stateful_sessions",
    "option.sessions_expiration",
    "option.sessions_path",
    "option.max_sessions_per_client",
    "option.prefill_first_token",
    "option.speculative_config",
    "option.entryPoint",
    "option.model_loading_timeout",
    "option.predict_timeout",
    "batch_size",
    "max_dynamic_batch_size",
    "max_batch_delay",
    "job_queue_size",
    "minWorkers",
    "maxWorkers",
];

const NO_PYTHON: &str = "kiln runs no Python worker processes, so this has no effect";
const ONE_ENGINE: &str =
    "kiln runs one engine per model on one device, so worker and device placement settings have no effect";
const NO_QUANTIZE: &str =
    "kiln reads no bitsandbytes settings; use option.quantize=q8_0 (or q4_k) to quantize while loading";
const BACKEND_TUNING: &str = "this tunes one of DJL's backend libraries; kiln's own engine (paged KV cache, continuous batching) does not use it";
const NEURON: &str =
    "this is an AWS Neuron compilation setting; kiln does not run on Neuron devices";
const NOT_YET: &str = "kiln does not support this yet; it is ignored";

/// Keys DJL knows and kiln ignores, with what kiln does instead.
const IGNORED_KEYS: &[(&[&str], &str)] = &[
    (
        &[
            "option.pythonExecutable",
            "option.handler",
            "option.enable_venv",
            "option.parallel_loading",
            "option.mpi_mode",
            "option.async_mode",
            "option.env",
            "option.max_output_size",
            "option.model_dir",
            "option.modelName",
            "retry_threshold",
            "translatorFactory",
        ],
        NO_PYTHON,
    ),
    (&["option.task"], "kiln serves text generation"),
    (
        &[
            "gpu.minWorkers",
            "gpu.maxWorkers",
            "cpu.minWorkers",
            "cpu.maxWorkers",
            "load_on_devices",
            "max_idle_time",
            "required_memory_mb",
            "gpu.required_memory_mb",
            "reserved_memory_mb",
            "gpu.reserved_memory_mb",
        ],
        ONE_ENGINE,
    ),
    (&["option.load_in_8bit", "option.load_in_4bit"], NO_QUANTIZE),
    (
        &[
            "option.gpu_memory_utilization",
            "option.enforce_eager",
            "option.device_map",
            "option.low_cpu_mem_usage",
            "option.load_format",
            "option.disable_flash_attn",
            "option.max_tokens",
            "option.enable_cuda_graph",
            "option.triangular_masking",
            "option.return_tuple",
            "option.training_mp_size",
            "option.checkpoint",
            "option.decoding_strategy",
            "option.max_sparsity",
            "option.max_splits",
            "option.waiting_steps",
            "option.tokens_per_block",
            "option.batch_scheduler_policy",
            "option.kv_cache_free_gpu_mem_fraction",
            "option.max_num_sequences",
            "option.max_num_tokens",
            "option.use_custom_all_reduce",
            "option.enable_trt_overlap",
            "option.enable_kv_cache_reuse",
            "option.enable_chunked_prefill",
            "option.multi_block_mode",
            "option.use_fused_mlp",
            "option.smoothquant_alpha",
        ],
        BACKEND_TUNING,
    ),
    (
        &[
            "option.neuron_optimize_level",
            "option.context_length_estimate",
            "option.unroll",
            "option.load_split_model",
            "option.compiled_graph_path",
            "option.amp",
            "option.group_query_attention",
            "option.model_loader",
            "option.fuse_qkv",
            "option.fuse_mlp",
            "option.enable_mixed_precision_accumulation",
            "option.enable_saturate_infinity",
            "option.save_mp_checkpoint_path",
            "option.rolling_batch_strategy",
            "option.partition_schema",
            "option.attention_layout",
            "option.collectives_layout",
            "option.cache_layout",
            "option.all_reduce_dtype",
            "option.cast_logits_dtype",
        ],
        NEURON,
    ),
    (
        &[
            "option.enable_lora",
            "option.max_loras",
            "option.max_lora_rank",
            "option.max_cpu_loras",
            "option.speculative_draft_model",
            "option.speculative_length",
            "option.draft_model_id",
            "option.spec_length",
            "option.draft_model_tp_size",
            "option.tgi_compat",
            "option.bedrock_compat",
        ],
        NOT_YET,
    ),
    (
        &["log_request_metric", "metrics_aggregation"],
        "kiln always exports its metrics at GET /server/metrics",
    ),
];

/// What kiln does instead of `key`, when DJL knows the key and kiln ignores it.
fn ignored_reason(key: &str) -> Option<&'static str> {
    IGNORED_KEYS
        .iter()
        .find(|(keys, _)| keys.contains(&key))
        .map(|(_, reason)| *reason)
}

fn all_known_keys() -> impl Iterator<Item = &'static str> {
    TYPED_KEYS.iter().copied().chain(
        IGNORED_KEYS
            .iter()
            .flat_map(|(keys, _)| keys.iter().copied()),
    )
}

/// Server-level keys that a model may override (DJL `WlmConfigManager`), whose
/// environment form is `SERVING_<KEY>`.
const SERVING_KEYS: &[&str] = &[
    "job_queue_size",
    "batch_size",
    "max_batch_delay",
    "max_idle_time",
    "load_on_devices",
];

/// The DJL environment variable for `key`, if it has one.
pub fn env_var_for(key: &str) -> Option<String> {
    if key == "engine" {
        return Some("OPTION_ENGINE".to_string());
    }
    if let Some(rest) = key.strip_prefix("option.") {
        // DJL lowercases OPTION_ names; camelCase keys other than entryPoint
        // cannot be reached from the environment.
        if rest == "entryPoint" || !rest.chars().any(|c| c.is_ascii_uppercase()) {
            return Some(format!("OPTION_{}", rest.to_ascii_uppercase()));
        }
        return None;
    }
    SERVING_KEYS
        .contains(&key)
        .then(|| format!("SERVING_{}", key.to_ascii_uppercase()))
}

/// The LMI container's aliases (its entrypoint turns them into `OPTION_`/
/// `SERVING_` variables when those are unset), in precedence order.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("HF_MODEL_TRUST_REMOTE_CODE", "option.trust_remote_code"),
    ("TENSOR_PARALLEL_DEGREE", "option.tensor_parallel_degree"),
    ("SM_NUM_GPUS", "option.tensor_parallel_degree"),
    (
        "PIPELINE_PARALLEL_DEGREE",
        "option.pipeline_parallel_degree",
    ),
    ("MAX_BATCH_SIZE", "option.max_rolling_batch_size"),
    ("MAX_CONCURRENT_REQUESTS", "job_queue_size"),
    (
        "MAX_BATCH_PREFILL_TOKENS",
        "option.max_rolling_batch_prefill_tokens",
    ),
    ("HF_MODEL_QUANTIZE", "option.quantize"),
];

/// Variables that DJL writes over the file (`SageMakerCompatibility`).
const ENV_OVERRIDES: &[(&str, &[&str])] = &[
    (
        "SAGEMAKER_STARTUP_TIMEOUT",
        &["option.model_loading_timeout"],
    ),
    (
        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",
        &["option.predict_timeout"],
    ),
    ("SAGEMAKER_NUM_MODEL_WORKERS", &["minWorkers", "maxWorkers"]),
];

/// Reads the process environment: the `env` to pass in production.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

// ---------------------------------------------------------------------------
// ModelProperties
// ---------------------------------------------------------------------------

/// A model's validated configuration: `serving.properties` plus environment.
#[derive(Debug, Clone)]
pub struct ModelProperties {
    /// The model directory (relative `option.model_id` paths start here).
    pub model_dir: PathBuf,
    /// The properties file that was read, if there was one.
    pub properties_file: Option<PathBuf>,
    /// `engine` (default `Python`).
    pub engine: Engine,
    /// `option.model_id` (with `option.revision`), classified.
    pub model_source: ModelSource,
    /// `option.revision`, as given.
    pub revision: Option<String>,
    /// `option.trust_remote_code` (default false; kiln runs no model code either way).
    pub trust_remote_code: bool,
    /// `option.dtype` (default `auto`: the checkpoint's type).
    pub dtype: Dtype,
    /// `option.quantize`: the block format float weight matrices are
    /// quantized to while loading (`q8_0`, `q4_k`, …); `None` keeps them.
    pub quantize: Option<kiln_backend::GgmlType>,
    /// `option.device` (`cpu`, `cuda`, `cuda:N`): where this model runs;
    /// `None` takes the server's `--device`.
    pub device: Option<kiln_backend::Device>,
    /// `option.tensor_parallel_degree`, if given (kiln uses one device).
    pub tensor_parallel_degree: Option<TensorParallelDegree>,
    /// `option.rolling_batch` (default `auto`).
    pub rolling_batch: RollingBatch,
    /// `option.max_rolling_batch_size`: most sequences decoded together
    /// (default 32, or 256 with `vllm`/`trtllm`, as in DJL).
    pub max_rolling_batch_size: usize,
    /// `option.max_rolling_batch_prefill_tokens`: most tokens one engine step
    /// may process (`None`: the engine decides).
    pub max_rolling_batch_prefill_tokens: Option<usize>,
    /// `option.max_model_len`, or else `option.n_positions`: the most tokens
    /// (prompt plus output) of one sequence (`None`: the model's own context
    /// length; DJL's Neuron default of 128 is not adopted).
    pub max_model_len: Option<usize>,
    /// `option.max_input_len`: the most prompt tokens, if given.
    pub max_input_len: Option<usize>,
    /// `option.max_output_len`: the most generated tokens, if given.
    pub max_output_len: Option<usize>,
    /// `option.enable_streaming` (deprecated in DJL). With rolling batch on
    /// it has no effect: a request streams when it asks to. With
    /// `option.rolling_batch=disable` every LMI request streams as DJL's
    /// static-batch handler streams ([`Self::static_batch_streaming`]).
    pub enable_streaming: Streaming,
    /// `option.output_formatter`; `None` means DJL's default: `json`, or
    /// `jsonlines` for a streamed response (see [`Self::output_formatter_for`]).
    pub output_formatter: Option<OutputFormatter>,
    /// `option.tool_call_parser` and `option.reasoning_parser` (see [`chat`]).
    pub chat: ChatOptions,
    /// `batch_size` (or `max_dynamic_batch_size`): DJL's static batch size,
    /// default 1. kiln batches continuously and does not use it.
    pub batch_size: usize,
    /// `max_batch_delay`: how long DJL waits to fill a static batch (default
    /// 100 ms). kiln does not wait: a request joins the running batch at the
    /// next engine step.
    pub max_batch_delay: Duration,
    /// `job_queue_size`: most requests waiting for the engine (default 1000);
    /// more are refused with 503.
    pub job_queue_size: usize,
    /// `minWorkers` (default 1); kiln runs one engine.
    pub min_workers: usize,
    /// `maxWorkers`: as given, or else the larger of `minWorkers` and 1 (DJL
    /// derives its default from the device; kiln runs one engine).
    pub max_workers: usize,
    /// `option.model_loading_timeout` (default 1200 s, or `MODEL_LOADING_TIMEOUT`).
    pub model_loading_timeout: Duration,
    /// `option.predict_timeout`: longest time one request may take (default
    /// 240 s, or `PREDICT_TIMEOUT`).
    pub predict_timeout: Duration,
    /// `option.entryPoint`, if given (kiln always uses its built-in handler).
    pub entry_point: Option<String>,
    /// `option.prefill_first_token` (kiln's own, default false): whether
    /// `details.prefill` starts with the prompt's first token (with a null
    /// log-probability, as DJL's LMI schema documents it) or leaves it out
    /// (as DJL's vLLM handler writes it); see [`crate::lmi`].
    pub prefill_first_token: bool,
    /// Every key set, with value and origin: the file's keys in file order,
    /// then the keys that came from the environment.
    pub raw: RawProperties,
    /// Things the operator should know: unknown keys, keys kiln ignores, and
    /// environment variables that the file shadows. Each names its origin.
    pub warnings: Vec<String>,
    model_id_origin: Option<Origin>,
}

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

    /// The value of `key` in the effective configuration.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.raw.get(key)
    }

    /// DJL's static-batch streaming: with `option.rolling_batch=disable` and
    /// `option.enable_streaming`, its Hugging Face handler streams every
    /// request, a list of inputs as one `{"outputs": [...]}` line per step
    /// (see [`crate::lmi_outputs`]).
    pub fn static_batch_streaming(&self) -> bool {
        self.rolling_batch == RollingBatch::Disable && self.enable_streaming != Streaming::False
    }

    /// The response format: `option.output_formatter` if set, else `json`, or
    /// `jsonlines` for a streamed response (DJL's rule).
    pub fn output_formatter_for(&self, streaming: bool) -> OutputFormatter {
        match self.output_formatter {
            Some(formatter) => formatter,
            None if streaming => OutputFormatter::JsonLines,
            None => OutputFormatter::Json,
        }
    }

    /// Where the weights are: the `option.model_id` path, the model
    /// directory when there is no `option.model_id`, or a remote source
    /// (a Hugging Face id with `option.revision`, an `s3://` URL) that
    /// `kiln_sources` downloads before loading. A local path that does not
    /// exist, or a malformed remote one, is an error naming the setting.
    pub fn resolve(&self) -> Result<ModelLocation, PropertiesError> {
        let origin = || {
            self.model_id_origin.clone().unwrap_or_else(|| Origin::Env {
                var: "OPTION_MODEL_ID".to_string(),
            })
        };
        let value = || self.get("option.model_id").unwrap_or_default().to_string();
        let remote = |r: Result<kiln_sources::Source, kiln_sources::SourceError>| {
            r.map(ModelLocation::Remote)
                .map_err(|source| PropertiesError::BadSource {
                    origin: origin(),
                    value: value(),
                    source: Box::new(source),
                })
        };
        match &self.model_source {
            ModelSource::InDirectory => Ok(ModelLocation::Local(self.model_dir.clone())),
            ModelSource::LocalPath(path) if path.exists() => Ok(ModelLocation::Local(path.clone())),
            ModelSource::LocalPath(path) => Err(PropertiesError::LocalPathMissing {
                origin: origin(),
                value: value(),
                path: path.clone(),
            }),
            ModelSource::HuggingFace { id, revision } => {
                remote(kiln_sources::Source::hub(id, revision.as_deref()))
            }
            ModelSource::S3(url) => remote(kiln_sources::Source::s3(url)),
        }
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

/// The defaults: a model directory `.` without `serving.properties`, in an
/// empty environment.
impl Default for ModelProperties {
    fn default() -> Self {
        ModelProperties {
            model_dir: PathBuf::from("."),
            properties_file: None,
            engine: Engine::Python,
            model_source: ModelSource::InDirectory,
            revision: None,
            trust_remote_code: false,
            dtype: Dtype::Auto,
            quantize: None,
            device: None,
            tensor_parallel_degree: None,
            rolling_batch: RollingBatch::Auto,
            max_rolling_batch_size: defaults::MAX_ROLLING_BATCH_SIZE,
            max_rolling_batch_prefill_tokens: None,
            max_model_len: None,
            max_input_len: None,
            max_output_len: None,
            enable_streaming: Streaming::False,
            chat: ChatOptions::default(),
            output_formatter: None,
            batch_size: defaults::BATCH_SIZE,
            max_batch_delay: Duration::from_millis(defaults::MAX_BATCH_DELAY_MS),
            job_queue_size: defaults::JOB_QUEUE_SIZE,
            min_workers: defaults::MIN_WORKERS,
            max_workers: defaults::MIN_WORKERS.max(1),
            model_loading_timeout: Duration::from_secs(defaults::MODEL_LOADING_TIMEOUT_S),
            predict_timeout: Duration::from_secs(defaults::PREDICT_TIMEOUT_S),
            entry_point: None,
            prefill_first_token: false,
            raw: RawProperties::default(),
            warnings: Vec::new(),
            model_id_origin: None,
        }
    }
}

/// Gathers the raw entries, then turns them into typed values.
struct Builder {
    raw: Vec<RawProperty>,
    warnings: Vec<String>,
    problems: Vec<Problem>,
}

fn env_value(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    env(var)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Builder {
    /// File entries (later duplicates win), then environment fill-ins, then
    /// the SageMaker overrides.
    fn collect(&mut self, entries: Vec<RawProperty>, env: &dyn Fn(&str) -> Option<String>) {
        for entry in entries {
            match self.raw.iter_mut().find(|p| p.key == entry.key) {
                Some(earlier) => {
                    self.warnings.push(format!(
                        "{}: {} is set again; this value replaces the one from {}",
                        entry.origin, entry.key, earlier.origin
                    ));
                    earlier.value = entry.value;
                    earlier.origin = entry.origin;
                }
                None => self.raw.push(entry),
            }
        }

        for key in all_known_keys() {
            let mut candidates: Vec<String> = env_var_for(key).into_iter().collect();
            candidates.extend(
                ENV_ALIASES
                    .iter()
                    .filter(|(_, k)| *k == key)
                    .map(|(var, _)| var.to_string()),
            );
            for var in candidates {
                let Some(value) = env_value(env, &var) else {
                    continue;
                };
                match self.raw.iter().find(|p| p.key == key) {
                    None => self.raw.push(RawProperty {
                        key: key.to_string(),
                        value,
                        origin: Origin::Env { var },
                    }),
                    Some(set) if set.value != value => {
                        let why = match set.origin {
                            Origin::File { .. } => {
                                "serving.properties wins over the environment, as in DJL Serving"
                            }
                            Origin::Env { .. } => "which wins, as in DJL Serving",
                        };
                        self.warnings.push(format!(
                            "environment variable {var}={value} is not used: {} sets {key}={} ({why})",
                            set.origin, set.value
                        ))
                    }
                    Some(_) => {}
                }
            }
        }

        for (var, keys) in ENV_OVERRIDES {
            let Some(value) = env_value(env, var) else {
                continue;
            };
            for key in *keys {
                let origin = Origin::Env {
                    var: var.to_string(),
                };
                match self.raw.iter_mut().find(|p| p.key == *key) {
                    Some(set) => {
                        if set.value != value {
                            self.warnings.push(format!(
                                "environment variable {var}={value} replaces {key}={} from {} \
                                 (as in DJL Serving)",
                                set.value, set.origin
                            ));
                        }
                        set.value = value.clone();
                        set.origin = origin;
                    }
                    None => self.raw.push(RawProperty {
                        key: key.to_string(),
                        value: value.clone(),
                        origin,
                    }),
                }
            }
        }
    }

    fn entry(&self, key: &str) -> Option<RawProperty> {
        self.raw.iter().find(|p| p.key == key).cloned()
    }

    fn problem(&mut self, p: &RawProperty, what: &str) {
        self.problems.push(Problem {
            origin: p.origin.clone(),
            key: p.key.clone(),
            message: format!("{} = '{}' {what}", p.key, p.value),
        });
    }

    fn warn(&mut self, p: &RawProperty, what: &str) {
        self.warnings
            .push(format!("{}: {}={}: {what}", p.origin, p.key, p.value));
    }

    /// A whole number in `min..=max`; otherwise a problem saying it is not `expected`.
    fn int(&mut self, key: &str, min: i64, max: i64, expected: &str) -> Option<(i64, RawProperty)> {
        let p = self.entry(key)?;
        match p.value.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Some((n, p)),
            _ => {
                self.problem(&p, &format!("is not {expected}"));
                None
            }
        }
    }

    /// A count: a whole number from `min` to `u32::MAX`.
    fn count_at_least(&mut self, key: &str, min: u32) -> Option<(usize, RawProperty)> {
        let expected = format!("a whole number of at least {min}");
        self.int(key, i64::from(min), i64::from(u32::MAX), &expected)
            .map(|(n, p)| (usize::try_from(n).unwrap_or(usize::MAX), p))
    }

    fn seconds(&mut self, key: &str) -> Option<Duration> {
        self.int(
            key,
            1,
            i64::from(u32::MAX),
            "a whole number of seconds of at least 1",
        )
        .map(|(n, _)| Duration::from_secs(n.unsigned_abs()))
    }

    fn boolean(&mut self, key: &str) -> Option<(bool, RawProperty)> {
        let p = self.entry(key)?;
        match p.value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some((true, p)),
            "false" | "no" | "off" | "0" => Some((false, p)),
            _ => {
                self.problem(&p, "is not true or false");
                None
            }
        }
    }

    fn choice<T>(
        &mut self,
        key: &str,
        parse: fn(&str) -> Option<T>,
        allowed: &str,
    ) -> Option<(T, RawProperty)> {
        let p = self.entry(key)?;
        match parse(&p.value) {
            Some(v) => Some((v, p)),
            None => {
                self.problem(&p, &format!("is not one of {allowed}"));
                None
            }
        }
    }

    /// `option.quantize`: a format kiln quantizes to, or a problem that says
    /// which ones it has (DJL's GPU-engine methods are named as such).
    fn quantize(&mut self) -> Option<kiln_backend::GgmlType> {
        use kiln_model::names::{parse_quantize, target_list, QuantizeNameError};
        let p = self.entry("option.quantize")?;
        match parse_quantize(&p.value) {
            Ok(ty) => Some(ty),
            Err(QuantizeNameError::DjlMethod(_)) => {
                self.problem(
                    &p,
                    &format!(
                        "is a quantization method of DJL's Python engines, which kiln cannot run; \
                         kiln quantizes 16/32-bit weights while loading, to one of {}",
                        target_list()
                    ),
                );
                None
            }
            Err(QuantizeNameError::Unknown(_)) => {
                self.problem(&p, &format!("is not one of {}", target_list()));
                None
            }
        }
    }

    fn degree(&mut self, key: &str) -> Option<(TensorParallelDegree, RawProperty)> {
        let p = self.entry(key)?;
        let value = p.value.to_ascii_lowercase();
        if value == "max" || value == "-1" {
            return Some((TensorParallelDegree::Max, p));
        }
        match value.parse::<u32>() {
            Ok(n) if n >= 1 => Some((TensorParallelDegree::Degree(n), p)),
            _ => {
                self.problem(&p, "is not max or a whole number of at least 1");
                None
            }
        }
    }

    fn validate(
        mut self,
        model_dir: &Path,
        properties_file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ModelProperties, PropertiesError> {
        self.warn_unknown_and_ignored();

        let engine = match self.entry("engine") {
            None => Engine::Python,
            Some(p) => {
                let engine = Engine::parse(&p.value);
                match &engine {
                    Engine::Python => {}
                    Engine::Mpi | Engine::DeepSpeed => self.warn(
                        &p,
                        "kiln runs one engine per model on one device in its own process; \
                         no MPI or DeepSpeed launcher is used",
                    ),
                    Engine::Other(_) => self.warn(
                        &p,
                        "not an LMI engine; kiln serves the model as a large language model \
                         with its own engine",
                    ),
                }
                engine
            }
        };

        let entry_point = self.entry("option.entryPoint").map(|p| {
            self.warn(
                &p,
                "kiln serves every model with its built-in handler and runs no Python entry point",
            );
            p.value
        });

        let revision = self.entry("option.revision").map(|p| p.value);
        let model_id = self.entry("option.model_id");
        let model_source = match &model_id {
            None => ModelSource::InDirectory,
            Some(p) => match ModelSource::classify(&p.value, revision.as_deref(), model_dir) {
                Ok(source) => source,
                Err(why) => {
                    self.problem(p, &why);
                    ModelSource::InDirectory
                }
            },
        };
        if let (Some(p), false) = (
            self.entry("option.revision"),
            matches!(model_source, ModelSource::HuggingFace { .. }),
        ) {
            self.warn(
                &p,
                "only applies to a Hugging Face model id, and option.model_id is not one",
            );
        }

        let trust_remote_code = match self.boolean("option.trust_remote_code") {
            Some((true, p)) => {
                self.warn(
                    &p,
                    "kiln never runs code from the model; its architectures are built in",
                );
                true
            }
            other => other.is_some_and(|(v, _)| v),
        };

        let dtype = self
            .choice("option.dtype", Dtype::parse, Dtype::ALLOWED)
            .map_or(Dtype::Auto, |(d, _)| d);
        let quantize = self.quantize();
        let device = self
            .choice(
                "option.device",
                |v| kiln_backend::Device::parse(v).ok(),
                kiln_backend::Device::ALLOWED,
            )
            .map(|(d, _)| d);

        let tensor_parallel_degree = self.degree("option.tensor_parallel_degree").map(|(d, p)| {
            if matches!(d, TensorParallelDegree::Degree(n) if n > 1) {
                self.warn(
                    &p,
                    "kiln runs each model on one device; the model is not sharded",
                );
            }
            d
        });
        if let Some((TensorParallelDegree::Degree(n), p)) =
            self.degree("option.pipeline_parallel_degree")
        {
            if n > 1 {
                self.warn(
                    &p,
                    "kiln runs each model on one device; the model is not split into stages",
                );
            }
        }

        let rolling_batch = match self.choice(
            "option.rolling_batch",
            RollingBatch::parse,
            RollingBatch::ALLOWED,
        ) {
            None => RollingBatch::Auto,
            Some((rb, p)) => {
                match rb {
                    RollingBatch::Auto => {}
                    RollingBatch::Disable => self.warn(
                        &p,
                        "kiln batches continuously all the same; a request's output does not \
                         depend on what it is batched with",
                    ),
                    _ => self.warn(&p, "served by kiln's own continuous-batching engine"),
                }
                rb
            }
        };

        let default_batch = match rolling_batch {
            RollingBatch::Vllm | RollingBatch::TrtLlm => {
                defaults::MAX_ROLLING_BATCH_SIZE_VLLM_TRTLLM
            }
            _ => defaults::MAX_ROLLING_BATCH_SIZE,
        };
        let max_rolling_batch_size = self
            .count_at_least("option.max_rolling_batch_size", 1)
            .map_or(default_batch, |(n, _)| n);
        let max_rolling_batch_prefill_tokens = self
            .count_at_least("option.max_rolling_batch_prefill_tokens", 1)
            .map(|(n, _)| n);

        let n_positions = self.count_at_least("option.n_positions", 1);
        let max_model_len = match (self.count_at_least("option.max_model_len", 1), n_positions) {
            (Some((len, p)), Some((n, _))) if len != n => {
                self.warn(&p, &format!("used instead of option.n_positions={n}"));
                Some(len)
            }
            (Some((len, _)), _) => Some(len),
            (None, n) => n.map(|(n, _)| n),
        };
        let max_input_len = self
            .count_at_least("option.max_input_len", 1)
            .map(|(n, _)| n);
        let max_output_len = self
            .count_at_least("option.max_output_len", 1)
            .map(|(n, _)| n);

        let streaming = self.choice(
            "option.enable_streaming",
            Streaming::parse,
            Streaming::ALLOWED,
        );
        let enable_streaming = match &streaming {
            None => Streaming::False,
            Some((s, p)) => {
                if rolling_batch != RollingBatch::Disable {
                    self.warn(
                        p,
                        "deprecated in DJL and not needed: kiln streams a response when the \
                         request asks for it (\"stream\": true)",
                    );
                }
                *s
            }
        };
        let chat = self.chat_options();
        if let Some(p) = self.entry("option.speculative_config") {
            self.problem(
                &p,
                "asks for speculative decoding, which kiln does not implement yet; remove \
                 option.speculative_config to serve the model without it",
            );
        }
        let prefill_first_token = self
            .boolean("option.prefill_first_token")
            .is_some_and(|(on, _)| on);

        let output_formatter = self.output_formatter();

        let dynamic = self.count_at_least("max_dynamic_batch_size", 1);
        let batch_size = match self.count_at_least("batch_size", 1).or(dynamic) {
            None => defaults::BATCH_SIZE,
            Some((n, p)) => {
                if n > 1 {
                    self.warn(
                        &p,
                        "kiln batches continuously (up to option.max_rolling_batch_size \
                         sequences), so static batching is not needed and not used",
                    );
                }
                n
            }
        };
        let max_batch_delay = match self.int(
            "max_batch_delay",
            0,
            i64::from(u32::MAX),
            "a whole number of milliseconds",
        ) {
            None => Duration::from_millis(defaults::MAX_BATCH_DELAY_MS),
            Some((ms, p)) => {
                self.warn(
                    &p,
                    "kiln does not wait to fill a batch: a request joins at the next engine step",
                );
                Duration::from_millis(ms.unsigned_abs())
            }
        };
        let job_queue_size = self
            .int(
                "job_queue_size",
                1,
                MAX_JOB_QUEUE_SIZE as i64,
                &format!("a whole number from 1 to {MAX_JOB_QUEUE_SIZE}"),
            )
            .map_or(defaults::JOB_QUEUE_SIZE, |(n, _)| {
                usize::try_from(n).unwrap_or(MAX_JOB_QUEUE_SIZE)
            });

        let (min_workers, max_workers) = self.workers();

        let model_loading_timeout =
            self.seconds("option.model_loading_timeout")
                .unwrap_or_else(|| {
                    Duration::from_secs(
                        env_secs(env, "MODEL_LOADING_TIMEOUT")
                            .unwrap_or(defaults::MODEL_LOADING_TIMEOUT_S),
                    )
                });
        let predict_timeout = self.seconds("option.predict_timeout").unwrap_or_else(|| {
            Duration::from_secs(
                env_secs(env, "PREDICT_TIMEOUT").unwrap_or(defaults::PREDICT_TIMEOUT_S),
            )
        });

        if !self.problems.is_empty() {
            return Err(PropertiesError::Invalid {
                problems: self.problems,
            });
        }
        Ok(ModelProperties {
            model_dir: model_dir.to_path_buf(),
            properties_file: properties_file.map(Path::to_path_buf),
            engine,
            model_source,
            revision,
            trust_remote_code,
            dtype,
            quantize,
            device,
            tensor_parallel_degree,
            rolling_batch,
            max_rolling_batch_size,
            max_rolling_batch_prefill_tokens,
            max_model_len,
            max_input_len,
            max_output_len,
            enable_streaming,
            output_formatter,
            chat,
            batch_size,
            max_batch_delay,
            job_queue_size,
            min_workers,
            max_workers,
            model_loading_timeout,
            predict_timeout,
            entry_point,
            prefill_first_token,
            raw: RawProperties(self.raw),
            warnings: self.warnings,
            model_id_origin: model_id.map(|p| p.origin),
        })
    }

    fn output_formatter(&mut self) -> Option<OutputFormatter> {
        let p = self.entry("option.output_formatter")?;
        if let Some(formatter) = OutputFormatter::parse(&p.value) {
            return Some(formatter);
        }
        if OutputFormatter::DJL_ONLY.contains(&p.value.as_str()) {
            self.warn(&p, "kiln does not implement this DJL formatter; using the default (json, or jsonlines when streaming)");
        } else {
            self.problem(
                &p,
                &format!(
                    "is not one of {} (custom formatters from a model.py cannot run in kiln)",
                    OutputFormatter::ALLOWED
                ),
            );
        }
        None
    }

    /// `minWorkers`/`maxWorkers`: -1 means DJL's default.
    fn workers(&mut self) -> (usize, usize) {
        let range = i64::from(u32::MAX);
        let min = self.int(
            "minWorkers",
            -1,
            range,
            "-1 or a whole number of at least 0",
        );
        let max = self.int(
            "maxWorkers",
            -1,
            range,
            "-1 or a whole number of at least 1",
        );
        let min_workers = match &min {
            Some((n, p)) if *n >= 0 => {
                self.note_workers(p, *n);
                usize::try_from(*n).unwrap_or(usize::MAX)
            }
            _ => defaults::MIN_WORKERS,
        };
        let max_workers = match &max {
            Some((0, p)) => {
                self.problem(p, "is not -1 or a whole number of at least 1");
                None
            }
            Some((n, p)) if *n > 0 => {
                self.note_workers(p, *n);
                Some(usize::try_from(*n).unwrap_or(usize::MAX))
            }
            _ => None,
        };
        if let (Some(max_n), Some((_, p))) = (max_workers, &min) {
            if min_workers > max_n {
                self.problem(p, &format!("is more than maxWorkers = {max_n}"));
            }
        }
        (min_workers, max_workers.unwrap_or(min_workers.max(1)))
    }

    fn note_workers(&mut self, p: &RawProperty, n: i64) {
        if n > 1 {
            self.warn(
                p,
                "kiln runs one engine per model, which serves concurrent requests by \
                 batching them; more workers are not needed",
            );
        }
    }

    fn warn_unknown_and_ignored(&mut self) {
        let raw = self.raw.clone();
        for p in &raw {
            if TYPED_KEYS.contains(&p.key.as_str()) {
                continue;
            }
            if let Some(reason) = ignored_reason(&p.key) {
                self.warnings
                    .push(format!("{}: {} is ignored: {reason}", p.origin, p.key));
                continue;
            }
            let hint = match suggest(&p.key) {
                Some(known) => format!(" (did you mean {known}?)"),
                None => String::new(),
            };
            self.warnings.push(format!(
                "{}: unknown key '{}' is ignored{hint}",
                p.origin, p.key
            ));
        }
    }
}

fn env_secs(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<u64> {
    env_value(env, var)?.parse().ok().filter(|&n| n > 0)
}

/// The known key closest to `key`, if it is close enough to be a likely typo.
fn suggest(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    let with_prefix = format!("option.{lower}");
    all_known_keys()
        .map(|known| {
            let k = known.to_ascii_lowercase();
            (
                edit_distance(&lower, &k).min(edit_distance(&with_prefix, &k)),
                known,
            )
        })
        .filter(|&(d, known)| d <= 2.max(known.len() / 8))
        .min_by_key(|&(d, _)| d)
        .map(|(_, known)| known)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Largest `serving.properties` read (real ones are a few hundred bytes).
pub const MAX_PROPERTIES_BYTES: u64 = 1 << 20;

/// Reads a properties file, refusing one over [`MAX_PROPERTIES_BYTES`]
/// before reading it (or, when its size is unknown, once past the limit).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_big = |size: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{size}, more than the {MAX_PROPERTIES_BYTES}-byte limit for a serving.properties"
            ),
        )
    };
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > MAX_PROPERTIES_BYTES {
        return Err(too_big(format!("the file is {} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PROPERTIES_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PROPERTIES_BYTES {
        return Err(too_big("the file is larger".into()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse_properties(text)
            .expect("parses")
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn separators_and_whitespace() {
        assert_eq!(
            kv("a=1\nb:2\nc 3\n  d  =  4  \ne\t:\t5\nf\n"),
            vec![
                pair("a", "1"),
                pair("b", "2"),
                pair("c", "3"),
                pair("d", "4"),
                pair("e", "5"),
                pair("f", "")
            ]
        );
    }

    #[test]
    fn only_one_separator_is_skipped() {
        assert_eq!(
            kv("a = = b\nc:=d\ne==f"),
            vec![pair("a", "= b"), pair("c", "=d"), pair("e", "=f")]
        );
    }

    #[test]
    fn comments_and_blank_lines() {
        let entries =
            parse_properties("# c\n\n   ! bang\n\t\nkey=v # not a comment\n").expect("parses");
        assert_eq!(
            entries,
            vec![Property {
                key: "key".into(),
                value: "v # not a comment".into(),
                line: 5
            }]
        );
    }

    #[test]
    fn continuation_lines() {
        let entries = parse_properties("a=one \\\n    two \\\n\tthree\nb=x").expect("parses");
        assert_eq!(entries[0].value, "one two three");
        assert_eq!(entries[0].line, 1);
        assert_eq!(
            entries[1],
            Property {
                key: "b".into(),
                value: "x".into(),
                line: 4
            }
        );
    }

    #[test]
    fn even_backslashes_do_not_continue() {
        assert_eq!(kv("a=x\\\\\nb=y"), vec![pair("a", "x\\"), pair("b", "y")]);
    }

    #[test]
    fn comment_lines_never_continue_and_continued_hash_is_text() {
        assert_eq!(kv("# comment \\\na=1"), vec![pair("a", "1")]);
        assert_eq!(
            kv("a=1\\\n# not a comment"),
            vec![pair("a", "1# not a comment")]
        );
    }

    #[test]
    fn blank_continuation_line_ends_the_entry() {
        assert_eq!(kv("a=1\\\n\nb=2"), vec![pair("a", "1"), pair("b", "2")]);
    }

    #[test]
    fn continuation_at_end_of_file() {
        assert_eq!(kv("a=1\\"), vec![pair("a", "1")]);
    }

    #[test]
    fn line_endings() {
        let entries = parse_properties("a=1\r\nb=2\rc=3\r\n\r\nd=4").expect("parses");
        let lines: Vec<usize> = entries.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 2, 3, 5]);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            kv(r"a=tab\there\nnl\r\f\q\\"),
            vec![pair("a", "tab\there\nnl\r\x0cq\\")]
        );
        assert_eq!(kv(r"k\ey\=x\:y\ z=v"), vec![pair("key=x:y z", "v")]);
        assert_eq!(kv(r"u=\u00e9\u65E5\uD83D\uDE00"), vec![pair("u", "é日😀")]);
    }

    #[test]
    fn escaped_trailing_whitespace_is_kept() {
        assert_eq!(
            kv("a=x\\ \nb=\\u0020"),
            vec![pair("a", "x "), pair("b", " ")]
        );
    }

    #[test]
    fn malformed_unicode_escape_is_an_error_with_its_line() {
        let err = parse_properties("a=1\nb=\\u12G4").expect_err("malformed");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("\\uXXXX"), "{err}");
        assert!(parse_properties("a=\\u12").is_err());
        assert!(parse_properties("a=\\uD83D").is_err());
        assert!(parse_properties("a=\\uDE00").is_err());
    }

    #[test]
    fn decode_falls_back_to_latin1_and_drops_bom() {
        assert_eq!(decode(b"\xEF\xBB\xBFa=1"), "a=1");
        assert_eq!(decode(b"a=caf\xE9"), "a=café");
        assert_eq!(decode("a=日本".as_bytes()), "a=日本");
    }

    #[test]
    fn env_var_names() {
        assert_eq!(
            env_var_for("option.max_rolling_batch_size").as_deref(),
            Some("OPTION_MAX_ROLLING_BATCH_SIZE")
        );
        assert_eq!(
            env_var_for("option.entryPoint").as_deref(),
            Some("OPTION_ENTRYPOINT")
        );
        assert_eq!(env_var_for("option.pythonExecutable"), None);
        assert_eq!(env_var_for("engine").as_deref(), Some("OPTION_ENGINE"));
        assert_eq!(
            env_var_for("job_queue_size").as_deref(),
            Some("SERVING_JOB_QUEUE_SIZE")
        );
        assert_eq!(env_var_for("minWorkers"), None);
    }

    #[test]
    fn hf_ids() {
        for id in [
            "facebook/opt-13b",
            "gpt2",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "a_b/c.d",
        ] {
            assert!(is_hf_id(id), "{id}");
        }
        for id in [
            "a/b/c", "-a/b", "a./b", "a/b..c", "a/b--c", "", "a b", "a/", "/a",
        ] {
            assert!(!is_hf_id(id), "{id}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("option.dtpye"), Some("option.dtype"));
        assert_eq!(suggest("rolling_batch"), Some("option.rolling_batch"));
        assert_eq!(
            suggest("option.max_rolling_batch_sise"),
            Some("option.max_rolling_batch_size")
        );
        assert_eq!(suggest("completely.different"), None);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
