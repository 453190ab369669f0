"""FusedAdapterLinear on its own (outside any PeftModel), against dense fp64 deltas."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_kernels import FusedAdapterLinear
from tests.tolerances import assert_close

F64 = torch.float64


def _layer(in_f=40, out_f=36, base=None):
    base = base if base is not None else nn.Linear(in_f, out_f, dtype=F64)
    layer = FusedAdapterLinear(copy.deepcopy(base)).eval()
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64) / s[-1] ** 0.5

    layer.add_lora("lora", r(4, in_f), r(out_f, 4), scaling=2.0)
    layer.add_loha("loha", r(out_f, 3), r(3, in_f), r(out_f, 2), r(2, in_f), scaling=0.5)
    layer.add_lokr("lokr", w1=r(6, 5), w2_a=r(6, 2), w2_b=r(2, 8), scaling=1.5)
    return base, layer


def _dense(layer: FusedAdapterLinear, names) -> torch.Tensor:
    w = layer.base_layer.weight.detach()
    w = w.t() if layer.fan_in_fan_out else w
    for n in names:
        d = layer.get_delta_weight(n).to(F64)
        w = w + (d.t() if layer.fan_in_fan_out else d)
    return w


@pytest.mark.parametrize("active", [["lora"], ["loha"], ["lokr"], ["lora", "loha", "lokr"], []])
def test_active_adapters_add(active):
    base, layer = _layer()
    layer.set_adapter(active)
    x = torch.randn(2, 5, 40, dtype=F64)
    with torch.no_grad():
        assert_close(layer(x), x @ _dense(layer, active).T + base.bias)


def test_per_row_adapter_names():
    base, layer = _layer()
    names = ["lokr", "__base__", "lora", "loha", "lora"]
    x = torch.randn(5, 3, 40, dtype=F64)
    with torch.no_grad():
        y = layer(x, adapter_names=names)
    for i, n in enumerate(names):
        w = _dense(layer, [] if n == "__base__" else [n])
        assert_close(y[i], x[i] @ w.T + base.bias)


def test_unknown_name_and_wrong_length_raise():
    _, layer = _layer()
    x = torch.randn(2, 40, dtype=F64)
    with pytest.raises(ValueError, match="non-existing adapter"):
        layer(x, adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(x, adapter_names=["lora"])


def test_conv1d_fan_in_fan_out():
    conv = Conv1D(36, 40).to(F64)  # weight [in=40, out=36]
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias)
    base, layer = _layer(base=conv)
    layer.set_adapter(["lora", "lokr"])
    x = torch.randn(3, 40, dtype=F64)
    with torch.no_grad():
        assert_close(layer(x), x @ _dense(layer, ["lora", "lokr"]).T + base.bias)


def test_merge_unmerge_roundtrip():
    base, layer = _layer()
    layer.set_adapter(["lora", "loha", "lokr"])
    x = torch.randn(4, 40, dtype=F64)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert layer.merged
        assert_close(layer(x), before)
        layer.unmerge()
        assert_close(layer.base_layer.weight, base.weight)
        assert_close(layer(x), before)


def test_bad_shapes_name_the_adapter():
    _, layer = _layer()
    with pytest.raises(ValueError, match="adapter 'x': lora_B"):
        layer.add_lora("x", torch.zeros(4, 40, dtype=F64), torch.zeros(35, 4, dtype=F64))
    with pytest.raises(ValueError, match="adapter 'y': kron"):
        layer.add_lokr("y", w1=torch.zeros(6, 5, dtype=F64), w2=torch.zeros(6, 7, dtype=F64))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_lora("lora", torch.zeros(4, 40, dtype=F64), torch.zeros(36, 4, dtype=F64))
    with pytest.raises(TypeError, match="Conv2d"):
        FusedAdapterLinear(nn.Conv2d(3, 3, 1))


def test_bank_cache_follows_parameter_updates():
    _, layer = _layer()
    layer.set_adapter("lora")
    x = torch.randn(3, 40, dtype=F64)
    with torch.no_grad():
        y0 = layer(x)
        layer.lora_B["lora"].weight.mul_(2)  # in-place update: the cached bank must notice
        y1 = layer(x)
        base = layer.base_layer(x)
    assert_close(y1 - base, 2 * (y0 - base))


def test_training_forward_gradients_match_dense():
    base, layer = _layer()
    layer.set_adapter(["lora", "loha", "lokr"])
    layer.base_layer.requires_grad_(False)  # standalone layers leave the base trainable unless told otherwise
    layer.train()
    x = torch.randn(4, 40, dtype=F64)
    layer(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    assert set(grads) == {
        "lora_A.lora.weight", "lora_B.lora.weight", "hada_w1_a.loha", "hada_w1_b.loha", "hada_w2_a.loha",
        "hada_w2_b.loha", "lokr_w1.lokr", "lokr_w2_a.lokr", "lokr_w2_b.lokr",
    }  # fmt: skip
    # oracle: the same loss through dense deltas built the PEFT way
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}
    w = base.weight + 2.0 * params["lora_B.lora.weight"] @ params["lora_A.lora.weight"]
    w = w + 0.5 * (params["hada_w1_a.loha"] @ params["hada_w1_b.loha"]) * (
        params["hada_w2_a.loha"] @ params["hada_w2_b.loha"]
    )
    w = w + 1.5 * torch.kron(params["lokr_w1.lokr"], params["lokr_w2_a.lokr"] @ params["lokr_w2_b.lokr"])
    (x @ w.T + base.bias).square().sum().backward()
    for n, g in grads.items():
        assert_close(g, params[n].grad, msg=n)


def test_delete_adapter():
    _, layer = _layer()
    layer.set_adapter(["lora", "lokr"])
    layer.delete_adapter("lokr")
    assert layer.active_adapters == ["lora"] and "lokr" not in layer.lokr_w1
    x = torch.randn(2, 40, dtype=F64)
    with torch.no_grad():
        assert_close(layer(x), x @ _dense(layer, ["lora"]).T + layer.base_layer.bias)
