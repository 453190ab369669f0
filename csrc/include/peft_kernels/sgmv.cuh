// SGMV (prefill) kernels for the LoRA delta: (row, position) pairs sorted by key g = p * S + slot into segments,
// each segment cut into tiles of BM pairs; one block per (tile, output block). The slot's A / B tiles are loaded once
// per tile and reused by all its rows. Framework-free: raw pointers, sizes, strides; only CUDA headers.
//
// shrink: part[z, e, r] = sum_{k in chunk z} x[m_e, k] * A[slot, r, k]           for r < rank[slot]   (fp32)
// expand: y[m_e, n]    += scale[slot] * sum_{r < rank} (sum_z part[z, e, r]) * B[slot, n, r]   (one launch per p)
//
// Tiled fp32 FMA on CUDA cores (register micro-tiles, fp32 shared-memory tiles). Tensor-core (mma.sync) tiles are a
// later step; the arithmetic here is R / N of the base GEMM's, which cuBLAS runs on tensor cores.
#pragma once

#include "peft_kernels/adapter_linear.h"
#include "peft_kernels/common.cuh"

namespace peft_kernels {

// Resolves block -> (segment, slot, first sorted entry, valid rows) and stages the tile's pair indices in smem.
// Returns false (uniformly over the block) when the block has no work.
template <int BM>
__device__ __forceinline__ bool sgmv_tile(const int32_t* __restrict__ tile_start, const int32_t* __restrict__ seg_start,
                                          const int32_t* __restrict__ sorted_pairs, int g_lo, int g_hi, int t, int S,
                                          int* slot, int* rows, int* spairs) {
  const int g = find_segment(tile_start, g_lo, g_hi, t);
  if (g < 0) return false;
  const int offset = (t - tile_start[g]) * BM;
  const int first = seg_start[g] + offset;
  *rows = min(BM, seg_start[g + 1] - first);
  *slot = g % S;
  for (int i = threadIdx.x; i < BM; i += blockDim.x) spairs[i] = i < *rows ? sorted_pairs[first + i] : -1;
  return *rows > 0;
}

// grid (num_tiles_bound, ceil(R / BN), ksplit), block THREADS = (BM / TM) * BN.
template <typename T, int BM, int BN, int BK, int TM, int THREADS>
__global__ void __launch_bounds__(THREADS) sgmv_shrink_kernel(const LoraShrinkArgs args) {
  static_assert((BM / TM) * BN == THREADS, "one TM x 1 micro-tile per thread");
  __shared__ float xs[BK][BM + 1];
  __shared__ float as[BK][BN + 1];
  __shared__ int spairs[BM];
  __shared__ int srow[BM];

  int slot, rows;
  if (!sgmv_tile<BM>(args.tile_start, args.seg_start, args.sorted_pairs, 0, args.P * args.S, blockIdx.x, args.S,
                     &slot, &rows, spairs))
    return;
  const int rank = clamp_rank(args.ranks[slot], args.R);
  const int n0 = blockIdx.y * BN;
  if (n0 >= rank) return;  // cost follows the true rank
  __syncthreads();
  for (int i = threadIdx.x; i < BM; i += THREADS) srow[i] = i < rows ? spairs[i] / args.P : 0;
  __syncthreads();

  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * args.k_chunk;
  const int64_t k_end = min(static_cast<int64_t>(args.K), k_begin + args.k_chunk);
  const T* __restrict__ x = static_cast<const T*>(args.x);
  const T* __restrict__ a = static_cast<const T*>(args.a) + static_cast<int64_t>(slot) * args.a_slot_stride;

  const int tx = threadIdx.x % BN;  // rank column
  const int ty = threadIdx.x / BN;  // rows ty * TM .. ty * TM + TM - 1
  float acc[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) acc[i] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {  // consecutive threads: consecutive k (coalesced)
      const int i = idx / BK, kk = idx % BK;
      float v = 0.f;
      if (i < rows && k0 + kk < k_end) v = to_float(x[static_cast<int64_t>(srow[i]) * args.x_stride + k0 + kk]);
      xs[kk][i] = v;
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
      const int j = idx / BK, kk = idx % BK;
      float v = 0.f;
      if (n0 + j < rank && k0 + kk < k_end) v = to_float(a[static_cast<int64_t>(n0 + j) * args.a_row_stride + k0 + kk]);
      as[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float av = as[kk][tx];
#pragma unroll
      for (int i = 0; i < TM; ++i) acc[i] = fmaf(xs[kk][ty * TM + i], av, acc[i]);
    }
    __syncthreads();
  }

  const int64_t num_pairs = static_cast<int64_t>(args.M) * args.P;
  if (n0 + tx < rank) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int row = ty * TM + i;
      if (row < rows)
        args.part[(static_cast<int64_t>(blockIdx.z) * num_pairs + spairs[row]) * args.R + n0 + tx] = acc[i];
    }
  }
}

// grid (num_tiles_bound, ceil(N / BN)) for position args.position, block THREADS = (BM / TM) * (BN / TN).
// Within one launch every pair has position p, so every y row is written by at most one block per column tile.
template <typename T, int BM, int BN, int BK, int TM, int TN, int THREADS>
__global__ void __launch_bounds__(THREADS) sgmv_expand_kernel(const LoraExpandArgs args) {
  static_assert((BM / TM) * (BN / TN) == THREADS, "one TM x TN micro-tile per thread");
  constexpr int kTX = BN / TN;
  __shared__ float ss[BK][BM + 1];
  __shared__ float bs[BK][BN + 1];
  __shared__ int spairs[BM];

  const int g_lo = args.position * args.S, g_hi = g_lo + args.S;
  const int t = args.tile_start[g_lo] + static_cast<int>(blockIdx.x);
  int slot, rows;
  if (!sgmv_tile<BM>(args.tile_start, args.seg_start, args.sorted_pairs, g_lo, g_hi, t, args.S, &slot, &rows, spairs))
    return;
  const int rank = clamp_rank(args.ranks[slot], args.R);
  if (rank == 0) return;
  const float s = args.scale[slot];
  const int n0 = blockIdx.y * BN;
  __syncthreads();

  const T* __restrict__ b = static_cast<const T*>(args.b) + static_cast<int64_t>(slot) * args.b_slot_stride;
  const int64_t num_pairs = static_cast<int64_t>(args.M) * args.P;
  const int tx = threadIdx.x % kTX;  // columns tx + kTX * j
  const int ty = threadIdx.x / kTX;  // rows ty * TM + i
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }

  for (int r0 = 0; r0 < rank; r0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {
      const int i = idx / BK, kk = idx % BK;
      float v = 0.f;
      if (i < rows && r0 + kk < rank) {
        const float* p = args.part + static_cast<int64_t>(spairs[i]) * args.R + r0 + kk;
        for (int z = 0; z < args.ksplit; ++z) v += p[z * num_pairs * args.R];
      }
      ss[kk][i] = v;
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {  // B rows are contiguous along r
      const int j = idx / BK, kk = idx % BK;
      float v = 0.f;
      if (n0 + j < args.N && r0 + kk < rank) v = to_float(b[static_cast<int64_t>(n0 + j) * args.b_row_stride + r0 + kk]);
      bs[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float sv[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) sv[i] = ss[kk][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = bs[kk][tx + kTX * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(sv[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int row = ty * TM + i;
    if (row >= rows) continue;
    T* yrow = static_cast<T*>(args.y) + static_cast<int64_t>(spairs[row] / args.P) * args.y_stride;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int n = n0 + tx + kTX * j;
      if (n < args.N) yrow[n] = from_float<T>(to_float(yrow[n]) + s * acc[i][j]);
    }
  }
}

}  // namespace peft_kernels
