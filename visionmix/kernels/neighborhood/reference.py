"""Neighborhood attention in plain PyTorch: the definition the Triton kernels are tested against.

Semantics follow NATTEN (https://github.com/SHI-Labs/NATTEN), applied independently on every axis:
a token at coordinate ``x`` belongs to dilation group ``x % d`` and attends only inside its group,
whose length is ``ceil((L - g) / d)``. Non-causal windows hold exactly ``K`` keys and shift inward at
the borders; queries of one stride group share the window of their leader. Causal windows end at the
query and are cut at the start. The optional relative positional bias (NAT/DiNAT, NATTEN <= 0.17)
is indexed by ``(key - query) / d + K - 1`` per axis and added after the scaled dot product.

Everything here works in any floating dtype (float64 for parity checks) and runs by gathering each
query's ``prod(K)`` neighbours; memory is ``O(tokens * prod(K) * head_dim)``.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch


def axis_windows(
        length: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        is_causal: bool = False,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbours of every query along one axis.

    Returns ``keys [L, K]`` (key coordinates), ``valid [L, K]`` (False for slots cut by causality)
    and ``rel [L, K]`` (relative positional bias index ``(key - query) / d + K - 1``).
    """
    K, s, d = kernel_size, stride, dilation
    x = torch.arange(length, device=device)
    group = x % d
    xg = x // d
    group_len = (length - group + d - 1) // d
    slot = torch.arange(K, device=device)
    if is_causal:
        leader = torch.minimum((xg // s) * s + s - 1, group_len - 1)
        kg = leader[:, None] - (K - 1) + slot
        valid = (kg >= 0) & (kg <= xg[:, None])
    else:
        left = K // 2
        right = K // 2 + K % 2 - 1
        leader = torch.minimum((xg // s) * s + s // 2, group_len - 1)
        center = torch.minimum(torch.maximum(leader, torch.full_like(leader, left)), group_len - 1 - right)
        kg = center[:, None] - left + slot
        valid = torch.ones(length, K, dtype=torch.bool, device=device)
    kg = kg.clamp_min(0)
    keys = kg * d + group[:, None]
    rel = kg - xg[:, None] + K - 1
    return keys, valid, rel


@functools.lru_cache(maxsize=64)
def _neighbourhood_cached(spatial, kernel_size, stride, dilation, is_causal, device_str):
    device = torch.device(device_str)
    per_axis = [axis_windows(L, K, s, d, c, device)
                for L, K, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal)]
    rank = len(spatial)
    idx = None
    valid = None
    rel = []
    for a, (keys, ok, r) in enumerate(per_axis):
        # Broadcast axis ``a`` to [L0, .., L_{rank-1}, K0, .., K_{rank-1}].
        shape = [1] * (2 * rank)
        shape[a] = spatial[a]
        shape[rank + a] = kernel_size[a]
        keys, ok, r = keys.view(shape), ok.view(shape), r.view(shape)
        idx = keys if idx is None else idx * spatial[a] + keys
        valid = ok if valid is None else valid & ok
        rel.append(r)
    n = 1
    for L in spatial:
        n *= L
    kk = 1
    for K in kernel_size:
        kk *= K
    full = list(spatial) + list(kernel_size)
    idx = idx.expand(full).reshape(n, kk)
    valid = valid.expand(full).reshape(n, kk)
    rel = tuple(r.expand(full).reshape(n, kk) for r in rel)
    return idx, valid, rel


def neighbourhood(
        spatial: Sequence[int],
        kernel_size: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int],
        is_causal: Sequence[bool],
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Flattened neighbour table: ``idx [N, KK]`` key token indices (row-major), ``valid [N, KK]``,
    and per-axis ``rel`` bias indices, for ``N = prod(spatial)`` queries and ``KK = prod(kernel_size)``."""
    return _neighbourhood_cached(
        tuple(int(x) for x in spatial), tuple(int(x) for x in kernel_size), tuple(int(x) for x in stride),
        tuple(int(x) for x in dilation), tuple(bool(x) for x in is_causal), str(device))


def neighbourhood_mask(spatial, kernel_size, stride, dilation, is_causal, device='cpu') -> torch.Tensor:
    """Dense ``[N, N]`` boolean mask ``mask[query, key]`` of the neighbourhood rule."""
    idx, valid, _ = neighbourhood(spatial, kernel_size, stride, dilation, is_causal, torch.device(device))
    n = idx.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool, device=idx.device)
    rows = torch.arange(n, device=idx.device)[:, None].expand_as(idx)
    mask[rows[valid], idx[valid]] = True
    return mask


def _split_heads(x: torch.Tensor, rank: int, heads_kv: int) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> ``[B, heads_kv, H // heads_kv, N, D]`` (a view where possible)."""
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(B, -1, heads_kv, H // heads_kv, D).permute(0, 2, 3, 1, 4)


def _merge_heads(x: torch.Tensor, shape) -> torch.Tensor:
    """``[B, heads_kv, G, N, D]`` -> ``[B, *spatial, heads_kv * G, D]``."""
    B, Hkv, G, N, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(*shape[:-1], D)


def _probabilities(qh, k_nb, idx, valid, rel, rpb, scale):
    """Scaled logits (+ bias), masked: ``[B, Hkv, G, N, KK]``."""
    s = torch.matmul(qh.unsqueeze(-2), k_nb.transpose(-1, -2)).squeeze(-2) * scale
    if rpb is not None:
        B, Hkv, G, N, KK = s.shape
        s = s + rpb[(slice(None),) + rel].reshape(Hkv, G, N, KK).to(s.dtype)
    return s.masked_fill(~valid, float('-inf'))


def _prepare(q, k, v, kernel_size, stride, dilation, is_causal, scale):
    rank = q.dim() - 3
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx, valid, rel = neighbourhood(q.shape[1:1 + rank], kernel_size, stride, dilation, is_causal, q.device)
    heads_kv = k.shape[-2]
    qh = _split_heads(q.to(acc), rank, heads_kv)
    kh, vh = (_split_heads(t.to(acc), rank, heads_kv)[:, :, 0] for t in (k, v))  # [B, Hkv, N, D]
    k_nb = kh[:, :, idx].unsqueeze(2)  # [B, Hkv, 1, N, KK, D]
    v_nb = vh[:, :, idx].unsqueeze(2)
    return rank, scale, acc, idx, valid, rel, qh, k_nb, v_nb


def na_forward_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: List[int],
        stride: List[int],
        dilation: List[int],
        is_causal: List[bool],
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention over ``[B, *spatial, heads, D]`` tensors; returns ``(out, lse)``.

    Differentiable through autograd. Low-precision inputs are computed in float32 and cast back;
    ``lse`` (natural log) is float32, or float64 for float64 inputs.
    """
    rank, scale, acc, idx, valid, rel, qh, k_nb, v_nb = _prepare(
        q, k, v, kernel_size, stride, dilation, is_causal, scale)
    s = _probabilities(qh, k_nb, idx, valid, rel, rpb, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no key give zeros
    out = torch.matmul(p.unsqueeze(-2), v_nb).squeeze(-2)
    out = _merge_heads(out, (*q.shape[:-1], v.shape[-1])).to(q.dtype)
    return out, _merge_heads(lse.unsqueeze(-1), (*q.shape[:-1], 1)).squeeze(-1)


def na_backward_reference(
        dout: torch.Tensor,
        dlse: Optional[torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        kernel_size: List[int],
        stride: List[int],
        dilation: List[int],
        is_causal: List[bool],
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Closed-form softmax backward from the saved ``out`` and ``lse``: ``(dq, dk, dv, drpb)``."""
    rank, scale, acc, idx, valid, rel, qh, k_nb, v_nb = _prepare(
        q, k, v, kernel_size, stride, dilation, is_causal, scale)
    heads_kv = k.shape[-2]
    lse_h = _split_heads(lse.unsqueeze(-1), rank, heads_kv).to(acc)
    p = torch.exp(_probabilities(qh, k_nb, idx, valid, rel, rpb, scale) - lse_h).nan_to_num(0.0)
    do_h = _split_heads(dout.to(acc), rank, heads_kv)
    delta = (do_h * _split_heads(out.to(acc), rank, heads_kv)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - _split_heads(dlse.unsqueeze(-1), rank, heads_kv).to(acc)
    dp = torch.matmul(do_h.unsqueeze(-2), v_nb.transpose(-1, -2)).squeeze(-2)
    ds = p * (dp - delta)  # [B, Hkv, G, N, KK]
    dq = torch.matmul(ds.unsqueeze(-2), k_nb).squeeze(-2) * scale
    B, Hkv, G, N, KK = ds.shape

    def scatter(weights, rows):  # sum_{queries, slots} weights * rows into the attended keys: [B, Hkv, N, X]
        per_slot = torch.matmul(weights.unsqueeze(-1), rows.unsqueeze(-2)).sum(2)  # [B, Hkv, N, KK, X]
        dst = per_slot.new_zeros(B, Hkv, N, per_slot.shape[-1])
        return dst.index_add_(2, idx.reshape(-1), per_slot.reshape(B, Hkv, N * KK, -1))

    dk = scatter(ds, qh) * scale
    dv = scatter(p, do_h)
    drpb = None
    if rpb is not None:
        flat = 0
        for a, r in enumerate(rel):
            flat = flat * rpb.shape[1 + a] + r
        per_head = ds.sum(0).reshape(Hkv * G, N * KK)
        drpb = per_head.new_zeros(Hkv * G, rpb[0].numel()).index_add_(1, flat.reshape(-1), per_head)
        drpb = drpb.reshape(rpb.shape).to(rpb.dtype)
    dq = _merge_heads(dq, q.shape).to(q.dtype)
    dk = _merge_heads(dk.unsqueeze(2), k.shape).to(k.dtype)
    dv = _merge_heads(dv.unsqueeze(2), v.shape).to(v.dtype)
    return dq, dk, dv, drpb
