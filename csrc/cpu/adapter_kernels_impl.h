// Definitions of the kernels declared in adapter_kernels.h. Included only by adapter_kernels_base.cpp and
// adapter_kernels_avx2.cpp, each with PEFT_KERNELS_ISA set to its namespace; everything here has internal linkage or
// lives in that namespace, so the two builds never share a symbol.
//
// Vectors are GCC/Clang vector extensions of 32 bytes (8 floats or 4 doubles): one ymm register under AVX2, two
// xmm registers on the baseline ISA. fp16/bf16 bank entries are widened to fp32 in registers; all sums are fp32
// (or fp64 for fp64 inputs).
#ifndef PEFT_KERNELS_TRANSPOSE_MIN_ROWS
#define PEFT_KERNELS_TRANSPOSE_MIN_ROWS 8
#endif
#ifndef PEFT_KERNELS_ISA
#error "define PEFT_KERNELS_ISA before including adapter_kernels_impl.h"
#endif

namespace peft_kernels {
namespace cpu {
namespace PEFT_KERNELS_ISA {
namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename Acc>
struct Vec;
template <>
struct Vec<float> {
  using T = f32x8;
  static constexpr int N = 8;
};
template <>
struct Vec<double> {
  using T = f64x4;
  static constexpr int N = 4;
};

// ---- scalar and vector loads, widened to the compute type ----

inline float fp16_bits_to_float(uint32_t w) {
  const uint32_t sign = (w & 0x8000u) << 16;
  const uint32_t em = (w & 0x7fffu) << 13;
  uint32_t bits;
  if ((w & 0x7c00u) == 0x7c00u) {
    bits = em | 0x7f800000u;  // inf / nan
  } else {
    float f;
    std::memcpy(&f, &em, 4);
    f *= 0x1p112f;  // rebias the exponent 15 -> 127; exact for subnormal halves too
    std::memcpy(&bits, &f, 4);
  }
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <typename Acc>
inline Acc sload(const Acc* p) {
  return *p;
}
template <typename Acc>
inline Acc sload(const bf16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
template <typename Acc>
inline Acc sload(const fp16_t* p) {
  return fp16_bits_to_float(p->bits);
}

template <typename Acc>
inline typename Vec<Acc>::T vload(const Acc* p) {
  typename Vec<Acc>::T v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename Acc>
inline f32x8 vload(const bf16_t* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
template <typename Acc>
inline f32x8 vload(const fp16_t* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 w = __builtin_convertvector(h, u32x8);
  const u32x8 sign = (w & 0x8000u) << 16;
  const u32x8 em = (w & 0x7fffu) << 13;
  f32x8 f;
  std::memcpy(&f, &em, sizeof(f));
  f *= 0x1p112f;
  u32x8 bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const u32x8 special = (u32x8)((w & 0x7c00u) == 0x7c00u);  // all-ones lanes for inf / nan
  bits = ((bits & ~special) | ((em | 0x7f800000u) & special)) | sign;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename Acc>
inline void vstore_acc(Acc* p, typename Vec<Acc>::T v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename Acc>
inline Acc hsum(typename Vec<Acc>::T v) {
  Acc s = 0;
  for (int i = 0; i < Vec<Acc>::N; ++i) s += v[i];
  return s;
}

// ---- shrink: out[i][j] += sum_{k in [k0, k1)} x_i[k] * a_j[k] for NR rows and NJ ranks ----

template <int NR, int NJ, typename W, typename Acc>
inline void dot_tile(const Acc* const* xr, const W* const* ar, int64_t k0, int64_t k1, Acc* out, int64_t ldo) {
  using V = typename Vec<Acc>::T;
  constexpr int L = Vec<Acc>::N;
  V acc[NR][NJ];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = V{};
  int64_t k = k0;
  for (; k + L <= k1; k += L) {
    V av[NJ];
    for (int j = 0; j < NJ; ++j) av[j] = vload<Acc>(ar[j] + k);
    for (int i = 0; i < NR; ++i) {
      const V xv = vload<Acc>(xr[i] + k);
      for (int j = 0; j < NJ; ++j) acc[i][j] += xv * av[j];
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int j = 0; j < NJ; ++j) {
      Acc s = hsum<Acc>(acc[i][j]);
      for (int64_t kk = k; kk < k1; ++kk) s += xr[i][kk] * sload<Acc>(ar[j] + kk);
      out[i * ldo + j] += s;
    }
  }
}

template <int NR, typename W, typename Acc>
inline void shrink_rows(const Acc* const* xr, const W* a, int64_t K, int64_t j0, int64_t j1, Acc* t, int64_t ldt) {
  // Acc block of the K loop: NR rows of x plus the NJ rows of A stay in L1 while the ranks are swept.
  constexpr int64_t KB = 2048 / sizeof(Acc) * 2;
  constexpr int NJ = NR <= 2 ? 4 : 2;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = k0 + KB < K ? k0 + KB : K;
    int64_t j = j0;
    for (; j + NJ <= j1; j += NJ) {
      const W* ar[NJ];
      for (int q = 0; q < NJ; ++q) ar[q] = a + (j + q) * K;
      dot_tile<NR, NJ>(xr, ar, k0, k1, t + j, ldt);
    }
    for (; j < j1; ++j) {
      const W* ar[1] = {a + j * K};
      dot_tile<NR, 1>(xr, ar, k0, k1, t + j, ldt);
    }
  }
}

// Segments with at least this many pairs use the transposed-B expand, smaller ones the dot-product form.
constexpr int64_t kTransposeMinRows = PEFT_KERNELS_TRANSPOSE_MIN_ROWS;

// ---- expand, few rows: L outputs at a time as dot products over the rank, reduced across lanes ----

// s[q] = sum of the lanes of v[q]: a transpose-and-add tree (3 levels of shuffles for 8 floats, 2 for 4 doubles).
inline f32x8 sum_lanes(const f32x8* v) {
  const f32x8 a0 = __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 a1 = __builtin_shufflevector(v[2], v[3], 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(v[2], v[3], 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 a2 = __builtin_shufflevector(v[4], v[5], 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(v[4], v[5], 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 a3 = __builtin_shufflevector(v[6], v[7], 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(v[6], v[7], 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 b0 = __builtin_shufflevector(a0, a1, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(a0, a1, 2, 3, 10, 11, 6, 7, 14, 15);
  const f32x8 b1 = __builtin_shufflevector(a2, a3, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(a2, a3, 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(b0, b1, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline f64x4 sum_lanes(const f64x4* v) {
  const f64x4 a0 = __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) + __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
  const f64x4 a1 = __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6) + __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
  return __builtin_shufflevector(a0, a1, 0, 1, 4, 5) + __builtin_shufflevector(a0, a1, 2, 3, 6, 7);
}

// y_p[o0:o0+ob] += B[o0:o0+ob, :r] t_p for the pairs of one segment; b points at B[slot, o0, 0].
template <typename W, typename Acc>
inline void expand_dot(const W* b, int64_t R, int64_t r, int64_t ob, const Acc* const* t, Acc* const* y, int64_t np) {
  using V = typename Vec<Acc>::T;
  constexpr int L = Vec<Acc>::N;
  const int64_t rv = r / L * L;
  int64_t o = 0;
  for (; o + L <= ob; o += L) {
    const W* bo = b + o * R;
    for (int64_t p = 0; p < np; ++p) {
      const Acc* tp = t[p];
      V acc[L];
      for (int q = 0; q < L; ++q) acc[q] = V{};
      for (int64_t j = 0; j < rv; j += L) {
        const V tv = vload<Acc>(tp + j);
        for (int q = 0; q < L; ++q) acc[q] += vload<Acc>(bo + q * R + j) * tv;
      }
      V s = sum_lanes(acc);
      for (int64_t j = rv; j < r; ++j)
        for (int q = 0; q < L; ++q) s[q] += sload<Acc>(bo + q * R + j) * tp[j];
      vstore_acc<Acc>(y[p] + o, vload<Acc>(y[p] + o) + s);
    }
  }
  for (; o < ob; ++o) {
    const W* bo = b + o * R;
    for (int64_t p = 0; p < np; ++p) {
      Acc s = 0;
      for (int64_t j = 0; j < r; ++j) s += sload<Acc>(bo + j) * t[p][j];
      y[p][o] += s;
    }
  }
}

// Same result for many rows: B's block is transposed once (transpose_block) to bt [r, OB] in the compute type, then
// expand_from_bt is a broadcast FMA over OB contiguous columns with one row's OB outputs held in registers.
template <typename W, typename Acc>
inline void transpose_block(const W* b, int64_t R, int64_t r, int64_t ob, Acc* bt) {
  constexpr int64_t OB = expand_block<Acc>();
  for (int64_t o = 0; o < ob; ++o)
    for (int64_t j = 0; j < r; ++j) bt[j * OB + o] = sload<Acc>(b + o * R + j);
  if (ob < OB)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t o = ob; o < OB; ++o) bt[j * OB + o] = 0;
}

template <typename Acc>
inline void expand_from_bt(const Acc* bt, int64_t r, int64_t ob, const Acc* const* t, Acc* const* y, int64_t np) {
  using V = typename Vec<Acc>::T;
  constexpr int L = Vec<Acc>::N;
  constexpr int64_t OB = expand_block<Acc>();
  constexpr int NV = OB / L;
  for (int64_t p = 0; p < np; ++p) {
    const Acc* tp = t[p];
    Acc* yp = y[p];
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{};
    for (int64_t j = 0; j < r; ++j) {
      const Acc tj = tp[j];
      const Acc* brow = bt + j * OB;
      for (int v = 0; v < NV; ++v) acc[v] += tj * vload<Acc>(brow + v * L);
    }
    if (ob == OB) {
      for (int v = 0; v < NV; ++v) vstore_acc<Acc>(yp + v * L, vload<Acc>(yp + v * L) + acc[v]);
    } else {
      for (int64_t o = 0; o < ob; ++o) yp[o] += acc[o / L][o % L];
    }
  }
}

// ---- LoKr: small row-major GEMMs in broadcast form ----

// C[p, :] (=|+=) alpha * sum_i A[p, i] B[i, :] for p < P, over Qn columns; all row-major with leading dimensions.
template <bool kAdd, typename Acc>
inline void gemm_rows(int64_t P, int64_t I, int64_t Qn, const Acc* A, int64_t lda, const Acc* B, int64_t ldb, Acc* C,
                      int64_t ldc, Acc alpha) {
  using V = typename Vec<Acc>::T;
  constexpr int L = Vec<Acc>::N;
  constexpr int NV = 8;
  constexpr int64_t QB = NV * L;
  int64_t q0 = 0;
  for (; q0 + QB <= Qn; q0 += QB) {  // full blocks: NV accumulators in registers
    for (int64_t p = 0; p < P; ++p) {
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = V{};
      for (int64_t i = 0; i < I; ++i) {
        const Acc s = A[p * lda + i];
        const Acc* brow = B + i * ldb + q0;
        for (int v = 0; v < NV; ++v) acc[v] += s * vload<Acc>(brow + v * L);
      }
      Acc* crow = C + p * ldc + q0;
      for (int v = 0; v < NV; ++v)
        vstore_acc<Acc>(crow + v * L, kAdd ? vload<Acc>(crow + v * L) + alpha * acc[v] : alpha * acc[v]);
    }
  }
  for (; q0 < Qn; q0 += L) {  // the rest: one vector, or scalars at the very end
    const int64_t qn = Qn - q0 < L ? Qn - q0 : L;
    for (int64_t p = 0; p < P; ++p) {
      Acc* crow = C + p * ldc + q0;
      if (qn == L) {
        V acc = V{};
        for (int64_t i = 0; i < I; ++i) acc += A[p * lda + i] * vload<Acc>(B + i * ldb + q0);
        vstore_acc<Acc>(crow, kAdd ? vload<Acc>(crow) + alpha * acc : alpha * acc);
      } else {
        for (int64_t q = 0; q < qn; ++q) {
          Acc s = 0;
          for (int64_t i = 0; i < I; ++i) s += A[p * lda + i] * B[i * ldb + q0 + q];
          crow[q] = kAdd ? crow[q] + alpha * s : alpha * s;
        }
      }
    }
  }
}

}  // namespace

template <typename W, typename Acc>
void lora_shrink(const LoraArgs<W, Acc>& g, const ShrinkItem* items, int64_t begin, int64_t end) {
  for (int64_t it = begin; it < end; ++it) {
    const ShrinkItem& w = items[it];
    const int64_t slot = g.seg_slot[w.seg];
    const W* a = g.a + slot * g.R * g.K;
    const int nr = w.p1 - w.p0;
    const Acc* xr[4];
    for (int i = 0; i < nr; ++i) xr[i] = g.x + static_cast<int64_t>(g.pair_row[w.p0 + i]) * g.ldx;
    Acc* t = g.t + static_cast<int64_t>(w.p0) * g.R;
    for (int i = 0; i < nr; ++i)
      for (int64_t j = w.j0; j < w.j1; ++j) t[i * g.R + j] = 0;
    switch (nr) {
      case 1: shrink_rows<1>(xr, a, g.K, w.j0, w.j1, t, g.R); break;
      case 2: shrink_rows<2>(xr, a, g.K, w.j0, w.j1, t, g.R); break;
      case 3: shrink_rows<3>(xr, a, g.K, w.j0, w.j1, t, g.R); break;
      default: shrink_rows<4>(xr, a, g.K, w.j0, w.j1, t, g.R); break;
    }
    const Acc scale = g.seg_scale[w.seg];
    for (int i = 0; i < nr; ++i)
      for (int64_t j = w.j0; j < w.j1; ++j) t[i * g.R + j] *= scale;
  }
}

namespace {

// Y[row(p), o0:o0+ob] += T[p] B[slot, o0:o0+ob, :r]^T for every pair p of segment `seg`; bt: scratch of R * OB.
template <typename W, typename Acc>
inline void expand_segment(const LoraArgs<W, Acc>& g, int64_t seg, int64_t o0, Acc* bt) {
  constexpr int64_t OB = expand_block<Acc>();
  constexpr int64_t kChunk = 16;  // pairs whose T / Y row pointers are gathered at once
  const int64_t ob = g.N - o0 < OB ? g.N - o0 : OB;
  const int64_t r = g.seg_rank[seg];
  const int64_t p0 = g.seg_begin[seg], p1 = g.seg_begin[seg + 1];
  if (r == 0 || p0 == p1) return;
  const W* b = g.b + (static_cast<int64_t>(g.seg_slot[seg]) * g.N + o0) * g.R;
  const bool transpose = p1 - p0 >= kTransposeMinRows;
  const Acc* t[kChunk];
  Acc* y[kChunk];
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t np = p1 - c0 < kChunk ? p1 - c0 : kChunk;
    for (int64_t i = 0; i < np; ++i) {
      t[i] = g.t + (c0 + i) * g.R;
      y[i] = g.y + static_cast<int64_t>(g.pair_row[c0 + i]) * g.ldy + o0;
    }
    if (transpose) {
      if (c0 == p0) transpose_block(b, g.R, r, ob, bt);
      expand_from_bt(bt, r, ob, t, y, np);
    } else {
      expand_dot(b, g.R, r, ob, t, y, np);
    }
  }
}

}  // namespace

template <typename W, typename Acc>
void lora_expand(const LoraArgs<W, Acc>& g, int64_t block_begin, int64_t block_end) {
  constexpr int64_t OB = expand_block<Acc>();
  Acc* bt = new Acc[g.R * OB > 0 ? g.R * OB : 1];
  for (int64_t blk = block_begin; blk < block_end; ++blk)
    for (int64_t seg = 0; seg < g.num_segments; ++seg) expand_segment(g, seg, blk * OB, bt);
  delete[] bt;
}

template <typename W, typename Acc>
void lora_segments(const LoraArgs<W, Acc>& g, int64_t seg_begin, int64_t seg_end) {
  constexpr int64_t OB = expand_block<Acc>();
  Acc* bt = new Acc[g.R * OB > 0 ? g.R * OB : 1];
  for (int64_t seg = seg_begin; seg < seg_end; ++seg) {
    const int64_t r = g.seg_rank[seg];
    const int64_t p0 = g.seg_begin[seg], p1 = g.seg_begin[seg + 1];
    if (r == 0) continue;
    for (int64_t q = p0; q < p1; q += 4) {
      const ShrinkItem item{static_cast<int32_t>(seg), static_cast<int32_t>(q),
                            static_cast<int32_t>(q + 4 < p1 ? q + 4 : p1), 0, static_cast<int32_t>(r)};
      lora_shrink(g, &item, 0, 1);
    }
    for (int64_t o0 = 0; o0 < g.N; o0 += OB) expand_segment(g, seg, o0, bt);
  }
  delete[] bt;
}

template <typename Acc>
void lokr_rows(const LokrArgs<Acc>& g, int64_t row_begin, int64_t row_end) {
  const int64_t a = g.a, b = g.b, c = g.c, d = g.d;
  Acc* scratch = new Acc[g.left_first ? a * d : b * c];
  for (int64_t m = row_begin; m < row_end; ++m) {
    const Acc* x = g.x + m * g.ldx;  // X: b x d
    Acc* y = g.y + m * g.ldy;        // a x c
    for (int64_t q = 0; q < g.Q; ++q) {
      const int32_t t = g.ids[m * g.Q + q];
      if (t < 0) continue;
      const Acc* w1 = g.w1[t];
      const Acc* w2t = g.w2t[t];
      if (g.left_first) {
        gemm_rows<false>(a, b, d, w1, b, x, d, scratch, d, Acc(1));     // U = w1 X        (a x d)
        gemm_rows<true>(a, d, c, scratch, d, w2t, c, y, c, g.scale[t]);  // y += s U w2^T   (a x c)
      } else {
        gemm_rows<false>(b, d, c, x, d, w2t, c, scratch, c, Acc(1));    // V = X w2^T      (b x c)
        gemm_rows<true>(a, b, c, w1, b, scratch, c, y, c, g.scale[t]);   // y += s w1 V     (a x c)
      }
    }
  }
  delete[] scratch;
}

#define PEFT_KERNELS_INSTANTIATE(W, Acc)                                                                    \
  template void lora_shrink<W, Acc>(const LoraArgs<W, Acc>&, const ShrinkItem*, int64_t, int64_t);         \
  template void lora_expand<W, Acc>(const LoraArgs<W, Acc>&, int64_t, int64_t);                            \
  template void lora_segments<W, Acc>(const LoraArgs<W, Acc>&, int64_t, int64_t);

PEFT_KERNELS_INSTANTIATE(float, float)
PEFT_KERNELS_INSTANTIATE(double, double)
PEFT_KERNELS_INSTANTIATE(bf16_t, float)
PEFT_KERNELS_INSTANTIATE(fp16_t, float)
#undef PEFT_KERNELS_INSTANTIATE
template void lokr_rows<float>(const LokrArgs<float>&, int64_t, int64_t);
template void lokr_rows<double>(const LokrArgs<double>&, int64_t, int64_t);

}  // namespace PEFT_KERNELS_ISA
}  // namespace cpu
}  // namespace peft_kernels
