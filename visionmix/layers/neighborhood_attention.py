"""Neighborhood attention modules (qkv + proj around ``visionmix.kernels.na{1,2,3}d``), as in NATTEN.

Unlike current NATTEN the modules keep the relative positional bias NAT/DiNAT were trained with
(``rel_pos_bias=True``), in the forward and the backward pass.
"""
from typing import Optional, Sequence, Union

import torch
from timm.layers import trunc_normal_
from timm.models import register_notrace_module
from torch import nn

from visionmix.kernels.neighborhood import neighborhood_attention

__all__ = ['NeighborhoodAttention', 'NeighborhoodAttention1D', 'NeighborhoodAttention2D', 'NeighborhoodAttention3D']

IntOrSeq = Union[int, Sequence[int]]


def _tuple(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last map ``[B, *spatial, C]``.

    ``qkv`` rows are ordered (q|k|v, head, head_dim) like NATTEN and NAT checkpoints.
    """
    rank: int = 2

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: IntOrSeq,
            stride: IntOrSeq = 1,
            dilation: IntOrSeq = 1,
            is_causal: Union[bool, Sequence[bool]] = False,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            rel_pos_bias: bool = False,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = _tuple(kernel_size, self.rank)
        self.stride = _tuple(stride, self.rank)
        self.dilation = _tuple(dilation, self.rank)
        self.is_causal = _tuple(is_causal, self.rank)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *[2 * k - 1 for k in self.kernel_size], **dd))
            trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'dilation={self.dilation}, is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}')

    @torch.jit.ignore
    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``[B, *spatial, 3 * C]`` projections -> ``[B, *spatial, C]`` attention output (kept out of TorchScript)."""
        rank = len(self.kernel_size)  # not self.rank: a scripted module calls this with only its attributes
        if qkv.dim() != rank + 2:
            raise ValueError(f"x must be channels-last [B, {', '.join('XYZ'[:rank])}, C] for "
                             f"{rank}-D neighborhood attention, got {qkv.dim()} dims")
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        rpb = self.rpb.to(q.dtype) if self.rpb is not None else None  # under autocast q is half, the bias is not
        x = neighborhood_attention(
            q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, rpb=rpb, scale=self.scale)
        return x.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._attend(self.qkv(x))
        return self.proj_drop(self.proj(x))


@register_notrace_module
class NeighborhoodAttention1D(NeighborhoodAttention):
    rank = 1


@register_notrace_module
class NeighborhoodAttention2D(NeighborhoodAttention):
    rank = 2


@register_notrace_module
class NeighborhoodAttention3D(NeighborhoodAttention):
    rank = 3
