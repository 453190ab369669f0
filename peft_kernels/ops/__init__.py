"""The fused ops and the choice of backend.

Backends, each implementing the signatures of ``peft_kernels.ops.reference``:

- ``torch``: the pure-PyTorch reference (any device; the only one with autograd, so training always uses it);
- ``cpu``: the C++ kernels of ``csrc/cpu`` (``torch.ops.peft_kernels.*`` on CPU tensors), when the extension is built;
- ``cuda``: the CUDA kernels of ``csrc/cuda``, when the extension was built with CUDA;
- ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

``PEFT_KERNELS_BACKEND`` (or ``backend=``) forces one; a forced backend that cannot run raises. ``auto`` picks the best
that can run and falls back quietly: CUDA tensors -> triton, cuda, torch; CPU tensors -> cpu, torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from peft_kernels import env
from peft_kernels.ops import reference

__all__ = ["adapter_linear", "available_backends", "resolve_backend", "BackendUnavailableError"]

# Backend name -> module implementing it. Each module exposes ``unavailable_reason(device) -> str | None`` and the
# fast ops under the reference names. Modules are imported on first use, so importing peft_kernels stays lean.
_BACKEND_MODULES = {
    "cpu": "peft_kernels.ops.compiled_cpu",
    "cuda": "peft_kernels.ops.compiled_cuda",
    "triton": "peft_kernels.ops.triton",
}
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``PEFT_KERNELS_BACKEND`` or ``backend=``) that cannot run on these tensors."""


_modules: dict[str, ModuleType | None] = {}


def _backend_module(name: str) -> ModuleType | None:
    if name not in _modules:  # imported once; a plain dict lookup afterwards keeps torch.compile graphs whole
        try:
            _modules[name] = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError:
            _modules[name] = None
    return _modules[name]


_reasons: dict[tuple, str | None] = {}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, otherwise why not (cached: it is asked on every call)."""
    if name == "torch":
        return None
    key = (name, device.type, env.triton_interpret())
    if key not in _reasons:
        module = _backend_module(name)
        _reasons[key] = (
            f"the {name} backend module could not be imported" if module is None else module.unavailable_reason(device)
        )
    return _reasons[key]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [name for name in ("torch", "cpu", "cuda", "triton") if unavailable_reason(name, device) is None]


def resolve_backend(device: torch.device, backend: str | None = None, needs_grad: bool = False) -> str:
    """The backend that will run an op on ``device``.

    Calls that need autograd always take the reference: the kernels are inference-only.
    """
    requested = backend or env.requested_backend()
    if needs_grad:
        return "torch"
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    if requested not in env.BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(env.BACKENDS)}")
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {requested!r} was requested but cannot run on {device} tensors: {reason}"
        )
    return requested


def _impl(op: str, backend: str) -> Callable[..., torch.Tensor]:
    if backend == "torch":
        return getattr(reference, op)
    return getattr(_backend_module(backend), op)


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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Base linear plus every selected adapter delta, one call; see ``reference.adapter_linear`` for the contract."""
    tensors = (x, weight, bias, lora_a, lora_b, lokr_w1, lokr_w2)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    name = resolve_backend(x.device, backend, needs_grad)
    return _impl("adapter_linear", name)(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
