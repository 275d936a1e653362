//! The CPU weight layout cache: a backend that rearranges weights at upload
//! (the CPU backend's interleaved groups) finds them in the prepared-model
//! cache, keyed by the file the weights come from, the settings and the
//! layout's name ([`kiln_model::layouts`]): the first start streams each
//! matrix to the file as it is rearranged (and serves it from there), later
//! starts map the file. A failure here only costs
//! time: it is logged and the weights are rearranged as usual.
//! [`LAYOUT_CACHE_ENV`]`=0` turns this off.

use std::path::Path;
use std::time::Instant;

use kiln_backend::Backend;
use kiln_model::layouts::{LayoutFile, LayoutRecorder, Layouts};
use kiln_model::prepared::{Settings, ARTIFACT_VERSION};
use kiln_model::{LoadedModel, ModelError};
use kiln_sources::prepared::{Begin, Builder, KeyParts};
use kiln_sources::{PreparedCache, PreparedError};

/// The environment variable that turns the weight layout cache off (`0`):
/// every start rearranges the weights then.
pub const LAYOUT_CACHE_ENV: &str = "KILN_LAYOUT_CACHE";

/// Whether [`LAYOUT_CACHE_ENV`] leaves the weight layout cache on (it is on
/// unless set to `0`); the default of [`super::LoadSpec::layout_cache`].
pub fn enabled_by_env() -> bool {
    std::env::var(LAYOUT_CACHE_ENV).map_or(true, |v| v.trim() != "0")
}

/// The layout `backend` rearranges weights into, when weights in it go
/// through the prepared-model cache (`enabled` false turns that off: every
/// start rearranges them).
pub(super) fn cached_layout<B: Backend>(backend: &B, enabled: bool) -> Option<&'static str> {
    backend.weight_layout().filter(|_| enabled)
}

/// The cache key of the weights read from `file` with `settings`, in the
/// backend layout `layout`: the file's identity (size and modification
/// time, as for a local model), so a rewritten model is a new key. `None`
/// when the file cannot be listed (the load that follows says why, once).
pub(super) fn layout_parts(file: &Path, settings: &Settings, layout: &str) -> Option<KeyParts> {
    match kiln_sources::prepared::local_identity(file) {
        Ok((source, identity)) => Some(KeyParts {
            source,
            identity,
            quantize: settings.quantize.clone(),
            dtype: settings.dtype.clone(),
            artifact_version: ARTIFACT_VERSION,
            layout: Some(layout.to_string()),
            packed: None,
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
pub(super) fn with_layouts<B: Backend>(
    backend: &B,
    enabled: bool,
    cache: &PreparedCache,
    file: &Path,
    settings: &Settings,
    load: impl FnOnce(&Layouts) -> Result<LoadedModel<B>, ModelError>,
) -> Result<LoadedModel<B>, ModelError> {
    let Some(layout) = cached_layout(backend, enabled) else {
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
            let Some(rec) = streaming(&builder.file()) else {
                return load(&Layouts::Off);
            };
            let layouts = Layouts::Record(rec);
            let model = load(&layouts)?;
            if let Layouts::Record(rec) = &layouts {
                store_layout(cache, builder, rec, layout, t0);
            }
            Ok(model)
        }
    }
}

/// A recorder streaming the rearranged weights to `file` as they are made
/// ([`LayoutRecorder::streaming`]), or `None` (logged) when the file cannot
/// be created: the load then rearranges in memory and stores nothing.
pub(super) fn streaming(file: &Path) -> Option<LayoutRecorder> {
    match LayoutRecorder::streaming(file) {
        Ok(rec) => Some(rec),
        Err(e) => {
            tracing::warn!("weight layout: {e}; this start rearranges the weights in memory");
            None
        }
    }
}

/// Completes the file `rec` streamed into `builder`'s entry and publishes
/// it; a failure is logged (the model serves all the same).
pub(super) fn store_layout(
    cache: &PreparedCache,
    builder: Builder,
    rec: &LayoutRecorder,
    layout: &str,
    t0: Instant,
) {
    let key = builder.key().to_string();
    let written = rec
        .finish(layout, &key)
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
