"""The runtime environment variables, read here; the others are listed below with the one place that reads them.

Runtime (Python, read through this module):
    PEFT_KERNELS_BACKEND          auto | torch | triton | cuda | cpu: force a backend (auto falls back quietly)
    PEFT_KERNELS_DISABLE_EXT      1: do not load the compiled extension
    PEFT_KERNELS_TRITON_CONFIG    path of a JSON file overriding Triton launch configurations (ops/triton/configs.py)
    TRITON_INTERPRET              1: Triton kernels run on CPU tensors through Triton's interpreter
Read by the C++ CPU kernels (csrc/cpu), at first use:
    PEFT_KERNELS_CPU_ISA=base     force the baseline-ISA kernels instead of AVX2+FMA
    PEFT_KERNELS_CPU_MIN_PARALLEL_WORK   multiply-adds below which a delta runs on the calling thread
Build time (setup.py): PEFT_KERNELS_BUILD_EXT=0 (pure-Python install), PEFT_KERNELS_CUDA=0 (CPU-only extension).
Tests and tools: PEFT_KERNELS_REQUIRE_EXT=1 (CPU kernel tests fail instead of skipping; CI sets it),
PEFT_KERNELS_TESTS_SELF_CHECK=1 (tests/model runs PEFT as its own subject, to check the tests),
PEFT_KERNELS_SKIP_LAUNCHER_CHECK=1 (tools/compile_cuda.sh skips the torch-launcher syntax check).
"""

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


def triton_config_path() -> str | None:
    """``PEFT_KERNELS_TRITON_CONFIG``: a JSON file overriding Triton launch configurations, or None."""
    return os.environ.get("PEFT_KERNELS_TRITON_CONFIG") or None
