"""InLine-CSwin: CSWin Transformer with InLine attention in the early stages.

Paper: `Bridging the Divide: Reconsidering Softmax and Linear Attention` - https://arxiv.org/abs/2412.06590
Original code and weights: https://github.com/LeapLabTHU/InLine (``models/inline_cswin.py``), built on CSWin
(https://arxiv.org/abs/2107.00652).

``attn_type`` as in InLine-Swin (released: ``'IISS'``). An InLine block covers the whole stage map with all heads
(its ``la_split_size`` equals the resolution) and adds LePE (``get_v``) to InLine + local residual; its
local-kernel mean is taken from the raw block input, before ``norm1``. Softmax blocks are CSWin's: cross-shaped
stripes in two half-width branches (one full-map branch in the last stage) with LePE.

Differences from the original code, none of which changes a released model's outputs:
* inputs of other sizes work (also non-square): stripes follow the actual map, InLine blocks stay global;
* timm layout: ``stage{i}`` blocks live in ``stages.{i-1}.blocks``, ``merge{i}`` is ``stages.{i}.downsample``;
* InLine blocks whose ``la_split_size`` differs from the resolution raise a ValueError (the original builds them
  but fails at run time).
"""
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.layers import InLineAttention

from .inline_swin import parse_attn_types

__all__ = ['InLineCSwin']


class LePEStripeAttention(nn.Module):
    """CSWin softmax attention in horizontal (idx 1), vertical (idx 0) or full-map (idx -1) stripes, plus LePE."""

    def __init__(self, dim: int, num_heads: int, idx: int, split_size: int, qk_scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.idx = idx
        self.split_size = split_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)

    def stripe(self, height: int, width: int) -> Tuple[int, int]:
        if self.idx == -1:
            return height, width
        sp = self.split_size
        if (width if self.idx == 0 else height) % sp != 0:
            raise ValueError('the ' + str(height) + 'x' + str(width) + ' map must be divisible by the stripe width '
                             + str(sp))
        return (height, sp) if self.idx == 0 else (sp, width)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int],
               kernel_mean: torch.Tensor) -> torch.Tensor:
        """``q, k, v [B, H*W, C]`` -> ``[B, H*W, C]`` (``kernel_mean`` is unused: InLine branches take it)."""
        height, width = hw
        batch, _, chans = q.shape
        sh, sw = self.stripe(height, width)
        heads, head_dim = self.num_heads, chans // self.num_heads
        # [B, H*W, 3C] -> [3, B * stripes, C, sh, sw]
        qkv = torch.cat([q, k, v], dim=-1).transpose(1, 2).reshape(batch, 3, chans, height // sh, sh, width // sw, sw)
        qkv = qkv.permute(1, 0, 3, 5, 2, 4, 6).reshape(3, -1, chans, sh, sw)
        lepe = self.get_v(qkv[2]).reshape(-1, heads, head_dim, sh * sw).transpose(-2, -1)
        q, k, v = qkv.reshape(3, -1, heads, head_dim, sh * sw).transpose(-2, -1).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v + lepe).transpose(1, 2).reshape(batch, height // sh, width // sw, sh, sw, chans)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * width, chans)


@register_notrace_module  # stripes follow the input size
class InLineCSwinBlock(nn.Module):
    """CSWin block: fused qkv, InLine ('I', global) or stripe ('S') attention branches, block-level proj, MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            resolution: int,
            attn_type: str = 'I',
            split_size: int = 7,
            last_stage: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.attn_type = attn_type
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        single = last_stage or resolution == split_size
        if attn_type == 'I':
            if not single:
                raise ValueError(f"an InLine block needs la_split_size equal to its stage resolution "
                                 f"({resolution}), got {split_size}")
            self.attns = nn.ModuleList([InLineAttention(dim, num_heads, qkv_mode='none', proj=False, lepe=True,
                                                        **dd)])
        elif single:
            self.attns = nn.ModuleList([LePEStripeAttention(dim, num_heads, -1, split_size, qk_scale, **dd)])
        else:
            self.attns = nn.ModuleList([
                LePEStripeAttention(dim // 2, num_heads // 2, i, split_size, qk_scale, **dd) for i in range(2)])
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)

    def _attention(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, x.shape[-1])).unbind(-2)
        x_mean = x.mean(1)  # InLine kernels come from the un-normalised input
        width = x.shape[-1] // len(self.attns)
        outs: List[torch.Tensor] = []
        for i, attn in enumerate(self.attns):
            lo, hi = i * width, (i + 1) * width
            outs.append(attn.attend(q[..., lo:hi], k[..., lo:hi], v[..., lo:hi], hw, x_mean[..., lo:hi]))
        return torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.proj_drop(self.proj(self._attention(x, hw))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MergeBlock(nn.Module):
    """3x3 stride-2 conv then LayerNorm, tokens in and out."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.conv(x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1]))
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class InLineCSwinStage(nn.Module):
    """Optional merge block (all stages but the first), then blocks; tokens and grid in and out."""

    def __init__(self, dim: int, out_dim: int, downsample: bool, blocks: List[nn.Module], device=None, dtype=None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = MergeBlock(dim, out_dim, device=device, dtype=dtype) if downsample else None
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        return x, hw


class InLineCSwin(nn.Module):
    """CSWin Transformer with InLine attention (stem keeps the original ``stage1_conv_embed`` name).

    Args:
        img_size: native input size (fixes which blocks are single-branch).
        in_chans, num_classes: input channels, classifier outputs (0 for none).
        global_pool: ``'avg'`` or ``''``.
        embed_dim: channels of the first stage; doubled at every later stage.
        depths, num_heads: per stage.
        split_size: stripe width of the softmax blocks per stage.
        la_split_size: per stage "split" of the InLine blocks (must equal the stage resolution).
        attn_type: block types, as in InLine-Swin.
        drop_rate, proj_drop_rate, drop_path_rate: head dropout, projection dropout, stochastic depth.
    """

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (2, 4, 18, 1),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            split_size: Sequence[int] = (1, 2, 7, 7),
            la_split_size: Sequence[int] = (56, 28, 14, 7),
            attn_type: str = 'IISS',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"InLine-CSwin has 4 stages, got depths={depths}")
        for name, seq in (('num_heads', num_heads), ('split_size', split_size), ('la_split_size', la_split_size)):
            if len(seq) != 4:
                raise ValueError(f"{name} must give one value per stage (4), got {seq!r}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        block_types = parse_attn_types(attn_type, depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.num_stages = 4
        dims = [embed_dim * 2 ** i for i in range(4)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, 4, 2, **dd), nn.Identity(), nn.LayerNorm(embed_dim, **dd))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.feature_info, cur, stages = [], 0, []
        for i in range(4):
            stages.append(InLineCSwinStage(dims[i - 1] if i else dims[0], dims[i], i > 0, [
                InLineCSwinBlock(
                    dims[i], num_heads[i], img_size // (4 * 2 ** i), attn_type=kind,
                    split_size=la_split_size[i] if kind == 'I' else split_size[i], last_stage=i == 3,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                    drop_path=dpr[cur + j], **dd)
                for j, kind in enumerate(block_types[i])], **dd))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stage1_conv_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

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
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        w = self.stage1_conv_embed[0].weight
        self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.stage1_conv_embed[0](x)
        return self.stage1_conv_embed[2](x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns stage outputs (NCHW or NHWC); ``norm`` normalises the last one."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        x, hw = self._stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x, hw = stage(x, hw)
            if i in take_indices:
                y = self.norm(x) if norm and i == last_idx else x
                y = y.reshape(y.shape[0], hw[0], hw[1], -1)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self.norm(x)
        return x.reshape(x.shape[0], hw[0], hw[1], -1), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and optionally norm and head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised final map, NHWC."""
        x, hw = self._stem(x)
        for stage in self.stages:
            x, hw = stage(x, hw)
        return self.norm(x).reshape(x.shape[0], hw[0], hw[1], -1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def remap_official_key(key: str) -> str:
    """Key of the original InLine-CSwin state_dict -> key of :class:`InLineCSwin`."""
    match = re.match(r'^merge(\d)\.(.*)$', key)
    if match:
        return f'stages.{match.group(1)}.downsample.{match.group(2)}'
    match = re.match(r'^stage(\d)\.(\d+)\.(.*)$', key)
    if match:
        return f'stages.{int(match.group(1)) - 1}.blocks.{match.group(2)}.{match.group(3)}'
    return key


def checkpoint_filter_fn(state_dict, model: InLineCSwin):
    """Released InLine-CSwin checkpoint -> this model (same layout).

    Takes ``'model'`` from a training dict (what the original evaluates with ``--resume``), else the EMA weights
    under ``'state_dict_ema'``; strips ``module.`` and moves ``stage{i}`` / ``merge{i}`` under ``stages``.
    """
    for wrapper in ('model', 'state_dict_ema', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    return {remap_official_key(k.removeprefix('module.')): v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stage1_conv_embed.0', 'classifier': 'head',
        'license': 'unknown', 'origin_url': 'https://github.com/LeapLabTHU/InLine', 'custom_load': True,
        'paper_ids': 'arXiv:2412.06590',
        'paper_name': 'Bridging the Divide: Reconsidering Softmax and Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'inline_cswin_tiny.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/49fa2ecc543647c4b970/?dl=1'),
    'inline_cswin_small.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/59f4e65f776f4052b93c/?dl=1'),
    'inline_cswin_base.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/91e17121df284ae38521/?dl=1'),
    # the repository has the config but no released weights for 384
    'inline_cswin_base_384': _cfg(input_size=(3, 384, 384), min_input_size=(3, 384, 384), pool_size=(12, 12),
                                  crop_pct=1.0),
    'test_inline_cswin': _cfg(input_size=(3, 64, 64), min_input_size=(3, 64, 64), pool_size=(2, 2),
                              license='apache-2.0'),
})


def _create_inline_cswin(variant: str, pretrained: bool = False, **kwargs) -> InLineCSwin:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        InLineCSwin, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_SPLIT_224 = dict(split_size=(1, 2, 7, 7), la_split_size=(56, 28, 14, 7), attn_type='IISS')


@register_model
def inline_cswin_tiny(pretrained=False, **kwargs) -> InLineCSwin:
    model_args = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), drop_path_rate=0.2, **_SPLIT_224)
    return _create_inline_cswin('inline_cswin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_cswin_small(pretrained=False, **kwargs) -> InLineCSwin:
    model_args = dict(embed_dim=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.4, **_SPLIT_224)
    return _create_inline_cswin('inline_cswin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_cswin_base(pretrained=False, **kwargs) -> InLineCSwin:
    model_args = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_SPLIT_224)
    return _create_inline_cswin('inline_cswin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_cswin_base_384(pretrained=False, **kwargs) -> InLineCSwin:
    model_args = dict(img_size=384, embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                      split_size=(1, 2, 12, 12), la_split_size=(96, 48, 24, 12), attn_type='IISS',
                      drop_path_rate=0.7)
    return _create_inline_cswin('inline_cswin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_inline_cswin(pretrained=False, **kwargs) -> InLineCSwin:
    model_args = dict(img_size=64, embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), split_size=(1, 2, 2, 2),
                      la_split_size=(16, 8, 4, 2), attn_type='IISS', mlp_ratio=2, drop_path_rate=0.1)
    return _create_inline_cswin('test_inline_cswin', pretrained=pretrained, **dict(model_args, **kwargs))
