"""Triton ``adapter_linear`` (every path) against the fp64 reference, on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, hence at the very top of the module. Shapes stay
small: the interpreter runs every program in numpy (the whole file takes a few minutes on 2 cores).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the Triton backend is untestable")

from peft_kernels.ops import adapter_linear as dispatch_adapter_linear  # noqa: E402
from peft_kernels.ops import reference  # noqa: E402
from peft_kernels.ops.triton import adapter_linear as triton_adapter_linear  # noqa: E402
from peft_kernels.ops.triton import configs, load_op, unavailable_reason  # noqa: E402
from peft_kernels.ops.triton import launch as impl  # noqa: E402
from tests.ops.cases import Case, make_case  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.triton

PATHS = ("fused", "two_kernel", "decode", "auto")
LOW = (torch.float16, torch.bfloat16)


def run(case: Case, path: str) -> torch.Tensor:
    if path == "auto":
        return triton_adapter_linear(*case.args())
    return impl.adapter_linear(*case.args(), path=path)


def check(case: Case, path: str, dtype: torch.dtype = torch.float32, msg: str = "") -> torch.Tensor:
    """Run ``path`` on ``case`` in ``dtype``; compare with the fp64 reference on the same (rounded) inputs."""
    cd = case.to(dtype)
    expected = reference.adapter_linear(*cd.to(torch.float64).args())
    actual = run(cd, path)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert_close(actual, expected, msg=f"path={path} {msg}")
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
@pytest.mark.parametrize("rank", [1, 8, 12, 16, 64])
def test_ranks(path, rank):
    check(make_case(m=19, in_features=33, out_features=20, lora_ranks=(rank, rank), seed=rank), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "m, k, n",
    [(33, 127, 20), (7, 33, 127), (3, 2049, 17)],
    ids=["m33-k127", "n127", "k2049"],
)
def test_odd_sizes(path, m, k, n):
    check(make_case(m=m, in_features=k, out_features=n, lora_ranks=(4, 12), seed=m + k + n), path)


@pytest.mark.parametrize("path", PATHS)
def test_mixed_ranks_one_batch(path):
    case = make_case(m=32, in_features=33, out_features=20, lora_ranks=(1, 8, 12, 16, 64, 3), base_fraction=0.1)
    assert len(set(case.lora_ids[case.lora_ids >= 0].tolist())) >= 5
    check(case, path)


@pytest.mark.parametrize("path", PATHS)
def test_loha(path):
    case = make_case(m=21, in_features=33, out_features=20, lora_ranks=(), loha_ranks=((2, 2), (3, 5), (8, 8)))
    check(case, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "n, k, shape",
    [(20, 33, None), (12, 35, (3, 5, 4, 7)), (30, 16, (6, 2, 5, 8)), (17, 9, (1, 9, 17, 1))],
    ids=["default-factors", "non-square", "wide", "prime-out"],
)
def test_lokr(path, n, k, shape):
    case = make_case(
        m=13, in_features=k, out_features=n, lora_ranks=(4,), lokr_count=3, lokr_shape=shape, lokr_per_row=2
    )
    check(case, path)


@pytest.mark.parametrize("path", PATHS)
def test_lokr_only(path):
    case = make_case(m=11, in_features=24, out_features=20, lora_ranks=(), lokr_count=2)
    assert case.lora_a.shape[0] == 0
    check(case, path)


# --- how rows select adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sorted_rows", [False, True], ids=["unsorted", "sorted"])
def test_row_order(path, sorted_rows):
    case = make_case(m=35, lora_ranks=(4, 8, 2), sorted_rows=sorted_rows, seed=3)
    y = check(case, path)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(1))
    shuffled = Case(**{**case.__dict__, "x": case.x[perm], "lora_ids": case.lora_ids[perm]})
    assert_close(run(shuffled.to(torch.float32), path), y[perm], msg="permuting rows permutes the output")


@pytest.mark.parametrize("path", PATHS)
def test_all_base_rows(path):
    case = make_case(m=18, lora_ranks=(4, 8), lokr_count=1, base_fraction=1.0)
    assert (case.lora_ids == -1).all() and (case.lokr_ids == -1).all()
    y = check(case, path)
    c32 = case.to(torch.float32)
    assert_close(y, F.linear(c32.x, c32.weight, c32.bias), msg="all-base batch equals the base layer")


@pytest.mark.parametrize("path", PATHS)
def test_minus_one_never_aliases_last_slot(path):
    # vLLM's bug: -1 indexed the last adapter. One slot, half the rows base-only.
    case = make_case(m=16, lora_ranks=(8,), lokr_count=1, base_fraction=0.5, seed=5)
    y = check(case, path)
    base_rows = ((case.lora_ids == -1).all(1) & (case.lokr_ids == -1).all(1)).nonzero().squeeze(1)
    assert base_rows.numel() > 0
    c32 = case.to(torch.float32)
    assert_close(y[base_rows], F.linear(c32.x[base_rows], c32.weight, c32.bias))


@pytest.mark.parametrize("path", PATHS)
def test_empty_segments(path):
    case = make_case(m=20, lora_ranks=(4, 8, 16, 2, 6), lokr_count=3)
    lora_ids = torch.tensor([0, 2, -1, 4] * 5).reshape(20, 1)  # slots 1 and 3 unused
    lokr_ids = torch.tensor([2, -1] * 10).reshape(20, 1)  # slots 0 and 1 unused
    check(with_ids(case, lora_ids, lokr_ids), path)


@pytest.mark.parametrize("path", PATHS)
def test_one_row_per_adapter(path):
    case = make_case(m=6, lora_ranks=(1, 2, 4, 8, 12, 16), lokr_count=6)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    check(with_ids(case, order[:, None], order.flip(0)[:, None]), path)


@pytest.mark.parametrize("path", PATHS)
def test_several_adapters_per_row(path):
    case = make_case(m=16, lora_ranks=(4, 12, 1), loha_ranks=((2, 3),), lokr_count=2, lora_per_row=3, lokr_per_row=2)
    case.lora_ids[0] = torch.tensor([1, 1, -1])  # a slot named twice adds twice
    case.lora_ids[1] = torch.tensor([-1, -1, 2])  # only the last position active
    check(case, path)


@pytest.mark.parametrize("path", PATHS)
def test_slot_placement_does_not_matter(path):
    case = make_case(m=12, lora_ranks=(4, 12, 1), lokr_count=2, lora_per_row=2, seed=11)
    y = check(case, path)
    moved = torch.tensor([2, 0, 1])  # adapter in slot s moves to slot moved[s]
    inv = torch.argsort(moved)
    ids = torch.where(case.lora_ids >= 0, moved[case.lora_ids.clamp_min(0).long()], -1)
    shuffled = Case(
        **{
            **case.__dict__,
            "lora_a": case.lora_a[inv],
            "lora_b": case.lora_b[inv],
            "lora_scale": case.lora_scale[inv],
            "lora_rank": case.lora_rank[inv],
            "lora_ids": ids.to(torch.int32),
        }
    )
    assert_close(run(shuffled.to(torch.float32), path), y, msg="moving adapters to other slots")


@pytest.mark.parametrize("path", PATHS)
def test_many_rows_few_combinations(path):
    # enough rows per slot to fill several M-tiles of one segment
    check(make_case(m=70, in_features=20, out_features=18, lora_ranks=(4, 20), seed=7), path)


# --- dtypes, layouts, edge shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision(path, dtype):
    case = make_case(m=21, in_features=40, out_features=24, lora_ranks=(4, 16, 12), lokr_count=2, lora_per_row=2)
    check(case, path, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs(path):
    case = make_case(m=17, in_features=33, out_features=20, lora_ranks=(8, 3), lokr_count=1)
    weight = case.weight.t().contiguous().t()  # [out, in] with strides (1, out)
    x = torch.cat([case.x, case.x], dim=1)[:, ::2]  # [M, in] with strides (2 in, 2)
    assert not weight.is_contiguous() and not x.is_contiguous()
    check(Case(**{**case.__dict__, "weight": weight, "x": x}), path)


@pytest.mark.parametrize("path", PATHS)
def test_no_bias(path):
    check(make_case(m=9, lora_ranks=(4,), bias=False), path)


def test_empty_batch():
    case = make_case(m=0, lora_ranks=(4,), lokr_count=1).to(torch.float32)
    for path in PATHS:
        assert run(case, path).shape == (0, case.weight.shape[0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bank", ["lora", "lokr"])
@pytest.mark.parametrize("bad", [-2, 3])
def test_out_of_range_ids_raise(path, bank, bad):
    case = make_case(m=5, lora_ranks=(4, 4, 4), lokr_count=3).to(torch.float32)
    ids = (case.lora_ids if bank == "lora" else case.lokr_ids).clone()
    ids[2, 0] = bad
    bad_case = with_ids(case, **{f"{bank}_ids": ids})
    with pytest.raises(IndexError, match="out of range"):
        run(bad_case, path)


def test_rank_past_bank_width_raises():
    case = make_case(m=3, lora_ranks=(4, 2)).to(torch.float32)
    case.lora_rank[1] = 5
    with pytest.raises(ValueError, match="lora_rank"):
        run(case, "fused")


def test_fp64_refused():
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        run(make_case(m=3), "fused")


# --- dispatch, configuration, registration -----------------------------------------------------------------------


def test_choose_path():
    d = {"decode_max_rows": 16, "fused_max_rank": 32, "two_kernel_min_rows": 4096}
    assert impl.choose_path(4, 16, 1, d) == "decode"
    assert impl.choose_path(64, 16, 1, d) == "fused"
    assert impl.choose_path(64, 64, 1, d) == "two_kernel"
    assert impl.choose_path(64, 16, 3, d) == "two_kernel"
    assert impl.choose_path(8192, 8, 1, d) == "two_kernel"
    assert impl.choose_path(4, 16, 0, d) == "fused"


def test_config_override(tmp_path, monkeypatch):
    cfg_file = tmp_path / "triton.json"
    cfg_file.write_text(json.dumps({"fused": {"BLOCK_M": 32, "BLOCK_R": 32}, "dispatch": {"decode_max_rows": 0}}))
    monkeypatch.setenv(configs.CONFIG_ENV, str(cfg_file))
    cfg = configs.get_config(True)
    assert cfg["fused"]["BLOCK_M"] == 32 and cfg["fused"]["BLOCK_N"] == 16 and cfg["dispatch"]["decode_max_rows"] == 0
    check(make_case(m=10, lora_ranks=(40, 8)), "fused")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fused": {"BLOCK_Q": 1}}))
    monkeypatch.setenv(configs.CONFIG_ENV, str(bad))
    with pytest.raises(KeyError, match="BLOCK_Q"):
        configs.get_config(True)


def test_backend_dispatch(monkeypatch):
    assert unavailable_reason(torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case(m=9, lora_ranks=(4, 8), lokr_count=1).to(torch.float32)
    y = dispatch_adapter_linear(*case.args(), backend="triton")
    assert_close(y, reference.adapter_linear(*case.to(torch.float64).args()))


def test_opcheck():
    case = make_case(m=5, in_features=16, out_features=16, lora_ranks=(4, 2), lokr_count=1).to(torch.float32)
    torch.library.opcheck(load_op(), case.args())
    torch.library.opcheck(load_op(), (*case.args(), "decode"))


def test_torch_compile():
    case = make_case(m=6, in_features=16, out_features=16, lora_ranks=(4,), lokr_count=1).to(torch.float32)
    op = load_op()

    def layer(*args):
        return op(*args, "fused") * 2.0 + 1.0

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*case.args()), layer(*case.args()))
