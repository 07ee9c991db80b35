"""MAViT (MALA) and RAVLT (RALA): hybrid linear/softmax attention backbones with 2-D RoPE.

Papers:
* `Rectifying Magnitude Neglect in Linear Attention` (MALA, ICCV 2025) - https://arxiv.org/abs/2507.00698
* `Breaking the Low-Rank Dilemma of Linear Attention` (RALA, CVPR 2025) - https://arxiv.org/abs/2411.07635

Original code and weights: https://github.com/qhfan/MALA (MAViT), https://github.com/qhfan/RALA (RAVLT).
Both share one network and differ only in the linear attention of stages 0-1 (MALA's beta/gamma
readout vs RALA's softmax-reweighted keys and normalised readout) and the width of the head projection;
stages 2-3 use softmax attention in every released variant. One model class serves both families.

Differences from the original code, none of which changes a released model's outputs:
* the downsampler of stage ``i`` lives at the start of ``stages.{i+1}`` (timm layout), so every stage
  output is the full-resolution map before downsampling; ``checkpoint_filter_fn`` moves keys;
* the RoPE frequency table is recomputed in every forward (in float32, as the original buffer holds it)
  instead of being stored; the checkpoint's ``RoPE.angle`` buffers are checked and dropped on load;
* the classifier is a Linear layer after pooling (the original uses a 1x1 conv, the same map).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm2d,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_function,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checkpoint import load_release_weights
from visionmix.kernels import linear_attention
from visionmix.kernels.linear_attention import apply_rope

__all__ = ['MALA']

ATTN_TYPES = ('mala', 'rala', 'softmax')
RopeTables = Tuple[torch.Tensor, torch.Tensor]


def rope_frequencies(head_dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-channel RoPE frequencies ``10000 ** -linspace(0, 1, d/4)``, each repeated for its channel pair.

    Computed in float32 like the original's persistent buffer (the released checkpoints hold these float32
    values); the first half of a head's channels rotate with the row index, the second half with the column.
    """
    inv_freq = 1.0 / torch.pow(10000.0, torch.linspace(0, 1, head_dim // 4, dtype=torch.float32, device=device))
    return inv_freq.repeat_interleave(2)


@register_notrace_module  # builds its tables from the token-map size
class RotaryEmbedding2d(nn.Module):
    """2-D rotary tables ``(cos, sin)`` of shape ``[H*W, head_dim]`` for a row-major token map of any size."""

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4 (two axes, channel pairs), got {head_dim}")
        self.head_dim = head_dim

    def forward(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> RopeTables:
        inv_freq = rope_frequencies(self.head_dim, device).to(dtype)
        rows = torch.arange(height, device=device, dtype=dtype)[:, None] * inv_freq  # [H, d/2]
        cols = torch.arange(width, device=device, dtype=dtype)[:, None] * inv_freq  # [W, d/2]
        half = inv_freq.shape[0]
        angle = torch.cat([rows[:, None, :].expand(height, width, half),
                           cols[None, :, :].expand(height, width, half)], dim=-1).reshape(height * width, -1)
        return angle.cos(), angle.sin()


@register_notrace_function
@torch.jit.ignore
def rotary_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: str, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """The shared linear-attention op, kept out of TorchScript and FX graphs (it validates its arguments)."""
    return linear_attention(q, k, v, form=form, rope=(cos, sin))


class GatedAttention(nn.Module):
    """Multi-head attention with LePE and an output gate: ``proj((attn(q, k, v) + lepe(v)) * o)``.

    ``qkvo`` (1x1 conv) gives ``[q | k | v | o]``, head-major within each; ``lepe`` is a 5x5 depthwise conv on the
    raw v map; the gate ``o`` has no activation. ``attn_type`` picks the token mixer: ``'mala'`` or ``'rala'``
    (global linear attention with ELU+1 features, RoPE on the numerator only) or ``'softmax'`` (RoPE on q, k).
    """

    def __init__(self, dim: int, num_heads: int, attn_type: str = 'softmax', device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_type = attn_type
        self.scale = self.head_dim ** -0.5
        self.qkvo = nn.Conv2d(dim, dim * 4, 1, **dd)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, **dd)
        self.proj = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)
        lepe = self.lepe(v)
        # [B, C, H, W] -> [B, N, heads, head_dim]
        q = q.reshape(B, self.num_heads, self.head_dim, H * W).permute(0, 3, 1, 2)
        k = k.reshape(B, self.num_heads, self.head_dim, H * W).permute(0, 3, 1, 2)
        v = v.reshape(B, self.num_heads, self.head_dim, H * W).permute(0, 3, 1, 2)
        if self.attn_type == 'softmax':
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale).transpose(1, 2)
        else:
            out = rotary_linear_attention(q, k, v, self.attn_type, rope[0], rope[1])
        out = out.permute(0, 2, 3, 1).reshape(B, C, H, W)
        return self.proj((out + lepe) * o)


class ConvFFN(nn.Module):
    """1x1 conv, GELU, residual 3x3 depthwise conv, 1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x)
        return self.fc2(x)


class MALABlock(nn.Module):
    """Conv positional encoding (outside the residual branches), then pre-norm attention and FFN branches,
    each with an optional layer scale ``gamma`` of shape (1, C, 1, 1) and stochastic depth."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attn_type: str = 'softmax',
            mlp_ratio: float = 3.5,
            drop_path: float = 0.,
            ls_init_value: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.ls_init_value = ls_init_value
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = LayerNorm2d(dim, eps=1e-6, **dd)
        self.attn = GatedAttention(dim, num_heads, attn_type, **dd)
        self.norm2 = LayerNorm2d(dim, eps=1e-6, **dd)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), **dd)
        if ls_init_value is not None:
            self.gamma_1 = nn.Parameter(torch.empty(1, dim, 1, 1, **dd))
            self.gamma_2 = nn.Parameter(torch.empty(1, dim, 1, 1, **dd))
        else:
            self.register_parameter('gamma_1', None)
            self.register_parameter('gamma_2', None)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.init_layer_scale()

    def init_layer_scale(self):
        if self.gamma_1 is not None and self.gamma_2 is not None:
            nn.init.constant_(self.gamma_1, self.ls_init_value)
            nn.init.constant_(self.gamma_2, self.ls_init_value)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        x = x + self.pos(x)
        y = self.attn(self.norm1(x), rope)
        if self.gamma_1 is not None:
            y = y * self.gamma_1
        x = x + self.drop_path(y)
        y = self.ffn(self.norm2(x))
        if self.gamma_2 is not None:
            y = y * self.gamma_2
        return x + self.drop_path(y)


class Downsample(nn.Module):
    """3x3 stride-2 conv (with bias), then BatchNorm."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class MALAStage(nn.Module):
    """Optional downsampler, then blocks at one resolution sharing one set of RoPE tables."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            attn_types: Sequence[str],
            downsample: bool = True,
            mlp_ratio: float = 3.5,
            drop_path: Sequence[float] = (),
            ls_init_value: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, **dd) if downsample else nn.Identity()
        if out_dim % num_heads:
            raise ValueError(f"stage width ({out_dim}) must be divisible by its num_heads ({num_heads})")
        self.rope = RotaryEmbedding2d(out_dim // num_heads)
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.ModuleList([
            MALABlock(out_dim, num_heads, attn_types[i], mlp_ratio=mlp_ratio, drop_path=drop_path[i],
                      ls_init_value=ls_init_value, **dd)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        rope = self.rope(x.shape[2], x.shape[3], x.dtype, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
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


class MALA(nn.Module):
    """MAViT (MALA, https://arxiv.org/abs/2507.00698) and RAVLT (RALA, https://arxiv.org/abs/2411.07635).

    Conv stem (stride 4), four stages of CPE + gated attention + conv FFN blocks (NCHW throughout), then a
    1x1 conv projection to ``head_proj_dim`` with BatchNorm and SiLU before pooling and the classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: ``'avg'`` or ``''``.
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage; ``embed_dims[i] / num_heads[i]`` must be divisible by 4 (2-D RoPE).
        attn_types: per stage, ``'mala' | 'rala' | 'softmax'`` or one such value per block.
        mlp_ratios: FFN hidden width over block width, one value or one per stage.
        ls_init_values: layer-scale init per stage (one value or one per stage), None for no layer scale.
        head_proj_dim: width of the projection before pooling (MAViT 2048/2560, RAVLT 1024).
        drop_rate, drop_path_rate: dropout before the classifier, stochastic depth.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            attn_types: Sequence[Union[str, Sequence[str]]] = ('mala', 'mala', 'softmax', 'softmax'),
            mlp_ratios: Union[float, Sequence[float]] = 3.5,
            ls_init_values: Union[Optional[float], Sequence[Optional[float]]] = 1.,
            head_proj_dim: int = 2048,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        embed_dims, num_heads = _per_stage(embed_dims, num_stages, 'embed_dims'), _per_stage(
            num_heads, num_stages, 'num_heads')
        attn_types = _per_stage(attn_types, num_stages, 'attn_types')
        mlp_ratios = _per_stage(mlp_ratios, num_stages, 'mlp_ratios')
        ls_init_values = _per_stage(ls_init_values, num_stages, 'ls_init_values')
        block_attn_types = []
        for i, (types, depth) in enumerate(zip(attn_types, depths)):
            types = [types] * depth if isinstance(types, str) else list(types)[:depth]
            if len(types) != depth:
                raise ValueError(f"attn_types[{i}] must give one type per block ({depth}), got {len(types)}")
            bad = [t for t in types if t not in ATTN_TYPES]
            if bad:
                raise ValueError(f"attn_types must be in {ATTN_TYPES}, got {bad[0]!r} in stage {i}")
            block_attn_types.append(types)
        if embed_dims[0] % 2:
            raise ValueError(f"embed_dims[0] must be even (the stem's first convs use half of it), got {embed_dims[0]}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NCHW'

        stem_dim = embed_dims[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(stem_dim, **dd),
            nn.GELU(),
            nn.Conv2d(stem_dim, stem_dim, 3, padding=1, **dd),
            nn.BatchNorm2d(stem_dim, **dd),
            nn.GELU(),
            nn.Conv2d(stem_dim, stem_dim, 3, padding=1, **dd),
            nn.BatchNorm2d(stem_dim, **dd),
            nn.GELU(),
            nn.Conv2d(stem_dim, embed_dims[0], 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
        )
        # linear in the block index over the whole network, split per stage
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        prev_dim = embed_dims[0]
        for i in range(num_stages):
            stages.append(MALAStage(
                prev_dim, embed_dims[i], depths[i], num_heads[i], block_attn_types[i], downsample=i > 0,
                mlp_ratio=mlp_ratios[i], drop_path=dp_rates[i], ls_init_value=ls_init_values[i], **dd))
            prev_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        # projection before pooling, as EfficientNet's conv_head
        self.num_features = self.head_hidden_size = head_proj_dim
        self.proj = nn.Conv2d(prev_dim, head_proj_dim, 1, **dd)
        self.norm = nn.BatchNorm2d(head_proj_dim, **dd)
        self.act = nn.SiLU()
        self.head = ClassifierHead(head_proj_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    def _init_weights(self, m: nn.Module):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            m.reset_parameters()
        elif isinstance(m, MALABlock):
            m.init_layer_scale()

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
                (r'^proj|^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an original release file (a training dict that pickles an ``argparse.Namespace``) or a state_dict.

        timm's ``weights_only`` loader refuses those files; the pretrained cfgs set ``custom_load`` so that
        timm calls this. A classifier of another shape (other ``num_classes``) is left initialised.
        """
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def _forward_post(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))

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
            norm: unused (the head projection and its norm follow pooling width, not a stage's).
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
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self._forward_post(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages not needed for ``indices``; with the head or norm pruned (or fewer stages kept), the
        projection before pooling goes too, so features end at the last tap."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        fewer_stages = max_index + 1 < len(self.stages)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_head or fewer_stages:
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
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
        return self._forward_post(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def remap_official_key(key: str) -> str:
    """Key of the original MALA/RAVLT state_dict -> key of :class:`MALA`."""
    parts = key.split('.')
    if parts[:2] == ['patch_embed', 'proj']:
        return 'stem.' + '.'.join(parts[2:])
    if parts[0] == 'layers':
        stage = int(parts[1])
        if parts[2] == 'downsample':
            name = {'reduction': 'conv'}.get(parts[3], parts[3])
            return f"stages.{stage + 1}.downsample.{name}.{'.'.join(parts[4:])}"
        rest = '.'.join(parts[2:]).replace('.norm1.norm.', '.norm1.').replace('.norm2.norm.', '.norm2.')
        return f'stages.{stage}.{rest}'
    if parts[0] == 'head':
        return 'head.fc.' + '.'.join(parts[1:])
    return key


def checkpoint_filter_fn(state_dict, model: MALA):
    """Convert a released MAViT/RAVLT checkpoint (a bare state_dict or the training dict, weights under
    ``'model'``) to this model's layout; the RoPE angle buffers are checked against the model and dropped."""
    for wrapper in ('model', 'model_ema', 'state_dict'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'stem.0.weight' in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'layers' and parts[2] == 'RoPE':
            stage = int(parts[1])
            if stage < len(model.stages):
                expected = rope_frequencies(model.stages[stage].rope.head_dim)
                if tuple(value.shape) != tuple(expected.shape) or (
                        not value.is_meta and not torch.allclose(value.float().cpu(), expected, rtol=1e-6)):
                    raise ValueError(f"checkpoint {key} (shape {tuple(value.shape)}) does not match the RoPE of a "
                                     f"head_dim={model.stages[stage].rope.head_dim} stage")
            continue
        new_key = remap_official_key(key)
        if new_key == 'head.fc.weight' and value.ndim == 4:
            value = value.flatten(1)  # 1x1 conv classifier -> Linear
        out[new_key] = value
    return out


_CLASS_FORMS = {'MALA': 'mala', 'RAVLT': 'rala'}
_OFFICIAL_KWARGS = (
    'img_size', 'in_chans', 'num_classes', 'flagss', 'embed_dims', 'depths', 'num_heads', 'mlp_ratios',
    'drop_path_rate', 'projection', 'layerscales', 'layer_init_values',
)
_REQUIRED_KWARGS = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'projection')


def convert_official(official_class: str, official_kwargs: dict):
    """``(model_class, model_kwargs, checkpoint_filter_fn)`` equivalent to the original MALA
    (``classfication_release/model.py:MALA``) or RAVLT (``classfication/RALA.py:RAVLT``) constructor.

    The architecture arguments (``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``projection``) must
    be given; ``flagss`` ('l' linear, 'v' softmax per block) defaults to the original's (stages 0-1 linear).
    """
    cls_name = official_class.rsplit(':', 1)[-1].rsplit('.', 1)[-1]
    if cls_name not in _CLASS_FORMS:
        raise ValueError(f"official_class for mala/rala must be classfication_release/model.py:MALA or "
                         f"classfication/RALA.py:RAVLT, got {official_class!r}")
    kwargs = dict(official_kwargs)
    unknown = sorted(set(kwargs) - set(_OFFICIAL_KWARGS))
    if unknown:
        raise ValueError(f"official_kwargs for {cls_name} has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(_OFFICIAL_KWARGS)}")
    missing = [k for k in _REQUIRED_KWARGS if k not in kwargs]
    if missing:
        raise ValueError(f"official_kwargs for {cls_name} must give {missing} (the original defaults are not assumed)")
    depths = list(kwargs['depths'])
    num_stages = len(depths)
    linear = _CLASS_FORMS[cls_name]
    flagss = kwargs.get('flagss', [['l'] * 10, ['l'] * 10, ['v'] * 40, ['v'] * 10][:num_stages])
    if len(flagss) != num_stages or any(len(f) < d for f, d in zip(flagss, depths)):
        raise ValueError(f"flagss must give at least one flag per block of every stage (depths {depths})")
    flag_types = {'l': linear, 'v': 'softmax'}
    attn_types = []
    for flags, depth in zip(flagss, depths):
        bad = [f for f in flags[:depth] if f not in flag_types]
        if bad:
            raise ValueError(f"flagss entries must be 'l' (linear) or 'v' (softmax), got {bad[0]!r}")
        attn_types.append(tuple(flag_types[f] for f in flags[:depth]))
    layerscales = _per_stage(kwargs.get('layerscales', False), num_stages, 'layerscales')
    init_values = _per_stage(kwargs.get('layer_init_values', 1e-6), num_stages, 'layer_init_values')
    model_kwargs = dict(
        in_chans=kwargs.get('in_chans', 3),
        num_classes=kwargs.get('num_classes', 1000),
        embed_dims=tuple(kwargs['embed_dims']),
        depths=tuple(depths),
        num_heads=tuple(kwargs['num_heads']),
        attn_types=tuple(attn_types),
        mlp_ratios=tuple(kwargs['mlp_ratios']),
        ls_init_values=tuple(float(v) if ls else None for ls, v in zip(layerscales, init_values)),
        head_proj_dim=kwargs['projection'],
        drop_path_rate=kwargs.get('drop_path_rate', 0.),
    )
    return MALA, model_kwargs, checkpoint_filter_fn


def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 32, 32), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc', 'license': 'unknown', 'custom_load': 'hf',
        **kwargs,
    }


_MAVIT = dict(hf_hub_id='aldjalkdf/MAViT', origin_url='https://github.com/qhfan/MALA', paper_ids='arXiv:2507.00698',
              paper_name='Rectifying Magnitude Neglect in Linear Attention')
_RAVLT = dict(hf_hub_id='aldjalkdf/RAVLT', origin_url='https://github.com/qhfan/RALA', paper_ids='arXiv:2411.07635',
              paper_name='Breaking the Low-Rank Dilemma of Linear Attention')
_TEST = dict(input_size=(3, 96, 96), min_input_size=(3, 32, 32), pool_size=(3, 3))

default_cfgs = generate_default_cfgs({
    'mavit_tiny.in1k': _cfg(hf_hub_filename='MAViT_T.pth', **_MAVIT),
    'mavit_small.in1k': _cfg(hf_hub_filename='MAViT_S.pth', **_MAVIT),
    'mavit_base.in1k': _cfg(hf_hub_filename='MAViT_B.pth', **_MAVIT),
    'mavit_large.in1k': _cfg(hf_hub_filename='MAViT_L.pth', **_MAVIT),
    'ravlt_tiny.in1k': _cfg(hf_hub_filename='RAVLT_T.pth', **_RAVLT),
    'ravlt_small.in1k': _cfg(hf_hub_filename='RAVLT_S.pth', **_RAVLT),
    'ravlt_base.in1k': _cfg(hf_hub_filename='RAVLT_B.pth', **_RAVLT),
    'ravlt_large.in1k': _cfg(hf_hub_filename='RAVLT_L.pth', **_RAVLT),
    'test_mavit': _cfg(**_TEST),
    'test_ravlt': _cfg(**_TEST),
})


def _create_mala(variant: str, pretrained: bool = False, **kwargs) -> MALA:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 6, 2))))))
    return build_model_with_cfg(
        MALA, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _variant_args(size: str, linear: str) -> dict:
    """Released T/S/B/L configurations; stages 0-1 use the family's linear attention, stages 2-3 softmax."""
    args = {
        'tiny': dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                     ls_init_values=(1., 1., 1., 1.), drop_path_rate=0.1),
        'small': dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                      ls_init_values=(1., 1., 1., 1.), drop_path_rate=0.15),
        'base': dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                     ls_init_values=(1., 1., 1e-6, 1e-6), drop_path_rate=0.4),
        'large': dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                      ls_init_values=(1e-6, 1e-6, 1e-6, 1e-6), drop_path_rate=0.55),
    }[size]
    head_proj_dim = 1024 if linear == 'rala' else (2560 if size == 'large' else 2048)
    return dict(args, attn_types=(linear, linear, 'softmax', 'softmax'), mlp_ratios=3.5, head_proj_dim=head_proj_dim)


@register_model
def mavit_tiny(pretrained=False, **kwargs) -> MALA:
    return _create_mala('mavit_tiny', pretrained=pretrained, **dict(_variant_args('tiny', 'mala'), **kwargs))


@register_model
def mavit_small(pretrained=False, **kwargs) -> MALA:
    return _create_mala('mavit_small', pretrained=pretrained, **dict(_variant_args('small', 'mala'), **kwargs))


@register_model
def mavit_base(pretrained=False, **kwargs) -> MALA:
    return _create_mala('mavit_base', pretrained=pretrained, **dict(_variant_args('base', 'mala'), **kwargs))


@register_model
def mavit_large(pretrained=False, **kwargs) -> MALA:
    return _create_mala('mavit_large', pretrained=pretrained, **dict(_variant_args('large', 'mala'), **kwargs))


@register_model
def ravlt_tiny(pretrained=False, **kwargs) -> MALA:
    return _create_mala('ravlt_tiny', pretrained=pretrained, **dict(_variant_args('tiny', 'rala'), **kwargs))


@register_model
def ravlt_small(pretrained=False, **kwargs) -> MALA:
    return _create_mala('ravlt_small', pretrained=pretrained, **dict(_variant_args('small', 'rala'), **kwargs))


@register_model
def ravlt_base(pretrained=False, **kwargs) -> MALA:
    return _create_mala('ravlt_base', pretrained=pretrained, **dict(_variant_args('base', 'rala'), **kwargs))


@register_model
def ravlt_large(pretrained=False, **kwargs) -> MALA:
    return _create_mala('ravlt_large', pretrained=pretrained, **dict(_variant_args('large', 'rala'), **kwargs))


def _test_args(linear: str) -> dict:
    return dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                attn_types=(linear, linear, 'softmax', 'softmax'), mlp_ratios=2., ls_init_values=(1., 1., 1e-2, 1e-2),
                head_proj_dim=128, drop_path_rate=0.1)


@register_model
def test_mavit(pretrained=False, **kwargs) -> MALA:
    return _create_mala('test_mavit', pretrained=pretrained, **dict(_test_args('mala'), **kwargs))


@register_model
def test_ravlt(pretrained=False, **kwargs) -> MALA:
    return _create_mala('test_ravlt', pretrained=pretrained, **dict(_test_args('rala'), **kwargs))
