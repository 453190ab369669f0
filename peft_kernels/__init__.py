"""peft_kernels: a linear layer's base matmul plus every active LoRA / LoHa / LoKr delta in one fused op,
behind Hugging Face PEFT's API and on-disk format.

Importing is lean: no CUDA initialisation, and the compiled extension is optional (``peft_kernels.ext_available()``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first access so `import peft_kernels` stays cheap.
_LAZY = {
    "PeftModel": "peft_kernels.model.peft_model",
    "PeftMixedModel": "peft_kernels.model.mixed_model",
    "get_peft_model": "peft_kernels.model.mapping",
    "PeftConfig": "peft_kernels.model.config",
    "LoraConfig": "peft_kernels.model.config",
    "LoHaConfig": "peft_kernels.model.config",
    "LoKrConfig": "peft_kernels.model.config",
    "FusedAdapterLinear": "peft_kernels.layers.fused_linear",
    "AdapterPool": "peft_kernels.serving.pool",
}

__all__ = ["__version__", "ext_available", "backend_info", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_kernels' has no attribute {name!r}")


def ext_available() -> bool:
    """True when the compiled extension ``peft_kernels._C`` is loaded."""
    from peft_kernels import _extension

    return _extension.load()


def backend_info() -> dict[str, Any]:
    """What can run here: the extension's state and the backends available for CPU tensors."""
    from peft_kernels import _extension, env
    from peft_kernels.ops import available_backends

    loaded = _extension.load()
    return {
        "requested": env.requested_backend(),
        "extension_loaded": loaded,
        "extension_error": _extension.load_error,
        "cpu_backends": available_backends("cpu"),
    }
