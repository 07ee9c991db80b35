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


def _gather_bias(rpb: torch.Tensor, rel: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``rpb [H, 2K0-1, ...]`` -> ``[N, H, KK]``."""
    return rpb[(slice(None),) + rel].permute(1, 0, 2)


def _logits(q, k, idx, valid, rel, rpb, scale):
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    k_nb = k[:, idx]  # [B, N, KK, Hkv, D]
    if Hkv != Hq:
        k_nb = k_nb.repeat_interleave(Hq // Hkv, dim=3)
    s = torch.einsum('bnhd,bnkhd->bnhk', q * scale, k_nb)
    if rpb is not None:
        s = s + _gather_bias(rpb, rel).to(s.dtype)
    return s.masked_fill(~valid[None, :, None, :], float('-inf'))


def _flatten(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, *x.shape[rank + 1:])


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
    rank = q.dim() - 3
    spatial = q.shape[1:1 + rank]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx, valid, rel = neighbourhood(spatial, kernel_size, stride, dilation, is_causal, q.device)
    qf, kf, vf = (_flatten(t, rank).to(acc) for t in (q, k, v))
    s = _logits(qf, kf, idx, valid, rel, rpb, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no key give zeros
    v_nb = vf[:, idx]
    Hq, Hkv = qf.shape[2], vf.shape[2]
    if Hkv != Hq:
        v_nb = v_nb.repeat_interleave(Hq // Hkv, dim=3)
    out = torch.einsum('bnhk,bnkhd->bnhd', p, v_nb)
    out = out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)
    return out, lse.reshape(q.shape[:-1])


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
    rank = q.dim() - 3
    spatial = q.shape[1:1 + rank]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx, valid, rel = neighbourhood(spatial, kernel_size, stride, dilation, is_causal, q.device)
    qf, kf, vf, of, dof = (_flatten(t, rank).to(acc) for t in (q, k, v, out, dout))
    B, N, Hq, D = qf.shape
    Hkv = kf.shape[2]
    group = Hq // Hkv
    lse_f = lse.reshape(B, N, Hq).to(acc)
    p = torch.exp(_logits(qf, kf, idx, valid, rel, rpb, scale) - lse_f[..., None]).nan_to_num(0.0)
    v_nb = vf[:, idx]
    k_nb = kf[:, idx]
    if group > 1:
        v_nb = v_nb.repeat_interleave(group, dim=3)
        k_nb = k_nb.repeat_interleave(group, dim=3)
    dp = torch.einsum('bnhd,bnkhd->bnhk', dof, v_nb)
    delta = (dof * of).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.reshape(B, N, Hq, 1).to(acc)
    ds = p * (dp - delta)
    dq = torch.einsum('bnhk,bnkhd->bnhd', ds, k_nb) * scale

    def scatter(per_slot):  # [B, N, KK, Hq, X] -> [B, N, Hkv, X], summed over query heads of a kv head
        per_slot = per_slot.reshape(B, N * idx.shape[1], Hkv, group, -1).sum(3)
        dst = per_slot.new_zeros(B, N, Hkv, per_slot.shape[-1])
        return dst.index_add_(1, idx.reshape(-1), per_slot)

    dk = scatter(torch.einsum('bnhk,bnhd->bnkhd', ds, qf) * scale)
    dv = scatter(torch.einsum('bnhk,bnhd->bnkhd', p, dof))
    drpb = None
    if rpb is not None:
        flat = 0
        for a, r in enumerate(rel):
            flat = flat * rpb.shape[1 + a] + r
        per_head = ds.sum(0).permute(1, 0, 2).reshape(Hq, -1)  # [Hq, N * KK]
        drpb = per_head.new_zeros(Hq, rpb[0].numel()).index_add_(1, flat.reshape(-1), per_head)
        drpb = drpb.reshape(rpb.shape).to(rpb.dtype)
    return (dq.reshape(q.shape).to(q.dtype), dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype), drpb)
