"""Model-level parity with PEFT_KERNELS_BACKEND=triton: the Triton kernels (under TRITON_INTERPRET=1 on CPU) serve
real transformers models with LoRA, LoHa, LoKr, mixed and adapter_names batches, and give PEFT's answers.

Few, small cases: the interpreter is slow. A spy checks that the Triton op really ran. tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton.
"""

from __future__ import annotations

import pytest

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    TWO_ADAPTERS,
    make_base,
    make_inputs,
    row_by_row,
    run,
    save_with_peft,
    twins,
)
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
    """LoRA + LoHa + LoKr active together, each saved by a plain peft PeftModel (PeftMixedModel cannot save)."""
    specs = {
        "lora": TWO_ADAPTERS["lora"]["second"],
        "loha": TWO_ADAPTERS["loha"]["default"],
        "lokr": TWO_ADAPTERS["lokr"]["second"],
    }
    dirs = {name: save_with_peft(tmp_path / name, "llama", {name: spec}) / name for name, spec in specs.items()}
    models = []
    for lib in (SUBJECT, ORACLE):
        model = lib.PeftMixedModel.from_pretrained(make_base("llama"), str(dirs["lora"]), adapter_name="lora")
        for name in ("loha", "lokr"):
            model.load_adapter(str(dirs[name]), adapter_name=name)
        model.set_adapter(["lora", "loha", "lokr"])
        models.append(model)
    inputs = make_inputs("llama", batch=2, seq=4)
    assert_close(run(models[0], inputs), run(models[1], inputs))
    assert triton_calls
