// BGMV (decode) kernels for the LoRA delta: one (row, position) pair per block, the pair's slot gathered per row.
// Framework-free: raw pointers, sizes, strides; only CUDA headers.
//
// shrink: part[z, e, r] = sum_{k in chunk z} x[m, k] * A[slot, r, k]        for r < rank[slot]   (fp32)
// expand: y[m, n]      += sum_p scale[slot_p] * sum_{r < rank} (sum_z part[z, e_p, r]) * B[slot_p, n, r]
#pragma once

#include "peft_kernels/adapter_linear.h"
#include "peft_kernels/common.cuh"

namespace peft_kernels {

// Sum over the block of RB per-thread values; thread i < RB gets total i. Needs THREADS / 32 * RB floats of smem.
template <int RB, int THREADS>
__device__ __forceinline__ void block_sum(float (&v)[RB], float* smem) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < RB; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RB; ++i) smem[i * kWarps + warp] = v[i];
  }
  __syncthreads();
  if (threadIdx.x < RB) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += smem[threadIdx.x * kWarps + w];
    v[0] = s;  // only v[0] is meaningful afterwards, for thread i = threadIdx.x < RB
  }
}

// Split-K GEMV shrink. grid (M * P, ceil(R / RB), ksplit), block THREADS. Each block computes RB rank rows of one
// pair over one K chunk; blocks past the slot's true rank exit at once, so the cost follows the true rank.
// VEC: 16-byte loads (K, strides and pointers aligned to 16 / sizeof(T) elements; the host checks).
template <typename T, int RB, int THREADS, bool VEC>
__global__ void __launch_bounds__(THREADS) bgmv_shrink_kernel(const LoraShrinkArgs args) {
  __shared__ float red[RB * (THREADS / 32)];
  const int e = blockIdx.x;
  const int slot = args.ids[e];
  if (slot < 0) return;  // -1: no adapter at this position; never used as an index
  const int rank = clamp_rank(args.ranks[slot], args.R);
  const int r0 = blockIdx.y * RB;
  if (r0 >= rank) return;
  const int nrows = min(RB, rank - r0);
  const int m = e / args.P;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * args.k_chunk;
  const int64_t k_end = min(static_cast<int64_t>(args.K), k_begin + args.k_chunk);

  const T* __restrict__ xr = static_cast<const T*>(args.x) + static_cast<int64_t>(m) * args.x_stride;
  const T* __restrict__ a0 = static_cast<const T*>(args.a) + static_cast<int64_t>(slot) * args.a_slot_stride +
                             static_cast<int64_t>(r0) * args.a_row_stride;

  float acc[RB];
#pragma unroll
  for (int i = 0; i < RB; ++i) acc[i] = 0.f;

  if constexpr (VEC) {
    constexpr int kVec = VecWidth<T>::value;
    for (int64_t k = k_begin + static_cast<int64_t>(threadIdx.x) * kVec; k < k_end; k += THREADS * kVec) {
      float xv[kVec];
      load_vec_f32(xr + k, xv);
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        if (i < nrows) {
          float av[kVec];
          load_vec_f32(a0 + i * args.a_row_stride + k, av);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[i] = fmaf(xv[j], av[j], acc[i]);
        }
      }
    }
  } else {
    for (int64_t k = k_begin + threadIdx.x; k < k_end; k += THREADS) {
      const float xv = to_float(xr[k]);
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        if (i < nrows) acc[i] = fmaf(xv, to_float(a0[i * args.a_row_stride + k]), acc[i]);
      }
    }
  }

  block_sum<RB, THREADS>(acc, red);
  if (threadIdx.x < nrows) {
    const int64_t num_pairs = static_cast<int64_t>(args.M) * args.P;
    args.part[(static_cast<int64_t>(blockIdx.z) * num_pairs + e) * args.R + r0 + threadIdx.x] = acc[0];
  }
}

// Per-row expand. grid (ceil(N / THREADS), M), block THREADS. Each thread owns one output column n and sums every
// position of its row; one read-modify-write of y per row, none for rows without adapters (their base output stays
// bitwise untouched). The shrink result (scale * sum of split-K partials) is staged in smem, RCHUNK ranks at a time.
// No __launch_bounds__: with it ptxas caps this kernel at 32 registers (full occupancy at 128 threads) and spills.
template <typename T, int THREADS, int RCHUNK, bool VEC>
__global__ void bgmv_expand_kernel(const LoraExpandArgs args) {
  __shared__ float sbuf[RCHUNK];
  const int m = blockIdx.y;
  const int n = blockIdx.x * THREADS + threadIdx.x;
  const int64_t num_pairs = static_cast<int64_t>(args.M) * args.P;
  const T* __restrict__ brow = nullptr;
  float acc = 0.f;
  bool any = false;
  for (int p = 0; p < args.P; ++p) {
    const int64_t e = static_cast<int64_t>(m) * args.P + p;
    const int slot = args.ids[e];  // uniform over the block
    if (slot < 0) continue;
    const int rank = clamp_rank(args.ranks[slot], args.R);
    any = true;
    const float s = args.scale[slot];
    if (n < args.N)
      brow = static_cast<const T*>(args.b) + static_cast<int64_t>(slot) * args.b_slot_stride +
             static_cast<int64_t>(n) * args.b_row_stride;
    for (int r0 = 0; r0 < rank; r0 += RCHUNK) {
      const int len = min(RCHUNK, rank - r0);
      __syncthreads();  // the previous chunk of sbuf is consumed
      for (int r = threadIdx.x; r < len; r += THREADS) {
        float v = 0.f;
        for (int z = 0; z < args.ksplit; ++z) v += args.part[(z * num_pairs + e) * args.R + r0 + r];
        sbuf[r] = s * v;
      }
      __syncthreads();
      if (n < args.N) {
        float dot = 0.f;
        int r = 0;
        if constexpr (VEC) {
          constexpr int kVec = VecWidth<T>::value;
          for (; r + kVec <= len; r += kVec) {  // r0 is a multiple of RCHUNK, itself a multiple of kVec
            float bv[kVec];
            load_vec_f32(brow + r0 + r, bv);
#pragma unroll
            for (int j = 0; j < kVec; ++j) dot = fmaf(sbuf[r + j], bv[j], dot);
          }
        }
        for (; r < len; ++r) dot = fmaf(sbuf[r], to_float(brow[r0 + r]), dot);
        acc += dot;
      }
    }
  }
  if (any && n < args.N) {
    T* yp = static_cast<T*>(args.y) + static_cast<int64_t>(m) * args.y_stride + n;
    *yp = from_float<T>(to_float(*yp) + acc);
  }
}

}  // namespace peft_kernels
