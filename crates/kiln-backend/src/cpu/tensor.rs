//! The CPU backend's data: dense f32 tensors and the paged KV cache, in
//! host memory. A leaf: the kernels take these, and import nothing back.

use crate::{BackendError, KvSpec, Result};

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

/// The paged KV cache in host memory: per layer, keys and values as
/// `[slots, n_kv_heads * head_dim]`, the layers of each one after another
/// in one allocation (see [`zeroed_vec`]).
pub struct CpuKvCache {
    pub(super) spec: KvSpec,
    /// Elements per layer.
    per_layer: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKvCache {
    /// A zeroed cache of `spec`'s geometry, its pages mapped as they are
    /// first written (see [`zeroed_vec`]).
    pub(crate) fn alloc(spec: &KvSpec) -> Result<CpuKvCache> {
        let per_layer = spec
            .slots()
            .checked_mul(spec.n_kv_heads * spec.head_dim)
            .ok_or_else(|| BackendError::OutOfMemory(format!("KV cache {spec:?} overflows")))?;
        let total = per_layer
            .checked_mul(spec.n_layers)
            .ok_or_else(|| BackendError::OutOfMemory(format!("KV cache {spec:?} overflows")))?;
        let alloc = || -> Result<Vec<f32>> {
            zeroed_vec(total).ok_or_else(|| {
                BackendError::OutOfMemory(format!(
                    "cannot allocate {} MiB for the KV cache",
                    (spec.slots() * spec.bytes_per_token(4)) >> 20
                ))
            })
        };
        Ok(CpuKvCache {
            spec: *spec,
            per_layer,
            k: alloc()?,
            v: alloc()?,
        })
    }

    /// The geometry the cache was made with.
    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// Layer `layer`'s keys and values.
    pub(super) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let r = layer * self.per_layer..(layer + 1) * self.per_layer;
        (&self.k[r.clone()], &self.v[r])
    }

    /// Layer `layer`'s keys and values, to write.
    pub(super) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let r = layer * self.per_layer..(layer + 1) * self.per_layer;
        (&mut self.k[r.clone()], &mut self.v[r])
    }
}

/// `n` zeros, from zeroed pages the OS maps lazily (so a large KV cache costs
/// nothing at start), or `None` when the allocation fails.
///
/// Lazily only above glibc's mapping threshold, which
/// `keep_freed_memory` (in the backend's module) raises to 32 MiB: a smaller block comes from the
/// heap and is cleared page by page at once. That is why the KV cache is
/// one allocation for keys and one for values rather than one per layer
/// (a 1 GiB cache's 17 MiB layers were cleared at every start: 0.1-0.5 s
/// of page faults before the server was ready).
fn zeroed_vec(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: the layout has a non-zero size; a non-null result is a zeroed
    // allocation of exactly `n` f32s with the global allocator's layout for
    // Vec<f32> of capacity n, and all-zero bits are a valid f32 (0.0).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}
