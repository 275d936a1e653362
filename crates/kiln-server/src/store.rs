//! The model store: a directory of models, laid out as DJL Serving expects.
//!
//! Each subdirectory of the store is one model. Its name comes from the
//! directory's name by DJL's rule (`ModelInfo.inferModelNameFromUrl`): every
//! character other than an ASCII letter, digit or `_` becomes `_`, so the
//! directory `opt-13b` serves as the model `opt_13b`, and clients written
//! against DJL keep their URLs. As in DJL (`Utils.getNestedModelDir`), a
//! directory whose only visible entry is one subdirectory (an unpacked
//! archive, typically) is the model found in that subdirectory, and is named
//! after it.
//!
//! When the store itself holds a model (a `serving.properties`, `model.py`,
//! `config.json` or weight file at its top level, as in SageMaker's
//! `/opt/ml/model`), the store is that one model, named after the store
//! directory, as DJL does when the store is not a directory of models.
//!
//! A directory that holds no model (no `serving.properties`, `model.py`,
//! `config.json` or weight file at its top level) is skipped with a
//! warning. DJL registers every non-empty directory of the store
//! (`ModelStore.mapModelUrl`) and its handler then fails to load it, which
//! leaves a failed model that makes `/invocations` without a model name
//! ambiguous; kiln's own log directory, when it lies inside the store (the
//! default `logs/` of `kiln serve` started from inside the store), is
//! skipped without a word ([`scan_except`]).
//!
//! What kiln does not do that DJL does: unpack archives (`.tar.gz`, `.zip`,
//! `.mar`; they are skipped with a warning saying to extract them) and run a
//! custom `model.py` handler (the model is served with the built-in handler,
//! and a warning says so once per model). Hidden entries are skipped silently;
//! loose files and empty directories with a warning.
//!
//! `HF_MODEL_ID` adds one model outside the store, as in DJL: see [`hf_model`].

use std::fs;
use std::path::{Path, PathBuf};

use crate::properties::PROPERTIES_FILE;

/// The custom handler file that DJL would run and kiln does not.
pub const MODEL_PY: &str = "model.py";

/// Top-level file extensions that DJL unpacks as models.
const ARCHIVE_SUFFIXES: &[&str] = &[".tar.gz", ".tgz", ".tar", ".zip", ".mar"];

/// Files whose presence at the top level makes the store itself a model.
const MODEL_FILES: &[&str] = &[PROPERTIES_FILE, MODEL_PY, "config.json"];

/// Weight file extensions that make a directory a model.
const WEIGHT_SUFFIXES: &[&str] = &[".gguf", ".safetensors", ".bin", ".pt", ".pth"];

/// One model found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// The model name, for URLs (`[A-Za-z0-9_]+`).
    pub name: String,
    /// The model directory: where `serving.properties` and (by default) the
    /// weights are.
    pub dir: PathBuf,
    /// Whether the directory has a `serving.properties`.
    pub has_properties: bool,
    /// Whether the directory has a `model.py` (which kiln does not run).
    pub has_model_py: bool,
}

/// The result of scanning a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreScan {
    /// The models, sorted by name.
    pub models: Vec<StoreEntry>,
    /// What was skipped or changed and why, one line each, naming the path.
    pub warnings: Vec<String>,
}

/// Why a store cannot be scanned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store path does not exist.
    #[error("model store {} does not exist", path.display())]
    Missing {
        /// The store path.
        path: PathBuf,
    },
    /// The store path is not a directory.
    #[error("model store {} is not a directory", path.display())]
    NotADirectory {
        /// The store path.
        path: PathBuf,
    },
    /// The store cannot be listed.
    #[error("cannot read model store {}: {source}", path.display())]
    Read {
        /// The directory that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The model name DJL Serving gives a directory (or file stem, or Hugging Face
/// id): every character other than an ASCII letter, digit or `_` becomes `_`.
pub fn model_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `name` can be a model name in a URL path segment: non-empty and
/// made of `[A-Za-z0-9_.-]`, and not `.` or `..`. (Names from the store are
/// always valid; this is for names that clients give, as in
/// `POST /models?model_name=`.)
pub fn is_valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Lists the models of `store`. The store must be an existing directory.
pub fn scan(store: &Path) -> Result<StoreScan, StoreError> {
    scan_except(store, None)
}

/// Lists the models of `store`, leaving out the directory `skip` (kiln's
/// log directory) if it is one of the store's entries.
pub fn scan_except(store: &Path, skip: Option<&Path>) -> Result<StoreScan, StoreError> {
    let skip = skip.and_then(|p| fs::canonicalize(p).ok());
    match fs::metadata(store) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Missing {
                path: store.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(StoreError::Read {
                path: store.to_path_buf(),
                source,
            })
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(StoreError::NotADirectory {
                path: store.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    let children = visible_children(store)?;
    let mut scan = StoreScan::default();

    if let Some(marker) = children.iter().find(|c| is_model_file(c)) {
        let name = dir_model_name(store);
        scan.warnings.push(format!(
            "{}: the store itself holds a model (it contains {}); serving it as the one model '{name}'",
            store.display(),
            file_name(marker)
        ));
        scan.models
            .push(entry(name, store.to_path_buf(), &mut scan.warnings));
        return Ok(scan);
    }

    for path in children {
        if skip.is_some() && fs::canonicalize(&path).ok() == skip {
            continue;
        }
        let file = file_name(&path);
        match fs::metadata(&path) {
            Err(e) => scan
                .warnings
                .push(format!("{}: cannot read ({e}); skipped", path.display())),
            Ok(meta) if meta.is_dir() => add_directory(&mut scan, path, true)?,
            Ok(_) => {
                let warning = match ARCHIVE_SUFFIXES
                    .iter()
                    .find(|s| file.to_ascii_lowercase().ends_with(*s))
                {
                    Some(suffix) => {
                        let stem = &file[..file.len() - suffix.len()];
                        format!(
                            "{}: kiln does not unpack archives; extract it into {} to serve it as \
                             the model '{}'",
                            path.display(),
                            store.join(stem).display(),
                            model_name(stem)
                        )
                    }
                    None => format!(
                        "{}: not a directory, skipped (each model is a subdirectory of the store)",
                        path.display()
                    ),
                };
                scan.warnings.push(warning);
            }
        }
    }
    scan.models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(scan)
}

/// A model directory of the store, after DJL's nested-directory rule;
/// with `need_model_files`, one that holds none is skipped.
fn add_directory(
    scan: &mut StoreScan,
    path: PathBuf,
    need_model_files: bool,
) -> Result<(), StoreError> {
    let dir = match nested_model_dir(&path)? {
        Nested::Empty => {
            scan.warnings
                .push(format!("{}: empty directory, skipped", path.display()));
            return Ok(());
        }
        Nested::Itself => path,
        Nested::Inner(inner) => {
            scan.warnings.push(format!(
                "{}: holds only the directory {}, which is used as the model directory (as DJL \
                 Serving does), so the model is named '{}'",
                path.display(),
                file_name(&inner),
                dir_model_name(&inner)
            ));
            inner
        }
    };
    if need_model_files && !visible_children(&dir)?.iter().any(|c| is_model_file(c)) {
        scan.warnings.push(format!(
            "{}: holds no model (no {}, {}, config.json or weight file such as *.gguf or \
             *.safetensors), skipped",
            dir.display(),
            PROPERTIES_FILE,
            MODEL_PY
        ));
        return Ok(());
    }
    let name = dir_model_name(&dir);
    if let Some(other) = scan.models.iter().find(|m| m.name == name) {
        scan.warnings.push(format!(
            "{}: its model name '{name}' is already taken by {}; skipped",
            dir.display(),
            other.dir.display()
        ));
        return Ok(());
    }
    let dir_name = file_name(&dir);
    if name != dir_name {
        scan.warnings.push(format!(
            "{}: served as the model '{name}' (DJL Serving's naming: characters other than \
             letters, digits and '_' become '_')",
            dir.display()
        ));
    }
    let entry = entry(name, dir, &mut scan.warnings);
    scan.models.push(entry);
    Ok(())
}

/// Builds the entry of a model directory, warning about its `model.py`.
fn entry(name: String, dir: PathBuf, warnings: &mut Vec<String>) -> StoreEntry {
    let has_properties = dir.join(PROPERTIES_FILE).is_file();
    let has_model_py = dir.join(MODEL_PY).is_file();
    if has_model_py {
        warnings.push(model_py_warning(&dir));
    }
    StoreEntry {
        name,
        dir,
        has_properties,
        has_model_py,
    }
}

/// The warning for the `model.py` of the model directory `dir`, which kiln
/// does not run.
pub fn model_py_warning(dir: &Path) -> String {
    format!(
        "{}: custom Python handlers cannot run in kiln; serving the model with the built-in handler",
        dir.join(MODEL_PY).display()
    )
}

enum Nested {
    Empty,
    Itself,
    Inner(PathBuf),
}

/// DJL's `getNestedModelDir`: a directory whose only visible entry is a
/// directory stands for that directory.
fn nested_model_dir(dir: &Path) -> Result<Nested, StoreError> {
    let children = visible_children(dir)?;
    Ok(match children.as_slice() {
        [] => Nested::Empty,
        [only] if only.is_dir() => Nested::Inner(only.clone()),
        _ => Nested::Itself,
    })
}

/// The non-hidden entries of `dir`, sorted.
fn visible_children(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let read_error = |source| StoreError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut children = Vec::new();
    for item in fs::read_dir(dir).map_err(read_error)? {
        let item = item.map_err(read_error)?;
        if !item.file_name().to_string_lossy().starts_with('.') {
            children.push(item.path());
        }
    }
    children.sort();
    Ok(children)
}

/// Whether `path` is a file that makes its directory a model.
fn is_model_file(path: &Path) -> bool {
    let name = file_name(path).to_ascii_lowercase();
    path.is_file()
        && (MODEL_FILES.contains(&name.as_str())
            || WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The model name of a directory: its name by DJL's rule, from the absolute
/// path when the path has no final component (like `.`).
fn dir_model_name(dir: &Path) -> String {
    let name = match dir.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => fs::canonicalize(dir)
            .map(|d| file_name(&d))
            .unwrap_or_default(),
    };
    if name.is_empty() {
        "model".to_string()
    } else {
        model_name(&name)
    }
}

/// The model that `HF_MODEL_ID` adds, as DJL Serving does
/// (`ModelStore.createHuggingFaceModel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfModel {
    /// `HF_MODEL_ID` is a local directory: it is a model directory like those
    /// of the store (load it with `ModelProperties::load`).
    Directory {
        /// The model.
        entry: StoreEntry,
        /// Warnings about it (its `model.py`, a nested directory).
        warnings: Vec<String>,
    },
    /// `HF_MODEL_ID` is a Hugging Face id or a URL: the model has no directory
    /// (build its properties with `ModelProperties::from_hf_model_id`).
    ModelId {
        /// The model name: the id by DJL's rule (`facebook/opt-13b` is
        /// `facebook_opt_13b`).
        name: String,
        /// The value of `HF_MODEL_ID`.
        model_id: String,
    },
}

/// The model that `HF_MODEL_ID` adds next to the store's, if it is set.
pub fn hf_model(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<HfModel>, StoreError> {
    let Some(model_id) = env("HF_MODEL_ID")
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let path = PathBuf::from(&model_id);
    if !model_id.contains("://") && path.is_dir() {
        let mut scan = StoreScan::default();
        add_directory(&mut scan, path.clone(), false)?;
        let entry = match scan.models.pop() {
            Some(entry) => entry,
            None => StoreEntry {
                name: dir_model_name(&path),
                dir: path,
                has_properties: false,
                has_model_py: false,
            },
        };
        return Ok(Some(HfModel::Directory {
            entry,
            warnings: scan.warnings,
        }));
    }
    Ok(Some(HfModel::ModelId {
        name: model_name(&model_id),
        model_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn djl_model_names() {
        assert_eq!(model_name("opt13b"), "opt13b");
        assert_eq!(model_name("opt-13b"), "opt_13b");
        assert_eq!(model_name("Qwen2.5-0.5B"), "Qwen2_5_0_5B");
        assert_eq!(model_name("facebook/opt-13b"), "facebook_opt_13b");
        assert_eq!(model_name("日本"), "__");
        assert_eq!(model_name("_x"), "_x");
    }

    #[test]
    fn valid_names() {
        for name in ["opt13b", "opt-13b", "a.b_c", "A9"] {
            assert!(is_valid_model_name(name), "{name}");
        }
        for name in ["", ".", "..", "a/b", "a b", "é", "a?b"] {
            assert!(!is_valid_model_name(name), "{name}");
        }
    }
}
