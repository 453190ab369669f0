"""Fixtures for the model-layer parity tests: the oracle (real ``peft``) and the subject (``peft_kernels``)."""

from __future__ import annotations

import pytest
import torch

from tests.model import helpers


def pytest_collection_modifyitems(items):
    # PEFT and transformers warn a lot on tiny random models (Conv1D fan_in_fan_out, missing generation config, ...).
    for item in items:
        if "tests/model/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::RuntimeWarning"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threading only adds overhead (and thrashes on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def oracle():
    return helpers.ORACLE


@pytest.fixture
def subject():
    return helpers.SUBJECT
