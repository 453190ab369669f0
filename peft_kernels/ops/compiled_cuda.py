"""The ``cuda`` backend: the CUDA kernels of csrc/cuda, reached through ``torch.ops.peft_kernels.adapter_linear``.

The kernel is registered for the CUDA dispatch key by ``peft_kernels._C`` when the extension was built against a CUDA
build of torch. Nothing here touches ``torch.cuda``: importing this module or asking whether the backend can run never
initialises CUDA. ``adapter_linear`` has the contract of ``reference.adapter_linear`` on CUDA tensors (inference
only); all floating tensors must share x's dtype (fp32, fp16 or bf16); slot ids and ranks are validated (one
device-to-host copy) before any kernel runs.
"""

from __future__ import annotations

import torch

from peft_kernels.ops.compiled import adapter_linear, kernel_unavailable_reason

__all__ = ["adapter_linear", "unavailable_reason"]


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the CUDA kernel can run on ``device`` tensors, otherwise why not."""
    return kernel_unavailable_reason(device, "CUDA")
