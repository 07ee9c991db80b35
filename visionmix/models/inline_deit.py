"""InLine-DeiT: DeiT with every attention replaced by InLine attention.

Paper: `Bridging the Divide: Reconsidering Softmax and Linear Attention` - https://arxiv.org/abs/2412.06590
Original code and weights: https://github.com/LeapLabTHU/InLine (``models/inline_deit.py``).

The cls token takes part in the attention (it is one of the N keys and in every mean) but gets no local
(3x3) term. The sizes are not DeiT's: Tiny has 6 heads, Small is 320 wide at 288 px, Base 384 wide at 448 px.

Differences from the original code, none of which changes a released model's outputs:
* inputs of another size (also non-square) work: ``pos_embed`` is resampled (bicubic) to the patch grid;
* the local conv takes the patch grid from the input instead of ``int(sqrt(N))``.
"""
from typing import List, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, register_notrace_function, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.layers import InLineAttention

__all__ = ['InLineDeiT']


@register_notrace_function
def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """``pos_embed`` (cls + ``grid`` patches) for a ``hw`` patch grid (bicubic, as timm's ViT)."""
    if tuple(hw) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [int(hw[0]), int(hw[1])], list(grid), num_prefix_tokens=1)


class InLineDeiTBlock(nn.Module):
    """Pre-norm block: InLine attention (cls token excluded from the local term), then MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            num_prefix_tokens: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, num_prefix_tokens=num_prefix_tokens,
                                    proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class InLineDeiT(nn.Module):
    """DeiT (one cls token, learned absolute position embedding) with InLine attention in every block.

    Args:
        img_size: size the position embedding is made for (other sizes are resampled to).
        patch_size: patch size of the stem.
        in_chans, num_classes: input channels, classifier outputs (0 for none).
        global_pool: ``'token'`` (cls token, as released), ``'avg'`` (patch-token mean) or ``''``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer sizes.
        drop_rate, proj_drop_rate, drop_path_rate: head/pos dropout, projection dropout, stochastic depth.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt='NHWC',
                                      strict_img_size=False, **dd)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            InLineDeiTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                            drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if not self.pos_embed.is_meta:
            trunc_normal_(self.pos_embed, std=.02)
            trunc_normal_(self.cls_token, std=.02)
            self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None),
                                                                      (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an original release file (a training dict that pickles a yacs ``CfgNode``) or a state_dict.

        timm's ``weights_only`` loader refuses those files; the pretrained cfgs set ``custom_load`` so that
        timm calls this. A classifier of another shape (other ``num_classes``) is left initialised.
        """
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        w = self.patch_embed.proj.weight
        self.head = nn.Linear(self.embed_dim, num_classes, device=w.device, dtype=w.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.patch_embed(x)  # [B, H, W, C]
        hw = (x.shape[1], x.shape[2])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        return self.pos_drop(x + resample_pos_embed(self.pos_embed, self.grid_size, hw)), hw

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns block outputs (patch tokens; NCHW maps or NLC tokens).

        Args:
            indices: last n blocks if int, all if None, else the block indices to take.
            return_prefix_tokens: also return each block's cls token, as ``(map, cls)`` pairs.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block taken.
            output_fmt: ``'NCHW'`` or ``'NLC'``.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (height, width) = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (height, width), use_reentrant=False)
            else:
                x = block(x, (height, width))
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, :1], y[:, 1:]
                if output_fmt == 'NCHW':
                    tokens = tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the blocks (and optionally norm and head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model: InLineDeiT):
    """Released InLine-DeiT checkpoint (bare, or the training dict under ``'model'``) -> this model.

    The layouts are the same; ``pos_embed`` is resampled when the model's patch grid differs.
    """
    for wrapper in ('model', 'state_dict_ema', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix('module.')
        if k == 'pos_embed' and v.shape != model.pos_embed.shape:
            old = int(round((v.shape[1] - 1) ** 0.5))
            v = resample_abs_pos_embed(v, list(model.grid_size), [old, old], num_prefix_tokens=1)
        out[k] = v
    return out


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'unknown', 'origin_url': 'https://github.com/LeapLabTHU/InLine', 'custom_load': True,
        'paper_ids': 'arXiv:2412.06590',
        'paper_name': 'Bridging the Divide: Reconsidering Softmax and Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'inline_deit_tiny.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/1d6b8191ad6d4114b291/?dl=1'),
    'inline_deit_small.in1k': _cfg(
        url='https://cloud.tsinghua.edu.cn/f/2f3898b07e9247f3beb3/?dl=1', input_size=(3, 288, 288)),
    'inline_deit_base.in1k': _cfg(
        url='https://cloud.tsinghua.edu.cn/f/10bdd726d4b0435eb34e/?dl=1', input_size=(3, 448, 448)),
    'test_inline_deit': _cfg(input_size=(3, 64, 64), min_input_size=(3, 32, 32), license='apache-2.0'),
})


def _create_inline_deit(variant: str, pretrained: bool = False, **kwargs) -> InLineDeiT:
    # four maps for dense prediction, from evenly spaced blocks as ViT detection/segmentation backbones take them
    depth = kwargs.get('depth', 12)
    out_indices = kwargs.pop('out_indices', tuple(sorted({max(0, depth * (i + 1) // 4 - 1) for i in range(4)})))
    return build_model_with_cfg(
        InLineDeiT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def inline_deit_tiny(pretrained=False, **kwargs) -> InLineDeiT:
    model_args = dict(img_size=224, embed_dim=192, depth=12, num_heads=6, drop_path_rate=0.1)
    return _create_inline_deit('inline_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_deit_small(pretrained=False, **kwargs) -> InLineDeiT:
    model_args = dict(img_size=288, embed_dim=320, depth=12, num_heads=10, drop_path_rate=0.1)
    return _create_inline_deit('inline_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_deit_base(pretrained=False, **kwargs) -> InLineDeiT:
    model_args = dict(img_size=448, embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1)
    return _create_inline_deit('inline_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_inline_deit(pretrained=False, **kwargs) -> InLineDeiT:
    model_args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2,
                      drop_path_rate=0.1)
    return _create_inline_deit('test_inline_deit', pretrained=pretrained, **dict(model_args, **kwargs))
