//! The one way a model gets from where it lives onto a device: check the
//! device, fetch a remote source into the download cache, read it through
//! the prepared-model cache (`prepared.rs`) and the weight layout cache
//! (`layouts.rs`), and put it on the device ([`crate::launch`]). The CLI's
//! subcommands and the server's registry both call [`load`]; what differs
//! between them (which caches, `kiln prepare`'s always-prepare, the layout
//! cache switch) is a field of [`LoadSpec`].
//!
//! It lives here, beside [`crate::launch`], because launching is the step
//! that needs the backend types, and the caches wrap that step.

mod layouts;
mod prepared;

use std::path::PathBuf;
use std::time::Instant;

use kiln_backend::Device;
use kiln_model::LoadOptions;
use kiln_sources::{DownloadDir, PreparedCache, Source, SourceError};

pub use layouts::{enabled_by_env as layout_cache_enabled_by_env, LAYOUT_CACHE_ENV};
pub use prepared::{parse_cache_max_gib, LoadError, LoadReport};

use crate::launch::{self, DeviceModel, LaunchError};

/// Where the model to load is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A local GGUF file or model directory.
    Local(PathBuf),
    /// A model to download into the download cache first.
    Remote(Source),
}

/// Everything a load needs to know: the model, the device, the load options
/// and the caches. [`LoadSpec::new`] fills the caches from the environment
/// as both the CLI and the server read it.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Which model.
    pub model: ModelLocation,
    /// Where it runs.
    pub device: Device,
    /// Context length, conversion settings.
    pub options: LoadOptions,
    /// Where remote models are downloaded (and prepared models kept).
    pub downloads: DownloadDir,
    /// Bytes the prepared-model cache may hold (`None`: unbounded).
    pub cache_max_bytes: Option<u64>,
    /// Prepare (and map) even when nothing is converted (`kiln prepare`).
    pub always_prepare: bool,
    /// Whether weights a backend rearranges go through the cache
    /// ([`LAYOUT_CACHE_ENV`]`=0` turns it off).
    pub layout_cache: bool,
}

impl LoadSpec {
    /// A load of `model` onto `device` with `options`, the download
    /// directory and layout cache switch read from the environment, and an
    /// unbounded prepared-model cache.
    pub fn new(model: ModelLocation, device: Device, options: LoadOptions) -> LoadSpec {
        LoadSpec {
            model,
            device,
            options,
            downloads: DownloadDir::from_env(),
            cache_max_bytes: None,
            always_prepare: false,
            layout_cache: layout_cache_enabled_by_env(),
        }
    }
}

/// A model on its device, with how it was read.
pub struct Loaded {
    /// The model, ready to [`DeviceModel::start`].
    pub model: DeviceModel,
    /// Whether it was converted, mapped from the cache or read as stored.
    pub report: LoadReport,
    /// The local file or directory it was read from.
    pub path: PathBuf,
}

/// Why [`load`] failed, at which step.
#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    /// The device cannot be used (checked before anything is read).
    #[error(transparent)]
    Device(LaunchError),
    /// The remote model could not be downloaded.
    #[error(transparent)]
    Fetch(#[from] SourceError),
    /// The model's files did not load. A remote model's error names the
    /// source, since the loader names only the cached file.
    #[error("{}{error}", source_prefix(.remote))]
    Load {
        /// The local file or directory read.
        path: PathBuf,
        /// The source it was downloaded from (as written), and the
        /// download's URL.
        remote: Option<(String, String)>,
        /// The loader's error.
        error: Box<LaunchError>,
    },
}

/// `"{source}: "` for a downloaded model, nothing for a local one.
fn source_prefix(remote: &Option<(String, String)>) -> String {
    remote
        .as_ref()
        .map(|(source, _)| format!("{source}: "))
        .unwrap_or_default()
}

/// Loads `spec`'s model onto its device. The device is checked first, so an
/// unusable GPU fails before anything is downloaded or read.
pub fn load(spec: &LoadSpec) -> Result<Loaded, LoadModelError> {
    launch::check_device(spec.device).map_err(LoadModelError::Device)?;
    let (path, fetched) = match &spec.model {
        ModelLocation::Local(path) => (path.clone(), None),
        ModelLocation::Remote(source) => {
            let fetched = kiln_sources::fetch(source, &spec.downloads)?;
            (fetched.model_path.clone(), Some((source, fetched)))
        }
    };
    let t0 = Instant::now();
    let cache = PreparedCache::new(&spec.downloads, spec.cache_max_bytes);
    let source = prepared::CachedSource {
        path: &path,
        manifest: fetched.as_ref().map(|(_, f)| &f.manifest),
        opts: &spec.options,
        cache: &cache,
        always_prepare: spec.always_prepare,
        layout_cache: spec.layout_cache,
        report: Default::default(),
    };
    let model = launch::load_from(spec.device, &source).map_err(|error| LoadModelError::Load {
        path: path.clone(),
        remote: fetched
            .as_ref()
            .map(|(s, f)| (s.to_string(), f.manifest.url.clone())),
        error: Box::new(error),
    })?;
    tracing::info!(
        "loaded {} onto {} in {:.2?}",
        path.display(),
        spec.device,
        t0.elapsed()
    );
    Ok(Loaded {
        model,
        report: source.take_report(),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: ModelLocation, device: Device, downloads: &std::path::Path) -> LoadSpec {
        LoadSpec {
            downloads: DownloadDir::new(downloads.to_path_buf()),
            ..LoadSpec::new(model, device, LoadOptions::default())
        }
    }

    /// An unusable GPU is refused before a remote model is downloaded:
    /// the bucket here does not exist, and nothing is asked of it.
    #[test]
    fn the_device_is_checked_before_the_download() {
        let dir = std::env::temp_dir().join(format!("kiln-load-{}", std::process::id()));
        let source = match Source::s3("s3://no-such-bucket/model") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let remote = spec(ModelLocation::Remote(source), Device::Cuda(0), &dir);
        match load(&remote) {
            Err(LoadModelError::Device(e)) => {
                assert!(e.to_string().contains("--device cuda"), "{e}")
            }
            Err(e) => panic!("not a device error: {e}"),
            Ok(_) => panic!("loaded a model that does not exist"),
        }
        assert!(!dir.exists(), "the download directory was written");
    }

    /// A local model that does not load names its path and no source.
    #[test]
    fn a_local_failure_names_the_path() {
        let dir = std::env::temp_dir().join(format!("kiln-load-{}-cpu", std::process::id()));
        let missing = PathBuf::from("/nonexistent/model.gguf");
        let local = spec(ModelLocation::Local(missing.clone()), Device::Cpu, &dir);
        match load(&local) {
            Err(LoadModelError::Load {
                path,
                remote: None,
                error,
            }) => {
                assert_eq!(path, missing);
                assert!(error.to_string().contains("/nonexistent"), "{error}");
            }
            Err(e) => panic!("not a load error: {e}"),
            Ok(_) => panic!("loaded a model that does not exist"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
