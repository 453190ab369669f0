"""The one tolerance policy of the test suite, keyed by dtype (DESIGN.md section 7).

Outputs are O(1): tests scale inputs by 1/sqrt(K). fp32 runs with TF32 off. Every comparison in tests/ goes
through ``assert_close`` so the table below is the only place tolerances live.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (rtol, atol)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Compare at the tolerance of ``dtype`` (default: the lower precision of the two tensors).

    ``expected`` may be a higher-precision oracle (fp64 reference); both are compared in fp64.
    """
    if dtype is None:
        dtype = actual.dtype if TOLERANCES[actual.dtype][0] >= TOLERANCES[expected.dtype][0] else expected.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )
