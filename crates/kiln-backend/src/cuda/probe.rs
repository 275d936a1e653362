//! Finding out, before anything touches a GPU, whether one can be used: the
//! libraries kiln loads at run time (driver, NVRTC, cuBLAS, cuBLASLt), then
//! the driver's view of the device. cudarc panics at the first call into a
//! library it cannot load, so every path to the GPU starts here and turns
//! each missing piece into an error that names it.

/// What kiln found out about a usable GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// The device ordinal (`cuda:N`).
    pub ordinal: usize,
    /// The driver's name for it ("NVIDIA H200").
    pub name: String,
    /// Compute capability, major and minor (9, 0 for sm_90).
    pub compute_capability: (u32, u32),
    /// Device memory in bytes.
    pub total_memory: u64,
}

/// Why the GPU cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    /// The binary has no CUDA code at all.
    #[error(
        "--device cuda: this kiln was built without the cuda feature; rebuild it with \
         `cargo build --release --features cuda`"
    )]
    NotBuilt,
    /// Shared libraries the CUDA backend loads at run time are not there.
    #[error(
        "--device cuda: cannot use the GPU: {} not found; install the NVIDIA driver and \
         the CUDA 13 libraries, or put their directory on LD_LIBRARY_PATH",
        .0.join(", ")
    )]
    MissingLibraries(Vec<String>),
    /// The driver is there but refused (no GPU, driver too old, …).
    #[error("--device cuda: the CUDA driver failed: {0}")]
    Driver(String),
    /// Fewer GPUs than the ordinal asked for.
    #[error("--device cuda:{ordinal}: this machine has {count} CUDA device(s)")]
    NoSuchDevice { ordinal: usize, count: usize },
}

/// The libraries the CUDA backend needs, as `(what, file)` for messages,
/// each with its presence check.
#[cfg(feature = "cuda")]
fn libraries() -> [(&'static str, bool); 4] {
    // SAFETY: each check only tries to open the library by its candidate
    // names (dlopen) and closes it again; no CUDA function is called.
    unsafe {
        [
            (
                "libcuda.so (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "libnvrtc.so.13 (NVRTC, the kernel compiler)",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
            (
                "libcublas.so.13 (cuBLAS)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "libcublasLt.so.13 (cuBLASLt)",
                cudarc::cublaslt::sys::is_culib_present(),
            ),
        ]
    }
}

/// Checks that `cuda:ordinal` can be used and describes it.
#[cfg(not(feature = "cuda"))]
pub fn probe(_ordinal: usize) -> Result<CudaDeviceInfo, CudaUnavailable> {
    Err(CudaUnavailable::NotBuilt)
}

/// Checks that `cuda:ordinal` can be used and describes it: first that every
/// library loads (all missing ones are named at once), then the driver's
/// device count and the device's properties.
#[cfg(feature = "cuda")]
pub fn probe(ordinal: usize) -> Result<CudaDeviceInfo, CudaUnavailable> {
    use cudarc::driver::result as drv;
    use cudarc::driver::sys::CUdevice_attribute as Attr;

    let missing: Vec<String> = libraries()
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(what, _)| what.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CudaUnavailable::MissingLibraries(missing));
    }
    let driver = |e: cudarc::driver::DriverError| CudaUnavailable::Driver(e.to_string());
    drv::init().map_err(driver)?;
    let count = drv::device::get_count().map_err(driver)?.max(0) as usize;
    if ordinal >= count {
        return Err(CudaUnavailable::NoSuchDevice { ordinal, count });
    }
    let dev = drv::device::get(ordinal as i32).map_err(driver)?;
    let name = drv::device::get_name(dev).map_err(driver)?;
    // SAFETY: `dev` came from cuDeviceGet for an ordinal below the count.
    let (major, minor, total) = unsafe {
        (
            drv::device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .map_err(driver)?,
            drv::device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .map_err(driver)?,
            drv::device::total_mem(dev).map_err(driver)?,
        )
    };
    Ok(CudaDeviceInfo {
        ordinal,
        name,
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        total_memory: total as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the feature, asking for a GPU says how to get one.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_the_error_says_how_to_build_it() {
        let err = probe(0).expect_err("no cuda feature");
        assert_eq!(err, CudaUnavailable::NotBuilt);
        let msg = err.to_string();
        assert!(msg.contains("built without the cuda feature"), "{msg}");
        assert!(msg.contains("--features cuda"), "{msg}");
    }

    /// With the feature but no driver (this build machine, CI), the error
    /// names the driver library instead of panicking inside cudarc. On a
    /// machine with a GPU the probe succeeds and describes it.
    #[cfg(feature = "cuda")]
    #[test]
    fn with_the_feature_a_missing_driver_is_named_not_a_panic() {
        // SAFETY: only opens and closes the library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match probe(0) {
            Err(CudaUnavailable::MissingLibraries(missing)) => {
                assert!(!driver_present || missing.iter().all(|m| !m.contains("libcuda")));
                let msg = CudaUnavailable::MissingLibraries(missing.clone()).to_string();
                if !driver_present {
                    assert!(msg.contains("libcuda.so (the NVIDIA driver)"), "{msg}");
                }
                assert!(msg.contains("LD_LIBRARY_PATH"), "{msg}");
            }
            Err(other) => assert!(driver_present, "no driver, yet: {other}"),
            Ok(info) => {
                assert!(driver_present);
                assert!(info.compute_capability.0 >= 5, "{info:?}");
            }
        }
    }
}
