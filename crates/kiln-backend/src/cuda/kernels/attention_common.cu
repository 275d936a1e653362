// Helpers the attention kernels share (prepended after common.cu).
//
// Step metadata, packed by the host (cuda/block_table.rs) once per step:
//   block_tables  [n_seqs][table_stride] int, physical block ids (padding: 0)
//   context_lens  [n_seqs] int, tokens of context after this step
//   query_starts  [n_seqs] int, first token of the sequence in the step
//   query_lens    [n_seqs] int, tokens the step computes for it
//   token_seqs    [n_tokens] int, the sequence of each token
// A query at position `pos` (context_len - query_len + its index in the
// sequence) sees keys first..=pos, first = max(0, pos + 1 - window) with a
// sliding window, else 0. Heads share KV heads in groups of
// n_heads / n_kv_heads (GQA). head_dim is at most KILN_MAX_HEAD_DIM and a
// block has KILN_ATTN_THREADS threads; the host checks both.
#define KILN_ATTN_THREADS 128
#define KILN_MAX_HEAD_DIM 256
#define KILN_DIMS_PER_THREAD (KILN_MAX_HEAD_DIM / KILN_ATTN_THREADS)

// Address of dimension 0 of KV head `kvh`'s entry for logical position `k`.
__device__ __forceinline__ long long kv_at(const int* __restrict__ table, int k, int kvh,
                                           int n_kv_heads, int block_size, int head_dim) {
    const long long phys = table[k / block_size];
    return ((phys * n_kv_heads + kvh) * block_size + (k % block_size)) * head_dim;
}

// q . key * scale for keys [k0, k1), one warp per key, into scores[k - k0].
template <typename T>
__device__ __forceinline__ void score_keys(const float* __restrict__ q_s, const T* __restrict__ k_cache,
                                           const int* __restrict__ table, int kvh, int n_kv_heads,
                                           int block_size, int head_dim, float scale, int k0, int k1,
                                           float* __restrict__ scores) {
    const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
    const int warps = blockDim.x / KILN_WARP;
    for (int k = k0 + warp; k < k1; k += warps) {
        const T* key = k_cache + kv_at(table, k, kvh, n_kv_heads, block_size, head_dim);
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += KILN_WARP) dot += q_s[d] * to_f32(key[d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[k - k0] = dot * scale;
    }
}
