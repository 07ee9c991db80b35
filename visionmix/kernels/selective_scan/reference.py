"""Mamba-1 selective scan in plain PyTorch: the definition of the op (float64-capable).

For every batch ``b`` and channel ``d``, with ``dt = softplus?(delta + delta_bias)`` (softplus threshold 20):

    h[t] = exp(dt[t] * A[d]) * h[t-1] + dt[t] * u[t] * B[t],   h[-1] = 0     (h: one value per state n)
    y[t] = <h[t], C[t]> + D[d] * u[t],   out = y * silu(z) when z is given

All arithmetic runs in float32 (float64 for float64 inputs) and ``out`` is cast to ``u``'s dtype, as in
mamba-ssm's ``selective_scan_ref``. Paper: https://arxiv.org/abs/2312.00752
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['selective_scan_reference', 'selective_scan_multidir_reference', 'expand_bc']


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_bc(m: Tensor, batch: int, dim: int, length: int) -> Tensor:
    """``B``/``C`` in any of mamba's layouts as a ``[batch, dim, N, L]`` view.

    ``[dim, N]`` (time-invariant), ``[batch, N, L]`` (one group) or ``[batch, G, N, L]`` (``dim / G`` channels
    per group).
    """
    if m.dim() == 2:
        return m[None, :, :, None].expand(batch, dim, m.shape[1], length)
    if m.dim() == 3:
        return m[:, None].expand(batch, dim, m.shape[1], length)
    return m.repeat_interleave(dim // m.shape[1], dim=1)


def selective_scan_reference(
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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Sequential selective scan; shapes as :func:`visionmix.kernels.selective_scan` (``last_state`` in the
    compute dtype, ``[batch, dim, N]``)."""
    dtype_in = u.dtype
    cdt = compute_dtype(dtype_in)
    batch, dim, length = u.shape
    u_c, dt = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)  # threshold 20, as the CUDA kernel
    a = A.to(cdt)
    b_t = expand_bc(B.to(cdt), batch, dim, length)
    c_t = expand_bc(C.to(cdt), batch, dim, length)
    decay = torch.exp(dt[:, :, None, :] * a[None, :, :, None])  # [b, d, n, l]
    drive = (dt * u_c)[:, :, None, :] * b_t
    h = u_c.new_zeros(batch, dim, a.shape[1])
    ys = []
    # unbind: one backward for all steps (indexing step by step would build a full-size gradient per step)
    for decay_t, drive_t, c_step in zip(decay.unbind(-1), drive.unbind(-1), c_t.unbind(-1)):
        h = decay_t * h + drive_t
        ys.append((h * c_step).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_multidir_reference(
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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """K scans of one token sequence, one per order, each put back in token order and summed.

    Direction ``k`` scans ``u[..., orders[k]]``; ``delta``, ``B`` and ``C`` follow the same order when
    ``permute_params`` and are read by step index otherwise (PlainMamba / VCMamba). ``B_bias[k, :, t]`` is added
    to ``B`` at step ``t`` of direction ``k``. Each direction's output is cast to ``u``'s dtype before the sum.
    """
    batch, dim, length = u.shape
    k_dirs = orders.shape[0]
    inverse = torch.argsort(orders, dim=1)
    u_k = torch.stack([u[..., o] for o in orders])  # [K, b, d, L] in scan order
    if permute_params:
        delta_k = torch.stack([delta[..., o] for o in orders])
        b_k = torch.stack([B[..., o] for o in orders])
        c_k = torch.stack([C[..., o] for o in orders])
    else:
        delta_k = delta.expand(k_dirs, *delta.shape)
        b_k, c_k = B.expand(k_dirs, *B.shape), C.expand(k_dirs, *C.shape)
    if B_bias is not None:
        bias = B_bias.to(B.dtype)
        b_k = b_k + (bias[:, None] if B.dim() == 3 else bias[:, None, None])
    flat = lambda t: t.reshape(k_dirs * batch, *t.shape[2:])  # noqa: E731
    out = selective_scan_reference(flat(u_k), flat(delta_k), A, flat(b_k), flat(c_k), D=D, delta_bias=delta_bias,
                                   delta_softplus=delta_softplus, return_last_state=return_last_state)
    y, last = out if return_last_state else (out, None)
    y = y.reshape(k_dirs, batch, dim, length)
    y = sum(y[k][..., inverse[k]] for k in range(k_dirs))
    if return_last_state:
        return y, last.reshape(k_dirs, batch, dim, -1).transpose(0, 1)
    return y
