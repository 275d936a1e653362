//! Every kernel, compiled for one device (through the [`KernelCache`]) and
//! loaded into its context, with its entry points looked up by name: what a
//! CUDA backend holds to launch kernels. Never run yet: it needs a GPU.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::cache::{Arch, KernelCache, Lookup, Output};
use super::kernels::SOURCES;
use super::nvrtc::{self, CompileError};

/// Why the kernels could not be made ready on a device.
#[derive(Debug, thiserror::Error)]
pub enum KernelLoadError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("loading kernel {unit} on the device: {msg}")]
    Load { unit: &'static str, msg: String },
}

/// How the kernels were obtained at this start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Units compiled by NVRTC now.
    pub compiled: usize,
    /// Units taken from the cache.
    pub cached: usize,
    pub elapsed: Duration,
}

/// The loaded kernels of one device.
pub struct KernelSet {
    /// Kept so the functions' module outlives every launch.
    _modules: Vec<Arc<CudaModule>>,
    functions: HashMap<&'static str, CudaFunction>,
}

impl KernelSet {
    /// Compiles (or takes from `cache`) every unit as machine code for the
    /// context's device and loads it, looking up every entry point.
    pub fn load(
        ctx: &Arc<CudaContext>,
        cache: &KernelCache,
        include_dir: &Path,
    ) -> Result<(Self, LoadReport), KernelLoadError> {
        let t0 = Instant::now();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| KernelLoadError::Load {
                unit: "-",
                msg: e.to_string(),
            })?;
        let arch = Arch::new(major.max(0) as u32, minor.max(0) as u32);
        let mut report = LoadReport::default();
        let mut modules = Vec::new();
        let mut functions = HashMap::new();
        for unit in SOURCES {
            let (cubin, how) =
                nvrtc::compile_cached(cache, unit, arch, Output::Cubin, &[include_dir])?;
            match how {
                Lookup::Hit => report.cached += 1,
                Lookup::Compiled | Lookup::Replaced => report.compiled += 1,
            }
            let err = |e: cudarc::driver::DriverError| KernelLoadError::Load {
                unit: unit.name,
                msg: e.to_string(),
            };
            let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(err)?;
            for &entry in unit.entry_points {
                functions.insert(entry, module.load_function(entry).map_err(err)?);
            }
            modules.push(module);
        }
        report.elapsed = t0.elapsed();
        tracing::info!(
            "CUDA kernels for sm_{}{}: {} compiled, {} from the cache, in {:.2?}",
            arch.major,
            arch.minor,
            report.compiled,
            report.cached,
            report.elapsed
        );
        Ok((
            Self {
                _modules: modules,
                functions,
            },
            report,
        ))
    }

    /// The kernel named `name` (an entry point of [`SOURCES`]).
    pub fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.functions.get(name)
    }
}
