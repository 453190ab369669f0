"""Model-level parity with PEFT_KERNELS_BACKEND=triton: the Triton kernels (under TRITON_INTERPRET=1 on CPU) serve
real transformers models with LoRA, LoHa, LoKr, mixed and adapter_names batches, and give PEFT's answers.

Few, small cases: the interpreter is slow. A spy checks that the Triton op really ran. tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import TWO_ADAPTERS, make_inputs, row_by_row, run, twins
from tests.tolerances import assert_close

triton = pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.triton


@pytest.fixture
def triton_calls(monkeypatch):
    """Force the triton backend and count the calls that reach it."""
    from peft_kernels.ops import triton as triton_backend

    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    original = triton_backend.adapter_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "adapter_linear", spy)
    return calls


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_single_type_matches_peft(tmp_path, ptype, triton_calls):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS[ptype])
    inputs = make_inputs("llama", batch=2, seq=4)
    assert_close(run(subject, inputs), run(oracle, inputs))
    assert triton_calls, "the triton backend was not used"


@pytest.mark.parametrize("ptype", ["lora", "lokr"])
def test_adapter_names_match_peft_row_by_row(tmp_path, ptype, triton_calls):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS[ptype])
    inputs = make_inputs("llama", batch=3, seq=4)
    names = ["second", "__base__", "default"]
    expected = row_by_row(oracle, inputs, names, lambda m, row: run(m, row))
    assert_close(run(subject, inputs, adapter_names=names), expected)
    assert triton_calls


def test_mixed_model_matches_peft(tmp_path, triton_calls):
    adapters = {
        "lora": TWO_ADAPTERS["lora"]["second"],
        "loha": TWO_ADAPTERS["loha"]["default"],
        "lokr": TWO_ADAPTERS["lokr"]["second"],
    }
    subject, oracle = twins(tmp_path, "llama", adapters, mixed=True)
    subject.set_adapter(["lora", "loha", "lokr"])
    oracle.set_adapter(["lora", "loha", "lokr"])
    inputs = make_inputs("llama", batch=2, seq=4)
    with torch.no_grad():
        assert_close(run(subject, inputs), run(oracle, inputs))
    assert triton_calls
