//! gpt-oss's tensors under kiln's canonical names.
//!
//! Hugging Face checkpoints keep each layer's experts as transformers'
//! `GptOssExperts` multiplies them, `x @ W`: `mlp.experts.gate_up_proj`
//! `[E, hidden, 2 * ff]` with gate and up interleaved in its last dimension
//! (gate the even columns, up the odd ones), `gate_up_proj_bias` `[E, 2 * ff]`
//! likewise, `down_proj` `[E, ff, hidden]` and `down_proj_bias` `[E, hidden]`.
//! [`HfExperts`] serves them as llama.cpp's GGUF form, which the decoder
//! reads: `blk.N.ffn_{gate,up}_exps.weight` `[E, ff, hidden]`,
//! `ffn_down_exps.weight` `[E, hidden, ff]` and their `.bias` `[E, rows]`
//! (the same split and transposes as llama.cpp's `GptOssModel` converter).
//! Quantized checkpoints (OpenAI's own) carry `*_blocks` / `*_scales`
//! (MXFP4, rows as outputs: `gate_up_proj_blocks` `[E, 2 * ff, hidden / 32,
//! 16]` with gate and up rows interleaved, `down_proj_blocks` `[E, hidden,
//! ff / 32, 16]`) instead: they are moved into ggml's MXFP4 blocks
//! ([`crate::mxfp4`]) and their gate and up rows separated, never expanded
//! to floats.
//!
//! llama.cpp's GGUF files name the pre-feed-forward norm
//! `blk.N.post_attention_norm` (transformers' `post_attention_layernorm`);
//! [`GgufNames`] serves it as the canonical `ffn_norm`.

use kiln_backend::{GgmlType, WeightData};

use crate::mxfp4::Mxfp4Experts;
use crate::weights::{SafetensorsSource, WeightSource};
use crate::{HostTensor, ModelError, Result};

/// The refusal of MXFP4 expert weights from a source that cannot read
/// blocks/scales pairs (a PyTorch checkpoint).
pub const MXFP4_REFUSAL: &str = "MXFP4 expert weights: not supported yet from this kind of \
     checkpoint (they load from safetensors)";

/// A source that may hold gpt-oss's MXFP4 blocks/scales pairs.
pub trait Mxfp4Pairs {
    /// The MXFP4 matrices of `<canonical>_blocks` / `<canonical>_scales`,
    /// or `None` when this kind of source cannot read them.
    fn mxfp4_pairs(&self, canonical: &str) -> Option<Result<Mxfp4Experts>>;
}

impl Mxfp4Pairs for SafetensorsSource {
    fn mxfp4_pairs(&self, canonical: &str) -> Option<Result<Mxfp4Experts>> {
        Some(self.mxfp4_experts(canonical))
    }
}

impl Mxfp4Pairs for Box<dyn WeightSource> {
    fn mxfp4_pairs(&self, _: &str) -> Option<Result<Mxfp4Experts>> {
        None
    }
}

/// Hugging Face gpt-oss names of the tensors kept as stored: attention
/// sinks (`self_attn.sinks`), the router (`mlp.router`), the fused expert
/// tensors under canonical `ffn_gate_up_exps` / `ffn_down_exps` (`.weight`,
/// `.bias`, and MXFP4's `.blocks` / `.scales`), the rest as llama's.
pub fn hf_names(canonical: &str) -> Option<String> {
    let split = canonical
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'));
    let Some((layer, tail)) = split else {
        return crate::weights::hf_llama_names(canonical);
    };
    let (part, kind) = tail.rsplit_once('.').unwrap_or((tail, ""));
    let l = format!("model.layers.{layer}");
    let fused = |stem: &str| match kind {
        "weight" => Some(format!("{l}.mlp.experts.{stem}")),
        "bias" => Some(format!("{l}.mlp.experts.{stem}_{kind}")),
        _ => None,
    };
    match part {
        "attn_sinks" if kind == "weight" => Some(format!("{l}.self_attn.sinks")),
        "ffn_gate_inp" => Some(format!("{l}.mlp.router.{kind}")),
        "ffn_gate_up_exps" => fused("gate_up_proj"),
        "ffn_down_exps" => fused("down_proj"),
        // MXFP4 pairs (`crate::mxfp4` appends the suffix to the canonical name).
        "ffn_gate_up_exps_blocks"
        | "ffn_gate_up_exps_scales"
        | "ffn_down_exps_blocks"
        | "ffn_down_exps_scales" => {
            let (stem, suffix) = part.rsplit_once('_')?;
            let proj = if stem.starts_with("ffn_down") {
                "down_proj"
            } else {
                "gate_up_proj"
            };
            Some(format!("{l}.mlp.experts.{proj}_{suffix}"))
        }
        _ => crate::weights::hf_llama_names(canonical),
    }
}

/// Which expert tensor a canonical name asks for.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Gate,
    Up,
    Down,
}

/// `blk.N.ffn_{gate,up,down}_exps.{weight,bias}` → (N, part, is_bias).
fn expert_name(canonical: &str) -> Option<(&str, Part, bool)> {
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.split_once('.')?;
    let part = match part {
        "ffn_gate_exps" => Part::Gate,
        "ffn_up_exps" => Part::Up,
        "ffn_down_exps" => Part::Down,
        _ => return None,
    };
    match kind {
        "weight" => Some((layer, part, false)),
        "bias" => Some((layer, part, true)),
        _ => None,
    }
}

/// A Hugging Face gpt-oss source (names from [`hf_names`]) that serves the
/// fused expert tensors split and transposed into llama.cpp's layout.
pub struct HfExperts<S> {
    pub inner: S,
}

impl<S: WeightSource> HfExperts<S> {
    fn err(&self, name: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: self.inner.describe().into(),
            tensor: name.to_string(),
            msg: msg.into(),
        }
    }

    /// The stored tensor behind a split expert tensor.
    fn stored(layer: &str, part: Part, bias: bool) -> String {
        let stem = if part == Part::Down {
            "ffn_down_exps"
        } else {
            "ffn_gate_up_exps"
        };
        format!(
            "blk.{layer}.{stem}.{}",
            if bias { "bias" } else { "weight" }
        )
    }

    /// The canonical stem of the MXFP4 pair behind a split expert matrix.
    fn packed(layer: &str, part: Part) -> String {
        Self::stored(layer, part, false).replace(".weight", "")
    }

    /// Whether the expert matrices of this part are MXFP4 pairs.
    fn is_packed(&self, layer: &str, part: Part) -> bool {
        !self.inner.contains(&Self::stored(layer, part, false))
            && self
                .inner
                .contains(&format!("{}_blocks", Self::packed(layer, part)))
    }

    /// An expert matrix stack from MXFP4 pairs: `[E, rows, cols]` of ggml
    /// MXFP4 rows, gate (even) or up (odd) rows taken from `gate_up_proj`.
    fn packed_matrices(
        &self,
        name: &str,
        layer: &str,
        part: Part,
    ) -> Result<(Vec<usize>, WeightData)>
    where
        S: Mxfp4Pairs,
    {
        let stem = Self::packed(layer, part);
        let m = match self.inner.mxfp4_pairs(&stem) {
            Some(m) => m?,
            None => return Err(self.err(name, MXFP4_REFUSAL)),
        };
        let row = kiln_backend::quant::row_bytes(GgmlType::MXFP4, m.cols)
            .ok_or_else(|| self.err(&stem, format!("{} columns are not MXFP4 blocks", m.cols)))?;
        let (rows, pick): (usize, Box<dyn Fn(usize) -> bool>) = match part {
            Part::Down => (m.rows, Box::new(|_| true)),
            _ if m.rows % 2 != 0 => {
                return Err(self.err(&stem, format!("{} gate/up rows are not pairs", m.rows)))
            }
            Part::Gate => (m.rows / 2, Box::new(|r| r % 2 == 0)),
            Part::Up => (m.rows / 2, Box::new(|r| r % 2 == 1)),
        };
        let mut out = Vec::with_capacity(m.experts.len() * rows * row);
        for e in &m.experts {
            let WeightData::Ggml { bytes, .. } = e else {
                return Err(self.err(&stem, "MXFP4 experts came back as floats"));
            };
            for (r, b) in bytes.chunks_exact(row).enumerate() {
                if pick(r) {
                    out.extend_from_slice(b);
                }
            }
        }
        Ok((
            vec![m.experts.len(), rows, m.cols],
            WeightData::Ggml {
                ty: GgmlType::MXFP4,
                bytes: out.into(),
            },
        ))
    }

    fn expert_tensor(&self, name: &str, layer: &str, part: Part, bias: bool) -> Result<HostTensor>
    where
        S: Mxfp4Pairs,
    {
        if !bias && self.is_packed(layer, part) {
            // Floats asked of MXFP4 weights (not the decoder's path): decoded.
            let (shape, w) = self.packed_matrices(name, layer, part)?;
            let WeightData::Ggml { ty, bytes } = w else {
                unreachable!("packed_matrices gives ggml blocks")
            };
            let n = shape.iter().product();
            let data =
                kiln_backend::quant::dequantize(ty, &bytes, n).map_err(|e| self.err(name, e))?;
            return Ok(HostTensor::new(shape, data));
        }
        let stored = Self::stored(layer, part, bias);
        let t = self.inner.get(&stored)?;
        if bias {
            return match (part, &t.shape[..]) {
                (Part::Down, _) => Ok(t),
                // [E, 2ff] interleaved -> [E, ff].
                (_, &[e, ff2]) if ff2 % 2 == 0 => {
                    let off = usize::from(part == Part::Up);
                    let data = t.data.iter().skip(off).step_by(2).copied().collect();
                    Ok(HostTensor::new(vec![e, ff2 / 2], data))
                }
                (_, shape) => Err(self.layout_err(&stored, shape)),
            };
        }
        let (shape, data) =
            rearrange(&t.data, &t.shape, part).ok_or_else(|| self.layout_err(&stored, &t.shape))?;
        Ok(HostTensor::new(shape, data))
    }

    fn layout_err(&self, stored: &str, shape: &[usize]) -> ModelError {
        self.err(
            stored,
            format!(
                "shape {shape:?} is not gpt-oss's fused expert layout \
                 (gate_up_proj [E, hidden, 2*ff], down_proj [E, ff, hidden], biases [E, n])"
            ),
        )
    }

    /// A float expert matrix stack split and transposed in the checkpoint's
    /// own element type (bf16 stays bf16: no f32 copy of the experts).
    fn float_matrices(&self, layer: &str, part: Part) -> Result<(Vec<usize>, WeightData)> {
        let stored = Self::stored(layer, part, false);
        let (shape, w) = self.inner.get_weight(&stored)?;
        let bad = || self.layout_err(&stored, &shape);
        match w {
            WeightData::F32(v) => {
                let (shape, v) = rearrange(&v, &shape, part).ok_or_else(bad)?;
                Ok((shape, WeightData::F32(v)))
            }
            WeightData::Ggml { ty, bytes } => {
                let (new_shape, bytes) = match ty {
                    GgmlType::F32 => rearrange_bytes::<4>(&bytes, &shape, part),
                    GgmlType::F16 | GgmlType::BF16 => rearrange_bytes::<2>(&bytes, &shape, part),
                    other => {
                        return Err(self.err(
                            &stored,
                            format!(
                                "{other:?} fused experts are not supported (floats or MXFP4 are)"
                            ),
                        ))
                    }
                }
                .ok_or_else(bad)?;
                Ok((
                    new_shape,
                    WeightData::Ggml {
                        ty,
                        bytes: bytes.into(),
                    },
                ))
            }
        }
    }
}

/// [`rearrange`] over raw `N`-byte elements.
fn rearrange_bytes<const N: usize>(
    bytes: &[u8],
    shape: &[usize],
    part: Part,
) -> Option<(Vec<usize>, Vec<u8>)> {
    let elems: Vec<[u8; N]> = bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunks of N"))
        .collect();
    let (shape, out) = rearrange(&elems, shape, part)?;
    Some((shape, out.into_iter().flatten().collect()))
}

/// One kind of expert matrix from a fused tensor: gate (even columns) or
/// up (odd) of `gate_up_proj` `[E, h, 2ff]` as `[E, ff, h]`,
/// `out[e][j][i] = t[e][i][2j + off]`; `down_proj` `[E, ff, h]` as
/// `[E, h, ff]`. `None` when the shape is not that (or `t` is not as long).
fn rearrange<T: Copy>(t: &[T], shape: &[usize], part: Part) -> Option<(Vec<usize>, Vec<T>)> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if n != t.len() {
        return None;
    }
    // Output elements in order, read from where the stored layout has them.
    match (part, shape) {
        (Part::Gate | Part::Up, &[_, h, ff2]) if ff2 % 2 == 0 && ff2 > 0 && h > 0 => {
            let (ff, off) = (ff2 / 2, usize::from(part == Part::Up));
            let out = t
                .chunks_exact(h * ff2)
                .flat_map(|src| {
                    (0..ff).flat_map(move |j| (0..h).map(move |i| src[i * ff2 + 2 * j + off]))
                })
                .collect();
            Some((vec![shape[0], ff, h], out))
        }
        (Part::Down, &[e, ff, h]) if ff > 0 && h > 0 => {
            let out = t
                .chunks_exact(ff * h)
                .flat_map(|src| (0..h).flat_map(move |i| (0..ff).map(move |j| src[j * h + i])))
                .collect();
            Some((vec![e, h, ff], out))
        }
        _ => None,
    }
}

/// Whether `name` is one of the stored fused tensors, which this source
/// hides: the decoder would read `ffn_gate_up_exps` as transformers 5's
/// other fused layout (each expert's gate rows, then its up rows).
fn hidden(name: &str) -> bool {
    name.contains(".ffn_gate_up_exps") || name.contains(".ffn_down_exps")
}

impl<S: WeightSource + Mxfp4Pairs> WeightSource for HfExperts<S> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        match expert_name(name) {
            Some((layer, part, bias)) => self.expert_tensor(name, layer, part, bias),
            None if hidden(name) => Err(ModelError::MissingTensor {
                path: self.inner.describe().into(),
                tensor: name.to_string(),
            }),
            None => self.inner.get(name),
        }
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        if let Some((layer, part, false)) = expert_name(name) {
            if self.is_packed(layer, part) {
                return self.packed_matrices(name, layer, part);
            }
            return self.float_matrices(layer, part);
        }
        if expert_name(name).is_some() || hidden(name) {
            let t = self.get(name)?;
            return Ok((t.shape, WeightData::F32(t.data)));
        }
        self.inner.get_weight(name)
    }

    fn contains(&self, name: &str) -> bool {
        match expert_name(name) {
            Some((layer, part, bias)) => {
                let stored = Self::stored(layer, part, bias);
                self.inner.contains(&stored) || (!bias && self.is_packed(layer, part))
            }
            None => !hidden(name) && self.inner.contains(name),
        }
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A GGUF gpt-oss source: the canonical `blk.N.ffn_norm.weight` is read
/// from llama.cpp's `blk.N.post_attention_norm.weight` when the file has no
/// tensor by the canonical name (a prepared copy written by kiln does).
pub struct GgufNames<S> {
    pub inner: S,
}

impl<S: WeightSource> GgufNames<S> {
    fn map<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.inner.contains(name) {
            if let Some(layer) = name
                .strip_prefix("blk.")
                .and_then(|r| r.strip_suffix(".ffn_norm.weight"))
            {
                return format!("blk.{layer}.post_attention_norm.weight").into();
            }
        }
        name.into()
    }
}

impl<S: WeightSource> WeightSource for GgufNames<S> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        self.inner.get(&self.map(name))
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        self.inner.get_weight(&self.map(name))
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.map(name))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory source under canonical names.
    struct Mem(Vec<(String, HostTensor)>);

    impl Mxfp4Pairs for Mem {
        fn mxfp4_pairs(&self, _: &str) -> Option<Result<Mxfp4Experts>> {
            None
        }
    }

    impl WeightSource for Mem {
        fn get(&self, name: &str) -> Result<HostTensor> {
            self.0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| ModelError::MissingTensor {
                    path: "mem".into(),
                    tensor: name.into(),
                })
        }
        fn contains(&self, name: &str) -> bool {
            self.0.iter().any(|(n, _)| n == name)
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    #[test]
    fn names_follow_transformers() {
        for (c, hf) in [
            ("blk.3.attn_sinks.weight", "model.layers.3.self_attn.sinks"),
            ("blk.0.ffn_gate_inp.bias", "model.layers.0.mlp.router.bias"),
            (
                "blk.1.ffn_gate_up_exps.weight",
                "model.layers.1.mlp.experts.gate_up_proj",
            ),
            (
                "blk.1.ffn_gate_up_exps.bias",
                "model.layers.1.mlp.experts.gate_up_proj_bias",
            ),
            (
                "blk.1.ffn_down_exps_blocks",
                "model.layers.1.mlp.experts.down_proj_blocks",
            ),
            (
                "blk.1.ffn_gate_up_exps_scales",
                "model.layers.1.mlp.experts.gate_up_proj_scales",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
        ] {
            assert_eq!(hf_names(c).as_deref(), Some(hf), "{c}");
        }
    }

    #[test]
    fn fused_experts_split_even_gate_odd_up_and_transpose() {
        // One expert, hidden 2, ff 2: gate_up[i][c] = 10 * i + c.
        let gu: Vec<f32> = (0..2)
            .flat_map(|i| (0..4).map(move |c| (10 * i + c) as f32))
            .collect();
        let down: Vec<f32> = (0..4).map(|v| v as f32).collect(); // [ff=2][h=2]
        let src = HfExperts {
            inner: Mem(vec![
                (
                    "blk.0.ffn_gate_up_exps.weight".into(),
                    HostTensor::new(vec![1, 2, 4], gu),
                ),
                (
                    "blk.0.ffn_gate_up_exps.bias".into(),
                    HostTensor::new(vec![1, 4], vec![0., 1., 2., 3.]),
                ),
                (
                    "blk.0.ffn_down_exps.weight".into(),
                    HostTensor::new(vec![1, 2, 2], down),
                ),
            ]),
        };
        let g = src.get("blk.0.ffn_gate_exps.weight").unwrap();
        assert_eq!(g.shape, [1, 2, 2]);
        // Row j (output j) over inputs i: column 2j of gate_up.
        assert_eq!(g.data, [0., 10., 2., 12.]);
        assert_eq!(
            src.get("blk.0.ffn_up_exps.weight").unwrap().data,
            [1., 11., 3., 13.]
        );
        assert_eq!(src.get("blk.0.ffn_up_exps.bias").unwrap().data, [1., 3.]);
        assert_eq!(src.get("blk.0.ffn_gate_exps.bias").unwrap().data, [0., 2.]);
        assert_eq!(
            src.get("blk.0.ffn_down_exps.weight").unwrap().data,
            [0., 2., 1., 3.]
        );
        assert!(src.contains("blk.0.ffn_up_exps.weight"));
        assert!(!src.contains("blk.0.ffn_down_exps.bias"));
        // Floats keep their element type through the split (here f32 as WeightData::F32).
        let (shape, w) = src.get_weight("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(shape, [1, 2, 2]);
        assert_eq!(w, WeightData::F32(vec![1., 11., 3., 13.]));
        let bf: Vec<[u8; 2]> = [1u8, 2, 3, 4, 5, 6, 7, 8]
            .chunks(2)
            .map(|c| [c[0], c[1]])
            .collect();
        let flat: Vec<u8> = bf.iter().flatten().copied().collect();
        // [1, 2, 2] down -> transposed, 2-byte elements moved whole.
        let (_, moved) = rearrange_bytes::<2>(&flat, &[1, 2, 2], Part::Down).unwrap();
        assert_eq!(moved, [1, 2, 5, 6, 3, 4, 7, 8]);
        assert!(rearrange(&[0f32; 3], &[1, 2, 2], Part::Down).is_none());
        // The stored fused tensors are not offered under their own names.
        assert!(!src.contains("blk.0.ffn_gate_up_exps.weight"));
        assert!(src.get("blk.0.ffn_gate_up_exps.weight").is_err());
    }

    #[test]
    fn mxfp4_experts_from_a_source_without_pairs_are_refused_by_name() {
        let src = HfExperts {
            inner: Mem(vec![(
                "blk.0.ffn_gate_up_exps_blocks".into(),
                HostTensor::new(vec![1], vec![0.]),
            )]),
        };
        assert!(src.contains("blk.0.ffn_gate_exps.weight"));
        let e = src
            .get_weight("blk.0.ffn_gate_exps.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MXFP4 expert weights: not supported yet"), "{e}");
        assert!(src.get("blk.0.ffn_gate_exps.weight").is_err());
    }
}
