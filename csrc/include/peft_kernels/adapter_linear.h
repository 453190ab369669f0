// Host-side API of the adapter_linear CUDA kernels: plain structs of raw pointers, sizes and strides, plus one
// launch function per kernel. Framework-free (FlashInfer rule): no torch headers; the torch launcher
// (csrc/cuda/adapter_linear_cuda.cu) fills these structs from tensors. Definitions live in csrc/cuda/{bgmv,sgmv,lokr}.cu.
//
// Vocabulary (see csrc/cuda/README.md):
//   row m in [0, M), input features K, output features N;
//   LoRA bank: A [S, R, K], B [S, N, R] (unit stride along the last dim), scale [S] fp32, rank [S] int32;
//   pair e = m * P + p: position p of row m, slot ids[e] (-1: no adapter; never used as an index);
//   part: fp32 [ksplit, M * P, R], split-K partial sums of x[m] . A[slot][r]; the expand sums the ksplit partials
//         in a fixed order (deterministic, no atomics). Only r < rank[slot] is written and read.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace peft_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- LoRA (and LoHa packed as LoRA) -------------------------------------------------------------------------------
struct LoraShrinkArgs {
  const void* x = nullptr;  // [M, K] elements of the activation dtype
  int64_t x_stride = 0;     // row stride of x (elements)
  const void* a = nullptr;  // [S, R, K]
  int64_t a_slot_stride = 0, a_row_stride = 0;
  const int32_t* ids = nullptr;    // [M * P]
  const int32_t* ranks = nullptr;  // [S]; clamped to [0, R] in the kernels (the launcher also validates it)
  int M = 0, P = 0, K = 0, R = 0, S = 0;
  int ksplit = 1, k_chunk = 0;  // K is cut into ksplit chunks of k_chunk elements (the last may be shorter)
  float* part = nullptr;        // [ksplit, M * P, R]
  // SGMV only: the (row, position) pairs with an adapter, sorted by key g = p * S + slot.
  const int32_t* sorted_pairs = nullptr;  // [>= seg_start[P * S]] pair indices e
  const int32_t* seg_start = nullptr;     // [P * S + 1] prefix sums of segment lengths
  const int32_t* tile_start = nullptr;    // [P * S + 1] prefix sums of ceil(length / kSgmvTileM)
  int num_tiles_bound = 0;                // grid.x: >= tile_start[P * S]; extra blocks exit
};

struct LoraExpandArgs {
  void* y = nullptr;  // [M, N] activation dtype, read-modify-write
  int64_t y_stride = 0;
  const void* b = nullptr;  // [S, N, R]
  int64_t b_slot_stride = 0, b_row_stride = 0;
  const float* scale = nullptr;  // [S]
  const int32_t* ids = nullptr;  // [M * P]
  const int32_t* ranks = nullptr;
  int M = 0, P = 0, N = 0, R = 0, S = 0;
  int ksplit = 1;
  const float* part = nullptr;  // [ksplit, M * P, R] from the shrink
  // SGMV only (same tables as the shrink); one launch per position p so no two blocks write the same y row.
  const int32_t* sorted_pairs = nullptr;
  const int32_t* seg_start = nullptr;
  const int32_t* tile_start = nullptr;
  int position = 0;
  int num_tiles_bound = 0;  // grid.x: >= tiles of position p (ceil(M / kSgmvTileM) + S is always enough)
};

// SGMV tile height (pairs per tile) shared by the shrink and the expand; the launcher builds tile_start with it.
constexpr int kSgmvTileM = 32;
// Below this many rows the launcher takes the BGMV (per-row GEMV) path, at or above it the SGMV (segmented) path.
constexpr int kBgmvMaxRows = 32;

// Decode: grid (M * P, ceil(R / 4), ksplit) shrink; grid (ceil(N / 128), M) expand summing all P positions.
cudaError_t bgmv_shrink(DType dtype, const LoraShrinkArgs& args, cudaStream_t stream);
cudaError_t bgmv_expand(DType dtype, const LoraExpandArgs& args, cudaStream_t stream);
// Prefill: grid (num_tiles_bound, ceil(R / 16), ksplit) shrink; grid (num_tiles_bound, ceil(N / 64)) expand for
// position args.position.
cudaError_t sgmv_shrink(DType dtype, const LoraShrinkArgs& args, cudaStream_t stream);
cudaError_t sgmv_expand(DType dtype, const LoraExpandArgs& args, cudaStream_t stream);

// ---- LoKr: y[m, p*c + q] += s * sum_j w1[p, j] * T[j, q],  T = X w2^T,  X = x[m].reshape(b, d) -------------------
struct LokrArgs {
  const void* x = nullptr;  // [M, K = b * d]
  int64_t x_stride = 0;
  void* y = nullptr;  // [M, N = a * c]
  int64_t y_stride = 0;
  const void* w1 = nullptr;  // [T, a, b]
  int64_t w1_slot_stride = 0, w1_row_stride = 0;
  const void* w2 = nullptr;  // [T, c, d]
  int64_t w2_slot_stride = 0, w2_row_stride = 0;
  const float* scale = nullptr;  // [T]
  const int32_t* ids = nullptr;  // [M * Q]
  int M = 0, Q = 0, a = 0, b = 0, c = 0, d = 0;
  float* tbuf = nullptr;  // fp32 [M * Q, b, c]
};

// grid (M * Q, ceil(b * c / 128)) for T, then grid (M, ceil(N / 128)) summing all Q positions into y.
cudaError_t lokr_apply(DType dtype, const LokrArgs& args, cudaStream_t stream);

// ---- launch-shape heuristics (host only, shape-based, no data dependence: CUDA-graph friendly) ---------------------
struct SplitK {
  int ksplit;
  int k_chunk;
};

// Split K so that base_ctas * ksplit reaches about two waves, with chunks of at least min_chunk elements, each a
// multiple of align (the vector width) so every chunk but the last starts 16-byte aligned.
inline SplitK choose_split_k(int64_t base_ctas, int64_t K, int num_sms, int64_t min_chunk, int64_t align) {
  if (K <= 0) return {1, 0};
  const int64_t target = 2 * static_cast<int64_t>(std::max(num_sms, 1));
  int64_t ksplit = 1;
  if (base_ctas > 0 && base_ctas < target) {
    ksplit = (target + base_ctas - 1) / base_ctas;
    ksplit = std::min<int64_t>(ksplit, std::max<int64_t>(1, K / min_chunk));
    ksplit = std::min<int64_t>(ksplit, 64);
  }
  int64_t k_chunk = (K + ksplit - 1) / ksplit;
  k_chunk = (k_chunk + align - 1) / align * align;
  ksplit = (K + k_chunk - 1) / k_chunk;
  return {static_cast<int>(ksplit), static_cast<int>(k_chunk)};
}

}  // namespace peft_kernels
