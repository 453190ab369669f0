"""Launch configurations of the Triton ``adapter_linear`` kernels, kept as data.

Two built-in profiles: ``gpu`` (CUDA devices; untuned starting points, see the note below) and ``interpreter``
(``TRITON_INTERPRET=1`` on CPU tensors, where every program is run by numpy and small tiles keep the tests fast).
``PEFT_KERNELS_TRITON_CONFIG=/path/to/file.json`` overrides any entry: the file holds a dict shaped like one profile
(``{"fused": {"BLOCK_N": 64}, "dispatch": {"decode_max_rows": 32}}``), merged key by key over the active profile.
The file is re-read when the variable changes.

NOTE: the ``gpu`` numbers follow vLLM's untuned defaults (shrink BLOCK_K 256 / expand BLOCK_N 128, 4 warps) and the
fused kernel's tile is a plain 64x128x32 GEMM tile; none of them has been measured here (no GPU on the development
machine). ``benchmarks/bench_triton_gpu.py`` is the place to tune them.
"""

from __future__ import annotations

import copy
import functools
import json

from peft_kernels import env

# Every block size is a power of two; tl.dot needs every dimension of its operands >= 16.
_GPU: dict[str, dict] = {
    # one-pass kernel: base GEMM + shrink on the same X tile + expand in the epilogue
    # 8 warps: with 4 the sm_80 fp16 build spilled (255 registers + 136 B stack; 3.3 KB with the LoKr epilogue),
    # with 8 no stack without LoKr, ~1 KB with it (cuobjdump -res-usage of a GPU-less triton.compile).
    "fused": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 8, "num_stages": 3},
    # two-kernel path: segmented shrink into an fp32 buffer, then the base GEMM seeded from S B^T
    "two_kernel_shrink": {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2},
    "two_kernel_gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 8, "num_stages": 3},
    # decode path: per-row (BGMV-style) shrink, then the base GEMM over rows in order with a per-row expand
    "decode_shrink": {"BLOCK_K": 256, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2},
    # BLOCK_N 32: the per-row expand holds a BLOCK_M x BLOCK_N x BLOCK_R product; at BLOCK_N 64 the sm_80 build
    # (cuobjdump -res-usage, compiled without a GPU) used 255 registers + 1112 bytes of stack, at 32: 248 bytes.
    "decode_gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_R": 16, "num_warps": 4, "num_stages": 3},
    # LoKr stage 1: T[m, j, q] = sum_d X[m, j, d] w2[q, d]
    "lokr_shrink": {"BLOCK_J": 16, "BLOCK_C": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2},
    # path choice from shapes (see adapter_linear.choose_path)
    "dispatch": {"decode_max_rows": 16, "fused_max_rank": 32, "two_kernel_min_rows": 4096},
}

# Under the interpreter a program costs about the same whatever its tile size, but numpy work grows with the tile:
# 16-wide tiles keep tests/ops/test_adapter_linear_triton.py well under its time budget.
_INTERPRETER: dict[str, dict] = {
    "fused": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "two_kernel_shrink": {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "two_kernel_gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "decode_shrink": {"BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "decode_gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 1, "num_stages": 1},
    "lokr_shrink": {"BLOCK_J": 16, "BLOCK_C": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1},
    "dispatch": {"decode_max_rows": 16, "fused_max_rank": 32, "two_kernel_min_rows": 4096},
}

PROFILES = {"gpu": _GPU, "interpreter": _INTERPRETER}
CONFIG_ENV = "PEFT_KERNELS_TRITON_CONFIG"


def _merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise KeyError(f"{CONFIG_ENV}: unknown entry {where}{key!r} (known: {', '.join(sorted(out))})")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"{CONFIG_ENV}: entry {where}{key!r} must be a dict")
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=8)
def _load(profile: str, path: str | None) -> dict:
    config = copy.deepcopy(PROFILES[profile])
    if path:
        with open(path) as f:
            config = _merge(config, json.load(f))
    return config


def get_config(interpreter: bool) -> dict:
    """The launch configuration in force: the profile for this device kind, with the JSON override merged in."""
    return _load("interpreter" if interpreter else "gpu", env.triton_config_path())
