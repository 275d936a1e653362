//! The CPU backend's data: dense f32 tensors in host memory (the paged KV
//! cache is in `kv_cache.rs`). A leaf: the kernels take these, and import
//! nothing back.

use crate::{BackendError, Result};

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl CpuTensor {
    /// Wraps data with a shape, checking that they agree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(BackendError::Shape {
                op: "tensor",
                msg: format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            });
        }
        Ok(Self { shape, data })
    }

    /// Size of the last dimension (features per row).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows (all dimensions but the last).
    pub fn rows(&self) -> usize {
        self.data.len() / self.cols().max(1)
    }
}
