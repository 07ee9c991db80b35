"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: `BiFormer: Vision Transformer with Bi-Level Routing Attention` (CVPR 2023) - https://arxiv.org/abs/2303.08810

Original code and weights: https://github.com/rayleizhu/BiFormer (MIT). One model class serves the released
BiFormer-T/S/B (``models/biformer.py``), BiFormer-STL (``models/biformer_stl.py``, Swin-T layout) and
BiFormer-STL-nchw (``models/biformer_stl_nchw.py``, the refactored NCHW attention). Bi-level routing attention
(BRA) routes every region of the token map to the top-k regions whose mean key best matches its mean query (one
routing for all heads, no gradient through it), then attends from the region's tokens to the tokens of those
regions; the token step is visionmix's shared block-sparse attention op with regions as blocks.

Differences from the original code, none of which changes a released model's outputs:
* timm layout: ``stem``, ``stages.{i}.downsample`` (the original ``downsample_layers.{i}``, which runs just before
  ``stages.{i}``), ``stages.{i}.blocks.{j}``, ``head.fc``; ``attn.qkv.qkv`` / ``attn.wo`` are ``attn.qkv`` /
  ``attn.proj``, the MLP is timm's ``Mlp``; the 1x1 convs of STL-nchw are Linear layers and its ``LayerNorm2d``
  a LayerNorm over channels (the same maps). ``checkpoint_filter_fn`` converts the released layouts;
* the model does not gather key/value regions itself: it hands the routing to the block-sparse op as a block index
  (the CUDA kernel reads the routed regions in place; the PyTorch reference gathers them, as the original does);
* the registered models pad feature maps whose size is not a multiple of ``n_win`` (``auto_pad=True``, which the
  released segmentation/detection configs set) instead of failing the original's assert; where every BRA map
  is a multiple of ``n_win`` (224 px for ``n_win=7``) nothing changes;
* original options no released model uses are not implemented and rejected by ``convert_official``: pooled
  key/value regions (``kv_downsample_mode`` other than ``'identity'``), learned/differentiable/soft routing,
  post-norm, extra position embeddings, ``mlp_dwconv``, ``param_attention='qkv'`` and ``topk=0``;
* ``drop_rate`` is dropout before the classifier (the original accepts it and ignores it).

Quirks of the original kept because the released weights depend on them:
* the BRA logit scale is ``qk_dim ** -0.5`` over all channels, not per head; stage 4 is global attention with
  8 heads whatever its width and no qkv bias;
* LePE (5x5 depthwise conv) is applied to V in BRA, to the attention input in BiFormer's / STL's stage 4 and to V
  in STL-nchw's stage 4;
* padding (``bra_impl='legacy'``, BiFormer and STL): the normed input is zero-padded right/bottom to a multiple of
  ``n_win`` before the qkv projection, so padded tokens carry the qkv bias and count, unmasked, in the region means,
  the LePE conv and as keys; the output is cropped back to the input size. ``bra_impl='nchw'`` (STL-nchw) uses
  ``floor(size / n_win)``-token regions (so more than ``n_win`` regions per side when the size is not a multiple),
  pads q/k/v with zeros after the projection, averages only real tokens for routing and still attends to the
  zero keys; its routing logits are unscaled. Both agree exactly at multiples of ``n_win``;
* the 3x3 depthwise conditional position encoding before every BiFormer block (none in STL); the STL classes'
  ``qk_scale`` argument never reaches their blocks, so ``convert_official`` ignores it too.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm2d,
    LayerScale,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    get_norm_layer,
    register_notrace_function,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.kernels.block_sparse import block_sparse_attention

__all__ = ['BiFormer']

BRA_IMPLS = ('legacy', 'nchw')
GLOBAL_LEPE = ('input', 'value', 'none')
STEM_TYPES = ('overlap', 'patch')


@register_notrace_function
@torch.jit.ignore
def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, block_size: int,
                     scale: float) -> torch.Tensor:
    """Region-to-region attention on the shared block-sparse op (tokens in region-major order, heads-last)."""
    return block_sparse_attention(q, k, v, kv_indices, block_size=block_size, scale=scale, validate_index=False)


class RegionRouter(nn.Module):
    """Top-k region routing: ``topk((q_r * scale) @ k_r^T)`` on detached region descriptors, no parameters.

    Returns the ``[B, regions, topk]`` indices of the routed key regions, best first, shared by all heads.
    """

    def __init__(self, topk: int, scale: float = 1.):
        super().__init__()
        self.topk = topk
        self.scale = scale

    def logits(self, q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
        # hard routing: the region graph is chosen, not learned through, as in the original (diff_routing=False)
        q_regions, k_regions = q_regions.detach(), k_regions.detach()
        return (q_regions * self.scale) @ k_regions.transpose(-2, -1)

    def forward(self, q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
        return torch.topk(self.logits(q_regions, k_regions), k=self.topk, dim=-1).indices


@register_notrace_module  # padding and region grid depend on the token-map size
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BRA) on an NHWC map: ``proj(attn + lepe(v))``.

    ``qkv`` gives ``[q | k | v]`` (``qk_dim``, ``qk_dim``, ``dim`` channels, head-major within each). The map is
    split into ``n_win x n_win`` regions; each region's tokens attend to the tokens of the ``topk`` regions routed
    to it (:class:`RegionRouter` on region-mean q and k). ``bra_impl`` picks the original's handling of sizes that
    are not multiples of ``n_win`` (see the module docstring); ``auto_pad=False`` rejects them (legacy only).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_win: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            bra_impl: str = 'legacy',
            auto_pad: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        qk_dim = qk_dim or dim
        if bra_impl not in BRA_IMPLS:
            raise ValueError(f"bra_impl must be one of {BRA_IMPLS}, got {bra_impl!r}")
        if num_heads < 1 or qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must lie in [1, n_win ** 2 = {n_win * n_win}], got {topk}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.legacy = bra_impl == 'legacy'
        self.auto_pad = auto_pad
        self.scale = qk_scale or qk_dim ** -0.5
        # the refactored (nchw) code routes on unscaled logits; the scale does not change the top-k
        self.router = RegionRouter(topk, self.scale if self.legacy else 1.)
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd) \
            if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim, **dd)

    def region_grid(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(regions_h, regions_w, region_h, region_w)`` for a token map of ``height x width``."""
        n = self.n_win
        if self.legacy:
            if not self.auto_pad and (height % n or width % n):
                raise ValueError(f"feature map {height}x{width} is not divisible by n_win={n} (auto_pad=False)")
            return n, n, (height + n - 1) // n, (width + n - 1) // n
        if height < n or width < n:
            raise ValueError(f"feature map {height}x{width} is smaller than n_win={n} regions per side "
                             f"(bra_impl='nchw' uses floor(size / n_win)-token regions)")
        rh, rw = height // n, width // n
        return (height + rh - 1) // rh, (width + rw - 1) // rw, rh, rw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        gh, gw, rh, rw = self.region_grid(H, W)
        pad_b, pad_r = gh * rh - H, gw * rw - W
        if self.legacy and (pad_b or pad_r):
            x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])  # before the projection: padded tokens carry the qkv bias
        qkv = self.qkv(x)
        lepe: Optional[torch.Tensor] = None
        if self.lepe is not None:
            lepe = self.lepe(qkv[..., 2 * self.qk_dim:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[:, :H, :W]
        if not self.legacy and (pad_b or pad_r):
            qkv = F.pad(qkv, [0, 0, 0, pad_r, 0, pad_b])

        # region-major token order: region (i, j) holds tokens [(i * gw + j) * T, (i * gw + j + 1) * T)
        num_regions, tokens = gh * gw, rh * rw
        qkv = qkv.reshape(B, gh, rh, gw, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, num_regions, tokens, -1)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        if self.legacy or not (pad_b or pad_r):
            q_regions, k_regions = q.mean(2), k.mean(2)
        else:  # mean over the real tokens of each region
            rows = (H - torch.arange(gh, device=x.device) * rh).clamp(max=rh)
            cols = (W - torch.arange(gw, device=x.device) * rw).clamp(max=rw)
            count = (rows[:, None] * cols[None, :]).reshape(num_regions, 1).to(q.dtype)
            q_regions, k_regions = q.sum(2) / count, k.sum(2) / count
        kv_indices = self.router(q_regions, k_regions).unsqueeze(1).to(torch.int32)  # [B, 1, regions, topk]

        heads = self.num_heads
        n = num_regions * tokens
        out = routed_attention(
            q.reshape(B, n, heads, self.qk_dim // heads),
            k.reshape(B, n, heads, self.qk_dim // heads),
            v.reshape(B, n, heads, C // heads),
            kv_indices, tokens, self.scale)
        out = out.reshape(B, gh, gw, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * rh, gw * rw, C)
        out = out[:, :H, :W]
        if lepe is not None:
            out = out + lepe
        return self.proj(out)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over the whole NHWC map with an optional 5x5 depthwise LePE, added before
    ``proj``, on the attention input (``lepe_source='input'``) or on V (``'value'``); qkv has no bias."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            side_dwconv: int = 5,
            lepe_source: str = 'input',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if lepe_source not in GLOBAL_LEPE:
            raise ValueError(f"lepe_source must be one of {GLOBAL_LEPE}, got {lepe_source!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by the global attention's num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.lepe_on_value = lepe_source == 'value'
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd) \
            if side_dwconv > 0 and lepe_source != 'none' else None
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            src = v.transpose(1, 2).reshape(B, H, W, C) if self.lepe_on_value else x
            out = out + self.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """Optional depthwise conv position encoding (NCHW, residual), then pre-norm attention and MLP branches in NHWC
    (LayerNorm eps 1e-6), each with optional layer scale and stochastic depth. ``topk > 0`` gives BRA, otherwise
    global attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            topk: int,
            n_win: int = 7,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            cpe_kernel: int = 3,
            global_heads: int = 8,
            global_lepe: str = 'input',
            bra_impl: str = 'legacy',
            auto_pad: bool = True,
            ls_init_value: Optional[float] = None,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, cpe_kernel, padding=cpe_kernel // 2, groups=dim, **dd) \
            if cpe_kernel > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads, n_win=n_win, topk=topk, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv,
                bra_impl=bra_impl, auto_pad=auto_pad, **dd)
        else:
            self.attn = GlobalAttention(dim, global_heads, side_dwconv=side_dwconv, lepe_source=global_lepe, **dd)
        self.ls1 = LayerScale(dim, ls_init_value, **dd) if ls_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd) if ls_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """BiFormer: 3x3 stride-2 conv then norm; STL (``patch=True``): norm then 2x2 stride-2 conv."""

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.BatchNorm2d, patch: bool = False, device=None,
                 dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm_first = patch
        if patch:
            self.norm = norm_layer(dim, **dd)
            self.conv = nn.Conv2d(dim, out_dim, 2, stride=2, **dd)
        else:
            self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, **dd)
            self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            return self.conv(self.norm(x))
        return self.norm(self.conv(x))


class BiFormerStage(nn.Module):
    """Optional downsampler, then blocks at one resolution."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool = True, patch_downsample: bool = False,
                 norm_layer=nn.BatchNorm2d, drop_path: Sequence[float] = (), device=None, dtype=None, **block_kwargs):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, norm_layer, patch=patch_downsample, **dd) \
            if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[
            BiFormerBlock(out_dim, drop_path=drop_path[i], **block_kwargs, **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def _per_stage(value, num_stages: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_stages
    if len(values) != num_stages:
        raise ValueError(f"{name} must give one value per stage ({num_stages}), got {len(values)}")
    return values


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"input must be an NCHW image batch, got shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input must have in_chans={in_chans} channels (NCHW), got shape {list(x.shape)}")
    return x


class BiFormer(nn.Module):
    """BiFormer (https://arxiv.org/abs/2303.08810): BRA in stages with ``topks[i] > 0``, global attention otherwise.

    ``stem_type='overlap'`` is BiFormer-T/S/B (two 3x3 stride-2 convs with BatchNorm, 3x3 stride-2 conv + norm
    downsamplers, CPE before every block); ``'patch'`` is the Swin-T layout of BiFormer-STL (4x4 patch conv +
    norm, norm + 2x2 conv downsamplers, ``cpe_kernel=0``). The head is ``norm`` (BatchNorm), pooling, Linear.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: ``'avg'`` or ``''``.
        embed_dims: channels per stage.
        depths: blocks per stage.
        qk_dims: q/k channels of BRA per stage (default: ``embed_dims``).
        head_dim: BRA head width; a stage has ``qk_dims[i] // head_dim`` heads.
        n_win: regions per side, one value or one per stage.
        topks: routed regions per query region; ``<= 0`` makes the stage global attention.
        mlp_ratios: MLP hidden width over block width, one value or one per stage.
        side_dwconv: LePE kernel size (0 for none).
        cpe_kernel: depthwise conv position encoding before each block (0 for none).
        global_heads: heads of the global-attention stages (8 in every released model).
        global_lepe: LePE of the global-attention stages: ``'input'``, ``'value'`` or ``'none'``.
        qk_scale: BRA logit scale (default ``qk_dim ** -0.5``).
        bra_impl: ``'legacy'`` (BiFormer, STL) or ``'nchw'`` (STL-nchw) handling of sizes not divisible by n_win.
        auto_pad: pad maps not divisible by ``n_win`` (legacy); False raises instead.
        stem_type: ``'overlap'`` or ``'patch'``.
        norm_layer: norm of the stem, downsamplers and head (timm name or class).
        ls_init_value: layer-scale init (None for no layer scale).
        drop_rate, drop_path_rate: dropout before the classifier, stochastic depth.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            qk_dims: Optional[Sequence[int]] = None,
            head_dim: int = 32,
            n_win: Union[int, Sequence[int]] = 7,
            topks: Sequence[int] = (1, 4, 16, -2),
            mlp_ratios: Union[float, Sequence[float]] = 3.,
            side_dwconv: int = 5,
            cpe_kernel: int = 3,
            global_heads: int = 8,
            global_lepe: str = 'input',
            qk_scale: Optional[float] = None,
            bra_impl: str = 'legacy',
            auto_pad: bool = True,
            stem_type: str = 'overlap',
            norm_layer: Union[str, type] = 'batchnorm2d',
            ls_init_value: Optional[float] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        embed_dims = _per_stage(embed_dims, num_stages, 'embed_dims')
        qk_dims = _per_stage(qk_dims if qk_dims is not None else embed_dims, num_stages, 'qk_dims')
        n_wins = _per_stage(n_win, num_stages, 'n_win')
        topks = _per_stage(topks, num_stages, 'topks')
        mlp_ratios = _per_stage(mlp_ratios, num_stages, 'mlp_ratios')
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be one of {STEM_TYPES}, got {stem_type!r}")
        if stem_type == 'overlap' and embed_dims[0] % 2:
            raise ValueError(f"embed_dims[0] must be even (the stem's first conv uses half of it), got {embed_dims[0]}")
        norm_layer = get_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.stem_type = stem_type
        self.output_fmt = 'NCHW'

        if stem_type == 'overlap':
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, **dd),
                norm_layer(embed_dims[0] // 2, **dd),
                nn.GELU(),
                nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, **dd),
                norm_layer(embed_dims[0], **dd),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, embed_dims[0], 4, stride=4, **dd),
                norm_layer(embed_dims[0], **dd),
            )
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        prev_dim = embed_dims[0]
        for i in range(num_stages):
            heads = qk_dims[i] // head_dim if topks[i] > 0 else 0
            if topks[i] > 0 and heads < 1:
                raise ValueError(f"qk_dims[{i}] ({qk_dims[i]}) must be at least head_dim ({head_dim})")
            stages.append(BiFormerStage(
                prev_dim, embed_dims[i], depths[i], downsample=i > 0, patch_downsample=stem_type == 'patch',
                norm_layer=norm_layer, drop_path=dp_rates[i], num_heads=heads, topk=topks[i], n_win=n_wins[i],
                qk_dim=qk_dims[i], qk_scale=qk_scale, mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                cpe_kernel=cpe_kernel, global_heads=global_heads, global_lepe=global_lepe, bra_impl=bra_impl,
                auto_pad=auto_pad, ls_init_value=ls_init_value, **dd))
            prev_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_dim
        self.norm = norm_layer(prev_dim, **dd)
        self.head = ClassifierHead(prev_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    def _init_weights(self, m: nn.Module):
        # as the original: Linear trunc-normal(.02) with zero bias, LayerNorm (1, 0), convs and BN at their defaults
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self):
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

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
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an original release file (a training dict, weights under ``'model'``; such files may pickle the
        run's ``argparse.Namespace``) or a state_dict in either layout. The pretrained cfgs set ``custom_load``
        so that timm calls this. A classifier of another shape (other ``num_classes``) is left initialised."""
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

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
        """Forward that also returns stage outputs (before the next stage's downsampling).

        Args:
            indices: last n stages if int, all if None, else the stage indices to take.
            norm: apply the head's norm to the last stage's intermediate.
            stop_early: stop after the last stage taken.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if not torch.jit.is_scripting():
            x = check_image_input(x, self.in_chans)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
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
        """Drop the stages not needed for ``indices``; the head's norm goes with ``prune_norm`` or when the last
        stage is dropped (it is sized for the last stage)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        fewer_stages = max_index + 1 < len(self.stages)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or fewer_stages:
            self.norm = nn.Identity()
        if fewer_stages:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head = ClassifierHead(self.num_features, self.num_classes, pool_type=self.head.global_pool.pool_type,
                                       drop_rate=self.drop_rate, **get_device_dtype(self))
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = check_image_input(x, self.in_chans)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_BLOCK_RENAMES = (  # original block sub-key prefix -> this model's
    ('attn.qkv.qkv.', 'attn.qkv.'),
    ('attn.qkv_linear.', 'attn.qkv.'),
    ('attn.wo.', 'attn.proj.'),
    ('attn.output_linear.', 'attn.proj.'),
    ('mlp.0.', 'mlp.fc1.'),
    ('mlp.2.', 'mlp.fc2.'),  # STL
    ('mlp.3.', 'mlp.fc2.'),  # BiFormer (Identity at index 1)
    ('gamma1', 'ls1.gamma'),
    ('gamma2', 'ls2.gamma'),
)


def remap_official_key(key: str, patch_layout: bool = False) -> str:
    """Key of an original BiFormer / BiFormer-STL state_dict -> key of :class:`BiFormer`."""
    parts = key.split('.')
    if parts[0] == 'downsample_layers':
        stage, rest = int(parts[1]), '.'.join(parts[3:])
        if stage == 0:
            return f'stem.{parts[2]}.{rest}'
        conv_index = '1' if patch_layout else '0'
        return f"stages.{stage}.downsample.{'conv' if parts[2] == conv_index else 'norm'}.{rest}"
    if parts[0] == 'stages':
        # BiFormer: stages.{s}.{b}.*, STL: stages.{s}.blocks.{b}.*
        block, rest = (parts[3], parts[4:]) if parts[2] == 'blocks' else (parts[2], parts[3:])
        rest = '.'.join(rest)
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f'stages.{parts[1]}.blocks.{block}.{rest}'
    if parts[0] == 'head':
        return 'head.fc.' + '.'.join(parts[1:])
    return key


def checkpoint_filter_fn(state_dict, model: BiFormer):
    """Convert a released BiFormer / STL / STL-nchw checkpoint (a state_dict, or the training dict with the weights
    under ``'model'``) to this model's layout; 1x1 conv weights of STL-nchw become Linear weights."""
    for wrapper in ('model', 'model_ema', 'state_dict'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'stem.0.weight' in state_dict:
        return state_dict
    patch_layout = model.stem_type == 'patch'
    out = {}
    for key, value in state_dict.items():
        new_key = remap_official_key(key, patch_layout)
        if value.ndim == 4 and value.shape[2:] == (1, 1) and '.blocks.' in new_key and '.lepe.' not in new_key \
                and '.pos_embed.' not in new_key:
            value = value.flatten(1)  # 1x1 conv -> Linear
        out[new_key] = value
    return out


def _norm_name(norm_layer) -> str:
    name = norm_layer if isinstance(norm_layer, str) else getattr(norm_layer, '__name__', repr(norm_layer))
    if name.lower() not in ('batchnorm2d', 'layernorm2d'):
        raise ValueError(f"norm_layer must be BatchNorm2d or timm's LayerNorm2d, got {norm_layer!r}")
    return name.lower()


_BIFORMER_KWARGS = (
    'depth', 'in_chans', 'num_classes', 'embed_dim', 'head_dim', 'qk_scale', 'representation_size', 'drop_path_rate',
    'drop_rate', 'use_checkpoint_stages', 'n_win', 'kv_downsample_mode', 'kv_per_wins', 'topks', 'side_dwconv',
    'layer_scale_init_value', 'qk_dims', 'param_routing', 'diff_routing', 'soft_routing', 'pre_norm', 'pe',
    'pe_stages', 'before_attn_dwconv', 'auto_pad', 'kv_downsample_kernels', 'kv_downsample_ratios', 'mlp_ratios',
    'param_attention', 'mlp_dwconv',
)
_STL_KWARGS = (
    'in_chans', 'num_classes', 'depth', 'embed_dim', 'head_dim', 'qk_scale', 'drop_path_rate', 'drop_rate',
    'use_checkpoint_stages', 'mlp_ratios', 'norm_layer', 'pre_head_norm_layer', 'n_wins', 'topks', 'side_dwconv',
)
_CLASSES = {'BiFormer': _BIFORMER_KWARGS, 'BiFormerSTL': _STL_KWARGS, 'nchwBiFormerSTL': _STL_KWARGS}


def _unsupported(kwargs: dict, name: str, supported, what: str):
    if name in kwargs and kwargs[name] not in supported:
        raise ValueError(f"{name}={kwargs[name]!r} is not supported ({what})")


def convert_official(official_class: str, official_kwargs: dict):
    """``(model_class, model_kwargs, checkpoint_filter_fn)`` equivalent to the original ``models/biformer.py:BiFormer``,
    ``models/biformer_stl.py:BiFormerSTL`` or ``models/biformer_stl_nchw.py:nchwBiFormerSTL`` constructor.

    The original defaults apply to arguments not given; options no released model uses raise a ValueError.
    """
    cls_name = official_class.rsplit(':', 1)[-1].rsplit('.', 1)[-1]
    if cls_name not in _CLASSES:
        raise ValueError(f"official_class for biformer must be models/biformer.py:BiFormer, models/biformer_stl.py:"
                         f"BiFormerSTL or models/biformer_stl_nchw.py:nchwBiFormerSTL, got {official_class!r}")
    kwargs = dict(official_kwargs)
    unknown = sorted(set(kwargs) - set(_CLASSES[cls_name]))
    if unknown:
        raise ValueError(f"official_kwargs for {cls_name} has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(_CLASSES[cls_name])}")
    common = dict(in_chans=kwargs.get('in_chans', 3), num_classes=kwargs.get('num_classes', 1000),
                  drop_path_rate=kwargs.get('drop_path_rate', 0.), side_dwconv=kwargs.get('side_dwconv', 5),
                  global_heads=8)
    if cls_name == 'BiFormer':
        if kwargs.get('qk_dims') is None or None in list(kwargs['qk_dims']):
            raise ValueError('qk_dims must give the q/k width of every stage (the original derives the head '
                             'counts from it and fails without it)')
        _unsupported(kwargs, 'kv_downsample_mode', ('identity',), "only 'identity' (no key/value pooling), as every "
                     "released model; the original's default is 'ada_avgpool', so give it")
        if 'kv_downsample_mode' not in kwargs:
            raise ValueError("kv_downsample_mode must be given as 'identity' (the original's default 'ada_avgpool' "
                             "pools key/value regions, which visionmix does not implement)")
        for flag in ('param_routing', 'diff_routing', 'soft_routing', 'mlp_dwconv'):
            _unsupported(kwargs, flag, (False, None, 0), 'no released model uses it')
        _unsupported(kwargs, 'pre_norm', (True, 1), 'post-norm blocks are not implemented')
        _unsupported(kwargs, 'pe', (None, 'none'), 'extra position embeddings are not implemented')
        _unsupported(kwargs, 'param_attention', ('qkvo',), "only 'qkvo'")
        _unsupported(kwargs, 'before_attn_dwconv', (0, 3), 'the original pads this conv by 1, so only 3 (or 0) work')
        if kwargs.get('representation_size'):
            raise ValueError('representation_size is not supported (the original cannot build it either)')
        topks = list(kwargs.get('topks', [8, 8, -1, -1]))
        if any(t == 0 or t < -2 for t in topks):
            raise ValueError(f"topks must be > 0 (BRA), -1 (attention) or -2 (attention with LePE), got {topks}")
        ls = kwargs.get('layer_scale_init_value', -1)
        model_kwargs = dict(
            common,
            embed_dims=tuple(kwargs.get('embed_dim', [64, 128, 320, 512])),
            depths=tuple(kwargs.get('depth', [3, 4, 8, 3])),
            qk_dims=tuple(kwargs['qk_dims']),
            head_dim=kwargs.get('head_dim', 64),
            n_win=kwargs.get('n_win', 7),
            topks=tuple(0 if t < 0 else t for t in topks),
            mlp_ratios=tuple(kwargs.get('mlp_ratios', [4, 4, 4, 4])),
            cpe_kernel=kwargs.get('before_attn_dwconv', 3),
            qk_scale=kwargs.get('qk_scale'),
            auto_pad=bool(kwargs.get('auto_pad', False)),
            ls_init_value=float(ls) if ls > 0 else None,
        )
        # -1 is attention without LePE, -2 with LePE on the input; one kind per model
        global_kinds = {t for t in topks if t < 0}
        if len(global_kinds) > 1:
            raise ValueError(f"topks mixes -1 and -2 stages, which visionmix does not implement: {topks}")
        model_kwargs['global_lepe'] = 'none' if global_kinds == {-1} else 'input'
    else:
        nchw = cls_name == 'nchwBiFormerSTL'
        norm = _norm_name(kwargs.get('norm_layer', 'LayerNorm2d'))
        if kwargs.get('pre_head_norm_layer') is not None and _norm_name(kwargs['pre_head_norm_layer']) != norm:
            raise ValueError('pre_head_norm_layer different from norm_layer is not supported')
        topks = list(kwargs.get('topks', (1, 4, 16, -2)))
        allowed = (-1,) if nchw else (-1, -2)
        if any(t <= 0 and t not in allowed for t in topks):
            raise ValueError(f"topks of {cls_name} must be > 0 or in {allowed}, got {topks}")
        if not nchw and len({t for t in topks if t < 0}) > 1:
            raise ValueError(f"topks mixes -1 and -2 stages, which visionmix does not implement: {topks}")
        n_wins = kwargs.get('n_wins', (7, 7, 7, 7))
        model_kwargs = dict(
            common,
            embed_dims=tuple(kwargs.get('embed_dim', [96, 192, 384, 768])),
            depths=tuple(kwargs.get('depth', [2, 2, 6, 2])),
            head_dim=kwargs.get('head_dim', 32),
            n_win=tuple(n_wins) if isinstance(n_wins, (list, tuple)) else n_wins,
            topks=tuple(0 if t < 0 else t for t in topks),
            mlp_ratios=tuple(kwargs.get('mlp_ratios', [4, 4, 4, 4])),
            cpe_kernel=0,
            # the original's blocks never receive qk_scale: it has no effect
            global_lepe='value' if nchw else ('none' if -1 in topks else 'input'),
            bra_impl='nchw' if nchw else 'legacy',
            auto_pad=nchw,  # the legacy attention asserts divisible sizes, the nchw one always pads
            stem_type='patch',
            norm_layer=norm,
        )
    return BiFormer, model_kwargs, checkpoint_filter_fn


def _cfg(url=None, **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 64, 64), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc', 'license': 'mit',
        'origin_url': 'https://github.com/rayleizhu/BiFormer', 'paper_ids': 'arXiv:2303.08810',
        'paper_name': 'BiFormer: Vision Transformer with Bi-Level Routing Attention', 'custom_load': True,
        **kwargs,
    }


def _onedrive(share: str, name: str):
    # every release link ends in '/root/content': give the cache file a name of its own
    return f'https://api.onedrive.com/v1.0/shares/s!{share}/root/content', f'{name}.pth'


default_cfgs = generate_default_cfgs({
    'biformer_tiny.in1k': _cfg(url=_onedrive('AkBbczdRlZvChHEOoGkgwgQzEDlM', 'biformer_tiny_in1k')),
    'biformer_small.in1k': _cfg(url=_onedrive('AkBbczdRlZvChHDyM-x9KWRBZ832', 'biformer_small_in1k')),
    'biformer_base.in1k': _cfg(url=_onedrive('AkBbczdRlZvChHI_XPhoadjaNxtO', 'biformer_base_in1k')),
    'biformer_stl.in1k': _cfg(url=_onedrive('AkBbczdRlZvChSf-m7ujkvx9lIQ1', 'biformer_stl_in1k')),
    # the nchw attention needs maps of at least n_win tokens per side in its BRA stages (stage 3: 7 x 16 px)
    'biformer_stl_nchw.in1k': _cfg(url=_onedrive('AkBbczdRlZvChWYrKbWbMgqd2Ai0', 'biformer_stl_nchw_in1k'),
                                   min_input_size=(3, 112, 112)),
    'test_biformer': _cfg(input_size=(3, 96, 96), min_input_size=(3, 32, 32), pool_size=(3, 3), custom_load=False),
})


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 8, 2))))))
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


_BIFORMER = dict(n_win=7, topks=(1, 4, 16, -2), head_dim=32, mlp_ratios=3., side_dwconv=5, cpe_kernel=3)
_STL = dict(
    embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), n_win=7, topks=(1, 4, 16, -2), head_dim=32, mlp_ratios=4.,
    side_dwconv=5, cpe_kernel=0, stem_type='patch', norm_layer='batchnorm2d')


@register_model
def biformer_tiny(pretrained=False, **kwargs) -> BiFormer:
    model_args = dict(_BIFORMER, embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2))
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained=False, **kwargs) -> BiFormer:
    model_args = dict(_BIFORMER, embed_dims=(64, 128, 256, 512), depths=(4, 4, 18, 4))
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained=False, **kwargs) -> BiFormer:
    model_args = dict(_BIFORMER, embed_dims=(96, 192, 384, 768), depths=(4, 4, 18, 4))
    return _create_biformer('biformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl(pretrained=False, **kwargs) -> BiFormer:
    return _create_biformer('biformer_stl', pretrained=pretrained, **dict(_STL, **kwargs))


@register_model
def biformer_stl_nchw(pretrained=False, **kwargs) -> BiFormer:
    model_args = dict(_STL, topks=(1, 4, 16, -1), global_lepe='value', bra_impl='nchw')
    return _create_biformer('biformer_stl_nchw', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_biformer(pretrained=False, **kwargs) -> BiFormer:
    model_args = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), head_dim=8, n_win=4, topks=(1, 4, 8, -2),
                      mlp_ratios=2., drop_path_rate=0.1)
    return _create_biformer('test_biformer', pretrained=pretrained, **dict(model_args, **kwargs))
