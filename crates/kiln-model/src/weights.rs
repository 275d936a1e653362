//! Where a model's tensors come from. The decoder asks for tensors by
//! kiln's canonical names (llama.cpp's GGUF names: `token_embd.weight`,
//! `blk.3.attn_q.weight`, …); each source maps those to its own file layout.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use kiln_backend::WeightData;

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

impl WeightSource for GgufFile {
    fn get(&self, name: &str) -> Result<HostTensor> {
        self.tensor_f32(name)
    }

    fn get_weight(&self, name: &str) -> Result<(Vec<usize>, WeightData)> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(info).to_vec();
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

/// Hugging Face llama-family names (`model.layers.N.self_attn.q_proj.weight`, …).
pub fn hf_llama_names(canonical: &str) -> Option<String> {
    let fixed = match canonical {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// One or more memory-mapped `.safetensors` files (a sharded checkpoint is
/// several, listed by `model.safetensors.index.json`).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
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
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Format {
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
            files.push((path, mmap));
        }
        Ok(Self {
            files,
            index,
            names,
        })
    }

    fn locate(&self, canonical: &str) -> Option<(String, usize)> {
        let name = (self.names)(canonical)?;
        let i = *self.index.get(&name)?;
        Some((name, i))
    }
}

impl WeightSource for SafetensorsSource {
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
