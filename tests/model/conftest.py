"""Fixtures for the model-layer parity tests: the oracle (real ``peft``) and the subject (``peft_kernels``)."""

from __future__ import annotations

import pytest

from tests.model import helpers


def pytest_collection_modifyitems(items):
    # PEFT and transformers warn a lot on tiny random models (Conv1D fan_in_fan_out, missing generation config, ...).
    for item in items:
        if "tests/model/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::RuntimeWarning"))


@pytest.fixture
def oracle():
    return helpers.ORACLE


@pytest.fixture
def subject():
    return helpers.SUBJECT


@pytest.fixture
def saved_lora_two(tmp_path):
    """A LoRA ``default`` plus ``second`` (different rank and targets) saved by the real peft on the tiny Llama."""
    adapters = {
        "default": ("lora", {"r": 4, "lora_alpha": 8}),
        "second": ("lora", {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "k_proj", "down_proj"]}),
    }
    root = helpers.save_with_peft(tmp_path / "lora_two", "llama", adapters)
    return root, adapters
