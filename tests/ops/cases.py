"""Random inputs for the ``adapter_linear`` op, shared by every backend's test and by the benchmarks' sanity checks.

``make_case`` builds one call's arguments: a base layer, a LoRA bank (LoRA adapters and LoHa adapters packed as LoRA
of rank r1*r2, mixed ranks zero-padded to the bank's R), a LoKr bank of one factor shape, and per-row slot ids.
Inputs are scaled by 1/sqrt(K) so outputs are O(1) (the tolerance table assumes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from peft_kernels.ops.reference import pack_loha


@dataclass
class Case:
    x: torch.Tensor  # [M, in]
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]
    lora_a: torch.Tensor  # [S, R, in]
    lora_b: torch.Tensor  # [S, out, R]
    lora_scale: torch.Tensor  # [S] fp32
    lora_rank: torch.Tensor  # [S] int32
    lora_ids: torch.Tensor  # [M, P] int32
    lokr_w1: torch.Tensor  # [T, a, b]
    lokr_w2: torch.Tensor  # [T, c, d]
    lokr_scale: torch.Tensor  # [T] fp32
    lokr_ids: torch.Tensor  # [M, Q] int32
    meta: dict = field(default_factory=dict)

    def args(self) -> tuple:
        return (
            self.x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.lora_scale,
            self.lora_rank,
            self.lora_ids,
            self.lokr_w1,
            self.lokr_w2,
            self.lokr_scale,
            self.lokr_ids,
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Case:
        """Floating tensors (except scales) to ``dtype``; everything to ``device``."""

        def conv(t: torch.Tensor | None, floating: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            if floating and dtype is not None:
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return Case(
            conv(self.x),
            conv(self.weight),
            conv(self.bias),
            conv(self.lora_a),
            conv(self.lora_b),
            conv(self.lora_scale, False),
            conv(self.lora_rank, False),
            conv(self.lora_ids, False),
            conv(self.lokr_w1),
            conv(self.lokr_w2),
            conv(self.lokr_scale, False),
            conv(self.lokr_ids, False),
            dict(self.meta),
        )


def _factor(n: int) -> tuple[int, int]:
    """A factor pair (m, n/m) with m as close to sqrt(n) as possible (m <= n/m)."""
    m = int(math.isqrt(n))
    while n % m:
        m -= 1
    return m, n // m


def make_case(
    m: int = 7,
    in_features: int = 33,
    out_features: int = 20,
    lora_ranks: tuple[int, ...] = (4,),
    loha_ranks: tuple[tuple[int, int], ...] = (),
    lokr_count: int = 0,
    lokr_shape: tuple[int, int, int, int] | None = None,
    lora_per_row: int = 1,
    lokr_per_row: int = 1,
    base_fraction: float = 0.25,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    sorted_rows: bool = False,
) -> Case:
    """One random case.

    lora_ranks: the rank of each LoRA slot; loha_ranks: (r1, r2) of each LoHa slot, packed after the LoRA slots;
    lokr_count: LoKr slots of factor shape ``lokr_shape`` = (a, b, c, d), a*c = out, b*d = in (default: near-square
    factors). Each row draws ``lora_per_row`` / ``lokr_per_row`` ids; a position is -1 with ``base_fraction``.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    k, n = in_features, out_features
    x = rnd(m, k)
    weight = rnd(n, k, scale=1 / math.sqrt(k))
    b = rnd(n) if bias else None

    a_list, b_list, ranks, scales = [], [], [], []
    for r in lora_ranks:
        a_list.append(rnd(r, k, scale=1 / math.sqrt(k)))
        b_list.append(rnd(n, r, scale=1 / math.sqrt(r)))
        ranks.append(r)
        scales.append(float(torch.rand((), generator=g)) + 0.5)
    for r1, r2 in loha_ranks:
        a_eff, b_eff = pack_loha(
            rnd(n, r1, scale=r1**-0.5), rnd(r1, k, scale=k**-0.5), rnd(n, r2, scale=r2**-0.5), rnd(r2, k)
        )
        a_list.append(a_eff)
        b_list.append(b_eff)
        ranks.append(r1 * r2)
        scales.append(float(torch.rand((), generator=g)) + 0.5)
    s = len(a_list)
    r_max = max(ranks, default=0)
    lora_a = torch.zeros(s, r_max, k, dtype=torch.float64)
    lora_b = torch.zeros(s, n, r_max, dtype=torch.float64)
    for i, (aa, bb) in enumerate(zip(a_list, b_list)):
        lora_a[i, : aa.shape[0]] = aa
        lora_b[i, :, : bb.shape[1]] = bb

    if lokr_count:
        if lokr_shape is None:
            (a_, c_), (b_, d_) = _factor(n), _factor(k)
            lokr_shape = (a_, b_, c_, d_)
        a_, b_, c_, d_ = lokr_shape
        assert a_ * c_ == n and b_ * d_ == k, f"lokr_shape {lokr_shape} does not fit {n}x{k}"
        lokr_w1 = rnd(lokr_count, a_, b_, scale=b_**-0.5)
        lokr_w2 = rnd(lokr_count, c_, d_, scale=d_**-0.5)
    else:
        lokr_w1 = torch.zeros(0, 0, 0, dtype=torch.float64)
        lokr_w2 = torch.zeros(0, 0, 0, dtype=torch.float64)
    lokr_scale = torch.rand(lokr_count, generator=g, dtype=torch.float32) + 0.5

    def ids(count: int, per_row: int) -> torch.Tensor:
        if count == 0:
            return torch.zeros(m, 0, dtype=torch.int32)
        out = torch.randint(0, count, (m, per_row), generator=g, dtype=torch.int32)
        out[torch.rand(m, per_row, generator=g) < base_fraction] = -1
        if sorted_rows:
            out = out[out[:, 0].argsort()]
        return out

    case = Case(
        x,
        weight,
        b,
        lora_a,
        lora_b,
        torch.tensor(scales, dtype=torch.float32),
        torch.tensor(ranks, dtype=torch.int32),
        ids(s, lora_per_row),
        lokr_w1,
        lokr_w2,
        lokr_scale,
        ids(lokr_count, lokr_per_row),
        {"m": m, "in": k, "out": n},
    )
    return case.to(dtype)
