// CPU implementation of peft_kernels::adapter_linear (spec: peft_kernels/ops/reference.py::adapter_linear).
//
//   1. Validate shapes, dtypes and every slot id before any compute (ids outside [-1, S) raise IndexError).
//   2. Base: at::linear(x, weight, bias), the very call F.linear makes (MKL / oneDNN; any weight strides), so rows
//      without an adapter are bitwise equal to the bare layer.
//   3. LoRA bank: counting sort of the (row, slot) pairs by slot, then the segmented shrink and expand kernels of
//      adapter_kernels.h over each slot's true rank, parallel over independent work items (at::parallel_for).
//      X is read in place through the pair -> row index: no gather, no per-adapter copy.
//   4. LoKr bank: per row, the two small GEMMs of the cheaper association order for each of its LoKr slots,
//      parallel over rows (lokr_rows in adapter_kernels.h).
// fp16/bf16 inputs with any adapter: base and deltas in fp32 (weights widened), rounded to x.dtype once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu/adapter_kernels.h"
#include "ops.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "adapter_linear";

// Work (multiply-adds) below which a stage runs on the calling thread. Measured on 2 shared cores (benchmarks/
// cpu_targets.py, interleaved medians): with the deltas of LoHa r=8 at M=16 on 4096x4096 (8M multiply-adds) or of
// 32 LoRA adapters on 64 rows of 2048x2048 (4M) run serially, ours/base was 1.03 / 1.02-1.08; forking the OpenMP
// team for them gave 1.19-1.22 / 1.20-1.23, because a team on busy cores waits for its slowest thread. Deltas are a
// few percent of the base GEMM, so only large ones (M ~ 256, >= 16M multiply-adds, ~1 ms on one core) are split.
// PEFT_KERNELS_CPU_MIN_PARALLEL_WORK overrides it (read once; for tuning).
int64_t min_parallel_work() {
  static const int64_t value = [] {
    const char* env = std::getenv("PEFT_KERNELS_CPU_MIN_PARALLEL_WORK");
    return env != nullptr && *env != '\0' ? std::max<int64_t>(1, std::atoll(env)) : int64_t{1} << 24;
  }();
  return value;
}

// at::parallel_for grain for `items` items of `work` multiply-adds in total.
int64_t grain_for(int64_t items, int64_t work) {
  if (items <= 0 || work <= 0) return 1;
  const int64_t per_item = std::max<int64_t>(1, work / items);
  return std::max<int64_t>(1, min_parallel_work() / per_item);
}

// Raise unless every id is in [-1, num_slots); -1 means "no adapter at this position" and is never an index.
void check_ids(const at::Tensor& ids, int64_t num_slots, const char* what) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt, kOp, ": ", what, ": slot ids must be int32, got ",
                   ids.scalar_type());
  if (ids.numel() == 0) return;
  const at::Tensor c = ids.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  int32_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < c.numel(); ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  const int64_t bad = lo < -1 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= -1 && hi < num_slots, kOp, ": ", what, ": slot id ", bad, " is out of range for a bank of ",
                    num_slots, " slot(s) (-1 means base only)");
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& lora_scale,
                const at::Tensor& lora_rank, const at::Tensor& lora_ids, const at::Tensor& lokr_w1,
                const at::Tensor& lokr_w2, const at::Tensor& lokr_scale, const at::Tensor& lokr_ids) {
  const at::Tensor* all[] = {&x,         &weight,   &lora_a,  &lora_b,  &lora_scale, &lora_rank,
                             &lora_ids,  &lokr_w1,  &lokr_w2, &lokr_scale, &lokr_ids};
  for (const at::Tensor* t : all) TORCH_CHECK(t->device().is_cpu(), kOp, " (cpu): every tensor must be on the CPU");
  if (bias.has_value()) TORCH_CHECK(bias->device().is_cpu(), kOp, " (cpu): every tensor must be on the CPU");
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf, kOp,
                   ": x must be float32, float64, bfloat16 or float16, got ", xt);
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2, kOp, ": x must be [M, in] and weight [out, in], got ",
                    x.sizes(), " and ", weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, kOp, ": x has ", k, " features but weight is ", weight.sizes(),
                    " ([out, in])");
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, kOp, ": bias must be [", n, "], got ", bias->sizes());
  const int64_t s = lora_a.dim() == 3 ? lora_a.size(0) : -1;
  TORCH_CHECK_VALUE(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_b.size(0) == s, kOp,
                    ": lora_a must be [S, R, in] and lora_b [S, out, R], got ", lora_a.sizes(), ", ", lora_b.sizes());
  if (s > 0)
    TORCH_CHECK_VALUE(lora_a.size(2) == k && lora_b.size(1) == n && lora_b.size(2) == lora_a.size(1), kOp,
                      ": LoRA bank shapes A ", lora_a.sizes(), " / B ", lora_b.sizes(), " do not fit a layer of in=",
                      k, ", out=", n);
  TORCH_CHECK_VALUE(lora_scale.dim() == 1 && lora_scale.size(0) == s && lora_rank.dim() == 1 &&
                        lora_rank.size(0) == s,
                    kOp, ": lora_scale and lora_rank must be [", s, "], got ", lora_scale.sizes(), ", ",
                    lora_rank.sizes());
  TORCH_CHECK_VALUE(lora_ids.dim() == 2 && lora_ids.size(0) == m, kOp, ": lora_ids must be [M=", m, ", P], got ",
                    lora_ids.sizes());
  const int64_t t = lokr_w1.dim() == 3 ? lokr_w1.size(0) : -1;
  TORCH_CHECK_VALUE(lokr_w1.dim() == 3 && lokr_w2.dim() == 3 && lokr_w2.size(0) == t, kOp,
                    ": lokr_w1 must be [T, a, b] and lokr_w2 [T, c, d], got ", lokr_w1.sizes(), ", ",
                    lokr_w2.sizes());
  if (t > 0) {
    const int64_t a = lokr_w1.size(1), b = lokr_w1.size(2), c = lokr_w2.size(1), d = lokr_w2.size(2);
    TORCH_CHECK_VALUE(a * c == n && b * d == k, kOp, ": LoKr factors w1 ", a, "x", b, " and w2 ", c, "x", d,
                      " give a ", a * c, "x", b * d, " delta, the layer is ", n, "x", k);
  }
  TORCH_CHECK_VALUE(lokr_scale.dim() == 1 && lokr_scale.size(0) == t, kOp, ": lokr_scale must be [", t, "], got ",
                    lokr_scale.sizes());
  TORCH_CHECK_VALUE(lokr_ids.dim() == 2 && lokr_ids.size(0) == m, kOp, ": lokr_ids must be [M=", m, ", Q], got ",
                    lokr_ids.sizes());
  check_ids(lora_ids, s, "lora_ids");
  check_ids(lokr_ids, t, "lokr_ids");
  if (s > 0) {
    TORCH_CHECK_TYPE(!at::isFloatingType(lora_rank.scalar_type()), kOp, ": lora_rank must be an integer tensor");
    const at::Tensor r = lora_rank.to(at::kLong).contiguous();
    const int64_t rmax = lora_a.size(1);
    for (int64_t i = 0; i < s; ++i) {
      const int64_t ri = r.const_data_ptr<int64_t>()[i];
      TORCH_CHECK_VALUE(ri >= 0 && ri <= rmax, kOp, ": lora_rank[", i, "] = ", ri,
                        " is outside [0, R] for a bank of R = ", rmax);
    }
  }
}

// Pairs (row, slot) of ids [M, P] grouped by slot (counting sort; rows ascending within a slot). A slot named twice
// on a row gives two pairs, so its delta is added twice. Only slots with at least one pair get a segment.
struct Segments {
  std::vector<int32_t> slot;   // [G]
  std::vector<int64_t> begin;  // [G + 1]
  std::vector<int32_t> row;    // [pairs]
  int64_t size() const { return static_cast<int64_t>(slot.size()); }
  int64_t pairs() const { return static_cast<int64_t>(row.size()); }
};

Segments group_by_slot(const at::Tensor& ids, int64_t num_slots) {
  Segments g;
  g.begin.push_back(0);
  if (ids.numel() == 0 || num_slots == 0) return g;
  const at::Tensor c = ids.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  const int64_t m = c.size(0), per_row = c.size(1);
  std::vector<int64_t> count(num_slots, 0);
  for (int64_t i = 0; i < m * per_row; ++i)
    if (p[i] >= 0) ++count[p[i]];
  std::vector<int64_t> pos(num_slots, 0);
  for (int64_t s = 0; s < num_slots; ++s) {
    if (count[s] == 0) continue;
    pos[s] = g.begin.back();
    g.slot.push_back(static_cast<int32_t>(s));
    g.begin.push_back(g.begin.back() + count[s]);
  }
  g.row.resize(g.begin.back());
  for (int64_t r = 0; r < m; ++r)
    for (int64_t q = 0; q < per_row; ++q) {
      const int32_t s = p[r * per_row + q];
      if (s >= 0) g.row[pos[s]++] = static_cast<int32_t>(r);
    }
  return g;
}

template <typename W>
const W* data_as(const at::Tensor& t) {
  return reinterpret_cast<const W*>(t.const_data_ptr());
}

// The LoRA / packed-LoHa deltas of every pair in `seg`, added into acc [M, N] (contiguous, compute type).
template <typename W, typename Acc>
void lora_deltas(const at::Tensor& xc, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                 const at::Tensor& rank, const Segments& seg, bool one_per_row, at::Tensor& acc) {
  const int64_t K = a.size(2), N = b.size(1), R = a.size(1);
  const int64_t G = seg.size();
  std::vector<int64_t> seg_rank(G);
  std::vector<Acc> seg_scale(G);
  const at::Tensor rank64 = rank.to(at::kLong).contiguous();
  const at::Tensor scale64 = scale.to(at::kDouble).contiguous();
  for (int64_t i = 0; i < G; ++i) {
    seg_rank[i] = rank64.const_data_ptr<int64_t>()[seg.slot[i]];
    seg_scale[i] = static_cast<Acc>(scale64.const_data_ptr<double>()[seg.slot[i]]);
  }
  // Shrink work items: blocks of <= 4 pairs; when a segment has few blocks, its ranks are split too, so a decode
  // step (one row, one adapter) still spreads the read of A over every thread.
  const int64_t threads = at::get_num_threads();
  std::vector<cpu::ShrinkItem> items;
  for (int64_t i = 0; i < G; ++i) {
    const int64_t r = seg_rank[i];
    if (r == 0) continue;
    const int64_t p0 = seg.begin[i], p1 = seg.begin[i + 1];
    const int64_t blocks = (p1 - p0 + 3) / 4;
    const int64_t chunk = blocks >= 2 * threads ? r : std::min<int64_t>(r, 8);
    for (int64_t q = p0; q < p1; q += 4)
      for (int64_t j = 0; j < r; j += chunk)
        items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(q), static_cast<int32_t>(std::min(q + 4, p1)),
                         static_cast<int32_t>(j), static_cast<int32_t>(std::min(j + chunk, r))});
  }
  if (items.empty()) return;
  int64_t shrink_work = 0, expand_work = 0;
  for (const auto& w : items) shrink_work += int64_t{w.p1 - w.p0} * (w.j1 - w.j0) * K;
  for (int64_t i = 0; i < G; ++i) expand_work += (seg.begin[i + 1] - seg.begin[i]) * seg_rank[i] * N;
  at::Tensor t = at::empty({seg.pairs(), R}, xc.options());
  cpu::LoraArgs<W, Acc> g{};
  g.x = xc.const_data_ptr<Acc>();
  g.ldx = xc.stride(0);
  g.a = data_as<W>(a);
  g.b = data_as<W>(b);
  g.K = K;
  g.N = N;
  g.R = R;
  g.num_segments = G;
  g.seg_slot = seg.slot.data();
  g.seg_begin = seg.begin.data();
  g.seg_rank = seg_rank.data();
  g.seg_scale = seg_scale.data();
  g.pair_row = seg.row.data();
  g.t = t.mutable_data_ptr<Acc>();
  g.y = acc.mutable_data_ptr<Acc>();
  g.ldy = acc.stride(0);
  const bool avx2 = cpu::use_avx2();
  const int64_t threads_needed = std::min<int64_t>(threads, (shrink_work + expand_work) / min_parallel_work());
  if (one_per_row && G >= 2 * threads && threads_needed > 1) {
    // Multi-tenant batch: one parallel region over segments, each doing its shrink then its expand.
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      if (avx2)
        cpu::avx2::lora_segments(g, begin, end);
      else
        cpu::base::lora_segments(g, begin, end);
    });
    return;
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, n_items, grain_for(n_items, shrink_work), [&](int64_t begin, int64_t end) {
    if (avx2)
      cpu::avx2::lora_shrink(g, items.data(), begin, end);
    else
      cpu::base::lora_shrink(g, items.data(), begin, end);
  });
  const int64_t ob = cpu::expand_block<Acc>();
  const int64_t blocks = (N + ob - 1) / ob;
  at::parallel_for(0, blocks, grain_for(blocks, expand_work), [&](int64_t begin, int64_t end) {
    if (avx2)
      cpu::avx2::lora_expand(g, begin, end);
    else
      cpu::base::lora_expand(g, begin, end);
  });
}

void lora_part(const at::Tensor& xc, at::Tensor a, at::Tensor b, const at::Tensor& scale, const at::Tensor& rank,
               const Segments& seg, bool one_per_row, at::Tensor& acc) {
  const auto cdt = xc.scalar_type();
  const auto wt = a.scalar_type();
  const bool native = b.scalar_type() == wt && (wt == cdt || (cdt == at::kFloat && (wt == at::kBFloat16 ||
                                                                                     wt == at::kHalf)));
  if (!native) {
    a = a.to(cdt);
    b = b.to(cdt);
  }
  a = a.contiguous();
  b = b.contiguous();
  switch (a.scalar_type()) {
    case at::kFloat: lora_deltas<float, float>(xc, a, b, scale, rank, seg, one_per_row, acc); break;
    case at::kDouble: lora_deltas<double, double>(xc, a, b, scale, rank, seg, one_per_row, acc); break;
    case at::kBFloat16: lora_deltas<cpu::bf16_t, float>(xc, a, b, scale, rank, seg, one_per_row, acc); break;
    case at::kHalf: lora_deltas<cpu::fp16_t, float>(xc, a, b, scale, rank, seg, one_per_row, acc); break;
    default: TORCH_CHECK(false, kOp, ": unsupported LoRA bank dtype ", a.scalar_type());
  }
}

// LoKr: y[row] += scale * vec(w1 X w2^T), X = x[row].reshape(b, d), for every LoKr position of every row.
template <typename Acc>
void lokr_deltas(const at::Tensor& xc, const at::Tensor& w1_bank, const at::Tensor& w2_bank, const at::Tensor& scale,
                 const at::Tensor& ids, const Segments& seg, at::Tensor& acc) {
  const auto cdt = xc.scalar_type();
  const int64_t T = w1_bank.size(0);
  const int64_t a = w1_bank.size(1), b = w1_bank.size(2), c = w2_bank.size(1), d = w2_bank.size(2);
  // The factors in the compute type, w2 transposed so both GEMMs read rows. A bank already in the compute type is
  // used in place and only w2 is transposed (one copy); otherwise only the used slots are gathered and converted.
  // Measured at 256x688, M=8: the gather path cost ~100 us per call, most of the op's fixed cost.
  const bool in_place = w1_bank.scalar_type() == cdt && w2_bank.scalar_type() == cdt && w1_bank.is_contiguous();
  at::Tensor w1, w2t;
  if (in_place) {
    w1 = w1_bank;
    w2t = w2_bank.transpose(1, 2).contiguous();
  } else {
    at::Tensor used = at::empty({seg.size()}, at::kLong);
    for (int64_t i = 0; i < seg.size(); ++i) used.mutable_data_ptr<int64_t>()[i] = seg.slot[i];
    w1 = w1_bank.index_select(0, used).to(cdt).contiguous();
    w2t = w2_bank.index_select(0, used).to(cdt).transpose(1, 2).contiguous();
  }
  const at::Tensor scale64 = scale.to(at::kDouble).contiguous();
  std::vector<const Acc*> w1_of(T, nullptr), w2t_of(T, nullptr);
  std::vector<Acc> scale_of(T, Acc(0));
  for (int64_t i = 0; i < seg.size(); ++i) {
    const int64_t t = seg.slot[i];
    const int64_t at_ = in_place ? t : i;  // index of slot t in w1 / w2t
    w1_of[t] = w1.const_data_ptr<Acc>() + at_ * a * b;
    w2t_of[t] = w2t.const_data_ptr<Acc>() + at_ * d * c;
    scale_of[t] = static_cast<Acc>(scale64.const_data_ptr<double>()[t]);
  }
  const at::Tensor ids_c = ids.contiguous();
  cpu::LokrArgs<Acc> g{};
  g.x = xc.const_data_ptr<Acc>();
  g.ldx = xc.stride(0);
  g.y = acc.mutable_data_ptr<Acc>();
  g.ldy = acc.stride(0);
  g.a = a;
  g.b = b;
  g.c = c;
  g.d = d;
  g.ids = ids_c.const_data_ptr<int32_t>();
  g.Q = ids_c.size(1);
  g.w1 = w1_of.data();
  g.w2t = w2t_of.data();
  g.scale = scale_of.data();
  // (w1 X) w2^T costs a*b*d + a*d*c per row; w1 (X w2^T) costs b*d*c + a*b*c (same rule as the reference).
  g.left_first = a * d * (b + c) <= b * c * (d + a);
  const int64_t per_pair = g.left_first ? a * d * (b + c) : b * c * (d + a);
  const int64_t rows = xc.size(0);
  const bool avx2 = cpu::use_avx2();
  at::parallel_for(0, rows, grain_for(rows, seg.pairs() * per_pair), [&](int64_t begin, int64_t end) {
    if (avx2)
      cpu::avx2::lokr_rows(g, begin, end);
    else
      cpu::base::lokr_rows(g, begin, end);
  });
}

void lokr_part(const at::Tensor& xc, const at::Tensor& w1_bank, const at::Tensor& w2_bank, const at::Tensor& scale,
               const at::Tensor& ids, const Segments& seg, at::Tensor& acc) {
  if (xc.scalar_type() == at::kDouble)
    lokr_deltas<double>(xc, w1_bank, w2_bank, scale, ids, seg, acc);
  else
    lokr_deltas<float>(xc, w1_bank, w2_bank, scale, ids, seg, acc);
}

}  // namespace

at::Tensor adapter_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& lora_scale,
                              const at::Tensor& lora_rank, const at::Tensor& lora_ids, const at::Tensor& lokr_w1,
                              const at::Tensor& lokr_w2, const at::Tensor& lokr_scale, const at::Tensor& lokr_ids) {
  check_args(x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale,
             lokr_ids);
  const auto xt = x.scalar_type();
  const auto cdt = (xt == at::kHalf || xt == at::kBFloat16) ? at::kFloat : xt;

  const Segments lora = group_by_slot(lora_ids, lora_a.size(0));
  const Segments lokr = group_by_slot(lokr_ids, lokr_w1.size(0));
  const bool same_dtype = weight.scalar_type() == xt && (!bias.has_value() || bias->scalar_type() == xt);
  if (lora.pairs() == 0 && lokr.pairs() == 0 && same_dtype) return at::linear(x, weight, bias);  // exactly F.linear

  // Base, then every delta summed onto it in place in the compute type. fp16/bf16 with weights of the same dtype:
  // the base runs in that dtype (oneDNN accumulates in fp32; one rounding of the base, as F.linear and PEFT have),
  // because widening the weight on every call cost ~10x at M=1 (4096x4096 bf16: 200 ms vs 20 ms for F.linear).
  const at::Tensor xc = x.to(cdt).contiguous();
  at::Tensor acc = (cdt != xt && same_dtype)
                       ? at::linear(x, weight, bias).to(cdt).contiguous()
                       : at::linear(xc, weight.to(cdt),
                                    bias.has_value() ? std::optional<at::Tensor>(bias->to(cdt)) : bias)
                             .contiguous();
  if (lora.pairs() > 0) lora_part(xc, lora_a, lora_b, lora_scale, lora_rank, lora, lora_ids.size(1) == 1, acc);
  if (lokr.pairs() > 0) lokr_part(xc, lokr_w1, lokr_w2, lokr_scale, lokr_ids, lokr, acc);
  return cdt == xt ? acc : acc.to(xt);
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) { m.impl("adapter_linear", &adapter_linear_cpu); }

}  // namespace peft_kernels
