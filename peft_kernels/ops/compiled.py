"""Python side of the compiled op ``torch.ops.peft_kernels.adapter_linear`` (schema: csrc/torch_bindings.cpp).

Shared by the ``cpu`` and ``cuda`` backends: loading ``peft_kernels._C`` registers the op and its per-device kernels;
this module adds the fake (meta) implementation so ``torch.compile`` and ``torch.library.opcheck`` can trace it, and
a typed wrapper with the reference signature.
"""

from __future__ import annotations

import torch

from peft_kernels import _extension

__all__ = ["adapter_linear", "kernel_unavailable_reason", "op_available"]

_OP_NAME = "peft_kernels::adapter_linear"
_fake_registered = False


def op_available() -> bool:
    """True when ``_C`` is loaded and defines ``peft_kernels::adapter_linear`` (the fake is registered then)."""
    if not _extension.load() or not hasattr(torch.ops.peft_kernels, "adapter_linear"):
        return False
    _register_fake()
    return True


def kernel_unavailable_reason(device: torch.device | str, dispatch_key: str) -> str | None:
    """None when ``_C`` has the adapter_linear kernel for ``dispatch_key`` ("CPU"/"CUDA") and ``device`` is of that
    type, otherwise why not. Never initialises CUDA."""
    device = torch.device(device)
    backend = dispatch_key.lower()
    if device.type != backend:
        return f"the {backend} backend runs on {dispatch_key} tensors, not {device.type}"
    if not op_available():
        return f"the compiled extension peft_kernels._C is not loaded ({_extension.load_error or 'op not registered'})"
    if not _extension.has_kernel("adapter_linear", dispatch_key):
        why = " (CPU-only torch or no CUDA toolkit at build time)" if dispatch_key == "CUDA" else ""
        return f"peft_kernels._C was built without the {dispatch_key} kernel of adapter_linear{why}"
    return None


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return
    _fake_registered = True

    @torch.library.register_fake(_OP_NAME)
    def _adapter_linear_fake(
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
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "adapter_linear: x and weight must be 2-D")
        torch._check(x.shape[1] == weight.shape[1], lambda: "adapter_linear: x and weight disagree on in_features")
        return x.new_empty(x.shape[0], weight.shape[0])


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
    """``torch.ops.peft_kernels.adapter_linear``: the kernel registered for the tensors' device (inference only)."""
    if not op_available():
        raise RuntimeError(f"peft_kernels._C is not loaded ({_extension.load_error or 'op not registered'})")
    return torch.ops.peft_kernels.adapter_linear(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
