"""Triton kernels of ``adapter_linear`` (launched from ``launch.py``; the spec is ``ops/reference.py``).

- ``_adapter_linear_kernel``: the base GEMM of one (M-tile, N-tile) with the LoRA-bank delta and the LoKr-bank
  epilogue, one store. ``DELTA`` selects how the LoRA delta is formed:
    0 fused: M-tiles hold rows of one slot combination (rows gathered through a sorted index); the first rank block
      of position 0 is shrunk on the same X tile as the base product inside the K loop; further rank blocks and
      positions run their own K loop over X and A only (never W again);
    1 two-kernel: same M-tiles, the shrink ``scale * X A^T`` was written to an fp32 buffer by
      ``_sgmv_shrink_kernel`` and is read back for the expand;
    2 decode: M-tiles are rows in order, each row has its own slots; shrink from ``_bgmv_shrink_kernel``'s buffer, the
      expand is a per-row gather ``sum_r S[m, r] B[slot_m, n, r]`` on CUDA cores.
  Every expand and rank loop stops at the slot's own rank (mixed ranks cost their true rank, rounded up to BLOCK_R).
- ``_lokr_shrink_kernel``: LoKr stage 1, ``T[m, q, j, :] = X_m[j, :] w2[t]^T`` in fp32; stage 2
  ``acc[m, p*c + k] += s * sum_j w1[t, p, j] T[m, q, j, k]`` runs in ``_adapter_linear_kernel``'s epilogue.

Slot id -1 is never used as an address: loads use ``max(slot, 0)`` and are masked by ``slot >= 0`` (or by rank 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


# DOT modes of _mma, chosen by the launcher:
#   0: fp16/bf16 operands straight to tl.dot (tensor cores), fp32 accumulator;
#   1: fp32 operands as IEEE fp32 products (the tolerance table assumes TF32 off);
#   2: bf16 operands upcast to fp32 first. Only under TRITON_INTERPRET=1: Triton 3.9's interpreter returns garbage
#      (errors ~1e10 on O(1) data) for tl.dot on bf16 operands; the upcast tiles give the same products exactly.
@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _adapter_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], any strides
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N]
    a_ptr,  # [S, R, K]
    b_ptr,  # [S, N, R]
    scale_ptr,  # [S] fp32
    rank_ptr,  # [S] int32
    perm_ptr,  # [M] int32: row of each sorted position
    tile_start_ptr,  # [T] int32: first sorted position of each M-tile
    tile_len_ptr,  # [T] int32: rows in the tile (0: unused tile)
    slots_ptr,  # DELTA 0/1: [T, P] slots of the tile's combination; DELTA 2: [M, P] slots of each row
    s_ptr,  # DELTA 1/2: [M, P, R_BUF] fp32 shrink buffer (already scaled)
    t_ptr,  # [M, Q, LB, LC] fp32 LoKr stage-1 buffer
    w1_ptr,  # [T_lokr, LA, LB]
    lokr_ids_ptr,  # [M, Q] int32
    lokr_scale_ptr,  # [T_lokr] fp32
    N,
    K,
    P,
    R_BUF,
    Q,
    LB,
    LC,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_as,
    stride_ar,
    stride_ak,
    stride_bs,
    stride_bn,
    stride_br,
    stride_w1t,
    stride_w1a,
    stride_w1b,
    DELTA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LOKR: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    tile_len = tl.load(tile_len_ptr + pid_t)
    if tile_len == 0:
        return
    tile_start = tl.load(tile_start_ptr + pid_t).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < tile_len
    rows = tl.load(perm_ptr + tile_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_r0 = tl.arange(0, BLOCK_R)
    x_rows = x_ptr + rows[:, None] * stride_xm

    # Fused tiles: the first rank block of position 0 rides along the base K loop on the same X tile.
    rank0 = 0
    if DELTA == 0:
        slot0 = tl.load(slots_ptr + pid_t * P, mask=P > 0, other=-1)
        safe0 = tl.maximum(slot0, 0).to(tl.int64)
        rank0 = tl.load(rank_ptr + safe0, mask=slot0 >= 0, other=0)
        a0_ptr = a_ptr + safe0 * stride_as
        r0_mask = offs_r0 < rank0
        s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DELTA == 0 and rank0 > 0:
        # Two copies of the K loop, so neither holds a branch (a branch in the loop body blocks pipelining).
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            at = tl.load(
                a0_ptr + offs_r0[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=k_mask[:, None] & r0_mask[None, :],
                other=0.0,
            )
            acc = _mma(xt, wt, acc, DOT)
            s_acc = _mma(xt, at, s_acc, DOT)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = _mma(xt, wt, acc, DOT)

    if DELTA == 0:
        if rank0 > 0:
            scale0 = tl.load(scale_ptr + safe0)
            bt = tl.load(
                b_ptr + safe0 * stride_bs + offs_r0[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=r0_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = _mma((s_acc * scale0).to(bt.dtype), bt, acc, DOT)

    if DELTA == 2:
        # Decode: each row has its own slot; expand by gathering B rows per row (BGMV), fp32 on CUDA cores.
        for p in range(0, P):
            slot_m = tl.load(slots_ptr + rows * P + p, mask=m_mask, other=-1)
            safe_m = tl.maximum(slot_m, 0).to(tl.int64)
            rank_m = tl.load(rank_ptr + safe_m, mask=slot_m >= 0, other=0)
            rank_hi = tl.max(rank_m, axis=0)
            for r0 in range(0, rank_hi, BLOCK_R):
                offs_r = r0 + offs_r0
                r_mask = offs_r[None, :] < rank_m[:, None]  # [BM, BR]
                s = tl.load(s_ptr + (rows[:, None] * P + p) * R_BUF + offs_r[None, :], mask=r_mask, other=0.0)
                bt = tl.load(
                    b_ptr
                    + safe_m[:, None, None] * stride_bs
                    + offs_n[None, :, None] * stride_bn
                    + offs_r[None, None, :] * stride_br,
                    mask=r_mask[:, None, :] & n_mask[None, :, None],
                    other=0.0,
                )
                acc += tl.sum(s[:, None, :] * bt.to(tl.float32), axis=2)
    else:
        for p in range(0, P):
            slot = tl.load(slots_ptr + pid_t * P + p)
            safe = tl.maximum(slot, 0).to(tl.int64)
            rank = tl.load(rank_ptr + safe, mask=slot >= 0, other=0)
            scale = tl.load(scale_ptr + safe, mask=slot >= 0, other=0.0)
            r_begin = 0
            if DELTA == 0:
                r_begin = tl.where(p == 0, BLOCK_R, 0)
            for r0 in range(r_begin, rank, BLOCK_R):
                offs_r = r0 + offs_r0
                r_mask = offs_r < rank
                if DELTA == 0:
                    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        offs_k = k0 + offs_k0
                        k_mask = offs_k < K
                        xt = tl.load(
                            x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
                        )
                        at = tl.load(
                            a_ptr + safe * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                            mask=k_mask[:, None] & r_mask[None, :],
                            other=0.0,
                        )
                        s = _mma(xt, at, s, DOT)
                    s = s * scale
                else:
                    s = tl.load(
                        s_ptr + (rows[:, None] * P + p) * R_BUF + offs_r[None, :],
                        mask=m_mask[:, None] & r_mask[None, :],
                        other=0.0,
                    )
                bt = tl.load(
                    b_ptr + safe * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = _mma(s.to(bt.dtype), bt, acc, DOT)

    if HAS_LOKR:
        # LoKr stage 2: out column n = pa * LC + qc takes s * sum_j w1[t, pa, j] * T[m, q, j, qc]
        pa = offs_n // LC
        qc = offs_n % LC
        for q in range(0, Q):
            t_m = tl.load(lokr_ids_ptr + rows * Q + q, mask=m_mask, other=-1)
            valid = t_m >= 0
            safe_t = tl.maximum(t_m, 0).to(tl.int64)
            ls = tl.load(lokr_scale_ptr + safe_t, mask=valid, other=0.0)
            lmask = valid[:, None] & n_mask[None, :]
            w1_rows = w1_ptr + safe_t[:, None] * stride_w1t + pa[None, :] * stride_w1a
            t_rows = t_ptr + (rows[:, None] * Q + q) * LB * LC + qc[None, :]
            for j in range(0, LB):
                w1v = tl.load(w1_rows + j * stride_w1b, mask=lmask, other=0.0)
                tv = tl.load(t_rows + j * LC, mask=lmask, other=0.0)
                acc += (ls[:, None] * w1v.to(tl.float32)) * tv

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,  # [M, K]
    a_ptr,  # [S, R, K]
    scale_ptr,  # [S] fp32
    rank_ptr,  # [S] int32
    perm_ptr,  # [M * P] int32: (row * P + p) pair of each sorted position, pairs sorted by slot
    tile_start_ptr,  # [T] int32
    tile_len_ptr,  # [T] int32
    tile_slot_ptr,  # [T] int32: the one slot of each tile's pairs (-1: nothing to do)
    s_ptr,  # [M, P, R_BUF] fp32 out: scale * x A^T
    K,
    P,
    R_BUF,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Segmented shrink: grid (pair tiles, rank blocks); a program exits early past its slot's rank."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    tile_len = tl.load(tile_len_ptr + pid_t)
    slot = tl.load(tile_slot_ptr + pid_t)
    if tile_len == 0 or slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    tile_start = tl.load(tile_start_ptr + pid_t).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < tile_len
    pairs = tl.load(perm_ptr + tile_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    rows = pairs // P
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        at = tl.load(
            a_slot + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        s = _mma(xt, at, s, DOT)
    s = s * tl.load(scale_ptr + slot)
    tl.store(s_ptr + pairs[:, None] * R_BUF + offs_r[None, :], s, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,  # [M, K]
    a_ptr,  # [S, R, K]
    scale_ptr,  # [S] fp32
    rank_ptr,  # [S] int32
    ids_ptr,  # [M, P] int32
    s_ptr,  # [M, P, R_BUF] fp32 out
    K,
    P,
    R_BUF,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per-row shrink (decode): grid (M * P, rank blocks); a GEMV on CUDA cores, fp32 accumulation."""
    pair = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    slot = tl.load(ids_ptr + pair)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    row = pair // P
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xv = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(
            a_slot + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        s += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
    s = s * tl.load(scale_ptr + slot)
    tl.store(s_ptr + pair * R_BUF + offs_r, s, mask=r_mask)


@triton.jit
def _lokr_shrink_kernel(
    x_ptr,  # [M, LB * LD]
    w2_ptr,  # [T, LC, LD]
    lokr_ids_ptr,  # [M, Q] int32
    t_ptr,  # [M, Q, LB, LC] fp32 out
    Q,
    LB,
    LC,
    LD,
    stride_xm,
    stride_xk,
    stride_w2t,
    stride_w2c,
    stride_w2d,
    DOT: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """LoKr stage 1: grid (M * Q, cdiv(LB, BLOCK_J), cdiv(LC, BLOCK_C)); T[m, q] = X_m w2[t]^T with X_m = x_m as LB x LD."""
    pair = tl.program_id(0).to(tl.int64)
    t = tl.load(lokr_ids_ptr + pair)
    if t < 0:
        return
    row = pair // Q
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = offs_j < LB
    c_mask = offs_c < LC
    w2 = w2_ptr + t.to(tl.int64) * stride_w2t
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, LD, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < LD
        xt = tl.load(
            x_ptr + row * stride_xm + (offs_j[:, None] * LD + offs_d[None, :]) * stride_xk,
            mask=j_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w2 + offs_c[None, :] * stride_w2c + offs_d[:, None] * stride_w2d,
            mask=d_mask[:, None] & c_mask[None, :],
            other=0.0,
        )
        acc = _mma(xt, wt, acc, DOT)
    out = t_ptr + pair * LB * LC + offs_j[:, None] * LC + offs_c[None, :]
    tl.store(out, acc, mask=j_mask[:, None] & c_mask[None, :])
