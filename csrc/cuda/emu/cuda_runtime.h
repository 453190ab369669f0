// Test-only stand-in for <cuda_runtime.h>: the CPU emulation of csrc/cuda/emu/peft_emu.h.
#pragma once
#include "peft_emu.h"
