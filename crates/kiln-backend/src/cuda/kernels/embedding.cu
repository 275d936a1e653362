// Embedding gather: out[t, :] = table[tokens[t], :].
// Grid: one block per token; threads stride over `dim`. A token id outside
// the vocabulary (the host validates ids first; this is the last guard)
// yields a zero row rather than a read out of bounds.
template <typename T>
__device__ void embedding(T* __restrict__ out, const T* __restrict__ table,
                          const unsigned int* __restrict__ tokens, int dim, int vocab) {
    const int t = blockIdx.x;
    const unsigned int id = tokens[t];
    T* row = out + (long long)t * dim;
    if (id >= (unsigned int)vocab) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = from_f32<T>(0.0f);
        return;
    }
    const T* src = table + (long long)id * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = src[i];
}

// Learned position embeddings (OPT, GPT-2): x[t, :] += table[positions[t] + offset, :].
template <typename T>
__device__ void add_position_embedding(T* __restrict__ x, const T* __restrict__ table,
                                       const unsigned int* __restrict__ positions, int offset,
                                       int dim, int rows) {
    const int t = blockIdx.x;
    const long long p = (long long)positions[t] + offset;
    if (p < 0 || p >= rows) return;
    T* row = x + (long long)t * dim;
    const T* src = table + p * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        row[i] = from_f32<T>(to_f32(row[i]) + to_f32(src[i]));
}

#define KILN_EMBEDDING(NAME, T)                                                                    \
    extern "C" __global__ void embedding_##NAME(T* out, const T* table,                           \
                                                const unsigned int* tokens, int dim, int vocab) {  \
        embedding<T>(out, table, tokens, dim, vocab);                                              \
    }                                                                                              \
    extern "C" __global__ void add_position_embedding_##NAME(                                      \
        T* x, const T* table, const unsigned int* positions, int offset, int dim, int rows) {      \
        add_position_embedding<T>(x, table, positions, offset, dim, rows);                         \
    }
KILN_EMBEDDING(bf16, __nv_bfloat16)
KILN_EMBEDDING(f16, __half)
