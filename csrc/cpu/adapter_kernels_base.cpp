// The segmented LoRA kernels for the compiler's baseline ISA (SSE2 on x86-64): runs on every CPU.
#include <cstdint>
#include <cstring>

#include "cpu/adapter_kernels.h"

#define PEFT_KERNELS_ISA base
#include "cpu/adapter_kernels_impl.h"
#undef PEFT_KERNELS_ISA

namespace peft_kernels {
namespace cpu {

bool use_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace peft_kernels
