//! Compiling kiln's kernel sources with NVRTC (loaded at run time), and the
//! cached path the backend uses: compile at first use for the device's
//! architecture, keep the result in the [`KernelCache`].

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use super::cache::{Arch, CacheKey, KernelCache, Lookup, Output};
use super::kernels::KernelSource;

/// Why a kernel could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC (libnvrtc.so.13) could not be loaded; install the CUDA 13 NVRTC library or put its directory on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error(
        "no CUDA headers (cuda_bf16.h) found in {searched}; set KILN_CUDA_INCLUDE to the \
         include directory of CUDA 13"
    )]
    NoHeaders { searched: String },
    #[error("kernel {unit} for {arch}: {msg}")]
    Nvrtc {
        unit: String,
        arch: String,
        msg: String,
    },
    /// The compiler rejected the source; `log` is its full message.
    #[error("kernel {unit} for {arch} does not compile:\n{log}")]
    Failed {
        unit: String,
        arch: String,
        log: String,
    },
}

/// Compiled code and whatever NVRTC said while producing it (warnings; empty when clean).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub code: Vec<u8>,
    pub log: String,
}

/// NVRTC's version, checking first that the library loads (cudarc would panic).
pub fn version() -> Result<(u32, u32), CompileError> {
    // SAFETY: only opens and closes the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(CompileError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    rc.result().map_err(|e| CompileError::Nvrtc {
        unit: "-".into(),
        arch: "-".into(),
        msg: format!("nvrtcVersion: {e}"),
    })?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// The include directory holding the CUDA headers the kernels include:
/// `KILN_CUDA_INCLUDE`, else `$CUDA_HOME/include`, else the usual install paths.
pub fn find_include_dir() -> Result<PathBuf, CompileError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["KILN_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(v);
            if var == "KILN_CUDA_INCLUDE" {
                candidates.push(p);
            } else {
                candidates.push(p.join("include"));
            }
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.push("/usr/local/cuda-13.0/include".into());
    candidates
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| CompileError::NoHeaders {
            searched: candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The options every unit is compiled with, apart from include directories
/// (which name where the headers are, not what they say; NVRTC's version
/// stands for the headers' in the cache key).
pub fn options(arch: Arch, output: Output) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", arch.nvrtc_name(output)),
        "-std=c++17".into(),
    ]
}

/// Destroys the program when dropped, whatever path the compile takes.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn bytes_of(chars: Vec<c_char>) -> Vec<u8> {
    let mut b: Vec<u8> = chars.into_iter().map(|c| c as u8).collect();
    while b.last() == Some(&0) {
        b.pop();
    }
    b
}

/// Compiles `unit` for `arch` into `output`. Any NVRTC message on success
/// comes back in [`Compiled::log`]; callers that must be warning-free (the
/// CI check) treat a non-empty log as failure.
pub fn compile(
    unit: &KernelSource,
    arch: Arch,
    output: Output,
    include_dirs: &[&Path],
) -> Result<Compiled, CompileError> {
    version()?;
    let arch_name = arch.nvrtc_name(output);
    let err = |msg: String| CompileError::Nvrtc {
        unit: unit.name.into(),
        arch: arch_name.clone(),
        msg,
    };
    let src = CString::new(unit.source()).map_err(|_| err("source holds a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", unit.name)).map_err(|_| err("bad name".into()))?;
    let prog = Program(result::create_program(&src, Some(&name)).map_err(|e| err(e.to_string()))?);
    let mut opts = options(arch, output);
    for d in include_dirs {
        opts.push(format!("-I{}", d.display()));
    }
    if opts.iter().any(|o| o.contains('\0')) {
        return Err(err("an option holds a NUL byte".into()));
    }
    // SAFETY: `prog` is live; the options hold no NUL (checked above).
    let compiled = unsafe { result::compile_program(prog.0, &opts) };
    // SAFETY: `prog` is live.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|l| String::from_utf8_lossy(&bytes_of(l)).trim().to_string())
        .unwrap_or_default();
    if compiled.is_err() {
        return Err(CompileError::Failed {
            unit: unit.name.into(),
            arch: arch_name,
            log,
        });
    }
    let code = match output {
        // SAFETY: `prog` compiled successfully.
        Output::Ptx => {
            bytes_of(unsafe { result::get_ptx(prog.0) }.map_err(|e| err(e.to_string()))?)
        }
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully for a real architecture;
            // the buffer has the size NVRTC reported.
            unsafe {
                sys::nvrtcGetCUBINSize(prog.0, &mut size)
                    .result()
                    .map_err(|e| err(format!("nvrtcGetCUBINSize: {e}")))?;
                let mut buf = vec![0 as c_char; size];
                sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr())
                    .result()
                    .map_err(|e| err(format!("nvrtcGetCUBIN: {e}")))?;
                buf.into_iter().map(|c| c as u8).collect()
            }
        }
    };
    Ok(Compiled { code, log })
}

/// `unit` compiled for `arch`, from `cache` when it was compiled before with
/// the same source, options and NVRTC; compiled and stored otherwise.
pub fn compile_cached(
    cache: &KernelCache,
    unit: &KernelSource,
    arch: Arch,
    output: Output,
    include_dirs: &[&Path],
) -> Result<(Vec<u8>, Lookup), CompileError> {
    let nvrtc = version()?;
    let key = CacheKey::new(
        unit.name,
        &unit.source(),
        &options(arch, output),
        arch,
        output,
        nvrtc,
    );
    cache.get_or_compile(&key, || {
        let c = compile(unit, arch, output, include_dirs)?;
        if !c.log.is_empty() {
            tracing::warn!(
                "NVRTC, kernel {} for {}: {}",
                unit.name,
                arch.nvrtc_name(output),
                c.log
            );
        }
        Ok(c.code)
    })
}
