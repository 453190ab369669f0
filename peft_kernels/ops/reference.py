"""Pure-PyTorch reference for every fused op: the spec, the test oracle, the fallback on any device.

Every fast backend (``cpu``, ``triton``, ``cuda``) implements exactly these signatures and semantics.
Deltas stay in factored form: nothing here builds an ``out x in`` delta (DESIGN.md section 2).

The one op, ``adapter_linear``::

    y[m] = x[m] W^T + bias
         + sum_p [lora_ids[m, p] >= 0]  lora_scale[s] * (x[m] lora_a[s]^T) lora_b[s]^T        (s = lora_ids[m, p])
         + sum_q [lokr_ids[m, q] >= 0]  lokr_scale[t] * vec(w1[t] X[m] w2[t]^T)                (t = lokr_ids[m, q])

with ``X[m] = x[m].reshape(b, d)``. The "LoRA bank" holds LoRA adapters and LoHa adapters packed as a LoRA of rank
r1*r2 (``pack_loha``); the "LoKr bank" holds LoKr adapters of one factor shape. Slot id -1 means "no adapter at this
position"; any other id outside ``[0, S)`` raises.
"""

from __future__ import annotations

import torch

__all__ = [
    "adapter_linear",
    "check_adapter_linear_args",
    "lokr_delta",
    "lora_delta",
    "pack_loha",
]


def check_ids(ids: torch.Tensor, num_slots: int, what: str) -> None:
    """Raise if any slot id is outside ``[-1, num_slots)``. -1 means base only; it is never used as an index."""
    if ids.dtype != torch.int32:
        raise TypeError(f"{what}: slot ids must be int32, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= num_slots:
        bad = lo if lo < -1 else hi
        raise IndexError(
            f"{what}: slot id {bad} is out of range for a bank of {num_slots} slot(s) (-1 means base only)"
        )


def check_adapter_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_scale: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_ids: torch.Tensor,
    lokr_w1: torch.Tensor,
    lokr_w2: torch.Tensor,
    lokr_scale: torch.Tensor,
    lokr_ids: torch.Tensor,
) -> None:
    """Shape, dtype and id checks shared by the reference and the Python-launched kernels."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"adapter_linear: x must be [M, in] and weight [out, in], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"adapter_linear: x has {k} features but weight is {tuple(weight.shape)} ([out, in])")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"adapter_linear: bias must be [{n}], got {tuple(bias.shape)}")
    s = lora_a.shape[0]
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_b.shape[0] != s:
        raise ValueError(
            f"adapter_linear: lora_a must be [S, R, in] and lora_b [S, out, R], got {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
        )
    if s > 0 and (lora_a.shape[2] != k or lora_b.shape[1] != n or lora_b.shape[2] != lora_a.shape[1]):
        raise ValueError(
            f"adapter_linear: LoRA bank shapes A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a layer of in={k}, out={n}"
        )
    if lora_scale.shape != (s,) or lora_rank.shape != (s,):
        raise ValueError(
            f"adapter_linear: lora_scale and lora_rank must be [{s}], got {tuple(lora_scale.shape)}, {tuple(lora_rank.shape)}"
        )
    if lora_ids.dim() != 2 or lora_ids.shape[0] != m:
        raise ValueError(f"adapter_linear: lora_ids must be [M={m}, P], got {tuple(lora_ids.shape)}")
    t = lokr_w1.shape[0]
    if lokr_w1.dim() != 3 or lokr_w2.dim() != 3 or lokr_w2.shape[0] != t:
        raise ValueError(
            f"adapter_linear: lokr_w1 must be [T, a, b] and lokr_w2 [T, c, d], got {tuple(lokr_w1.shape)}, {tuple(lokr_w2.shape)}"
        )
    if t > 0:
        a, b = lokr_w1.shape[1:]
        c, d = lokr_w2.shape[1:]
        if a * c != n or b * d != k:
            raise ValueError(
                f"adapter_linear: LoKr factors w1 {a}x{b} and w2 {c}x{d} give a {a * c}x{b * d} delta, the layer is {n}x{k}"
            )
    if lokr_scale.shape != (t,):
        raise ValueError(f"adapter_linear: lokr_scale must be [{t}], got {tuple(lokr_scale.shape)}")
    if lokr_ids.dim() != 2 or lokr_ids.shape[0] != m:
        raise ValueError(f"adapter_linear: lokr_ids must be [M={m}, Q], got {tuple(lokr_ids.shape)}")
    check_ids(lora_ids, s, "adapter_linear: lora_ids")
    check_ids(lokr_ids, t, "adapter_linear: lokr_ids")


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """LoRA delta in factored form. x: [..., in], a: [r, in], b: [out, r] -> [..., out]."""
    return (x @ a.transpose(-1, -2)) @ b.transpose(-1, -2) * scale


def pack_loha(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa (w1a w1b) ⊙ (w2a w2b) as an exact LoRA of rank r1*r2 (face-splitting identity, DESIGN.md section 2).

    w1a: [out, r1], w1b: [r1, in], w2a: [out, r2], w2b: [r2, in] -> (A_eff [r1*r2, in], B_eff [out, r1*r2]) with
    B_eff[o, i*r2 + j] = w1a[o, i] * w2a[o, j] and A_eff[i*r2 + j, k] = w1b[i, k] * w2b[j, k]. Differentiable.
    """
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    b_eff = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, r1 * r2)
    a_eff = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.shape[1])
    return a_eff, b_eff


def lokr_delta(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """LoKr delta ``x kron(w1, w2)^T * scale`` without the Kronecker product.

    x: [..., b*d], w1: [a, b], w2: [c, d] -> [..., a*c]; ``y = vec(w1 X w2^T)`` with X = x.reshape(b, d). The cheaper
    of the two association orders is used.
    """
    a, b = w1.shape
    c, d = w2.shape
    lead = x.shape[:-1]
    xm = x.reshape(-1, b, d)
    # (w1 X) w2^T costs a*b*d + a*d*c per row; w1 (X w2^T) costs b*d*c + a*b*c.
    if a * d * (b + c) <= b * c * (d + a):
        y = torch.matmul(torch.matmul(w1, xm), w2.transpose(-1, -2))
    else:
        y = torch.matmul(w1, torch.matmul(xm, w2.transpose(-1, -2)))
    return (y * scale).reshape(*lead, a * c)


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_scale: torch.Tensor,
    lora_rank: torch.Tensor,
    lora_ids: torch.Tensor,
    lokr_w1: torch.Tensor,
    lokr_w2: torch.Tensor,
    lokr_scale: torch.Tensor,
    lokr_ids: torch.Tensor,
) -> torch.Tensor:
    """Base linear plus, per row, the deltas of the adapters its slot ids select.

    x: [M, in]; weight: [out, in] (any strides); bias: [out] or None;
    lora_a: [S, R, in]; lora_b: [S, out, R]; lora_scale: [S] fp32; lora_rank: [S] int32 (columns past a slot's rank
    are zero); lora_ids: [M, P] int32; lokr_w1: [T, a, b]; lokr_w2: [T, c, d]; lokr_scale: [T] fp32;
    lokr_ids: [M, Q] int32. Returns [M, out] in x.dtype. fp16/bf16 inputs are computed in fp32. Differentiable with
    respect to every floating tensor (this is the training path).
    """
    check_adapter_linear_args(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
    out_dtype = x.dtype
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc = x.to(cdt)
    y = xc @ weight.to(cdt).t()
    if bias is not None:
        y = y + bias.to(cdt)
    for slot in _used_slots(lora_ids):
        rows = (lora_ids == slot).any(dim=1).nonzero().squeeze(1)
        rank = int(lora_rank[slot])
        d = lora_delta(xc[rows], lora_a[slot, :rank].to(cdt), lora_b[slot, :, :rank].to(cdt), lora_scale[slot].to(cdt))
        y = y.index_add(0, rows, d * _multiplicity(lora_ids, rows, slot, cdt))
    for slot in _used_slots(lokr_ids):
        rows = (lokr_ids == slot).any(dim=1).nonzero().squeeze(1)
        d = lokr_delta(xc[rows], lokr_w1[slot].to(cdt), lokr_w2[slot].to(cdt), lokr_scale[slot].to(cdt))
        y = y.index_add(0, rows, d * _multiplicity(lokr_ids, rows, slot, cdt))
    return y.to(out_dtype)


def _used_slots(ids: torch.Tensor) -> list[int]:
    if ids.numel() == 0:
        return []
    return [int(s) for s in torch.unique(ids.cpu()) if s >= 0]


def _multiplicity(ids: torch.Tensor, rows: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """How many positions of each selected row name ``slot`` ([rows, 1]); a slot named twice adds twice."""
    return (ids[rows] == slot).sum(dim=1, keepdim=True).to(dtype)
