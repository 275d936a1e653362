//! The prepared-model cache in front of conversion.
//!
//! A load that converts weights (`option.quantize`, a 16-bit `option.dtype`)
//! looks the conversion up in the prepared-model cache first
//! ([`kiln_sources::prepared`]): on a hit it maps the prepared GGUF file and
//! converts nothing; on a miss it converts as usual while writing the result
//! into a new entry, so the next start is a hit. A model that is itself a
//! prepared file made with the settings asked for (a prefix that
//! `kiln prepare` uploaded) is mapped as it is. [`LoadReport`] says which of
//! these happened, for logs and tests. Whichever way the model is read, the
//! weight layout cache ([`super::layouts`]) comes along.
//!
//! For a backend that rearranges its matrices (the CPU backend), with the
//! layout cache on, a conversion is a *packed* entry
//! ([`kiln_sources::prepared::KeyParts::packed`],
//! [`kiln_model::prepared`]): one directory holding `weights.layout`, the
//! rearranged matrices streamed as they are made, and `model.gguf`, the
//! rest, so each weight is on disk once and written once. A hit maps both;
//! a packed entry that does not load (a truncated or rewritten file) is
//! removed, and the error names it, as for a whole prepared file.
//! `kiln prepare` (`always_prepare`) still writes a whole GGUF file, which
//! is what it publishes, and its weight layout goes to a layout entry of
//! its own as for any model file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_backend::Backend;
use kiln_model::layouts::LayoutRecorder;
use kiln_model::layouts::{LayoutFile, Layouts};
use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
use kiln_model::{LoadOptions, LoadedModel, ModelError};
use kiln_sources::prepared::{Begin, KeyParts, LAYOUT_FILE};
use kiln_sources::{Manifest, PreparedCache, PreparedError};

use super::layouts::{cached_layout, layout_parts, store_layout, streaming, with_layouts};
use crate::launch::{LaunchError, ModelSource};

/// The name, beside a prepared file being written, of the weight-layout
/// file streamed during its conversion, until it moves into its own entry.
const PENDING_LAYOUT: &str = "weights.layout.pending";

/// How a model was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadReport {
    /// No conversion was asked for: loaded as stored (a prepared file
    /// included).
    AsStored,
    /// The model is a prepared file with the settings asked for: mapped.
    PreparedSource {
        /// The prepared file.
        file: PathBuf,
    },
    /// A prepared-cache hit: the entry's file was mapped, nothing converted.
    Mapped {
        /// The cache key.
        key: String,
        /// The prepared file.
        file: PathBuf,
    },
    /// A miss: converted while loading and written into the cache.
    Converted {
        /// The cache key.
        key: String,
        /// The prepared file written.
        file: PathBuf,
        /// Its size.
        bytes: u64,
    },
}

impl LoadReport {
    /// The prepared file the model is (or was written to), if any.
    pub fn prepared_file(&self) -> Option<&Path> {
        match self {
            LoadReport::AsStored => None,
            LoadReport::PreparedSource { file }
            | LoadReport::Mapped { file, .. }
            | LoadReport::Converted { file, .. } => Some(file),
        }
    }
}

/// Why a model could not be loaded or prepared.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading or converting the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The prepared-model cache failed, or held a corrupt entry.
    #[error(transparent)]
    Cache(#[from] PreparedError),
    /// A prepared entry's file did not load; the entry was removed.
    #[error("{source}; the entry was removed from the prepared-model cache, the next start prepares it again")]
    CorruptEntry {
        /// The loader's error, which names the file.
        source: ModelError,
    },
    /// A local model's files could not be listed for its cache key.
    #[error("{}: {source}", path.display())]
    Identity {
        /// The model path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Loads `source`'s model onto `backend` with its options, through its
/// cache when the options convert weights or `always_prepare` asks for a
/// prepared file anyway (`kiln prepare` without conversion options).
fn load_model<B: Backend>(
    backend: &B,
    source: &CachedSource<'_>,
) -> Result<(LoadedModel<B>, LoadReport), LoadError> {
    let CachedSource {
        path,
        manifest,
        opts,
        cache,
        always_prepare,
        layout_cache,
        ..
    } = *source;
    if !always_prepare && !prepared::converts(path, opts) {
        let model = with_layouts(
            backend,
            layout_cache,
            cache,
            path,
            &Settings::of(opts),
            |l| kiln_model::load_with(backend, path, opts, l),
        )?;
        return Ok((model, LoadReport::AsStored));
    }
    let as_prepared = prepared::as_prepared(opts);
    if let Some(info) = prepared::read_info(path)? {
        if let Some(layout) = prepared::packed_layout(path)? {
            return Err(LoadError::Model(ModelError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "is the GGUF half of a packed prepared-cache entry (its matrices are in the \
                     entry's {LAYOUT_FILE}, in {layout}) and does not load alone: serve the \
                     original model, or write a portable file with `kiln prepare`"
                ),
            }));
        }
        if info.matches(opts) {
            let model = with_layouts(
                backend,
                layout_cache,
                cache,
                path,
                &Settings::of(&as_prepared),
                |l| kiln_model::load_with(backend, path, &as_prepared, l),
            )?;
            let file = match &model.format {
                kiln_model::ModelFormat::Gguf(f) | kiln_model::ModelFormat::HfDir(f) => f.clone(),
            };
            tracing::info!(
                "{} is a prepared model ({}; key {}); mapped, nothing converted",
                file.display(),
                info.settings,
                info.key
            );
            return Ok((model, LoadReport::PreparedSource { file }));
        }
        tracing::warn!(
            "{} is a prepared model ({}, artifact version {}), and {} (version {ARTIFACT_VERSION}) \
             was asked for: converting it again",
            path.display(),
            info.settings,
            info.artifact_version,
            Settings::of(opts)
        );
    }
    let (source, identity) = match manifest {
        Some(m) => kiln_sources::prepared::remote_identity(m),
        None => {
            kiln_sources::prepared::local_identity(path).map_err(|source| LoadError::Identity {
                path: path.to_path_buf(),
                source,
            })?
        }
    };
    let settings = Settings::of(opts);
    // A conversion for serving, on a backend that computes from its own
    // layout, keeps the rearranged matrices only in that layout.
    let packed = match always_prepare {
        true => None,
        false => cached_layout(backend, layout_cache),
    };
    let parts = KeyParts {
        source,
        identity,
        quantize: settings.quantize.clone(),
        dtype: settings.dtype.clone(),
        artifact_version: ARTIFACT_VERSION,
        layout: None,
        packed: packed.map(str::to_string),
    };
    match cache.begin(&parts)? {
        Begin::Ready(entry) if packed.is_some() => {
            let (file, key) = (entry.file(), entry.key().to_string());
            let layout_path = entry.packed_file().unwrap_or_default();
            let t0 = Instant::now();
            let loaded = LayoutFile::open(&layout_path, packed.unwrap_or_default(), &key)
                .and_then(|l| prepared::load_packed(backend, &file, &as_prepared, l));
            match loaded {
                Ok(model) => {
                    tracing::info!(
                        "prepared model {key}: mapped {} and {} in {:.2?}; nothing converted, \
                         nothing rearranged",
                        file.display(),
                        layout_path.display(),
                        t0.elapsed()
                    );
                    Ok((model, LoadReport::Mapped { key, file }))
                }
                Err(source) => {
                    cache.discard(&key)?;
                    Err(LoadError::CorruptEntry { source })
                }
            }
        }
        Begin::Build(builder) if packed.is_some() => {
            let layout = packed.unwrap_or_default();
            build_packed(backend, path, opts, cache, &parts, builder, layout)
        }
        Begin::Ready(entry) => {
            let file = entry.file();
            let key = entry.key().to_string();
            let loaded = with_layouts(
                backend,
                layout_cache,
                cache,
                &file,
                &Settings::of(&as_prepared),
                |l| kiln_model::load_with(backend, &file, &as_prepared, l),
            );
            match loaded {
                Ok(model) => {
                    tracing::info!(
                        "prepared model {key}: mapped {}; nothing converted",
                        file.display()
                    );
                    Ok((model, LoadReport::Mapped { key, file }))
                }
                Err(source) => {
                    cache.discard(&key)?;
                    Err(LoadError::CorruptEntry { source })
                }
            }
        }
        Begin::Build(builder) => {
            let key = builder.key().to_string();
            let info = PreparedInfo {
                key: key.clone(),
                source: parts.source.clone(),
                identity: parts.identity_json(),
                settings: settings.clone(),
                artifact_version: ARTIFACT_VERSION,
            };
            tracing::info!(
                "prepared model {key}: not in the cache; converting {} ({settings}) and writing {}",
                parts.source,
                builder.file().display()
            );
            let t0 = Instant::now();
            // The converted weights, as the backend rearranges them, are
            // what a later start's load of the prepared file rearranges:
            // streamed to a file beside the prepared one as they are made
            // (so the model is never held in memory whole), and stored under
            // the prepared file's key once that file exists.
            let pending = builder.file().with_file_name(PENDING_LAYOUT);
            let layout = cached_layout(backend, layout_cache)
                .and_then(|name| Some((name, Layouts::Record(streaming(&pending)?))));
            let record = layout.as_ref().map_or(&Layouts::Off, |(_, l)| l);
            let (model, bytes) =
                prepared::load_and_prepare(backend, path, opts, &info, &builder.file(), record)?;
            let entry = builder.commit(cache)?;
            let file = entry.file();
            tracing::info!(
                "prepared model {key}: converted and wrote {} ({bytes} bytes) in {:.2?}",
                file.display(),
                t0.elapsed()
            );
            // The pending layout file moved with the entry's directory.
            let pending = file.with_file_name(PENDING_LAYOUT);
            if let Some((name, Layouts::Record(rec))) = &layout {
                if let Some(lparts) = layout_parts(&file, &Settings::of(&as_prepared), name) {
                    let lkey = lparts.key();
                    match cache.begin(&lparts) {
                        Ok(Begin::Build(b)) => match std::fs::rename(&pending, b.file()) {
                            Ok(()) => store_layout(cache, b, rec, name, t0),
                            Err(e) => tracing::warn!(
                                "weight layout {lkey}: cannot move {} into the cache ({e}); \
                                 not stored",
                                pending.display()
                            ),
                        },
                        Ok(Begin::Ready(_)) => {}
                        Err(e) => tracing::warn!("weight layout {lkey}: {e}; not stored"),
                    }
                }
            }
            // Whatever was not moved into a layout entry is not needed (the
            // model's weights keep their map of it).
            let _ = std::fs::remove_file(&pending);
            Ok((model, LoadReport::Converted { key, file, bytes }))
        }
    }
}

/// Converts the model at `path` into the packed entry `builder` writes (see
/// the module docs): the matrices `backend` rearranges into `layout` are
/// streamed to the entry's layout file, the rest to its GGUF file.
fn build_packed<B: Backend>(
    backend: &B,
    path: &Path,
    opts: &LoadOptions,
    cache: &PreparedCache,
    parts: &KeyParts,
    builder: kiln_sources::prepared::Builder,
    layout: &str,
) -> Result<(LoadedModel<B>, LoadReport), LoadError> {
    let key = builder.key().to_string();
    let settings = Settings::of(opts);
    let info = PreparedInfo {
        key: key.clone(),
        source: parts.source.clone(),
        identity: parts.identity_json(),
        settings: settings.clone(),
        artifact_version: ARTIFACT_VERSION,
    };
    let layout_path = builder.packed_file().unwrap_or_default();
    tracing::info!(
        "prepared model {key}: not in the cache; converting {} ({settings}) and writing {} \
         with its matrices in {layout} in {}",
        parts.source,
        builder.file().display(),
        layout_path.display()
    );
    let t0 = Instant::now();
    let tracker = prepared::PackedTensors::new();
    let rec = LayoutRecorder::streaming(&layout_path)?.telling(tracker.clone());
    let layouts = Layouts::Record(rec);
    let (model, bytes) = prepared::load_and_prepare_packed(
        backend,
        path,
        opts,
        &info,
        &builder.file(),
        &layouts,
        tracker,
        layout,
    )?;
    let Layouts::Record(rec) = &layouts else {
        return Err(LoadError::Model(ModelError::Format {
            path: layout_path,
            msg: "the weight layout was not recorded".into(),
        }));
    };
    let lbytes = rec.finish(layout, &key)?;
    let entry = builder.commit(cache)?;
    let file = entry.file();
    tracing::info!(
        "prepared model {key}: converted and wrote {} ({bytes} bytes) and {} ({lbytes} bytes, \
         {} matrices in {layout}) in {:.2?}",
        file.display(),
        LAYOUT_FILE,
        rec.len(),
        t0.elapsed()
    );
    Ok((
        model,
        LoadReport::Converted {
            key,
            file,
            bytes: bytes + lbytes,
        },
    ))
}

/// A model loaded through the prepared-model cache onto whichever device
/// [`crate::launch::load_from`] picks, keeping the [`LoadReport`] for the
/// caller.
pub(super) struct CachedSource<'a> {
    /// The local model (a download cache entry for a remote one).
    pub path: &'a Path,
    /// What a remote model's download recorded (its content identity).
    pub manifest: Option<&'a Manifest>,
    /// The load options, conversion settings included.
    pub opts: &'a LoadOptions,
    /// The prepared-model cache.
    pub cache: &'a PreparedCache,
    /// Prepare (and map) even when nothing is converted (`kiln prepare`).
    pub always_prepare: bool,
    /// Whether rearranged weights go through the cache too.
    pub layout_cache: bool,
    /// How the load went, once it has.
    pub report: std::sync::Mutex<Option<LoadReport>>,
}

impl ModelSource for CachedSource<'_> {
    fn load_onto<B: Backend>(&self, backend: &B) -> Result<LoadedModel<B>, LaunchError> {
        let (model, report) =
            load_model(backend, self).map_err(|e| LaunchError::Source(Box::new(e)))?;
        if let Ok(mut r) = self.report.lock() {
            *r = Some(report);
        }
        Ok(model)
    }
}

impl CachedSource<'_> {
    /// The report of the load that ran ([`LoadReport::AsStored`] if none did).
    pub fn take_report(&self) -> LoadReport {
        self.report
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .unwrap_or(LoadReport::AsStored)
    }
}

/// `--cache-max-gib` / `KILN_CACHE_MAX_GIB` as bytes: a positive number of
/// GiB (fractions allowed).
pub fn parse_cache_max_gib(value: &str) -> Result<u64, String> {
    match value.trim().parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok((g * (1u64 << 30) as f64) as u64),
        _ => Err(format!(
            "'{value}' is not a positive number of GiB (such as 20 or 0.5)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_bounds_parse_as_gib() {
        assert_eq!(parse_cache_max_gib("2"), Ok(2 << 30));
        assert_eq!(parse_cache_max_gib("0.5"), Ok(1 << 29));
        assert!(parse_cache_max_gib("0").is_err());
        assert!(parse_cache_max_gib("-1").is_err());
        assert!(parse_cache_max_gib("lots").is_err());
    }
}
