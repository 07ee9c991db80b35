"""InLine-PVT: Pyramid Vision Transformer (v1) with InLine attention.

Paper: `Bridging the Divide: Reconsidering Softmax and Linear Attention` - https://arxiv.org/abs/2412.06590
Original code and weights: https://github.com/LeapLabTHU/InLine (``models/inline_pvt.py``), built on PVT
(https://arxiv.org/abs/2102.12122).

Released models use InLine in every block without spatial reduction (``attn_type='IIII'``,
``la_sr_ratios='1111'``): separate ``q`` and ``kv`` projections, per-stage learned position embeddings, no cls
token and no final norm; the head is a token mean and a Linear. PVT's softmax attention with spatial reduction
(attention type ``'S'``) is kept for configurations that use it.

Differences from the original code, none of which changes a released model's outputs:
* timm layout: ``patch_embed{i}``, ``pos_embed{i}`` and ``block{i}`` live under ``stages.{i-1}``
  (``checkpoint_filter_fn`` moves the keys);
* a stage's ``pos_embed`` is resized (bilinear, as the original) whenever the patch grid differs from the
  stored one; the original decides by comparing the token count with the *first* stage's, so it skips the
  resize for a non-square grid of the same count and fails for inputs twice the native size;
* InLine with spatial reduction (``la_sr_ratios`` > 1) raises a ValueError (the original fails at run time).
"""
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.layers import InLineAttention

__all__ = ['InLinePVT']


class PVTPatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch) then LayerNorm; NCHW in, tokens and grid out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SpatialReductionAttention(nn.Module):
    """PVT's softmax attention; keys and values from a strided-conv reduced map when ``sr_ratio > 1``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0., sr_ratio: int = 1, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        batch, num_tokens, chans = x.shape
        q = self.q(x).reshape(batch, num_tokens, self.num_heads, -1).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.sr(x.transpose(1, 2).reshape(batch, chans, hw[0], hw[1])).flatten(2).transpose(1, 2)
            src = self.norm(src)
        k, v = self.kv(src).reshape(batch, -1, 2, self.num_heads, chans // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch, num_tokens, chans)
        return self.proj_drop(self.proj(x))


class InLinePVTBlock(nn.Module):
    """Pre-norm block (LayerNorm eps 1e-6): InLine ('I') or spatial-reduction softmax ('S') attention, then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, proj_drop: float = 0., drop_path: float = 0.,
                 attn_type: str = 'I', sr_ratio: int = 1, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if attn_type == 'I':
            self.attn = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, qkv_mode='q_kv', proj_drop=proj_drop, **dd)
        else:
            self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                                  proj_drop=proj_drop, sr_ratio=sr_ratio, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


@register_notrace_function
@torch.jit.ignore
def resize_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """``[1, gh*gw, C]`` stored for ``grid`` -> ``[1, h*w, C]`` (bilinear, align_corners False, as the original)."""
    if tuple(hw) == tuple(grid):
        return pos_embed
    pos_embed = pos_embed.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    pos_embed = F.interpolate(pos_embed, size=(int(hw[0]), int(hw[1])), mode='bilinear', align_corners=False)
    return pos_embed.flatten(2).transpose(1, 2)


class InLinePVTStage(nn.Module):
    """Patch embedding, per-stage position embedding, blocks; NCHW in (the image for stage 0), NCHW out."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, grid: Tuple[int, int], blocks: List[nn.Module],
                 drop_rate: float = 0., device=None, dtype=None):
        super().__init__()
        self.grad_checkpointing = False
        self.grid = grid
        self.patch_embed = PVTPatchEmbed(in_chans, dim, patch_size, device=device, dtype=dtype)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim, device=device, dtype=dtype))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        x = self.pos_drop(x + resize_pos_embed(self.pos_embed, self.grid, hw))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, hw, use_reentrant=False)
            else:
                x = block(x, hw)
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])


def _stage_grids(img_size: Tuple[int, int], patch_size: int, num_stages: int) -> List[Tuple[int, int]]:
    """Patch grid each stage's position embedding is stored for (as the original sizes them)."""
    grids = [(img_size[0] // patch_size, img_size[1] // patch_size)]
    for i in range(1, num_stages):
        grids.append(tuple(s // (2 ** (i - 1) * patch_size) // 2 for s in img_size))
    return grids


class InLinePVT(nn.Module):
    """PVT-v1 with InLine attention.

    Args:
        img_size: size the position embeddings are made for (other sizes are resized to).
        patch_size: stem patch size (later stages patchify by 2).
        in_chans, num_classes: input channels, classifier outputs (0 for none).
        global_pool: ``'avg'`` or ``''``.
        embed_dims, num_heads, mlp_ratios, depths: per stage.
        attn_type: one character per stage, ``'I'`` InLine or ``'S'`` softmax with spatial reduction.
        sr_ratios: spatial reduction of 'S' stages.
        drop_rate, proj_drop_rate, drop_path_rate: pos/head dropout, projection dropout, stochastic depth.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (2, 4, 10, 16),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            depths: Sequence[int] = (2, 2, 2, 2),
            attn_type: str = 'IIII',
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
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
        num_stages = len(depths)
        for name, seq in (('embed_dims', embed_dims), ('num_heads', num_heads), ('mlp_ratios', mlp_ratios),
                          ('attn_type', attn_type), ('sr_ratios', sr_ratios)):
            if len(seq) != num_stages:
                raise ValueError(f"{name} must give one value per stage ({num_stages}), got {seq!r}")
        if set(attn_type) - {'I', 'S'}:
            raise ValueError(f"attn_type must be made of 'I' (InLine) and 'S' (softmax), got {attn_type!r}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_stages = num_stages
        self.grad_checkpointing = False
        self.grids = _stage_grids(img_size, patch_size, num_stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.feature_info = []
        cur, stages = 0, []
        for i in range(num_stages):
            blocks = [
                InLinePVTBlock(embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                               qk_scale=qk_scale, proj_drop=proj_drop_rate, drop_path=dpr[cur + j],
                               attn_type=attn_type[i], sr_ratio=sr_ratios[i], **dd)
                for j in range(depths[i])]
            stages.append(InLinePVTStage(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                                         patch_size if i == 0 else 2, self.grids[i], blocks, drop_rate, **dd))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.ModuleList(stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        if not self.stages[0].pos_embed.is_meta:
            for stage in self.stages:
                trunc_normal_(stage.pos_embed, std=.02)
            self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'stages.{i}.pos_embed' for i in range(len(self.stages))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stages\.0\.(?:patch_embed|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:patch_embed|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
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
        w = self.stages[0].pos_embed
        self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns stage outputs (there is no final norm, so ``norm`` has no effect).

        Args:
            indices: last n stages if int, all if None, else the stage indices to take.
            stop_early: stop after the last stage taken.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x if output_fmt == 'NCHW' else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and optionally the head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.num_stages = max_index + 1
        self.grids = self.grids[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def remap_official_key(key: str) -> str:
    """Key of the original InLine-PVT state_dict -> key of :class:`InLinePVT`."""
    match = re.match(r'^(patch_embed|pos_embed|block)(\d+)(.*)$', key)
    if not match:
        return key
    name, stage, rest = match.groups()
    name = 'blocks' if name == 'block' else name
    return f'stages.{int(stage) - 1}.{name}{rest}'


def checkpoint_filter_fn(state_dict, model: InLinePVT):
    """Released InLine-PVT checkpoint (bare, or the training dict under ``'model'``) -> this model.

    Moves ``patch_embed{i}`` / ``pos_embed{i}`` / ``block{i}`` under ``stages.{i-1}`` and resizes the position
    embeddings (bilinear) when the model's grids differ.
    """
    for wrapper in ('model', 'state_dict_ema', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for k, v in state_dict.items():
        k = remap_official_key(k.removeprefix('module.'))
        match = re.match(r'^stages\.(\d+)\.pos_embed$', k)
        if match and int(match.group(1)) < len(model.stages):
            grid = model.stages[int(match.group(1))].grid
            if v.shape[1] != grid[0] * grid[1]:
                side = int(round(v.shape[1] ** 0.5))
                v = resize_pos_embed(v, (side, side), grid)
        out[k] = v
    return out


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.patch_embed.proj', 'classifier': 'head',
        'license': 'unknown', 'origin_url': 'https://github.com/LeapLabTHU/InLine', 'custom_load': True,
        'paper_ids': 'arXiv:2412.06590',
        'paper_name': 'Bridging the Divide: Reconsidering Softmax and Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'inline_pvt_tiny.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/90ac52b1555b401eb5e6/?dl=1'),
    'inline_pvt_small.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/1ab953b2479d433080a3/?dl=1'),
    'inline_pvt_medium.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/a72aec31e6084bc0a280/?dl=1'),
    'inline_pvt_large.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/efd91318ba964f01b288/?dl=1'),
    'test_inline_pvt': _cfg(input_size=(3, 64, 64), min_input_size=(3, 32, 32), pool_size=(2, 2),
                            license='apache-2.0'),
})


def _create_inline_pvt(variant: str, pretrained: bool = False, **kwargs) -> InLinePVT:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 2, 2))))))
    return build_model_with_cfg(
        InLinePVT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_PVT_DIMS = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), mlp_ratios=(8, 8, 4, 4))


@register_model
def inline_pvt_tiny(pretrained=False, **kwargs) -> InLinePVT:
    model_args = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1, **_PVT_DIMS)
    return _create_inline_pvt('inline_pvt_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_pvt_small(pretrained=False, **kwargs) -> InLinePVT:
    model_args = dict(depths=(3, 4, 6, 3), drop_path_rate=0.1, **_PVT_DIMS)
    return _create_inline_pvt('inline_pvt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_pvt_medium(pretrained=False, **kwargs) -> InLinePVT:
    model_args = dict(depths=(3, 4, 18, 3), drop_path_rate=0.3, **_PVT_DIMS)
    return _create_inline_pvt('inline_pvt_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_pvt_large(pretrained=False, **kwargs) -> InLinePVT:
    model_args = dict(depths=(3, 8, 27, 3), drop_path_rate=0.3, **_PVT_DIMS)
    return _create_inline_pvt('inline_pvt_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_inline_pvt(pretrained=False, **kwargs) -> InLinePVT:
    model_args = dict(img_size=64, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
                      depths=(1, 1, 2, 1), drop_path_rate=0.1)
    return _create_inline_pvt('test_inline_pvt', pretrained=pretrained, **dict(model_args, **kwargs))
