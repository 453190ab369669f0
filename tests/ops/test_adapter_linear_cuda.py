"""CUDA ``adapter_linear`` (csrc/cuda) against the fp64 reference, the same sweeps as the CPU and Triton tests.

Every test runs on two backends:

- ``cuda``: the real kernels through ``torch.ops.peft_kernels.adapter_linear`` on a GPU. Skipped unless a CUDA device is
  present and ``peft_kernels._C`` was built with the CUDA kernel (the skip reason says which is missing).
- ``emu``: the same kernel sources and the same torch launcher compiled as plain C++ against the CPU emulation in
  csrc/cuda/emu (blocks run one after another, their threads as fibers; ``kernel<<<...>>>(args)`` is rewritten to
  ``peft_emu::launch(kernel, ...)``), registered as ``torch.ops.peft_kernels_emu.adapter_linear`` on CPU tensors. It
  checks indexing, masking, segment and tile tables, split-K bookkeeping, fp16/bf16 rounding and the launcher's host
  logic without a GPU; not the GPU memory model, warp scheduling or speed. Built once per source change with
  ``torch.utils.cpp_extension.load`` (about a minute), skipped only when no C++ toolchain/ninja is available.

The launcher picks the BGMV (per-row) path below ``kBgmvMaxRows`` = 32 rows and the SGMV (segmented) path from 32
rows on, so every sweep runs at both a decode-sized and a prefill-sized M.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops import compiled_cuda, reference
from tests.ops.cases import Case, make_case
from tests.tolerances import assert_close

CSRC = Path(__file__).resolve().parents[2] / "csrc"
LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<([^;]*?)>>>\s*\(([^;]*?)\)\s*;")


def _cuda_skip_reason() -> str | None:
    reason = compiled_cuda.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.cache
def _emu_op():
    """Build the CPU emulation of the CUDA kernels + launcher once; returns the op, or a skip reason string."""
    from torch.utils import cpp_extension

    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler to build the CPU emulation of the CUDA kernels"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension.load needs it) to build the CPU emulation"
    src_dir = Path(tempfile.gettempdir()) / "peft_kernels_cuda_emu_src"
    src_dir.mkdir(exist_ok=True)
    sources = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        text = LAUNCH.sub(r"::peft_emu::launch(\1, \2, \3);", cu.read_text())
        dst = src_dir / f"{cu.stem}.cpp"
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        sources.append(str(dst))
    sources.append(str(CSRC / "cuda" / "emu" / "peft_emu.cpp"))
    cpp_extension.load(
        "peft_kernels_cuda_emu",
        sources,
        extra_include_paths=[str(CSRC / "cuda" / "emu"), str(CSRC / "include")],
        extra_cflags=["-DPEFT_KERNELS_EMULATE", "-O1", "-Wno-unknown-pragmas"],
        is_python_module=False,
    )
    return torch.ops.peft_kernels_emu.adapter_linear


@pytest.fixture(params=["cuda", "emu"])
def backend(request):
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason is not None:
            pytest.skip(f"CUDA kernel unavailable: {reason}")
    else:
        op = _emu_op()
        if isinstance(op, str):
            pytest.skip(op)
    return request.param


# M below 32 takes the BGMV path, from 32 on the SGMV path (csrc/include/peft_kernels/adapter_linear.h).
PATH_M = {"bgmv": 13, "sgmv": 77}
PATHS = tuple(PATH_M)
LOW = (torch.float16, torch.bfloat16)


def device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def run(case: Case, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return compiled_cuda.adapter_linear(*case.args())
    return _emu_op()(*case.args())


def check(case: Case, backend: str, dtype: torch.dtype = torch.float32, msg: str = "") -> torch.Tensor:
    """Run the kernels on ``case`` in ``dtype``; compare with the fp64 reference on the same (rounded) inputs."""
    cd = case.to(dtype)
    expected = reference.adapter_linear(*cd.to(torch.float64).args())
    actual = run(cd.to(device=device(backend)), backend)
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.device.type == device(backend)
    assert_close(actual, expected, msg=msg)
    return actual


def with_ids(case: Case, lora_ids: torch.Tensor | None = None, lokr_ids: torch.Tensor | None = None) -> Case:
    args = dict(case.__dict__)
    if lora_ids is not None:
        args["lora_ids"] = lora_ids.to(torch.int32)
    if lokr_ids is not None:
        args["lokr_ids"] = lokr_ids.to(torch.int32)
    return Case(**args)


# --- ranks, sizes, adapter types -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rank", [1, 4, 8, 12, 16, 32, 64, 128, 256])
def test_ranks(backend, path, rank):
    check(make_case(m=PATH_M[path], in_features=96, out_features=80, lora_ranks=(rank, rank), seed=rank), backend)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "k, n",
    [(127, 20), (33, 127), (2049, 17), (3424, 64), (4096, 4096)],
    ids=["k127", "n127", "k2049", "k3424", "k4096-n4096"],
)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW), ids=["fp32", "fp16", "bf16"])
def test_sizes(backend, path, k, n, dtype):
    check(make_case(m=PATH_M[path], in_features=k, out_features=n, lora_ranks=(4, 12, 16), seed=k + n), backend, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_mixed_ranks_one_batch(backend, path):
    case = make_case(
        m=PATH_M[path] * 3, in_features=64, out_features=48, lora_ranks=(1, 8, 12, 16, 64, 3, 256), base_fraction=0.1
    )
    check(case, backend)


@pytest.mark.parametrize("path", PATHS)
def test_loha(backend, path):
    case = make_case(
        m=PATH_M[path], in_features=40, out_features=24, lora_ranks=(), loha_ranks=((2, 2), (3, 5), (8, 8))
    )
    check(case, backend)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "n, k, shape",
    [(20, 33, None), (12, 35, (3, 5, 4, 7)), (30, 16, (6, 2, 5, 8)), (17, 9, (1, 9, 17, 1)), (256, 512, None)],
    ids=["default-factors", "non-square", "wide", "prime-out", "256x512"],
)
def test_lokr(backend, path, n, k, shape):
    case = make_case(
        m=PATH_M[path], in_features=k, out_features=n, lora_ranks=(4,), lokr_count=3, lokr_shape=shape, lokr_per_row=2
    )
    check(case, backend)


@pytest.mark.parametrize("path", PATHS)
def test_lokr_only(backend, path):
    check(make_case(m=PATH_M[path], in_features=24, out_features=20, lora_ranks=(), lokr_count=2), backend)


# --- how rows select adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sorted_rows", [False, True], ids=["unsorted", "sorted"])
def test_row_order(backend, path, sorted_rows):
    m = PATH_M[path]
    case = make_case(m=m, lora_ranks=(4, 8, 2), sorted_rows=sorted_rows, seed=3)
    y = check(case, backend)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(1))
    shuffled = Case(**{**case.__dict__, "x": case.x[perm], "lora_ids": case.lora_ids[perm]})
    assert_close(
        run(shuffled.to(torch.float32, device(backend)), backend), y[perm], msg="permuting rows permutes the output"
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW), ids=["fp32", "fp16", "bf16"])
def test_all_base_rows_bitwise(backend, path, dtype):
    case = make_case(m=PATH_M[path], lora_ranks=(4, 8), lokr_count=1, base_fraction=1.0).to(dtype, device(backend))
    assert (case.lora_ids == -1).all() and (case.lokr_ids == -1).all()
    assert torch.equal(run(case, backend), F.linear(case.x, case.weight, case.bias)), (
        "all-base batch equals the base layer"
    )


@pytest.mark.parametrize("path", PATHS)
def test_minus_one_never_aliases_last_slot(backend, path):
    case = make_case(m=PATH_M[path], lora_ranks=(8,), lokr_count=1, base_fraction=0.5, seed=5)
    y = check(case, backend)
    base_rows = ((case.lora_ids == -1).all(1) & (case.lokr_ids == -1).all(1)).nonzero().squeeze(1)
    assert base_rows.numel() > 0
    c = case.to(torch.float32, device(backend))
    assert torch.equal(y[base_rows.to(device(backend))], F.linear(c.x, c.weight, c.bias)[base_rows.to(device(backend))])


@pytest.mark.parametrize("path", PATHS)
def test_empty_segments(backend, path):
    m = 20 if path == "bgmv" else 80
    case = make_case(m=m, lora_ranks=(4, 8, 16, 2, 6), lokr_count=3)
    lora_ids = torch.tensor([0, 2, -1, 4] * (m // 4)).reshape(m, 1)  # slots 1 and 3 unused
    lokr_ids = torch.tensor([2, -1] * (m // 2)).reshape(m, 1)  # slots 0 and 1 unused
    check(with_ids(case, lora_ids, lokr_ids), backend)


@pytest.mark.parametrize("path", PATHS)
def test_several_adapters_per_row(backend, path):
    case = make_case(
        m=PATH_M[path], lora_ranks=(4, 12, 1), loha_ranks=((2, 3),), lokr_count=2, lora_per_row=3, lokr_per_row=2
    )
    case.lora_ids[0] = torch.tensor([1, 1, -1])  # a slot named twice adds twice
    case.lora_ids[1] = torch.tensor([-1, -1, 2])  # only the last position active
    check(case, backend)


def test_long_segments_and_split_k(backend):
    # one adapter over many rows (several tiles of one segment), long K (split-K partials)
    check(
        make_case(m=300, in_features=4096, out_features=96, lora_ranks=(16, 64), base_fraction=0.0),
        backend,
        torch.float16,
    )
    check(
        make_case(m=1, in_features=8192, out_features=64, lora_ranks=(16,), base_fraction=0.0), backend, torch.bfloat16
    )


@pytest.mark.parametrize("path", PATHS)
def test_deterministic(backend, path):
    case = make_case(m=PATH_M[path], in_features=4096, out_features=256, lora_ranks=(8, 16), lokr_count=1)
    c = case.to(torch.float16, device(backend))
    assert torch.equal(run(c, backend), run(c, backend)), "no atomics: two runs are bitwise equal"


# --- dtypes, layouts, edge shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision(backend, path, dtype):
    case = make_case(
        m=PATH_M[path], in_features=40, out_features=24, lora_ranks=(4, 16, 12), lokr_count=2, lora_per_row=2
    )
    check(case, backend, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs(backend, path):
    case = make_case(m=PATH_M[path], in_features=33, out_features=20, lora_ranks=(8, 3), lokr_count=1)
    weight = case.weight.t().contiguous().t()  # [out, in] with strides (1, out)
    x = torch.cat([case.x, case.x], dim=1)[:, ::2]  # [M, in] with strides (2 in, 2)
    assert not weight.is_contiguous() and not x.is_contiguous()
    check(Case(**{**case.__dict__, "weight": weight, "x": x}), backend)


@pytest.mark.parametrize("path", PATHS)
def test_no_bias(backend, path):
    check(make_case(m=PATH_M[path], lora_ranks=(4,), bias=False), backend)


def test_empty_batch(backend):
    case = make_case(m=0, lora_ranks=(4,), lokr_count=1).to(torch.float32, device(backend))
    assert run(case, backend).shape == (0, case.weight.shape[0])


# --- errors raise before any kernel runs --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -2])
def test_out_of_range_lora_id_raises(backend, bad):
    case = make_case(m=8, lora_ranks=(4, 4))
    case.lora_ids[3, 0] = bad
    with pytest.raises(IndexError, match="out of range"):
        run(case.to(torch.float32, device(backend)), backend)


def test_out_of_range_lokr_id_raises(backend):
    case = make_case(m=8, lora_ranks=(4,), lokr_count=2)
    case.lokr_ids[0, 0] = 2
    with pytest.raises(IndexError, match="out of range"):
        run(case.to(torch.float32, device(backend)), backend)


def test_rank_above_bank_raises(backend):
    case = make_case(m=8, lora_ranks=(4, 2))
    case.lora_rank[1] = 5
    with pytest.raises(ValueError, match="lora_rank"):
        run(case.to(torch.float32, device(backend)), backend)


def test_mixed_dtypes_raise(backend):
    case = make_case(m=8, lora_ranks=(4,)).to(torch.float16, device(backend))
    with pytest.raises(TypeError):
        run(Case(**{**case.__dict__, "lora_a": case.lora_a.float()}), backend)
