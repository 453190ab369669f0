// Explicit instantiations and the host launch function of the LoKr kernels for fp32, fp16 and bf16.
// Framework-free: compiles standalone with nvcc (tools/compile_cuda.sh).
#include "peft_kernels/lokr.cuh"

namespace peft_kernels {
namespace {

constexpr int kThreads = 128;

template <typename T>
cudaError_t launch(const LokrArgs& args, cudaStream_t stream) {
  const int64_t num_pairs = static_cast<int64_t>(args.M) * args.Q;
  const int64_t n = static_cast<int64_t>(args.a) * args.c;
  if (num_pairs == 0 || n == 0) return cudaSuccess;
  const int64_t bc = static_cast<int64_t>(args.b) * args.c;
  if (bc > 0) {
    const dim3 grid1(static_cast<unsigned>(num_pairs), static_cast<unsigned>(ceil_div(bc, kThreads)));
    lokr_stage1_kernel<T, kThreads><<<grid1, kThreads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 grid2(static_cast<unsigned>(args.M), static_cast<unsigned>(ceil_div(n, kThreads)));
  lokr_stage2_kernel<T, kThreads><<<grid2, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lokr_apply(DType dtype, const LokrArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) { return launch<decltype(tag)>(args, stream); });
}

}  // namespace peft_kernels
