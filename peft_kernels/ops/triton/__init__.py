"""The ``triton`` backend: Triton kernels for ``adapter_linear`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``).

Importing this package imports neither triton nor the kernels: ``unavailable_reason`` only looks for triton, and the
kernels, the launchers and the ``torch.ops.peft_kernels.adapter_linear_triton`` registration load on first call
(``load_op()``). Layout: ``kernels.py`` (the ``@triton.jit`` kernels), ``launch.py`` (metadata, launchers,
path choice, op registration), ``configs.py`` (launch configurations as data, ``PEFT_KERNELS_TRITON_CONFIG``).
"""

from __future__ import annotations

import importlib.util

import torch

from peft_kernels import env

__all__ = ["adapter_linear", "load_op", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device`` tensors, otherwise why not."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if env.triton_interpret():
            return None
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1"
    return f"no Triton kernels for {device.type} tensors"


def load_op():
    """Import the kernels and register ``torch.ops.peft_kernels.adapter_linear_triton``; returns the op."""
    from peft_kernels.ops.triton import launch  # noqa: F401  (registers the op)

    return torch.ops.peft_kernels.adapter_linear_triton


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
    """``reference.adapter_linear`` on Triton kernels, path chosen from shapes (see ``launch.choose_path``)."""
    return load_op()(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
