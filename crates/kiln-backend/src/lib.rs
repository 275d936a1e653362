//! kiln-backend: the small set of tensor operations kiln's decoder is written
//! against, and their implementations.
//!
//! The decoder (in `kiln-model`) never touches device memory directly: it
//! calls the [`Backend`] trait, so one model definition runs on every device.
//! The CPU implementation ([`cpu::CpuBackend`]) is always built and is the
//! reference every other implementation is tested against.
//!
//! What this crate is not: it knows no model architecture and no request.
//! Batches arrive as a flat list of tokens described by a [`StepInput`]
//! (which tokens belong to which sequence, where their keys and values go in
//! the paged KV cache), produced by the engine's scheduler.

mod bidir;
mod bytes;
pub mod cpu;
pub mod cuda;
mod device;
mod kv_dtype;
pub mod quant;
pub mod quantize;
mod quantize_k;
pub mod rows;
mod step;

pub use bidir::BidirParams;
pub use bytes::{advise_huge_pages, ByteOwner, HostBytes};
pub use device::{Device, DeviceParseError};
pub use kv_dtype::{KvDtype, KvDtypeError, Q8_0_BLOCK};
pub use quant::{GgmlType, WeightData};
pub use rows::MoeExpert;
pub use step::{KvSpec, SeqSlice, StepInput};

/// Errors raised by backends. Shapes are checked at every op boundary, so a
/// model bug surfaces as an error naming the op rather than as memory corruption.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

/// Result alias for backend operations.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension `2i` rotates with `2i + 1` (GPT-J, and llama weights as GGUF stores them).
    Interleaved,
    /// Dimension `i` rotates with `i + rot_dim / 2` (Hugging Face llama, NeoX).
    HalfSplit,
}

/// Element-wise non-linearities used by feed-forward blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU, exact (erf) form.
    Gelu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    /// gpt-oss's clamped SwiGLU, only as a gated activation (a plain
    /// [`Backend::activation_inplace`] refuses it): with `g = min(gate,
    /// limit)` and `u = clamp(up, -limit, limit)`, the output is
    /// `(u + 1) * g * sigmoid(alpha * g)` (config `swiglu_alpha` 1.702,
    /// `swiglu_limit` 7.0).
    ClampedSwiglu {
        alpha: f32,
        limit: f32,
    },
}

/// Shape parameters of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier applied to q·k, normally `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
    /// Soft cap on the scaled scores, `cap * tanh(score / cap)` before the
    /// mask and softmax (Gemma 2's `attn_logit_softcapping`); `None` leaves
    /// them as they are.
    pub softcap: Option<f32>,
    /// Attention sinks (gpt-oss): one learned logit per query head, this
    /// layer's, that joins each softmax's denominator and adds no value, so
    /// a head may attend to nothing. `None` leaves softmax unchanged.
    pub sinks: Option<&'a [f32]>,
}

/// The operation set. Tensors are row-major; "rows" are tokens, so a
/// `[tokens, features]` activation is the common shape.
///
/// Ops allocate their outputs; in-place variants exist where the decoder
/// naturally overwrites (residual adds, rotary embeddings).
pub trait Backend: Send + Sync {
    /// A tensor in this backend's memory.
    type Tensor: Send + Sync;
    /// A weight matrix `[rows, cols]` in the form this backend computes with
    /// (possibly still quantized).
    type Weight: Send + Sync;
    /// Keys and values of every layer, in the paged layout described by [`KvSpec`].
    type KvCache: Send;
    /// A [`StepInput`] made ready for this backend (on a GPU: copied to device once per step).
    type Step;

    /// A short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Runs `f`, a whole step's worth of op calls, in the backend's execution
    /// context. The CPU backend runs it on a worker of its thread pool, so the
    /// many small parallel ops of a decode step fork and join inside the pool
    /// instead of each waking the pool from outside.
    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Creates a tensor from host data (weights, tables), taking ownership so a
    /// host-memory backend can keep the buffer without copying it.
    fn upload(&self, shape: &[usize], data: Vec<f32>) -> Result<Self::Tensor>;

    /// Takes a weight matrix of `rows x cols`; the backend keeps ggml blocks it
    /// can compute with and converts the rest.
    fn upload_weight(&self, rows: usize, cols: usize, data: WeightData) -> Result<Self::Weight>;

    /// Takes a matrix that is only ever read row by row (a token embedding
    /// that is not also the output projection): a host backend may keep
    /// the file's bytes as they are, so that only the rows a prompt looks
    /// up become resident, as llama.cpp's memory-mapped lookups do. The
    /// default is [`Backend::upload_weight`].
    fn upload_table(&self, rows: usize, cols: usize, data: WeightData) -> Result<Self::Weight> {
        self.upload_weight(rows, cols, data)
    }

    /// The name and version of the layout this backend rearranges weight
    /// matrices into at upload, when it can give those bytes back
    /// ([`Backend::laid_out`]) and take them again
    /// ([`Backend::upload_laid_out`]): the loader stores them once, and later
    /// starts map them instead of rearranging every matrix again. `None`
    /// (the default) when weights are used as given.
    fn weight_layout(&self) -> Option<&'static str> {
        None
    }

    /// `w`'s bytes in [`Backend::weight_layout`] and its stored format, when
    /// it was rearranged at upload.
    fn laid_out(&self, w: &Self::Weight) -> Option<(GgmlType, HostBytes)> {
        let _ = w;
        None
    }

    /// A weight matrix of `rows x cols` of `ty` from bytes that
    /// [`Backend::laid_out`] gave for the same shape and format (in this
    /// process or an earlier one), used without rearranging. A backend with
    /// no [`Backend::weight_layout`] refuses them.
    fn upload_laid_out(
        &self,
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: HostBytes,
    ) -> Result<Self::Weight> {
        let _ = bytes;
        Err(BackendError::Invalid {
            op: "upload_laid_out",
            msg: format!(
                "{} keeps no layout of its own ({rows} x {cols} {ty:?})",
                self.name()
            ),
        })
    }

    /// Copies a tensor back to the host.
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    /// The shape of a tensor.
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;

    /// The same elements under another shape (`[tokens, heads * d]` as `[tokens * heads, d]`).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// Prepares per-step metadata (token ids, positions, block tables).
    fn prepare_step(&self, input: &StepInput) -> Result<Self::Step>;

    /// Bytes one element of the KV cache takes in the backend's default type.
    fn kv_element_bytes(&self) -> usize {
        4
    }

    /// Allocates the paged KV cache.
    fn alloc_kv_cache(&self, spec: &KvSpec) -> Result<Self::KvCache>;

    /// Allocates the paged KV cache storing keys and values as `dtype`
    /// (`--kv-cache-dtype`). A backend that stores only its own type takes
    /// [`KvDtype::Auto`] and refuses the rest by name.
    fn alloc_kv_cache_as(&self, spec: &KvSpec, dtype: KvDtype) -> Result<Self::KvCache> {
        match dtype {
            KvDtype::Auto => self.alloc_kv_cache(spec),
            d => Err(BackendError::Invalid {
                op: "alloc_kv_cache",
                msg: format!(
                    "kv_cache_dtype {d} is not implemented on {} yet (use auto)",
                    self.name()
                ),
            }),
        }
    }

    /// Bytes one token of `spec` takes in a cache of `dtype` (keys and
    /// values of every layer), for sizing the cache from a byte budget.
    fn kv_token_bytes(&self, spec: &KvSpec, dtype: KvDtype) -> usize {
        let _ = dtype;
        spec.bytes_per_token(self.kv_element_bytes())
    }

    /// Looks up `table[token]` for every token of the step: `[tokens, dim]`.
    fn embedding(&self, table: &Self::Weight, step: &Self::Step) -> Result<Self::Tensor>;

    /// Adds rows of `table` at each token's position (learned position embeddings), in place.
    fn add_position_embedding(
        &self,
        x: &mut Self::Tensor,
        table: &Self::Tensor,
        offset: usize,
        step: &Self::Step,
    ) -> Result<()>;

    /// `x @ w^T + b` for `x: [m, k]`, `w: [n, k]` (the PyTorch `Linear` layout), `b: [n]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// [`Backend::linear`] of one input against several weights (a layer's
    /// query, key and value projections; its gate and up projections),
    /// each with its own bias, giving one tensor per weight, each exactly
    /// what `linear` gives. A backend may run them as one operation: the
    /// CPU quantizes the input once and streams the weights in one parallel
    /// pass, so a decode step's small matrices (a 1B model's 512-row keys
    /// and values) are not each a pass of their own with its own start-up.
    fn linear_many(
        &self,
        x: &Self::Tensor,
        ws: &[(&Self::Weight, Option<&Self::Tensor>)],
    ) -> Result<Vec<Self::Tensor>> {
        ws.iter().map(|(w, b)| self.linear(x, w, *b)).collect()
    }

    /// Root-mean-square normalisation of each row, scaled by `w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;

    /// Layer normalisation of each row, `w` scale and `b` shift.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `x *= s`, element-wise (Gemma's embedding scale). The default goes
    /// through the host; backends override it where that matters.
    fn scale_inplace(&self, x: &mut Self::Tensor, s: f32) -> Result<()> {
        let shape = self.shape(x);
        let mut host = self.to_host(x)?;
        host.iter_mut().for_each(|v| *v *= s);
        *x = self.upload(&shape, host)?;
        Ok(())
    }

    /// `x += y`.
    fn add_inplace(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// Rotates the first `rot_dim` dimensions of each head of `x: [tokens, n_heads * head_dim]`
    /// by each token's position, using `cos_sin: [max_pos, rot_dim]` (cosines in the first
    /// half of each row, sines in the second).
    #[allow(clippy::too_many_arguments)]
    fn rope_inplace(
        &self,
        x: &mut Self::Tensor,
        cos_sin: &Self::Tensor,
        step: &Self::Step,
        n_heads: usize,
        head_dim: usize,
        rot_dim: usize,
        layout: RopeLayout,
    ) -> Result<()>;

    /// `act(gate) * up`, element-wise.
    fn gated_activation(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// Most rows of a step a dense feed-forward computes at once, or `None`
    /// for all of them. A long prompt's feed-forward intermediates (rows x
    /// its width, f32) are the largest thing a step allocates; where they
    /// come from the same memory as the weights (the CPU), the decoder
    /// computes them in pieces of this many rows, each row's result the
    /// same bits either way (the kernels' results do not depend on the
    /// other rows of a product).
    fn feed_forward_rows(&self) -> Option<usize> {
        None
    }

    /// [`Backend::gated_activation`] written over `up`, which it consumes:
    /// a long prompt's feed-forward then holds its widest activation twice
    /// at the peak, not three times (on a Llama-3.2-1B shape and a
    /// 512-token prompt, 16 MB of a 32 MB peak above the weights). The
    /// default makes a new tensor; a backend overrides it where it can
    /// reuse `up`'s storage.
    fn gated_activation_into(
        &self,
        gate: &Self::Tensor,
        up: Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor> {
        self.gated_activation(gate, &up, act)
    }

    /// `act(x)` in place.
    fn activation_inplace(&self, x: &mut Self::Tensor, act: Activation) -> Result<()>;

    /// Stores this step's keys and values (`[tokens, n_kv_heads * head_dim]`) of one layer
    /// at each token's cache slot.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        step: &Self::Step,
    ) -> Result<()>;

    /// Causal attention of this step's queries (`[tokens, n_heads * head_dim]`) over each
    /// sequence's cached keys and values (which must already include this step's).
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        step: &Self::Step,
        params: &AttentionParams,
    ) -> Result<Self::Tensor>;

    /// The rows of `x` whose logits the step asked for (`StepInput::logit_rows`).
    fn select_logit_rows(&self, x: &Self::Tensor, step: &Self::Step) -> Result<Self::Tensor>;

    /// Rows `rows[i]` of `x: [n, d]` as a `[rows.len(), d]` tensor: the
    /// tokens a mixture-of-experts layer routes to one expert. By default
    /// through the host ([`rows::gather_rows`]).
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor> {
        let cols = self.shape(x).last().copied().unwrap_or(1);
        let data = rows::gather_rows(&self.to_host(x)?, cols, rows)?;
        self.upload(&[rows.len(), cols], data)
    }

    /// `out[rows[i]] += scales[i] * y[i]` in the order of `i`: an expert's
    /// outputs, weighted by the router, added back to its tokens' rows. By
    /// default through the host ([`rows::add_rows_scaled`]).
    fn add_rows_scaled(
        &self,
        out: &mut Self::Tensor,
        y: &Self::Tensor,
        rows: &[u32],
        scales: &[f32],
    ) -> Result<()> {
        let shape = self.shape(out);
        let cols = shape.last().copied().unwrap_or(1);
        let mut host = self.to_host(out)?;
        rows::add_rows_scaled(&mut host, cols, &self.to_host(y)?, rows, scales)?;
        *out = self.upload(&shape, host)?;
        Ok(())
    }

    /// Bidirectional (non-causal) attention for encoders (BERT, XLM-R):
    /// `q`, `k`, `v` are `[tokens, n_heads * head_dim]` holding consecutive
    /// sequences of `seq_lens` tokens, and each query sees every key of its
    /// own sequence and none of another's. No KV cache is involved. By
    /// default through the host ([`bidir::attention_bidirectional`]), which
    /// is what the CPU and CUDA backends use.
    fn attention_bidirectional(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        seq_lens: &[usize],
        params: &BidirParams,
    ) -> Result<Self::Tensor> {
        let shape = self.shape(q);
        let out = bidir::attention_bidirectional(
            &self.to_host(q)?,
            &self.to_host(k)?,
            &self.to_host(v)?,
            seq_lens,
            params,
        )?;
        self.upload(&shape, out)
    }

    /// A mixture-of-experts layer's routed experts over `x: [n, d]`: for
    /// each expert in the order given, `down(act(gate(xs)) * up(xs))` over
    /// its rows `xs` of `x`, times its scales, added to those rows of a zero
    /// `[n, d]` result (so each row sums its experts' outputs in the order of
    /// `experts`, whatever else shares the step). One call per layer lets a
    /// backend spread the experts over its cores; by default it is the
    /// per-expert sequence of [`Backend::gather_rows`], [`Backend::linear`],
    /// [`Backend::gated_activation`] and [`Backend::add_rows_scaled`], which
    /// any backend computes (CUDA included), and which a backend's own form
    /// must match bit for bit.
    fn moe_experts(
        &self,
        x: &Self::Tensor,
        experts: &[MoeExpert<'_, Self::Weight, Self::Tensor>],
        act: Activation,
    ) -> Result<Self::Tensor> {
        let shape = self.shape(x);
        let n = shape.first().copied().unwrap_or(0);
        let mut out = self.upload(&shape, vec![0.0; shape.iter().product()])?;
        for e in experts {
            e.check(n)?;
            if e.rows.is_empty() {
                continue;
            }
            let xs = self.gather_rows(x, e.rows)?;
            let g = self.linear(&xs, e.gate, e.bias(0))?;
            let u = self.linear(&xs, e.up, e.bias(1))?;
            let a = self.gated_activation_into(&g, u, act)?;
            let y = self.linear(&a, e.down, e.bias(2))?;
            self.add_rows_scaled(&mut out, &y, e.rows, e.scales)?;
        }
        Ok(out)
    }
}
