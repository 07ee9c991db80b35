"""Block-sparse attention in plain PyTorch: the definition of the op.

Tokens are split into contiguous blocks by a block table (``offsets``: block ``i`` holds tokens
``offsets[i]:offsets[i + 1]``). Every query block lists the key blocks it attends to
(``kv_indices[b, h, i, :kv_num_blocks[b, h, i]]``, FlexAttention's layout; batch and head dims may be 1
to share the index). Inside the listed blocks a key is visible unless ``key_mask`` is False for it or, with
``is_causal``, it lies after the query (bottom-right aligned when there are more keys than queries).
A query that sees no key gets a zero output and ``lse = -inf``.

``block_sparse_attention_reference`` gathers the keys of every query block, as routed-attention models
(BiFormer) do in their own code; ``block_sparse_mask`` expands the index to the dense ``[Nq, Nk]`` mask
for tests and for dense / FlexAttention comparisons.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['block_sparse_attention_reference', 'block_sparse_mask', 'uniform_offsets', 'block_token_table',
           'transpose_index']


def uniform_offsets(num_tokens: int, block_size: int) -> Tuple[int, ...]:
    """Block table of ``ceil(num_tokens / block_size)`` blocks of ``block_size`` tokens (the last may be short)."""
    return tuple(range(0, num_tokens, block_size)) + (num_tokens,)


def block_token_table(offsets: Sequence[int], device=None) -> Tensor:
    """``[num_blocks, max_block_len]`` token ids of each block, ``-1`` past a block's end."""
    offsets = [int(x) for x in offsets]
    width = max([b - a for a, b in zip(offsets[:-1], offsets[1:])] + [1])  # from the host list: meta tensors work
    offsets = torch.as_tensor(offsets, dtype=torch.long, device=device)
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(width, device=device)
    table = offsets[:-1, None] + pos
    return torch.where(pos < lengths[:, None], table, -1)


def _valid_slots(kv_indices: Tensor, kv_num_blocks: Optional[Tensor]) -> Tensor:
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    if kv_num_blocks is None:
        return torch.ones_like(kv_indices, dtype=torch.bool)
    return slots < kv_num_blocks[..., None]


def block_sparse_mask(
        kv_indices: Tensor, kv_num_blocks: Optional[Tensor], q_offsets: Sequence[int], k_offsets: Sequence[int],
        key_mask: Optional[Tensor] = None, is_causal: bool = False,
) -> Tensor:
    """Dense boolean mask ``[Bi|B, Hi, Nq, Nk]`` (True = attend) equal to the block-sparse pattern."""
    device = kv_indices.device
    nq, nk = q_offsets[-1], k_offsets[-1]
    num_k_blocks = len(k_offsets) - 1
    valid = _valid_slots(kv_indices, kv_num_blocks)
    block_mask = torch.zeros(*kv_indices.shape[:3], num_k_blocks + 1, dtype=torch.bool, device=device)
    block_mask.scatter_(-1, torch.where(valid, kv_indices.long(), num_k_blocks), True)
    block_mask = block_mask[..., :num_k_blocks]
    q_block_of = torch.repeat_interleave(torch.arange(len(q_offsets) - 1, device=device),
                                         torch.as_tensor(list(q_offsets), device=device).diff(), output_size=nq)
    k_block_of = torch.repeat_interleave(torch.arange(num_k_blocks, device=device),
                                         torch.as_tensor(list(k_offsets), device=device).diff(), output_size=nk)
    mask = block_mask[:, :, q_block_of][..., k_block_of]
    if is_causal:
        causal = torch.arange(nk, device=device)[None, :] <= torch.arange(nq, device=device)[:, None] + (nk - nq)
        mask = mask & causal
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return mask


def transpose_index(
        kv_indices: Tensor, kv_num_blocks: Optional[Tensor], num_k_blocks: int,
) -> Tuple[Tensor, Tensor]:
    """For every key block, the query blocks that list it: ``(q_indices [Bi, Hi, Mk, Mq], q_num_blocks
    [Bi, Hi, Mk])``, ascending, padded with ``0`` past ``q_num_blocks``. The backward pass walks these."""
    valid = _valid_slots(kv_indices, kv_num_blocks)
    block_mask = torch.zeros(*kv_indices.shape[:3], num_k_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    block_mask.scatter_(-1, torch.where(valid, kv_indices.long(), num_k_blocks), True)
    transposed = block_mask[..., :num_k_blocks].transpose(-1, -2)  # [Bi, Hi, Mk, Mq]
    counts = transposed.sum(-1, dtype=torch.int32)
    order = torch.sort(transposed.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = torch.where(torch.arange(order.shape[-1], device=order.device) < counts[..., None], order, 0)
    return order.to(torch.int32), counts


def _dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, acc: torch.dtype):
    group = q.shape[2] // k.shape[2]
    kh = k.to(acc).repeat_interleave(group, dim=2)
    vh = v.to(acc).repeat_interleave(group, dim=2)
    logits = torch.einsum('bqhd,bkhd->bhqk', q.to(acc), kh) * scale
    logits = logits.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    out = torch.einsum('bhqk,bkhd->bqhd', probs, vh)
    return out.to(q.dtype), lse.permute(0, 2, 1).float()


def block_sparse_attention_reference(
        q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_num_blocks: Optional[Tensor],
        q_offsets: Sequence[int], k_offsets: Sequence[int], key_mask: Optional[Tensor] = None,
        is_causal: bool = False, scale: Optional[float] = None, gather: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """``(out [B, Nq, Hq, Dv], lse [B, Nq, Hq] float32)`` for heads-last ``q [B, Nq, Hq, D]``,
    ``k [B, Nk, Hkv, D]``, ``v [B, Nk, Hkv, Dv]`` (``Hq`` a multiple of ``Hkv``).

    Each query block's listed key blocks are gathered (memory ``B*Hq*Nq*listed_keys*D``, the footprint of
    the original routed-attention code) and attended with a masked softmax in float32 (float64 inputs
    stay float64). When the padded lists would gather more than all keys (one dense row among sparse ones),
    the dense masked softmax is computed instead (``gather`` forces one way).
    """
    B, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if scale is None else scale
    device = q.device
    q_longest = max(b - a for a, b in zip(q_offsets[:-1], q_offsets[1:]))
    k_longest = max(b - a for a, b in zip(k_offsets[:-1], k_offsets[1:]))
    if gather is None:
        gather = (len(q_offsets) - 1) * q_longest * kv_indices.shape[-1] * k_longest <= nq * nk
    if not gather:
        # padded lists (a dense text row, say) would gather more than every key: the dense masked form is cheaper
        mask = block_sparse_mask(kv_indices, kv_num_blocks, q_offsets, k_offsets, key_mask, is_causal)
        return _dense_masked_attention(q, k, v, mask, scale, acc)
    q_tok = block_token_table(q_offsets, device)  # [Mq, Lq]
    k_tok = block_token_table(k_offsets, device)  # [Mk, Lk]
    mq, lq = q_tok.shape
    idx = kv_indices.long().expand(B, hq, -1, -1)  # [B, Hq, Mq, S]
    slots = _valid_slots(kv_indices, kv_num_blocks).expand(B, hq, -1, -1)
    keys = k_tok[idx.clamp(0, k_tok.shape[0] - 1)]  # [B, Hq, Mq, S, Lk] token ids
    visible = slots[..., None] & (keys >= 0)
    keys = keys.clamp_min(0).flatten(-2)  # [B, Hq, Mq, S*Lk]
    visible = visible.flatten(-2)
    if key_mask is not None:
        visible = visible & torch.gather(key_mask[:, None, None, :].expand(B, hq, mq, nk), -1, keys)

    group = hq // hkv
    kh = k.to(acc).permute(0, 2, 1, 3).repeat_interleave(group, dim=1)  # [B, Hq, Nk, D]
    vh = v.to(acc).permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    flat = keys.flatten(2)  # [B, Hq, Mq*S*Lk]
    k_sel = torch.gather(kh, 2, flat[..., None].expand(-1, -1, -1, d)).unflatten(2, keys.shape[2:])
    v_sel = torch.gather(vh, 2, flat[..., None].expand(-1, -1, -1, vh.shape[-1])).unflatten(2, keys.shape[2:])

    q_rows = q_tok.clamp_min(0)  # padded rows compute garbage that is dropped below
    qh = q.to(acc).permute(0, 2, 1, 3)[:, :, q_rows]  # [B, Hq, Mq, Lq, D]
    logits = torch.einsum('bhmld,bhmsd->bhmls', qh, k_sel) * scale
    mask = visible[:, :, :, None, :].expand(-1, -1, -1, lq, -1)
    if is_causal:
        mask = mask & (keys[:, :, :, None, :] <= q_rows[None, None, :, :, None] + (nk - nq))
    logits = logits.masked_fill(~mask, float('-inf'))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, Mq, Lq]
    probs = torch.exp(logits - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    out = torch.einsum('bhmls,bhmsd->bhmld', probs, v_sel)

    # blocks are consecutive token ranges, so the valid rows of the [blocks x longest] layout, in order, are 0..Nq-1
    starts = list(q_offsets)
    keep = torch.tensor([i * lq + j for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])) for j in range(b - a)],
                        dtype=torch.long, device=device)
    out_full = out.flatten(2, 3)[:, :, keep]
    lse_full = lse.flatten(2, 3)[:, :, keep]
    return out_full.permute(0, 2, 1, 3).to(q.dtype), lse_full.permute(0, 2, 1).float()
