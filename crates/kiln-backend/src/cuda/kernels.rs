//! The CUDA kernel sources kiln ships, as text embedded in the binary.
//!
//! Each source is one `.cu` file of `kernels/` with the shared preludes it
//! needs put in front (NVRTC compiles one translation unit and kiln gives it
//! no file system to include from). What a kernel computes, its launch
//! geometry and its argument order are documented at the top of its file;
//! the entry points listed here are the `extern "C"` names the host looks
//! up, and the PTX check verifies that each one is in the compiled code.

/// Element types, conversions and block reductions (every source starts with it).
const COMMON: &str = include_str!("kernels/common.cu");
/// Paged-cache addressing and key scoring shared by the attention kernels.
const ATTENTION_COMMON: &str = include_str!("kernels/attention_common.cu");

/// One compilation unit: a kernel file and the preludes it needs.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file's stem (`norm` for `kernels/norm.cu`), also the module name.
    pub name: &'static str,
    body: &'static str,
    attention: bool,
    /// The `extern "C"` kernels the unit defines.
    pub entry_points: &'static [&'static str],
}

impl KernelSource {
    /// A unit from other text, with no preludes but the common one (for
    /// checking the compile path itself, and for trying a kernel out).
    pub const fn new(
        name: &'static str,
        body: &'static str,
        entry_points: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            body,
            attention: false,
            entry_points,
        }
    }

    /// The full text NVRTC compiles: preludes, then the file.
    pub fn source(&self) -> String {
        let mut s = String::with_capacity(COMMON.len() + ATTENTION_COMMON.len() + self.body.len());
        s.push_str(COMMON);
        if self.attention {
            s.push_str(ATTENTION_COMMON);
        }
        s.push_str(self.body);
        s
    }
}

macro_rules! unit {
    ($name:literal, $attention:expr, [$($entry:literal),* $(,)?]) => {
        KernelSource {
            name: $name,
            body: include_str!(concat!("kernels/", $name, ".cu")),
            attention: $attention,
            entry_points: &[$($entry),*],
        }
    };
}

/// Every kernel source, in a fixed order.
pub const SOURCES: &[KernelSource] = &[
    unit!(
        "embedding",
        false,
        [
            "embedding_bf16",
            "embedding_f16",
            "add_position_embedding_bf16",
            "add_position_embedding_f16",
        ]
    ),
    unit!(
        "norm",
        false,
        [
            "add_rms_norm_bf16",
            "add_rms_norm_f16",
            "add_layer_norm_bf16",
            "add_layer_norm_f16",
        ]
    ),
    unit!("rope", false, ["rope_bf16", "rope_f16"]),
    unit!(
        "activation",
        false,
        [
            "gated_activation_bf16",
            "gated_activation_f16",
            "activation_inplace_bf16",
            "activation_inplace_f16",
            "add_inplace_bf16",
            "add_inplace_f16",
        ]
    ),
    unit!("kv_cache", false, ["write_kv_bf16", "write_kv_f16"]),
    unit!(
        "attention_decode",
        true,
        [
            "attention_decode_bf16",
            "attention_decode_f16",
            "attention_decode_reduce_bf16",
            "attention_decode_reduce_f16",
        ]
    ),
    unit!(
        "attention_prefill",
        true,
        ["attention_prefill_bf16", "attention_prefill_f16"]
    ),
    unit!("sampling", false, ["sample_f32", "repetition_penalty_f32"]),
];

/// Threads per block of the attention kernels (`KILN_ATTN_THREADS`).
pub const ATTENTION_THREADS: u32 = 128;
/// Largest head dimension the attention kernels take (`KILN_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;
/// Keys per chunk of the prefill kernel's online softmax (`KILN_PREFILL_CHUNK`).
pub const PREFILL_CHUNK: usize = 256;

/// The source named `name`.
pub fn source(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.cu` file in `kernels/` is compiled (a new file cannot be
    /// forgotten by the PTX check), and the preludes are not units.
    #[test]
    fn every_kernel_file_is_a_unit_or_a_prelude() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda/kernels");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("kernels dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        files.sort();
        let mut listed: Vec<String> = SOURCES.iter().map(|s| format!("{}.cu", s.name)).collect();
        listed.extend(["common.cu".into(), "attention_common.cu".into()]);
        listed.sort();
        assert_eq!(files, listed);
    }

    /// The constants the host launches with are the ones the kernels were written for.
    #[test]
    fn host_constants_match_the_kernel_sources() {
        let attn = ATTENTION_COMMON;
        assert!(attn.contains(&format!("#define KILN_ATTN_THREADS {ATTENTION_THREADS}")));
        assert!(attn.contains(&format!("#define KILN_MAX_HEAD_DIM {MAX_HEAD_DIM}")));
        let prefill = source("attention_prefill").expect("prefill").source();
        assert!(prefill.contains(&format!("#define KILN_PREFILL_CHUNK {PREFILL_CHUNK}")));
        // The attention units get the attention prelude, the others do not.
        for s in SOURCES {
            assert_eq!(
                s.source().contains("kv_at("),
                s.attention,
                "{}: attention prelude",
                s.name
            );
            assert!(s.source().starts_with(COMMON));
        }
    }
}
