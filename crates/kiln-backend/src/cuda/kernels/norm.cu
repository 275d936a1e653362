// Fused residual add and normalisation, one block per row.
//
// If `delta` is not null, the residual stream is updated first:
// residual[r] += delta[r] (stored back, rounded to T, exactly as the CPU
// backend's separate add then norm would see it); then
//   rms_norm:   out = residual * rsqrt(mean(residual^2) + eps) * w
//   layer_norm: out = (residual - mean) * rsqrt(var + eps) * w + b
// with the statistics in fp32 over the rounded residual. Block: 256 or
// 1024 threads; the row is read twice (once for the statistics, once to
// scale), which for a hidden size of 4096-8192 stays in L1/L2.
// Element `at` of the residual stream, with `delta` added to it first (and
// stored back, rounded to T) when `delta` is not null.
template <typename T>
__device__ __forceinline__ float add_residual(T* __restrict__ residual, const T* __restrict__ delta,
                                              long long at) {
    float v = to_f32(residual[at]);
    if (delta != nullptr) {
        const T r = from_f32<T>(v + to_f32(delta[at]));
        residual[at] = r;
        v = to_f32(r);
    }
    return v;
}

template <typename T>
__device__ void add_rms_norm(T* __restrict__ residual, const T* __restrict__ delta,
                             const T* __restrict__ w, T* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = add_residual(residual, delta, base + i);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[base + i] = from_f32<T>(to_f32(residual[base + i]) * inv * to_f32(w[i]));
}

template <typename T>
__device__ void add_layer_norm(T* __restrict__ residual, const T* __restrict__ delta,
                               const T* __restrict__ w, const T* __restrict__ b,
                               T* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = add_residual(residual, delta, base + i);
        s += v;
    }
    const float mean = block_sum(s, scratch) / (float)dim;
    // Two passes (mean, then squared deviations) as the CPU reference does,
    // rather than E[x^2] - mean^2, which cancels badly for large activations.
    float sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float d = to_f32(residual[base + i]) - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = (to_f32(residual[base + i]) - mean) * inv;
        out[base + i] = from_f32<T>(v * to_f32(w[i]) + to_f32(b[i]));
    }
}

#define KILN_NORM(NAME, T)                                                                         \
    extern "C" __global__ void add_rms_norm_##NAME(T* residual, const T* delta, const T* w,       \
                                                   T* out, int dim, float eps) {                   \
        add_rms_norm<T>(residual, delta, w, out, dim, eps);                                        \
    }                                                                                              \
    extern "C" __global__ void add_layer_norm_##NAME(T* residual, const T* delta, const T* w,     \
                                                     const T* b, T* out, int dim, float eps) {     \
        add_layer_norm<T>(residual, delta, w, b, out, dim, eps);                                   \
    }
KILN_NORM(bf16, __nv_bfloat16)
KILN_NORM(f16, __half)
