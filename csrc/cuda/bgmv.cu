// Explicit instantiations and host launch functions of the BGMV (decode) kernels for fp32, fp16 and bf16.
// Framework-free: compiles standalone with nvcc (tools/compile_cuda.sh).
#include "peft_kernels/bgmv.cuh"

namespace peft_kernels {
namespace {

constexpr int kShrinkRB = 4;         // rank rows per block
constexpr int kShrinkThreads = 128;  // K is split across these threads (and across grid.z chunks)
constexpr int kExpandThreads = 128;    // output columns per block
constexpr int kExpandRankChunk = 256;  // ranks staged in smem at a time

template <typename T>
bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
cudaError_t launch_shrink(const LoraShrinkArgs& args, cudaStream_t stream) {
  const int64_t num_pairs = static_cast<int64_t>(args.M) * args.P;
  if (num_pairs == 0 || args.R == 0) return cudaSuccess;
  constexpr int kVec = VecWidth<T>::value;
  const bool vec = aligned16<T>(args.x) && aligned16<T>(args.a) && args.K % kVec == 0 && args.x_stride % kVec == 0 &&
                   args.a_slot_stride % kVec == 0 && args.a_row_stride % kVec == 0 && args.k_chunk % kVec == 0;
  const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(ceil_div(args.R, kShrinkRB)),
                  static_cast<unsigned>(args.ksplit));
  if (vec)
    bgmv_shrink_kernel<T, kShrinkRB, kShrinkThreads, true><<<grid, kShrinkThreads, 0, stream>>>(args);
  else
    bgmv_shrink_kernel<T, kShrinkRB, kShrinkThreads, false><<<grid, kShrinkThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand(const LoraExpandArgs& args, cudaStream_t stream) {
  if (args.M == 0 || args.P == 0 || args.N == 0 || args.R == 0) return cudaSuccess;
  constexpr int kVec = VecWidth<T>::value;
  const bool vec = aligned16<T>(args.b) && args.b_slot_stride % kVec == 0 && args.b_row_stride % kVec == 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.N, kExpandThreads)), static_cast<unsigned>(args.M));
  if (vec)
    bgmv_expand_kernel<T, kExpandThreads, kExpandRankChunk, true><<<grid, kExpandThreads, 0, stream>>>(args);
  else
    bgmv_expand_kernel<T, kExpandThreads, kExpandRankChunk, false><<<grid, kExpandThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t bgmv_shrink(DType dtype, const LoraShrinkArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) { return launch_shrink<decltype(tag)>(args, stream); });
}

cudaError_t bgmv_expand(DType dtype, const LoraExpandArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) { return launch_expand<decltype(tag)>(args, stream); });
}

}  // namespace peft_kernels
