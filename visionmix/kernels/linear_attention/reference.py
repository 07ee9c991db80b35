"""Global (non-causal) linear attention in plain PyTorch: the definition the Triton kernels follow.

Per batch and head, with feature map ``phi``, optional rotary embedding ``rope`` on the numerator
only, optional per-key weights ``w`` and ``Nk`` keys::

    S = sum_j w_j rope(phi(k_j)) v_j^T      (d x dv key-value summary)
    z = sum_j w_j phi(k_j)                   (normaliser, un-rotated)
    vbar = mean_j v_j
    num_i = rope(phi(q_i)) S                 den_i = phi(q_i) . z
    out_i = a(den_i) * num_i + b(den_i) * vbar

The readout coefficients ``a, b`` are the family's ("form"), with ``c`` the logit scale:

=============  =======================================  ==================  ============================
form           a(den)                                   b(den)              used by
=============  =======================================  ==================  ============================
normalized     c / (c den + eps), c = scale or 1        0                   plain linear attention
rala           same, c = 1/Nk, w = Nk softmax_j(s qbar.phi(k_j))             RALA (RAVLT)
mala           c (1 + 1 / (c den + eps)), c = s/Nk      -c den              MALA (MAViT)
inline         c, c = s/Nk                              1 - c den           InLine
l2vit          tau_h / max(den, floor)                  0                   L2ViT
=============  =======================================  ==================  ============================

where ``s`` is the scale (default ``head_dim ** -0.5``) and ``qbar = mean_i phi(q_i)``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

FORMS = ('normalized', 'rala', 'mala', 'inline', 'l2vit')
FEATURE_MAPS = ('identity', 'relu', 'elu1')
DEFAULT_FEATURE_MAP = {'normalized': 'elu1', 'rala': 'elu1', 'mala': 'elu1', 'inline': 'identity', 'l2vit': 'relu'}


def feature_map_fn(x: Tensor, name: str) -> Tensor:
    if name == 'identity':
        return x
    if name == 'relu':
        return F.relu(x)
    if name == 'elu1':
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def rotate_every_two(x: Tensor) -> Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the interleaved-pair rotation."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on adjacent channel pairs; ``x [..., N, H, D]``, ``cos/sin [..., N, D]`` (each angle
    repeated for its pair; leading dims broadcast, e.g. one table per view)."""
    return x * cos.unsqueeze(-2) + rotate_every_two(x) * sin.unsqueeze(-2)


def rala_key_weights(q_feat: Tensor, k_feat: Tensor, scale: float) -> Tensor:
    """RALA's per-key weights ``Nk * softmax_j(scale * mean_i(phi(q_i)) . phi(k_j))``: ``[B, Nk, H]``."""
    q_mean = q_feat.mean(1, keepdim=True)  # [B, 1, H, D]
    logits = (q_mean * k_feat).sum(-1) * scale  # [B, Nk, H]
    return torch.softmax(logits, dim=1) * k_feat.shape[1]


def linear_attention_reference(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        form: str,
        feature_map: str,
        rope: Optional[Tuple[Tensor, Tensor]] = None,
        key_weights: Optional[Tensor] = None,
        scale: Optional[float] = None,
        eps: float = 1e-6,
        temperature: Optional[Tensor] = None,
        denom_floor: float = 100.0,
) -> Tensor:
    """``[B, Nq, H, D]``, ``[B, Nk, H, D]``, ``[B, Nk, H, Dv]`` -> ``[B, Nq, H, Dv]``; differentiable by autograd.

    Low-precision inputs are computed in float32 and cast back; float64 stays float64.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    head_dim, n_keys = q.shape[-1], k.shape[1]
    s = head_dim ** -0.5 if scale is None else scale
    qf = feature_map_fn(q.to(acc), feature_map)
    kf = feature_map_fn(k.to(acc), feature_map)
    vf = v.to(acc)
    if form == 'rala':
        key_weights = rala_key_weights(qf, kf, s)
    w = key_weights.to(acc)[..., None] if key_weights is not None else None
    q_num, k_num = (apply_rope(qf, *(t.to(acc) for t in rope)), apply_rope(kf, *(t.to(acc) for t in rope))) \
        if rope is not None else (qf, kf)
    k_num_w = k_num * w if w is not None else k_num
    k_den_w = kf * w if w is not None else kf
    summary = torch.einsum('bnhd,bnhe->bhde', k_num_w, vf)
    z = k_den_w.sum(1)  # [B, H, D]
    v_mean = vf.mean(1)  # [B, H, Dv]
    num = torch.einsum('bnhd,bhde->bnhe', q_num, summary)
    den = (qf * z[:, None]).sum(-1, keepdim=True)  # [B, Nq, H, 1]
    if form in ('normalized', 'rala'):
        c = (1.0 / n_keys) if form == 'rala' else (1.0 if scale is None else scale)
        out = num * (c / (c * den + eps))
    elif form == 'mala':
        c = s / n_keys
        out = num * (c * (1.0 + 1.0 / (c * den + eps))) - (c * den) * v_mean[:, None]
    elif form == 'inline':
        c = s / n_keys
        out = num * c + (1.0 - c * den) * v_mean[:, None]
    elif form == 'l2vit':
        tau = temperature.to(acc)[:, None] if temperature is not None else 1.0  # [H, 1]
        out = num * (tau / den.clamp_min(denom_floor))
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return out.to(v.dtype)
