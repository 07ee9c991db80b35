"""Block-sparse attention backward in Triton: a dq pass that mirrors the forward (a query tile walks its
listed key blocks) and a dk/dv pass that owns a key tile and walks the query blocks listing its key block
(the transposed index, built once per call). Query heads of a GQA group are summed inside the dk/dv
program, so no atomics are used and the result is deterministic.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import transpose_index
from .triton_bsa import (
    LOG2E,
    _key_tile,
    _listed_span,
    index_views,
    launch_settings,
    num_warps,
    tile_sizes,
    tile_table,
)


@triton.jit
def _bsa_bwd_dq_kernel(
        Q, Kt, V, DO, LSE, DELTA, DQ, IDX, NUM, KOFF, KM, QT,
        sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sdo_b, sdo_n, sdo_h, sdq_b, sdq_n, sdq_h, sl_b, sl_n,
        si_b, si_h, si_m, sn_b, sn_h, skm_b, skm_n,
        Nq, Nk, HEADS_Q, HEADS_KV, HEAD_DIM, HEAD_DIM_V, k_blk_len,
        scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PACKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS_Q
    h = bh % HEADS_Q
    hk = h // (HEADS_Q // HEADS_KV)
    q_blk = tl.load(QT + 3 * t)
    row0 = tl.load(QT + 3 * t + 1)
    row1 = tl.load(QT + 3 * t + 2)

    rows = row0 + tl.arange(0, BLOCK_M)
    q_valid = rows < row1
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_n + offs_dv[None, :],
                 mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * sl_b + h + rows * sl_n, mask=q_valid, other=float('-inf')) * LOG2E
    delta = tl.load(DELTA + b * sl_b + h + rows * sl_n, mask=q_valid, other=0.0)
    row_ok = q_valid & (lse > float('-inf'))
    lse = tl.where(row_ok, lse, 0.0)

    list_ptr = IDX + b * si_b + h * si_h + q_blk * si_m
    n_listed = tl.load(NUM + b * sn_b + h * sn_h + q_blk)
    km_base = b * skm_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    if PACKED:
        n_outer = 1
    else:
        n_outer = n_listed
    for s_i in range(0, n_outer):
        start, end, bound = _listed_span(s_i, n_listed, list_ptr, KOFF, k_blk_len, PACKED)
        for j0 in range(start, end, BLOCK_N):
            tok, k_valid = _key_tile(j0, bound, list_ptr, k_blk_len, Nk, KM, km_base, skm_n,
                                     BLOCK_N, PACKED, HAS_KM)
            kb = tl.load(Kt + b * sk_b + hk * sk_h + tok[:, None] * sk_n + offs_d[None, :],
                         mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            vb = tl.load(V + b * sv_b + hk * sv_h + tok[:, None] * sv_n + offs_dv[None, :],
                         mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            if UPCAST:
                kb = kb.to(tl.float32)
                vb = vb.to(tl.float32)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            mask = row_ok[:, None] & k_valid[None, :]
            if CAUSAL:
                mask = mask & (tok[None, :] <= rows[:, None] + (Nk - Nq))
            p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _query_tile(j0, bound, LIST, q_blk_len, Nq, BLOCK_M: tl.constexpr, PACKED: tl.constexpr):
    """Query token ids and validity of the tile at virtual position ``j0`` over the listed query blocks
    (packed) or at token ``j0`` of one block ending at ``bound`` (per block)."""
    offs = tl.arange(0, BLOCK_M)
    if PACKED:
        j = j0 + offs
        listed = j < bound * q_blk_len
        blk = tl.load(LIST + j // q_blk_len, mask=listed, other=0)
        rows = blk * q_blk_len + j % q_blk_len
        valid = listed & (rows < Nq)
    else:
        rows = j0 + offs
        valid = rows < bound
    return rows, valid


@triton.jit
def _bsa_bwd_dkdv_kernel(
        Q, Kt, V, DO, LSE, DELTA, DK, DV, QIDX, QNUM, QOFF, KM, KT,
        sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sdo_b, sdo_n, sdo_h, sl_b, sl_n,
        sdk_b, sdk_n, sdk_h, sdv_b, sdv_n, sdv_h,
        si_b, si_h, si_m, sn_b, sn_h, skm_b, skm_n,
        Nq, Nk, HEADS_Q, HEADS_KV, HEAD_DIM, HEAD_DIM_V, q_blk_len,
        scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PACKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS_KV
    hk = bh % HEADS_KV
    group = HEADS_Q // HEADS_KV
    k_blk = tl.load(KT + 3 * t)
    tok0 = tl.load(KT + 3 * t + 1)
    tok1 = tl.load(KT + 3 * t + 2)

    tok = tok0 + tl.arange(0, BLOCK_N)
    k_valid = tok < tok1
    if HAS_KM:
        k_valid = k_valid & (tl.load(KM + b * skm_b + tok * skm_n, mask=k_valid, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kb = tl.load(Kt + b * sk_b + hk * sk_h + tok[:, None] * sk_n + offs_d[None, :],
                 mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    vb = tl.load(V + b * sv_b + hk * sv_h + tok[:, None] * sv_n + offs_dv[None, :],
                 mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        kb = kb.to(tl.float32)
        vb = vb.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = scale * LOG2E
    for g in range(0, group):
        h = hk * group + g
        list_ptr = QIDX + b * si_b + h * si_h + k_blk * si_m
        n_listed = tl.load(QNUM + b * sn_b + h * sn_h + k_blk)
        if PACKED:
            n_outer = 1
        else:
            n_outer = n_listed
        for s_i in range(0, n_outer):
            start, end, bound = _listed_span(s_i, n_listed, list_ptr, QOFF, q_blk_len, PACKED)
            for j0 in range(start, end, BLOCK_M):
                rows, q_valid = _query_tile(j0, bound, list_ptr, q_blk_len, Nq, BLOCK_M, PACKED)
                q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                            mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
                do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_n + offs_dv[None, :],
                             mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + b * sl_b + h + rows * sl_n, mask=q_valid, other=float('-inf')) * LOG2E
                delta = tl.load(DELTA + b * sl_b + h + rows * sl_n, mask=q_valid, other=0.0)
                row_ok = q_valid & (lse > float('-inf'))
                lse = tl.where(row_ok, lse, 0.0)
                st = tl.dot(kb, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, queries]
                mask = k_valid[:, None] & row_ok[None, :]
                if CAUSAL:
                    mask = mask & (tok[:, None] <= rows[None, :] + (Nk - Nq))
                pt = tl.where(mask, tl.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(vb, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + b * sdk_b + hk * sdk_h + tok[:, None] * sdk_n + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=(tok < tok1)[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * sdv_b + hk * sdv_h + tok[:, None] * sdv_n + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=(tok < tok1)[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


def bsa_backward_triton(
        dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, kv_indices: torch.Tensor, kv_num_blocks: Optional[torch.Tensor],
        key_mask: Optional[torch.Tensor], q_offsets: List[int], k_offsets: List[int], is_causal: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dq and dk/dv passes (``dlse``: optional gradient of the returned lse); ``(dq, dk, dv)``."""
    B, nq, hq, d = q.shape
    nk, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, dout))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * hq == 0 or nq == 0 or nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    # d lse / d logits is the softmax itself, so an lse gradient enters as a shift of delta
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    precision, upcast, wide = launch_settings(q, max(d, dv_dim))
    warps = num_warps(max(d, dv_dim))
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv_dim))
    km = key_mask.view(torch.uint8) if key_mask is not None else lse
    km_strides = key_mask.stride() if key_mask is not None else (0, 0)

    # dq: query tiles over their listed key blocks, as the forward
    block_m, block_n, k_uniform = tile_sizes(q_offsets, k_offsets, kv_indices.shape[-1], wide)
    q_tiles = tile_table(q_offsets, block_m, q.device)
    idx, num = index_views(kv_indices, kv_num_blocks, B, hq)
    koff = torch.tensor(k_offsets, dtype=torch.int32, device=q.device)
    _bsa_bwd_dq_kernel[(q_tiles.shape[0], B * hq)](
        q, k, v, dout, lse, delta, dq, idx, num, koff, km, q_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2), num.stride(0), num.stride(1), *km_strides,
        nq, nk, hq, hkv, d, dv_dim, k_uniform if k_uniform is not None else 0,
        scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PACKED=k_uniform is not None, CAUSAL=is_causal, HAS_KM=key_mask is not None,
        PRECISION=precision, UPCAST=upcast, num_warps=warps,
    )

    # dk/dv: key tiles over the query blocks that list their key block (transposed index)
    num_k_blocks = len(k_offsets) - 1
    q_idx, q_num = transpose_index(kv_indices, kv_num_blocks, num_k_blocks)
    q_idx, q_num = index_views(q_idx, q_num, B, hq)
    block_n, block_m, q_uniform = tile_sizes(k_offsets, q_offsets, q_idx.shape[-1], wide)
    k_tiles = tile_table(k_offsets, block_n, q.device)
    qoff = torch.tensor(q_offsets, dtype=torch.int32, device=q.device)
    _bsa_bwd_dkdv_kernel[(k_tiles.shape[0], B * hkv)](
        q, k, v, dout, lse, delta, dk, dv, q_idx, q_num, qoff, km, k_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
        dv.stride(2), q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), q_num.stride(0), q_num.stride(1),
        *km_strides,
        nq, nk, hq, hkv, d, dv_dim, q_uniform if q_uniform is not None else 0,
        scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PACKED=q_uniform is not None, CAUSAL=is_causal, HAS_KM=key_mask is not None,
        PRECISION=precision, UPCAST=upcast, num_warps=warps,
    )
    return dq, dk, dv
