"""Softmax attention of a chunk over its cached window, dense or block-sparse top-k.

Sparse selection follows Hybrid Forcing / SLA (https://arxiv.org/abs/2509.24006): queries and mean-centred keys
are mean-pooled over 1-D token blocks (blocks straddle frames), each query block keeps the ``ratio`` share of key
blocks with the highest pooled score (the same count for every query block, nothing forced in), and softmax runs
over the kept blocks only, on the project's block-sparse kernel. ``ratio=1`` keeps every block and equals dense.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels.block_sparse import block_sparse_attention, uniform_offsets

__all__ = ['window_attention', 'select_key_blocks']


def _pool_blocks(x: Tensor, block_size: int, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``x`` ``[B, N, H, D]`` over consecutive blocks (last one shorter), ignoring masked tokens."""
    B, N, H, D = x.shape
    nb = -(-N // block_size)
    weight = x.new_ones(B, N) if mask is None else mask.to(x.dtype)
    pad = nb * block_size - N
    xw = F.pad(x * weight[..., None, None], (0, 0, 0, 0, 0, pad)).reshape(B, nb, block_size, H, D).sum(2)
    count = F.pad(weight, (0, pad)).reshape(B, nb, block_size).sum(2)
    return xw / count.clamp_min(1)[..., None, None], count


def select_key_blocks(q: Tensor, k: Tensor, ratio: float, block_size: int, key_mask: Optional[Tensor] = None):
    """Top-``ratio`` key blocks per query block: ``(kv_indices [B, H, Mq, slots], kv_num_blocks [B, H, Mq])``.

    The kept count is ``max(1, floor(ratio * valid key blocks))`` per row, blocks with no visible key last.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio (kept share of key blocks) must lie in (0, 1], got {ratio}")
    kf = k.float()
    if key_mask is None:
        centre = kf.mean(1, keepdim=True)
    else:
        w = key_mask.to(kf.dtype)[..., None, None]
        centre = (kf * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
    pooled_q, _ = _pool_blocks(q.float(), block_size, None)
    pooled_k, count = _pool_blocks(kf - centre, block_size, key_mask)
    score = torch.einsum('bmhd,bnhd->bhmn', pooled_q, pooled_k)
    valid = (count > 0)[:, None, None, :]  # [B, 1, 1, Mk]
    score = score.masked_fill(~valid, float('-inf'))
    n_valid = valid.sum(-1)  # [B, 1, 1]
    slots = max(1, math.floor(ratio * pooled_k.shape[1]))
    kv_indices = score.topk(slots, dim=-1).indices.to(torch.int32)
    kv_num_blocks = (n_valid * ratio).floor().clamp(1, slots).to(torch.int32).expand(*score.shape[:3])
    return kv_indices, kv_num_blocks.contiguous()


def window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None,
                     sparsity_ratio: Optional[float] = None, block_size: int = 64, backend: str = 'auto') -> Tensor:
    """Bidirectional attention of ``q`` ``[B, Nq, H, D]`` over ``k``/``v`` ``[B, Nk, H, D]`` (``key_mask`` [B, Nk]).

    ``sparsity_ratio=None`` runs dense attention (PyTorch SDPA); a float in (0, 1] runs top-k block-sparse
    attention with that share of key blocks kept.
    """
    if sparsity_ratio is None:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    kv_indices, kv_num_blocks = select_key_blocks(q, k, sparsity_ratio, block_size, key_mask)
    q_offsets, k_offsets = uniform_offsets(q.shape[1], block_size), uniform_offsets(k.shape[1], block_size)
    return block_sparse_attention(q, k, v, kv_indices, kv_num_blocks, q_block_offsets=q_offsets,
                                  k_block_offsets=k_offsets, key_mask=key_mask, validate_index=False, backend=backend)
