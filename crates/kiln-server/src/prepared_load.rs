//! Loading a model with the prepared-model cache in front of conversion,
//! for the server's registry and the CLI alike.
//!
//! A load that converts weights (`option.quantize`, a 16-bit `option.dtype`)
//! looks the conversion up in the prepared-model cache first
//! ([`kiln_sources::prepared`]): on a hit it maps the prepared GGUF file and
//! converts nothing; on a miss it converts as usual while writing the result
//! into a new entry, so the next start is a hit. A model that is itself a
//! prepared file made with the settings asked for (a prefix that
//! `kiln prepare` uploaded) is mapped as it is. [`LoadReport`] says which of
//! these happened, for logs and tests.
//!
//! Whichever way the model is read, a backend that rearranges weights at
//! upload (the CPU backend's interleaved groups) finds them in the same
//! cache, keyed by the file the weights come from, the settings and the
//! layout's name ([`kiln_model::layouts`]): the first start writes them
//! after rearranging, later starts map them. A failure there only costs
//! time: it is logged and the weights are rearranged as usual.
//! `KILN_LAYOUT_CACHE=0` turns this off.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_backend::Backend;
use kiln_model::layouts::{LayoutFile, LayoutRecorder, Layouts};
use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
use kiln_model::{LoadOptions, LoadedModel, ModelError};
use kiln_sources::prepared::{Begin, Builder, KeyParts};
use kiln_sources::{Manifest, PreparedCache, PreparedError};

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

/// Loads the model at `path` (downloaded from the source `manifest`
/// describes, if any) onto `backend` with `opts`, through `cache` when
/// `opts` convert weights or `always_prepare` asks for a prepared file
/// anyway (`kiln prepare` without conversion options).
pub fn load_model<B: Backend>(
    backend: &B,
    path: &Path,
    manifest: Option<&Manifest>,
    opts: &LoadOptions,
    cache: &PreparedCache,
    always_prepare: bool,
) -> Result<(LoadedModel<B>, LoadReport), LoadError> {
    if !always_prepare && !prepared::converts(path, opts) {
        let model = with_layouts(backend, cache, path, &Settings::of(opts), |l| {
            kiln_model::load_with(backend, path, opts, l)
        })?;
        return Ok((model, LoadReport::AsStored));
    }
    let as_prepared = prepared::as_prepared(opts);
    if let Some(info) = prepared::read_info(path)? {
        if info.matches(opts) {
            let model = with_layouts(backend, cache, path, &Settings::of(&as_prepared), |l| {
                kiln_model::load_with(backend, path, &as_prepared, l)
            })?;
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
    let parts = KeyParts {
        source,
        identity,
        quantize: settings.quantize.clone(),
        dtype: settings.dtype.clone(),
        artifact_version: ARTIFACT_VERSION,
        layout: None,
    };
    match cache.begin(&parts)? {
        Begin::Ready(entry) => {
            let file = entry.file();
            let key = entry.key().to_string();
            let loaded = with_layouts(backend, cache, &file, &Settings::of(&as_prepared), |l| {
                kiln_model::load_with(backend, &file, &as_prepared, l)
            });
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
            // kept, and stored under that file's key once it exists.
            let layout = cached_layout(backend)
                .map(|name| (name, Layouts::Record(LayoutRecorder::default())));
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
            if let Some((name, Layouts::Record(rec))) = &layout {
                if let Some(lparts) = layout_parts(&file, &Settings::of(&as_prepared), name) {
                    let lkey = lparts.key();
                    match cache.begin(&lparts) {
                        Ok(Begin::Build(b)) => store_layout(cache, b, rec, name, t0),
                        Ok(Begin::Ready(_)) => {}
                        Err(e) => tracing::warn!("weight layout {lkey}: {e}; not stored"),
                    }
                }
            }
            Ok((model, LoadReport::Converted { key, file, bytes }))
        }
    }
}

/// The layout `backend` rearranges weights into, when weights in it go
/// through the prepared-model cache (`KILN_LAYOUT_CACHE=0` turns that off:
/// every start rearranges them).
fn cached_layout<B: Backend>(backend: &B) -> Option<&'static str> {
    let enabled = std::env::var("KILN_LAYOUT_CACHE").map_or(true, |v| v.trim() != "0");
    backend.weight_layout().filter(|_| enabled)
}

/// The cache key of the weights read from `file` with `settings`, in the
/// backend layout `layout`: the file's identity (size and modification
/// time, as for a local model), so a rewritten model is a new key. `None`
/// when the file cannot be listed (the load that follows says why, once).
fn layout_parts(file: &Path, settings: &Settings, layout: &str) -> Option<KeyParts> {
    match kiln_sources::prepared::local_identity(file) {
        Ok((source, identity)) => Some(KeyParts {
            source,
            identity,
            quantize: settings.quantize.clone(),
            dtype: settings.dtype.clone(),
            artifact_version: ARTIFACT_VERSION,
            layout: Some(layout.to_string()),
        }),
        Err(e) => {
            tracing::debug!("{}: {e}; no layout cache for it", file.display());
            None
        }
    }
}

/// What a start does with the layout cache.
enum Plan {
    /// Rearrange every weight; store nothing.
    Off,
    /// Map the entry's file.
    Map(String, LayoutFile),
    /// Rearrange, then write the entry.
    Build(Builder),
}

/// Looks the weights of `parts` up: a whole entry to map, or the right to
/// write it. A corrupt or stale entry is removed and written again; any
/// failure is logged and leaves the cache out of this start.
fn plan(cache: &PreparedCache, parts: &KeyParts, layout: &str) -> Plan {
    let key = parts.key();
    let entry = match cache.begin(parts) {
        Ok(Begin::Ready(entry)) => entry,
        Ok(Begin::Build(b)) => return Plan::Build(b),
        // The entry's file was not its recorded size (already removed).
        Err(e @ PreparedError::Corrupt { .. }) => {
            tracing::warn!("weight layout {key}: {e}; writing it again now");
            return rebuild(cache, parts);
        }
        Err(e) => {
            tracing::warn!("weight layout {key}: {e}; this start rearranges the weights instead");
            return Plan::Off;
        }
    };
    match LayoutFile::open(&entry.file(), layout, &key) {
        Ok(file) => Plan::Map(key, file),
        Err(e) => {
            tracing::warn!("weight layout {key}: {e}; the entry is removed and written again");
            rebuild(cache, parts)
        }
    }
}

/// The right to write again an entry found corrupt, without waiting: a
/// process that holds it (another one, or this one for a model loaded
/// earlier, whose lock `try_rebuild` lets go of) is not waited for, and this
/// start goes on without the cache instead.
fn rebuild(cache: &PreparedCache, parts: &KeyParts) -> Plan {
    let key = parts.key();
    match cache.try_rebuild(parts) {
        Ok(Some(b)) => Plan::Build(b),
        Ok(None) => {
            tracing::info!(
                "weight layout {key}: another kiln process holds it; this start rearranges \
                 the weights and leaves the entry to a later one"
            );
            Plan::Off
        }
        Err(e) => {
            tracing::warn!("weight layout {key}: {e}; this start rearranges the weights");
            Plan::Off
        }
    }
}

/// Runs `load` (of the model file `file`, read with `settings`) with the
/// weights in `backend`'s layout mapped from the cache when an earlier start
/// stored them, or stored after this load when none did.
fn with_layouts<B: Backend>(
    backend: &B,
    cache: &PreparedCache,
    file: &Path,
    settings: &Settings,
    load: impl FnOnce(&Layouts) -> Result<LoadedModel<B>, ModelError>,
) -> Result<LoadedModel<B>, ModelError> {
    let Some(layout) = cached_layout(backend) else {
        return load(&Layouts::Off);
    };
    let Some(parts) = layout_parts(file, settings, layout) else {
        return load(&Layouts::Off);
    };
    let t0 = Instant::now();
    match plan(cache, &parts, layout) {
        Plan::Off => load(&Layouts::Off),
        Plan::Map(key, mapped) => {
            let (count, path) = (mapped.len(), mapped.path().to_path_buf());
            let layouts = Layouts::Mapped(mapped);
            let model = load(&layouts)?;
            match layouts.finish() {
                Ok(()) => tracing::info!(
                    "weight layout {key}: mapped {} ({count} matrices in {layout}) in {:.2?}; \
                     nothing rearranged",
                    path.display(),
                    t0.elapsed()
                ),
                Err(why) => {
                    tracing::warn!(
                        "weight layout {key}: {} does not match the model ({why}); those \
                         weights were rearranged, and the entry is removed for the next start \
                         to write again",
                        path.display()
                    );
                    if let Err(e) = cache.discard(&key) {
                        tracing::warn!("weight layout {key}: {e}");
                    }
                }
            }
            Ok(model)
        }
        Plan::Build(builder) => {
            let layouts = Layouts::Record(LayoutRecorder::default());
            let model = load(&layouts)?;
            if let Layouts::Record(rec) = &layouts {
                store_layout(cache, builder, rec, layout, t0);
            }
            Ok(model)
        }
    }
}

/// Writes what `rec` recorded into `builder`'s entry and publishes it; a
/// failure is logged (the model serves all the same).
fn store_layout(
    cache: &PreparedCache,
    builder: Builder,
    rec: &LayoutRecorder,
    layout: &str,
    t0: Instant,
) {
    let key = builder.key().to_string();
    let written = rec
        .write(&builder.file(), layout, &key)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            builder
                .commit(cache)
                .map(|entry| (entry, bytes))
                .map_err(|e| e.to_string())
        });
    match written {
        Ok((entry, bytes)) => tracing::info!(
            "weight layout {key}: not in the cache; rearranged {} matrices into {layout} and \
             wrote {} ({bytes} bytes) in {:.2?}; later starts map it",
            rec.len(),
            entry.file().display(),
            t0.elapsed()
        ),
        Err(e) => tracing::warn!(
            "weight layout {key}: cannot store the rearranged weights ({e}); serving without \
             them, the next start tries again"
        ),
    }
}

/// A model loaded through the prepared-model cache ([`load_model`]) onto
/// whichever device [`kiln_engine::launch::load_from`] picks, keeping the
/// [`LoadReport`] for the caller.
pub struct CachedSource<'a> {
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
    /// How the load went, once it has.
    pub report: std::sync::Mutex<Option<LoadReport>>,
}

impl kiln_engine::launch::ModelSource for CachedSource<'_> {
    fn load_onto<B: Backend>(
        &self,
        backend: &B,
    ) -> Result<LoadedModel<B>, kiln_engine::LaunchError> {
        let (model, report) = load_model(
            backend,
            self.path,
            self.manifest,
            self.opts,
            self.cache,
            self.always_prepare,
        )
        .map_err(|e| kiln_engine::LaunchError::Source(Box::new(e)))?;
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
