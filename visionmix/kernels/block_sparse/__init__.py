"""Block-sparse attention: every routed or grouped pattern (BiFormer regions, GRAT groups, VMoBA/MoBA
blocks, sliding windows) as per-query-block lists of key blocks.

``block_sparse_attention(q, k, v, kv_indices, kv_num_blocks, block_size=...)`` takes heads-last tensors
``[B, N, heads, head_dim]``; the index uses FlexAttention's ``kv_indices`` / ``kv_num_blocks`` layout. See
``reference.py`` for the exact rule.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._backend import resolve_backend, triton_dtype_ok
from .reference import (
    block_sparse_attention_reference,
    block_sparse_mask,
    block_token_table,
    transpose_index,
    uniform_offsets,
)

__all__ = ['block_sparse_attention', 'block_sparse_attention_reference', 'block_sparse_mask', 'uniform_offsets',
           'block_token_table', 'transpose_index']


def _offsets(name: str, offsets, num_tokens: int) -> List[int]:
    if torch.is_tensor(offsets):
        if offsets.dim() != 1 or offsets.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer sequence of block starts, got {tuple(offsets.shape)} "
                             f"{offsets.dtype}")
        offsets = offsets.tolist()
    offsets = [int(x) for x in offsets]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_tokens:
        raise ValueError(f"{name} must start at 0 and end at the token count {num_tokens}, got "
                         f"{offsets[:3]}...{offsets[-2:]} ({len(offsets)} entries)")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be strictly increasing (every block holds at least one token)")
    return offsets


def _block_tables(block_size, q_block_offsets, k_block_offsets, nq: int, nk: int) -> Tuple[List[int], List[int]]:
    if block_size is not None:
        if q_block_offsets is not None or k_block_offsets is not None:
            raise ValueError('give either block_size or q_block_offsets/k_block_offsets, not both')
        sizes = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
        if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"block_size must be a positive int or a (query, key) pair of them, got {block_size!r}")
        return list(uniform_offsets(nq, sizes[0])), list(uniform_offsets(nk, sizes[1]))
    if q_block_offsets is None or k_block_offsets is None:
        raise ValueError('block_size, or both q_block_offsets and k_block_offsets, must be given')
    return _offsets('q_block_offsets', q_block_offsets, nq), _offsets('k_block_offsets', k_block_offsets, nk)


def check_args(q, k, v, kv_indices, kv_num_blocks, q_offsets, k_offsets, key_mask, validate_index: bool) -> None:
    """Validate a ``block_sparse_attention`` call; raises ValueError naming the argument and the constraint."""
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must have layout [batch, tokens, heads, head_dim], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share batch, tokens and heads, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share batch and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads of q ({q.shape[2]}) must be a multiple of heads of k/v ({k.shape[2]})")
    num_q_blocks, num_k_blocks = len(q_offsets) - 1, len(k_offsets) - 1
    if not torch.is_tensor(kv_indices) or kv_indices.dim() != 4 or kv_indices.is_floating_point():
        shape = tuple(kv_indices.shape) if torch.is_tensor(kv_indices) else type(kv_indices).__name__
        raise ValueError(f"kv_indices must be an integer tensor [batch or 1, heads or 1, query_blocks, slots], "
                         f"got {shape}")
    bi, hi, mq, _ = kv_indices.shape
    if bi not in (1, q.shape[0]) or hi not in (1, q.shape[2]) or mq != num_q_blocks:
        raise ValueError(f"kv_indices must be [1 or batch ({q.shape[0]}), 1 or heads of q ({q.shape[2]}), "
                         f"query blocks ({num_q_blocks}), slots], got {tuple(kv_indices.shape)}")
    if kv_indices.device != q.device:
        raise ValueError(f"kv_indices must be on the device of q ({q.device}), got {kv_indices.device}")
    if kv_num_blocks is not None:
        if (not torch.is_tensor(kv_num_blocks) or kv_num_blocks.is_floating_point()
                or tuple(kv_num_blocks.shape) != (bi, hi, mq)):
            shape = tuple(kv_num_blocks.shape) if torch.is_tensor(kv_num_blocks) else type(kv_num_blocks).__name__
            raise ValueError(f"kv_num_blocks must be an integer tensor of shape {(bi, hi, mq)} (kv_indices' first "
                             f"three dims), got {shape}")
        if kv_num_blocks.device != q.device:
            raise ValueError(f"kv_num_blocks must be on the device of q ({q.device}), got {kv_num_blocks.device}")
    if key_mask is not None:
        if not torch.is_tensor(key_mask) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != tuple(k.shape[:2]):
            shape = tuple(key_mask.shape) if torch.is_tensor(key_mask) else type(key_mask).__name__
            raise ValueError(f"key_mask must be a bool tensor [batch, key tokens] = {tuple(k.shape[:2])}, got {shape}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on the device of q ({q.device}), got {key_mask.device}")
    if validate_index and kv_indices.numel() and kv_indices.device.type != 'meta':
        slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
        used = slots < (kv_num_blocks[..., None] if kv_num_blocks is not None else kv_indices.shape[-1])
        if kv_num_blocks is not None and bool(((kv_num_blocks < 0) | (kv_num_blocks > kv_indices.shape[-1])).any()):
            raise ValueError(f"kv_num_blocks must lie in [0, slots = {kv_indices.shape[-1]}]")
        listed = torch.where(used, kv_indices.long(), 0)
        if bool(((listed < 0) | (listed >= num_k_blocks)).any()):
            raise ValueError(f"kv_indices must hold key-block ids in [0, {num_k_blocks}) in its used slots")
        ordered = torch.sort(torch.where(used, kv_indices.long(), -1 - slots), dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise ValueError('kv_indices lists a key block twice for one query block; each block at most once')


def block_sparse_attention(
        q: Tensor, k: Tensor, v: Tensor,
        kv_indices: Tensor,
        kv_num_blocks: Optional[Tensor] = None,
        block_size: Union[int, Tuple[int, int], None] = None,
        q_block_offsets: Optional[Sequence[int]] = None,
        k_block_offsets: Optional[Sequence[int]] = None,
        key_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        scale: Optional[float] = None,
        return_lse: bool = False,
        validate_index: bool = True,
        backend: str = 'auto',
):
    """Attention of each query block over its listed key blocks.

    Args:
        q, k, v: ``[B, Nq, Hq, D]``, ``[B, Nk, Hkv, D]``, ``[B, Nk, Hkv, Dv]``; ``Hq`` a multiple of ``Hkv``.
        kv_indices: ``[B or 1, Hq or 1, query_blocks, slots]`` key-block ids per query block.
        kv_num_blocks: ``[B or 1, Hq or 1, query_blocks]`` used slots per row (default: all).
        block_size: uniform blocks, an int or ``(query, key)`` sizes (last block may be shorter); or
        q_block_offsets, k_block_offsets: block tables for blocks of any length (starts, then the token count).
        key_mask: ``[B, Nk]`` bool, False hides a key token from every query (padding inside a block).
        is_causal: also hide keys after the query (bottom-right aligned when ``Nk > Nq``).
        scale: logit scale, default ``head_dim ** -0.5``.
        return_lse: also return the natural-log logsumexp ``[B, Nq, Hq]`` (float32; ``-inf`` for empty rows).
        validate_index: check ids are in range and listed once per row (a device sync; models whose index is
            valid by construction, e.g. from ``topk``, pass False; meta tensors are never checked).
        backend: ``'auto'`` (Triton on CUDA, reference elsewhere), ``'triton'`` or ``'torch'``.
    """
    if not torch.is_tensor(q) or not torch.is_tensor(k):
        raise ValueError('q and k must be tensors [batch, tokens, heads, head_dim]')
    q_offsets, k_offsets = _block_tables(block_size, q_block_offsets, k_block_offsets, q.shape[1], k.shape[1])
    check_args(q, k, v, kv_indices, kv_num_blocks, q_offsets, k_offsets, key_mask, validate_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = [t for t in (q, k, v, kv_indices, kv_num_blocks, key_mask) if t is not None]
    chosen = resolve_backend(backend, *tensors)
    if chosen == 'torch':
        out, lse = block_sparse_attention_reference(q, k, v, kv_indices, kv_num_blocks, q_offsets, k_offsets,
                                                    key_mask, bool(is_causal), scale)
    else:
        if not triton_dtype_ok(q.dtype):
            raise ValueError(f"the triton backend supports float16, bfloat16 and float32, got {q.dtype}")
        out, lse = _bsa_forward_op(q, k, v, kv_indices, kv_num_blocks, key_mask, q_offsets, k_offsets,
                                   bool(is_causal), scale)
    return (out, lse) if return_lse else out


@torch.library.custom_op('visionmix::bsa_forward', mutates_args=())
def _bsa_forward_op(
        q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_num_blocks: Optional[Tensor],
        key_mask: Optional[Tensor], q_offsets: List[int], k_offsets: List[int], is_causal: bool, scale: float,
) -> Tuple[Tensor, Tensor]:
    from .triton_bsa import bsa_forward_triton
    return bsa_forward_triton(q, k, v, kv_indices, kv_num_blocks, key_mask, q_offsets, k_offsets, is_causal, scale)


@_bsa_forward_op.register_fake
def _(q, k, v, kv_indices, kv_num_blocks, key_mask, q_offsets, k_offsets, is_causal, scale):
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op('visionmix::bsa_backward', mutates_args=())
def _bsa_backward_op(
        dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        kv_indices: Tensor, kv_num_blocks: Optional[Tensor], key_mask: Optional[Tensor], q_offsets: List[int],
        k_offsets: List[int], is_causal: bool, scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    from .triton_bsa_bwd import bsa_backward_triton
    return bsa_backward_triton(dout, dlse, q, k, v, out, lse, kv_indices, kv_num_blocks, key_mask, q_offsets,
                               k_offsets, is_causal, scale)


@_bsa_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, kv_indices, kv_num_blocks, key_mask, q_offsets, k_offsets, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_indices, kv_num_blocks, key_mask, q_offsets, k_offsets, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_num_blocks, key_mask)
    ctx.args = (q_offsets, k_offsets, is_causal, scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_indices, kv_num_blocks, key_mask = ctx.saved_tensors
    dq, dk, dv = _bsa_backward_op(dout.contiguous(), dlse, q, k, v, out, lse, kv_indices, kv_num_blocks, key_mask,
                                  *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_bsa_forward_op.register_autograd(_backward, setup_context=_setup_context)
