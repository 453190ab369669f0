"""The ``cuda`` backend: the CUDA kernels of csrc/cuda, reached through ``torch.ops.peft_kernels.adapter_linear``.

The kernel is registered for the CUDA dispatch key by ``peft_kernels._C`` when the extension was built against a CUDA
build of torch. Nothing here touches ``torch.cuda``: importing this module or asking whether the backend can run never
initialises CUDA.
"""

from __future__ import annotations

import torch

from peft_kernels import _extension
from peft_kernels.ops import compiled

__all__ = ["adapter_linear", "unavailable_reason"]


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the CUDA kernel can run on ``device`` tensors, otherwise why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not compiled.op_available():
        return f"the compiled extension peft_kernels._C is not loaded ({_extension.load_error or 'op not registered'})"
    if not _extension.has_kernel("adapter_linear", "CUDA"):
        return "peft_kernels._C was built without the CUDA kernel of adapter_linear (CPU-only torch or no CUDA toolkit)"
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
    """Same contract as ``reference.adapter_linear`` on CUDA tensors (inference only: no autograd through the kernel).

    All floating tensors must share x's dtype (fp32, fp16 or bf16); scales are fp32, ranks and ids int32, everything
    on x's device. Slot ids and ranks are validated (one device-to-host copy) before any kernel runs.
    """
    return compiled.adapter_linear(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
