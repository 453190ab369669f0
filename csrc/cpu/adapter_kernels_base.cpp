// The segmented LoRA kernels for the compiler's baseline ISA (SSE2 on x86-64): runs on every CPU.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/adapter_kernels.h"

#define PEFT_KERNELS_ISA base
#include "cpu/adapter_kernels_impl.h"
#undef PEFT_KERNELS_ISA

namespace peft_kernels {
namespace cpu {

// PEFT_KERNELS_CPU_ISA=base forces the baseline build (tests use it to check both builds on one machine).
bool use_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    const char* isa = std::getenv("PEFT_KERNELS_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "base") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace peft_kernels
