"""Guarded load of the compiled extension ``peft_kernels._C``.

Importing never fails because the extension is missing or broken, and never initialises CUDA: the extension only
registers ops with the dispatcher (``TORCH_LIBRARY(peft_kernels, ...)``).
"""

from __future__ import annotations

import logging

import torch

from peft_kernels import env

logger = logging.getLogger(__name__)

_loaded: bool | None = None
load_error: str | None = None


def load() -> bool:
    """Load ``peft_kernels._C`` once; True when its ops are registered."""
    global _loaded, load_error
    if _loaded is None:
        if env.extension_disabled():
            _loaded, load_error = False, "disabled by PEFT_KERNELS_DISABLE_EXT"
        else:
            try:
                from peft_kernels import _C  # noqa: F401

                _loaded = True
            except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
                _loaded, load_error = False, f"{type(exc).__name__}: {exc}"
                logger.debug("peft_kernels._C not loaded: %s", load_error)
    return _loaded


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``peft_kernels::<op>`` has a kernel registered for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not load():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"peft_kernels::{op}", dispatch_key)
    except RuntimeError:
        return False
