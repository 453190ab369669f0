"""Importing peft_kernels is lean: no CUDA initialisation, no triton import, and it works without the extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, check=True
    )
    return out.stdout.strip()


def test_import_does_not_initialise_cuda_or_import_triton():
    code = (
        "import sys, torch, peft_kernels; "
        "print(torch.cuda.is_initialized(), 'triton' in sys.modules, 'peft' in sys.modules)"
    )
    assert _run(code) == "False False False"


def test_works_without_extension():
    code = (
        "import torch, peft_kernels; from torch import nn; "
        "l = peft_kernels.FusedAdapterLinear(nn.Linear(8, 6)); l.add_lora('a', torch.ones(2, 8), torch.ones(6, 2)); "
        "l.set_adapter('a'); print(peft_kernels.ext_available(), peft_kernels.backend_info()['cpu_backends'], "
        "tuple(l(torch.ones(3, 8)).shape))"
    )
    assert _run(code, PEFT_KERNELS_DISABLE_EXT="1", TRITON_INTERPRET="0") == "False ['torch'] (3, 6)"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_backend_that_cannot_run_raises(backend, monkeypatch):
    import torch

    from peft_kernels import ops
    from tests.ops.cases import make_case

    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(dtype=torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match=backend):
        ops.adapter_linear(*case.args())


def test_bad_backend_name_raises(monkeypatch):
    from peft_kernels import env

    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PEFT_KERNELS_BACKEND='fastest'"):
        env.requested_backend()


def test_auto_backend_falls_back_to_reference(monkeypatch):
    import torch

    from peft_kernels import ops

    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "auto")
    assert ops.resolve_backend(torch.device("cpu")) in ("cpu", "torch")
    assert ops.resolve_backend(torch.device("cpu"), needs_grad=True) == "torch"
