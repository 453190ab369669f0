"""Adapter parameter shapes and initialisations, exactly as PEFT 0.21.2 makes them (see peft-semantics.md 1.1-1.3)."""

from __future__ import annotations

import math

import torch
from torch import nn


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of ``dimension`` into (m, n), m <= n, copied in behaviour from PEFT/LyCORIS.

    With ``factor > 0`` dividing ``dimension`` the pair is ``(factor, dimension // factor)`` unsorted, as in PEFT.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_shapes(
    out_features: int, in_features: int, r: int, decompose_both: bool, decompose_factor: int
) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of one LoKr adapter on a Linear layer (PEFT ``lokr.layer.update_layer``)."""
    out_l, out_k = factorization(out_features, decompose_factor)
    in_m, in_n = factorization(in_features, decompose_factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if not (decompose_both and r < max(out_l, in_m) / 2):
        shapes["lokr_w1"] = (out_l, in_m)
    else:
        shapes["lokr_w1_a"] = (out_l, r)
        shapes["lokr_w1_b"] = (r, in_m)
    if not (r < max(out_k, in_n) / 2):
        shapes["lokr_w2"] = (out_k, in_n)
    else:
        shapes["lokr_w2_a"] = (out_k, r)
        shapes["lokr_w2_b"] = (r, in_n)
    return shapes


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def init_lora(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    """PEFT's ``reset_lora_parameters`` for Linear. ``False`` keeps nn.Linear's default init (already applied)."""
    if init is False:
        return
    if init is True:
        _kaiming(a)
    elif isinstance(init, str) and init.lower() == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        raise ValueError(f"Unknown initialization init_lora_weights={init!r}")
    nn.init.zeros_(b)


def init_loha(params: dict[str, torch.Tensor], init: bool) -> None:
    """PEFT's LoHa init: all Kaiming; with ``init_weights=True`` hada_w2_b is zeros (a no-op adapter)."""
    for name, p in params.items():
        if init is True and name == "hada_w2_b":
            nn.init.zeros_(p)
        else:
            _kaiming(p)


def init_lokr(params: dict[str, torch.Tensor], init: bool | str) -> None:
    """PEFT's LoKr init: True zeros w1 (or w1_a); "lycoris" zeros w2 (or w2_b); False is all Kaiming."""
    if init is True:
        zero = {"lokr_w1", "lokr_w1_a"}
    elif isinstance(init, str) and init.lower() == "lycoris":
        zero = {"lokr_w2", "lokr_w2_b"}
    elif init is False:
        zero = set()
    else:
        raise ValueError(f"Unknown initialization init_weights={init!r}")
    for name, p in params.items():
        if name in zero:
            nn.init.zeros_(p)
        else:
            _kaiming(p)
