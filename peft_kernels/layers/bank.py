"""The adapter bank of one fused layer: every adapter of the layer stacked into the tensors ``adapter_linear`` takes.

LoRA and LoHa (packed as its exact rank r1*r2 LoRA) share the LoRA bank: A [S, R, in], B [S, out, R] zero-padded to
the largest rank R, with each slot's true rank and scale. LoKr adapters are grouped by factor shapes, one bank per
group: w1 [T, a, b], w2 [T, c, d] (low-rank factors multiplied out: they are small, a x b and c x d).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LokrGroup:
    w1: torch.Tensor  # [T, a, b]
    w2: torch.Tensor  # [T, c, d]
    scale: torch.Tensor  # [T] fp32
    slots: dict[str, int]  # adapter name -> slot in this group


@dataclass
class AdapterBank:
    lora_a: torch.Tensor  # [S, R, in]
    lora_b: torch.Tensor  # [S, out, R]
    lora_scale: torch.Tensor  # [S] fp32
    lora_rank: torch.Tensor  # [S] int32
    lora_slots: dict[str, int]  # adapter name -> slot (LoRA and LoHa)
    lokr_groups: list[LokrGroup] = field(default_factory=list)
    generation: int = 0  # bumped by an owner that rewrites slots in place (adapter pools)


def build_bank(
    lora_like: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    lokr: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AdapterBank:
    """Stack adapters into a bank.

    lora_like: name -> (A [r, in], B [out, r], scale); lokr: name -> (w1 [a, b], w2 [c, d], scale). Differentiable
    with respect to the inputs (the eval path with autograd builds the bank from live parameters).
    """
    names = list(lora_like)
    r_max = max((lora_like[n][0].shape[0] for n in names), default=0)
    a_rows, b_cols = [], []
    for n in names:
        a, b, _ = lora_like[n]
        pad = r_max - a.shape[0]
        a_rows.append(torch.nn.functional.pad(a.to(device, dtype), (0, 0, 0, pad)))
        b_cols.append(torch.nn.functional.pad(b.to(device, dtype), (0, pad)))
    if names:
        lora_a = torch.stack(a_rows)
        lora_b = torch.stack(b_cols)
    else:
        lora_a = torch.zeros(0, 0, in_features, dtype=dtype, device=device)
        lora_b = torch.zeros(0, out_features, 0, dtype=dtype, device=device)
    bank = AdapterBank(
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=torch.tensor([float(lora_like[n][2]) for n in names], dtype=torch.float32, device=device),
        lora_rank=torch.tensor([lora_like[n][0].shape[0] for n in names], dtype=torch.int32, device=device),
        lora_slots={n: i for i, n in enumerate(names)},
    )
    groups: dict[tuple, list[str]] = {}
    for n, (w1, w2, _) in lokr.items():
        groups.setdefault((tuple(w1.shape), tuple(w2.shape)), []).append(n)
    for members in groups.values():
        bank.lokr_groups.append(
            LokrGroup(
                w1=torch.stack([lokr[n][0].to(device, dtype) for n in members]),
                w2=torch.stack([lokr[n][1].to(device, dtype) for n in members]),
                scale=torch.tensor([float(lokr[n][2]) for n in members], dtype=torch.float32, device=device),
                slots={n: i for i, n in enumerate(members)},
            )
        )
    return bank


def empty_lokr(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty LoKr bank (T = 0) for calls without LoKr adapters."""
    z = torch.zeros(0, 0, 0, dtype=dtype, device=device)
    return z, z, torch.zeros(0, dtype=torch.float32, device=device)
