// Explicit instantiations and host launch functions of the SGMV (prefill) kernels for fp32, fp16 and bf16.
// Framework-free: compiles standalone with nvcc (tools/compile_cuda.sh).
#include "peft_kernels/sgmv.cuh"

namespace peft_kernels {
namespace {

// shrink tile: kSgmvTileM pairs x 16 rank columns x 32 K, 4 rows per thread -> 128 threads
constexpr int kShrinkBN = 16, kShrinkBK = 32, kShrinkTM = 4;
constexpr int kShrinkThreads = (kSgmvTileM / kShrinkTM) * kShrinkBN;
// expand tile: kSgmvTileM pairs x 64 output columns x 16 rank, 4 x 4 outputs per thread -> 128 threads
constexpr int kExpandBN = 64, kExpandBK = 16, kExpandTM = 4, kExpandTN = 4;
constexpr int kExpandThreads = (kSgmvTileM / kExpandTM) * (kExpandBN / kExpandTN);

template <typename T>
cudaError_t launch_shrink(const LoraShrinkArgs& args, cudaStream_t stream) {
  if (args.num_tiles_bound == 0 || args.R == 0 || args.S == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.num_tiles_bound), static_cast<unsigned>(ceil_div(args.R, kShrinkBN)),
                  static_cast<unsigned>(args.ksplit));
  sgmv_shrink_kernel<T, kSgmvTileM, kShrinkBN, kShrinkBK, kShrinkTM, kShrinkThreads>
      <<<grid, kShrinkThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand(const LoraExpandArgs& args, cudaStream_t stream) {
  if (args.num_tiles_bound == 0 || args.N == 0 || args.R == 0 || args.S == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.num_tiles_bound), static_cast<unsigned>(ceil_div(args.N, kExpandBN)));
  sgmv_expand_kernel<T, kSgmvTileM, kExpandBN, kExpandBK, kExpandTM, kExpandTN, kExpandThreads>
      <<<grid, kExpandThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sgmv_shrink(DType dtype, const LoraShrinkArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) { return launch_shrink<decltype(tag)>(args, stream); });
}

cudaError_t sgmv_expand(DType dtype, const LoraExpandArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) { return launch_expand<decltype(tag)>(args, stream); });
}

}  // namespace peft_kernels
