//! The type the KV cache stores keys and values in, as `--kv-cache-dtype`
//! and `option.kv_cache_dtype` name it.
//!
//! Attention reads every cached key and value of a sequence at every decode
//! step, so the cache's element size is the decode step's second-largest
//! read after the weights (and the largest at long context). Sixteen bits
//! halve it against f32, `q8_0` nearly quarters it.

use std::fmt;
use std::str::FromStr;

use crate::KvSpec;

/// How keys and values are stored in the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The backend's default: f16 on the CPU, the CUDA cache's own 16-bit
    /// (or f32) type on a GPU.
    #[default]
    Auto,
    /// 32-bit floats: exact, twice the bytes of f16.
    F32,
    /// IEEE half precision (10-bit mantissa), values beyond ±65504 saturated.
    F16,
    /// llama.cpp's `q8_0`: blocks of 32 consecutive dimensions of one head
    /// of one token as 8-bit integers and an f16 scale (amax / 127), 34
    /// bytes per 32 elements.
    Q8_0,
}

/// Elements that share one `q8_0` scale.
pub const Q8_0_BLOCK: usize = 32;

/// A `--kv-cache-dtype` / `option.kv_cache_dtype` value kiln does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvDtypeError {
    /// A vLLM spelling of a type kiln does not implement, with what to use instead.
    #[error("kv_cache_dtype {0:?} is not supported by kiln: {1}")]
    Unsupported(String, &'static str),
    #[error("unknown kv_cache_dtype {0:?}: expected auto, f16 (float16), f32 (float32) or q8_0")]
    Unknown(String),
}

impl FromStr for KvDtype {
    type Err = KvDtypeError;

    fn from_str(s: &str) -> Result<Self, KvDtypeError> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "auto" => KvDtype::Auto,
            "f32" | "float32" | "fp32" => KvDtype::F32,
            "f16" | "float16" | "fp16" | "half" => KvDtype::F16,
            "q8_0" => KvDtype::Q8_0,
            "fp8" | "fp8_e4m3" | "fp8_e5m2" | "fp8_inc" | "fp8_ds_mla" => {
                return Err(KvDtypeError::Unsupported(
                    s.trim().into(),
                    "the CPU has no 8-bit float arithmetic; kiln's 8-bit cache is q8_0 \
                     (blockwise int8 with an f16 scale per 32 elements)",
                ))
            }
            "bf16" | "bfloat16" => {
                return Err(KvDtypeError::Unsupported(
                    s.trim().into(),
                    "kiln's 16-bit cache is f16, whose 10-bit mantissa keeps keys and values \
                     closer than bfloat16's 7 bits",
                ))
            }
            _ => return Err(KvDtypeError::Unknown(s.trim().into())),
        })
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvDtype::Auto => "auto",
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        })
    }
}

impl KvDtype {
    /// Bytes one token takes across all of `spec`'s layers, keys and values,
    /// stored as `self` (`Auto` counts as f16): q8_0 counts its scales, one
    /// per started block of 32 dimensions of each head.
    pub fn bytes_per_token(self, spec: &KvSpec) -> usize {
        match self {
            KvDtype::F32 => spec.bytes_per_token(4),
            KvDtype::Auto | KvDtype::F16 => spec.bytes_per_token(2),
            KvDtype::Q8_0 => {
                let per_head = spec.head_dim + 2 * spec.head_dim.div_ceil(Q8_0_BLOCK);
                2 * spec.n_layers * spec.n_kv_heads * per_head
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_parse_and_refusals_name_the_alternative() {
        for (s, d) in [
            ("auto", KvDtype::Auto),
            ("F16", KvDtype::F16),
            ("float16", KvDtype::F16),
            ("f32", KvDtype::F32),
            ("float32", KvDtype::F32),
            ("q8_0", KvDtype::Q8_0),
        ] {
            assert_eq!(s.parse::<KvDtype>(), Ok(d), "{s}");
        }
        let e = "fp8_e4m3".parse::<KvDtype>().unwrap_err().to_string();
        assert_eq!(
            e,
            "kv_cache_dtype \"fp8_e4m3\" is not supported by kiln: the CPU has no 8-bit float \
             arithmetic; kiln's 8-bit cache is q8_0 (blockwise int8 with an f16 scale per 32 \
             elements)"
        );
        assert!("fp8"
            .parse::<KvDtype>()
            .unwrap_err()
            .to_string()
            .contains("q8_0"));
        assert!("bfloat16"
            .parse::<KvDtype>()
            .unwrap_err()
            .to_string()
            .contains("f16"));
        assert_eq!(
            "int4".parse::<KvDtype>().unwrap_err().to_string(),
            "unknown kv_cache_dtype \"int4\": expected auto, f16 (float16), f32 (float32) or q8_0"
        );
        for d in [KvDtype::Auto, KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
            assert_eq!(d.to_string().parse::<KvDtype>(), Ok(d));
        }
    }

    /// OPT-13B's cache (40 layers, 40 heads of 128): 1600 KiB a token in
    /// f32, 800 in f16, 425 in q8_0 (34 bytes per 32 elements).
    #[test]
    fn bytes_per_token_counts_scales() {
        let spec = KvSpec {
            n_layers: 40,
            num_blocks: 0,
            block_size: 16,
            n_kv_heads: 40,
            head_dim: 128,
        };
        assert_eq!(KvDtype::F32.bytes_per_token(&spec), 1_638_400);
        assert_eq!(KvDtype::F16.bytes_per_token(&spec), 819_200);
        assert_eq!(KvDtype::Auto.bytes_per_token(&spec), 819_200);
        assert_eq!(KvDtype::Q8_0.bytes_per_token(&spec), 435_200);
        // A head of 80 has three blocks (the last of 16).
        let odd = KvSpec {
            head_dim: 80,
            ..spec
        };
        assert_eq!(KvDtype::Q8_0.bytes_per_token(&odd), 2 * 40 * 40 * (80 + 6));
    }
}
