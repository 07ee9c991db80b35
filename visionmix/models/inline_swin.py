"""InLine-Swin: Swin Transformer with InLine attention in the early stages.

Paper: `Bridging the Divide: Reconsidering Softmax and Linear Attention` - https://arxiv.org/abs/2412.06590
Original code and weights: https://github.com/LeapLabTHU/InLine (``models/inline_swin.py``), built on Swin
(https://arxiv.org/abs/2103.14030).

``attn_type`` gives one character per stage: ``I`` InLine, ``S`` shifted-window softmax attention with relative
position bias, ``M`` followed (after the four stage characters) by k: the first k blocks InLine, the rest softmax
(Swin-T ``IIIS``, Swin-S ``IISS``, Swin-B ``IIMS2``). InLine blocks use ``window_size`` (56 at 224, 96 at 384),
softmax blocks ``max(7, window_size // 8)``; a window as large as the map covers the whole map, unshifted, so the
released InLine blocks are global. Odd blocks of a stage shift by half a window; InLine windows are not masked.

Differences from the original code, none of which changes a released model's outputs:
* windows, shifts and masks follow the actual input size (the original fixes them for ``img_size``); an
  InLine window covers the whole (also non-square) map whenever the map's shorter side fits in it;
* the patch merging of stage i is at the start of ``layers.{i+1}`` (timm layout): ``checkpoint_filter_fn``
  moves the keys.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, register_notrace_module, resize_rel_pos_bias_table, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging, WindowAttention, window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.layers import InLineAttention

__all__ = ['InLineSwin']


@torch.jit.ignore
def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's additive mask (0 / -100) keeping cyclically shifted windows from mixing regions: [nW, N, N]."""
    regions = torch.zeros(1, height, width, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, hs, ws, :] = cnt
            cnt += 1
    ids = window_partition(regions, (window, window)).reshape(-1, window * window)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


class SwinWindowAttention(WindowAttention):
    """timm's Swin window attention (relative position bias, optional shift mask), called like InLine blocks."""

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        num_windows_batch, num_tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(num_windows_batch, num_tokens, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, num_tokens, num_tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, num_tokens, num_tokens)
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(num_windows_batch, num_tokens, -1)))


@register_notrace_module  # windows, shifts and masks follow the input size
class InLineSwinBlock(nn.Module):
    """Swin block with InLine ('I') or relative-position softmax ('S') window attention.

    ``window_size`` is the nominal window; ``shifted`` marks odd blocks (shift half a window when the map is
    larger than the window).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attn_type: str = 'I',
            window_size: int = 7,
            shifted: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.attn_type = attn_type
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim, **dd)
        if attn_type == 'I':
            self.attn = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        else:
            self.attn = SwinWindowAttention(dim, num_heads, window_size=window_size, qkv_bias=qkv_bias,
                                            proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def window_and_shift(self, height: int, width: int) -> Tuple[Tuple[int, int], int]:
        """Window (h, w) and cyclic shift used on a ``height x width`` map."""
        ws = self.window_size
        if self.attn_type == 'I' and min(height, width) <= ws:
            return (height, width), 0
        if min(height, width) < ws:
            raise ValueError('a ' + str(height) + 'x' + str(width) + ' map is smaller than the ' + str(ws) + 'x'
                             + str(ws) + ' softmax window (input too small)')
        if height % ws != 0 or width % ws != 0:
            raise ValueError('the ' + str(height) + 'x' + str(width) + ' map must be divisible by the ' + str(ws)
                             + 'x' + str(ws) + ' window: input height and width must be multiples of the stage '
                             'stride times the window')
        shift = ws // 2 if self.shifted and min(height, width) > ws else 0
        return (ws, ws), shift

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, chans = x.shape
        window, shift = self.window_and_shift(height, width)
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, window).reshape(-1, window[0] * window[1], chans)
        mask: Optional[torch.Tensor] = None
        if shift > 0 and self.attn_type == 'S':  # InLine windows are not masked (as the original)
            mask = shifted_window_mask(height, width, window[0], shift, x.device).to(x.dtype)
        windows = self.attn(windows, window, mask)  # InLine: (x, hw, kernel_mean=None)
        x = window_reverse(windows.reshape(-1, window[0], window[1], chans), window, height, width)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC in and out."""
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class InLineSwinStage(nn.Module):
    """Optional patch merging (all stages but the first), then blocks at one resolution."""

    def __init__(self, dim: int, out_dim: int, downsample: bool, blocks: List[nn.Module], device=None, dtype=None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, device=device, dtype=dtype) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def parse_attn_types(attn_type: str, depths: Sequence[int]) -> List[List[str]]:
    """Per-stage block types from an InLine-Swin/CSwin ``attn_type`` string (``'IIIS'``, ``'IIMS2'``, ...)."""
    num_stages = len(depths)
    head, tail = attn_type[:num_stages], attn_type[num_stages:]
    if len(head) != num_stages or set(head) - {'I', 'S', 'M'} or ('M' in head) != bool(tail) \
            or (tail and not tail.isdigit()):
        raise ValueError(f"attn_type must give 'I', 'S' or 'M' per stage ({num_stages}), followed by the number of "
                         f"InLine blocks when a stage is 'M' (e.g. 'IIMS2'), got {attn_type!r}")
    split = int(tail) if tail else 0
    return [[('I' if j < split else 'S') if c == 'M' else c for j in range(d)] for c, d in zip(head, depths)]


class InLineSwin(nn.Module):
    """Swin Transformer with InLine attention (NHWC inside, like timm's Swin).

    Args:
        img_size: native input size (sets the softmax windows of stages smaller than the window).
        patch_size, in_chans, num_classes: stem patch size, input channels, classifier outputs (0 for none).
        global_pool: ``'avg'`` or ``''``.
        embed_dim: channels of the first stage; doubled at every later stage.
        depths, num_heads: per stage.
        window_size: InLine window (softmax blocks use ``max(7, window_size // 8)``).
        attn_type: block types, see the module docstring.
        drop_rate, proj_drop_rate, drop_path_rate: head dropout, projection dropout, stochastic depth.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 56,
            attn_type: str = 'IIIS',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads ({len(num_heads)} values) must give one value per stage ({len(depths)})")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        block_types = parse_attn_types(attn_type, depths)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        num_stages = len(depths)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt='NHWC', strict_img_size=False, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        softmax_window = max(7, window_size // 8)
        stages, self.feature_info, cur = [], [], 0
        for i in range(num_stages):
            res = min(img_size[0] // patch_size // 2 ** i, img_size[1] // patch_size // 2 ** i)
            blocks = [
                InLineSwinBlock(
                    dims[i], num_heads[i], attn_type=kind,
                    window_size=window_size if kind == 'I' else min(res, softmax_window), shifted=j % 2 == 1,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, drop_path=dpr[cur + j], **dd)
                for j, kind in enumerate(block_types[i])]
            stages.append(InLineSwinStage(dims[i - 1] if i else dims[0], dims[i], i > 0, blocks, **dd))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'layers.{i}'))
        self.layers = nn.Sequential(*stages)
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
        return {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.downsample', (0,)),
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
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
        w = self.patch_embed.proj.weight
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
        """Forward that also returns stage outputs.

        Args:
            indices: last n stages if int, all if None, else the stage indices to take.
            norm: apply the final norm to the last stage's intermediate.
            stop_early: stop after the last stage taken.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last_idx = len(self.layers) - 1
        x = self.pos_drop(self.patch_embed(x))
        stages = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last_idx else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and optionally norm and head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model: InLineSwin):
    """Released InLine-Swin checkpoint (bare, or the training dict under ``'model'``) -> this model.

    Drops the ``relative_position_index`` / ``attn_mask`` buffers (recomputed), moves each stage's patch merging
    to the start of the next stage and resizes relative position tables to the model's windows.
    """
    for wrapper in ('model', 'state_dict_ema', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    # this model's own layout already has the patch merging at the start of stages 1-3
    converted = (any('layers.1.downsample' in k for k in state_dict)
                 and not any('layers.0.downsample' in k for k in state_dict))
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix('module.')
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        parts = k.split('.')
        if not converted and parts[0] == 'layers' and parts[2] == 'downsample':
            parts[1] = str(int(parts[1]) + 1)
            k = '.'.join(parts)
        if k.endswith('relative_position_bias_table') and k in target and v.shape != target[k].shape:
            side = int(round(target[k].shape[0] ** 0.5))
            window = (side + 1) // 2
            v = resize_rel_pos_bias_table(v, (window, window), target[k].shape)
        out[k] = v
    return out


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'unknown', 'origin_url': 'https://github.com/LeapLabTHU/InLine', 'custom_load': True,
        'paper_ids': 'arXiv:2412.06590',
        'paper_name': 'Bridging the Divide: Reconsidering Softmax and Linear Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'inline_swin_tiny.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/32810869fcc34410966b/?dl=1'),
    'inline_swin_small.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/e9657fd247c04c7cb1a1/?dl=1'),
    'inline_swin_base.in1k': _cfg(url='https://cloud.tsinghua.edu.cn/f/bf23564bb64c420aafe1/?dl=1'),
    # the repository has the config but no released weights for 384
    'inline_swin_base_384': _cfg(input_size=(3, 384, 384), min_input_size=(3, 384, 384), pool_size=(12, 12),
                                 crop_pct=1.0),
    'test_inline_swin': _cfg(input_size=(3, 128, 128), min_input_size=(3, 128, 128), pool_size=(4, 4),
                             license='apache-2.0'),
})


def _create_inline_swin(variant: str, pretrained: bool = False, **kwargs) -> InLineSwin:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 6, 2))))))
    return build_model_with_cfg(
        InLineSwin, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def inline_swin_tiny(pretrained=False, **kwargs) -> InLineSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56,
                      attn_type='IIIS', drop_path_rate=0.2)
    return _create_inline_swin('inline_swin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_small(pretrained=False, **kwargs) -> InLineSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56,
                      attn_type='IISS', drop_path_rate=0.3)
    return _create_inline_swin('inline_swin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_base(pretrained=False, **kwargs) -> InLineSwin:
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56,
                      attn_type='IIMS2', drop_path_rate=0.5)
    return _create_inline_swin('inline_swin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def inline_swin_base_384(pretrained=False, **kwargs) -> InLineSwin:
    model_args = dict(img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=96,
                      attn_type='IIMS2', drop_path_rate=0.5)
    return _create_inline_swin('inline_swin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_inline_swin(pretrained=False, **kwargs) -> InLineSwin:
    model_args = dict(img_size=128, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=32,
                      attn_type='IIIS', mlp_ratio=2, drop_path_rate=0.1)
    return _create_inline_swin('test_inline_swin', pretrained=pretrained, **dict(model_args, **kwargs))
