// CPU emulation of the small CUDA subset the adapter_linear kernels use, for testing without a GPU.
//
// NOT part of any build of the package: tests/ops/test_adapter_linear_cuda.py compiles the framework-free kernels
// (csrc/cuda/{bgmv,sgmv,lokr}.cu, with `kernel<<<...>>>(args)` rewritten to `peft_emu::launch(kernel, ...)`) and the
// torch launcher (with -DPEFT_KERNELS_EMULATE) as plain C++ against this header, which the fake cuda_*.h headers in
// this directory include. Each block's threads run as fibers (ucontext) on one OS thread; __syncthreads and
// __shfl_xor_sync switch fibers, so every thread of the block reaches a barrier before any passes it.
// __shared__ becomes `static` (blocks run one after another). What this checks: indexing, masking, segment/tile
// tables, split-K bookkeeping, fp16/bf16 rounding, the launcher's host logic. What it cannot: the GPU memory model,
// real warp scheduling, alignment faults, performance.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned int x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};

using cudaStream_t = struct CUstream_emu*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 108;  // an A100's SM count: drives the split-K heuristics as on a GPU
  return cudaSuccess;
}

// ---- fp16 / bf16 storage types with round-to-nearest-even conversions ------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline uint32_t emu_f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float emu_u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return emu_u2f(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {                                                     // zero / subnormal
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  return emu_u2f(sign | ((exp + 112) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = emu_f2u(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return {static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 65520.f) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (a < 6.103515625e-05f) {                                           // subnormal half: multiples of 2^-24
    const float q = std::nearbyint(a * 16777216.f);                    // default rounding mode: to nearest even
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(q))};
  }
  const uint32_t au = u & 0x7fffffffu;
  uint32_t mant = au & 0x7fffffu, exp = (au >> 23) - 112;  // half exponent
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return {static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu_u2f(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu_f2u(f);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename A>
inline A min(A a, A b) {
  return b < a ? b : a;
}
template <typename A>
inline A max(A a, A b) {
  return a < b ? b : a;
}

// ---- threads as fibers ----------------------------------------------------------------------------------------
namespace peft_emu {

extern dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;

// Switch to the next fiber; returns when every live thread of the block has reached the same point.
void barrier();
float shfl_xor(float v, int lane_mask);

using BlockFn = void (*)(const void* kernel, const void* args);
void run_grid(dim3 grid, dim3 block, BlockFn fn, const void* kernel, const void* args);

template <typename Args>
void call_kernel(const void* kernel, const void* args) {
  reinterpret_cast<void (*)(Args)>(const_cast<void*>(kernel))(*static_cast<const Args*>(args));
}

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, const Args& args) {
  run_grid(grid, block, &call_kernel<Args>, reinterpret_cast<const void*>(kernel), &args);
}

}  // namespace peft_emu

#define threadIdx (::peft_emu::threadIdx_)
#define blockIdx (::peft_emu::blockIdx_)
#define blockDim (::peft_emu::blockDim_)
#define gridDim (::peft_emu::gridDim_)

inline void __syncthreads() { ::peft_emu::barrier(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) { return ::peft_emu::shfl_xor(v, lane_mask); }
