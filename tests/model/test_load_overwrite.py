"""load_adapter under an existing name overwrites that adapter's weights in place, as PEFT does."""

from __future__ import annotations

import pytest

from tests.model.helpers import ORACLE, SUBJECT, adapter_dir, make_base, make_inputs, run, save_with_peft, snapshot
from tests.tolerances import assert_close

SPEC = {"default": ("lora", {"r": 4, "lora_alpha": 8})}


def _loaded(lib, first, second):
    model = lib.PeftModel.from_pretrained(make_base("llama"), str(adapter_dir(first, "default")))
    model.load_adapter(str(adapter_dir(second, "default")), adapter_name="default")
    return model


def test_reload_same_name_overwrites_like_peft(tmp_path):
    first = save_with_peft(tmp_path / "a", "llama", SPEC, seed=0)
    second = save_with_peft(tmp_path / "b", "llama", SPEC, seed=5)
    inputs = make_inputs("llama")
    subject, oracle = _loaded(SUBJECT, first, second), _loaded(ORACLE, first, second)
    fresh = SUBJECT.PeftModel.from_pretrained(make_base("llama"), str(adapter_dir(second, "default")))
    assert_close(run(subject, inputs), run(oracle, inputs))
    assert_close(run(subject, inputs), run(fresh, inputs))


def test_reload_with_other_shapes_raises_and_changes_nothing(tmp_path):
    first = save_with_peft(tmp_path / "a", "llama", SPEC)
    other = save_with_peft(tmp_path / "b", "llama", {"default": ("lora", {"r": 2, "lora_alpha": 8})})
    model = SUBJECT.PeftModel.from_pretrained(make_base("llama"), str(adapter_dir(first, "default")))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 64\)"):
        model.load_adapter(str(adapter_dir(other, "default")), adapter_name="default")
    after = snapshot(model)
    assert before[1] == after[1] and before[0].keys() == after[0].keys()
    for k in before[0]:
        assert before[0][k].equal(after[0][k]), k
