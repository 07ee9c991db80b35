"""Global (non-causal) linear attention over a token map, with the readouts of MALA, RALA, InLine and L2ViT.

``linear_attention(q, k, v, form=..., ...)`` takes heads-last tensors ``[B, N, heads, head_dim]`` (as
flash-linear-attention does); ``reference.py`` holds the exact definition of every form.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import resolve_backend, triton_dtype_ok
from .reference import (
    DEFAULT_FEATURE_MAP,
    FEATURE_MAPS,
    FORMS,
    apply_rope,
    feature_map_fn,
    linear_attention_reference,
    rala_key_weights,
    rotate_every_two,
)

__all__ = ['linear_attention', 'linear_attention_reference', 'apply_rope', 'rotate_every_two', 'rala_key_weights',
           'FORMS', 'FEATURE_MAPS']


def check_args(q, k, v, form, feature_map, rope, key_weights, temperature):
    """Validate a ``linear_attention`` call; raises ValueError naming the argument and the constraint."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    feature_map = DEFAULT_FEATURE_MAP[form] if feature_map is None else feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
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
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share batch, heads and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[1] == 0:
        raise ValueError('k must hold at least one token')
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError('rope must be a (cos, sin) pair')
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"rope needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
        if q.shape[-1] % 2:
            raise ValueError(f"rope rotates channel pairs: head_dim must be even, got {q.shape[-1]}")
        for name, t in zip(('cos', 'sin'), rope):
            if not torch.is_tensor(t) or tuple(t.shape) != (q.shape[1], q.shape[-1]):
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"rope {name} must have shape (tokens, head_dim) = {(q.shape[1], q.shape[-1])}, "
                                 f"got {shape}")
            if t.device != q.device:
                raise ValueError(f"rope {name} must be on the device of q ({q.device}), got {t.device}")
    if key_weights is not None:
        if form == 'rala':
            raise ValueError("key_weights cannot be given with form='rala', which computes its own")
        if not torch.is_tensor(key_weights) or tuple(key_weights.shape) != tuple(k.shape[:3]):
            shape = tuple(key_weights.shape) if torch.is_tensor(key_weights) else type(key_weights).__name__
            raise ValueError(f"key_weights must have shape (batch, tokens, heads) = {tuple(k.shape[:3])}, got {shape}")
        if key_weights.device != q.device:
            raise ValueError(f"key_weights must be on the device of q ({q.device}), got {key_weights.device}")
    if temperature is not None:
        if form != 'l2vit':
            raise ValueError(f"temperature is used by form='l2vit' only, got form={form!r}")
        if not torch.is_tensor(temperature) or tuple(temperature.shape) != (q.shape[2],):
            shape = tuple(temperature.shape) if torch.is_tensor(temperature) else type(temperature).__name__
            raise ValueError(f"temperature must have shape (heads,) = ({q.shape[2]},), got {shape}")
    return feature_map


def linear_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        form: str = 'normalized',
        feature_map: Optional[str] = None,
        rope: Optional[Tuple[Tensor, Tensor]] = None,
        key_weights: Optional[Tensor] = None,
        scale: Optional[float] = None,
        eps: float = 1e-6,
        temperature: Optional[Tensor] = None,
        denom_floor: float = 100.0,
        backend: str = 'auto',
) -> Tensor:
    """Global linear attention, every query over every key of its (batch, head).

    Args:
        q, k, v: ``[B, Nq, H, D]``, ``[B, Nk, H, D]``, ``[B, Nk, H, Dv]``.
        form: the readout, ``'normalized' | 'rala' | 'mala' | 'inline' | 'l2vit'`` (see ``reference.py``).
        feature_map: ``'identity' | 'relu' | 'elu1'`` applied to q and k; default per form (elu1 for
            normalized/rala/mala, identity for inline, relu for l2vit).
        rope: optional ``(cos, sin)`` ``[N, D]`` rotary tables (interleaved pairs) applied to the feature-mapped
            q and k of the numerator only, as MALA and RALA do.
        key_weights: optional ``[B, Nk, H]`` weights of the keys in the summary and the normaliser.
        scale: logit scale ``s``, default ``D ** -0.5`` (``1`` for ``'normalized'``).
        eps: added to the normaliser (normalized, rala, mala).
        temperature: ``[H]`` per-head factor of ``'l2vit'``; ``denom_floor`` its normaliser floor.
        backend: ``'auto' | 'triton' | 'torch'``.
    """
    feature_map = check_args(q, k, v, form, feature_map, rope, key_weights, temperature)
    tensors = [t for t in (q, k, v, key_weights, temperature) if t is not None]
    if resolve_backend(backend, *tensors) == 'torch':
        return linear_attention_reference(q, k, v, form, feature_map, rope, key_weights, scale, eps, temperature,
                                          denom_floor)
    if not triton_dtype_ok(q.dtype):
        raise ValueError(f"the triton backend supports float16, bfloat16 and float32, got {q.dtype}")
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    n_keys = k.shape[1]
    if form == 'rala':  # softmax-weighted keys computed here; their gradient flows back through autograd
        key_weights = rala_key_weights(feature_map_fn(q.float(), feature_map), feature_map_fn(k.float(), feature_map),
                                       s).to(q.dtype)
        form, c = 'normalized', 1.0 / n_keys
    elif form == 'normalized':
        c = 1.0 if scale is None else s
    elif form in ('mala', 'inline'):
        c = s / n_keys
    else:
        c = 1.0
    cos, sin = rope if rope is not None else (None, None)
    if key_weights is not None:
        key_weights = key_weights.to(q.dtype)
    out, _, _, _ = _la_forward_op(q, k, v, key_weights, cos, sin, temperature, form, feature_map, c, float(eps),
                                  float(denom_floor))
    return out


@torch.library.custom_op('visionmix::la_forward', mutates_args=())
def _la_forward_op(
        q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
        tau: Optional[Tensor], form: str, feature_map: str, c: float, eps: float, floor: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .triton_la import la_forward_triton
    rope = (cos, sin) if cos is not None else None
    return la_forward_triton(q, k, v, w, rope, tau, form, feature_map, c, eps, floor)


def _padded(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@_la_forward_op.register_fake
def _(q, k, v, w, cos, sin, tau, form, feature_map, c, eps, floor):
    bh = q.shape[0] * q.shape[2]
    bd, bdv = _padded(q.shape[-1]), _padded(v.shape[-1])
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(bh, bd, bdv, **f32), q.new_empty(bh, bd, **f32),
            q.new_empty(bh, bdv, **f32))


@torch.library.custom_op('visionmix::la_backward', mutates_args=())
def _la_backward_op(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], cos: Optional[Tensor],
        sin: Optional[Tensor], tau: Optional[Tensor], summary: Tensor, z: Tensor, vmean: Tensor, form: str,
        feature_map: str, c: float, eps: float, floor: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton_la import la_backward_triton
    rope = (cos, sin) if cos is not None else None
    dq, dk, dv, dw, dtau = la_backward_triton(dout, q, k, v, w, rope, tau, summary, z, vmean, form, feature_map, c,
                                              eps, floor)
    return dq, dk, dv, (dw if dw is not None else q.new_zeros(0)), (dtau if dtau is not None else q.new_zeros(0))


@_la_backward_op.register_fake
def _(dout, q, k, v, w, cos, sin, tau, summary, z, vmean, form, feature_map, c, eps, floor):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(w) if w is not None else q.new_empty(0),
            torch.empty_like(tau) if tau is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, w, cos, sin, tau, form, feature_map, c, eps, floor = inputs
    _, summary, z, vmean = output
    ctx.save_for_backward(q, k, v, w, cos, sin, tau, summary, z, vmean)
    ctx.args = (form, feature_map, c, eps, floor)


def _backward(ctx, dout, *_):
    q, k, v, w, cos, sin, tau, summary, z, vmean = ctx.saved_tensors
    dq, dk, dv, dw, dtau = _la_backward_op(dout.contiguous(), q, k, v, w, cos, sin, tau, summary, z, vmean, *ctx.args)
    return (dq, dk, dv, dw if w is not None else None, None, None, dtau if tau is not None else None,
            None, None, None, None, None)


_la_forward_op.register_autograd(_backward, setup_context=_setup_context)
