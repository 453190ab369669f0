// LoKr delta kernels: dW = s * kron(w1, w2), w1 [a, b], w2 [c, d], applied without forming the Kronecker product.
// With X = x[m].reshape(b, d):  delta = s * vec(w1 X w2^T)   (a x c, row-major: y[m, p * c + q]).
// Framework-free: raw pointers, sizes, strides; only CUDA headers. Simple and correct first: one output per thread.
//
// stage 1: tbuf[e, j, q] = sum_l X[m_e, j, l] * w2[slot_e, q, l]                     (fp32, e = m * Q + position)
// stage 2: y[m, p * c + q] += sum_pos scale[slot] * sum_j w1[slot, p, j] * tbuf[e, j, q]   (one write per row)
#pragma once

#include "peft_kernels/adapter_linear.h"
#include "peft_kernels/common.cuh"

namespace peft_kernels {

// grid (M * Q, ceil(b * c / THREADS)).
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) lokr_stage1_kernel(const LokrArgs args) {
  const int e = blockIdx.x;
  const int slot = args.ids[e];
  if (slot < 0) return;  // -1: no adapter at this position; never used as an index
  const int idx = blockIdx.y * THREADS + threadIdx.x;
  if (idx >= args.b * args.c) return;
  const int j = idx / args.c, q = idx % args.c;
  const int m = e / args.Q;
  const T* __restrict__ xr =
      static_cast<const T*>(args.x) + static_cast<int64_t>(m) * args.x_stride + static_cast<int64_t>(j) * args.d;
  const T* __restrict__ w2r = static_cast<const T*>(args.w2) + static_cast<int64_t>(slot) * args.w2_slot_stride +
                              static_cast<int64_t>(q) * args.w2_row_stride;
  float acc = 0.f;
  for (int l = 0; l < args.d; ++l) acc = fmaf(to_float(xr[l]), to_float(w2r[l]), acc);
  args.tbuf[static_cast<int64_t>(e) * args.b * args.c + idx] = acc;
}

// grid (M, ceil(N / THREADS)), N = a * c. Consecutive threads: consecutive q, so tbuf reads are coalesced and w1
// reads are broadcasts.
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) lokr_stage2_kernel(const LokrArgs args) {
  const int m = blockIdx.x;
  const int n = blockIdx.y * THREADS + threadIdx.x;
  if (n >= args.a * args.c) return;
  const int p = n / args.c, q = n % args.c;
  const int64_t bc = static_cast<int64_t>(args.b) * args.c;
  float acc = 0.f;
  bool any = false;
  for (int pos = 0; pos < args.Q; ++pos) {
    const int64_t e = static_cast<int64_t>(m) * args.Q + pos;
    const int slot = args.ids[e];
    if (slot < 0) continue;
    any = true;
    const T* __restrict__ w1r = static_cast<const T*>(args.w1) + static_cast<int64_t>(slot) * args.w1_slot_stride +
                                static_cast<int64_t>(p) * args.w1_row_stride;
    const float* __restrict__ tcol = args.tbuf + e * bc + q;
    float dot = 0.f;
    for (int j = 0; j < args.b; ++j) dot = fmaf(to_float(w1r[j]), tcol[static_cast<int64_t>(j) * args.c], dot);
    acc = fmaf(args.scale[slot], dot, acc);
  }
  if (any) {
    T* yp = static_cast<T*>(args.y) + static_cast<int64_t>(m) * args.y_stride + n;
    *yp = from_float<T>(to_float(*yp) + acc);
  }
}

}  // namespace peft_kernels
