//! The [`Builder`]: gathers the raw entries of the file and the environment
//! in DJL's order of precedence, and reads typed values from them, noting
//! each bad value as a problem and each ignored one as a warning. The keys'
//! meaning is in [`super::validate`] and [`super::chat`].

use std::time::Duration;

use super::error::Problem;
use super::keys::{all_known_keys, env_var_for, ENV_ALIASES, ENV_OVERRIDES};
use super::raw::{Origin, RawProperty};
use super::values::TensorParallelDegree;

/// Gathers the raw entries, then turns them into typed values.
pub(crate) struct Builder {
    pub(super) raw: Vec<RawProperty>,
    pub(super) warnings: Vec<String>,
    pub(super) problems: Vec<Problem>,
}

/// A variable's value, trimmed; `None` when unset or empty (as DJL).
pub(super) fn env_value(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    env(var)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Builder {
    /// File entries (later duplicates win), then environment fill-ins, then
    /// the SageMaker overrides.
    pub(super) fn collect(
        &mut self,
        entries: Vec<RawProperty>,
        env: &dyn Fn(&str) -> Option<String>,
    ) {
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

    pub(crate) fn entry(&self, key: &str) -> Option<RawProperty> {
        self.raw.iter().find(|p| p.key == key).cloned()
    }

    pub(crate) fn problem(&mut self, p: &RawProperty, what: &str) {
        self.problems.push(Problem {
            origin: p.origin.clone(),
            key: p.key.clone(),
            message: format!("{} = '{}' {what}", p.key, p.value),
        });
    }

    pub(crate) fn warn(&mut self, p: &RawProperty, what: &str) {
        self.warnings
            .push(format!("{}: {}={}: {what}", p.origin, p.key, p.value));
    }

    /// A whole number in `min..=max`; otherwise a problem saying it is not `expected`.
    pub(crate) fn int(
        &mut self,
        key: &str,
        min: i64,
        max: i64,
        expected: &str,
    ) -> Option<(i64, RawProperty)> {
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
    pub(crate) fn count_at_least(&mut self, key: &str, min: u32) -> Option<(usize, RawProperty)> {
        let expected = format!("a whole number of at least {min}");
        self.int(key, i64::from(min), i64::from(u32::MAX), &expected)
            .map(|(n, p)| (usize::try_from(n).unwrap_or(usize::MAX), p))
    }

    pub(super) fn seconds(&mut self, key: &str) -> Option<Duration> {
        self.int(
            key,
            1,
            i64::from(u32::MAX),
            "a whole number of seconds of at least 1",
        )
        .map(|(n, _)| Duration::from_secs(n.unsigned_abs()))
    }

    pub(crate) fn boolean(&mut self, key: &str) -> Option<(bool, RawProperty)> {
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

    pub(crate) fn choice<T>(
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

    /// `option.kv_cache_dtype` (vLLM's key): how the KV cache stores keys
    /// and values, or a problem naming what kiln takes instead (`fp8` ->
    /// `q8_0`).
    pub(super) fn kv_cache_dtype(&mut self) -> Option<kiln_backend::KvDtype> {
        let p = self.entry("option.kv_cache_dtype")?;
        match p.value.parse::<kiln_backend::KvDtype>() {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(&p, &format!("is refused: {e}"));
                None
            }
        }
    }

    /// `option.kv_cache_memory_bytes` (vLLM's key): the KV cache's size in
    /// vLLM's human-readable byte counts, or a problem saying how to write one.
    pub(super) fn kv_cache_memory_bytes(&mut self) -> Option<u64> {
        let p = self.entry("option.kv_cache_memory_bytes")?;
        match kiln_engine::kv_size::parse_memory_bytes(&p.value) {
            Ok(b) => Some(b),
            Err(e) => {
                self.problem(&p, &format!("is refused: {e}"));
                None
            }
        }
    }

    /// `option.quantize` (or its vLLM alias `option.quantization`): a format
    /// kiln quantizes to, or a problem that says which ones it has (DJL's
    /// GPU-engine methods are named as such). `mxfp4`, the format gpt-oss's
    /// checkpoints store their experts in (vLLM's value for them), asks for
    /// no quantization: it is accepted with a warning that the checkpoint's
    /// own weights are used as stored.
    pub(super) fn quantize(&mut self) -> Option<kiln_backend::GgmlType> {
        use kiln_model::names::{parse_quantize, target_list, QuantizeNameError};
        let p = self.quantize_entry()?;
        match parse_quantize(&p.value) {
            Ok(ty) => Some(ty),
            Err(QuantizeNameError::Unknown(_))
                if PREQUANTIZED_METHODS.contains(&p.value.trim().to_ascii_lowercase().as_str()) =>
            {
                self.warn(
                    &p,
                    "names the format a pre-quantized checkpoint is stored in (gpt-oss keeps its \
                     experts in MXFP4); kiln computes every weight in the format it is stored in, \
                     so this asks for nothing and no weight is quantized while loading",
                );
                None
            }
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

    /// `option.quantize`, else `option.quantization` (DJL's vLLM properties
    /// take either name); when both are set, `option.quantize` is used and
    /// the other is reported.
    fn quantize_entry(&mut self) -> Option<RawProperty> {
        let alias = self.entry("option.quantization");
        match (self.entry("option.quantize"), alias) {
            (Some(p), Some(a)) => {
                if !a.value.trim().eq_ignore_ascii_case(p.value.trim()) {
                    self.warn(
                        &a,
                        &format!("not used: option.quantize={} is set too and wins", p.value),
                    );
                }
                Some(p)
            }
            (p, a) => p.or(a),
        }
    }

    pub(super) fn degree(&mut self, key: &str) -> Option<(TensorParallelDegree, RawProperty)> {
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
}

/// `option.quantize` values that name the format a checkpoint is already
/// stored in rather than a quantization to run (vLLM's `mxfp4`, which
/// gpt-oss deployments pass).
const PREQUANTIZED_METHODS: &[&str] = &["mxfp4"];

/// A positive number of seconds from the variable `var`.
pub(super) fn env_secs(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<u64> {
    env_value(env, var)?.parse().ok().filter(|&n| n > 0)
}
