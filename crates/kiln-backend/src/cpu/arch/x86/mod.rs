//! The x86-64 kernels: AVX2, AVX-VNNI and AVX512-VNNI vectors, and AMX
//! tiles, each the canonical computation of its family of formats
//! ([`crate::cpu::matmul`]), chosen by [`crate::cpu::isa::chosen`].

pub(crate) mod amx;
pub(crate) mod amx_float;
pub(crate) mod float;
pub(crate) mod int;
pub(crate) mod packed;
pub(crate) mod unpack;
