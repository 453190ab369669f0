"""The pure-PyTorch reference against dense weight deltas built the PEFT way (B A, Hadamard of products, torch.kron).

fp64 throughout: the reference is the oracle for every backend, so it is checked against an independent formula.
"""

from __future__ import annotations

import pytest
import torch

from peft_kernels.layers.factors import factorization, lokr_shapes
from peft_kernels.ops import reference
from tests.ops.cases import make_case
from tests.tolerances import assert_close

F64 = torch.float64


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64) / max(shape[-1], 1) ** 0.5


def _dense_per_row(x, weight, bias, deltas_per_row):
    """y[m] = x[m] (W + sum of that row's dense deltas)^T + b."""
    rows = []
    for m in range(x.shape[0]):
        w = weight.clone()
        for d in deltas_per_row[m]:
            w = w + d
        rows.append(x[m] @ w.T + (bias if bias is not None else 0))
    return torch.stack(rows)


@pytest.mark.parametrize("in_f,out_f", [(33, 20), (127, 64), (16, 2049)])
@pytest.mark.parametrize("r", [1, 8, 12, 64])
def test_lora_matches_dense(in_f, out_f, r):
    x, w, b = _rand(5, in_f), _rand(out_f, in_f), _rand(out_f)
    a, bb = _rand(r, in_f), _rand(out_f, r)
    ids = torch.tensor([[0], [-1], [0], [0], [-1]], dtype=torch.int32)
    empty = torch.zeros(0, 0, 0, dtype=F64)
    y = reference.adapter_linear(
        x, w, b, a[None], bb[None], torch.tensor([0.7]), torch.tensor([r], dtype=torch.int32), ids,
        empty, empty, torch.zeros(0), torch.zeros(5, 0, dtype=torch.int32),
    )  # fmt: skip
    dense = bb @ a * float(torch.tensor(0.7, dtype=torch.float32))  # scales are stored in fp32
    expected = _dense_per_row(x, w, b, [[dense] if i[0] >= 0 else [] for i in ids])
    assert_close(y, expected)


@pytest.mark.parametrize("r1,r2", [(1, 1), (2, 3), (8, 8)])
def test_loha_pack_matches_hadamard(r1, r2):
    out_f, in_f = 37, 29
    w1a, w1b, w2a, w2b = _rand(out_f, r1), _rand(r1, in_f), _rand(out_f, r2), _rand(r2, in_f)
    a_eff, b_eff = reference.pack_loha(w1a, w1b, w2a, w2b)
    assert a_eff.shape == (r1 * r2, in_f) and b_eff.shape == (out_f, r1 * r2)
    dense = (w1a @ w1b) * (w2a @ w2b)  # PEFT's HadaWeight
    x = _rand(6, in_f)
    assert_close(reference.lora_delta(x, a_eff, b_eff, 1.5), x @ (dense * 1.5).T)


def test_loha_shortcut_is_not_the_identity():
    """DESIGN.md warns that ((x w1b^T) ⊙ (x w2b^T)) (w1a ⊙ w2a)^T is wrong; make sure the packed form differs from it."""
    w1a, w1b, w2a, w2b = _rand(8, 3), _rand(3, 10), _rand(8, 3), _rand(3, 10)
    x = _rand(4, 10)
    shortcut = ((x @ w1b.T) * (x @ w2b.T)) @ (w1a * w2a).T
    a_eff, b_eff = reference.pack_loha(w1a, w1b, w2a, w2b)
    assert not torch.allclose(shortcut, reference.lora_delta(x, a_eff, b_eff, 1.0))


@pytest.mark.parametrize("out_f,in_f", [(64, 64), (32, 64), (128, 64), (48, 127), (2048, 2048)])
@pytest.mark.parametrize("r,decompose_both,factor", [(8, False, -1), (2, False, -1), (2, True, -1), (8, False, 4)])
def test_lokr_matches_kron(out_f, in_f, r, decompose_both, factor):
    shapes = lokr_shapes(out_f, in_f, r, decompose_both, factor)
    p = {k: _rand(*s) for k, s in shapes.items()}
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    x = _rand(3, in_f)
    dense = torch.kron(w1, w2) * 0.25  # PEFT's make_kron
    assert_close(reference.lokr_delta(x, w1, w2, 0.25), x @ dense.T)


def test_factorization_matches_peft_table():
    """Values from peft-semantics.md (measured on PEFT 0.21.2)."""
    table = {
        (32, -1): (4, 8), (32, 8): (8, 4), (32, 16): (16, 2), (32, 3): (2, 16), (64, 4): (4, 16), (64, 3): (2, 32),
        (127, -1): (1, 127), (768, -1): (24, 32), (768, 8): (8, 96), (11008, -1): (86, 128), (4096, -1): (64, 64),
    }  # fmt: skip
    for (dim, f), expected in table.items():
        assert factorization(dim, f) == expected, (dim, f)


def test_mixed_bank_several_adapters_per_row():
    """Mixed ranks, LoHa packed into the LoRA bank, LoKr, 2 adapters per row: against dense per-row sums."""
    case = make_case(m=9, in_features=24, out_features=30, lora_ranks=(1, 12), loha_ranks=((2, 3),), lokr_count=2,
                     lora_per_row=2, lokr_per_row=2, base_fraction=0.3)  # fmt: skip
    y = reference.adapter_linear(*case.args())
    dense_lora = [case.lora_scale[s] * case.lora_b[s] @ case.lora_a[s] for s in range(case.lora_a.shape[0])]
    dense_lokr = [
        case.lokr_scale[t] * torch.kron(case.lokr_w1[t], case.lokr_w2[t]) for t in range(case.lokr_w1.shape[0])
    ]
    per_row = [
        [dense_lora[s] for s in case.lora_ids[m].tolist() if s >= 0]
        + [dense_lokr[t] for t in case.lokr_ids[m].tolist() if t >= 0]
        for m in range(case.x.shape[0])
    ]
    assert_close(y, _dense_per_row(case.x, case.weight, case.bias, per_row))


def test_all_base_rows_equal_base_layer_bitwise():
    case = make_case(m=5, lora_ranks=(4,), lokr_count=1, base_fraction=1.0, dtype=torch.float32)
    assert (case.lora_ids == -1).all() and (case.lokr_ids == -1).all()
    y = reference.adapter_linear(*case.args())
    assert torch.equal(y, torch.nn.functional.linear(case.x, case.weight, case.bias))


@pytest.mark.parametrize("bad", [-2, 3, 100])
def test_out_of_range_ids_raise(bad):
    case = make_case(m=4, lora_ranks=(2, 2, 2))
    case.lora_ids[1, 0] = bad
    with pytest.raises(IndexError, match=f"slot id {bad}"):
        reference.adapter_linear(*case.args())


def test_reference_is_differentiable():
    case = make_case(m=4, lora_ranks=(3,), lokr_count=1, base_fraction=0.0)
    case.lora_a.requires_grad_(True)
    case.lokr_w2.requires_grad_(True)
    reference.adapter_linear(*case.args()).sum().backward()
    assert case.lora_a.grad.abs().sum() > 0 and case.lokr_w2.grad.abs().sum() > 0
