// Token choice on the device, so that only token ids and log-probabilities
// cross to the host. Logits are fp32 [rows, vocab] (the LM head's output).
// Semantics follow the engine's CPU sampler (kiln-engine sampling.rs):
// - the reported log-probability is the log-softmax of the raw logits;
// - temperature 0 is greedy: the argmax (the lowest index among equals);
// - otherwise p_i = exp((l_i - max) / temperature) (so the top token has
//   p = 1), restricted to the top-k, then to the top-p nucleus of what the
//   top-k kept, and to tokens with p >= min_p; a token is drawn from what is
//   left with the host's uniform number u in [0, 1).
// Top-k and top-p are found as probability thresholds by bisection (30
// halvings of [0, 1]: tokens within 2^-30 of the cut are kept together)
// instead of sorting the vocabulary.
// Grid: one block per row; block: 1024 threads (a multiple of 32).
#define KILN_SAMPLE_BISECT 30

struct ArgMax {
    float v;
    int i;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ ArgMax block_argmax(ArgMax x, float* vs, int* is) {
    const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
    const int warps = blockDim.x / KILN_WARP;
#pragma unroll
    for (int o = KILN_WARP / 2; o > 0; o >>= 1) {
        ArgMax y;
        y.v = __shfl_xor_sync(KILN_FULL_MASK, x.v, o);
        y.i = __shfl_xor_sync(KILN_FULL_MASK, x.i, o);
        x = better(x, y);
    }
    __syncthreads();
    if (lane == 0) {
        vs[warp] = x.v;
        is[warp] = x.i;
    }
    __syncthreads();
    ArgMax r;
    r.v = lane < warps ? vs[lane] : -KILN_INF;
    r.i = lane < warps ? is[lane] : 0x7fffffff;
#pragma unroll
    for (int o = KILN_WARP / 2; o > 0; o >>= 1) {
        ArgMax y;
        y.v = __shfl_xor_sync(KILN_FULL_MASK, r.v, o);
        y.i = __shfl_xor_sync(KILN_FULL_MASK, r.i, o);
        r = better(r, y);
    }
    return r;
}

// Count and mass of the tokens with p >= t (p recomputed from the logits).
__device__ void kept(const float* __restrict__ row, int vocab, float m, float inv_temp, float t,
                     float* scratch, float* count, float* mass) {
    float c = 0.0f, s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float p = __expf((row[i] - m) * inv_temp);
        if (p >= t) {
            c += 1.0f;
            s += p;
        }
    }
    *count = block_sum(c, scratch);
    *mass = block_sum(s, scratch);
}

extern "C" __global__ void sample_f32(int* __restrict__ tokens, float* __restrict__ logprobs,
                                      const float* __restrict__ logits, int vocab,
                                      const float* __restrict__ temperature,
                                      const int* __restrict__ top_k, const float* __restrict__ top_p,
                                      const float* __restrict__ min_p,
                                      const float* __restrict__ uniforms) {
    __shared__ float scratch[32];
    __shared__ float vs[32];
    __shared__ int is[32];
    __shared__ float prefix[32];
    __shared__ int chosen;
    const int r = blockIdx.x;
    const float* row = logits + (long long)r * vocab;

    ArgMax best;
    best.v = -KILN_INF;
    best.i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        ArgMax c;
        c.v = row[i];
        c.i = i;
        best = better(best, c);
    }
    best = block_argmax(best, vs, is);
    const float m = best.v;
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += __expf(row[i] - m);
    const float lse = m + __logf(block_sum(z, scratch));

    const float temp = temperature[r];
    int token = best.i;
    if (temp > 0.0f) {
        const float inv_temp = 1.0f / temp;
        float count, mass;
        // Top-k: the largest threshold that still keeps k tokens.
        float t = 0.0f;
        const int k = top_k[r];
        if (k > 0 && k < vocab) {
            float lo = 0.0f, hi = 1.0f;
            for (int it = 0; it < KILN_SAMPLE_BISECT; ++it) {
                const float mid = 0.5f * (lo + hi);
                kept(row, vocab, m, inv_temp, mid, scratch, &count, &mass);
                if (count >= (float)k) lo = mid; else hi = mid;
            }
            t = lo;
        }
        kept(row, vocab, m, inv_temp, t, scratch, &count, &mass);
        // Top-p: the largest threshold whose kept mass reaches p of the top-k's.
        const float p = top_p[r];
        if (p < 1.0f) {
            const float target = p * mass;
            float lo = t, hi = 1.0f;
            for (int it = 0; it < KILN_SAMPLE_BISECT; ++it) {
                const float mid = 0.5f * (lo + hi);
                kept(row, vocab, m, inv_temp, mid, scratch, &count, &mass);
                if (mass >= target) lo = mid; else hi = mid;
            }
            t = lo;
        }
        t = fmaxf(t, min_p[r]);
        // The token holds t <= p always for the top token (p = 1), so the set is never empty.
        kept(row, vocab, m, inv_temp, t, scratch, &count, &mass);
        const float target = uniforms[r] * mass;
        // Each thread scans a contiguous chunk; chunk sums are scanned across the block.
        const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const int lo_i = threadIdx.x * chunk, hi_i = min(vocab, lo_i + chunk);
        float own = 0.0f;
        for (int i = lo_i; i < hi_i; ++i) {
            const float q = __expf((row[i] - m) * inv_temp);
            if (q >= t) own += q;
        }
        // Inclusive scan within the warp, then over the warps' totals.
        const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
        float incl = own;
#pragma unroll
        for (int o = 1; o < KILN_WARP; o <<= 1) {
            const float y = __shfl_up_sync(KILN_FULL_MASK, incl, o);
            if (lane >= o) incl += y;
        }
        if (threadIdx.x == 0) chosen = best.i;
        if (lane == KILN_WARP - 1) prefix[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            const int warps = blockDim.x / KILN_WARP;
            const float total = lane < warps ? prefix[lane] : 0.0f;
            float w = total;
#pragma unroll
            for (int o = 1; o < KILN_WARP; o <<= 1) {
                const float y = __shfl_up_sync(KILN_FULL_MASK, w, o);
                if (lane >= o) w += y;
            }
            if (lane < warps) prefix[lane] = w - total; // exclusive: the warps before
        }
        __syncthreads();
        // Neighbouring threads' ranges come from differently rounded sums: a
        // gap leaves `chosen` at the argmax (always kept), an overlap lets
        // either neighbour's token win. Both are within float rounding of u.
        float before = prefix[warp] + incl - own;
        if (own > 0.0f && target >= before && target < before + own) {
            int pick = -1;
            for (int i = lo_i; i < hi_i; ++i) {
                const float q = __expf((row[i] - m) * inv_temp);
                if (q < t) continue;
                pick = i;
                before += q;
                if (target < before) break;
            }
            if (pick >= 0) chosen = pick;
        }
        __syncthreads();
        token = chosen;
    }
    if (threadIdx.x == 0) {
        tokens[r] = token;
        logprobs[r] = row[token] - lse;
    }
}

// Hugging Face's repetition penalty on fp32 logits, before sampling: for each
// row r, the distinct token ids ids[offsets[r] .. offsets[r + 1]] get a
// positive logit divided by penalty[r] and a negative one multiplied by it.
// Grid: one block per row.
extern "C" __global__ void repetition_penalty_f32(float* __restrict__ logits, int vocab,
                                                  const int* __restrict__ ids,
                                                  const int* __restrict__ offsets,
                                                  const float* __restrict__ penalty) {
    const int r = blockIdx.x;
    const float pen = penalty[r];
    float* row = logits + (long long)r * vocab;
    for (int j = offsets[r] + threadIdx.x; j < offsets[r + 1]; j += blockDim.x) {
        const int id = ids[j];
        if (id < 0 || id >= vocab) continue;
        const float l = row[id];
        row[id] = l > 0.0f ? l / pen : l * pen;
    }
}
