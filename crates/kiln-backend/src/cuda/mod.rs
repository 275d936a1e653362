//! The CUDA side of kiln-backend: what can be built, checked and tested
//! without a GPU, and the GPU-facing parts behind the `cuda` feature.
//!
//! **Status: nothing here has run on a GPU yet.** The kernels compile to
//! PTX for sm_80 and sm_90 in CI (`scripts/cuda/ptx_check.sh`); their
//! results have never been compared with the CPU backend's.
//!
//! Always built (host-side, unit-tested on every CI run):
//! - [`kernels`]: the `.cu` sources, embedded in the binary;
//! - [`cache`]: the on-disk cache of compiled kernels and its keys;
//! - [`plan`]: device memory planning (weights, activations, KV blocks);
//! - [`graphs`]: the batch sizes decode steps are captured as CUDA graphs for;
//! - [`block_table`]: packing a step's block tables for the attention kernels;
//! - [`probe`]: whether a GPU can be used, as a clear error when not.
//!
//! With the `cuda` feature (cudarc, loading the driver, NVRTC and cuBLAS at
//! run time, so the build needs no CUDA toolkit):
//! - `nvrtc`: compiling the kernels, cached per (source, arch, NVRTC version);
//! - `modules`: every kernel compiled for a device's architecture and loaded
//!   into its context (never run: it needs a GPU);
//! - `backend`: `CudaBackend`, the op set through cuBLASLt and the kernels
//!   (never run; the launcher does not use it yet).

#[cfg(feature = "cuda")]
pub mod backend;
pub mod block_table;
pub mod cache;
pub mod graphs;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod modules;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod plan;
mod probe;

pub use probe::{probe, CudaDeviceInfo, CudaUnavailable};
