// Paged-attention decode: one query token per sequence (its last), split
// along the context for long sequences.
//
// Grid: (n_heads, n_seqs, n_splits); block: KILN_ATTN_THREADS threads;
// dynamic shared memory: (head_dim + partition) floats. Split j covers keys
// [first + j * partition, ...) of the query's visible range. With one split
// the kernel writes the normalised output directly; with more it writes
// per split the unnormalised sum of exp(score - max) * value, the max and
// the sum of exp(score - max), and `attention_decode_reduce` combines them.
template <typename T>
__device__ void attention_decode(T* __restrict__ out, float* __restrict__ part_out,
                                 float* __restrict__ part_max, float* __restrict__ part_sum,
                                 const T* __restrict__ q, const T* __restrict__ k_cache,
                                 const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                                 const int* __restrict__ context_lens,
                                 const int* __restrict__ query_starts, int table_stride,
                                 int n_heads, int n_kv_heads, int head_dim, int block_size,
                                 float scale, int window, int partition) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* q_s = smem;
    float* scores = smem + head_dim;
    const int head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int kvh = head / (n_heads / n_kv_heads);
    const int pos = context_lens[seq] - 1;
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int k0 = first + split * partition;
    const int k1 = min(pos + 1, k0 + partition);
    const int* table = block_tables + (long long)seq * table_stride;
    const int token = query_starts[seq];
    const long long qo = ((long long)token * n_heads + head) * head_dim;
    const long long part = ((long long)seq * n_heads + head) * splits + split;

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = to_f32(q[qo + d]);
    __syncthreads();
    if (k0 >= k1) {
        // An empty split (the context is shorter than the grid assumed).
        if (splits > 1) {
            for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part_out[part * head_dim + d] = 0.0f;
            if (threadIdx.x == 0) {
                part_max[part] = -KILN_INF;
                part_sum[part] = 0.0f;
            }
        }
        return;
    }
    score_keys<T>(q_s, k_cache, table, kvh, n_kv_heads, block_size, head_dim, scale, k0, k1, scores);
    __syncthreads();
    const int n = k1 - k0;
    float m = -KILN_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scores[i]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = __expf(scores[i] - m);
        scores[i] = e;
        s += e;
    }
    s = block_sum(s, scratch); // its internal barriers also publish scores[]
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) {
            const T* val = v_cache + kv_at(table, k0 + i, kvh, n_kv_heads, block_size, head_dim);
            acc += scores[i] * to_f32(val[d]);
        }
        if (splits == 1) {
            out[qo + d] = from_f32<T>(acc / s);
        } else {
            part_out[part * head_dim + d] = acc;
        }
    }
    if (splits > 1 && threadIdx.x == 0) {
        part_max[part] = m;
        part_sum[part] = s;
    }
}

// Combines the splits of `attention_decode`: grid (n_heads, n_seqs), threads over head_dim.
template <typename T>
__device__ void attention_decode_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                                        const float* __restrict__ part_max,
                                        const float* __restrict__ part_sum,
                                        const int* __restrict__ query_starts, int n_heads,
                                        int head_dim, int splits) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const long long base = ((long long)seq * n_heads + head) * splits;
    float m = -KILN_INF;
    for (int j = 0; j < splits; ++j) m = fmaxf(m, part_max[base + j]);
    float total = 0.0f;
    for (int j = 0; j < splits; ++j)
        if (part_max[base + j] > -KILN_INF) total += part_sum[base + j] * __expf(part_max[base + j] - m);
    const long long qo = ((long long)query_starts[seq] * n_heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < splits; ++j)
            if (part_max[base + j] > -KILN_INF)
                acc += part_out[(base + j) * head_dim + d] * __expf(part_max[base + j] - m);
        out[qo + d] = from_f32<T>(total > 0.0f ? acc / total : 0.0f);
    }
}

#define KILN_DECODE(NAME, T)                                                                       \
    extern "C" __global__ void attention_decode_##NAME(                                           \
        T* out, float* part_out, float* part_max, float* part_sum, const T* q, const T* k_cache,   \
        const T* v_cache, const int* block_tables, const int* context_lens,                        \
        const int* query_starts, int table_stride, int n_heads, int n_kv_heads, int head_dim,      \
        int block_size, float scale, int window, int partition) {                                  \
        attention_decode<T>(out, part_out, part_max, part_sum, q, k_cache, v_cache, block_tables,  \
                            context_lens, query_starts, table_stride, n_heads, n_kv_heads,         \
                            head_dim, block_size, scale, window, partition);                       \
    }                                                                                              \
    extern "C" __global__ void attention_decode_reduce_##NAME(                                    \
        T* out, const float* part_out, const float* part_max, const float* part_sum,               \
        const int* query_starts, int n_heads, int head_dim, int splits) {                          \
        attention_decode_reduce<T>(out, part_out, part_max, part_sum, query_starts, n_heads,       \
                                   head_dim, splits);                                              \
    }
KILN_DECODE(bf16, __nv_bfloat16)
KILN_DECODE(f16, __half)
