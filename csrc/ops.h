// Declarations of the at::Tensor-level entry points of peft_kernels::* (schemas: csrc/torch_bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace peft_kernels {

// y = x W^T + bias + every LoRA / LoKr delta selected by lora_ids / lokr_ids; semantics of
// peft_kernels/ops/reference.py::adapter_linear. CPU implementation: csrc/cpu/adapter_linear.cpp.
at::Tensor adapter_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& lora_scale,
                              const at::Tensor& lora_rank, const at::Tensor& lora_ids, const at::Tensor& lokr_w1,
                              const at::Tensor& lokr_w2, const at::Tensor& lokr_scale, const at::Tensor& lokr_ids);

}  // namespace peft_kernels
