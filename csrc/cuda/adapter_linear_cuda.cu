// Thin torch launcher of peft_kernels::adapter_linear for CUDA tensors (the schema lives in csrc/torch_bindings.cpp,
// the math in peft_kernels/ops/reference.py). Checks shapes, dtypes and devices, validates slot ids with one small
// reduction (one device->host copy) before any kernel runs, runs the base GEMM with cuBLAS (at::addmm), builds the
// SGMV segment tables with torch ops, and calls the framework-free kernels through csrc/include/peft_kernels/
// adapter_linear.h. Only this file includes torch headers; it is compiled only in a CUDA build of torch.
//
// With -DPEFT_KERNELS_EMULATE (tests only, never in the package build) the same launcher runs on CPU tensors against
// the fiber emulation of csrc/cuda/emu and registers peft_kernels_emu::adapter_linear instead.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef PEFT_KERNELS_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cuda_runtime_api.h>

#include <array>
#include <limits>
#include <optional>
#include <vector>

#include "peft_kernels/adapter_linear.h"

namespace peft_kernels {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "adapter_linear (cuda): x must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "adapter_linear (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

int num_sms(int device) {
  static std::array<int, 64> cache{};  // 0 = not queried yet; a benign race (same value written)
  if (device < 0 || device >= static_cast<int>(cache.size())) return 108;
  if (cache[device] == 0) {
    int sms = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cache[device] = sms > 0 ? sms : 108;
  }
  return cache[device];
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* name, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.device() == x.device(), "adapter_linear (cuda): ", name, " is on ", t.device(), " but x is on ",
              x.device());
  if (dtype.has_value() && t.numel() > 0) {
    TORCH_CHECK_TYPE(t.scalar_type() == *dtype, "adapter_linear (cuda): ", name, " must be ", *dtype, ", got ",
                     t.scalar_type());
  }
}

// Raise (IndexError, like the reference) if a slot id is outside [-1, S), or a rank outside [0, R). One reduction
// per tensor, one device->host copy in total: the only synchronisation of the op.
void validate_ids_and_ranks(const at::Tensor& lora_ids, int64_t S, const at::Tensor& lora_rank, int64_t R,
                            const at::Tensor& lokr_ids, int64_t T) {
  std::vector<at::Tensor> stats;
  for (const at::Tensor* t : {&lora_ids, &lora_rank, &lokr_ids}) {
    if (t->numel() == 0) continue;
    auto [mn, mx] = at::aminmax(*t);
    stats.push_back(mn.reshape({1}));
    stats.push_back(mx.reshape({1}));
  }
  if (stats.empty()) return;
  const at::Tensor host = at::cat(stats).to(at::kCPU);
  const int32_t* v = host.data_ptr<int32_t>();
  int i = 0;
  if (lora_ids.numel() > 0) {
    const int32_t lo = v[i++], hi = v[i++];
    TORCH_CHECK_INDEX(lo >= -1 && hi < S, "adapter_linear: lora_ids: slot id ", lo < -1 ? lo : hi,
                      " is out of range for a bank of ", S, " slot(s) (-1 means base only)");
  }
  if (lora_rank.numel() > 0) {
    const int32_t lo = v[i++], hi = v[i++];
    TORCH_CHECK_VALUE(lo >= 0 && hi <= R, "adapter_linear: lora_rank values must be in [0, ", R, "], got ",
                      lo < 0 ? lo : hi);
  }
  if (lokr_ids.numel() > 0) {
    const int32_t lo = v[i++], hi = v[i++];
    TORCH_CHECK_INDEX(lo >= -1 && hi < T, "adapter_linear: lokr_ids: slot id ", lo < -1 ? lo : hi,
                      " is out of range for a bank of ", T, " slot(s) (-1 means base only)");
  }
}

void apply_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                const at::Tensor& lora_scale, const at::Tensor& lora_rank, const at::Tensor& lora_ids, DType dtype,
                cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t S = lora_a.size(0), R = lora_a.size(1), P = lora_ids.size(1);
  if (M == 0 || S == 0 || R == 0 || P == 0 || N == 0) return;
  TORCH_CHECK_VALUE(M * P <= kInt32Max && P * S < kInt32Max && K <= kInt32Max && N <= kInt32Max,
                    "adapter_linear (cuda): sizes exceed int32 (M*P=", M * P, ", P*S=", P * S, ")");
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous(), ids = lora_ids.contiguous();
  const at::Tensor scale = lora_scale.contiguous(), ranks = lora_rank.contiguous();
  const int64_t E = M * P;
  const int sms = num_sms(x.get_device());

  LoraShrinkArgs sa;
  sa.x = x.data_ptr();
  sa.x_stride = x.stride(0);
  sa.a = a.data_ptr();
  sa.a_slot_stride = a.stride(0);
  sa.a_row_stride = a.stride(1);
  sa.ids = ids.data_ptr<int32_t>();
  sa.ranks = ranks.data_ptr<int32_t>();
  sa.M = static_cast<int>(M);
  sa.P = static_cast<int>(P);
  sa.K = static_cast<int>(K);
  sa.R = static_cast<int>(R);
  sa.S = static_cast<int>(S);

  LoraExpandArgs ea;
  ea.y = y.data_ptr();
  ea.y_stride = y.stride(0);
  ea.b = b.data_ptr();
  ea.b_slot_stride = b.stride(0);
  ea.b_row_stride = b.stride(1);
  ea.scale = scale.data_ptr<float>();
  ea.ids = sa.ids;
  ea.ranks = sa.ranks;
  ea.M = sa.M;
  ea.P = sa.P;
  ea.N = static_cast<int>(N);
  ea.R = sa.R;
  ea.S = sa.S;

  if (M < kBgmvMaxRows) {
    // Decode: per-row GEMV; split K across blocks until about two waves of blocks.
    const SplitK sk = choose_split_k(E * ((R + 3) / 4), K, sms, /*min_chunk=*/512, /*align=*/8);
    const at::Tensor part = at::empty({sk.ksplit, E, R}, x.options().dtype(at::kFloat));
    sa.ksplit = ea.ksplit = sk.ksplit;
    sa.k_chunk = sk.k_chunk;
    sa.part = part.data_ptr<float>();
    ea.part = sa.part;
    check_launch(bgmv_shrink(dtype, sa, stream), "bgmv_shrink");
    check_launch(bgmv_expand(dtype, ea, stream), "bgmv_expand");
    return;
  }

  // Prefill: sort the (row, position) pairs by key g = p * S + slot (no adapter: key P * S, sorted last, never
  // processed). Segment and tile tables are prefix sums on the device; grid sizes depend only on shapes.
  const at::Tensor pos = at::arange(P, ids.options()).view({1, P});
  const at::Tensor key = at::where(ids >= 0, pos * static_cast<int32_t>(S) + ids, static_cast<int32_t>(P * S)).view(-1);
  const at::Tensor sorted_pairs = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false)).to(at::kInt);
  const at::Tensor counts = at::zeros({P * S + 1}, ids.options())
                                .scatter_add_(0, key.to(at::kLong), at::ones_like(key))
                                .narrow(0, 0, P * S);
  const at::Tensor zero = at::zeros({1}, ids.options());
  const at::Tensor seg_start = at::cat({zero, at::cumsum(counts, 0, at::kInt)});
  const at::Tensor tiles = at::floor_divide(counts + (kSgmvTileM - 1), kSgmvTileM);
  const at::Tensor tile_start = at::cat({zero, at::cumsum(tiles, 0, at::kInt)});

  const int64_t shrink_tiles = (E + kSgmvTileM - 1) / kSgmvTileM + P * S;  // >= sum of ceil(len / BM)
  const SplitK sk = choose_split_k(shrink_tiles * ((R + 15) / 16), K, sms, /*min_chunk=*/1024, /*align=*/32);
  const at::Tensor part = at::empty({sk.ksplit, E, R}, x.options().dtype(at::kFloat));
  sa.ksplit = ea.ksplit = sk.ksplit;
  sa.k_chunk = sk.k_chunk;
  sa.part = part.data_ptr<float>();
  ea.part = sa.part;
  sa.sorted_pairs = ea.sorted_pairs = sorted_pairs.data_ptr<int32_t>();
  sa.seg_start = ea.seg_start = seg_start.data_ptr<int32_t>();
  sa.tile_start = ea.tile_start = tile_start.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(shrink_tiles <= kInt32Max, "adapter_linear (cuda): too many tiles");
  sa.num_tiles_bound = static_cast<int>(shrink_tiles);
  check_launch(sgmv_shrink(dtype, sa, stream), "sgmv_shrink");
  // One expand per position: within a position each row appears once, so no two blocks write the same y element.
  ea.num_tiles_bound = static_cast<int>((M + kSgmvTileM - 1) / kSgmvTileM + S);
  for (int64_t p = 0; p < P; ++p) {
    ea.position = static_cast<int>(p);
    check_launch(sgmv_expand(dtype, ea, stream), "sgmv_expand");
  }
}

void apply_lokr(at::Tensor& y, const at::Tensor& x, const at::Tensor& lokr_w1, const at::Tensor& lokr_w2,
                const at::Tensor& lokr_scale, const at::Tensor& lokr_ids, DType dtype, cudaStream_t stream) {
  const int64_t M = x.size(0), T = lokr_w1.size(0), Q = lokr_ids.size(1);
  if (M == 0 || T == 0 || Q == 0) return;
  TORCH_CHECK_VALUE(M * Q <= kInt32Max, "adapter_linear (cuda): M*Q=", M * Q, " exceeds int32");
  const at::Tensor w1 = lokr_w1.contiguous(), w2 = lokr_w2.contiguous(), ids = lokr_ids.contiguous();
  const at::Tensor scale = lokr_scale.contiguous();
  LokrArgs la;
  la.x = x.data_ptr();
  la.x_stride = x.stride(0);
  la.y = y.data_ptr();
  la.y_stride = y.stride(0);
  la.w1 = w1.data_ptr();
  la.w1_slot_stride = w1.stride(0);
  la.w1_row_stride = w1.stride(1);
  la.w2 = w2.data_ptr();
  la.w2_slot_stride = w2.stride(0);
  la.w2_row_stride = w2.stride(1);
  la.scale = scale.data_ptr<float>();
  la.ids = ids.data_ptr<int32_t>();
  la.M = static_cast<int>(M);
  la.Q = static_cast<int>(Q);
  la.a = static_cast<int>(w1.size(1));
  la.b = static_cast<int>(w1.size(2));
  la.c = static_cast<int>(w2.size(1));
  la.d = static_cast<int>(w2.size(2));
  const at::Tensor tbuf = at::empty({M * Q, la.b, la.c}, x.options().dtype(at::kFloat));
  la.tbuf = tbuf.data_ptr<float>();
  check_launch(lokr_apply(dtype, la, stream), "lokr_apply");
}

at::Tensor adapter_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& lora_scale,
                               const at::Tensor& lora_rank, const at::Tensor& lora_ids, const at::Tensor& lokr_w1,
                               const at::Tensor& lokr_w2, const at::Tensor& lokr_scale, const at::Tensor& lokr_ids) {
#ifndef PEFT_KERNELS_EMULATE
  TORCH_CHECK(x.is_cuda(), "adapter_linear (cuda): x must be a CUDA tensor");
#endif
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2, "adapter_linear: x must be [M, in] and weight [out, in], got ",
                    x.sizes(), " and ", weight.sizes());
  const DType dtype = to_dtype(x.scalar_type());
  const at::ScalarType st = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, "adapter_linear: x has ", K, " features but weight is ", weight.sizes(),
                    " ([out, in])");
  check_tensor(weight, x, "weight", st);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "adapter_linear: bias must be [", N, "], got ",
                      bias->sizes());
    check_tensor(*bias, x, "bias", st);
  }
  // LoRA bank
  TORCH_CHECK_VALUE(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_b.size(0) == lora_a.size(0),
                    "adapter_linear: lora_a must be [S, R, in] and lora_b [S, out, R], got ", lora_a.sizes(), ", ",
                    lora_b.sizes());
  const int64_t S = lora_a.size(0), R = lora_a.size(1);
  TORCH_CHECK_VALUE(S == 0 || (lora_a.size(2) == K && lora_b.size(1) == N && lora_b.size(2) == R),
                    "adapter_linear: LoRA bank shapes A ", lora_a.sizes(), " / B ", lora_b.sizes(),
                    " do not fit a layer of in=", K, ", out=", N);
  TORCH_CHECK_VALUE(lora_scale.dim() == 1 && lora_scale.size(0) == S && lora_rank.dim() == 1 && lora_rank.size(0) == S,
                    "adapter_linear: lora_scale and lora_rank must be [", S, "], got ", lora_scale.sizes(), ", ",
                    lora_rank.sizes());
  TORCH_CHECK_VALUE(lora_ids.dim() == 2 && lora_ids.size(0) == M, "adapter_linear: lora_ids must be [M=", M,
                    ", P], got ", lora_ids.sizes());
  check_tensor(lora_a, x, "lora_a", st);
  check_tensor(lora_b, x, "lora_b", st);
  check_tensor(lora_scale, x, "lora_scale", at::kFloat);
  check_tensor(lora_rank, x, "lora_rank", at::kInt);
  TORCH_CHECK_TYPE(lora_ids.scalar_type() == at::kInt, "adapter_linear: lora_ids: slot ids must be int32, got ",
                   lora_ids.scalar_type());
  check_tensor(lora_ids, x, "lora_ids", at::kInt);
  // LoKr bank
  TORCH_CHECK_VALUE(lokr_w1.dim() == 3 && lokr_w2.dim() == 3 && lokr_w2.size(0) == lokr_w1.size(0),
                    "adapter_linear: lokr_w1 must be [T, a, b] and lokr_w2 [T, c, d], got ", lokr_w1.sizes(), ", ",
                    lokr_w2.sizes());
  const int64_t T = lokr_w1.size(0);
  if (T > 0) {
    const int64_t a = lokr_w1.size(1), b = lokr_w1.size(2), c = lokr_w2.size(1), d = lokr_w2.size(2);
    TORCH_CHECK_VALUE(a * c == N && b * d == K, "adapter_linear: LoKr factors w1 ", a, "x", b, " and w2 ", c, "x", d,
                      " give a ", a * c, "x", b * d, " delta, the layer is ", N, "x", K);
  }
  TORCH_CHECK_VALUE(lokr_scale.dim() == 1 && lokr_scale.size(0) == T, "adapter_linear: lokr_scale must be [", T,
                    "], got ", lokr_scale.sizes());
  TORCH_CHECK_VALUE(lokr_ids.dim() == 2 && lokr_ids.size(0) == M, "adapter_linear: lokr_ids must be [M=", M,
                    ", Q], got ", lokr_ids.sizes());
  check_tensor(lokr_w1, x, "lokr_w1", st);
  check_tensor(lokr_w2, x, "lokr_w2", st);
  check_tensor(lokr_scale, x, "lokr_scale", at::kFloat);
  TORCH_CHECK_TYPE(lokr_ids.scalar_type() == at::kInt, "adapter_linear: lokr_ids: slot ids must be int32, got ",
                   lokr_ids.scalar_type());
  check_tensor(lokr_ids, x, "lokr_ids", at::kInt);

#ifndef PEFT_KERNELS_EMULATE
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  validate_ids_and_ranks(lora_ids, S, lora_rank, R, lokr_ids, T);  // raises before any kernel launch

  const at::Tensor xc = x.contiguous();
  // Base GEMM on cuBLAS; weight may be a transposed view (cuBLAS takes either layout).
  at::Tensor y = bias.has_value() ? at::addmm(*bias, xc, weight.t()) : at::mm(xc, weight.t());
  if (M == 0 || N == 0) return y;
  TORCH_CHECK(y.is_contiguous(), "adapter_linear (cuda): internal error: base output is not contiguous");
#ifndef PEFT_KERNELS_EMULATE
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#else
  const cudaStream_t stream = nullptr;
#endif
  apply_lora(y, xc, lora_a, lora_b, lora_scale, lora_rank, lora_ids, dtype, stream);
  apply_lokr(y, xc, lokr_w1, lokr_w2, lokr_scale, lokr_ids, dtype, stream);
  return y;
}

}  // namespace
}  // namespace peft_kernels

#ifndef PEFT_KERNELS_EMULATE
TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) { m.impl("adapter_linear", TORCH_FN(peft_kernels::adapter_linear_cuda)); }
#else
TORCH_LIBRARY(peft_kernels_emu, m) {
  m.def(
      "adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor lora_scale, "
      "Tensor lora_rank, Tensor lora_ids, Tensor lokr_w1, Tensor lokr_w2, Tensor lokr_scale, Tensor lokr_ids) -> Tensor");
  m.impl("adapter_linear", c10::DispatchKey::CPU, TORCH_FN(peft_kernels::adapter_linear_cuda));
}
#endif
