//! The no-GPU check of the CUDA kernels (run by `scripts/cuda/ptx_check.sh`,
//! which provides NVRTC and the CUDA headers): every kernel source compiles
//! to PTX and to machine code for sm_80 and sm_90 without an error or a warning, every entry
//! point is in the PTX, a broken source fails with NVRTC's message, and the
//! compile cache serves a second compile without compiling.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::time::Instant;

use kiln_backend::cuda::cache::{Arch, KernelCache, Lookup, Output};
use kiln_backend::cuda::kernels::{KernelSource, SOURCES};
use kiln_backend::cuda::nvrtc::{self, CompileError};

fn include_dir() -> PathBuf {
    nvrtc::find_include_dir().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs NVRTC and CUDA headers: run scripts/cuda/ptx_check.sh"]
fn every_kernel_compiles_for_sm80_and_sm90_without_warnings() {
    let version = nvrtc::version().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        version.0, 13,
        "NVRTC {version:?}: the check is pinned to CUDA 13.0"
    );
    let inc = include_dir();
    let mut failures = Vec::new();
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for unit in SOURCES {
            let t0 = Instant::now();
            match nvrtc::compile(unit, arch, Output::Ptx, &[inc.as_path()]) {
                Err(e) => failures.push(e.to_string()),
                Ok(c) => {
                    let ptx = String::from_utf8_lossy(&c.code);
                    if !c.log.is_empty() {
                        failures.push(format!(
                            "{} for {}: warnings:\n{}",
                            unit.name,
                            arch.nvrtc_name(Output::Ptx),
                            c.log
                        ));
                    }
                    let target = format!(".target sm_{}{}", arch.major, arch.minor);
                    if !ptx.contains(&target) {
                        failures.push(format!("{}: PTX lacks `{target}`", unit.name));
                    }
                    for entry in unit.entry_points {
                        if !ptx.contains(&format!(".entry {entry}(")) {
                            failures.push(format!(
                                "{} for {}: no entry point {entry}",
                                unit.name,
                                arch.nvrtc_name(Output::Ptx)
                            ));
                        }
                    }
                    println!(
                        "{:>18} {}: {} bytes of PTX, {} entry points, {:.2?}",
                        unit.name,
                        arch.nvrtc_name(Output::Ptx),
                        c.code.len(),
                        unit.entry_points.len(),
                        t0.elapsed()
                    );
                }
            }
        }
    }
    // Machine code too: ptxas (inside NVRTC) checks registers and shared
    // memory per kernel, which PTX alone does not.
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for unit in SOURCES {
            match nvrtc::compile(unit, arch, Output::Cubin, &[inc.as_path()]) {
                Err(e) => failures.push(e.to_string()),
                Ok(c) if !c.log.is_empty() => failures.push(format!(
                    "{} for {}: warnings:\n{}",
                    unit.name,
                    arch.nvrtc_name(Output::Cubin),
                    c.log
                )),
                Ok(c) if !c.code.starts_with(b"\x7fELF") => failures.push(format!(
                    "{} for {}: not an ELF image",
                    unit.name,
                    arch.nvrtc_name(Output::Cubin)
                )),
                Ok(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
#[ignore = "needs NVRTC and CUDA headers: run scripts/cuda/ptx_check.sh"]
fn a_broken_kernel_fails_with_the_compilers_message() {
    let inc = include_dir();
    let broken = KernelSource::new(
        "broken",
        "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n",
        &["broken"],
    );
    match nvrtc::compile(&broken, Arch::new(9, 0), Output::Ptx, &[inc.as_path()]) {
        Err(CompileError::Failed { log, .. }) => {
            assert!(log.contains("undefined_name"), "{log}")
        }
        other => panic!("expected a compile failure, got {other:?}"),
    }
    // A warning (an unused variable) compiles but leaves a log, which the
    // check above counts as a failure.
    let warns = KernelSource::new(
        "warns",
        "extern \"C\" __global__ void warns(float* x) { int unused = 3; x[0] = 1.0f; }\n",
        &["warns"],
    );
    let c = nvrtc::compile(&warns, Arch::new(9, 0), Output::Ptx, &[inc.as_path()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.log.contains("unused"), "log: {:?}", c.log);
}

#[test]
#[ignore = "needs NVRTC and CUDA headers: run scripts/cuda/ptx_check.sh"]
fn the_cache_compiles_once_for_the_device_arch() {
    let inc = include_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = KernelCache::new(dir.path());
    let unit = SOURCES.iter().find(|s| s.name == "rope").expect("rope");
    let arch = Arch::new(9, 0);
    let (first, how) = nvrtc::compile_cached(&cache, unit, arch, Output::Cubin, &[inc.as_path()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(how, Lookup::Compiled);
    // A cubin is an ELF image.
    assert_eq!(&first[..4], b"\x7fELF");
    let t0 = Instant::now();
    let (second, how) = nvrtc::compile_cached(&cache, unit, arch, Output::Cubin, &[inc.as_path()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(how, Lookup::Hit);
    assert_eq!(first, second);
    println!("cached rope cubin served in {:.2?}", t0.elapsed());
}
