//! The CPU backend: f32 tensors in host memory, parallel over cores with rayon.
//!
//! It is the reference implementation: straightforward loops whose results
//! other backends are compared against, with the hot spots (matrix products
//! and attention) made fast enough to serve small models.

mod actq;
mod arch;
mod attention;
mod blocks;
mod float_packed;
pub(crate) mod isa;
mod kv_cache;
mod kv_elem;
mod logits;
pub(crate) mod math;
mod matmul;
mod moe;
mod ops;
mod packed;
mod tensor;
mod weight;

pub use kv_cache::CpuKvCache;
pub use logits::{logit_stats, LogitStats};
pub use tensor::CpuTensor;
pub use weight::CpuWeight;

/// How far ahead of the chunk being computed its weights are fetched
/// into the core's L2 cache, in bytes. A group's chunks lie one after
/// another and the groups of a band too, so a kernel streams its weights
/// in order; the hardware prefetchers alone, which restart at each 4 KiB
/// page, left a one-row product (decode) at 50-65% of the read bandwidth
/// for 4-bit codes, whose decoding keeps fewer loads in flight than
/// Q8_0's. Fetching 4 KiB ahead into L1 brought Q4_0, Q4_K, Q6_K and Q8_0
/// to 28-32 GB/s on two threads of the Xeon build machine; 16 KiB ahead
/// into L2 was as fast or up to 10% faster in alternating runs
/// (`linear_bench` with `KILN_BENCH_SHAPES=262144x4096`), and 2 KiB slower.
/// Public, as is [`PREFETCH_NEAR_BYTES`], so that `kiln bench --bandwidth`
/// probes memory at the kernels' own distances.
pub const PREFETCH_FAR_BYTES: usize = 16384;

/// How far ahead the same lines are asked for again, into L1, once the
/// far request has had time to bring them into L2. With the far request
/// alone a demand load still waited for the L2-to-L1 transfer, and one
/// core's K-quant kernels read 14-15 GB/s from memory where the probe
/// reads 17-19; with both, `kiln bench` decoded a Llama-3.2-1B-shaped
/// Q4_K_M 7-10% faster on 1 and 2 threads (19.4-20.5 to 20.8-22.3 and
/// 37.6-39.5 to 39.7-42.4 tokens/s, alternating runs). 2-6 KiB and
/// 8-32 KiB for the far one measured the same; the near one alone, with
/// no far one, was 10% slower than the far one alone.
pub const PREFETCH_NEAR_BYTES: usize = 4096;

/// [`crate::Backend::feed_forward_rows`] on the CPU.
pub const FEED_FORWARD_ROWS: usize = 256;

/// The number of physical cores this process may run on: the CPUs in its
/// affinity mask divided by the hardware threads per core (two-way SMT
/// siblings share one core's execution units, so a second thread on a core
/// mostly waits). What `--threads` defaults to.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    // "0-1", "0,2" or "3": the hardware threads of cpu0's core.
    let siblings =
        std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
            .ok()
            .map(|s| count_cpus(s.trim()))
            .filter(|&n| n >= 1)
            .unwrap_or(1);
    (logical / siblings).max(1)
}

/// How many CPUs a Linux CPU list (`0-3,8,10-11`) names; 0 if malformed.
fn count_cpus(list: &str) -> usize {
    let mut n = 0;
    for part in list.split(',') {
        let r: Vec<&str> = part.split('-').collect();
        let parse = |s: &str| s.trim().parse::<usize>().ok();
        match r.as_slice() {
            [a] if parse(a).is_some() => n += 1,
            [a, b] => match (parse(a), parse(b)) {
                (Some(a), Some(b)) if b >= a => n += b - a + 1,
                _ => return 0,
            },
            _ => return 0,
        }
    }
    n
}

/// The number of threads the CPU backend computes with.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Sizes the CPU backend's thread pool (rayon's global pool): `threads`,
/// else `RAYON_NUM_THREADS`, else [`physical_cores`]. Call it once, before
/// any model work; the error says why the pool could not be set (for
/// instance, it was already running).
pub fn init_threads(threads: Option<usize>) -> std::result::Result<usize, String> {
    let n = match threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) if n >= 1 => n,
            _ => physical_cores(),
        },
    };
    keep_freed_memory();
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("kiln-cpu-{i}"))
        .build_global()
        .map_err(|e| format!("cannot start {n} CPU threads: {e}"))?;
    Ok(n)
}

/// Tells glibc's allocator to keep freed memory for reuse: buffers up to
/// 32 MiB come from the heap rather than fresh mappings, and the heap is
/// not trimmed as they are freed.
///
/// A forward pass allocates and frees the same few activation buffers
/// (megabytes each over a prompt) for every layer. By default glibc maps
/// each afresh and unmaps it on free, so every use pays page faults and the
/// kernel's zeroing of every page: 6-8% of a 512-token prompt's CPU time in
/// a profile of the F16 model, and prompt throughput 10-15% higher without
/// it (the same binary, `GLIBC_TUNABLES` setting the same thresholds).
/// Memory kept this way is what the process already peaked at.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before the worker threads start allocating.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        };
        if !ok {
            tracing::debug!("the allocator kept its default thresholds");
        }
    }
}

/// Hands the memory freed so far back to the system: `malloc_trim` on
/// every allocator arena. [`keep_freed_memory`] keeps what a forward pass
/// frees, so that the next pass reuses it; what a model load frees (the
/// tokenizer's build, per-matrix conversion buffers) is not reused, yet
/// it stayed resident for the process's life: 40-75 MB of a 3B model's
/// heap. Call it once a model is loaded.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's own
    // arenas to the system; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

use crate::{
    Activation, AttentionParams, Backend, BackendError, GgmlType, HostBytes, KvDtype, KvSpec,
    Result, RopeLayout, StepInput, WeightData,
};

/// The CPU backend. Threads come from rayon's global pool.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    /// [`Backend::feed_forward_rows`]; 0: all rows at once.
    feed_forward_rows: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// Makes a CPU backend.
    pub fn new() -> Self {
        Self {
            feed_forward_rows: FEED_FORWARD_ROWS,
        }
    }

    /// The same backend computing a dense feed-forward `rows` rows at a
    /// time (0: all of a step's rows at once), for the tests that check
    /// the pieces change no bit of the result.
    pub fn with_feed_forward_rows(self, rows: usize) -> Self {
        Self {
            feed_forward_rows: rows,
        }
    }
}

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Step = StepInput;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // `scope` moves the closure onto a pool worker when called from outside the pool.
        rayon::scope(|_| f())
    }

    fn upload(&self, shape: &[usize], data: Vec<f32>) -> Result<CpuTensor> {
        CpuTensor::new(shape.to_vec(), data)
    }

    fn upload_weight(&self, rows: usize, cols: usize, data: WeightData) -> Result<CpuWeight> {
        CpuWeight::new(rows, cols, data)
    }

    fn upload_table(&self, rows: usize, cols: usize, data: WeightData) -> Result<CpuWeight> {
        CpuWeight::table(rows, cols, data)
    }

    fn weight_layout(&self) -> Option<&'static str> {
        // Without the repack, block weights keep the file's rows: nothing
        // worth storing.
        weight::repack_enabled().then_some(weight::LAYOUT)
    }

    fn laid_out(&self, w: &CpuWeight) -> Option<(GgmlType, HostBytes)> {
        w.laid_out()
    }

    fn upload_laid_out(
        &self,
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: HostBytes,
    ) -> Result<CpuWeight> {
        CpuWeight::from_laid_out(rows, cols, ty, bytes)
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape(&self, t: &CpuTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        CpuTensor::new(shape.to_vec(), t.data)
    }

    fn prepare_step(&self, input: &StepInput) -> Result<StepInput> {
        Ok(input.clone())
    }

    fn kv_element_bytes(&self) -> usize {
        // f16, the default KvDtype on the CPU.
        2
    }

    fn alloc_kv_cache(&self, spec: &KvSpec) -> Result<CpuKvCache> {
        CpuKvCache::alloc(spec, KvDtype::Auto)
    }

    fn alloc_kv_cache_as(&self, spec: &KvSpec, dtype: KvDtype) -> Result<CpuKvCache> {
        CpuKvCache::alloc(spec, dtype)
    }

    fn kv_token_bytes(&self, spec: &KvSpec, dtype: KvDtype) -> usize {
        dtype.bytes_per_token(spec)
    }

    fn embedding(&self, table: &CpuWeight, step: &StepInput) -> Result<CpuTensor> {
        ops::embedding(table, &step.tokens)
    }

    fn add_position_embedding(
        &self,
        x: &mut CpuTensor,
        table: &CpuTensor,
        offset: usize,
        step: &StepInput,
    ) -> Result<()> {
        ops::add_position_embedding(x, table, offset, &step.positions)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        matmul::linear(x, w, bias)
    }

    fn linear_many(
        &self,
        x: &CpuTensor,
        ws: &[(&CpuWeight, Option<&CpuTensor>)],
    ) -> Result<Vec<CpuTensor>> {
        matmul::linear_many(x, ws)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        ops::rms_norm(x, w, eps)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        ops::layer_norm(x, w, b, eps)
    }

    fn scale_inplace(&self, x: &mut CpuTensor, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        if x.shape != y.shape {
            return Err(shape_err("add", format!("{:?} + {:?}", x.shape, y.shape)));
        }
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn rope_inplace(
        &self,
        x: &mut CpuTensor,
        cos_sin: &CpuTensor,
        step: &StepInput,
        n_heads: usize,
        head_dim: usize,
        rot_dim: usize,
        layout: RopeLayout,
    ) -> Result<()> {
        ops::rope(
            x,
            cos_sin,
            &step.positions,
            n_heads,
            head_dim,
            rot_dim,
            layout,
        )
    }

    fn gated_activation(
        &self,
        gate: &CpuTensor,
        up: &CpuTensor,
        act: Activation,
    ) -> Result<CpuTensor> {
        ops::gated_activation(gate, up.clone(), act)
    }

    fn feed_forward_rows(&self) -> Option<usize> {
        // A 512-token prompt step of a Llama-3.2-1B shape held two 16 MB
        // intermediates (up, gate) at its peak; in pieces of 256 rows,
        // 8 MB each, for one more pass over the feed-forward's weights per
        // 256 rows (about 2% of that prompt's time at 1B, less above).
        (self.feed_forward_rows > 0).then_some(self.feed_forward_rows)
    }

    fn gated_activation_into(
        &self,
        gate: &CpuTensor,
        up: CpuTensor,
        act: Activation,
    ) -> Result<CpuTensor> {
        ops::gated_activation(gate, up, act)
    }

    fn activation_inplace(&self, x: &mut CpuTensor, act: Activation) -> Result<()> {
        if let Activation::ClampedSwiglu { .. } = act {
            return Err(BackendError::Invalid {
                op: "activation",
                msg: "the clamped SwiGLU needs its up projection: use gated_activation".into(),
            });
        }
        ops::activation_inplace(x, act);
        Ok(())
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        step: &StepInput,
    ) -> Result<()> {
        attention::write_kv(cache, layer, k, v, &step.slots)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        step: &StepInput,
        params: &AttentionParams,
    ) -> Result<CpuTensor> {
        attention::paged_attention(q, cache, layer, step, params)
    }

    fn select_logit_rows(&self, x: &CpuTensor, step: &StepInput) -> Result<CpuTensor> {
        let cols = x.cols();
        let mut data = Vec::with_capacity(step.logit_rows.len() * cols);
        for &r in &step.logit_rows {
            let r = r as usize;
            if r >= x.rows() {
                return Err(shape_err(
                    "select_logit_rows",
                    format!("row {r} of {}", x.rows()),
                ));
            }
            data.extend_from_slice(&x.data[r * cols..(r + 1) * cols]);
        }
        CpuTensor::new(vec![step.logit_rows.len(), cols], data)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor> {
        let cols = x.cols();
        CpuTensor::new(
            vec![rows.len(), cols],
            crate::rows::gather_rows(&x.data, cols, rows)?,
        )
    }

    fn add_rows_scaled(
        &self,
        out: &mut CpuTensor,
        y: &CpuTensor,
        rows: &[u32],
        scales: &[f32],
    ) -> Result<()> {
        if y.cols() != out.cols() {
            return Err(shape_err(
                "add_rows_scaled",
                format!("{:?} into {:?}", y.shape, out.shape),
            ));
        }
        let cols = out.cols();
        crate::rows::add_rows_scaled(&mut out.data, cols, &y.data, rows, scales)
    }

    fn moe_experts(
        &self,
        x: &CpuTensor,
        experts: &[crate::MoeExpert<'_, CpuWeight, CpuTensor>],
        act: Activation,
    ) -> Result<CpuTensor> {
        moe::moe_experts(x, experts, act)
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod thread_tests {
    use super::count_cpus;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpus("0"), 1);
        assert_eq!(count_cpus("0-1"), 2);
        assert_eq!(count_cpus("0,4"), 2);
        assert_eq!(count_cpus("0-3,8,10-11"), 7);
        assert_eq!(count_cpus("3-1"), 0);
        assert_eq!(count_cpus("x"), 0);
        assert!(super::physical_cores() >= 1);
    }
}
