"""pytest-benchmark of ``adapter_linear`` on CPU, one group per workload, one test per provider:

- ``base``:  bare ``F.linear`` (the ``nn.Linear`` without adapters);
- ``torch``: our pure-PyTorch reference;
- ``cpu``:   our C++ kernel (skipped when the extension is not built);
- ``peft``:  the real PEFT layer (peft==0.21.2, ``init_weights=False``) around the same ``nn.Linear``.

Run: ``pytest benchmarks/bench_adapter_linear.py --benchmark-group-by=param:workload``. For the targets of DESIGN.md
section 8 as ratios measured in one interleaved run, use ``python benchmarks/cpu_targets.py``.
Workloads are built (and checked against PEFT) by ``cpu_targets.build``; shapes here are kept moderate so the whole
file runs in a few minutes on 2 cores. ``PEFT_KERNELS_BENCH_THREADS`` sets the thread count (default 2).
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_targets  # noqa: E402

pytest.importorskip("peft", reason="the peft provider needs peft==0.21.2 (pip install -e .[bench])")
pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark")

# workload id -> cpu_targets.build arguments (kind, n, m, r, adapters, tokens)
WORKLOADS = {
    "lora_r16_2048_m1": ("lora", 2048, 1, 16, 1, 1),
    "lora_r16_2048_m64": ("lora", 2048, 64, 16, 1, 1),
    "loha_r8_2048_m1": ("loha", 2048, 1, 8, 1, 1),
    "loha_r8_2048_m64": ("loha", 2048, 64, 8, 1, 1),
    "lokr_r8_2048_m1": ("lokr", 2048, 1, 8, 1, 1),
    "lokr_r8_2048_m64": ("lokr", 2048, 64, 8, 1, 1),
    "mt32_lora_r16_2048_64x1": ("lora", 2048, 64, 16, 32, 1),
    "mt32_lora_r16_2048_64x16": ("lora", 2048, 64, 16, 32, 16),
}
PROVIDERS = {"base": "base", "torch": "torch", "cpu": "ours", "peft": "peft"}


@functools.lru_cache(maxsize=1)
def _workload(name: str) -> cpu_targets.Workload:
    kind, n, m, r, adapters, tokens = WORKLOADS[name]
    return cpu_targets.build(kind, n, m, r, adapters=adapters, tokens=tokens)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PEFT_KERNELS_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_adapter_linear(benchmark, workload: str, provider: str) -> None:
    if provider == "cpu":
        from peft_kernels.ops import compiled_cpu

        reason = compiled_cpu.unavailable_reason(torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
    fn = _workload(workload).fns[PROVIDERS[provider]]
    benchmark.group = workload
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads(), torch=torch.__version__)
    with torch.inference_mode():
        benchmark(fn)
