"""Block-sparse attention forward in Triton.

A program owns one query tile (rows of a single query block) of one (batch, head) and walks the key blocks
that block lists, with an online softmax. Keys are visited in one of two ways:

* packed (every key block has the same length): the listed blocks are read as one virtual sequence of
  ``slots * block_len`` tokens, so tiles span several tiny blocks (BiFormer's 4-64-token regions) or sit
  inside one large block (video groups) alike;
* per block (block table of any lengths): each listed block is tiled on its own.

No gathered key/value copy and no attention matrix is written to global memory.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_mode

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _key_tile(j0, n_listed, LIST, blk_len, Nk, KM, km_base, sk_tok,
              BLOCK_N: tl.constexpr, PACKED: tl.constexpr, HAS_KM: tl.constexpr):
    """Token ids and validity of the key tile starting at virtual position ``j0`` (packed mode) or at token
    ``j0`` (per-block mode, where ``n_listed`` is the block's end)."""
    offs = tl.arange(0, BLOCK_N)
    if PACKED:
        j = j0 + offs
        slot = j // blk_len
        listed = j < n_listed * blk_len
        blk = tl.load(LIST + slot, mask=listed, other=0)
        tok = blk * blk_len + j % blk_len
        valid = listed & (tok < Nk)
    else:
        tok = j0 + offs
        valid = tok < n_listed
    if HAS_KM:
        valid = valid & (tl.load(KM + km_base + tok * sk_tok, mask=valid, other=0) != 0)
    return tok, valid


@triton.jit
def _listed_span(s_i, n_listed, LIST, OFF, blk_len, PACKED: tl.constexpr):
    """``(start, end, bound)`` walked for list entry ``s_i``: the whole packed virtual sequence (bound = entries
    listed), or the tokens of one listed block (bound = its end token)."""
    if PACKED:
        start = 0
        end = n_listed * blk_len
        bound = n_listed
    else:
        blk = tl.load(LIST + s_i)
        start = tl.load(OFF + blk)
        end = tl.load(OFF + blk + 1)
        bound = end
    return start, end, bound


@triton.jit
def _bsa_fwd_kernel(
        Q, Kt, V, Out, LSE, IDX, NUM, KOFF, KM, QT,
        sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, so_b, so_n, so_h, sl_b, sl_n,
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
    if UPCAST:
        q = q.to(tl.float32)

    list_ptr = IDX + b * si_b + h * si_h + q_blk * si_m
    n_listed = tl.load(NUM + b * sn_b + h * sn_h + q_blk)
    km_base = b * skm_b
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
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
            if UPCAST:
                kb = kb.to(tl.float32)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            mask = q_valid[:, None] & k_valid[None, :]
            if CAUSAL:
                mask = mask & (tok[None, :] <= rows[:, None] + (Nk - Nq))
            s = tl.where(mask, s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(V + b * sv_b + hk * sv_h + tok[:, None] * sv_n + offs_dv[None, :],
                         mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            if UPCAST:
                vb = vb.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float('-inf'))
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_n + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b * sl_b + h + rows * sl_n, lse, mask=q_valid)


def tile_table(offsets: List[int], block_m: int, device) -> torch.Tensor:
    """``[tiles, 3]`` int32 rows ``(block, first token, end token)``: each block cut into tiles of ``block_m``."""
    rows = []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows.extend((i, s, min(s + block_m, b)) for s in range(a, b, block_m))
    return torch.tensor(rows, dtype=torch.int32, device=device)


def uniform_length(offsets: List[int]) -> Optional[int]:
    """The common block length when every block but the last has it and the last is not longer."""
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    first = lengths[0]
    if all(n == first for n in lengths[:-1]) and lengths[-1] <= first:
        return first
    return None


def pow2_tile(longest: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(longest)))


def tile_sizes(own_offsets: List[int], listed_offsets: List[int], slots: int, wide: bool):
    """``(own_tile, listed_tile, listed_len)`` for a pass whose programs own tiles of ``own_offsets`` blocks and
    walk listed blocks of ``listed_offsets``: ``listed_len`` is their common length when uniform (packed walk),
    else None (per-block walk)."""
    cap = 32 if wide else 64
    own_tile = pow2_tile(max(b - a for a, b in zip(own_offsets[:-1], own_offsets[1:])), cap)
    listed_len = uniform_length(listed_offsets)
    if listed_len is not None:
        listed_tile = pow2_tile(listed_len * max(1, slots), cap)
    else:
        listed_tile = pow2_tile(max(b - a for a, b in zip(listed_offsets[:-1], listed_offsets[1:])), cap)
    return own_tile, listed_tile, listed_len


def num_warps(head_dim: int) -> int:
    if interpreter_mode():
        return 1
    return 4 if head_dim <= 64 else 8


def launch_settings(q: torch.Tensor, head_dim: int):
    """``(precision, upcast, wide)`` shared by the forward and backward launches."""
    precision = 'ieee' if q.dtype == torch.float32 else 'tf32'
    # Triton's CPU interpreter computes bf16 dots wrongly; fp32 dots of bf16 values give what tensor cores give
    upcast = interpreter_mode() and q.dtype == torch.bfloat16
    return precision, upcast, head_dim > 128


def index_views(kv_indices: torch.Tensor, kv_num_blocks: Optional[torch.Tensor], batch: int, heads: int):
    """int32 index and counts broadcast to ``[batch, heads, ...]`` (stride 0 on shared dims)."""
    idx = kv_indices.to(torch.int32)
    if kv_num_blocks is None:
        num = torch.full(idx.shape[:3], idx.shape[-1], dtype=torch.int32, device=idx.device)
    else:
        num = kv_num_blocks.to(torch.int32)
    if idx.shape[-1] == 0:  # no slots: a one-slot list that is never read
        idx = idx.new_zeros(*idx.shape[:3], 1)
    return idx.expand(batch, heads, -1, -1), num.expand(batch, heads, -1)


def bsa_forward_triton(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
        kv_num_blocks: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], q_offsets: List[int],
        k_offsets: List[int], is_causal: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; arguments already validated. Returns ``(out, lse)``."""
    B, nq, hq, d = q.shape
    nk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty(B, nq, hq, dv)
    lse = torch.empty(B, nq, hq, device=q.device, dtype=torch.float32)
    if B * nq * hq == 0:
        return out, lse
    precision, upcast, wide = launch_settings(q, max(d, dv))
    block_m, block_n, k_len = tile_sizes(q_offsets, k_offsets, kv_indices.shape[-1], wide)
    tiles = tile_table(q_offsets, block_m, q.device)
    idx, num = index_views(kv_indices, kv_num_blocks, B, hq)
    koff = torch.tensor(k_offsets, dtype=torch.int32, device=q.device)
    km = key_mask.view(torch.uint8) if key_mask is not None else koff
    km_strides = key_mask.stride() if key_mask is not None else (0, 0)
    _bsa_fwd_kernel[(tiles.shape[0], B * hq)](
        q, k, v, out, lse, idx, num, koff, km, tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2), num.stride(0), num.stride(1), *km_strides,
        nq, nk, hq, hkv, d, dv, k_len if k_len is not None else 0,
        scale,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        PACKED=k_len is not None, CAUSAL=is_causal, HAS_KM=key_mask is not None,
        PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps(max(d, dv)),
    )
    return out, lse
