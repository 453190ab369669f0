// Test-only stand-in for <cuda_bf16.h>: the CPU emulation of csrc/cuda/emu/peft_emu.h.
#pragma once
#include "peft_emu.h"
