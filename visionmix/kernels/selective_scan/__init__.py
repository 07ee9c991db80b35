"""Mamba-1 selective scan (S6), one direction or several scan orders of one token sequence in one launch.

``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`` has mamba-ssm's
``selective_scan_fn`` semantics and layout (``u``/``delta`` ``[batch, dim, L]``, real ``A`` ``[dim, N]``,
``B``/``C`` ``[batch, N, L]`` or grouped ``[batch, G, N, L]``); ``reference.py`` holds the exact definition.
``selective_scan_multidir`` runs K scan orders (VMamba / PlainMamba / VCMamba style) and sums them back.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._backend import resolve_backend, triton_dtype_ok
from .reference import expand_bc, selective_scan_multidir_reference, selective_scan_reference

__all__ = ['selective_scan', 'selective_scan_multidir', 'selective_scan_reference',
           'selective_scan_multidir_reference']

MAX_DSTATE = 256


def _shape(t) -> object:
    return tuple(t.shape) if torch.is_tensor(t) else type(t).__name__


def _check_bc(name: str, m, u: Tensor, dstate: int) -> None:
    batch, dim, length = u.shape
    if not torch.is_tensor(m) or not m.is_floating_point() or m.is_complex():
        raise ValueError(f"{name} must be a real floating-point tensor, got {_shape(m)}")
    if m.dim() == 2:
        if tuple(m.shape) != (dim, dstate):
            raise ValueError(f"time-invariant {name} must have shape (dim, dstate) = {(dim, dstate)}, got {_shape(m)}")
        return
    if m.dim() == 3:
        expected = (batch, dstate, length)
    elif m.dim() == 4:
        groups = m.shape[1]
        if groups < 1 or dim % groups:
            raise ValueError(f"grouped {name} [batch, groups, dstate, L] needs dim ({dim}) divisible by its groups "
                             f"({groups})")
        expected = (batch, groups, dstate, length)
    else:
        raise ValueError(f"{name} must have layout [dim, dstate], [batch, dstate, L] or [batch, groups, dstate, L], "
                         f"got {_shape(m)}")
    if tuple(m.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (batch, [groups,] dstate, L), got {_shape(m)}")
    if m.dtype != u.dtype:
        raise ValueError(f"{name} must have u's dtype ({u.dtype}), got {m.dtype}")


def check_args(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Validate a selective-scan call; raises ValueError naming the argument and the constraint."""
    if not torch.is_tensor(u) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor with layout [batch, dim, L], got {_shape(u)}")
    if not torch.is_tensor(delta) or tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)} [batch, dim, L], got {_shape(delta)}")
    if delta.dtype != u.dtype:
        raise ValueError(f"delta must have u's dtype ({u.dtype}), got {delta.dtype}")
    dim = u.shape[1]
    if not torch.is_tensor(A) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, dstate) with dim = {dim}, got {_shape(A)}")
    if A.is_complex() or not A.is_floating_point():
        raise ValueError(f"A must be real floating point (complex A is not supported), got {A.dtype}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"dstate (A.shape[1]) must be in [1, {MAX_DSTATE}], got {dstate}")
    _check_bc('B', B, u, dstate)
    _check_bc('C', C, u, dstate)
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and (not torch.is_tensor(t) or tuple(t.shape) != (dim,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor of shape (dim,) = ({dim},), got {_shape(t)}")
    if z is not None and (not torch.is_tensor(z) or tuple(z.shape) != tuple(u.shape) or z.dtype != u.dtype):
        raise ValueError(f"z must have u's shape {tuple(u.shape)} and dtype {u.dtype}, got "
                         f"{_shape(z)} {getattr(z, 'dtype', '')}")
    for name, t in (('delta', delta), ('A', A), ('B', B), ('C', C), ('D', D), ('z', z), ('delta_bias', delta_bias)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} must be on u's device ({u.device}), got {t.device}")


def check_orders(orders, length: int, validate: bool) -> None:
    if not torch.is_tensor(orders) or orders.dim() != 2 or orders.shape[1] != length:
        raise ValueError(f"orders must have shape (directions, L) with L = {length}, got {_shape(orders)}")
    if orders.is_floating_point() or orders.dtype == torch.bool:
        raise ValueError(f"orders must be an integer tensor, got {orders.dtype}")
    if orders.shape[0] < 1:
        raise ValueError('orders must hold at least one direction')
    if validate and length:
        expected = torch.arange(length, device=orders.device).expand_as(orders)
        if not torch.equal(orders.sort(dim=1).values, expected):
            raise ValueError('every row of orders must be a permutation of range(L)')


def selective_scan(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor] = None,
        z: Optional[Tensor] = None,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
        backend: str = 'auto',
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics.

    Args:
        u, delta: ``[batch, dim, L]`` (same dtype).
        A: ``[dim, N]`` real (``A = -exp(A_log)`` in Mamba); float32 or u's dtype.
        B, C: ``[batch, N, L]``, grouped ``[batch, G, N, L]`` (dim divisible by G) or time-invariant ``[dim, N]``.
        D, delta_bias: optional ``[dim]``. z: optional gate ``[batch, dim, L]`` (``out *= silu(z)``).
        delta_softplus: apply softplus (threshold 20) to ``delta + delta_bias``.
        return_last_state: also return the final state ``[batch, dim, N]`` (float32; float64 for float64 input).
        backend: ``'auto' | 'triton' | 'torch'``.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    if resolve_backend(backend, u) == 'torch':
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = _triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, None, True)
    return (out, last[:, 0]) if return_last_state else out


def selective_scan_multidir(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        orders: Tensor,
        D: Optional[Tensor] = None,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = False,
        B_bias: Optional[Tensor] = None,
        permute_params: bool = True,
        return_last_state: bool = False,
        validate_orders: bool = True,
        backend: str = 'auto',
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scan one token sequence in K orders with shared parameters and sum the K outputs in token order.

    Direction ``k`` is :func:`selective_scan` of ``u[..., orders[k]]`` whose output is put back at the tokens
    it came from; the K results (each cast to u's dtype, D term included per direction) are summed. All
    directions run in one kernel launch on the Triton backend.

    Args:
        u, delta, A, B, C, D, delta_bias, delta_softplus: as :func:`selective_scan` (B/C not time-invariant).
        orders: ``[K, L]`` integer, each row a permutation of ``range(L)``: step ``t`` of direction ``k`` reads
            token ``orders[k, t]``.
        B_bias: optional ``[K, N, L]`` added to B at step ``t`` of direction ``k`` (PlainMamba's
            direction-aware B).
        permute_params: ``delta``, ``B`` and ``C`` follow each direction's order (True) or are read at the step
            index, i.e. stay in token order while ``u`` is permuted (False: what PlainMamba and VCMamba compute).
        return_last_state: also return the final states ``[batch, K, dim, N]``.
        validate_orders: check that every row of ``orders`` is a permutation (one host sync).
    """
    check_args(u, delta, A, B, C, D, None, delta_bias)
    if B.dim() == 2 or C.dim() == 2:
        raise ValueError('selective_scan_multidir needs token-dependent B and C ([batch, (groups,) dstate, L])')
    check_orders(orders, u.shape[-1], validate_orders)
    if B_bias is not None:
        expected = (orders.shape[0], A.shape[1], u.shape[-1])
        if not torch.is_tensor(B_bias) or tuple(B_bias.shape) != expected or not B_bias.is_floating_point():
            raise ValueError(f"B_bias must be a floating-point tensor of shape (directions, dstate, L) = {expected}, "
                             f"got {_shape(B_bias)}")
    for name, t in (('orders', orders), ('B_bias', B_bias)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} must be on u's device ({u.device}), got {t.device}")
    if resolve_backend(backend, u) == 'torch':
        return selective_scan_multidir_reference(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, B_bias,
                                                 permute_params, return_last_state)
    out, last = _triton_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus, orders, B_bias, permute_params)
    return (out, last) if return_last_state else out


def _triton_scan(u, delta, A, B, C, D, z, delta_bias, softplus, orders, B_bias, permute_params):
    if not triton_dtype_ok(u.dtype):
        raise ValueError(f"the triton backend supports float16, bfloat16 and float32, got {u.dtype}")
    batch, dim, length = u.shape
    time_invariant = B.dim() == 2, C.dim() == 2
    # time-invariant B/C become one group per channel (a broadcast view: nothing is copied)
    B = expand_bc(B, batch, dim, length) if time_invariant[0] else B
    C = expand_bc(C, batch, dim, length) if time_invariant[1] else C
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    if orders is not None:
        orders = orders.to(torch.int32).contiguous()
    out, last, _ = _ss_forward_op(u, delta, f32(A), B.to(u.dtype), C.to(u.dtype), f32(D), z, f32(delta_bias),
                                  orders, f32(B_bias), bool(softplus), bool(permute_params))
    return out, last


@torch.library.custom_op('visionmix::selective_scan_forward', mutates_args=())
def _ss_forward_op(
        u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        delta_bias: Optional[Tensor], orders: Optional[Tensor], B_bias: Optional[Tensor], softplus: bool,
        permute_params: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    from .triton_ss import ss_forward_triton
    return ss_forward_triton(u, delta, A, B, C, D, z, delta_bias, orders, B_bias, softplus, permute_params)


@_ss_forward_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, orders, B_bias, softplus, permute_params):
    from .triton_ss import chunk_count
    batch, dim, length = u.shape
    k_dirs = 1 if orders is None else orders.shape[0]
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(u), u.new_empty(batch, k_dirs, dim, A.shape[1], **f32),
            u.new_empty(k_dirs, batch, chunk_count(length), dim, A.shape[1], **f32))


@torch.library.custom_op('visionmix::selective_scan_backward', mutates_args=())
def _ss_backward_op(
        dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
        z: Optional[Tensor], delta_bias: Optional[Tensor], orders: Optional[Tensor], B_bias: Optional[Tensor],
        chunk_states: Tensor, dlast: Optional[Tensor], softplus: bool, permute_params: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton_ss import ss_backward_triton
    return ss_backward_triton(dout, u, delta, A, B, C, D, z, delta_bias, orders, B_bias, chunk_states, dlast,
                              softplus, permute_params)


@_ss_backward_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, orders, B_bias, chunk_states, dlast, softplus, permute_params):
    empty0 = u.new_empty(0)
    like = lambda t: torch.empty_like(t) if t is not None else empty0  # noqa: E731
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias), like(B_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, orders, B_bias, softplus, permute_params = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, orders, B_bias, output[2])
    ctx.flags = (softplus, permute_params)


def _backward(ctx, dout, dlast, dchunks):
    u, delta, A, B, C, D, z, delta_bias, orders, B_bias, chunk_states = ctx.saved_tensors
    grads = _ss_backward_op(dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, orders, B_bias, chunk_states,
                            None if dlast is None else dlast.contiguous(), *ctx.flags)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dB_bias = grads
    opt = lambda g, t: g if t is not None else None  # noqa: E731
    return (du, ddelta, dA, dB, dC, opt(dD, D), opt(dz, z), opt(dbias, delta_bias), None, opt(dB_bias, B_bias),
            None, None)


_ss_forward_op.register_autograd(_backward, setup_context=_setup_context)
