"""Launchers of the Triton ``adapter_linear``: per-batch metadata, the three paths, the path choice, and the
``torch.ops.peft_kernels.adapter_linear_triton`` registration (``torch.library.custom_op`` + fake, so torch.compile
treats it as one opaque op with a known output shape).

Importing this module imports triton and registers the op; ``peft_kernels.ops.triton`` imports it on first use.

Paths (each can be forced with ``adapter_linear(..., path=...)``; ``choose_path`` picks one from shapes only):

- ``fused``: one launch of the base GEMM with the shrink on the same X tile and the expand in the epilogue. M-tiles
  hold rows of one slot combination (the row's slot ids, sorted, so ``[3, 5]`` and ``[5, 3]`` share tiles); the
  tile table is built on the device with data-independent sizes (grid = cdiv(M, BLOCK_M) + number of possible
  combinations, capped at M; unused tiles exit at once), so there is no host sync besides the id check.
- ``two_kernel``: a segmented shrink over (row, position) pairs sorted by slot into an fp32 buffer ``[M, P, R]``,
  then the grouped base GEMM whose accumulator takes ``S B^T`` (no W re-read, no read-modify-write of the output).
- ``decode``: a per-row shrink (GEMV per row and position), then the base GEMM over rows in order with a per-row
  BGMV-style expand in the epilogue; nothing is grouped, so many distinct adapters cost nothing extra.

The LoKr bank always runs as stage 1 ``_lokr_shrink_kernel`` (fp32 T buffer ``[M, Q, b, c]``) plus stage 2 in the
epilogue of whichever base kernel runs: it is added to the fp32 accumulator before the one store.
"""

from __future__ import annotations

import torch
import triton

from peft_kernels import env
from peft_kernels.ops import reference
from peft_kernels.ops.triton import configs
from peft_kernels.ops.triton.kernels import (
    _adapter_linear_kernel,
    _bgmv_shrink_kernel,
    _lokr_shrink_kernel,
    _sgmv_shrink_kernel,
)

__all__ = ["PATHS", "adapter_linear", "choose_path", "adapter_linear_op"]

PATHS = ("fused", "two_kernel", "decode")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DELTA = {"fused": 0, "two_kernel": 1, "decode": 2}


def choose_path(m: int, r: int, p: int, dispatch: dict) -> str:
    """The path for M rows, a LoRA bank of (padded) rank ``r`` and ``p`` slot positions per row; shapes only.

    decode when rows are few (per-row delta, no grouping); two_kernel when the fused kernel's redundant shrink
    (once per N-tile, ~ r*p/BLOCK_N of the base work) gets large, or for long prefill; otherwise fused.
    """
    if p == 0 or r == 0:
        return "fused"
    if m <= dispatch["decode_max_rows"]:
        return "decode"
    if r * p > dispatch["fused_max_rank"] or m >= dispatch["two_kernel_min_rows"]:
        return "two_kernel"
    return "fused"


def _tiles(keys: torch.Tensor, block: int, max_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort ``keys`` [L] and cut each run of equal keys into tiles of at most ``block`` positions.

    Returns (perm [L] int32: original index of each sorted position, tile_start [T] int32, tile_len [T] int32), with
    T = cdiv(L, block) + min(L, max_groups) fixed by shapes; tiles past the last used one have length 0.
    """
    length = keys.numel()
    n_tiles = triton.cdiv(length, block) + min(length, max_groups)
    sorted_keys, perm = torch.sort(keys, stable=True)
    idx = torch.arange(length, device=keys.device)
    is_start = torch.ones(length, dtype=torch.bool, device=keys.device)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    is_end = torch.ones_like(is_start)
    is_end[:-1] = is_start[1:]
    group_start = torch.cummax(torch.where(is_start, idx, 0), 0).values
    group_end = torch.where(is_end, idx + 1, length).flip(0).cummin(0).values.flip(0)
    begins = (idx - group_start) % block == 0
    dest = torch.where(begins, torch.cumsum(begins, 0) - 1, n_tiles)  # non-starting positions go to a dump slot
    tile_start = torch.zeros(n_tiles + 1, dtype=torch.int64, device=keys.device).scatter_(0, dest, idx)
    tile_len = torch.zeros(n_tiles + 1, dtype=torch.int64, device=keys.device).scatter_(
        0, dest, torch.clamp(group_end - idx, max=block)
    )
    return perm.to(torch.int32), tile_start[:n_tiles].to(torch.int32), tile_len[:n_tiles].to(torch.int32)


def _combo_keys(ids: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, int]:
    """One int64 key per row naming its (sorted) slot combination, and how many combinations are possible."""
    m, p = ids.shape
    base = num_slots + 1
    if base**p < 2**62:
        weights = torch.tensor([base ** (p - 1 - i) for i in range(p)], dtype=torch.int64, device=ids.device)
        return ((ids.to(torch.int64) + 1) * weights).sum(dim=1), base**p
    return torch.unique(ids, dim=0, return_inverse=True)[1], m  # huge banks and many positions: one host sync


def _launch_kwargs(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


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
    path: str | None = None,
) -> torch.Tensor:
    """``reference.adapter_linear`` on the Triton kernels; ``path`` forces fused | two_kernel | decode (None: auto).

    Floating tensors whose dtype differs from x's are converted to x.dtype first (a copy).
    """
    reference.check_adapter_linear_args(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids
    )
    if x.dtype not in _DTYPES:
        raise TypeError(f"adapter_linear (triton): x must be fp32, fp16 or bf16, got {x.dtype}")
    if path is not None and path not in PATHS:
        raise ValueError(f"adapter_linear (triton): path {path!r} is not one of {', '.join(PATHS)}")
    dtype, dev = x.dtype, x.device
    m, k = x.shape
    n = weight.shape[0]
    s, r = lora_a.shape[:2]
    p = lora_ids.shape[1]
    t_count, q = lokr_w1.shape[0], lokr_ids.shape[1]
    if s > 0 and r > 0:
        lo, hi = int(lora_rank.min()), int(lora_rank.max())
        if lo < 0 or hi > r:
            raise ValueError(f"adapter_linear (triton): lora_rank must lie in [0, {r}], got [{lo}, {hi}]")
    out = torch.empty(m, n, dtype=dtype, device=dev)
    if m == 0 or n == 0:
        return out

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == dtype else t.to(dtype)

    dummy = torch.zeros(1, dtype=dtype, device=dev)
    dummy_i = torch.full((1,), -1, dtype=torch.int32, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    weight = conv(weight)
    bias = conv(bias) if bias is not None else None
    has_lora = s > 0 and r > 0 and p > 0
    has_lokr = t_count > 0 and q > 0
    p_k = p if has_lora else 0
    cfg = configs.get_config(env.triton_interpret())
    path = path or choose_path(m, r, p_k, cfg["dispatch"])
    # tl.dot mode (see kernels._mma): native fp16/bf16, IEEE fp32, or bf16 upcast under the interpreter.
    dot = 1 if dtype == torch.float32 else 2 if (dtype == torch.bfloat16 and env.triton_interpret()) else 0

    if has_lora:
        lora_a, lora_b = conv(lora_a), conv(lora_b)
        lora_scale = lora_scale.to(device=dev, dtype=torch.float32).contiguous()
        lora_rank = lora_rank.to(device=dev, dtype=torch.int32).contiguous()
        # Sum semantics make the order of a row's positions irrelevant: sort them (valid slots first).
        ids = lora_ids.sort(dim=1, descending=True).values.contiguous()
        a_strides, b_strides = lora_a.stride(), lora_b.stride()
    else:
        lora_a = lora_b = dummy
        lora_scale, lora_rank, ids = dummy_f, dummy_i, dummy_i
        a_strides = b_strides = (0, 0, 0)

    # LoKr stage 1 (any path): T[m, q, j, :] = X_m[j, :] w2^T in fp32.
    if has_lokr:
        la, lb = lokr_w1.shape[1:]
        lc, ld = lokr_w2.shape[1:]
        lokr_w1, lokr_w2 = conv(lokr_w1), conv(lokr_w2)
        lokr_ids = lokr_ids.contiguous()
        lokr_scale = lokr_scale.to(device=dev, dtype=torch.float32).contiguous()
        t_buf = torch.empty(m, q, lb, lc, dtype=torch.float32, device=dev)
        lcfg = cfg["lokr_shrink"]
        grid = (m * q, triton.cdiv(lb, lcfg["BLOCK_J"]), triton.cdiv(lc, lcfg["BLOCK_C"]))
        _lokr_shrink_kernel[grid](
            x, lokr_w2, lokr_ids, t_buf, q, lb, lc, ld, x.stride(0), x.stride(1), *lokr_w2.stride(), DOT=dot,
            BLOCK_J=lcfg["BLOCK_J"], BLOCK_C=lcfg["BLOCK_C"], BLOCK_D=lcfg["BLOCK_D"], **_launch_kwargs(lcfg),
        )  # fmt: skip
        w1_strides = lokr_w1.stride()
    else:
        lb = lc = 0
        lokr_w1, lokr_ids, lokr_scale, t_buf = dummy, dummy_i, dummy_f, dummy_f
        w1_strides = (0, 0, 0)
    q_k = q if has_lokr else 0

    s_buf = dummy_f
    if path == "decode":
        gcfg = cfg["decode_gemm"]
        bm = gcfg["BLOCK_M"]
        n_tiles = triton.cdiv(m, bm)
        perm = torch.arange(m, dtype=torch.int32, device=dev)
        tile_start = torch.arange(n_tiles, dtype=torch.int32, device=dev) * bm
        tile_len = torch.clamp(m - tile_start, max=bm).to(torch.int32)
        slots = ids
        if has_lora:
            scfg = cfg["decode_shrink"]
            s_buf = torch.empty(m, p, r, dtype=torch.float32, device=dev)
            _bgmv_shrink_kernel[(m * p, triton.cdiv(r, scfg["BLOCK_R"]))](
                x, lora_a, lora_scale, lora_rank, ids, s_buf, k, p, r, x.stride(0), x.stride(1), *a_strides,
                BLOCK_K=scfg["BLOCK_K"], BLOCK_R=scfg["BLOCK_R"], **_launch_kwargs(scfg),
            )  # fmt: skip
    else:
        gcfg = cfg["fused" if path == "fused" else "two_kernel_gemm"]
        if has_lora:
            keys, max_groups = _combo_keys(ids, s)
        else:
            keys, max_groups = torch.zeros(m, dtype=torch.int64, device=dev), 1
        perm, tile_start, tile_len = _tiles(keys, gcfg["BLOCK_M"], max_groups)
        n_tiles = tile_start.numel()
        slots = ids[perm[tile_start].long()].contiguous() if has_lora else dummy_i
        if path == "two_kernel" and has_lora:
            scfg = cfg["two_kernel_shrink"]
            pair_keys = ids.reshape(-1).to(torch.int64)
            pair_perm, pair_start, pair_len = _tiles(pair_keys, scfg["BLOCK_M"], s + 1)
            pair_slot = ids.reshape(-1)[pair_perm[pair_start].long()].contiguous()
            s_buf = torch.empty(m, p, r, dtype=torch.float32, device=dev)
            grid = (pair_start.numel(), triton.cdiv(r, scfg["BLOCK_R"]))
            _sgmv_shrink_kernel[grid](
                x, lora_a, lora_scale, lora_rank, pair_perm, pair_start, pair_len, pair_slot, s_buf, k, p, r,
                x.stride(0), x.stride(1), *a_strides, DOT=dot, BLOCK_M=scfg["BLOCK_M"], BLOCK_K=scfg["BLOCK_K"],
                BLOCK_R=scfg["BLOCK_R"], **_launch_kwargs(scfg),
            )  # fmt: skip

    grid = (n_tiles, triton.cdiv(n, gcfg["BLOCK_N"]))
    _adapter_linear_kernel[grid](
        x, weight, bias if bias is not None else dummy, out, lora_a, lora_b, lora_scale, lora_rank,
        perm, tile_start, tile_len, slots, s_buf, t_buf, lokr_w1, lokr_ids, lokr_scale,
        n, k, p_k, r, q_k, lb, lc,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        *a_strides, *b_strides, *w1_strides,
        DELTA=_DELTA[path], HAS_BIAS=bias is not None, HAS_LOKR=has_lokr, DOT=dot,
        BLOCK_M=gcfg["BLOCK_M"], BLOCK_N=gcfg["BLOCK_N"], BLOCK_K=gcfg["BLOCK_K"], BLOCK_R=gcfg["BLOCK_R"],
        **_launch_kwargs(gcfg),
    )  # fmt: skip
    return out


_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor lora_scale, Tensor lora_rank, "
    "Tensor lora_ids, Tensor lokr_w1, Tensor lokr_w2, Tensor lokr_scale, Tensor lokr_ids, str path='auto') -> Tensor"
)


@torch.library.custom_op("peft_kernels::adapter_linear_triton", mutates_args=(), schema=_SCHEMA)
def adapter_linear_op(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    lora_scale,
    lora_rank,
    lora_ids,
    lokr_w1,
    lokr_w2,
    lokr_scale,
    lokr_ids,
    path="auto",
):
    if x.device.type == "cpu" and not env.triton_interpret():
        raise RuntimeError("peft_kernels::adapter_linear_triton: CPU tensors need TRITON_INTERPRET=1")
    return adapter_linear(
        x, weight, bias, lora_a, lora_b, lora_scale, lora_rank, lora_ids, lokr_w1, lokr_w2, lokr_scale, lokr_ids,
        path=None if path == "auto" else path,
    )  # fmt: skip


@adapter_linear_op.register_fake
def _(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    lora_scale,
    lora_rank,
    lora_ids,
    lokr_w1,
    lokr_w2,
    lokr_scale,
    lokr_ids,
    path="auto",
):
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"adapter_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    return x.new_empty(x.shape[0], weight.shape[0])
