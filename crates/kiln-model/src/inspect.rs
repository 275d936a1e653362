//! What a model needs before anything is loaded: its architecture and size
//! from the config alone (`config.json` or GGUF metadata), so a user can tell
//! whether it fits a device before downloading or compiling anything.

use std::path::{Path, PathBuf};

use crate::config::DecoderConfig;
use crate::gguf::GgufFile;
use crate::loader::{read_json, ModelFormat};
use crate::{ModelError, Result};

/// A model described from its config.
#[derive(Debug, Clone)]
pub struct Summary {
    pub path: PathBuf,
    /// `gguf` or `huggingface`.
    pub format: &'static str,
    pub config: DecoderConfig,
    /// The weights' dtype as stored (`float16`, `bfloat16`, `Q4_1/Q8_0`, …).
    pub stored_dtype: String,
    /// Bytes of the weights as stored, when the files are there to measure.
    pub stored_bytes: Option<u64>,
}

/// Reads the config of the model at `path`: a GGUF file, a Hugging Face
/// directory, or just a `config.json` file.
pub fn summarize(path: &Path) -> Result<Summary> {
    if path.is_file() && path.file_name().is_some_and(|n| n == "config.json") {
        return from_hf(path.parent().unwrap_or(Path::new(".")), path);
    }
    match ModelFormat::detect(path)? {
        ModelFormat::Gguf(file) => {
            let g = GgufFile::open(&file)?;
            let config = DecoderConfig::from_gguf(&g)?;
            let mut types: Vec<String> = g
                .tensors
                .values()
                .map(|t| crate::names::format_name(t.ggml_type).to_string())
                .collect();
            types.sort();
            types.dedup();
            let stored_bytes = std::fs::metadata(&file).map(|m| m.len()).ok();
            Ok(Summary {
                path: file,
                format: "gguf",
                config,
                stored_dtype: types.join("/"),
                stored_bytes,
            })
        }
        ModelFormat::HfDir(dir) => from_hf(&dir, &dir.join("config.json")),
    }
}

fn from_hf(dir: &Path, config_path: &Path) -> Result<Summary> {
    let json = read_json(config_path)?;
    let config = DecoderConfig::from_hf_json(&json, config_path)?;
    let stored_dtype = json
        .get("torch_dtype")
        .or_else(|| json.get("dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float32")
        .to_string();
    let weights: u64 = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.ends_with(".safetensors") || (n.starts_with("pytorch_model") && n.ends_with(".bin"))
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    Ok(Summary {
        path: dir.to_path_buf(),
        format: "huggingface",
        config,
        stored_dtype,
        stored_bytes: (weights > 0).then_some(weights),
    })
}

/// Of `weight_bytes` of a model's weights, the bytes one token reads: all
/// of a dense model's, and of a mixture-of-experts model the share of its
/// active parameters ([`DecoderConfig::active_param_count`]: only the
/// experts a token is routed to), which bounds decode speed from below the
/// way the whole model does for a dense one.
pub fn active_weight_bytes(config: &DecoderConfig, weight_bytes: f64) -> f64 {
    let total = config.param_count();
    if total == 0 {
        return weight_bytes;
    }
    weight_bytes * config.active_param_count() as f64 / total as f64
}

/// Bytes per parameter of a dtype name (`bf16`, `float16`, `fp32`, …).
/// The float names are [`crate::WeightDtype`]'s table; `int8` and `fp8`
/// are sized too, for what a deployment elsewhere would hold.
pub fn dtype_bytes(dtype: &str) -> Option<usize> {
    match dtype.trim().to_ascii_lowercase().as_str() {
        "int8" | "fp8" => Some(1),
        name => crate::WeightDtype::parse(name).and_then(crate::WeightDtype::bytes),
    }
}

/// Parses a memory size: `32GiB`, `16 GB`, `512MiB`, `80000000000`.
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024f64.powi(4),
        _ => return None,
    };
    (n >= 0.0).then_some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_memory("32GiB"), Some(32 << 30));
        assert_eq!(parse_memory("16 GB"), Some(16_000_000_000));
        assert_eq!(parse_memory("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_memory("123"), Some(123));
        assert_eq!(parse_memory("12 parsecs"), None);
        assert_eq!(dtype_bytes("bfloat16"), Some(2));
    }

    /// `kiln inspect --dtype` reads the same names as `--dtype` and
    /// `option.dtype` ([`crate::WeightDtype::parse`]), sized by the type.
    #[test]
    fn dtype_names_are_the_load_options_table() {
        for (name, bytes) in [
            ("fp32", Some(4)),
            ("F32", Some(4)),
            ("float", Some(4)),
            ("half", Some(2)),
            ("f16", Some(2)),
            ("BF16", Some(2)),
            ("int8", Some(1)),
            ("fp8", Some(1)),
            ("auto", None),
            ("fp12", None),
        ] {
            assert_eq!(dtype_bytes(name), bytes, "{name}");
            if let Some(d) = crate::WeightDtype::parse(name) {
                assert_eq!(crate::WeightDtype::parse(d.as_str()), Some(d), "{name}");
            }
        }
    }
}
