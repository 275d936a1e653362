//! A model directory's PyTorch checkpoint: one `pytorch_model.bin`, or the
//! shards its `pytorch_model.bin.index.json` lists, as one weight source.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::TorchCheckpoint;
use crate::weights::{NameMap, WeightSource};
use crate::{HostTensor, ModelError, Result};

/// A Hugging Face model directory's PyTorch checkpoint: `pytorch_model.bin`,
/// or the shards `pytorch_model.bin.index.json` lists. Tensors are asked for
/// by kiln's canonical names and found through a [`NameMap`].
pub struct TorchSource {
    files: Vec<TorchCheckpoint>,
    /// Checkpoint tensor name → index into `files`.
    index: HashMap<String, usize>,
    names: NameMap,
    /// The file to name when a tensor is missing (the index, when sharded).
    origin: PathBuf,
}

impl TorchSource {
    /// Opens the PyTorch checkpoint in a Hugging Face model directory.
    pub fn open_dir(dir: &Path, names: NameMap) -> Result<Self> {
        let (origin, paths) = shard_paths(dir)?;
        let files = paths
            .iter()
            .map(|p| TorchCheckpoint::open(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_checkpoints(origin, files, names))
    }

    /// Combines checkpoints already open; a tensor in several is taken from
    /// the last. `origin` names the checkpoint in messages.
    pub fn from_checkpoints(origin: PathBuf, files: Vec<TorchCheckpoint>, names: NameMap) -> Self {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                index.insert(n.to_string(), i);
            }
        }
        Self {
            files,
            index,
            names,
            origin,
        }
    }

    /// The checkpoint files, in the order they were opened.
    pub fn files(&self) -> &[TorchCheckpoint] {
        &self.files
    }

    fn locate(&self, canonical: &str) -> Option<(String, &TorchCheckpoint)> {
        let name = (self.names)(canonical)?;
        let i = *self.index.get(&name)?;
        Some((name, &self.files[i]))
    }
}

/// The checkpoint files of a model directory, and the file to name in
/// messages about the whole checkpoint.
fn shard_paths(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let single = dir.join("pytorch_model.bin");
    if single.exists() {
        return Ok((single.clone(), vec![single]));
    }
    let index_path = dir.join("pytorch_model.bin.index.json");
    if !index_path.exists() {
        return Err(ModelError::Format {
            path: dir.to_path_buf(),
            msg: "no pytorch_model.bin or pytorch_model.bin.index.json".into(),
        });
    }
    let format_err = |msg: String| ModelError::Format {
        path: index_path.clone(),
        msg,
    };
    let text =
        crate::files::read_bounded(&index_path, crate::files::MAX_INDEX_BYTES, "a shard index")?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format_err(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format_err("no 'weight_map' object".into()))?;
    let mut shards = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format_err(format!("weight_map['{tensor}'] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(format_err(format!(
                "shard name '{file}' leaves the model directory"
            )));
        }
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(format_err("'weight_map' lists no shards".into()));
    }
    let paths = shards.into_iter().map(|s| dir.join(s)).collect();
    Ok((index_path, paths))
}

impl WeightSource for TorchSource {
    fn get(&self, canonical: &str) -> Result<HostTensor> {
        match self.locate(canonical) {
            Some((name, file)) => file.get(&name),
            None => Err(ModelError::MissingTensor {
                path: self.origin.clone(),
                tensor: (self.names)(canonical).unwrap_or_else(|| canonical.to_string()),
            }),
        }
    }

    fn contains(&self, canonical: &str) -> bool {
        self.locate(canonical).is_some()
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [f] => f.path().display().to_string(),
            fs => format!(
                "{} PyTorch shards listed in {}",
                fs.len(),
                self.origin.display()
            ),
        }
    }
}
