// Shared prelude of every kiln kernel source: element types, conversions
// and the warp/block reductions. kiln prepends this file to each kernel
// source before NVRTC compiles it (NVRTC sees one translation unit).
//
// Conventions for every kernel:
// - activations and weights are bf16 or fp16 (`T`); all arithmetic and every
//   accumulator is fp32, converted back only when storing;
// - each templated kernel is exported as `extern "C"` entry points with a
//   `_bf16` or `_f16` suffix, so the host looks functions up by plain name;
// - launch geometry is chosen by the host (kernels.rs says which for each);
//   kernels guard every index against the sizes they are given.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define KILN_WARP 32
#define KILN_FULL_MASK 0xffffffffu
// +infinity (NVRTC has no <math.h> to take INFINITY from).
#define KILN_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = KILN_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(KILN_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = KILN_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KILN_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024);
// `scratch` holds 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
    const int warps = (blockDim.x + KILN_WARP - 1) / KILN_WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(r);
}

// Maximum over the whole block, as `block_sum`.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
    const int warps = (blockDim.x + KILN_WARP - 1) / KILN_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : -KILN_INF;
    return warp_max(r);
}
