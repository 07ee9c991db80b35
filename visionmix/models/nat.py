"""NAT and DiNAT: Neighborhood Attention Transformers.

Papers:
* `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
* `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

Original code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).
DiNAT is NAT with a dilation per block, so one model class serves both families. Computes what
the released models compute with NATTEN <= 0.17 (relative positional bias included) on
visionmix's neighborhood-attention kernels.

Differences from the original code, none of which changes a released model's outputs:
* inputs whose feature maps are smaller than ``kernel_size * dilation`` raise a ValueError instead
  of being zero-padded inside the attention (NATTEN 0.14 padded, NATTEN >= 0.17 raises);
* the downsampler of level ``i`` lives at the start of ``stages.{i+1}`` (timm layout), so every
  stage output is the full-resolution map before downsampling; ``checkpoint_filter_fn`` moves keys.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerScale,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from visionmix.layers import NeighborhoodAttention2D

__all__ = ['NAT']


class ConvTokenizer(nn.Module):
    """Two stride-2 3x3 convs (no norm or activation between them), then LayerNorm: stride 4, NHWC out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd)
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        return self.norm(x.permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv without bias, then LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.norm = nn.LayerNorm(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2))
        return self.norm(x.permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """Pre-norm block: neighborhood attention, then MLP, each with optional layer scale."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            ls_init_value: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = NeighborhoodAttention2D(
            dim, num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias, qk_scale=qk_scale,
            rel_pos_bias=True, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class NATStage(nn.Module):
    """Optional downsampler (all stages but the first), then blocks at one resolution."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            kernel_size: int = 7,
            dilations: Optional[Sequence[int]] = None,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path: Union[float, Sequence[float]] = 0.,
            ls_init_value: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvDownsampler(dim, out_dim, **dd) if downsample else nn.Identity()
        dilations = list(dilations) if dilations is not None else [1] * depth
        if len(dilations) != depth:
            raise ValueError(f"dilations must give one value per block: got {len(dilations)} for depth {depth}")
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.Sequential(*[
            NATBlock(
                out_dim, num_heads, kernel_size=kernel_size, dilation=dilations[i], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop, drop_path=drop_path[i],
                ls_init_value=ls_init_value, **dd)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class NAT(nn.Module):
    """Neighborhood Attention Transformer (and DiNAT, with ``dilations``).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: ``'avg'`` or ``''``.
        embed_dim: channels of the first stage; doubled at every later stage.
        depths: blocks per stage.
        num_heads: heads per stage.
        kernel_size: neighborhood size in every block.
        dilations: per stage, one dilation per block (DiNAT); None means 1 everywhere (NAT).
        mlp_ratio: MLP hidden width over block width.
        ls_init_value: layer-scale init (NAT-S/B, DiNAT-B use 1e-5), None for none.
        drop_rate, proj_drop_rate, drop_path_rate: head dropout, projection dropout, stochastic depth.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 6, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            ls_init_value: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads ({len(num_heads)} values) must give one value per stage ({len(depths)})")
        if dilations is not None and len(dilations) != len(depths):
            raise ValueError(f"dilations ({len(dilations)} lists) must give one list per stage ({len(depths)})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.kernel_size = kernel_size
        self.output_fmt = 'NHWC'
        num_stages = len(depths)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]

        self.stem = ConvTokenizer(in_chans, embed_dim, **dd)
        dp_rates = calculate_drop_path_rates(drop_path_rate, depths)
        self.feature_info = []
        stages = []
        prev_dim = embed_dim
        for i in range(num_stages):
            stages.append(NATStage(
                prev_dim, dims[i], depths[i], num_heads[i], kernel_size=kernel_size,
                dilations=dilations[i] if dilations is not None else None, downsample=i > 0,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                drop_path=dp_rates[i], ls_init_value=ls_init_value, **dd))
            prev_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_dim
        self.norm = nn.LayerNorm(prev_dim, **dd)
        self.head = ClassifierHead(prev_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC', **dd)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns stage outputs.

        Args:
            indices: last n stages if int, all if None, else the stage indices to take.
            norm: apply the final norm to the last stage's intermediate.
            stop_early: stop after the last stage taken.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                x_inter = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x_inter)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and optionally norm and head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def remap_official_key(key: str) -> str:
    """Key of the original NAT/DiNAT state_dict -> key of :class:`NAT`."""
    parts = key.split('.')
    if parts[0] == 'patch_embed':
        if parts[1] == 'proj':
            return f"stem.conv{int(parts[2]) + 1}.{parts[3]}"
        return 'stem.' + '.'.join(parts[1:])
    if parts[0] == 'levels':
        level = int(parts[1])
        if parts[2] == 'downsample':
            name = {'reduction': 'conv', 'norm': 'norm'}[parts[3]]
            return f"stages.{level + 1}.downsample.{name}.{'.'.join(parts[4:])}"
        rest = '.'.join(parts[2:])
        for old, new in (('gamma1', 'ls1.gamma'), ('gamma2', 'ls2.gamma')):
            if rest.endswith('.' + old):
                rest = rest[:-len(old)] + new
        return f'stages.{level}.{rest}'
    if parts[0] == 'head':
        return 'head.fc.' + '.'.join(parts[1:])
    return key


def checkpoint_filter_fn(state_dict, model: NAT):
    """Convert a released NAT/DiNAT checkpoint (a bare state_dict) to this model's layout."""
    for wrapper in ('model', 'state_dict', 'state_dict_ema'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    if 'stem.conv1.weight' in state_dict:
        return state_dict
    return {remap_official_key(k.removeprefix('module.')): v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'mit',
        'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        **kwargs,
    }


_NAT_URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS/'
_DINAT_URL = 'https://shi-labs.com/projects/dinat/checkpoints/'
_NAT_PAPER = dict(paper_ids='arXiv:2204.07143', paper_name='Neighborhood Attention Transformer')
_DINAT_PAPER = dict(paper_ids='arXiv:2209.15001', paper_name='Dilated Neighborhood Attention Transformer')

default_cfgs = generate_default_cfgs({
    'nat_mini.in1k': _cfg(url=_NAT_URL + 'nat_mini.pth', **_NAT_PAPER),
    'nat_tiny.in1k': _cfg(url=_NAT_URL + 'nat_tiny.pth', **_NAT_PAPER),
    'nat_small.in1k': _cfg(url=_NAT_URL + 'nat_small.pth', **_NAT_PAPER),
    'nat_base.in1k': _cfg(url=_NAT_URL + 'nat_base.pth', **_NAT_PAPER),
    'dinat_mini.in1k': _cfg(url=_DINAT_URL + 'imagenet1k/dinat_mini_in1k_224.pth', **_DINAT_PAPER),
    'dinat_tiny.in1k': _cfg(url=_DINAT_URL + 'imagenet1k/dinat_tiny_in1k_224.pth', **_DINAT_PAPER),
    'dinat_small.in1k': _cfg(url=_DINAT_URL + 'imagenet1k/dinat_small_in1k_224.pth', **_DINAT_PAPER),
    'dinat_base.in1k': _cfg(url=_DINAT_URL + 'imagenet1k/dinat_base_in1k_224.pth', **_DINAT_PAPER),
    'dinat_large.in22k_ft_in1k': _cfg(url=_DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_224.pth', **_DINAT_PAPER),
    'dinat_large.in22k': _cfg(
        url=_DINAT_URL + 'imagenet22k/dinat_large_in22k_224.pth', num_classes=21841, **_DINAT_PAPER),
    'dinat_large_384.in22k_ft_in1k': _cfg(
        url=_DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_384.pth', input_size=(3, 384, 384),
        min_input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **_DINAT_PAPER),
    'dinat_large_384_11x11.in22k_ft_in1k': _cfg(
        url=_DINAT_URL + 'imagenet1k/dinat_large_in22k_in1k_384_11x11.pth', input_size=(3, 384, 384),
        min_input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **_DINAT_PAPER),
    # ImageNet-22k weights with the 7x7 bias tables interpolated to 11x11, released for fine-tuning at 384
    'dinat_large_384_11x11.in22k': _cfg(
        url=_DINAT_URL + 'imagenet22k/dinat_large_in22k_224_11x11interp.pth', num_classes=21841,
        input_size=(3, 384, 384), min_input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **_DINAT_PAPER),
    'test_nat': _cfg(input_size=(3, 160, 160), min_input_size=(3, 96, 96), pool_size=(5, 5), license='apache-2.0'),
    'test_dinat': _cfg(input_size=(3, 160, 160), min_input_size=(3, 96, 96), pool_size=(5, 5), license='apache-2.0'),
})


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (3, 4, 6, 5))))))
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _dinat_dilations(depths: Sequence[int], pattern: Sequence[int]) -> List[List[int]]:
    """Per-stage dilation lists alternating 1 (NA) and ``pattern[i]`` (DiNA), as the released DiNATs use."""
    return [[1 if j % 2 == 0 else pattern[i] for j in range(d)] for i, d in enumerate(depths)]


_DILATIONS_224 = (8, 4, 2, 1)
_DILATIONS_384 = (13, 6, 3, 1)


@register_model
def nat_mini(pretrained=False, **kwargs) -> NAT:
    model_args = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2)
    return _create_nat('nat_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained=False, **kwargs) -> NAT:
    model_args = dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2)
    return _create_nat('nat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained=False, **kwargs) -> NAT:
    model_args = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2,
                      drop_path_rate=0.3, ls_init_value=1e-5)
    return _create_nat('nat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained=False, **kwargs) -> NAT:
    model_args = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2,
                      drop_path_rate=0.5, ls_init_value=1e-5)
    return _create_nat('nat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 6, 5)
    model_args = dict(depths=depths, num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2,
                      dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2,
                      dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2, drop_path_rate=0.3,
                      dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2, drop_path_rate=0.5,
                      ls_init_value=1e-5, dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2, drop_path_rate=0.35,
                      dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2, drop_path_rate=0.35,
                      dilations=_dinat_dilations(depths, _DILATIONS_384))
    return _create_nat('dinat_large_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained=False, **kwargs) -> NAT:
    depths = (3, 4, 18, 5)
    model_args = dict(depths=depths, num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2, drop_path_rate=0.35,
                      kernel_size=11, dilations=_dinat_dilations(depths, _DILATIONS_224))
    return _create_nat('dinat_large_384_11x11', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_nat(pretrained=False, **kwargs) -> NAT:
    model_args = dict(depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), embed_dim=16, kernel_size=3, mlp_ratio=2,
                      drop_path_rate=0.1, ls_init_value=1e-2)
    return _create_nat('test_nat', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_dinat(pretrained=False, **kwargs) -> NAT:
    depths = (2, 2, 2, 1)
    model_args = dict(depths=depths, num_heads=(1, 2, 4, 8), embed_dim=16, kernel_size=3, mlp_ratio=2,
                      drop_path_rate=0.1, dilations=_dinat_dilations(depths, (8, 4, 2, 1)))
    return _create_nat('test_dinat', pretrained=pretrained, **dict(model_args, **kwargs))
