//! Device memory, planned once at start: the weights, then the activations
//! of the largest step the engine may run, then KV-cache blocks in the
//! configured fraction of what is left. The plan is reported at start, so
//! a deployment sees where its GPU memory went and why it holds as many
//! tokens as it does.

use std::fmt;

/// The dimensions of a model that decide its activation sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Width of the feed-forward block's hidden layer.
    pub ffn_dim: usize,
    pub vocab: usize,
}

/// The limits of one engine step (the engine's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Most tokens one step computes (prefill chunk plus decode tokens).
    pub max_step_tokens: usize,
    /// Most sequences in a step (each may want a row of logits).
    pub max_running: usize,
    /// Longest sequence, for the split-decode scratch.
    pub max_model_len: usize,
}

/// What to plan for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInput {
    /// Device memory free before kiln allocates anything (cuMemGetInfo).
    pub free_bytes: u64,
    /// Bytes of the weights as uploaded.
    pub weight_bytes: u64,
    pub shape: ModelShape,
    pub limits: StepLimits,
    /// Bytes of one activation element (2 for bf16/fp16).
    pub elem_bytes: usize,
    /// Bytes of one KV-cache element.
    pub kv_elem_bytes: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Fraction (0, 1] of the memory left after weights and activations
    /// that the KV cache takes (the rest stays free for the driver,
    /// cuBLASLt's heuristics and fragmentation).
    pub kv_fraction: f64,
    /// Partition length of split decode attention (keys per split).
    pub decode_partition: usize,
}

/// Bytes cuBLASLt may use as workspace per call.
pub const CUBLASLT_WORKSPACE: u64 = 32 << 20;

/// Where device memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub free_bytes: u64,
    pub weight_bytes: u64,
    /// Scratch of the largest step, cuBLASLt's workspace included.
    pub activation_bytes: u64,
    pub kv_blocks: usize,
    pub kv_bytes: u64,
    /// What is left unallocated.
    pub spare_bytes: u64,
}

/// Why no plan fits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the model does not fit on the device: {weights} MiB of weights and {activations} MiB of \
         step activations, {free} MiB free"
    )]
    DoesNotFit {
        weights: u64,
        activations: u64,
        free: u64,
    },
    #[error(
        "no room for a single KV block of {block_bytes} bytes: {left} MiB left after weights and \
         activations, {fraction} of it for the cache; lower max_rolling_batch_prefill_tokens or \
         raise the KV fraction"
    )]
    NoKvBlock {
        block_bytes: u64,
        left: u64,
        fraction: f64,
    },
}

/// The scratch bytes one step of `tokens` tokens over `seqs` sequences needs
/// at the peak: the residual stream and normalised copy, q/k/v, the
/// attention output, the feed-forward gate, up and product, the fp32 logits
/// of every sequence, split-decode partials, and cuBLASLt's workspace.
/// Buffers are sized once for the largest step and reused by every layer.
pub fn step_activation_bytes(
    shape: &ModelShape,
    limits: &StepLimits,
    elem_bytes: usize,
    decode_partition: usize,
) -> u64 {
    let t = limits.max_step_tokens as u64;
    let e = elem_bytes as u64;
    let qkv = (shape.n_heads + 2 * shape.n_kv_heads) as u64 * shape.head_dim as u64;
    let attn = (shape.n_heads * shape.head_dim) as u64;
    let per_token = 2 * shape.dim as u64 + qkv + attn + 3 * shape.ffn_dim as u64;
    let rows = limits.max_running.min(limits.max_step_tokens) as u64;
    let logits = rows * shape.vocab as u64 * 4;
    let splits = limits.max_model_len.div_ceil(decode_partition.max(1)) as u64;
    let partials = rows * shape.n_heads as u64 * splits * (shape.head_dim as u64 + 2) * 4;
    // Per-token step metadata (ids, positions, slots, sequence of each token)
    // and the sampled ids and log-probabilities: small but counted.
    let meta = t * 16 + rows * 8;
    t * per_token * e + logits + partials + meta + CUBLASLT_WORKSPACE
}

/// Plans device memory for `input`.
pub fn plan(input: &PlanInput) -> Result<MemoryPlan, PlanError> {
    if !(input.kv_fraction > 0.0 && input.kv_fraction <= 1.0) {
        return Err(PlanError::Invalid(format!(
            "the KV fraction must be in (0, 1], got {}",
            input.kv_fraction
        )));
    }
    if input.block_size == 0 || input.limits.max_step_tokens == 0 || input.limits.max_running == 0 {
        return Err(PlanError::Invalid(
            "block size, step tokens and batch size must be at least 1".into(),
        ));
    }
    let activation_bytes = step_activation_bytes(
        &input.shape,
        &input.limits,
        input.elem_bytes,
        input.decode_partition,
    );
    let used = input.weight_bytes + activation_bytes;
    let Some(left) = input.free_bytes.checked_sub(used) else {
        return Err(PlanError::DoesNotFit {
            weights: input.weight_bytes >> 20,
            activations: activation_bytes >> 20,
            free: input.free_bytes >> 20,
        });
    };
    let s = &input.shape;
    let block_bytes =
        (2 * s.n_layers * s.n_kv_heads * s.head_dim * input.kv_elem_bytes * input.block_size)
            as u64;
    let budget = (left as f64 * input.kv_fraction) as u64;
    let kv_blocks = budget.checked_div(block_bytes).unwrap_or(0) as usize;
    if kv_blocks == 0 {
        return Err(PlanError::NoKvBlock {
            block_bytes,
            left: left >> 20,
            fraction: input.kv_fraction,
        });
    }
    let kv_bytes = kv_blocks as u64 * block_bytes;
    Ok(MemoryPlan {
        free_bytes: input.free_bytes,
        weight_bytes: input.weight_bytes,
        activation_bytes,
        kv_blocks,
        kv_bytes,
        spare_bytes: left - kv_bytes,
    })
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "device memory: {:.0} MiB free; weights {:.0} MiB, step activations {:.0} MiB, \
             KV cache {:.0} MiB ({} blocks), {:.0} MiB left spare",
            mib(self.free_bytes),
            mib(self.weight_bytes),
            mib(self.activation_bytes),
            mib(self.kv_bytes),
            self.kv_blocks,
            mib(self.spare_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Llama-3-8B's shape.
    fn llama8b() -> ModelShape {
        ModelShape {
            n_layers: 32,
            dim: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            ffn_dim: 14336,
            vocab: 128_256,
        }
    }

    fn input(free: u64, weights: u64) -> PlanInput {
        PlanInput {
            free_bytes: free,
            weight_bytes: weights,
            shape: llama8b(),
            limits: StepLimits {
                max_step_tokens: 2048,
                max_running: 64,
                max_model_len: 8192,
            },
            elem_bytes: 2,
            kv_elem_bytes: 2,
            block_size: 16,
            kv_fraction: 0.9,
            decode_partition: 512,
        }
    }

    #[test]
    fn activations_are_counted_from_the_shape() {
        let i = input(140 * GIB, 16 * GIB);
        let a = step_activation_bytes(&i.shape, &i.limits, 2, 512);
        // By hand: per token 2*4096 + (32+16)*128 + 32*128 + 3*14336 = 61440
        // elements of 2 bytes for 2048 tokens; logits 64 rows of 128256 f32;
        // partials 64 * 32 heads * 16 splits * 130 * 4; metadata 2048*16 + 64*8.
        let want = 2048 * 61440 * 2
            + 64 * 128_256 * 4
            + 64 * 32 * 16 * 130 * 4
            + (2048 * 16 + 64 * 8)
            + CUBLASLT_WORKSPACE;
        assert_eq!(a, want);
        // More step tokens, more activations.
        let mut bigger = i.limits;
        bigger.max_step_tokens = 4096;
        assert!(step_activation_bytes(&i.shape, &bigger, 2, 512) > a);
    }

    #[test]
    fn kv_blocks_fill_the_fraction_of_what_is_left() {
        let i = input(140 * GIB, 16 * GIB);
        let p = plan(&i).expect("fits");
        let block = 2 * 32 * 8 * 128 * 2 * 16u64; // 2 MiB per 16-token block
        let left = i.free_bytes - i.weight_bytes - p.activation_bytes;
        assert_eq!(p.kv_blocks as u64, (left as f64 * 0.9) as u64 / block);
        assert_eq!(p.kv_bytes, p.kv_blocks as u64 * block);
        assert_eq!(p.spare_bytes, left - p.kv_bytes);
        // About 0.9 * 120 GiB of 2 MiB blocks.
        assert!((55_000..57_000).contains(&p.kv_blocks), "{}", p.kv_blocks);
        let report = p.to_string();
        assert!(
            report.contains(&format!("({} blocks)", p.kv_blocks)),
            "{report}"
        );
        // A smaller fraction leaves more spare.
        let half = plan(&PlanInput {
            kv_fraction: 0.5,
            ..i
        })
        .expect("fits");
        assert!(half.kv_blocks < p.kv_blocks && half.spare_bytes > p.spare_bytes);
    }

    #[test]
    fn a_model_too_big_or_no_block_left_is_a_clear_error() {
        let err = plan(&input(16 * GIB, 16 * GIB)).expect_err("too big");
        assert!(
            matches!(err, PlanError::DoesNotFit { weights: 16384, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("does not fit"));
        // Room for the weights and activations but not one block.
        let i = input(16 * GIB, 15 * GIB);
        let act = step_activation_bytes(&i.shape, &i.limits, 2, 512);
        let tight = PlanInput {
            free_bytes: 15 * GIB + act + (1 << 20),
            ..i
        };
        assert!(matches!(plan(&tight), Err(PlanError::NoKvBlock { .. })));
        assert!(matches!(
            plan(&PlanInput {
                kv_fraction: 0.0,
                ..i
            }),
            Err(PlanError::Invalid(_))
        ));
        assert!(matches!(
            plan(&PlanInput {
                kv_fraction: 1.5,
                ..i
            }),
            Err(PlanError::Invalid(_))
        ));
    }
}
