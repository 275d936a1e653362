// Paged KV cache on the device.
//
// Slots, blocks and block tables mean what they mean on the CPU backend
// (`KvSpec`, `StepInput`): slot = block * block_size + offset, and a
// sequence's block table lists its physical blocks in order. Within a
// layer, keys and values are each stored as
//   [num_blocks][n_kv_heads][block_size][head_dim]   (element type T)
// so that one KV head's keys of a block are contiguous and a warp reads one
// key as consecutive dimensions (the CPU backend instead transposes keys
// within a block for its SIMD lanes; the layout is private to each backend).
//
// write_kv: stores this step's keys and values ([tokens, n_kv_heads *
// head_dim]) at each token's slot. Grid: one block per token; a slot beyond
// the cache is skipped (the host validates slots first).
template <typename T>
__device__ void write_kv(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                         const T* __restrict__ v, const unsigned int* __restrict__ slots,
                         int n_kv_heads, int head_dim, int block_size, long long num_slots) {
    const int t = blockIdx.x;
    const long long slot = slots[t];
    if (slot >= num_slots) return;
    const long long block = slot / block_size, off = slot % block_size;
    const int width = n_kv_heads * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        const long long at = ((block * n_kv_heads + h) * block_size + off) * head_dim + d;
        k_cache[at] = k[(long long)t * width + i];
        v_cache[at] = v[(long long)t * width + i];
    }
}

#define KILN_WRITE_KV(NAME, T)                                                                     \
    extern "C" __global__ void write_kv_##NAME(T* k_cache, T* v_cache, const T* k, const T* v,    \
                                               const unsigned int* slots, int n_kv_heads,          \
                                               int head_dim, int block_size, long long num_slots) { \
        write_kv<T>(k_cache, v_cache, k, v, slots, n_kv_heads, head_dim, block_size, num_slots);   \
    }
KILN_WRITE_KV(bf16, __nv_bfloat16)
KILN_WRITE_KV(f16, __half)
