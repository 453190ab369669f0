"""Every PEFT_KERNELS_* environment variable, read in one place."""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


def requested_backend() -> str:
    """``PEFT_KERNELS_BACKEND``: auto (default) | torch | triton | cuda | cpu. Read on every call, so it can change."""
    value = os.environ.get("PEFT_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PEFT_KERNELS_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def extension_disabled() -> bool:
    """``PEFT_KERNELS_DISABLE_EXT=1`` skips loading the compiled extension (pure-PyTorch and Triton only)."""
    return os.environ.get("PEFT_KERNELS_DISABLE_EXT", "0") not in ("", "0", "false", "False")


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
