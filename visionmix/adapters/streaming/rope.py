"""Wan-style 3-D rotary position embedding at arbitrary frame positions.

Wan (https://arxiv.org/abs/2503.20314) splits the ``head_dim / 2`` rotary channel pairs over (frame, height,
width) as ``[c - 2 * (c // 3), c // 3, c // 3]`` and rotates adjacent channel pairs. A streaming cache keeps
keys before RoPE and rotates them again at every call at positions relative to the current chunk, so the frame
positions here are any integers (negative ones included), not a prefix of a table.
"""
from collections import OrderedDict
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ...kernels.linear_attention import apply_rope

__all__ = ['VideoRope']


class VideoRope:
    """Rotary embedding over tokens in (frame, height, width) raster order."""

    cache_size = 16

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim must be even and at least 6 for a 3-D rotary embedding, got {head_dim}")
        pairs = head_dim // 2
        self.head_dim = head_dim
        self.split = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)
        # diffusers' get_1d_rotary_pos_embed: one table per axis with dim = 2 * pairs of that axis, float64
        self.inv_freq = [1.0 / theta ** (torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n)) for n in self.split]
        self._spatial = {}
        self._tables = OrderedDict()  # a few recent (positions, grid, device, dtype) tables, kept on the device

    def _spatial_angles(self, height: int, width: int) -> Tensor:
        key = (height, width)
        if key not in self._spatial:
            hh = torch.arange(height, dtype=torch.float64)[:, None, None] * self.inv_freq[1]
            ww = torch.arange(width, dtype=torch.float64)[None, :, None] * self.inv_freq[2]
            self._spatial[key] = torch.cat([hh.expand(height, width, -1), ww.expand(height, width, -1)], -1)
        return self._spatial[key]

    def tables(self, frame_positions: Sequence[int], height: int, width: int, device=None,
               dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """``cos, sin`` ``[len(frame_positions) * height * width, head_dim]``, each angle repeated for its pair.

        Cached on the device, so a steady streaming step reuses them without host-to-device copies (which a CUDA
        graph capture would refuse).
        """
        positions = frame_positions if isinstance(frame_positions, tuple) else tuple(int(p) for p in frame_positions)
        key = (positions, height, width, str(device), dtype)
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        frames = torch.as_tensor(positions, dtype=torch.float64)[:, None] * self.inv_freq[0]
        spatial = self._spatial_angles(height, width).reshape(height * width, -1)
        angles = torch.cat([frames[:, None, :].expand(-1, height * width, -1),
                            spatial[None].expand(frames.shape[0], -1, -1)], -1).reshape(-1, self.head_dim // 2)
        angles = angles.repeat_interleave(2, -1)
        table = angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)
        self._tables[key] = table
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return table

    def cos_sin(self, frame_positions: Sequence[int], height: int, width: int, device=None,
                dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """One angle per channel pair: ``cos, sin`` ``[len(frame_positions) * height * width, head_dim // 2]``."""
        cos, sin = self.tables(frame_positions, height, width, device, dtype)
        return cos[:, 0::2], sin[:, 0::2]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` ``[..., N, heads, head_dim]`` by :meth:`tables` ``[..., N, head_dim]`` (leading dims
        broadcast), computing in the tables' precision and returning ``x``'s dtype."""
        acc = torch.promote_types(x.dtype, cos.dtype)
        return apply_rope(x.to(acc), cos.to(acc), sin.to(acc)).to(x.dtype)

    def apply(self, x: Tensor, frame_positions: Sequence[int], height: int, width: int) -> Tensor:
        """``x`` ``[B, len(frame_positions) * height * width, heads, head_dim]`` rotated at those positions."""
        if x.shape[1] != len(frame_positions) * height * width:
            raise ValueError(f"x holds {x.shape[1]} tokens, but {len(frame_positions)} frames of {height}x{width} "
                             f"tokens were given")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self.rotate(x, *self.tables(frame_positions, height, width, x.device, acc))
