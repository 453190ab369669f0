"""The C++ CPU kernel of ``peft_kernels::adapter_linear`` (csrc/cpu) against the fp64 reference.

The oracle is ``reference.adapter_linear`` run in fp64 on the very inputs the kernel sees (the case rounded to the
kernel's dtype, then widened), so the comparison at the dtype's tolerance measures the kernel's arithmetic, not the
rounding of its inputs. Skipped when the extension is not built, unless ``PEFT_KERNELS_REQUIRE_EXT=1`` (CI), where a
missing kernel is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops import compiled_cpu, reference
from tests.ops.cases import Case, make_case
from tests.tolerances import assert_close

_REASON = compiled_cpu.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    if os.environ.get("PEFT_KERNELS_REQUIRE_EXT", "0") not in ("", "0"):
        raise RuntimeError(f"PEFT_KERNELS_REQUIRE_EXT=1 but the C++ CPU kernel is unavailable: {_REASON}")
    pytest.skip(f"C++ CPU kernel of adapter_linear not built: {_REASON}", allow_module_level=True)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def run_kernel(case: Case) -> torch.Tensor:
    return compiled_cpu.adapter_linear(*case.args())


def oracle(case: Case) -> torch.Tensor:
    """The fp64 reference on exactly the kernel's inputs."""
    return reference.adapter_linear(*case.to(torch.float64).args())


def check(case: Case, dtype: torch.dtype, msg: str = "") -> None:
    low = case.to(dtype)
    out = run_kernel(low)
    assert out.dtype == dtype and out.shape == (low.x.shape[0], low.weight.shape[0])
    assert_close(out, oracle(low), dtype=dtype, msg=msg)


def with_ids(case: Case, lora_ids: list | None = None, lokr_ids: list | None = None) -> Case:
    if lora_ids is not None:
        case.lora_ids = torch.tensor(lora_ids, dtype=torch.int32).reshape(case.x.shape[0], -1)
    if lokr_ids is not None:
        case.lokr_ids = torch.tensor(lokr_ids, dtype=torch.int32).reshape(case.x.shape[0], -1)
    return case


SWEEP = {
    "in2049": dict(m=5, in_features=2049, out_features=33, lora_ranks=(8, 1)),
    "out2049": dict(m=6, in_features=33, out_features=2049, lora_ranks=(16,)),
    "odd127": dict(m=19, in_features=127, out_features=127, lora_ranks=(12,)),
    "mixed_ranks": dict(m=40, in_features=96, out_features=80, lora_ranks=(1, 8, 12, 16, 64)),
    "rank64_big_segment": dict(m=70, in_features=200, out_features=72, lora_ranks=(64,), base_fraction=0.0),
    "loha": dict(m=21, in_features=130, out_features=70, lora_ranks=(4,), loha_ranks=((2, 2), (3, 5), (8, 8))),
    "lokr_square": dict(m=11, in_features=64, out_features=36, lora_ranks=(), lokr_count=3),
    "lokr_left_first": dict(
        m=9, in_features=40, out_features=48, lora_ranks=(), lokr_count=2, lokr_shape=(3, 8, 16, 5)
    ),
    "lokr_right_first": dict(
        m=9, in_features=40, out_features=48, lora_ranks=(), lokr_count=2, lokr_shape=(16, 5, 3, 8)
    ),
    "lora_and_lokr_multi": dict(
        m=17, in_features=48, out_features=30, lora_ranks=(4, 5), lokr_count=2, lora_per_row=3, lokr_per_row=2
    ),
    "two_per_row": dict(m=23, in_features=50, out_features=45, lora_ranks=(3, 7, 16), lora_per_row=2),
    "sorted_rows": dict(m=30, in_features=64, out_features=64, lora_ranks=(2, 16, 9), sorted_rows=True),
    "m1": dict(m=1, in_features=300, out_features=260, lora_ranks=(16,), base_fraction=0.0),
    "no_bias": dict(m=12, in_features=70, out_features=90, lora_ranks=(6, 16), bias=False),
    "empty_lora_bank": dict(m=8, in_features=40, out_features=48, lora_ranks=(), lokr_count=2),
    # large: with PEFT_KERNELS_CPU_MIN_PARALLEL_WORK=1 (test_kernel_variants_in_subprocess) they take the threaded
    # paths: two-stage LoRA, one region over segments (many adapters, one position per row), LoKr over rows
    "threaded_one_adapter": dict(m=64, in_features=2049, out_features=2048, lora_ranks=(16,), base_fraction=0.0),
    "threaded_multi_tenant": dict(
        m=128, in_features=2048, out_features=1030, lora_ranks=(16, 16, 16, 16, 16, 8, 12, 1), base_fraction=0.1
    ),
    "threaded_lokr": dict(m=80, in_features=1024, out_features=1024, lora_ranks=(), lokr_count=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SWEEP))
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    check(make_case(**SWEEP[name], seed=len(name)), dtype, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row_per_adapter_and_repeated_slot(dtype: torch.dtype) -> None:
    case = make_case(m=6, in_features=33, out_features=40, lora_ranks=(1, 4, 8, 12, 16, 5))
    check(with_ids(case, lora_ids=[5, 4, 3, 2, 1, 0]), dtype, msg="one row per adapter")
    # a slot named twice on a row adds twice; -1 positions contribute nothing
    case = make_case(m=4, in_features=33, out_features=40, lora_ranks=(3, 8), lora_per_row=3)
    check(with_ids(case, lora_ids=[[1, 1, -1], [0, 1, 0], [-1, -1, -1], [1, -1, 1]]), dtype, msg="repeated slot")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_weight_view(dtype: torch.dtype) -> None:
    """GPT-2 Conv1D stores W as [in, out] and passes weight.t(): a non-contiguous [out, in] view."""
    case = make_case(m=10, in_features=48, out_features=72, lora_ranks=(8,), lokr_count=2).to(dtype)
    case.weight = case.weight.t().contiguous().t()
    assert not case.weight.is_contiguous()
    assert_close(run_kernel(case), oracle(case), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "no_bias", "empty_banks"])
def test_all_base_rows_bitwise_equal_linear(dtype: torch.dtype, layout: str) -> None:
    case = make_case(
        m=9,
        in_features=65,
        out_features=40,
        lora_ranks=() if layout == "empty_banks" else (4, 8),
        lokr_count=0 if layout == "empty_banks" else 2,
        bias=layout != "no_bias",
    ).to(dtype)
    case.lora_ids = torch.full_like(case.lora_ids, -1)
    case.lokr_ids = torch.full_like(case.lokr_ids, -1)
    if layout == "transposed":
        case.weight = case.weight.t().contiguous().t()
    if layout == "empty_banks":
        assert case.lora_a.shape[0] == 0 and case.lora_ids.shape == (9, 0) and case.lokr_ids.shape == (9, 0)
    assert torch.equal(run_kernel(case), F.linear(case.x, case.weight, case.bias))


def test_out_of_range_ids_raise() -> None:
    case = make_case(m=4, in_features=16, out_features=12, lora_ranks=(2, 3, 4), lokr_count=2)
    for bad in (3, -2, 100):
        c = with_ids(make_case(m=4, in_features=16, out_features=12, lora_ranks=(2, 3, 4)), lora_ids=[0, bad, -1, 2])
        with pytest.raises(IndexError, match=rf"lora_ids: slot id {bad} is out of range for a bank of 3 slot"):
            run_kernel(c)
    c = with_ids(case, lokr_ids=[0, -1, 2, 1])
    with pytest.raises(IndexError, match=r"lokr_ids: slot id 2 is out of range for a bank of 2 slot"):
        run_kernel(c)
    c = make_case(m=4, in_features=16, out_features=12, lora_ranks=())
    c.lora_ids = torch.zeros(4, 1, dtype=torch.int32)  # any id is out of range of an empty bank
    with pytest.raises(IndexError, match="bank of 0 slot"):
        run_kernel(c)


def test_bad_arguments_raise() -> None:
    case = make_case(m=4, in_features=16, out_features=12, lora_ranks=(2, 3))
    c = make_case(m=4, in_features=16, out_features=12, lora_ranks=(2, 3))
    c.lora_ids = c.lora_ids.long()
    with pytest.raises(TypeError, match="int32"):
        run_kernel(c)
    c = make_case(m=4, in_features=16, out_features=12, lora_ranks=(2, 3))
    c.lora_rank = torch.tensor([2, 4], dtype=torch.int32)  # R is 3
    with pytest.raises(ValueError, match="lora_rank"):
        run_kernel(c)
    with pytest.raises(ValueError, match="features"):
        compiled_cpu.adapter_linear(case.x[:, :15], *case.args()[1:])


def test_row_order_does_not_matter() -> None:
    case = make_case(m=24, in_features=64, out_features=48, lora_ranks=(4, 16, 12), lokr_count=2, lora_per_row=2)
    case = case.to(torch.float32)
    perm = torch.randperm(24)
    permuted = Case(
        **{**case.__dict__, "x": case.x[perm], "lora_ids": case.lora_ids[perm], "lokr_ids": case.lokr_ids[perm]}
    )
    assert_close(run_kernel(permuted), run_kernel(case)[perm])


def test_dispatch_selects_cpu_backend() -> None:
    from peft_kernels import ops

    case = make_case(m=5, in_features=32, out_features=24, lora_ranks=(4,)).to(torch.float32)
    assert ops.resolve_backend(torch.device("cpu")) in ("cpu", "torch")
    assert "cpu" in ops.available_backends("cpu")
    assert compiled_cpu.unavailable_reason(torch.device("meta")) is not None
    assert_close(ops.adapter_linear(*case.args(), backend="cpu"), oracle(case))


def test_opcheck() -> None:
    case = make_case(m=6, in_features=20, out_features=12, lora_ranks=(2, 4), lokr_count=2).to(torch.float32)
    torch.library.opcheck(torch.ops.peft_kernels.adapter_linear.default, case.args())


_SUBPROCESS_SCRIPT = """
import os, torch
from tests.ops.test_adapter_linear_cpu import SWEEP, check, make_case
names = ["odd127", "mixed_ranks", "loha", "lokr_right_first", "lora_and_lokr_multi", "two_per_row", "m1"]
if os.environ.get("PEFT_KERNELS_CPU_MIN_PARALLEL_WORK") == "1":
    names += ["threaded_one_adapter", "threaded_multi_tenant", "threaded_lokr"]
for name in names:
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check(make_case(**SWEEP[name], seed=len(name)), dtype, msg=name)
print("subprocess-ok")
"""

# Settings read once per process by the kernel, so each runs the sweep in a fresh interpreter.
_SUBPROCESS_ENV = {
    # the kernels compiled for the baseline ISA (CPUs without AVX2/FMA)
    "baseline_isa": {"PEFT_KERNELS_CPU_ISA": "base"},
    # every stage threaded, whatever its size (the default keeps small deltas on the calling thread)
    "always_threaded": {"PEFT_KERNELS_CPU_MIN_PARALLEL_WORK": "1"},
}


@pytest.mark.parametrize("setting", list(_SUBPROCESS_ENV))
def test_kernel_variants_in_subprocess(setting: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, **_SUBPROCESS_ENV[setting], "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "subprocess-ok" in proc.stdout, proc.stderr[-3000:]
