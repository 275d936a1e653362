// Element-wise non-linearities, as the CPU backend's `activate`:
//   act 0 silu:      x / (1 + e^-x)
//   act 1 gelu:      0.5 x (1 + erf(x / sqrt 2))
//   act 2 gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   act 3 relu:      max(x, 0)
// gated: out[i] = act(gate[i]) * up[i]. Grid-stride loops over n elements.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
    case 0: return x / (1.0f + expf(-x));
    case 1: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case 2: {
        const float c = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    default: return fmaxf(x, 0.0f);
    }
}

template <typename T>
__device__ void gated_activation(T* __restrict__ out, const T* __restrict__ gate,
                                 const T* __restrict__ up, long long n, int act) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(activate(to_f32(gate[i]), act) * to_f32(up[i]));
}

template <typename T>
__device__ void activation_inplace(T* __restrict__ x, long long n, int act) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(activate(to_f32(x[i]), act));
}

// Residual add on its own (x += y), for the decoder's adds that no norm follows.
template <typename T>
__device__ void add_inplace(T* __restrict__ x, const T* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
}

#define KILN_ACT(NAME, T)                                                                          \
    extern "C" __global__ void gated_activation_##NAME(T* out, const T* gate, const T* up,       \
                                                       long long n, int act) {                     \
        gated_activation<T>(out, gate, up, n, act);                                                \
    }                                                                                              \
    extern "C" __global__ void activation_inplace_##NAME(T* x, long long n, int act) {            \
        activation_inplace<T>(x, n, act);                                                          \
    }                                                                                              \
    extern "C" __global__ void add_inplace_##NAME(T* x, const T* y, long long n) {                \
        add_inplace<T>(x, y, n);                                                                   \
    }
KILN_ACT(bf16, __nv_bfloat16)
KILN_ACT(f16, __half)
