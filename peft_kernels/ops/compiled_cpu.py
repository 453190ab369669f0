"""The ``cpu`` backend: the C++ kernels of csrc/cpu, reached through ``torch.ops.peft_kernels.adapter_linear``.

``adapter_linear`` has the contract of ``reference.adapter_linear`` (inference only: no autograd through the kernel).
"""

from __future__ import annotations

import torch

from peft_kernels.ops.compiled import adapter_linear, kernel_unavailable_reason

__all__ = ["adapter_linear", "unavailable_reason"]


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the C++ CPU kernel can run on ``device`` tensors, otherwise why not."""
    return kernel_unavailable_reason(device, "CPU")
