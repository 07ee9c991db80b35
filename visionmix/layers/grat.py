"""GRAT: Grouping first, ATtending smartly, on the shared block-sparse attention op.

Paper: `Grouping First, Attending Smartly: Training-Free Acceleration for Diffusion Transformers`,
https://arxiv.org/abs/2505.14687.
Official code (HunyuanVideo, GRAT-X only): https://github.com/OliverRensu/GRAT.

The image token grid (``(H, W)`` or ``(T, H, W)``, raster order) is cut into non-overlapping groups of
``group_size`` tokens and reordered group-major (the official ``clusterify`` order ``(t', h', w', pt, ph, pw)``),
so each group is one contiguous block. Every query of a group attends to the same key groups:

* ``'B'`` (surrounding blocks): groups within Chebyshev radius ``radius`` on the group grid, window clipped at
  the border (the paper's formula; the released code has no GRAT-B);
* ``'X'`` (criss-cross): groups sharing any one group coordinate with the query group, i.e. the same group row
  or column in 2-D and the union of the three planes in 3-D, as the official code builds it.

Extra tokens (text in joint-attention DiTs, cls/register tokens in ViTs) form one dense block: they attend to
every token and every token attends to them. Text keys at or past ``attenable_text`` (prompt padding) are hidden
from every query. Text comes first for Flux-style models and after the image for HunyuanVideo-style models.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from visionmix.kernels.block_sparse import block_sparse_attention

__all__ = ['GratIndex', 'grat_index', 'grat_attention', 'grat_group_mask', 'group_permutation', 'grat_dense_mask']

MODES = ('B', 'X')


@dataclass(frozen=True)
class GratIndex:
    """Everything :func:`~visionmix.kernels.block_sparse.block_sparse_attention` needs for one GRAT pattern.

    Block ``i`` of the grouped sequence holds tokens ``offsets[i]:offsets[i + 1]`` (used for queries and keys).
    ``perm[j]`` is the original index of grouped position ``j`` (``x_grouped = x[:, perm]``), ``inv_perm`` undoes
    it. ``key_mask`` (``[1, N]``, grouped order) is None when every key is valid.
    """
    perm: Tensor
    inv_perm: Tensor
    kv_indices: Tensor
    kv_num_blocks: Tensor
    offsets: Tuple[int, ...]
    key_mask: Optional[Tensor]
    group_mask: Tensor
    num_groups: int
    text_block: Optional[int]
    identity_perm: bool


def _as_tuple(value, rank: int, name: str) -> Tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(values) != rank or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or {rank} ints, got {value!r}")
    return tuple(int(v) for v in values)


def _check_grid(grid, group_size) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3):
        raise ValueError(f"grid must be (H, W) or (T, H, W) token counts, got {grid!r}")
    grid = _as_tuple(grid, len(grid), 'grid')
    group_size = _as_tuple(group_size, len(grid), 'group_size')
    if min(grid) < 1 or min(group_size) < 1:
        raise ValueError(f"grid {grid} and group_size {group_size} must be positive")
    if any(n % g for n, g in zip(grid, group_size)):
        # as in the official code (a reshape); crop or pick a resolution whose latent grid divides
        raise ValueError(f"every grid dimension must be divisible by the group size: grid {grid}, "
                         f"group_size {group_size}")
    return grid, group_size, tuple(n // g for n, g in zip(grid, group_size))


def group_permutation(grid: Sequence[int], group_size: Union[int, Sequence[int]]) -> Tensor:
    """``[prod(grid)]`` raster index of each grouped position: the official ``clusterify`` order."""
    grid, group_size, groups = _check_grid(grid, group_size)
    interleaved = [d for pair in zip(groups, group_size) for d in pair]  # (T', gt, H', gh, W', gw)
    rank = len(grid)
    order = list(range(0, 2 * rank, 2)) + list(range(1, 2 * rank, 2))
    return torch.arange(torch.Size(grid).numel(), device='cpu').reshape(interleaved).permute(order).flatten()


def grat_group_mask(group_grid: Sequence[int], mode: str = 'B', radius: Union[int, Sequence[int]] = 1) -> Tensor:
    """``[G, G]`` bool, query group x key group, groups numbered in raster order of the group grid."""
    mode = _check_mode(mode)
    with torch.device('cpu'):  # also inside a meta-device context (models built on 'meta')
        return _group_mask(group_grid, mode, radius)


def _group_mask(group_grid, mode, radius):
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in group_grid], indexing='ij'), -1).flatten(0, -2)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()  # [G, G, rank]
    if mode == 'X':
        return (diff == 0).any(-1)
    radius = torch.tensor(_as_tuple(radius, len(group_grid), 'radius'))
    if bool((radius < 0).any()):
        raise ValueError(f"radius must be >= 0, got {radius.tolist()}")
    return (diff <= radius).all(-1)


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode.upper() not in MODES:
        raise ValueError(f"mode must be 'B' (surrounding blocks) or 'X' (criss-cross), got {mode!r}")
    return mode.upper()


@lru_cache(maxsize=64)
def _build_index(grid, group_size, mode, radius, text_tokens, text_first, attenable_text, device) -> GratIndex:
    with torch.device('cpu'):  # built on the host (also inside a meta-device context), then moved
        return _build_index_cpu(grid, group_size, mode, radius, text_tokens, text_first, attenable_text, device)


def _build_index_cpu(grid, group_size, mode, radius, text_tokens, text_first, attenable_text, device) -> GratIndex:
    grid, group_size, groups = _check_grid(grid, group_size)
    n_img, group_len = torch.Size(grid).numel(), torch.Size(group_size).numel()
    num_groups = torch.Size(groups).numel()
    gmask = grat_group_mask(groups, mode, radius)
    img_perm = group_permutation(grid, group_size)
    text = torch.arange(text_tokens)
    group_blocks = torch.arange(num_groups)
    group_starts = [i * group_len for i in range(num_groups + 1)]
    if text_tokens == 0:
        perm, offsets, text_block = img_perm, group_starts, None
    elif text_first:
        perm = torch.cat([text, text_tokens + img_perm])
        offsets = [0] + [text_tokens + s for s in group_starts]
        group_blocks, text_block = group_blocks + 1, 0
    else:
        perm = torch.cat([img_perm, n_img + text])
        offsets = group_starts + [n_img + text_tokens]
        text_block = num_groups
    num_blocks = len(offsets) - 1

    # block-level mask [blocks, blocks]: groups by the GRAT rule, the text block dense in both directions
    blocks = torch.ones(num_blocks, num_blocks, dtype=torch.bool)
    blocks[group_blocks[:, None], group_blocks[None, :]] = gmask
    counts = blocks.sum(-1).to(torch.int32)
    # ascending key-block ids first, padding (block 0) after kv_num_blocks
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    slots = int(counts.max())
    kv_indices = torch.where(torch.arange(slots) < counts[:, None].long(), order[:, :slots], 0).to(torch.int32)

    key_mask = None
    if attenable_text is not None and attenable_text < text_tokens:
        key_mask = torch.ones(1, len(perm), dtype=torch.bool)
        start = 0 if text_first else n_img
        key_mask[:, start + attenable_text:start + text_tokens] = False
    inv_perm = torch.argsort(perm)
    return GratIndex(
        perm=perm.to(device), inv_perm=inv_perm.to(device), kv_indices=kv_indices[None, None].to(device),
        kv_num_blocks=counts[None, None].to(device), offsets=tuple(offsets),
        key_mask=None if key_mask is None else key_mask.to(device), group_mask=gmask, num_groups=num_groups,
        text_block=text_block, identity_perm=bool((perm == torch.arange(len(perm))).all()))


def grat_index(
        grid: Sequence[int],
        group_size: Union[int, Sequence[int]],
        mode: str = 'B',
        radius: Union[int, Sequence[int]] = 1,
        text_tokens: int = 0,
        text_first: bool = False,
        attenable_text: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
) -> GratIndex:
    """The block-sparse index of a GRAT pattern (cached per grid, group, mode, radius, text and device).

    Args:
        grid: image token grid ``(H, W)`` or ``(T, H, W)``; every dim divisible by ``group_size``.
        group_size: tokens per group along each grid dim (an int for all dims).
        mode: ``'B'`` (surrounding blocks within ``radius``) or ``'X'`` (criss-cross; ``radius`` unused).
        radius: GRAT-B radius on the group grid (an int or one per dim).
        text_tokens: extra tokens (text, cls/register) forming one dense block.
        text_first: extra tokens before the image (Flux, ViT prefix tokens) or after it (HunyuanVideo).
        attenable_text: number of valid extra tokens; keys past it are hidden from every query.
    """
    grid, group_size, _ = _check_grid(grid, group_size)  # normalised, so equal patterns share a cache entry
    radius = _as_tuple(radius, len(grid), 'radius')
    mode = _check_mode(mode)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    if attenable_text is not None:
        if isinstance(attenable_text, bool) or not isinstance(attenable_text, int) \
                or not 0 <= attenable_text <= text_tokens:
            raise ValueError(f"attenable_text must be an int in [0, text_tokens = {text_tokens}], "
                             f"got {attenable_text!r}")
    device = torch.device('cpu' if device is None else device)
    return _build_index(grid, group_size, mode, radius, int(text_tokens), bool(text_first),
                        None if attenable_text is None else int(attenable_text), device)


def grat_dense_mask(*args, **kwargs) -> Tensor:
    """``[N, N]`` bool (query x key, original token order) of the pattern :func:`grat_index` builds; for
    references and tests (it materialises ``N^2`` entries)."""
    from visionmix.kernels.block_sparse import block_sparse_mask

    idx = grat_index(*args, **kwargs)
    mask = block_sparse_mask(idx.kv_indices, idx.kv_num_blocks, idx.offsets, idx.offsets, idx.key_mask)[0, 0]
    return mask[idx.inv_perm][:, idx.inv_perm]


def grat_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        grid: Sequence[int],
        group_size: Union[int, Sequence[int]],
        mode: str = 'B',
        radius: Union[int, Sequence[int]] = 1,
        text_tokens: int = 0,
        text_first: bool = False,
        attenable_text: Optional[int] = None,
        key_mask: Optional[Tensor] = None,
        scale: Optional[float] = None,
        return_lse: bool = False,
        backend: str = 'auto',
):
    """GRAT attention of heads-last ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]`` in the original token order.

    ``N = prod(grid) + text_tokens``; the image tokens are in raster order, the text block before them
    (``text_first``) or after. ``key_mask [B, N]`` (bool, original order, False = hidden) is combined with
    ``attenable_text``; the other arguments are those of :func:`grat_index`. Returns ``out [B, N, Hq, Dv]``
    (and ``lse [B, N, Hq]`` float32 with ``return_lse``).
    """
    if not all(torch.is_tensor(t) and t.dim() == 4 for t in (q, k, v)):
        raise ValueError('q, k and v must be tensors [batch, tokens, heads, head_dim]')
    idx = grat_index(grid, group_size, mode, radius, text_tokens, text_first, attenable_text, device=q.device)
    if q.shape[1] != idx.offsets[-1] or k.shape[1] != idx.offsets[-1]:
        raise ValueError(f"q and k must hold prod(grid) + text_tokens = {idx.offsets[-1] - text_tokens} + "
                         f"{text_tokens} tokens for grid {tuple(grid)}, got {q.shape[1]} and {k.shape[1]}")
    if q.is_meta:  # shape-only pass (timm's meta-device model tests)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        return (out, q.new_empty(q.shape[:3], dtype=torch.float32)) if return_lse else out
    mask = idx.key_mask
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != tuple(k.shape[:2]):
            raise ValueError(f"key_mask must be a bool tensor [batch, tokens] = {tuple(k.shape[:2])}, "
                             f"got {tuple(key_mask.shape)} {key_mask.dtype}")
        key_mask = key_mask if idx.identity_perm else key_mask[:, idx.perm]
        mask = key_mask if mask is None else key_mask & mask
    if mask is not None:
        mask = mask.expand(q.shape[0], -1).contiguous()
    if not idx.identity_perm:
        q, k, v = (t.index_select(1, idx.perm) for t in (q, k, v))
    res = block_sparse_attention(
        q, k, v, idx.kv_indices, idx.kv_num_blocks, q_block_offsets=idx.offsets, k_block_offsets=idx.offsets,
        key_mask=mask, scale=scale, return_lse=return_lse, validate_index=False, backend=backend)
    if idx.identity_perm:
        return res
    if return_lse:
        out, lse = res
        return out.index_select(1, idx.inv_perm), lse.index_select(1, idx.inv_perm)
    return res.index_select(1, idx.inv_perm)
