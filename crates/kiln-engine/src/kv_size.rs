//! How many tokens the KV cache holds: from a setting (tokens or bytes), or
//! by default from the memory the machine has left once the weights are
//! loaded, as vLLM's CPU backend sizes its cache from
//! `VLLM_CPU_KVCACHE_SPACE`, and the start-up error that names the numbers
//! when not even one sequence of the model's length fits.

use kiln_backend::KvDtype;

/// The share of the memory available after the weights that the default
/// KV cache takes: the rest is left to activations, the tokenizer, other
/// processes and the page cache.
pub const KV_MEMORY_FRACTION: f64 = 0.5;

/// The most the default KV cache takes, however much memory is free.
pub const KV_MEMORY_CAP: u64 = 32 << 30;

/// The default when the available memory cannot be read (no
/// `/proc/meminfo`): kiln's earlier fixed default.
pub const KV_FALLBACK_BYTES: u64 = 1 << 30;

/// Bytes the default KV cache takes when `available` bytes are available
/// after the weights are loaded: [`KV_MEMORY_FRACTION`] of them, at most
/// [`KV_MEMORY_CAP`].
pub fn default_kv_bytes(available: u64) -> u64 {
    ((available as f64 * KV_MEMORY_FRACTION) as u64).min(KV_MEMORY_CAP)
}

/// A byte count in vLLM's human-readable spelling (its
/// `--kv-cache-memory-bytes`): a whole number, or a number with one
/// suffix, `k`, `m`, `g` or `t` for powers of 1000 (a decimal fraction
/// allowed: `25.6k` is 25600) or `K`, `M`, `G` or `T` for powers of 1024
/// (whole numbers only: `4G` is 4 GiB). Why an error: the text is a user's.
pub fn parse_memory_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "'{text}' is not a byte count: a whole number, or one with a suffix \
             k/m/g/t (powers of 1000, e.g. 25.6k) or K/M/G/T (powers of 1024, e.g. 4G)"
        )
    };
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], Some(c)),
        Some(_) => (t, None),
        None => return Err(bad()),
    };
    let power = |c: char| "kmgt".find(c.to_ascii_lowercase()).map(|i| i as i32 + 1);
    let value = match unit {
        None => digits.parse::<u64>().map_err(|_| bad())?,
        Some(c) if c.is_ascii_uppercase() => {
            let n = digits.parse::<u64>().map_err(|_| bad())?;
            let p = power(c).ok_or_else(bad)?;
            n.checked_mul(1u64 << (10 * p)).ok_or_else(bad)?
        }
        Some(c) => {
            let p = power(c).ok_or_else(bad)?;
            // Only digits and one point: no exponent, sign or "inf".
            if digits.is_empty()
                || !digits.chars().all(|d| d.is_ascii_digit() || d == '.')
                || digits.matches('.').count() > 1
            {
                return Err(bad());
            }
            let x = digits.parse::<f64>().map_err(|_| bad())? * 1000f64.powi(p);
            if !x.is_finite() || x >= u64::MAX as f64 {
                return Err(bad());
            }
            x as u64
        }
    };
    if value == 0 {
        return Err(format!(
            "'{text}' is 0 bytes: the KV cache needs some memory"
        ));
    }
    Ok(value)
}

/// The environment variable vLLM's CPU backend sizes its KV cache from, in
/// GiB; kiln reads it as the default KV size of a model on the CPU.
pub const CPU_KVCACHE_SPACE_VAR: &str = "VLLM_CPU_KVCACHE_SPACE";

/// [`CPU_KVCACHE_SPACE_VAR`]'s value `raw` (`None`: unset) in bytes:
/// `None` when unset, empty or 0 (vLLM's "use the default"), an error
/// naming the variable when it is not a whole number of GiB.
pub fn cpu_kvcache_space(raw: Option<&str>) -> Result<Option<u64>, String> {
    let Some(v) = raw.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(gib) if gib <= 1 << 20 => Ok(Some(gib << 30)),
        _ => Err(format!(
            "{CPU_KVCACHE_SPACE_VAR}='{v}' is not a whole number of GiB (as vLLM reads it)"
        )),
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where there is one.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The memory left for the KV cache once the weights are resident:
/// `mem_available` less the mapped weight files' bytes, except those
/// already held as anonymous (private, written) memory.
///
/// Why: `MemAvailable` counts the page cache as available, and a model
/// mapped from its file (a prepared entry, a GGUF) lives in the page cache:
/// its resident pages are counted as reclaimable, and the pages not read
/// yet (right after a start that only maps) are not counted as used at
/// all. The model needs every one of them resident to decode at speed
/// (reclaiming them costs a re-read from disk per token), so a budget taken
/// from `MemAvailable` alone would promise the KV cache the weights' own
/// memory. Anonymous pages are not in `MemAvailable`, so they are not
/// subtracted twice.
pub fn available_after_weights(mem_available: u64, mapped_weights: MappedWeights) -> u64 {
    mem_available.saturating_sub(
        mapped_weights
            .size
            .saturating_sub(mapped_weights.anon_resident),
    )
}

/// The model files this process maps (see [`mapped_weights`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappedWeights {
    /// Bytes mapped.
    pub size: u64,
    /// Bytes of them held as anonymous memory (pages of a private map that
    /// were written), which `MemAvailable` already leaves out; none for a
    /// read-only shared map.
    pub anon_resident: u64,
}

/// Whether a mapped file is a model's weights: a GGUF or safetensors file,
/// a PyTorch checkpoint, or a prepared entry's layout file.
fn is_weights_file(path: &str) -> bool {
    [
        ".gguf",
        ".safetensors",
        "weights.layout",
        ".bin",
        ".pt",
        ".pth",
    ]
    .iter()
    .any(|ext| path.ends_with(ext))
}

/// The model files mapped by this process, summed from `smaps` text (the
/// format of `/proc/self/smaps`).
pub fn mapped_weights_in(smaps: &str) -> MappedWeights {
    let mut out = MappedWeights::default();
    let mut counting = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, device, inode, path.
            let path = line.split_whitespace().nth(5).unwrap_or("");
            counting = path.starts_with('/') && is_weights_file(path);
            continue;
        }
        if !counting {
            continue;
        }
        let mut kib = || {
            fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                << 10
        };
        match first {
            "Size:" => out.size += kib(),
            "Anonymous:" => out.anon_resident += kib(),
            _ => {}
        }
    }
    out
}

/// [`mapped_weights_in`] of this process's `/proc/self/smaps` (nothing
/// where there is none).
pub fn mapped_weights() -> MappedWeights {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|s| mapped_weights_in(&s))
        .unwrap_or_default()
}

/// The memory for the KV cache after the weights, from `/proc/meminfo` and
/// `/proc/self/smaps` ([`available_after_weights`]); `None` without
/// `/proc/meminfo`.
pub fn mem_available_after_weights() -> Option<u64> {
    let avail = mem_available()?;
    let mapped = mapped_weights();
    let after = available_after_weights(avail, mapped);
    if after < avail {
        tracing::info!(
            "KV cache budget: {} MiB available, less {} MiB of mapped weight files the model \
             needs resident: {} MiB",
            avail >> 20,
            (avail - after) >> 20,
            after >> 20
        );
    }
    Some(after)
}

/// Why a KV cache sized from free memory cannot serve the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV cache holds {tokens} tokens ({budget_mib} MiB at {token_bytes} bytes per token in \
     {dtype}, {fraction}% of the {available_mib} MiB available after the weights), fewer than \
     one sequence of max_model_len {max_model_len}: free memory, set --kv-cache-mib, or \
     store it as --kv-cache-dtype q8_0"
)]
pub struct KvTooSmall {
    pub tokens: usize,
    pub budget_mib: u64,
    pub token_bytes: usize,
    pub dtype: KvDtype,
    pub fraction: u32,
    pub available_mib: u64,
    pub max_model_len: usize,
}

/// Tokens a default KV cache holds (whole blocks of `block_size`) when
/// `available` bytes are free after the weights and a token takes
/// `token_bytes` in `dtype`; an error naming the numbers when that is less
/// than one sequence of `max_model_len`.
pub fn tokens_from_free_memory(
    available: u64,
    token_bytes: usize,
    dtype: KvDtype,
    block_size: usize,
    max_model_len: usize,
) -> Result<usize, KvTooSmall> {
    let budget = default_kv_bytes(available);
    let tokens = (budget / token_bytes.max(1) as u64) as usize;
    let tokens = tokens / block_size.max(1) * block_size.max(1);
    if tokens < max_model_len {
        return Err(KvTooSmall {
            tokens,
            budget_mib: budget >> 20,
            token_bytes,
            dtype,
            fraction: (KV_MEMORY_FRACTION * 100.0) as u32,
            available_mib: available >> 20,
            max_model_len,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_backend::KvSpec;

    /// OPT-13B (`kiln inspect`: 40 layers, 40 KV heads of 128, max_model_len
    /// 2048) with q8_0 weights (12.9e9 parameters at 34 bytes per 32:
    /// 13.7 GB) on the 24 GiB build machine, 1 GiB taken by the system:
    /// the default f16 cache holds both of the reference request's
    /// 2048-token sequences (the f32 1 GiB default held 648 tokens).
    #[test]
    fn opt_13b_two_sequences_fit_by_default_on_24_gib() {
        let spec = KvSpec {
            n_layers: 40,
            num_blocks: 0,
            block_size: 16,
            n_kv_heads: 40,
            head_dim: 128,
        };
        let weights: u64 = 12_850_000_000 / 32 * 34;
        let available = (24u64 << 30) - (1 << 30) - weights;
        for dtype in [KvDtype::Auto, KvDtype::Q8_0] {
            let tb = dtype.bytes_per_token(&spec);
            let tokens = tokens_from_free_memory(available, tb, dtype, 16, 2048).unwrap();
            assert!(tokens >= 2 * 2048, "{dtype}: {tokens} tokens");
        }
        // f16: 819200 bytes a token, half of 10.28 GiB: 6740 tokens, 6736 in whole blocks.
        let tb = KvDtype::F16.bytes_per_token(&spec);
        assert_eq!(
            tokens_from_free_memory(available, tb, KvDtype::F16, 16, 2048),
            Ok(6736)
        );
        // The old f32 default of 1 GiB: 655 tokens, whole blocks of 16 of them 640.
        assert_eq!(
            (1u64 << 30) / KvDtype::F32.bytes_per_token(&spec) as u64,
            1310 / 2
        );
    }

    /// A mapped model's bytes are taken out of `MemAvailable`: 10 GiB
    /// available, a 6 GiB GGUF (barely read) and a 1 GiB layout file (all
    /// resident) mapped, a shared library and anonymous memory ignored:
    /// 3 GiB left, whose half holds 1966 f16 tokens of 819200 bytes, 1952
    /// in whole blocks of 16.
    #[test]
    fn mapped_weights_come_out_of_the_available_memory() {
        let smaps = "\
7f0000000000-7f0180000000 r--s 00000000 fd:00 12 /cache/prepared/k/model.gguf
Size:            6291456 kB
Rss:               10240 kB
Anonymous:             0 kB
VmFlags: rd sh mr mw me ms sd
7f0200000000-7f0240000000 r--s 00000000 fd:00 13 /cache/prepared/k/weights.layout
Size:            1048576 kB
Rss:             1048576 kB
Anonymous:             0 kB
7f0300000000-7f0300100000 r-xp 00000000 fd:00 14 /usr/lib/libc.so.6
Size:               1024 kB
Rss:                1024 kB
7f0400000000-7f0400100000 rw-p 00000000 00:00 0
Size:               1024 kB
Anonymous:          1024 kB
";
        let mapped = mapped_weights_in(smaps);
        assert_eq!(
            mapped,
            MappedWeights {
                size: 7 << 30,
                anon_resident: 0
            }
        );
        let after = available_after_weights(10 << 30, mapped);
        assert_eq!(after, 3 << 30);
        assert_eq!(
            tokens_from_free_memory(after, 819_200, KvDtype::F16, 16, 1024),
            Ok(1952)
        );
        // Less available than mapped: nothing left, and the error says so.
        let e = tokens_from_free_memory(
            available_after_weights(4 << 30, mapped),
            819_200,
            KvDtype::F16,
            16,
            2048,
        )
        .unwrap_err();
        assert_eq!((e.tokens, e.available_mib), (0, 0));
    }

    /// Too little memory for one sequence: the error names bytes per
    /// token, the tokens that fit and the max_model_len asked.
    #[test]
    fn too_little_memory_names_the_numbers() {
        let e = tokens_from_free_memory(2 << 30, 819_200, KvDtype::F16, 16, 2048).unwrap_err();
        assert_eq!(e.tokens, 1296);
        assert_eq!(
            e.to_string(),
            "the KV cache holds 1296 tokens (1024 MiB at 819200 bytes per token in f16, 50% of \
             the 2048 MiB available after the weights), fewer than one sequence of \
             max_model_len 2048: free memory, set --kv-cache-mib, or store it as \
             --kv-cache-dtype q8_0"
        );
        // The cap: 1 TiB free gives 32 GiB, not 512.
        assert_eq!(default_kv_bytes(1 << 40), 32 << 30);
        assert_eq!(default_kv_bytes(10 << 30), 5 << 30);
    }

    #[test]
    fn memory_bytes_read_as_vllm_spells_them() {
        for (text, want) in [
            ("4096", 4096u64),
            ("1k", 1000),
            ("25.6k", 25_600),
            ("1K", 1024),
            ("4G", 4 << 30),
            ("2m", 2_000_000),
            (" 3T ", 3 << 40),
        ] {
            assert_eq!(parse_memory_bytes(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "G",
            "1.5G",
            "-1k",
            "1e3k",
            "12x",
            "1..5k",
            "inf",
            "99999999999T",
        ] {
            let e = parse_memory_bytes(text).unwrap_err();
            assert!(e.contains("is not a byte count"), "{text}: {e}");
        }
        assert!(parse_memory_bytes("0").unwrap_err().contains("is 0 bytes"));
    }

    #[test]
    fn the_cpu_kvcache_space_variable_is_whole_gib() {
        assert_eq!(cpu_kvcache_space(None), Ok(None));
        assert_eq!(cpu_kvcache_space(Some("0")), Ok(None));
        assert_eq!(cpu_kvcache_space(Some(" ")), Ok(None));
        assert_eq!(cpu_kvcache_space(Some("40")), Ok(Some(40 << 30)));
        let e = cpu_kvcache_space(Some("4.5")).unwrap_err();
        assert!(
            e.contains("VLLM_CPU_KVCACHE_SPACE='4.5' is not a whole number of GiB"),
            "{e}"
        );
    }
}
