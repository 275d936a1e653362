//! Where a model's tensors come from. The decoder asks for tensors by
//! kiln's canonical names (llama.cpp's GGUF names: `token_embd.weight`,
//! `blk.3.attn_q.weight`, …); each source maps those to its own file layout.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use kiln_backend::{ByteOwner, GgmlType, HostBytes, WeightData};

use crate::gguf::GgufFile;
use crate::{HostTensor, ModelError, Result};

/// A provider of named tensors.
pub trait WeightSource: Send + Sync {
    /// The tensor under kiln's canonical name, as f32.
    fn get(&self, name: &str) -> Result<HostTensor>;
    /// A weight matrix in the checkpoint's own encoding where the backend may
    /// want it (ggml blocks), with its row-major shape. By default, f32.
    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let t = self.get(name)?;
        Ok((t.shape, WeightData::F32(t.data)))
    }
    /// Whether the checkpoint has that tensor (optional weights such as biases).
    fn contains(&self, name: &str) -> bool;
    /// Where the weights come from, for messages.
    fn describe(&self) -> String;
}

impl<T: WeightSource + ?Sized> WeightSource for Box<T> {
    fn get(&self, name: &str) -> Result<HostTensor> {
        (**self).get(name)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        (**self).get_weight(name)
    }

    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl WeightSource for GgufFile {
    fn get(&self, name: &str) -> Result<HostTensor> {
        self.tensor_f32(name)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_shared(info);
        Ok((
            info.shape(),
            WeightData::Ggml {
                ty: info.ggml_type,
                bytes,
            },
        ))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

/// Maps canonical tensor names to a Hugging Face checkpoint's names.
pub type NameMap = fn(&str) -> Option<String>;

/// Splits `blk.N.part.kind` into (N, part, kind).
fn split_block(canonical: &str) -> Option<(&str, &str, &str)> {
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    Some((layer, part, kind))
}

/// How one checkpoint family names its tensors: whole-model tensors by
/// canonical name, and per-layer parts under `{layers}.N.{part}.{weight|bias}`.
struct HfLayout {
    fixed: &'static [(&'static str, &'static str)],
    layers: &'static str,
    parts: &'static [(&'static str, &'static str)],
}

impl HfLayout {
    fn map(&self, canonical: &str) -> Option<String> {
        let lookup = |table: &[(&str, &'static str)], key: &str| {
            table.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        };
        if let Some(f) = lookup(self.fixed, canonical) {
            return Some(f.to_string());
        }
        let (layer, part, kind) = split_block(canonical)?;
        let hf = lookup(self.parts, part)?;
        Some(format!("{}.{layer}.{hf}.{kind}", self.layers))
    }
}

/// llama, mistral, qwen2, qwen3 and phi3 (whose fused `qkv_proj` and
/// `gate_up_proj` stand for the canonical `attn_qkv` and `ffn_gate_up`).
const LLAMA: HfLayout = HfLayout {
    fixed: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layers: "model.layers",
    parts: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_qkv", "self_attn.qkv_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_gate_up", "mlp.gate_up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ],
};

/// GPT-2, whose fused `c_attn` is the canonical `attn_qkv`.
const GPT2: HfLayout = HfLayout {
    fixed: &[
        ("token_embd.weight", "transformer.wte.weight"),
        ("pos_embd.weight", "transformer.wpe.weight"),
        ("output_norm.weight", "transformer.ln_f.weight"),
        ("output_norm.bias", "transformer.ln_f.bias"),
        ("output.weight", "lm_head.weight"),
    ],
    layers: "transformer.h",
    parts: &[
        ("attn_norm", "ln_1"),
        ("attn_qkv", "attn.c_attn"),
        ("attn_output", "attn.c_proj"),
        ("ffn_norm", "ln_2"),
        ("ffn_up", "mlp.c_fc"),
        ("ffn_down", "mlp.c_proj"),
    ],
};

/// OPT.
const OPT: HfLayout = HfLayout {
    fixed: &[
        ("token_embd.weight", "model.decoder.embed_tokens.weight"),
        ("pos_embd.weight", "model.decoder.embed_positions.weight"),
        ("proj_in.weight", "model.decoder.project_in.weight"),
        ("proj_out.weight", "model.decoder.project_out.weight"),
        (
            "output_norm.weight",
            "model.decoder.final_layer_norm.weight",
        ),
        ("output_norm.bias", "model.decoder.final_layer_norm.bias"),
        ("output.weight", "lm_head.weight"),
    ],
    layers: "model.decoder.layers",
    parts: &[
        ("attn_norm", "self_attn_layer_norm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.out_proj"),
        ("ffn_norm", "final_layer_norm"),
        ("ffn_up", "fc1"),
        ("ffn_down", "fc2"),
    ],
};

/// The layers of Gemma 2 and Gemma 3, under `{layers}.N.`: llama's
/// projections, Gemma 3's q/k norms, and four norms, of which
/// `post_attention_layernorm` is the norm on the attention OUTPUT (llama's
/// name for the pre-FFN norm), `pre_feedforward_layernorm` the pre-FFN one.
const GEMMA_PARTS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("attn_output", "self_attn.o_proj"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// Gemma 2 and Gemma 3 text checkpoints (`Gemma2ForCausalLM`, `Gemma3ForCausalLM`).
const GEMMA: HfLayout = HfLayout {
    fixed: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layers: "model.layers",
    parts: GEMMA_PARTS,
};

/// The language model inside a multimodal Gemma 3 checkpoint
/// (`Gemma3ForConditionalGeneration`) as transformers 4.50+ saves it; the
/// vision tower's tensors are never asked for.
const GEMMA3_MM: HfLayout = HfLayout {
    fixed: &[
        (
            "token_embd.weight",
            "model.language_model.embed_tokens.weight",
        ),
        ("output_norm.weight", "model.language_model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layers: "model.language_model.layers",
    parts: GEMMA_PARTS,
};

/// [`GEMMA3_MM`] as the Gemma 3 checkpoints published with the models name
/// it (`language_model.model.…`).
const GEMMA3_MM_ORIGINAL: HfLayout = HfLayout {
    fixed: &[
        (
            "token_embd.weight",
            "language_model.model.embed_tokens.weight",
        ),
        ("output_norm.weight", "language_model.model.norm.weight"),
        ("output.weight", "language_model.lm_head.weight"),
    ],
    layers: "language_model.model.layers",
    parts: GEMMA_PARTS,
};

/// Gemma 2 / Gemma 3 text names (`model.layers.N.pre_feedforward_layernorm.weight`, …).
pub fn hf_gemma_names(canonical: &str) -> Option<String> {
    GEMMA.map(canonical)
}

/// Multimodal Gemma 3's language model (`model.language_model.layers.N.…`).
pub fn hf_gemma3_mm_names(canonical: &str) -> Option<String> {
    GEMMA3_MM.map(canonical)
}

/// Multimodal Gemma 3's language model as first published (`language_model.model.layers.N.…`).
pub fn hf_gemma3_mm_original_names(canonical: &str) -> Option<String> {
    GEMMA3_MM_ORIGINAL.map(canonical)
}

/// Hugging Face llama-family names (`model.layers.N.self_attn.q_proj.weight`, …).
pub fn hf_llama_names(canonical: &str) -> Option<String> {
    LLAMA.map(canonical)
}

/// GPT-2 names (`transformer.h.N.attn.c_attn.weight`, …).
pub fn hf_gpt2_names(canonical: &str) -> Option<String> {
    GPT2.map(canonical)
}

/// Whether a GPT-2 tensor is a `Conv1D` weight (stored `[in, out]`, transposed at load).
pub fn gpt2_conv1d(canonical: &str) -> bool {
    split_block(canonical).is_some_and(|(_, part, kind)| {
        kind == "weight" && matches!(part, "attn_qkv" | "attn_output" | "ffn_up" | "ffn_down")
    })
}

/// OPT names (`model.decoder.layers.N.self_attn.q_proj.weight`, …).
pub fn hf_opt_names(canonical: &str) -> Option<String> {
    OPT.map(canonical)
}

/// The name map of a Hugging Face `model_type`.
pub fn hf_names(model_type: &str) -> NameMap {
    match model_type {
        "gpt2" => hf_gpt2_names,
        "opt" => hf_opt_names,
        "gemma2" | "gemma3_text" => hf_gemma_names,
        "gemma3" => hf_gemma3_mm_names,
        "qwen2_moe" | "qwen3_moe" => crate::moe::hf_qwen_moe_names,
        "mixtral" => crate::moe::hf_mixtral_names,
        "gpt_oss" => crate::gpt_oss::hf_names,
        _ => hf_llama_names,
    }
}

/// A source whose selected 2-D tensors are transposed as they are read
/// (GPT-2's `Conv1D` layers store `[in, out]`; the decoder wants `[out, in]`).
pub struct Transposed<S> {
    pub inner: S,
    pub which: fn(&str) -> bool,
}

impl<S: WeightSource> WeightSource for Transposed<S> {
    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        if (self.which)(name) {
            let t = self.get(name)?;
            Ok((t.shape, WeightData::F32(t.data)))
        } else {
            self.inner.get_weight(name)
        }
    }

    fn get(&self, name: &str) -> Result<HostTensor> {
        let t = self.inner.get(name)?;
        match t.shape[..] {
            [rows, cols] if (self.which)(name) => {
                let mut out = vec![0f32; t.data.len()];
                for (r, row) in t.data.chunks_exact(cols).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        out[c * rows + r] = v;
                    }
                }
                Ok(HostTensor::new(vec![cols, rows], out))
            }
            _ => Ok(t),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// One or more memory-mapped `.safetensors` files (a sharded checkpoint is
/// several, listed by `model.safetensors.index.json`).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    /// Checkpoint tensor name → index into `files`.
    index: BTreeMap<String, usize>,
    names: NameMap,
}

impl SafetensorsSource {
    /// Opens the safetensors checkpoint in a Hugging Face model directory.
    pub fn open_dir(dir: &Path, names: NameMap) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text = crate::files::read_bounded(
                &index_path,
                crate::files::MAX_INDEX_BYTES,
                "a shard index",
            )?;
            let json: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| ModelError::Format {
                    path: index_path.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Format {
                    path: index_path.clone(),
                    msg: "no 'weight_map' object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains("..") {
                    return Err(ModelError::Format {
                        path: index_path.clone(),
                        msg: format!("shard name '{s}' leaves the model directory"),
                    });
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(ModelError::Format {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: read-only map; see GgufFile::open.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let names = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::Format {
                    path: path.clone(),
                    msg: format!("not a valid safetensors file: {e}"),
                })?
                .1
                .tensors()
                .into_keys()
                .collect::<Vec<_>>();
            for n in names {
                index.insert(n, files.len());
            }
            files.push((path, Arc::new(mmap)));
        }
        Ok(Self {
            files,
            index,
            names,
        })
    }

    fn locate(&self, canonical: &str) -> Option<(String, usize)> {
        let name = (self.names)(canonical)?;
        if let Some(&i) = self.index.get(&name) {
            return Some((name, i));
        }
        // transformers 5 names Mixtral's `block_sparse_moe` module `mlp`.
        if let Some(renamed) = name
            .contains(".block_sparse_moe.")
            .then(|| name.replace(".block_sparse_moe.", ".mlp."))
        {
            if let Some(&i) = self.index.get(&renamed) {
                return Some((renamed, i));
            }
        }
        // Some checkpoints leave out the outer module (`h.0.attn…` for GPT-2,
        // `decoder.layers…` for OPT): try the name without it.
        let short = name
            .strip_prefix("transformer.")
            .or_else(|| name.strip_prefix("model."))?;
        let i = *self.index.get(short)?;
        Some((short.to_string(), i))
    }
}

impl SafetensorsSource {
    /// The file, checkpoint name and parsed view of a canonical tensor.
    pub(crate) fn view<T>(
        &self,
        canonical: &str,
        f: impl FnOnce(&PathBuf, &Arc<Mmap>, &str, safetensors::tensor::TensorView) -> Result<T>,
    ) -> Result<T> {
        let Some((name, i)) = self.locate(canonical) else {
            return Err(ModelError::MissingTensor {
                path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
                tensor: (self.names)(canonical).unwrap_or_else(|| canonical.to_string()),
            });
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| ModelError::Tensor {
            path: path.clone(),
            tensor: name.clone(),
            msg: format!("cannot read file: {e}"),
        })?;
        let view = st.tensor(&name).map_err(|e| ModelError::Tensor {
            path: path.clone(),
            tensor: name.clone(),
            msg: e.to_string(),
        })?;
        f(path, mmap, &name, view)
    }
}

impl WeightSource for SafetensorsSource {
    /// 16- and 32-bit float matrices as ranges of the memory map, not copied.
    fn get_weight(&self, canonical: &str) -> Result<(Vec<usize>, WeightData)> {
        let shared = self.view(canonical, |path, mmap, name, view| {
            let ty = match view.dtype() {
                Dtype::F32 => GgmlType::F32,
                Dtype::F16 => GgmlType::F16,
                Dtype::BF16 => GgmlType::BF16,
                _ => return Ok(None),
            };
            let data = view.data();
            let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
            let owner: ByteOwner = mmap.clone();
            // SAFETY: `mmap` is a read-only shared map of the checkpoint
            // file (see `open`): its pages can be dropped and read back.
            let bytes = unsafe { HostBytes::file_mapped(owner, start..start + data.len()) };
            let bytes = bytes.ok_or_else(|| ModelError::Tensor {
                path: path.clone(),
                tensor: name.to_string(),
                msg: "data outside the file".into(),
            })?;
            let shape = view.shape().to_vec();
            if shape.iter().product::<usize>() * ty.block().1 != data.len() {
                return Err(ModelError::Tensor {
                    path: path.clone(),
                    tensor: name.to_string(),
                    msg: format!("shape {shape:?} does not match {} bytes", data.len()),
                });
            }
            Ok(Some((shape, WeightData::Ggml { ty, bytes })))
        })?;
        match shared {
            Some(w) => Ok(w),
            // Other dtypes get `get`'s error.
            None => {
                let t = self.get(canonical)?;
                Ok((t.shape, WeightData::F32(t.data)))
            }
        }
    }

    fn get(&self, canonical: &str) -> Result<HostTensor> {
        let Some((name, i)) = self.locate(canonical) else {
            return Err(ModelError::MissingTensor {
                path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
                tensor: (self.names)(canonical).unwrap_or_else(|| canonical.to_string()),
            });
        };
        let (path, mmap) = &self.files[i];
        let tensor_err = |msg: String| ModelError::Tensor {
            path: path.clone(),
            tensor: name.clone(),
            msg,
        };
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| tensor_err(format!("cannot read file: {e}")))?;
        let view = st.tensor(&name).map_err(|e| tensor_err(e.to_string()))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => return Err(tensor_err(format!("dtype {other:?} is not supported"))),
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != data.len() {
            return Err(tensor_err(format!(
                "shape {shape:?} does not match {} elements",
                data.len()
            )));
        }
        Ok(HostTensor::new(shape, data))
    }

    fn contains(&self, canonical: &str) -> bool {
        self.locate(canonical).is_some()
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!(
                "{} safetensors shards in {}",
                fs.len(),
                fs[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }
}
