// Causal prefill attention over the paged cache: any number of query tokens
// per sequence (prefill chunks and decode tokens mixed), each attending to
// its sequence's cached keys first..=pos (this step's keys already written).
//
// Grid: (n_heads, n_tokens); block: KILN_ATTN_THREADS threads; dynamic
// shared memory: (head_dim + KILN_PREFILL_CHUNK) floats. Keys are taken in
// chunks with an online softmax (running max and sum, the accumulator
// rescaled when the max grows), so any context length fits in fixed shared
// memory. Thread i owns output dimensions i and i + KILN_ATTN_THREADS.
// A first version: one block per (token, head) re-reads the sequence's keys
// for every query; a tiled kernel sharing keys across queries is the next step.
#define KILN_PREFILL_CHUNK 256

template <typename T>
__device__ void attention_prefill(T* __restrict__ out, const T* __restrict__ q,
                                  const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                  const int* __restrict__ block_tables,
                                  const int* __restrict__ context_lens,
                                  const int* __restrict__ query_starts,
                                  const int* __restrict__ query_lens,
                                  const int* __restrict__ token_seqs, int table_stride,
                                  int n_heads, int n_kv_heads, int head_dim, int block_size,
                                  float scale, int window) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* q_s = smem;
    float* scores = smem + head_dim;
    const int head = blockIdx.x, token = blockIdx.y;
    const int seq = token_seqs[token];
    const int kvh = head / (n_heads / n_kv_heads);
    const int pos = context_lens[seq] - query_lens[seq] + (token - query_starts[seq]);
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int* table = block_tables + (long long)seq * table_stride;
    const long long qo = ((long long)token * n_heads + head) * head_dim;

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = to_f32(q[qo + d]);
    __syncthreads();
    float acc[KILN_DIMS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < KILN_DIMS_PER_THREAD; ++j) acc[j] = 0.0f;
    float m = -KILN_INF, l = 0.0f;
    for (int k0 = first; k0 <= pos; k0 += KILN_PREFILL_CHUNK) {
        const int k1 = min(pos + 1, k0 + KILN_PREFILL_CHUNK);
        const int n = k1 - k0;
        score_keys<T>(q_s, k_cache, table, kvh, n_kv_heads, block_size, head_dim, scale, k0, k1,
                      scores);
        __syncthreads();
        float cm = -KILN_INF;
        for (int i = threadIdx.x; i < n; i += blockDim.x) cm = fmaxf(cm, scores[i]);
        cm = block_max(cm, scratch);
        const float m_new = fmaxf(m, cm);
        const float rescale = __expf(m - m_new); // 0 on the first chunk (m = -inf)
        float cs = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float e = __expf(scores[i] - m_new);
            scores[i] = e;
            cs += e;
        }
        cs = block_sum(cs, scratch);
        l = l * rescale + cs;
        m = m_new;
#pragma unroll
        for (int j = 0; j < KILN_DIMS_PER_THREAD; ++j) {
            const int d = threadIdx.x + j * KILN_ATTN_THREADS;
            if (d >= head_dim) continue;
            float a = acc[j] * rescale;
            for (int i = 0; i < n; ++i) {
                const T* val = v_cache + kv_at(table, k0 + i, kvh, n_kv_heads, block_size, head_dim);
                a += scores[i] * to_f32(val[d]);
            }
            acc[j] = a;
        }
        __syncthreads(); // scores[] is overwritten by the next chunk
    }
#pragma unroll
    for (int j = 0; j < KILN_DIMS_PER_THREAD; ++j) {
        const int d = threadIdx.x + j * KILN_ATTN_THREADS;
        if (d < head_dim) out[qo + d] = from_f32<T>(l > 0.0f ? acc[j] / l : 0.0f);
    }
}

#define KILN_PREFILL(NAME, T)                                                                      \
    extern "C" __global__ void attention_prefill_##NAME(                                          \
        T* out, const T* q, const T* k_cache, const T* v_cache, const int* block_tables,           \
        const int* context_lens, const int* query_starts, const int* query_lens,                   \
        const int* token_seqs, int table_stride, int n_heads, int n_kv_heads, int head_dim,        \
        int block_size, float scale, int window) {                                                 \
        attention_prefill<T>(out, q, k_cache, v_cache, block_tables, context_lens, query_starts,  \
                             query_lens, token_seqs, table_stride, n_heads, n_kv_heads, head_dim, \
                             block_size, scale, window);                                           \
    }
KILN_PREFILL(bf16, __nv_bfloat16)
KILN_PREFILL(f16, __half)
