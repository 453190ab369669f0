// Framework-free CPU kernels of the adapter deltas (no torch headers: raw pointers and plain structs).
//
// LoRA (and LoHa packed as LoRA). The pairs (row, slot) named by lora_ids are grouped by slot ("segments", a counting sort done by the launcher in
// adapter_linear.cpp). Two stages, each parallelised by the launcher over independent work items:
//
//   shrink  T[p, j] = scale[slot] * sum_k x[row(p), k] * A[slot, j, k]       j < rank(slot)   (dot products)
//   expand  Y[row(p), o] += sum_j T[p, j] * B[slot, o, j]                                   (per column block)
//
// Shrink items are (segment, block of <= 4 pairs, chunk of ranks); expand items are blocks of output columns, so no
// two threads ever write the same element of T or Y. Only each slot's true rank is read and computed.
// lora_segments does both stages segment by segment (one parallel region over segments): the launcher uses it for
// many segments when no row appears in two segments (one LoRA position per row), so segments own disjoint rows.
//
// LoKr: per row and LoKr position, y[row, p*c + q] += scale * (w1 X w2^T)[p, q] with X = x[row] as b x d, as two
// small row-major GEMMs in the cheaper association order; parallel over rows (a row's positions are summed by one
// thread, so a slot named twice adds twice without a race).
//
// Every kernel is compiled twice: adapter_kernels_base.cpp (the compiler's baseline ISA) and adapter_kernels_avx2.cpp
// (`#pragma GCC target("avx2,fma")`), and the launcher picks one at run time (`use_avx2()`); no -march flag is needed.
#pragma once

#include <cstdint>

namespace peft_kernels {
namespace cpu {

// Storage types of the bank tensors (bit-compatible with c10::BFloat16 / c10::Half).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

struct ShrinkItem {
  int32_t seg;     // segment index
  int32_t p0, p1;  // pairs [p0, p1) of the segment, at most 4
  int32_t j0, j1;  // ranks [j0, j1)
};

// W: storage type of the bank (float, double, bf16_t, fp16_t). Acc: compute type (float, or double for fp64).
template <typename W, typename Acc>
struct LoraArgs {
  const Acc* x;  // [M, ldx] activations, already in the compute type
  int64_t ldx;
  const W* a;  // [S, R, K] contiguous
  const W* b;  // [S, N, R] contiguous
  int64_t K, N, R;
  int64_t num_segments;
  const int32_t* seg_slot;   // [num_segments] slot of each segment
  const int64_t* seg_begin;  // [num_segments + 1] pairs of segment g are [seg_begin[g], seg_begin[g + 1])
  const int64_t* seg_rank;   // [num_segments] true rank of the segment's slot
  const Acc* seg_scale;      // [num_segments] scale of the segment's slot
  const int32_t* pair_row;   // [P] output row of each pair, grouped by segment
  Acc* t;                    // [P, R] shrink output (scaled); only the first rank(slot) columns are used
  Acc* y;                    // [M, ldy] accumulation target
  int64_t ldy;
};

template <typename Acc>
struct LokrArgs {
  const Acc* x;  // [M, ldx] activations in the compute type
  int64_t ldx;
  Acc* y;  // [M, ldy] accumulation target
  int64_t ldy;
  int64_t a, b, c, d;      // w1: a x b, w2: c x d; out = a c, in = b d
  const int32_t* ids;      // [M, Q] slot ids, -1 = none (validated)
  int64_t Q;
  const Acc* const* w1;    // [T] w1 of each slot (a x b, row-major), null for unused slots
  const Acc* const* w2t;   // [T] w2 transposed (d x c, row-major), null for unused slots
  const Acc* scale;        // [T]
  bool left_first;         // (w1 X) w2^T when true, w1 (X w2^T) otherwise
};

// Width in elements of one expand column block (8 vector registers).
template <typename Acc>
constexpr int64_t expand_block() {
  return 256 / (8 * sizeof(Acc)) * 8;  // 64 floats, 32 doubles
}

#define PEFT_KERNELS_DECLARE_ISA(ns)                                                                           \
  namespace ns {                                                                                               \
  template <typename W, typename Acc>                                                                          \
  void lora_shrink(const LoraArgs<W, Acc>& g, const ShrinkItem* items, int64_t begin, int64_t end);            \
  template <typename W, typename Acc>                                                                          \
  void lora_expand(const LoraArgs<W, Acc>& g, int64_t block_begin, int64_t block_end);                         \
  template <typename W, typename Acc>                                                                          \
  void lora_segments(const LoraArgs<W, Acc>& g, int64_t seg_begin, int64_t seg_end);                           \
  template <typename Acc>                                                                                      \
  void lokr_rows(const LokrArgs<Acc>& g, int64_t row_begin, int64_t row_end);                                  \
  }

PEFT_KERNELS_DECLARE_ISA(base)
PEFT_KERNELS_DECLARE_ISA(avx2)
#undef PEFT_KERNELS_DECLARE_ISA

// True when the AVX2+FMA build of the kernels can run on this CPU (always false on non-x86) and the environment
// does not ask for the baseline build (PEFT_KERNELS_CPU_ISA=base).
bool use_avx2();

}  // namespace cpu
}  // namespace peft_kernels
