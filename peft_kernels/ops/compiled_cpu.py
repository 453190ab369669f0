"""The ``cpu`` backend: the C++ kernels of csrc/cpu, reached through ``torch.ops.peft_kernels.adapter_linear``."""

from __future__ import annotations

import torch

from peft_kernels import _extension
from peft_kernels.ops import compiled

__all__ = ["adapter_linear", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """None when the C++ CPU kernel can run on ``device`` tensors, otherwise why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    if not compiled.op_available():
        return f"the compiled extension peft_kernels._C is not loaded ({_extension.load_error or 'op not registered'})"
    if not _extension.has_kernel("adapter_linear", "CPU"):
        return "peft_kernels._C was built without the CPU kernel of adapter_linear"
    return None


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_scale: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_ids: torch.Tensor,
    lokr_w1: torch.Tensor,
    lokr_w2: torch.Tensor,
    lokr_scale: torch.Tensor,
    lokr_ids: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``reference.adapter_linear`` (inference only: no autograd through the kernel)."""
    return compiled.adapter_linear(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
