// Rotary position embeddings, in place on x: [tokens, n_heads * head_dim].
//
// The first `rot_dim` dimensions of each head rotate by the token's
// position, with cos_sin: [max_pos, rot_dim] in T (cosines in the first
// half of a row, sines in the second; rounded to T as Hugging Face does
// before applying them), as the CPU backend's rope:
//   layout 0 (interleaved): pairs (2i, 2i+1)   (GPT-J, GGUF llama)
//   layout 1 (half-split):  pairs (i, i + rot_dim/2)   (HF llama, NeoX)
//   x0' = x0 cos - x1 sin,  x1' = x0 sin + x1 cos
// Grid: one block per token; threads stride over (head, pair). A position
// beyond the table leaves the row untouched (the host checks first).
template <typename T>
__device__ void rope(T* __restrict__ x, const T* __restrict__ cos_sin,
                     const unsigned int* __restrict__ positions, int n_heads, int head_dim,
                     int rot_dim, int layout, int max_pos) {
    const int t = blockIdx.x;
    const unsigned int p = positions[t];
    if (p >= (unsigned int)max_pos) return;
    const int half = rot_dim / 2;
    const T* cs = cos_sin + (long long)p * rot_dim;
    T* row = x + (long long)t * n_heads * head_dim;
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        const int a = layout == 0 ? 2 * i : i;
        const int b = layout == 0 ? 2 * i + 1 : i + half;
        T* hp = row + h * head_dim;
        const float x0 = to_f32(hp[a]), x1 = to_f32(hp[b]);
        const float c = to_f32(cs[i]), s = to_f32(cs[half + i]);
        hp[a] = from_f32<T>(x0 * c - x1 * s);
        hp[b] = from_f32<T>(x0 * s + x1 * c);
    }
}

#define KILN_ROPE(NAME, T)                                                                         \
    extern "C" __global__ void rope_##NAME(T* x, const T* cos_sin,                               \
                                           const unsigned int* positions, int n_heads,             \
                                           int head_dim, int rot_dim, int layout, int max_pos) {   \
        rope<T>(x, cos_sin, positions, n_heads, head_dim, rot_dim, layout, max_pos);               \
    }
KILN_ROPE(bf16, __nv_bfloat16)
KILN_ROPE(f16, __half)
