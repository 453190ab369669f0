// The segmented LoRA kernels compiled for AVX2 + FMA; called only when use_avx2() says the CPU has both.
// Standard headers come before the target pragma so that no inline library code is compiled for AVX2 here.
#include <cstdint>
#include <cstring>

#include "cpu/adapter_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PEFT_KERNELS_ISA avx2
#include "cpu/adapter_kernels_impl.h"
#undef PEFT_KERNELS_ISA
#pragma GCC pop_options
#else
// Not x86: use_avx2() is always false; these symbols only satisfy the linker.
#define PEFT_KERNELS_ISA avx2
#include "cpu/adapter_kernels_impl.h"
#undef PEFT_KERNELS_ISA
#endif
