"""InLine attention: injective linear attention with a dynamic local residual.

Paper: `Bridging the Divide: Reconsidering Softmax and Linear Attention` (Han et al., NeurIPS 2024),
https://arxiv.org/abs/2412.06590. Original code: https://github.com/LeapLabTHU/InLine.

Per head, with ``s = head_dim ** -0.5`` and ``N`` keys (prefix tokens included)::

    out_i = (s / N) q_i^T sum_j k_j v_j^T + (1 - s q_i . mean_j k_j) mean_j v_j

computed by :func:`visionmix.kernels.linear_attention` (``form='inline'``). A per-sample depthwise 3x3 conv on
V is added to the spatial tokens before the output projection: its kernels come from a grouped (groups = heads)
Conv1d -> GELU -> Conv1d on the token mean of a source the host chooses (the attention input, or the raw block
input in CSwin). CSwin also adds LePE, a static depthwise 3x3 conv on V (``get_v``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module
from torch import nn

from visionmix.kernels import linear_attention

__all__ = ['InLineAttention', 'dynamic_depthwise_conv3x3', 'inline_readout']


def dynamic_depthwise_conv3x3(v: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise 3x3 conv, zero padding 1, no bias: ``v [B, C, H, W]``, ``kernels [B, C, 3, 3]``."""
    batch, chans, height, width = v.shape
    out = F.conv2d(v.reshape(1, batch * chans, height, width), kernels.reshape(batch * chans, 1, 3, 3),
                   padding=1, groups=batch * chans)
    return out.reshape(batch, chans, height, width)


@register_notrace_function
@torch.jit.ignore
def inline_readout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_prefix_tokens: int,
                   hw: Tuple[int, int]) -> torch.Tensor:
    """The InLine readout of ``q, k, v [B, P + H*W, C]`` (heads split channel-major) -> ``[B, P + H*W, C]``."""
    batch, num_tokens, chans = q.shape
    height, width = hw
    if num_tokens != num_prefix_tokens + height * width:
        raise ValueError(f"expected {num_prefix_tokens} prefix tokens + a {height}x{width} map = "
                         f"{num_prefix_tokens + height * width} tokens, got {num_tokens}")
    heads = (batch, num_tokens, num_heads, chans // num_heads)
    out = linear_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), form='inline')
    return out.reshape(batch, num_tokens, chans)


@register_notrace_module  # token-count checks and the per-sample conv depend on the input size
class InLineAttention(nn.Module):
    """InLine attention over one token map (optionally with prefix tokens).

    Args:
        dim: channels.
        num_heads: heads (``dim`` must divide evenly).
        qkv_bias: bias of the q/k/v projections.
        qkv_mode: ``'fused'`` (one ``qkv`` Linear, DeiT/Swin), ``'q_kv'`` (``q`` and ``kv`` Linears, PVT) or
            ``'none'`` (q, k, v are computed by the host and passed to :meth:`attend`, CSwin).
        proj: add the output projection ``proj`` (CSwin projects at the block level instead).
        lepe: add LePE, the static depthwise 3x3 conv ``get_v`` on V (CSwin).
        num_prefix_tokens: leading tokens (DeiT's cls) that take part in the attention and the kernel mean but
            get no local term.
        proj_drop: dropout after ``proj``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            qkv_mode: str = 'fused',
            proj: bool = True,
            lepe: bool = False,
            num_prefix_tokens: int = 0,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if qkv_mode not in ('fused', 'q_kv', 'none'):
            raise ValueError(f"qkv_mode must be 'fused', 'q_kv' or 'none', got {qkv_mode!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv_mode = qkv_mode
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd) if qkv_mode == 'fused' else None
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd) if qkv_mode == 'q_kv' else None
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd) if qkv_mode == 'q_kv' else None
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd) if lepe else None
        # kernel generator: flat output index c * 9 + ky * 3 + kx
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads, **dd),
            nn.GELU(),
            nn.Conv1d(dim, dim * 9, kernel_size=1, groups=num_heads, **dd),
        )
        self.proj = nn.Linear(dim, dim, **dd) if proj else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def local_kernels(self, kernel_mean: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` token mean -> ``[B, C, 3, 3]`` per-sample depthwise kernels."""
        return self.residual(kernel_mean.unsqueeze(-1)).reshape(kernel_mean.shape[0], self.dim, 3, 3)

    def attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            hw: Tuple[int, int],
            kernel_mean: torch.Tensor,
    ) -> torch.Tensor:
        """InLine readout plus local terms, before ``proj``: ``q, k, v [B, P + H*W, C]`` -> ``[B, P + H*W, C]``.

        ``kernel_mean [B, C]`` is the token mean the local kernels are predicted from.
        """
        prefix = self.num_prefix_tokens
        out = inline_readout(q, k, v, self.num_heads, prefix, hw)
        batch, _, chans = q.shape
        v_map = v[:, prefix:].transpose(1, 2).reshape(batch, chans, hw[0], hw[1])
        local = dynamic_depthwise_conv3x3(v_map, self.local_kernels(kernel_mean))
        if self.get_v is not None:
            local = local + self.get_v(v_map)
        local = local.flatten(2).transpose(1, 2)
        if prefix > 0:
            return torch.cat([out[:, :prefix], out[:, prefix:] + local], dim=1)
        return out + local

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], kernel_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, P + H*W, C]`` -> ``[B, P + H*W, C]``; the kernel mean defaults to ``x.mean(1)``."""
        if self.qkv is not None:
            q, k, v = self.qkv(x).unflatten(-1, (3, self.dim)).unbind(-2)
        elif self.q is not None and self.kv is not None:
            q = self.q(x)
            k, v = self.kv(x).unflatten(-1, (2, self.dim)).unbind(-2)
        else:
            raise ValueError("qkv_mode='none' takes q, k and v: call attend(q, k, v, hw, kernel_mean)")
        out = self.attend(q, k, v, hw, x.mean(1) if kernel_mean is None else kernel_mean)
        return self.proj_drop(self.proj(out))
