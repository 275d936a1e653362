//! The CPU kernels by architecture: the portable reference, which defines
//! each product's result, and the vector kernels of each instruction-set
//! family, which compute the same bits faster. A new architecture (say
//! `aarch64`) is a folder beside `x86` and one arm in each dispatcher of
//! [`crate::cpu::matmul`].

pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
