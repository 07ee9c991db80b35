"""Neighborhood attention (NATTEN semantics) over 1-D, 2-D and 3-D token maps.

``na1d / na2d / na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None)``
take heads-last tensors ``[B, *spatial, heads, head_dim]`` as NATTEN does, plus the relative positional
bias NAT/DiNAT were trained with. See ``reference.py`` for the exact rule.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._backend import resolve_backend, triton_dtype_ok
from .reference import na_backward_reference, na_forward_reference, neighbourhood, neighbourhood_mask

__all__ = ['na1d', 'na2d', 'na3d', 'neighborhood_attention', 'neighbourhood', 'neighbourhood_mask',
           'na_forward_reference']

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def _per_axis(name: str, value, rank: int, kind=int) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(f"{name} must be {'a bool' if kind is bool else 'an int'} or a tuple of {rank} values "
                             f"(one per spatial axis), got {value!r}")
        values = list(value)
    else:
        values = [value] * rank
    out = []
    for x in values:
        if kind is bool:
            if not isinstance(x, (bool, int)):
                raise ValueError(f"{name} must hold bools, got {value!r}")
            out.append(bool(x))
        else:
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"{name} must hold ints, got {value!r}")
            out.append(int(x))
    return out


def check_args(
        q: Tensor, k: Tensor, v: Tensor, rank: int, kernel_size, stride, dilation, is_causal,
        rpb: Optional[Tensor], scale: Optional[float],
) -> Tuple[List[int], List[int], List[int], List[bool], float]:
    """Validate the arguments of an ``na{rank}d`` call; raises ValueError naming the offending argument."""
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != rank + 3:
            raise ValueError(f"{name} must have layout [batch, {', '.join('XYZ'[:rank])}, heads, head_dim] "
                             f"({rank + 3} dims) for na{rank}d, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must match in every dim but the last, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:rank + 1] != k.shape[:rank + 1]:
        raise ValueError(f"q and k must share batch and spatial shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_q % heads_kv:
        raise ValueError(f"heads of q ({heads_q}) must be a multiple of heads of k/v ({heads_kv})")
    spatial = list(q.shape[1:rank + 1])
    kernel_size = _per_axis('kernel_size', kernel_size, rank)
    stride = _per_axis('stride', stride, rank)
    dilation = _per_axis('dilation', dilation, rank)
    is_causal = _per_axis('is_causal', is_causal, rank, bool)
    for a in range(rank):
        K, s, d, L = kernel_size[a], stride[a], dilation[a], spatial[a]
        if K < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis, got {kernel_size}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
        if not 1 <= s <= K:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis, got stride {stride} "
                             f"with kernel_size {kernel_size}")
        if K * d > L:
            raise ValueError(f"kernel_size * dilation must not exceed the input size on every axis: axis {a} has "
                             f"kernel_size {K} * dilation {d} = {K * d} > size {L} (input spatial shape {spatial})")
    if rpb is not None:
        want = (heads_q, *[2 * K - 1 for K in kernel_size])
        if not torch.is_tensor(rpb) or tuple(rpb.shape) != want:
            got = tuple(rpb.shape) if torch.is_tensor(rpb) else type(rpb).__name__
            raise ValueError(f"rpb must have shape (heads, *(2 * kernel_size - 1)) = {want}, got {got}")
        if rpb.device != q.device:
            raise ValueError(f"rpb must be on the device of q ({q.device}), got {rpb.device}")
        if rpb.dtype != q.dtype:
            raise ValueError(f"rpb must have the dtype of q ({q.dtype}), got {rpb.dtype}")
        if any(s != 1 for s in stride):
            raise ValueError(f"rpb is defined for stride 1 only (NAT/DiNAT), got stride {stride}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return kernel_size, stride, dilation, is_causal, float(scale)


def _triton_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    from .triton_na import na_forward_triton
    return na_forward_triton(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)


@torch.library.custom_op('visionmix::na_forward', mutates_args=())
def _na_forward_op(
        q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int], stride: List[int],
        dilation: List[int], is_causal: List[bool], scale: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    if backend == 'triton':
        return _triton_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)
    out, lse = na_forward_reference(q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale)
    return out.contiguous(), (lse.float() if q.dtype != torch.float64 else lse).contiguous()


@_na_forward_op.register_fake
def _(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op('visionmix::na_backward', mutates_args=())
def _na_backward_op(
        dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        rpb: Optional[Tensor], kernel_size: List[int], stride: List[int], dilation: List[int],
        is_causal: List[bool], scale: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == 'triton':
        from .triton_na_bwd import na_backward_triton
        dq, dk, dv, drpb = na_backward_triton(
            dout, dlse, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale)
    else:
        dq, dk, dv, drpb = na_backward_reference(
            dout, dlse, q, k, v, out, lse, kernel_size, stride, dilation, is_causal, rpb, scale)
    grads = (dq, dk, dv, drpb if drpb is not None else q.new_zeros(0))
    return tuple(g.contiguous() for g in grads)


@_na_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale, backend):
    drpb = rpb.new_empty(rpb.shape) if rpb is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drpb


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.args = (kernel_size, stride, dilation, is_causal, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, drpb = _na_backward_op(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, rpb, *ctx.args)
    return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None, None, None


_na_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _na_flops(q_shape, v_shape, kernel_size) -> int:
    tokens_heads = 1
    for x in q_shape[:-1]:
        tokens_heads *= x
    kk = 1
    for x in kernel_size:
        kk *= x
    return 2 * tokens_heads * kk * (q_shape[-1] + v_shape[-1])


try:  # count attention FLOPs in torch.utils.flop_counter (GFLOPs tables)
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.visionmix.na_forward)
    def _na_forward_flops(q_shape, k_shape, v_shape, rpb_shape, kernel_size, *args, out_shape=None, **kwargs):
        return _na_flops(q_shape, v_shape, kernel_size)

    @register_flop_formula(torch.ops.visionmix.na_backward)
    def _na_backward_flops(dout_shape, dlse_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
        kernel_size = args[4]
        return int(2.5 * _na_flops(q_shape, v_shape, kernel_size))
except Exception:  # pragma: no cover - older torch without the formula registry
    pass


def _check_additional(q: Tensor, v: Tensor, keys: Optional[Tensor], values: Optional[Tensor]) -> None:
    if (keys is None) != (values is None):
        raise ValueError('additional_keys and additional_values must be given together')
    if keys is None:
        return
    for name, t in (('additional_keys', keys), ('additional_values', values)):
        if not torch.is_tensor(t) or t.dim() != 4:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must have layout [batch, tokens, heads, head_dim], got {shape}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if keys.shape[:3] != values.shape[:3] or keys.shape[0] != q.shape[0]:
        raise ValueError(f"additional_keys {tuple(keys.shape)} and additional_values {tuple(values.shape)} must share "
                         f"batch ({q.shape[0]}), tokens and heads")
    if keys.shape[-1] != q.shape[-1] or values.shape[-1] != v.shape[-1]:
        raise ValueError(f"additional_keys/values head dims must be q's ({q.shape[-1]}) and v's ({v.shape[-1]}), "
                         f"got {keys.shape[-1]} and {values.shape[-1]}")
    if q.shape[-2] % keys.shape[2]:
        raise ValueError(f"heads of q ({q.shape[-2]}) must be a multiple of heads of additional_keys "
                         f"({keys.shape[2]})")


def _merge_additional(q: Tensor, out: Tensor, lse: Tensor, keys: Tensor, values: Tensor, scale: float):
    """Attend every query to the extra tokens too: dense attention over them, merged with the
    neighbourhood result through the two logsumexps (NATTEN's ``additional_keys`` semantics)."""
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = H // keys.shape[2]
    qf = q.reshape(B, -1, H, D).to(acc)
    kx = keys.to(acc).repeat_interleave(group, dim=2)
    vx = values.to(acc).repeat_interleave(group, dim=2)
    s = torch.einsum('bnhd,bmhd->bnhm', qf, kx) * scale
    lse_x = torch.logsumexp(s, dim=-1)
    out_x = torch.einsum('bnhm,bmhd->bnhd', torch.softmax(s, dim=-1), vx)
    lse_na = lse.reshape(B, -1, H).to(acc)
    lse_all = torch.logaddexp(lse_na, lse_x)
    out_na = out.reshape(B, -1, H, out.shape[-1]).to(acc)
    merged = out_na * torch.exp(lse_na - lse_all)[..., None] + out_x * torch.exp(lse_x - lse_all)[..., None]
    return merged.reshape(out.shape).to(out.dtype), lse_all.reshape(lse.shape).to(lse.dtype)


def neighborhood_attention(
        q: Tensor, k: Tensor, v: Tensor,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        rpb: Optional[Tensor] = None,
        scale: Optional[float] = None,
        return_lse: bool = False,
        backend: str = 'auto',
        additional_keys: Optional[Tensor] = None,
        additional_values: Optional[Tensor] = None,
):
    """Neighborhood attention of any rank (inferred as ``q.dim() - 3``); see ``na2d``."""
    rank = q.dim() - 3 if torch.is_tensor(q) else 0
    if rank not in (1, 2, 3):
        shape = tuple(q.shape) if torch.is_tensor(q) else type(q).__name__
        raise ValueError(f"q must be [batch, *spatial, heads, head_dim] with 1 to 3 spatial axes, got {shape}")
    kernel_size, stride, dilation, is_causal, scale = check_args(
        q, k, v, rank, kernel_size, stride, dilation, is_causal, rpb, scale)
    _check_additional(q, v, additional_keys, additional_values)
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    chosen = resolve_backend(backend, *tensors)
    if chosen == 'triton' and not triton_dtype_ok(q.dtype):
        raise ValueError(f"the triton backend supports float16, bfloat16 and float32, got {q.dtype}")
    out, lse = _na_forward_op(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, chosen)
    if additional_keys is not None:
        out, lse = _merge_additional(q, out, lse, additional_keys, additional_values, scale)
    return (out, lse) if return_lse else out


def na1d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None, return_lse=False,
         backend='auto', additional_keys=None, additional_values=None):
    """1-D neighborhood attention over ``[B, L, heads, D]``."""
    _check_rank('na1d', q, 1)
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend,
                                  additional_keys, additional_values)


def na2d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None, return_lse=False,
         backend='auto', additional_keys=None, additional_values=None):
    """2-D neighborhood attention over ``[B, X, Y, heads, D]``.

    Args:
        kernel_size, stride, dilation, is_causal: an int/bool or one value per axis.
        rpb: optional relative positional bias ``[heads, 2*Kx-1, 2*Ky-1]`` (NAT/DiNAT), stride 1 only.
        scale: logit scale, default ``head_dim ** -0.5``.
        return_lse: also return the natural-log logsumexp ``[B, X, Y, heads]`` (float32).
        backend: ``'auto'`` (Triton on CUDA, reference elsewhere), ``'triton'`` or ``'torch'``.
        additional_keys, additional_values: optional extra tokens ``[B, M, heads_kv, D]`` every query also
            attends to (global tokens); merged with the neighbourhood through the logsumexp.
    """
    _check_rank('na2d', q, 2)
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend,
                                  additional_keys, additional_values)


def na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None, return_lse=False,
         backend='auto', additional_keys=None, additional_values=None):
    """3-D neighborhood attention over ``[B, X, Y, Z, heads, D]``."""
    _check_rank('na3d', q, 3)
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend,
                                  additional_keys, additional_values)


def _check_rank(fn: str, q, rank: int) -> None:
    if not torch.is_tensor(q) or q.dim() != rank + 3:
        shape = tuple(q.shape) if torch.is_tensor(q) else type(q).__name__
        raise ValueError(f"q must have layout [batch, {', '.join('XYZ'[:rank])}, heads, head_dim] "
                         f"({rank + 3} dims) for {fn}, got shape {shape}")
