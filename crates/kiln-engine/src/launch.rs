//! The one place that puts a model on a [`Device`] and starts its
//! [`Engine`]. The server and the CLI hand a device, a path and options to
//! [`load`], read the tokenizer and config they need from the
//! [`DeviceModel`] it returns, and [`DeviceModel::start`] it: no backend
//! type and no `cfg(feature = "cuda")` appears above this module.
//!
//! A GPU is checked before any weights are read ([`check_device`]), so
//! `--device cuda` on a machine without one fails at once with what is
//! missing. The CUDA backend has never run on a GPU, so even where one works
//! it is used only when `KILN_CUDA_UNVERIFIED=1` asks for it (for the first
//! runs that compare it with the CPU backend).

use std::path::Path;

use kiln_backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use kiln_backend::cuda::backend::CudaBackend;
use kiln_backend::cuda::CudaUnavailable;
use kiln_backend::{Backend, Device};
use kiln_model::chat::ChatTemplate;
use kiln_model::config::DecoderConfig;
use kiln_model::tokenizer::Tokenizer;
use kiln_model::{LoadOptions, LoadedModel, ModelError};

use crate::{Engine, EngineConfig, EngineError};

/// Why a model could not be put on its device or started there.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The device cannot be used on this machine or by this build.
    #[error(transparent)]
    Unavailable(#[from] CudaUnavailable),
    /// The device works but kiln cannot run models on it yet.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Backend(#[from] kiln_backend::BackendError),
    /// A [`ModelSource`]'s own failure (the prepared-model cache's, say).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// The environment variable that lets kiln use its unverified CUDA backend.
pub const CUDA_UNVERIFIED_ENV: &str = "KILN_CUDA_UNVERIFIED";

/// A model loaded onto a device, not yet serving.
pub struct DeviceModel {
    device: Device,
    inner: Loaded,
}

/// The loaded model with its backend's type.
enum Loaded {
    Cpu(Box<LoadedModel<CpuBackend>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<(CudaBackend, LoadedModel<CudaBackend>)>),
}

/// Checks that `device` can be used, without loading anything: always for
/// the CPU; for a GPU, that this build has CUDA and the machine has the
/// libraries and the device.
pub fn check_device(device: Device) -> Result<(), LaunchError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => {
            let info = kiln_backend::cuda::probe(n)?;
            // The kernels compile and the device answers, but they have not
            // been checked against the CPU backend on a GPU; serving wrong
            // tokens quickly is worse than refusing, unless asked to.
            if std::env::var(CUDA_UNVERIFIED_ENV).is_ok_and(|v| v == "1") {
                tracing::warn!(
                    "using the unverified CUDA backend on {} ({CUDA_UNVERIFIED_ENV}=1)",
                    info.name
                );
                return Ok(());
            }
            Err(LaunchError::Unsupported(format!(
                "--device cuda:{n}: found {} (sm_{}{}, {} MiB), but kiln's CUDA backend has not \
                 been verified on a GPU and is not used; use --device cpu (or \
                 {CUDA_UNVERIFIED_ENV}=1 to try it, results unchecked)",
                info.name,
                info.compute_capability.0,
                info.compute_capability.1,
                info.total_memory >> 20
            )))
        }
    }
}

/// How a model's weights reach a backend: [`load`] reads them as stored;
/// the server's prepared-model cache converts them once and maps the
/// result after that. Generic over the backend, so that [`load_from`]
/// stays the one place that picks it.
pub trait ModelSource {
    /// Loads the model onto `backend`.
    fn load_onto<B: Backend>(&self, backend: &B) -> Result<LoadedModel<B>, LaunchError>;
}

/// The model at a path, read as stored.
struct AsStored<'a> {
    path: &'a Path,
    opts: &'a LoadOptions,
}

impl ModelSource for AsStored<'_> {
    fn load_onto<B: Backend>(&self, backend: &B) -> Result<LoadedModel<B>, LaunchError> {
        Ok(kiln_model::load(backend, self.path, self.opts)?)
    }
}

/// Loads the model at `path` onto `device` (after [`check_device`]).
pub fn load(device: Device, path: &Path, opts: &LoadOptions) -> Result<DeviceModel, LaunchError> {
    load_from(device, &AsStored { path, opts })
}

/// Loads the model `source` reads onto `device` (after [`check_device`]).
pub fn load_from(device: Device, source: &impl ModelSource) -> Result<DeviceModel, LaunchError> {
    check_device(device)?;
    let inner = match device {
        Device::Cpu => {
            let model = source.load_onto(&CpuBackend::new())?;
            kiln_backend::cpu::release_freed_memory();
            Loaded::Cpu(Box::new(model))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            use kiln_backend::cuda::cache::KernelCache;
            let include = kiln_backend::cuda::nvrtc::find_include_dir()
                .map_err(|e| LaunchError::Unsupported(e.to_string()))?;
            let cache = KernelCache::new(KernelCache::default_dir());
            let backend = CudaBackend::new(n, &cache, &include)?;
            let model = source.load_onto(&backend)?;
            Loaded::Cuda(Box::new((backend, model)))
        }
        // check_device already said so; kept as an error, not a panic.
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => return Err(CudaUnavailable::NotBuilt.into()),
    };
    Ok(DeviceModel { device, inner })
}

/// Bytes one KV-cache element takes on `device` (for sizing reports).
pub fn kv_element_bytes(device: Device) -> usize {
    match device {
        Device::Cpu => CpuBackend::new().kv_element_bytes(),
        // bf16/fp16 keys and values on a GPU.
        Device::Cuda(_) => 2,
    }
}

impl DeviceModel {
    /// The device the model is on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        match &self.inner {
            Loaded::Cpu(m) => &m.tokenizer,
            #[cfg(feature = "cuda")]
            Loaded::Cuda(bm) => &bm.1.tokenizer,
        }
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match &self.inner {
            Loaded::Cpu(m) => m.chat_template.as_ref(),
            #[cfg(feature = "cuda")]
            Loaded::Cuda(bm) => bm.1.chat_template.as_ref(),
        }
    }

    /// The decoder's configuration (architecture, sizes).
    pub fn config(&self) -> &DecoderConfig {
        match &self.inner {
            Loaded::Cpu(m) => m.decoder.config(),
            #[cfg(feature = "cuda")]
            Loaded::Cuda(bm) => bm.1.decoder.config(),
        }
    }

    /// The longest sequence the model was loaded for.
    pub fn max_positions(&self) -> usize {
        match &self.inner {
            Loaded::Cpu(m) => m.decoder.max_positions(),
            #[cfg(feature = "cuda")]
            Loaded::Cuda(bm) => bm.1.decoder.max_positions(),
        }
    }

    /// Starts the engine on the model's device.
    pub fn start(self, cfg: EngineConfig) -> Result<Engine, LaunchError> {
        match self.inner {
            Loaded::Cpu(m) => Ok(Engine::start(CpuBackend::new(), *m, cfg)?),
            #[cfg(feature = "cuda")]
            Loaded::Cuda(bm) => {
                let (backend, model) = *bm;
                Ok(Engine::start(backend, model, cfg)?)
            }
        }
    }

    /// Starts the engine with the model drafting for itself (speculative
    /// decoding's `draft_model` method naming the target), its weights
    /// loaded once and shared with the draft ([`Engine::start_self_draft`]).
    /// On CUDA the draft would need the target's device context; the caller
    /// loads a second copy there instead ([`Self::start_with_draft`]), so
    /// this refuses.
    pub fn start_self_draft(self, cfg: EngineConfig) -> Result<Engine, LaunchError> {
        match self.inner {
            Loaded::Cpu(m) => Ok(Engine::start_self_draft(
                CpuBackend::new(),
                *m,
                cfg,
                CpuBackend::new(),
            )?),
            #[cfg(feature = "cuda")]
            Loaded::Cuda(_) => Err(LaunchError::Unsupported(
                "a model drafting for itself shares its weights on the CPU only".into(),
            )),
        }
    }

    /// Starts the engine with `draft` guessing for it (speculative
    /// decoding's `draft_model` method); both must be on the same device.
    pub fn start_with_draft(
        self,
        cfg: EngineConfig,
        draft: DeviceModel,
    ) -> Result<Engine, LaunchError> {
        match (self.inner, draft.inner) {
            (Loaded::Cpu(m), Loaded::Cpu(d)) => Ok(Engine::start_with_draft(
                CpuBackend::new(),
                *m,
                cfg,
                CpuBackend::new(),
                *d,
            )?),
            #[cfg(feature = "cuda")]
            (Loaded::Cuda(bm), Loaded::Cuda(bd)) => {
                let ((backend, model), (draft_backend, draft)) = (*bm, *bd);
                Ok(Engine::start_with_draft(
                    backend,
                    model,
                    cfg,
                    draft_backend,
                    draft,
                )?)
            }
            #[cfg(feature = "cuda")]
            _ => Err(LaunchError::Unsupported(
                "the draft model must run on the target's device".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU that cannot be used is refused before the model is read: the
    /// path here does not exist, and the error is about the device.
    #[test]
    fn an_unusable_gpu_is_refused_before_loading() {
        let missing = Path::new("/nonexistent/model.gguf");
        let err = match load(Device::Cuda(0), missing, &LoadOptions::default()) {
            Err(e) => e,
            Ok(_) => panic!("loaded a model from a path that does not exist"),
        };
        let msg = err.to_string();
        #[cfg(not(feature = "cuda"))]
        assert!(
            matches!(err, LaunchError::Unavailable(CudaUnavailable::NotBuilt)),
            "{msg}"
        );
        // With the feature: no driver here (named by the backend's probe
        // test), or on a GPU machine a refusal naming the device.
        #[cfg(feature = "cuda")]
        assert!(
            matches!(
                err,
                LaunchError::Unavailable(_) | LaunchError::Unsupported(_)
            ),
            "{msg}"
        );
        assert!(msg.contains("--device cuda"), "{msg}");
        assert!(!msg.contains("nonexistent"), "{msg}");
        // The CPU gets as far as the path.
        let cpu = match load(Device::Cpu, missing, &LoadOptions::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("loaded a model from a path that does not exist"),
        };
        assert!(cpu.contains("nonexistent"), "{cpu}");
    }
}
