"""CUDA ``adapter_linear`` (csrc/cuda) against the fp64 reference, the same sweeps as the CPU and Triton tests.

Skipped unless a CUDA device is present and ``peft_kernels._C`` was built with the CUDA kernel (the skip reason says
which is missing). The launcher picks the BGMV (per-row) path below ``kBgmvMaxRows`` = 32 rows and the SGMV
(segmented) path from 32 rows on, so every sweep runs at both a decode-sized and a prefill-sized M.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops import compiled_cuda, reference
from tests.ops.cases import Case, make_case
from tests.tolerances import assert_close


def _skip_reason() -> str | None:
    reason = compiled_cuda.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=f"CUDA kernel unavailable: {_REASON}")]

# M below 32 takes the BGMV path, from 32 on the SGMV path (csrc/include/peft_kernels/adapter_linear.h).
PATH_M = {"bgmv": 13, "sgmv": 77}
PATHS = tuple(PATH_M)
LOW = (torch.float16, torch.bfloat16)


def run(case: Case) -> torch.Tensor:
    return compiled_cuda.adapter_linear(*case.args())


def check(case: Case, dtype: torch.dtype = torch.float32, msg: str = "") -> torch.Tensor:
    """Run the CUDA kernel on ``case`` in ``dtype``; compare with the fp64 reference on the same (rounded) inputs."""
    cd = case.to(dtype)
    expected = reference.adapter_linear(*cd.to(torch.float64).args())
    actual = run(cd.to(device="cuda"))
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.is_cuda
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
def test_ranks(path, rank):
    check(make_case(m=PATH_M[path], in_features=96, out_features=80, lora_ranks=(rank, rank), seed=rank))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "k, n",
    [(127, 20), (33, 127), (2049, 17), (3424, 64), (4096, 4096)],
    ids=["k127", "n127", "k2049", "k3424", "k4096-n4096"],
)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW), ids=["fp32", "fp16", "bf16"])
def test_sizes(path, k, n, dtype):
    check(make_case(m=PATH_M[path], in_features=k, out_features=n, lora_ranks=(4, 12, 16), seed=k + n), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_mixed_ranks_one_batch(path):
    case = make_case(
        m=PATH_M[path] * 3, in_features=64, out_features=48, lora_ranks=(1, 8, 12, 16, 64, 3, 256), base_fraction=0.1
    )
    check(case)


@pytest.mark.parametrize("path", PATHS)
def test_loha(path):
    case = make_case(
        m=PATH_M[path], in_features=40, out_features=24, lora_ranks=(), loha_ranks=((2, 2), (3, 5), (8, 8))
    )
    check(case)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "n, k, shape",
    [(20, 33, None), (12, 35, (3, 5, 4, 7)), (30, 16, (6, 2, 5, 8)), (17, 9, (1, 9, 17, 1)), (256, 512, None)],
    ids=["default-factors", "non-square", "wide", "prime-out", "256x512"],
)
def test_lokr(path, n, k, shape):
    case = make_case(
        m=PATH_M[path], in_features=k, out_features=n, lora_ranks=(4,), lokr_count=3, lokr_shape=shape, lokr_per_row=2
    )
    check(case)


@pytest.mark.parametrize("path", PATHS)
def test_lokr_only(path):
    check(make_case(m=PATH_M[path], in_features=24, out_features=20, lora_ranks=(), lokr_count=2))


# --- how rows select adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sorted_rows", [False, True], ids=["unsorted", "sorted"])
def test_row_order(path, sorted_rows):
    m = PATH_M[path]
    case = make_case(m=m, lora_ranks=(4, 8, 2), sorted_rows=sorted_rows, seed=3)
    y = check(case)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(1))
    shuffled = Case(**{**case.__dict__, "x": case.x[perm], "lora_ids": case.lora_ids[perm]})
    assert_close(run(shuffled.to(torch.float32, "cuda")), y[perm], msg="permuting rows permutes the output")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (torch.float32, *LOW), ids=["fp32", "fp16", "bf16"])
def test_all_base_rows_bitwise(path, dtype):
    case = make_case(m=PATH_M[path], lora_ranks=(4, 8), lokr_count=1, base_fraction=1.0).to(dtype, "cuda")
    assert (case.lora_ids == -1).all() and (case.lokr_ids == -1).all()
    assert torch.equal(run(case), F.linear(case.x, case.weight, case.bias)), "all-base batch equals the base layer"


@pytest.mark.parametrize("path", PATHS)
def test_minus_one_never_aliases_last_slot(path):
    case = make_case(m=PATH_M[path], lora_ranks=(8,), lokr_count=1, base_fraction=0.5, seed=5)
    y = check(case)
    base_rows = ((case.lora_ids == -1).all(1) & (case.lokr_ids == -1).all(1)).nonzero().squeeze(1)
    assert base_rows.numel() > 0
    c = case.to(torch.float32, "cuda")
    assert torch.equal(y[base_rows.cuda()], F.linear(c.x, c.weight, c.bias)[base_rows.cuda()])


@pytest.mark.parametrize("path", PATHS)
def test_empty_segments(path):
    m = 20 if path == "bgmv" else 80
    case = make_case(m=m, lora_ranks=(4, 8, 16, 2, 6), lokr_count=3)
    lora_ids = torch.tensor([0, 2, -1, 4] * (m // 4)).reshape(m, 1)  # slots 1 and 3 unused
    lokr_ids = torch.tensor([2, -1] * (m // 2)).reshape(m, 1)  # slots 0 and 1 unused
    check(with_ids(case, lora_ids, lokr_ids))


@pytest.mark.parametrize("path", PATHS)
def test_several_adapters_per_row(path):
    case = make_case(
        m=PATH_M[path], lora_ranks=(4, 12, 1), loha_ranks=((2, 3),), lokr_count=2, lora_per_row=3, lokr_per_row=2
    )
    case.lora_ids[0] = torch.tensor([1, 1, -1])  # a slot named twice adds twice
    case.lora_ids[1] = torch.tensor([-1, -1, 2])  # only the last position active
    check(case)


def test_long_segments_and_split_k():
    # one adapter over many rows (several tiles of one segment), long K (split-K partials)
    check(make_case(m=300, in_features=4096, out_features=96, lora_ranks=(16, 64), base_fraction=0.0), torch.float16)
    check(make_case(m=1, in_features=8192, out_features=64, lora_ranks=(16,), base_fraction=0.0), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
def test_deterministic(path):
    case = make_case(m=PATH_M[path], in_features=4096, out_features=256, lora_ranks=(8, 16), lokr_count=1)
    c = case.to(torch.float16, "cuda")
    assert torch.equal(run(c), run(c)), "no atomics: two runs are bitwise equal"


# --- dtypes, layouts, edge shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision(path, dtype):
    case = make_case(
        m=PATH_M[path], in_features=40, out_features=24, lora_ranks=(4, 16, 12), lokr_count=2, lora_per_row=2
    )
    check(case, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs(path):
    case = make_case(m=PATH_M[path], in_features=33, out_features=20, lora_ranks=(8, 3), lokr_count=1)
    weight = case.weight.t().contiguous().t()  # [out, in] with strides (1, out)
    x = torch.cat([case.x, case.x], dim=1)[:, ::2]  # [M, in] with strides (2 in, 2)
    assert not weight.is_contiguous() and not x.is_contiguous()
    check(Case(**{**case.__dict__, "weight": weight, "x": x}))


@pytest.mark.parametrize("path", PATHS)
def test_no_bias(path):
    check(make_case(m=PATH_M[path], lora_ranks=(4,), bias=False))


def test_empty_batch():
    case = make_case(m=0, lora_ranks=(4,), lokr_count=1).to(torch.float32, "cuda")
    assert run(case).shape == (0, case.weight.shape[0])


# --- errors raise before any kernel runs --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -2])
def test_out_of_range_lora_id_raises(bad):
    case = make_case(m=8, lora_ranks=(4, 4))
    case.lora_ids[3, 0] = bad
    with pytest.raises(IndexError, match="out of range"):
        run(case.to(torch.float32, "cuda"))


def test_out_of_range_lokr_id_raises():
    case = make_case(m=8, lora_ranks=(4,), lokr_count=2)
    case.lokr_ids[0, 0] = 2
    with pytest.raises(IndexError, match="out of range"):
        run(case.to(torch.float32, "cuda"))


def test_rank_above_bank_raises():
    case = make_case(m=8, lora_ranks=(4, 2))
    case.lora_rank[1] = 5
    with pytest.raises(ValueError, match="lora_rank"):
        run(case.to(torch.float32, "cuda"))


def test_mixed_dtypes_raise():
    case = make_case(m=8, lora_ranks=(4,)).to(torch.float16, "cuda")
    with pytest.raises(TypeError):
        run(Case(**{**case.__dict__, "lora_a": case.lora_a.float()}))
