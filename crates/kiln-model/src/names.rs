//! The one table of weight format names: what `--quantize` (`kiln serve`,
//! `generate`, `bench`, `prepare`), `option.quantize` in
//! `serving.properties` and `kiln inspect` accept and print. The dtype names
//! are [`crate::WeightDtype`]'s. One table, so a spelling that works on one
//! surface works on all of them.

use kiln_backend::quant::GgmlType;

/// Values of DJL LMI's `option.quantize` that name methods of its Python
/// engines (vLLM, lmi-dist, TensorRT-LLM, DeepSpeed, Neuron, bitsandbytes):
/// they need pre-quantized checkpoints or GPU kernels kiln does not have, so
/// they are refused by name rather than as unknown words.
const DJL_METHODS: &[&str] = &[
    "awq",
    "gptq",
    "fp8",
    "smoothquant",
    "squeezellm",
    "deepspeedfp",
    "bitsandbytes",
    "bitsandbytes4",
    "bitsandbytes8",
    "llm_int8",
    "dynamic_int8",
    "static_int8",
    "marlin",
    "awq_marlin",
    "gptq_marlin",
    "aqlm",
    "compressed-tensors",
];

/// Why an `option.quantize` / `--quantize` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantizeNameError {
    /// A DJL LMI method kiln cannot run.
    #[error(
        "'{0}' is a quantization method of DJL's Python engines, which kiln cannot run; \
         kiln quantizes 16/32-bit weights while loading, to one of {list}",
        list = target_list()
    )]
    DjlMethod(String),
    /// Not a quantization name at all.
    #[error("'{0}' is not a quantization kiln knows; use one of {list}", list = target_list())]
    Unknown(String),
}

/// Every spelling of a format kiln quantizes to that `--quantize`,
/// `option.quantize`, `kiln prepare --quantize` and `kiln inspect
/// --quantize` accept (compared in lower case), with the format it names.
/// The first spelling of a format is its name ([`quantize_name`]); the
/// others are llama.cpp's mixes of it (`q4_k_m`, `q4_k_s`: kiln quantizes
/// every matrix of the mix to the one format). The formats are the backend's
/// [`kiln_backend::quantize::QUANTIZE_TARGETS`], checked by a test.
pub const QUANTIZE_NAMES: &[(&str, GgmlType)] = &[
    ("q8_0", GgmlType::Q8_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q4_k", GgmlType::Q4K),
    ("q4_k_m", GgmlType::Q4K),
    ("q4_k_s", GgmlType::Q4K),
    ("q6_k", GgmlType::Q6K),
];

/// The formats' names (not their aliases), for messages and help texts.
pub fn target_list() -> String {
    let mut names: Vec<&str> = Vec::new();
    for (name, ty) in QUANTIZE_NAMES {
        if quantize_name(*ty) == *name {
            names.push(name);
        }
    }
    names.join(", ")
}

/// Parses a quantization name (case-insensitive, any spelling of
/// [`QUANTIZE_NAMES`]); DJL's engine methods are refused by name.
pub fn parse_quantize(value: &str) -> Result<GgmlType, QuantizeNameError> {
    let v = value.trim().to_ascii_lowercase();
    if let Some((_, ty)) = QUANTIZE_NAMES.iter().find(|(n, _)| *n == v) {
        return Ok(*ty);
    }
    if DJL_METHODS.contains(&v.as_str()) {
        return Err(QuantizeNameError::DjlMethod(value.to_string()));
    }
    Err(QuantizeNameError::Unknown(value.to_string()))
}

/// The name `option.quantize` uses for `ty` (`"?"` for a format kiln does
/// not quantize to).
pub fn quantize_name(ty: GgmlType) -> &'static str {
    QUANTIZE_NAMES
        .iter()
        .find(|(_, t)| *t == ty)
        .map_or("?", |(n, _)| *n)
}

/// The name of any stored weight format, as `kiln inspect` prints it: the
/// quantize name for a format kiln quantizes to, ggml's own (lower-case)
/// name for the others, so a format has one spelling everywhere.
pub fn format_name(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::BF16 => "bf16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q2K => "q2_k",
        GgmlType::Q3K => "q3_k",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q5K => "q5_k",
        GgmlType::Q6K => "q6_k",
        GgmlType::Q8K => "q8_k",
        GgmlType::MXFP4 => "mxfp4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_djl_methods_are_refused_by_name() {
        assert_eq!(parse_quantize("q8_0"), Ok(GgmlType::Q8_0));
        assert_eq!(parse_quantize("Q4_K_M"), Ok(GgmlType::Q4K));
        assert_eq!(parse_quantize("q6_k"), Ok(GgmlType::Q6K));
        let awq = parse_quantize("awq").unwrap_err();
        assert_eq!(awq, QuantizeNameError::DjlMethod("awq".into()));
        assert!(
            awq.to_string().contains("q8_0, q4_0, q4_1, q4_k, q6_k"),
            "{awq}"
        );
        assert_eq!(
            parse_quantize("int3"),
            Err(QuantizeNameError::Unknown("int3".into()))
        );
    }

    #[test]
    fn every_spelling_names_a_format_the_backend_quantizes_to_and_back() {
        use kiln_backend::quantize::QUANTIZE_TARGETS;
        for (name, ty) in QUANTIZE_NAMES {
            assert!(
                QUANTIZE_TARGETS.iter().any(|(t, _)| t == ty),
                "{name} names {ty:?}, which the backend does not quantize to"
            );
            assert_eq!(parse_quantize(name), Ok(*ty));
            assert_eq!(parse_quantize(&name.to_ascii_uppercase()), Ok(*ty));
        }
        for (ty, backend_name) in QUANTIZE_TARGETS {
            assert_eq!(quantize_name(ty), backend_name);
            assert_eq!(format_name(ty), backend_name);
        }
        assert_eq!(target_list(), "q8_0, q4_0, q4_1, q4_k, q6_k");
    }
}
