"""torch.compile sees the fused layer as one graph on the kernel backends: each op is registered with the dispatcher
and has a fake implementation. (The pure-PyTorch reference is plain Python with data-dependent checks; compiling
through it works with graph breaks, and is not what this test is about.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels import FusedAdapterLinear
from peft_kernels.ops import unavailable_reason
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("adapter_names", [None, ["b", "__base__", "a", "a", "b"]])
def test_fullgraph_compile_matches_eager(backend, adapter_names, monkeypatch):
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    layer = FusedAdapterLinear(nn.Linear(64, 48)).eval()
    layer.create_lora("a", 4, 8, init_lora_weights=False)
    layer.create_lokr("b", 2, 4, init_weights=False)
    layer.set_adapter(["a", "b"])
    x = torch.randn(5, 3, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = layer(x, adapter_names=adapter_names)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
        assert_close(compiled(x, adapter_names=adapter_names), expected)
