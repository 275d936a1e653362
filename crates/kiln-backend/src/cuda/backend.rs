//! `CudaBackend`: the [`Backend`] op set on an NVIDIA GPU, in bf16 with
//! fp32 accumulation: matrix products through cuBLASLt, everything else
//! through kiln's kernels ([`super::kernels`]).
//!
//! **Never run.** This code compiles and passes clippy; it has not executed
//! on a GPU and no result of it has been compared with the CPU backend.
//! kiln's launcher does not hand models to it until that comparison exists
//! (`scripts/gpu/check.sh`, to be written with a GPU at hand).
//!
//! Weights of any stored format are dequantized on the host and uploaded
//! as bf16; activations and the KV cache are bf16 (cache layout in
//! `kernels/kv_cache.cu`). Each step's metadata is packed once
//! ([`super::block_table`]) and copied to the device in `prepare_step`.

use std::path::Path;
use std::sync::Arc;

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;

use super::block_table::{decode_splits, pack, PackedStep};
use super::cache::KernelCache;
use super::kernels::{ATTENTION_THREADS, MAX_HEAD_DIM, PREFILL_CHUNK};
use super::modules::KernelSet;
use crate::{
    Activation, AttentionParams, Backend, BackendError, KvSpec, Result, RopeLayout, StepInput,
    WeightData,
};

/// Keys per split of the decode kernel.
const DECODE_PARTITION: usize = 512;
/// Threads per block of the row-wise kernels (norms, embedding, rope).
const ROW_THREADS: u32 = 256;

/// A tensor in device memory (bf16, row-major).
pub struct CudaTensor {
    shape: Vec<usize>,
    data: CudaSlice<bf16>,
}

/// A weight matrix `[rows, cols]` in device memory (bf16).
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    data: CudaSlice<bf16>,
}

/// Keys and values of every layer (see `kernels/kv_cache.cu` for the layout).
pub struct CudaKvCache {
    spec: KvSpec,
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
}

/// A step's metadata on the device.
pub struct CudaStep {
    host: StepInput,
    packed: PackedStep,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    logit_rows: CudaSlice<u32>,
    block_tables: CudaSlice<i32>,
    context_lens: CudaSlice<i32>,
    query_starts: CudaSlice<i32>,
    query_lens: CudaSlice<i32>,
    token_seqs: CudaSlice<i32>,
}

/// The CUDA backend of one device.
pub struct CudaBackend {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    kernels: KernelSet,
    /// Thread blocks that fill the device (4 per multiprocessor), for split decode.
    target_blocks: usize,
    /// The KV geometry of the cache allocated last (for packing steps).
    kv_spec: std::sync::Mutex<Option<KvSpec>>,
}

fn dev_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackendError {
    move |e| BackendError::Invalid {
        op,
        msg: format!("CUDA: {e}"),
    }
}

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

fn to_i32(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| BackendError::Invalid {
        op,
        msg: format!("{v} does not fit a 32-bit kernel argument"),
    })
}

/// A grid's x extent: at least one block (x may reach 2^31 - 1; kiln's
/// counts of rows and elements stay far below it).
fn grid(n: usize) -> u32 {
    n.clamp(1, i32::MAX as usize) as u32
}

/// A grid's y extent, which CUDA caps at 65535.
fn grid_y(op: &'static str, n: usize) -> Result<u32> {
    if n > 65_535 {
        return Err(BackendError::Invalid {
            op,
            msg: format!("{n} rows exceed a launch's 65535; lower the step's token budget"),
        });
    }
    Ok(n.max(1) as u32)
}

impl CudaBackend {
    /// Opens `cuda:ordinal`, compiling or loading every kernel for its
    /// architecture. The device is probed first (cudarc panics on a
    /// library it cannot load; the probe turns that into this error).
    pub fn new(ordinal: usize, cache: &KernelCache, include_dir: &Path) -> Result<Self> {
        super::probe(ordinal).map_err(|e| BackendError::Invalid {
            op: "open",
            msg: e.to_string(),
        })?;
        let ctx = CudaContext::new(ordinal).map_err(dev_err("open"))?;
        let stream = ctx.default_stream();
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| BackendError::Invalid {
            op: "open",
            msg: format!("cuBLASLt: {e}"),
        })?;
        let (kernels, _) =
            KernelSet::load(&ctx, cache, include_dir).map_err(|e| BackendError::Invalid {
                op: "open",
                msg: e.to_string(),
            })?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev_err("open"))?;
        Ok(Self {
            ordinal,
            stream,
            blas,
            kernels,
            target_blocks: 4 * sms.max(1) as usize,
            kv_spec: std::sync::Mutex::new(None),
        })
    }

    fn func(&self, name: &str) -> Result<&cudarc::driver::CudaFunction> {
        self.kernels
            .function(name)
            .ok_or_else(|| BackendError::Invalid {
                op: "kernel",
                msg: format!("no kernel {name}"),
            })
    }

    fn alloc(&self, op: &'static str, n: usize) -> Result<CudaSlice<bf16>> {
        self.stream
            .alloc_zeros::<bf16>(n.max(1))
            .map_err(|e| BackendError::OutOfMemory(format!("{op}: {n} elements: {e}")))
    }

    /// Copies `v` to the device; an empty array becomes one zero element
    /// (kernels are never told to read it: their counts are zero).
    fn copy_in<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<T>(1).map_err(dev_err("upload"));
        }
        self.stream.clone_htod(v).map_err(dev_err("upload"))
    }

    fn tensor(&self, shape: Vec<usize>, data: CudaSlice<bf16>) -> CudaTensor {
        CudaTensor { shape, data }
    }

    /// Launches an element-wise kernel over `n` elements.
    fn elementwise_cfg(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid(n.div_ceil(256)).min(1 << 16), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn rows_cfg(rows: usize, shared: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid(rows), 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: shared,
        }
    }
}

fn cols(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1)
}

fn rows(shape: &[usize]) -> usize {
    shape.iter().product::<usize>() / cols(shape).max(1)
}

fn launch(
    r: std::result::Result<
        Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
        cudarc::driver::DriverError,
    >,
    op: &'static str,
) -> Result<()> {
    r.map(|_| ()).map_err(dev_err(op))
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Step = CudaStep;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn upload(&self, shape: &[usize], data: Vec<f32>) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(shape_err(
                "upload",
                format!("{shape:?} for {} values", data.len()),
            ));
        }
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(self.tensor(shape.to_vec(), self.copy_in(&host)?))
    }

    fn upload_weight(&self, rows: usize, cols: usize, data: WeightData) -> Result<CudaWeight> {
        let n = rows * cols;
        let values = match data {
            WeightData::F32(v) => v,
            WeightData::Ggml { ty, bytes } => {
                crate::quant::dequantize(ty, &bytes, n).map_err(|msg| BackendError::Invalid {
                    op: "upload_weight",
                    msg,
                })?
            }
        };
        if values.len() != n {
            return Err(shape_err(
                "upload_weight",
                format!("{rows}x{cols} for {} values", values.len()),
            ));
        }
        let host: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(CudaWeight {
            rows,
            cols,
            data: self.copy_in(&host)?,
        })
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let host: Vec<bf16> = self
            .stream
            .clone_dtoh(&t.data)
            .map_err(dev_err("to_host"))?;
        let n = t.shape.iter().product::<usize>();
        Ok(host.iter().take(n).map(|v| v.to_f32()).collect())
    }

    fn shape(&self, t: &CudaTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn reshape(&self, t: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != t.shape.iter().product::<usize>() {
            return Err(shape_err("reshape", format!("{:?} as {shape:?}", t.shape)));
        }
        Ok(self.tensor(shape.to_vec(), t.data))
    }

    fn prepare_step(&self, input: &StepInput) -> Result<CudaStep> {
        let spec = self
            .kv_spec
            .lock()
            .map_err(|_| BackendError::Invalid {
                op: "step",
                msg: "poisoned".into(),
            })?
            .ok_or_else(|| BackendError::Invalid {
                op: "step",
                msg: "no KV cache allocated".into(),
            })?;
        let packed = pack(input, &spec, None, None)?;
        let logit_rows = if input.logit_rows.is_empty() {
            vec![0]
        } else {
            input.logit_rows.clone()
        };
        Ok(CudaStep {
            tokens: self.copy_in(&input.tokens)?,
            positions: self.copy_in(&input.positions)?,
            slots: self.copy_in(&input.slots)?,
            logit_rows: self.copy_in(&logit_rows)?,
            block_tables: self.copy_in(&packed.block_tables)?,
            context_lens: self.copy_in(&packed.context_lens)?,
            query_starts: self.copy_in(&packed.query_starts)?,
            query_lens: self.copy_in(&packed.query_lens)?,
            token_seqs: self.copy_in(&packed.token_seqs)?,
            host: input.clone(),
            packed,
        })
    }

    fn kv_element_bytes(&self) -> usize {
        2
    }

    fn alloc_kv_cache(&self, spec: &KvSpec) -> Result<CudaKvCache> {
        if spec.head_dim > MAX_HEAD_DIM {
            return Err(shape_err(
                "kv_cache",
                format!("head dim {} above {MAX_HEAD_DIM}", spec.head_dim),
            ));
        }
        let per_layer = spec
            .slots()
            .checked_mul(spec.n_kv_heads * spec.head_dim)
            .ok_or_else(|| BackendError::OutOfMemory(format!("KV cache {spec:?} overflows")))?;
        let mut k = Vec::with_capacity(spec.n_layers);
        let mut v = Vec::with_capacity(spec.n_layers);
        for _ in 0..spec.n_layers {
            k.push(self.alloc("kv_cache", per_layer)?);
            v.push(self.alloc("kv_cache", per_layer)?);
        }
        *self.kv_spec.lock().map_err(|_| BackendError::Invalid {
            op: "kv_cache",
            msg: "poisoned".into(),
        })? = Some(*spec);
        Ok(CudaKvCache { spec: *spec, k, v })
    }

    fn embedding(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaTensor> {
        let n = step.host.tokens.len();
        if let Some(&t) = step.host.tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(BackendError::Invalid {
                op: "embedding",
                msg: format!("token id {t} outside the vocabulary of {}", table.rows),
            });
        }
        let mut out = self.alloc("embedding", n * table.cols)?;
        let (dim, vocab) = (
            to_i32("embedding", table.cols)?,
            to_i32("embedding", table.rows)?,
        );
        let f = self.func("embedding_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut out)
            .arg(&table.data)
            .arg(&step.tokens)
            .arg(&dim)
            .arg(&vocab);
        // SAFETY: argument types and order match embedding.cu; every index is guarded there.
        launch(unsafe { b.launch(Self::rows_cfg(n, 0)) }, "embedding")?;
        Ok(self.tensor(vec![n, table.cols], out))
    }

    fn add_position_embedding(
        &self,
        x: &mut CudaTensor,
        table: &CudaTensor,
        offset: usize,
        step: &CudaStep,
    ) -> Result<()> {
        let dim = cols(&x.shape);
        if cols(&table.shape) != dim || rows(&x.shape) != step.host.positions.len() {
            return Err(shape_err(
                "position_embedding",
                format!("x {:?}, table {:?}", x.shape, table.shape),
            ));
        }
        let table_rows = rows(&table.shape);
        if let Some(&p) = step
            .host
            .positions
            .iter()
            .find(|&&p| p as usize + offset >= table_rows)
        {
            return Err(BackendError::Invalid {
                op: "position_embedding",
                msg: format!(
                    "position {} beyond the table's {table_rows}",
                    p as usize + offset
                ),
            });
        }
        let (off, d, r) = (
            to_i32("position_embedding", offset)?,
            to_i32("position_embedding", dim)?,
            to_i32("position_embedding", table_rows)?,
        );
        let f = self.func("add_position_embedding_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.data)
            .arg(&table.data)
            .arg(&step.positions)
            .arg(&off)
            .arg(&d)
            .arg(&r);
        // SAFETY: as embedding.cu's add_position_embedding expects.
        launch(
            unsafe { b.launch(Self::rows_cfg(rows(&x.shape), 0)) },
            "position_embedding",
        )
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (m, k, n) = (rows(&x.shape), cols(&x.shape), w.rows);
        if k != w.cols || bias.is_some_and(|b| b.shape.iter().product::<usize>() != n) {
            return Err(shape_err(
                "linear",
                format!("x {:?}, w {}x{}", x.shape, w.rows, w.cols),
            ));
        }
        let mut out = self.alloc("linear", m * n)?;
        // Row-major Y[m,n] = X[m,k] W[n,k]^T is, column-major, Y^T = W^T' X^T
        // with W's buffer read as a k x n matrix transposed.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the shapes were checked above and the buffers hold them.
        unsafe {
            self.blas
                .matmul(cfg, &w.data, &x.data, &mut out, bias.map(|b| &b.data), None)
        }
        .map_err(|e| BackendError::Invalid {
            op: "linear",
            msg: format!("cuBLASLt: {e}"),
        })?;
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(self.tensor(shape, out))
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let dim = cols(&x.shape);
        if w.shape.iter().product::<usize>() != dim {
            return Err(shape_err(
                "rms_norm",
                format!("x {:?}, w {:?}", x.shape, w.shape),
            ));
        }
        let mut out = self.alloc("rms_norm", x.shape.iter().product())?;
        let d = to_i32("rms_norm", dim)?;
        let null = 0u64;
        let f = self.func("add_rms_norm_bf16")?;
        let mut b = self.stream.launch_builder(f);
        // With a null delta the kernel only reads the residual.
        b.arg(&x.data)
            .arg(&null)
            .arg(&w.data)
            .arg(&mut out)
            .arg(&d)
            .arg(&eps);
        // SAFETY: as norm.cu's add_rms_norm expects.
        launch(
            unsafe { b.launch(Self::rows_cfg(rows(&x.shape), 0)) },
            "rms_norm",
        )?;
        Ok(self.tensor(x.shape.clone(), out))
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let dim = cols(&x.shape);
        if w.shape.iter().product::<usize>() != dim || bias.shape.iter().product::<usize>() != dim {
            return Err(shape_err(
                "layer_norm",
                format!("x {:?}, w {:?}, b {:?}", x.shape, w.shape, bias.shape),
            ));
        }
        let mut out = self.alloc("layer_norm", x.shape.iter().product())?;
        let d = to_i32("layer_norm", dim)?;
        let null = 0u64;
        let f = self.func("add_layer_norm_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.data)
            .arg(&null)
            .arg(&w.data)
            .arg(&bias.data)
            .arg(&mut out)
            .arg(&d)
            .arg(&eps);
        // SAFETY: as norm.cu's add_layer_norm expects.
        launch(
            unsafe { b.launch(Self::rows_cfg(rows(&x.shape), 0)) },
            "layer_norm",
        )?;
        Ok(self.tensor(x.shape.clone(), out))
    }

    fn add_inplace(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        if x.shape != y.shape {
            return Err(shape_err("add", format!("{:?} vs {:?}", x.shape, y.shape)));
        }
        let n = x.shape.iter().product::<usize>() as i64;
        let f = self.func("add_inplace_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.data).arg(&y.data).arg(&n);
        // SAFETY: as activation.cu's add_inplace expects.
        launch(
            unsafe { b.launch(Self::elementwise_cfg(n as usize)) },
            "add",
        )
    }

    fn rope_inplace(
        &self,
        x: &mut CudaTensor,
        cos_sin: &CudaTensor,
        step: &CudaStep,
        n_heads: usize,
        head_dim: usize,
        rot_dim: usize,
        layout: RopeLayout,
    ) -> Result<()> {
        let max_pos = rows(&cos_sin.shape);
        if cols(&x.shape) != n_heads * head_dim
            || rows(&x.shape) != step.host.positions.len()
            || rot_dim > head_dim
            || !rot_dim.is_multiple_of(2)
            || cols(&cos_sin.shape) != rot_dim
        {
            return Err(shape_err(
                "rope",
                format!(
                    "x {:?}, table {:?}, {n_heads}x{head_dim}, rot {rot_dim}",
                    x.shape, cos_sin.shape
                ),
            ));
        }
        if let Some(&p) = step.host.positions.iter().find(|&&p| p as usize >= max_pos) {
            return Err(BackendError::Invalid {
                op: "rope",
                msg: format!("position {p} beyond the rotary table's {max_pos}"),
            });
        }
        let args = [
            to_i32("rope", n_heads)?,
            to_i32("rope", head_dim)?,
            to_i32("rope", rot_dim)?,
            match layout {
                RopeLayout::Interleaved => 0,
                RopeLayout::HalfSplit => 1,
            },
            to_i32("rope", max_pos)?,
        ];
        let f = self.func("rope_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.data).arg(&cos_sin.data).arg(&step.positions);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: as rope.cu expects.
        launch(
            unsafe { b.launch(Self::rows_cfg(rows(&x.shape), 0)) },
            "rope",
        )
    }

    fn gated_activation(
        &self,
        gate: &CudaTensor,
        up: &CudaTensor,
        act: Activation,
    ) -> Result<CudaTensor> {
        if gate.shape != up.shape {
            return Err(shape_err(
                "gated_activation",
                format!("{:?} vs {:?}", gate.shape, up.shape),
            ));
        }
        let n = gate.shape.iter().product::<usize>();
        let mut out = self.alloc("gated_activation", n)?;
        let (n64, a) = (n as i64, act_code(act)?);
        let f = self.func("gated_activation_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut out)
            .arg(&gate.data)
            .arg(&up.data)
            .arg(&n64)
            .arg(&a);
        // SAFETY: as activation.cu's gated_activation expects.
        launch(
            unsafe { b.launch(Self::elementwise_cfg(n)) },
            "gated_activation",
        )?;
        Ok(self.tensor(gate.shape.clone(), out))
    }

    fn activation_inplace(&self, x: &mut CudaTensor, act: Activation) -> Result<()> {
        let n = x.shape.iter().product::<usize>();
        let (n64, a) = (n as i64, act_code(act)?);
        let f = self.func("activation_inplace_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.data).arg(&n64).arg(&a);
        // SAFETY: as activation.cu's activation_inplace expects.
        launch(unsafe { b.launch(Self::elementwise_cfg(n)) }, "activation")
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        step: &CudaStep,
    ) -> Result<()> {
        let s = cache.spec;
        let width = s.n_kv_heads * s.head_dim;
        if layer >= s.n_layers
            || k.shape != v.shape
            || cols(&k.shape) != width
            || rows(&k.shape) != step.host.slots.len()
        {
            return Err(shape_err(
                "write_kv",
                format!("layer {layer}, k {:?}, v {:?}", k.shape, v.shape),
            ));
        }
        let args = (
            to_i32("write_kv", s.n_kv_heads)?,
            to_i32("write_kv", s.head_dim)?,
            to_i32("write_kv", s.block_size)?,
            s.slots() as i64,
        );
        let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
        let f = self.func("write_kv_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(kc).arg(vc).arg(&k.data).arg(&v.data).arg(&step.slots);
        b.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3);
        // SAFETY: as kv_cache.cu expects; slots were validated in prepare_step.
        launch(
            unsafe { b.launch(Self::rows_cfg(rows(&k.shape), 0)) },
            "write_kv",
        )
    }

    fn attention(
        &self,
        q: &CudaTensor,
        cache: &CudaKvCache,
        layer: usize,
        step: &CudaStep,
        p: &AttentionParams,
    ) -> Result<CudaTensor> {
        if p.softcap.is_some() {
            return Err(BackendError::Invalid {
                op: "attention",
                msg: "attention logit soft-capping (Gemma 2) is not implemented on CUDA yet".into(),
            });
        }
        let s = cache.spec;
        let hd = p.head_dim;
        if p.sinks.is_some() {
            return Err(BackendError::Invalid {
                op: "attention",
                msg: "attention sinks (gpt-oss) are not implemented on CUDA yet".into(),
            });
        }
        if layer >= s.n_layers
            || cols(&q.shape) != p.n_heads * hd
            || rows(&q.shape) != step.host.tokens.len()
            || s.head_dim != hd
            || s.n_kv_heads != p.n_kv_heads
            || p.n_kv_heads == 0
            || !p.n_heads.is_multiple_of(p.n_kv_heads)
            || hd > MAX_HEAD_DIM
        {
            return Err(shape_err(
                "attention",
                format!("q {:?}, params {p:?}, cache {s:?}", q.shape),
            ));
        }
        let n_tokens = step.host.tokens.len();
        let mut out = self.alloc("attention", n_tokens * p.n_heads * hd)?;
        let pk = &step.packed;
        let ints = (
            to_i32("attention", pk.table_stride)?,
            to_i32("attention", p.n_heads)?,
            to_i32("attention", p.n_kv_heads)?,
            to_i32("attention", hd)?,
            to_i32("attention", s.block_size)?,
            to_i32("attention", p.window.unwrap_or(0))?,
        );
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        if pk.decode_only {
            let n_seqs = pk.n_seqs;
            let splits = decode_splits(
                pk.max_context,
                DECODE_PARTITION,
                n_seqs * p.n_heads,
                self.target_blocks,
            );
            let parts = n_seqs * p.n_heads * splits;
            let mut part_out = self
                .stream
                .alloc_zeros::<f32>((parts * hd).max(1))
                .map_err(dev_err("attention"))?;
            let mut part_max = self
                .stream
                .alloc_zeros::<f32>(parts.max(1))
                .map_err(dev_err("attention"))?;
            let mut part_sum = self
                .stream
                .alloc_zeros::<f32>(parts.max(1))
                .map_err(dev_err("attention"))?;
            let partition = to_i32("attention", DECODE_PARTITION)?;
            let f = self.func("attention_decode_bf16")?;
            let mut b = self.stream.launch_builder(f);
            b.arg(&mut out)
                .arg(&mut part_out)
                .arg(&mut part_max)
                .arg(&mut part_sum);
            b.arg(&q.data)
                .arg(kc)
                .arg(vc)
                .arg(&step.block_tables)
                .arg(&step.context_lens)
                .arg(&step.query_starts);
            b.arg(&ints.0)
                .arg(&ints.1)
                .arg(&ints.2)
                .arg(&ints.3)
                .arg(&ints.4)
                .arg(&p.scale)
                .arg(&ints.5)
                .arg(&partition);
            let cfg = LaunchConfig {
                grid_dim: (
                    p.n_heads as u32,
                    grid_y("attention", n_seqs)?,
                    splits as u32,
                ),
                block_dim: (ATTENTION_THREADS, 1, 1),
                shared_mem_bytes: ((hd + DECODE_PARTITION) * 4) as u32,
            };
            // SAFETY: as attention_decode.cu expects; the metadata was packed and validated.
            launch(unsafe { b.launch(cfg) }, "attention")?;
            if splits > 1 {
                let sp = to_i32("attention", splits)?;
                let f = self.func("attention_decode_reduce_bf16")?;
                let mut b = self.stream.launch_builder(f);
                b.arg(&mut out)
                    .arg(&part_out)
                    .arg(&part_max)
                    .arg(&part_sum)
                    .arg(&step.query_starts);
                b.arg(&ints.1).arg(&ints.3).arg(&sp);
                let cfg = LaunchConfig {
                    grid_dim: (p.n_heads as u32, grid_y("attention", n_seqs)?, 1),
                    block_dim: (ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: as attention_decode.cu's reduce expects.
                launch(unsafe { b.launch(cfg) }, "attention")?;
            }
        } else {
            let f = self.func("attention_prefill_bf16")?;
            let mut b = self.stream.launch_builder(f);
            b.arg(&mut out)
                .arg(&q.data)
                .arg(kc)
                .arg(vc)
                .arg(&step.block_tables)
                .arg(&step.context_lens);
            b.arg(&step.query_starts)
                .arg(&step.query_lens)
                .arg(&step.token_seqs);
            b.arg(&ints.0)
                .arg(&ints.1)
                .arg(&ints.2)
                .arg(&ints.3)
                .arg(&ints.4)
                .arg(&p.scale)
                .arg(&ints.5);
            let cfg = LaunchConfig {
                grid_dim: (p.n_heads as u32, grid_y("attention", n_tokens)?, 1),
                block_dim: (ATTENTION_THREADS, 1, 1),
                shared_mem_bytes: ((hd + PREFILL_CHUNK) * 4) as u32,
            };
            // SAFETY: as attention_prefill.cu expects.
            launch(unsafe { b.launch(cfg) }, "attention")?;
        }
        Ok(self.tensor(q.shape.clone(), out))
    }

    fn select_logit_rows(&self, x: &CudaTensor, step: &CudaStep) -> Result<CudaTensor> {
        // A gather of rows is the embedding lookup with `x` as the table.
        let (n_rows, dim) = (rows(&x.shape), cols(&x.shape));
        let wanted = step.host.logit_rows.len();
        if let Some(&r) = step.host.logit_rows.iter().find(|&&r| r as usize >= n_rows) {
            return Err(BackendError::Invalid {
                op: "select_logit_rows",
                msg: format!("row {r} beyond {n_rows}"),
            });
        }
        let mut out = self.alloc("select_logit_rows", wanted * dim)?;
        if wanted == 0 {
            return Ok(self.tensor(vec![0, dim], out));
        }
        let (d, r) = (
            to_i32("select_logit_rows", dim)?,
            to_i32("select_logit_rows", n_rows)?,
        );
        let f = self.func("embedding_bf16")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut out)
            .arg(&x.data)
            .arg(&step.logit_rows)
            .arg(&d)
            .arg(&r);
        // SAFETY: as embedding.cu expects; rows checked above.
        launch(
            unsafe { b.launch(Self::rows_cfg(wanted, 0)) },
            "select_logit_rows",
        )?;
        Ok(self.tensor(vec![wanted, dim], out))
    }
}

fn act_code(act: Activation) -> Result<i32> {
    Ok(match act {
        Activation::Silu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Relu => 3,
        Activation::ClampedSwiglu { .. } => {
            return Err(BackendError::Invalid {
                op: "activation",
                msg: "the clamped SwiGLU (gpt-oss) is not implemented on CUDA yet".into(),
            })
        }
    })
}
