// Framework-free helpers shared by the adapter kernels: dtype conversion, vector loads, tile lookup.
// Only CUDA headers here (FlashInfer rule): no torch, no ATen.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "peft_kernels/adapter_linear.h"

namespace peft_kernels {

// The one dtype switch of the host launch functions: calls f(T{}) with T the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------------
// Element conversion. All arithmetic is fp32; storage is T (float, __half, __nv_bfloat16).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector load.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// Load VEC = 16 / sizeof(T) consecutive elements (16-byte aligned address) and widen them to fp32. Written with
// register-only bit moves (no union of arrays, which ptxas may place on the stack).
__device__ __forceinline__ void load_vec_f32(const float* __restrict__ p, float (&out)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

__device__ __forceinline__ float2 unpack2(unsigned int w, const __half*) {
  __half2 h;
  *reinterpret_cast<unsigned int*>(&h) = w;
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(unsigned int w, const __nv_bfloat16*) {
  __nv_bfloat162 h;
  *reinterpret_cast<unsigned int*>(&h) = w;
  return __bfloat1622float2(h);
}

template <typename T>
__device__ __forceinline__ void load_vec_f32(const T* __restrict__ p, float (&out)[8]) {
  static_assert(sizeof(T) == 2, "8-wide loads are for 16-bit types");
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = unpack2(w[i], p);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int clamp_rank(int rank, int max_rank) { return rank < 0 ? 0 : (rank > max_rank ? max_rank : rank); }

// Segmented work lists (SGMV): segment g covers sorted entries [seg_start[g], seg_start[g+1]) and owns the tiles
// [tile_start[g], tile_start[g+1]) of BM entries each. Returns the segment g in [g_lo, g_hi) whose tile range holds
// tile t, or -1 when t is past the last tile. tile_start is non-decreasing, so a binary search finds it.
__device__ __forceinline__ int find_segment(const int32_t* __restrict__ tile_start, int g_lo, int g_hi, int t) {
  if (t < tile_start[g_lo] || t >= tile_start[g_hi]) return -1;
  int lo = g_lo, hi = g_hi;  // invariant: tile_start[lo] <= t < tile_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

}  // namespace peft_kernels
