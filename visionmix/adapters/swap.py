"""Training-free attention swaps for pretrained timm models.

``swap_attention(model, 'grat', ...)`` replaces the self-attention of every block of a timm
``VisionTransformer`` (``vit_*``, ``deit_*``, ...) by GRAT attention (https://arxiv.org/abs/2505.14687). The new
module reuses the old one's ``qkv``/``proj`` Linear layers (and norms), so the weights and the state dict keys
are untouched. The cls/register (prefix) tokens form one dense block, as the text does in the paper's DiTs.

The patch grid comes from ``model.patch_embed`` at swap time. Inputs of another size work when the grid can be
told from the token count: the swap-time grid, else the grid of the same aspect ratio; otherwise call
``GratViTAttention.set_grid`` (or :func:`set_grat_grid`) first.
"""
import math
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from timm.layers import Attention
from timm.models import register_notrace_module
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visionmix.layers.grat import grat_attention, grat_index

__all__ = ['swap_attention', 'GratViTAttention', 'set_grat_grid']


def _grid_for(grid: Tuple[int, int], num_tokens: int) -> Tuple[int, int]:
    if num_tokens == grid[0] * grid[1]:
        return grid
    height = max(int(round(math.sqrt(num_tokens * grid[0] / grid[1]))), 1)
    if num_tokens % height == 0 and height * grid[1] == (num_tokens // height) * grid[0]:
        return height, num_tokens // height
    raise ValueError(f"cannot tell the patch grid of {num_tokens} patch tokens (swap-time grid {tuple(grid)}); "
                     f"call set_grat_grid(model, (H, W)) for this input size")


@register_notrace_module  # the grid and the index depend on the token count
class GratViTAttention(nn.Module):
    """GRAT self-attention in place of a timm ``Attention``, sharing its layers.

    Args:
        attn: the timm ``Attention`` to replace (its ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` and ``proj``
            are reused, not copied).
        grid: patch grid ``(H, W)``.
        num_prefix_tokens: leading cls/register tokens (one dense block).
        group_size, mode, radius: the GRAT pattern (:func:`visionmix.layers.grat.grat_index`).
    """

    def __init__(
            self,
            attn: Attention,
            grid: Sequence[int],
            num_prefix_tokens: int,
            group_size: Union[int, Sequence[int]] = 2,
            mode: str = 'X',
            radius: Union[int, Sequence[int]] = 1,
    ):
        super().__init__()
        if attn.attn_drop.p > 0:
            raise ValueError('GRAT attention has no attention dropout; build the model with attn_drop_rate=0')
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, 'attn_dim', attn.num_heads * attn.head_dim)
        self.scale = float(attn.scale)
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, 'norm', nn.Identity())
        self.gate = getattr(attn, 'gate', None)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid: Tuple[int, int] = (1, 1)
        self.group_size: Tuple[int, int] = (1, 1)
        self.mode = 'X'
        self.radius: Tuple[int, int] = (1, 1)
        self.configure(grid, group_size, mode, radius)

    def configure(self, grid, group_size, mode: str, radius) -> None:
        """Set the patch grid and the GRAT pattern (checked here: a grid the groups do not divide is an error)."""
        grat_index(grid, group_size, mode, radius, self.num_prefix_tokens, True)
        two = lambda x: (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))
        self.grid, self.group_size, self.mode, self.radius = two(grid), two(group_size), mode.upper(), two(radius)

    def set_grid(self, grid: Sequence[int]) -> None:
        """The patch grid ``(H, W)`` of the next inputs."""
        self.configure(grid, self.group_size, self.mode, self.radius)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, grid={self.grid}, group_size={self.group_size}, mode={self.mode!r}, '
                f'radius={self.radius}, num_prefix_tokens={self.num_prefix_tokens}')

    @torch.jit.ignore
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Heads-last ``[B, N, heads, head_dim]`` -> same; kept out of TorchScript."""
        grid = _grid_for(self.grid, q.shape[1] - self.num_prefix_tokens)
        return grat_attention(q, k, v, grid, self.group_size, self.mode, self.radius,
                              text_tokens=self.num_prefix_tokens, text_first=True, scale=self.scale)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('GRAT attention takes no attn_mask and is not causal')
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)  # norms act on head_dim, so the heads-last layout is fine
        x = self._attend(q, k, v).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def _find_vit(model: nn.Module) -> VisionTransformer:
    for module in model.modules():  # the model itself, or inside a features_only wrapper
        if isinstance(module, VisionTransformer):
            return module
    raise ValueError(f"swap_attention(..., 'grat') supports timm VisionTransformer models, got "
                     f"{type(model).__name__}")


def _swap_grat(
        model: nn.Module,
        group_size: Union[int, Sequence[int]] = 2,
        mode: str = 'X',
        radius: Union[int, Sequence[int]] = 1,
        blocks: Optional[Iterable[int]] = None,
        grid: Optional[Sequence[int]] = None,
) -> nn.Module:
    vit = _find_vit(model)
    grid = tuple(vit.patch_embed.grid_size) if grid is None else tuple(grid)
    chosen = None if blocks is None else {int(i) % len(vit.blocks) for i in blocks}
    swapped = 0
    for i, block in enumerate(vit.blocks):
        if chosen is not None and i not in chosen:
            continue
        for name, child in block.named_children():
            if isinstance(child, GratViTAttention):
                child.configure(grid, group_size, mode, radius)
            elif isinstance(child, Attention):
                setattr(block, name, GratViTAttention(child, grid, vit.num_prefix_tokens, group_size, mode, radius))
            else:
                continue
            swapped += 1
    if not swapped:
        raise ValueError("no timm Attention module found in the model's blocks")
    return model


_SWAPS = {'grat': _swap_grat}


def swap_attention(model: nn.Module, kind: str = 'grat', **options) -> nn.Module:
    """Replace the attention of a pretrained model in place (weights untouched) and return the model.

    ``kind='grat'``: GRAT on a timm ``VisionTransformer``. Options: ``group_size`` (default 2, i.e. 2x2 patches),
    ``mode`` (``'X'`` criss-cross, default, or ``'B'`` surrounding blocks), ``radius`` (GRAT-B, default 1),
    ``blocks`` (indices of the blocks to swap, default all), ``grid`` (patch grid, default
    ``model.patch_embed.grid_size``). Swapping an already swapped model changes its pattern.
    """
    if kind not in _SWAPS:
        raise ValueError(f"kind must be one of {sorted(_SWAPS)}, got {kind!r}")
    return _SWAPS[kind](model, **options)


def set_grat_grid(model: nn.Module, grid: Sequence[int]) -> None:
    """Set the patch grid ``(H, W)`` of every GRAT attention in ``model`` (for inputs whose grid cannot be told
    from the token count)."""
    for module in model.modules():
        if isinstance(module, GratViTAttention):
            module.set_grid(grid)
